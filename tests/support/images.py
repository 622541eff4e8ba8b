"""The two images the tests run, built offline on this machine and reused by tag.

- comfyhub-test-base:bookworm: a minimal Debian bookworm with python3, python3-yaml and git (custom nodes are cloned
  in a throw-away container of it), made with debootstrap and `docker import` (nothing can be pulled from a registry
  here). Built when the tag is missing or its label comfyhub.test.base-packages differs from BASE_PACKAGES.
- comfyhub-comfyui-double:test: the ComfyUI test double (tests/comfyui_double) on top of it. Rebuilt when the label
  comfyhub.test.inputs-hash differs from the hash of its inputs (server.py, Dockerfile and the base image's id).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import docker
import docker.errors

BASE_TAG = "comfyhub-test-base:bookworm"
DOUBLE_TAG = "comfyhub-comfyui-double:test"
CACHED_TAGS = (BASE_TAG, DOUBLE_TAG)
TEST_LABEL = "comfyhub.test"
INPUTS_HASH_LABEL = "comfyhub.test.inputs-hash"
PACKAGES_LABEL = "comfyhub.test.base-packages"
# What debootstrap adds to the minimal base; changing the list rebuilds the base (and so the double) once.
BASE_PACKAGES = ("python3", "python3-yaml", "git", "ca-certificates")

DOUBLE_DIR = Path(__file__).resolve().parent.parent / "comfyui_double"
DOUBLE_INPUTS = ("Dockerfile", "server.py")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
LOCKFILE = Path(tempfile.gettempdir()) / "comfyhub-test-images.lock"
IMPORT_TIMEOUT_S = 600


class ImageBuildError(RuntimeError):
    """A test image could not be built."""


def ensure_test_images(client: docker.DockerClient) -> dict[str, str]:
    """Build whatever of the two test images is missing or stale; return their tags."""
    # Read-only is enough for flock, and lets a user other than the lock file's owner take it too.
    lock = os.open(LOCKFILE, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        # Two pytest processes must not debootstrap or build at the same time; the second one finds them ready.
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = _ensure_base_image(client)
        _ensure_double_image(client, base)
    finally:
        os.close(lock)
    return {"base": BASE_TAG, "comfyui_double": DOUBLE_TAG}


def double_inputs_hash(base_image_id: str) -> str:
    digest = hashlib.sha256()
    for name in DOUBLE_INPUTS:
        digest.update(name.encode() + b"\0")
        digest.update((DOUBLE_DIR / name).read_bytes())
        digest.update(b"\0")
    digest.update(b"FROM\0" + base_image_id.encode())
    return digest.hexdigest()


def _ensure_base_image(client: docker.DockerClient):
    try:
        current = client.images.get(BASE_TAG)
    except docker.errors.ImageNotFound:
        current = None
    if current is not None and (current.labels or {}).get(PACKAGES_LABEL) == ",".join(BASE_PACKAGES):
        return current
    debootstrap = shutil.which("debootstrap", path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if debootstrap is None:
        raise ImageBuildError(f"Building {BASE_TAG} needs debootstrap: apt-get install -y debootstrap")
    if os.geteuid() != 0:
        raise ImageBuildError(f"Building {BASE_TAG} runs debootstrap, which needs root.")

    started = time.monotonic()
    rootfs = Path(tempfile.mkdtemp(prefix="comfyhub-test-base-"))
    try:
        result = subprocess.run(
            [debootstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "bookworm", str(rootfs),
             DEBIAN_MIRROR],
            stdin=subprocess.DEVNULL, capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise ImageBuildError(
                f"debootstrap failed (exit {result.returncode}) while building {BASE_TAG}:\n"
                + "\n".join((result.stdout + result.stderr).splitlines()[-30:])
            )
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            _remove_files_in(rootfs / leftover)
        _import_rootfs(client, rootfs)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    if current is not None:
        # The previous base is now untagged; drop it once nothing is built on it any more.
        try:
            client.images.remove(current.id, noprune=False)
        except docker.errors.APIError:
            pass
    print(f"[comfyhub tests] built {BASE_TAG} in {time.monotonic() - started:.0f} s", flush=True)
    return client.images.get(BASE_TAG)


def _import_rootfs(client: docker.DockerClient, rootfs: Path) -> None:
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def chunks():
        while block := tar.stdout.read(1 << 20):
            yield block

    # The import answers only after dockerd has unpacked the layer, which can outlast the client's usual timeout.
    api = client.api
    usual_timeout, api.timeout = api.timeout, IMPORT_TIMEOUT_S
    try:
        repository, tag = BASE_TAG.split(":")
        api.import_image_from_stream(
            chunks(), repository=repository, tag=tag,
            changes=[
                f"LABEL {TEST_LABEL}=1",
                f"LABEL {PACKAGES_LABEL}={','.join(BASE_PACKAGES)}",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "ENV LANG=C.UTF-8",
                'CMD ["/bin/bash"]',
            ],
        )
    finally:
        api.timeout = usual_timeout
        stderr = tar.stderr.read().decode(errors="replace")
        if tar.wait() != 0:
            raise ImageBuildError(f"tar of the debootstrap tree failed: {stderr}")


def _ensure_double_image(client: docker.DockerClient, base) -> None:
    wanted = double_inputs_hash(base.id)
    try:
        current = client.images.get(DOUBLE_TAG)
    except docker.errors.ImageNotFound:
        current = None
    if current is not None and (current.labels or {}).get(INPUTS_HASH_LABEL) == wanted:
        return

    started = time.monotonic()
    try:
        client.images.build(
            path=str(DOUBLE_DIR), tag=DOUBLE_TAG, rm=True, forcerm=True, pull=False,
            labels={TEST_LABEL: "1", INPUTS_HASH_LABEL: wanted},
        )
    except docker.errors.BuildError as error:
        log = io.StringIO()
        for entry in error.build_log:
            log.write(entry.get("stream") or entry.get("error") or "")
        raise ImageBuildError(f"Building {DOUBLE_TAG} failed: {error.msg}\n{log.getvalue()[-3000:]}") from error
    if current is not None:
        # The previous build is now untagged; drop it so stale doubles do not pile up.
        try:
            client.images.remove(current.id, noprune=False)
        except docker.errors.APIError:
            pass
    print(f"[comfyhub tests] built {DOUBLE_TAG} in {time.monotonic() - started:.0f} s", flush=True)


def _remove_files_in(path: Path) -> None:
    """Drop downloaded packages and indexes (about 40 MB); apt's own sub-folders stay."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_file() and not child.is_symlink():
            child.unlink(missing_ok=True)
