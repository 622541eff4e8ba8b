"""The images the tests run, built offline on this machine and reused by tag.

- comfyhub-test-base:bookworm: a minimal Debian bookworm with python3, python3-yaml, pip and git (custom nodes are
  cloned in a throw-away container of it), made with debootstrap and `docker import` (nothing can be pulled from a
  registry here). Built when the tag is missing or its label comfyhub.test.base-packages differs from BASE_PACKAGES.
- comfyhub-comfyui-double:test: the image ComfyHub ships (docker/comfyui/Dockerfile) built on that base, with the
  ComfyUI test double (tests/comfyui_double) as the local ComfyUI checkout and a stub torch 2.13.0 wheel as the whole
  torch stack, offline. Rebuilt when the label comfyhub.test.inputs-hash differs from the hash of its inputs (every
  file of the build context, the build arguments and the base image's id).
- comfyhub-comfyui-cliargs:test: a stand-in for images that read ComfyUI's arguments from $CLI_ARGS: the double image
  with another entrypoint and without the label comfyhub.image.arguments.
copy_test_images() loads them into another engine (the second engine of tests/support/engine.py) from the first.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

import docker
import docker.errors

BASE_TAG = "comfyhub-test-base:bookworm"
DOUBLE_TAG = "comfyhub-comfyui-double:test"
CLIARGS_TAG = "comfyhub-comfyui-cliargs:test"
CACHED_TAGS = (BASE_TAG, DOUBLE_TAG, CLIARGS_TAG)
TEST_LABEL = "comfyhub.test"
INPUTS_HASH_LABEL = "comfyhub.test.inputs-hash"
PACKAGES_LABEL = "comfyhub.test.base-packages"
ARGUMENTS_LABEL = "comfyhub.image.arguments"
# What debootstrap adds to the minimal base; changing the list rebuilds the base (and so the double) once.
# python3-pip brings setuptools, wheel and distutils with it (its Depends; debootstrap skips Recommends).
BASE_PACKAGES = ("python3", "python3-yaml", "python3-pip", "git", "ca-certificates")

REPO = Path(__file__).resolve().parent.parent.parent
IMAGE_DIR = REPO / "docker" / "comfyui"
# Build-context extras a host may keep next to the Dockerfile (docs/images.md); never part of the test image.
IMAGE_DIR_LOCAL_EXTRAS = ("comfyui", "wheels", "extra-ca.pem")
DOUBLE_DIR = Path(__file__).resolve().parent.parent / "comfyui_double"
# The double's files as a ComfyUI checkout: name in the checkout -> file in DOUBLE_DIR.
DOUBLE_CHECKOUT = {"main.py": "server.py", "comfyui_version.py": "comfyui_version.py",
                   "requirements.txt": "requirements.txt"}
STUB_TORCH_VERSION = "2.13.0"
DOUBLE_BUILD_ARGS = {
    "BASE_IMAGE": BASE_TAG,
    "TORCH_INDEX_URL": "none",
    "PIP_INDEX_URL": "none",
    "TORCH_PACKAGES": f"torch=={STUB_TORCH_VERSION}",
    "EXTRA_PACKAGES": "",
}
CLIARGS_ENTRYPOINT = ["/bin/sh", "-c", "exec python3 /opt/comfyui/main.py $CLI_ARGS"]
DEBIAN_MIRROR = "http://deb.debian.org/debian"
LOCKFILE = Path(tempfile.gettempdir()) / "comfyhub-test-images.lock"
IMPORT_TIMEOUT_S = 600
BUILD_TIMEOUT_S = 600


class ImageBuildError(RuntimeError):
    """A test image could not be built."""


def ensure_test_images(client: docker.DockerClient) -> dict[str, str]:
    """Build whatever of the test images is missing or stale; return their tags."""
    # Read-only is enough for flock, and lets a user other than the lock file's owner take it too.
    lock = os.open(LOCKFILE, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        # Two pytest processes must not debootstrap or build at the same time; the second one finds them ready.
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = _ensure_base_image(client)
        double = _ensure_double_image(client, base)
        _ensure_cliargs_image(client, double)
    finally:
        os.close(lock)
    return {"base": BASE_TAG, "comfyui_double": DOUBLE_TAG, "comfyui_cliargs": CLIARGS_TAG}


def copy_test_images(source: docker.DockerClient, target: docker.DockerClient) -> list[str]:
    """Load the test images (built on source) into another engine, as `docker save | docker load` does, streamed in
    one archive so shared layers travel once. Only tags target lacks or holds in another build are copied; the
    build they replace is dropped. Returns the tags copied."""
    lock = os.open(LOCKFILE, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        # Not while another session rebuilds them on source, nor copies them to the same target.
        fcntl.flock(lock, fcntl.LOCK_EX)
        stale = {}
        for tag in CACHED_TAGS:
            wanted = source.images.get(tag)
            current = _tagged(target, tag)
            if current is None or current.id != wanted.id:
                stale[tag] = current
        if not stale:
            return []
        _save_and_load(source, target, list(stale))
        for previous in stale.values():
            _drop_replaced(target, previous)
    finally:
        os.close(lock)
    return list(stale)


def _save_and_load(source: docker.DockerClient, target: docker.DockerClient, tags: list[str]) -> None:
    saving, loading = source.api, target.api
    usual_timeouts = saving.timeout, loading.timeout
    saving.timeout = loading.timeout = IMPORT_TIMEOUT_S
    try:
        # The SDK's get_image saves one image; the engine's /images/get takes several names.
        archive = saving._get(saving._url("/images/get"), params={"names": tags}, stream=True)
        saving._raise_for_status(archive)
        with archive:
            for message in loading.load_image(archive.iter_content(1 << 20)):
                if "error" in message:
                    raise ImageBuildError(f"Loading {', '.join(tags)} into {loading.base_url} failed: "
                                          f"{message['error']}")
    except docker.errors.APIError as error:
        raise ImageBuildError(f"Copying {', '.join(tags)} from {saving.base_url} to {loading.base_url} failed: "
                              f"{error}") from error
    finally:
        saving.timeout, loading.timeout = usual_timeouts


def assemble_image_context(target: Path, *, comfyui_checkout: bool = True) -> Path:
    """Lay out the test image's build context in target (an empty or missing folder): docker/comfyui as it is in
    the repository (custom_nodes/ included; a host's own extras left out), wheels/ with the stub torch, and with
    comfyui_checkout the double as the local ComfyUI checkout in comfyui/."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in sorted(IMAGE_DIR.iterdir()):
        if entry.name in IMAGE_DIR_LOCAL_EXTRAS or entry.name == "__pycache__":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target / entry.name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(entry, target / entry.name, follow_symlinks=False)
    if comfyui_checkout:
        checkout = target / "comfyui"
        checkout.mkdir()
        for name, source in DOUBLE_CHECKOUT.items():
            shutil.copyfile(DOUBLE_DIR / source, checkout / name)
    write_stub_torch_wheel(target / "wheels")
    return target


def write_stub_torch_wheel(folder: Path) -> Path:
    """A wheel named torch, version STUB_TORCH_VERSION, holding nothing but torch.__version__: enough for pip to
    install, pin and refuse to replace it. Byte-for-byte the same every time (fixed times), so hashes stay put."""
    folder.mkdir(parents=True, exist_ok=True)
    dist_info = f"torch-{STUB_TORCH_VERSION}.dist-info"
    files = {
        "torch/__init__.py": (f'"""A stub of torch for ComfyHub\'s tests: no tensors, only a version."""\n'
                              f'__version__ = "{STUB_TORCH_VERSION}"\n'),
        f"{dist_info}/METADATA": (f"Metadata-Version: 2.1\nName: torch\nVersion: {STUB_TORCH_VERSION}\n"
                                  "Summary: A stub of torch for ComfyHub's tests (not PyTorch)\n"),
        f"{dist_info}/WHEEL": ("Wheel-Version: 1.0\nGenerator: comfyhub-tests\nRoot-Is-Purelib: true\n"
                               "Tag: py3-none-any\n"),
    }
    record = []
    for name, text in files.items():
        data = text.encode()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}\n")
    record.append(f"{dist_info}/RECORD,,\n")
    files[f"{dist_info}/RECORD"] = "".join(record)
    wheel = folder / f"torch-{STUB_TORCH_VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in files.items():
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, text)
    return wheel


def double_inputs_hash(base_image_id: str) -> str:
    with tempfile.TemporaryDirectory(prefix="comfyhub-test-image-") as folder:
        return _double_inputs_hash(assemble_image_context(Path(folder) / "context"), base_image_id)


def _double_inputs_hash(context: Path, base_image_id: str) -> str:
    """Every file of the build context (name, executable bit, bytes; a link's target), the build arguments and the
    base image's id."""
    digest = hashlib.sha256()
    for path in sorted(context.rglob("*")):
        name = path.relative_to(context).as_posix()
        if path.is_symlink():
            digest.update(b"L\0" + name.encode() + b"\0" + os.readlink(path).encode() + b"\0")
        elif path.is_file():
            executable = b"x" if os.access(path, os.X_OK) else b"-"
            digest.update(b"F\0" + name.encode() + b"\0" + executable + path.read_bytes() + b"\0")
        elif path.is_dir():
            digest.update(b"D\0" + name.encode() + b"\0")
    digest.update(json.dumps(DOUBLE_BUILD_ARGS, sort_keys=True).encode() + b"\0")
    digest.update(b"FROM\0" + base_image_id.encode())
    return digest.hexdigest()


def cliargs_inputs_hash(double_image_id: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"entrypoint": CLIARGS_ENTRYPOINT, "drop_label": ARGUMENTS_LABEL}).encode() + b"\0")
    digest.update(b"FROM\0" + double_image_id.encode())
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


def _ensure_double_image(client: docker.DockerClient, base):
    with tempfile.TemporaryDirectory(prefix="comfyhub-test-image-") as folder:
        context = assemble_image_context(Path(folder) / "context")
        wanted = _double_inputs_hash(context, base.id)
        current = _tagged(client, DOUBLE_TAG)
        if current is not None and (current.labels or {}).get(INPUTS_HASH_LABEL) == wanted:
            return current
        started = time.monotonic()
        build_image(client, context, DOUBLE_TAG, buildargs=DOUBLE_BUILD_ARGS,
                    labels={TEST_LABEL: "1", INPUTS_HASH_LABEL: wanted})
    _drop_replaced(client, current)
    print(f"[comfyhub tests] built {DOUBLE_TAG} from {IMAGE_DIR.relative_to(REPO)}/Dockerfile in "
          f"{time.monotonic() - started:.0f} s", flush=True)
    return client.images.get(DOUBLE_TAG)


def build_image(client: docker.DockerClient, context: Path, tag: str, *, buildargs: dict, labels: dict) -> str:
    """Build context's Dockerfile with the classic builder (what engine 20.10 gives the API); return the image id.
    ImageBuildError carries the end of the build's output."""
    api = client.api
    usual_timeout, api.timeout = api.timeout, BUILD_TIMEOUT_S
    try:
        image, _ = client.images.build(path=str(context), tag=tag, rm=True, forcerm=True, pull=False,
                                       buildargs=buildargs, labels=labels)
    except docker.errors.BuildError as error:
        log = io.StringIO()
        for entry in error.build_log:
            log.write(entry.get("stream") or entry.get("error") or "")
        raise ImageBuildError(f"Building {tag} failed: {error.msg}\n{log.getvalue()[-3000:]}") from error
    finally:
        api.timeout = usual_timeout
    return image.id


def _ensure_cliargs_image(client: docker.DockerClient, double) -> None:
    """The double with ENTRYPOINT sh -c 'exec python3 /opt/comfyui/main.py $CLI_ARGS', no CMD, and without the
    label comfyhub.image.arguments. A Dockerfile cannot take away a label its FROM image has, so the image is the
    double's layers under an edited configuration (docker save, edit, docker load)."""
    wanted = cliargs_inputs_hash(double.id)
    current = _tagged(client, CLIARGS_TAG)
    if current is not None and (current.labels or {}).get(INPUTS_HASH_LABEL) == wanted:
        return

    def edit(config: dict) -> None:
        runtime = config["config"]
        runtime["Entrypoint"] = CLIARGS_ENTRYPOINT
        runtime["Cmd"] = None
        labels = {name: value for name, value in (runtime.get("Labels") or {}).items() if name != ARGUMENTS_LABEL}
        runtime["Labels"] = {**labels, TEST_LABEL: "1", INPUTS_HASH_LABEL: wanted}
        config.setdefault("history", []).append({
            "created": config.get("created"), "empty_layer": True,
            "created_by": "comfyhub tests: ENTRYPOINT reads ComfyUI's arguments from $CLI_ARGS; "
                          f"no {ARGUMENTS_LABEL} label",
        })

    started = time.monotonic()
    _load_with_edited_config(client, double.id, CLIARGS_TAG, edit)
    _drop_replaced(client, current)
    print(f"[comfyhub tests] made {CLIARGS_TAG} in {time.monotonic() - started:.0f} s", flush=True)


def _load_with_edited_config(client: docker.DockerClient, source_id: str, tag: str, edit) -> None:
    """Save source_id, edit its image configuration (a dict, in place) and load the result as tag. The layers stay
    the source's, so the engine stores nothing twice."""
    api = client.api
    usual_timeout, api.timeout = api.timeout, IMPORT_TIMEOUT_S
    with tempfile.TemporaryDirectory(prefix="comfyhub-test-image-") as folder:
        saved, edited = Path(folder) / "saved.tar", Path(folder) / "edited.tar"
        try:
            with saved.open("wb") as out:
                for chunk in api.get_image(source_id):
                    out.write(chunk)
            with tarfile.open(saved) as source, tarfile.open(edited, "w") as target:
                [entry] = json.load(source.extractfile("manifest.json"))
                config = json.load(source.extractfile(entry["Config"]))
                edit(config)
                config_bytes = json.dumps(config).encode()
                skipped = {"manifest.json", "repositories", entry["Config"]}
                entry["Config"] = hashlib.sha256(config_bytes).hexdigest() + ".json"
                entry["RepoTags"] = [tag]
                for member in source.getmembers():
                    if member.name not in skipped:
                        target.addfile(member, source.extractfile(member) if member.isfile() else None)
                for name, data in ((entry["Config"], config_bytes), ("manifest.json", json.dumps([entry]).encode())):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode = len(data), 0o644
                    target.addfile(info, io.BytesIO(data))
            with edited.open("rb") as data:
                api.load_image(data)
        except (docker.errors.APIError, OSError, KeyError, ValueError) as error:
            raise ImageBuildError(f"Making {tag} from {source_id} failed: {error}") from error
        finally:
            api.timeout = usual_timeout


def _tagged(client: docker.DockerClient, tag: str):
    try:
        return client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None


def _drop_replaced(client: docker.DockerClient, previous) -> None:
    """The previous build is now untagged; drop it so stale images do not pile up (kept while a container or a
    newer image still uses it)."""
    if previous is None:
        return
    try:
        if not client.images.get(previous.id).tags:
            client.images.remove(previous.id, noprune=False)
    except docker.errors.APIError:
        pass


def _remove_files_in(path: Path) -> None:
    """Drop downloaded packages and indexes (about 40 MB); apt's own sub-folders stay."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_file() and not child.is_symlink():
            child.unlink(missing_ok=True)
