"""`manage.py images` and instances/images.py: ComfyHub's image built through the real engine from docker/comfyui (the
test flavour: the test base image, the ComfyUI double as the local checkout, a stub torch wheel, offline), pulled,
described, rebuilt; the build context a checkout gives. Images a test builds carry this session's test label
(CONTAINER_EXTRA_LABELS), so the teardown removes them."""
import io
import json
import os
import re
import subprocess
import tarfile
import uuid
from functools import partial

import docker.errors
import pytest

from comfyhub.models import Operation
from instances import docker_engine as engine_adapter
from instances import images, services
from tests.support.cli import run, run_process
from tests.support.images import (BASE_TAG, DOUBLE_CHECKOUT, DOUBLE_DIR, STUB_TORCH_VERSION,
                                  write_stub_torch_wheel)

cli = partial(run, "images")
cli_process = partial(run_process, "images")

DOUBLE_VERSION = "0.0.0-testdouble"
OFFLINE = ("--base-image", BASE_TAG, "--torch-index-url", "none", "--build-arg", "PIP_INDEX_URL=none",
           "--build-arg", "EXTRA_PACKAGES=")
OFFLINE_ARGS = {"PIP_INDEX_URL": "none", "EXTRA_PACKAGES": "", "TORCH_PACKAGES": f"torch=={STUB_TORCH_VERSION}"}


@pytest.fixture
def tag(docker_cleanup):
    """A tag of this test's own (allowed by the tests' INSTANCE_IMAGES_ALLOWED: comfyhub-test-*:*)."""
    return f"comfyhub-test-images:{uuid.uuid4().hex[:10]}"


@pytest.fixture
def checkout(tmp_path):
    """The ComfyUI double laid out as a ComfyUI checkout (main.py, comfyui_version.py, requirements.txt), with a file
    of its own so the engine's build cache (the test image has the same files) never skips build.sh."""
    folder = tmp_path / "ComfyUI"
    folder.mkdir()
    for name, source in DOUBLE_CHECKOUT.items():
        (folder / name).write_bytes((DOUBLE_DIR / source).read_bytes())
    (folder / "this_test.txt").write_text(f"{uuid.uuid4()}\n")
    return folder


@pytest.fixture
def wheels(tmp_path):
    folder = tmp_path / "wheels"
    write_stub_torch_wheel(folder)
    return folder


def offline_build(tag, checkout, wheels, *extra):
    return ("build", "--tag", tag, "--comfyui-source", str(checkout), "--wheels", str(wheels), *OFFLINE,
            "--build-arg", f"TORCH_PACKAGES=torch=={STUB_TORCH_VERSION}", *extra)


# --- images build ------------------------------------------------------------------------------------------------

def test_images_build_makes_the_image_with_progress_log_and_the_versions_as_labels(
        tag, checkout, wheels, worker_process, docker_engine):
    worker_process("long")

    result = cli_process(*offline_build(tag, checkout, wheels), timeout=600)

    assert result.code == 0, result.err + result.out
    assert f"Build image '{tag} on local': operation" in result.out
    assert re.search(r"\[\s*\d+%\] Building " + re.escape(tag) + r": Step \d+/\d+: RUN ", result.out)
    assert "comfyhub-build: ComfyUI from the local checkout in the build context" in result.out
    assert "Installing collected packages: torch" in result.out
    assert f"Built {tag} on local: " in result.out
    assert f"ComfyUI {DOUBLE_VERSION}, torch {STUB_TORCH_VERSION}, Python 3." in result.out

    operation = Operation.objects.get(kind="image_build")
    assert operation.status == Operation.Status.SUCCEEDED and operation.progress == 100
    assert re.search(r"INFO Step \d+/\d+: COPY \. /tmp/comfyhub-build/", operation.log)
    assert f"Successfully installed torch-{STUB_TORCH_VERSION}" in operation.log
    labels = docker_engine.images.get(tag).labels
    assert labels["comfyhub.image"] == "comfyui"
    assert labels["comfyhub.image.comfyui-version"] == DOUBLE_VERSION
    assert labels["comfyhub.image.torch-version"] == STUB_TORCH_VERSION
    assert labels["comfyhub.image.python-version"].startswith("3.")
    assert labels["comfyhub.image.build.comfyui-source"] == str(checkout)
    assert json.loads(labels["comfyhub.image.build.args"]) == {"BASE_IMAGE": BASE_TAG, "TORCH_INDEX_URL": "none",
                                                               **OFFLINE_ARGS}
    assert operation.result["id"] == docker_engine.images.get(tag).id

    # `images list` reads it back (labels only) with the instances that use it; COMFY_IMAGE shows as missing.
    services.instance_create(instance_id="built-user", image=tag)
    listing = cli("list")
    assert listing.code == 0, listing.err
    [row] = [line for line in listing.out.splitlines() if line.startswith(tag)]
    assert row.split()[1:3] == ["local", operation.result["id"].removeprefix("sha256:")[:12]]
    assert f"{DOUBLE_VERSION}  {STUB_TORCH_VERSION}  3." in re.sub(r" {2,}", "  ", row)
    assert row.endswith("built-user")


def test_images_list_json_says_what_each_image_holds_and_which_is_missing(settings, docker_engine,
                                                                          comfyui_double_image, db):
    settings.COMFY_IMAGE = "comfyhub/comfyui:never-built-here"
    services.instance_create(instance_id="double-user", image=comfyui_double_image)
    services.instance_create(instance_id="base-user", image=BASE_TAG)

    result = cli("list", "--json")

    assert result.code == 0, result.err
    rows = {row["image"]: row for row in json.loads(result.out)}
    assert set(rows) == {"comfyhub/comfyui:never-built-here", comfyui_double_image, BASE_TAG}
    missing = rows["comfyhub/comfyui:never-built-here"]
    assert (missing["present"], missing["default"], missing["instances"], missing["id"]) == (False, True, [], None)
    double = rows[comfyui_double_image]  # built by the test harness with `docker build`: read from image.json
    assert (double["comfyui_version"], double["torch_version"], double["versions_from"]) == (
        DOUBLE_VERSION, STUB_TORCH_VERSION, "image.json")
    assert double["size"] == docker_engine.images.get(comfyui_double_image).attrs["Size"]
    assert double["instances"] == ["double-user"] and double["comfyhub_image"] and not double["built_by_comfyhub"]
    base = rows[BASE_TAG]  # not a ComfyHub image: nothing is guessed
    assert (base["comfyui_version"], base["torch_version"], base["versions_from"]) == (None, None, "")

    text = cli("list").out
    assert re.search(rf"^{re.escape(BASE_TAG)}\s+local\s+\w{{12}}\s+.*unknown\s+unknown\s+unknown\s+base-user$",
                     text, re.M)
    assert re.search(r"^comfyhub/comfyui:never-built-here\s+local\s+missing\s+.*COMFY_IMAGE$", text, re.M)
    assert "Missing images: build ComfyHub's with `manage.py images build" in text


def test_a_failing_build_fails_the_operation_with_the_builds_own_message_and_leaves_no_tag(
        tag, docker_engine, run_worker, transactional_db):
    # No checkout: the build downloads ComfyUI, from a port where nothing listens.
    result = cli("build", "--tag", tag, *OFFLINE, "--build-arg", "TORCH_PACKAGES=",
                 "--build-arg", "COMFYUI_URL=http://127.0.0.1:9", "--no-wait")
    assert result.code == 0, result.err
    run_worker()

    operation = Operation.objects.get(pk=uuid.UUID(result.out.strip()))
    assert operation.status == Operation.Status.FAILED
    assert operation.error.startswith(f"Building {tag} failed: The command '/bin/sh -c sh /tmp/comfyhub-build/build.sh'"
                                      " returned a non-zero code: 1")
    assert ("comfyhub-build: cannot download ComfyUI v0.8.0 from http://127.0.0.1:9/archive/v0.8.0.tar.gz"
            in operation.error)
    assert operation.error.endswith(f"The tag {tag} was not changed on local.")
    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.images.get(tag)


def test_pulling_an_image_this_offline_engine_cannot_reach_fails_with_a_clear_message(run_worker, transactional_db):
    result = cli("pull", "registry.invalid/comfyhub-test:1", "--no-wait")
    assert result.code == 0, result.err
    run_worker()

    operation = Operation.objects.get(kind="image_pull")
    assert operation.status == Operation.Status.FAILED
    assert operation.error.startswith("Could not pull image registry.invalid/comfyhub-test:1: ")
    assert "If this host is offline, load the image another way (docker load, or build it here)" in operation.error


def test_a_pull_waits_for_the_worker_and_exits_1_with_the_reason(worker_process):
    worker_process("long")

    result = cli_process("pull", "registry.invalid/comfyhub-test:2")

    assert result.code == 1
    assert "Pull image 'registry.invalid/comfyhub-test:2 on local' failed (operation" in result.err
    assert "Could not pull image registry.invalid/comfyhub-test:2" in result.err


@pytest.mark.parametrize("args, message", [
    (("build", "--node", "elsewhere"), "No node 'elsewhere'. Known: local"),
    (("list", "--node", "elsewhere"), "No node 'elsewhere'. Known: local"),
    (("build", "--comfyui-source", "/nonexistent/ComfyUI"),
     "comfyui_source: /nonexistent/ComfyUI does not exist; give the path of a folder on this host."),
    (("build", "--wheels", "/nonexistent/wheels"), "wheels: /nonexistent/wheels does not exist"),
    (("build", "--ca-bundle", "/nonexistent/ca.pem"), "ca_bundle: /nonexistent/ca.pem does not exist"),
    (("build", "--tag", "Comfy UI:1"), "tag: Give an image name such as 'repository/comfyui:tag' (no spaces)"),
    (("build", "--tag", "registry.example.org/other:1"), "tag: Image 'registry.example.org/other:1' is not allowed"),
    (("build", "--comfyui-ref=--upload-pack=x"), "comfyui_ref: '--upload-pack=x' is not a ComfyUI release tag"),
    (("build", "--torch-index-url", "ftp://x"), "torch_index_url: 'ftp://x' is not an index URL"),
    (("build", "--base-image", "Bad Image"), "base_image: Give an image name such as"),
    (("build", "--build-arg", "PIP_EXTRA=1"), "build_args: 'PIP_EXTRA' is not a build argument"),
    (("build", "--build-arg", "NOVALUE"), "build_args: 'NOVALUE' is not NAME=VALUE"),
    (("pull", "Bad Image"), "image: Give an image name such as"),
    (("pull", "registry.example.org/other:1"), "image: Image 'registry.example.org/other:1' is not allowed"),
])
@pytest.mark.django_db
def test_bad_input_is_exit_2_with_what_is_wrong_and_queues_nothing(args, message):
    result = cli(*args)

    assert result.code == 2
    assert message in result.err
    assert not Operation.objects.exists()


@pytest.mark.django_db
def test_a_checkout_that_is_not_comfyui_is_refused(tmp_path):
    result = cli("build", "--comfyui-source", str(tmp_path))

    assert result.code == 2
    assert f"comfyui_source: {tmp_path} has no main.py: it is not a ComfyUI checkout." in result.err


@pytest.mark.parametrize("target", ["/etc", "../outside", "inner/../../outside"])
@pytest.mark.django_db
def test_a_checkout_with_a_link_leading_outside_it_is_refused(checkout, target, canary):
    (checkout / "inner").mkdir()
    (checkout / "leak").symlink_to(target)

    result = cli("build", "--comfyui-source", str(checkout))

    assert result.code == 2
    assert f"comfyui_source: the link leak in {checkout} leads outside it" in result.err
    assert not Operation.objects.exists()
    # Planted after the check, it is refused again when the build packs the files.
    with pytest.raises(images.ImageError, match="the link leak -> .* leads outside it"):
        images.write_build_context(io.BytesIO(), comfyui_source=checkout)


# --- The build context --------------------------------------------------------------------------------------------

def context_names(**options) -> dict:
    output = io.BytesIO()
    images.write_build_context(output, **options)
    output.seek(0)
    with tarfile.open(fileobj=output) as archive:
        return {member.name: member for member in archive.getmembers()}


def git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True,
                   env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"})


def test_the_context_holds_docker_comfyui_and_the_files_the_options_name(checkout, wheels, tmp_path):
    ca = tmp_path / "proxy-ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")

    names = context_names(comfyui_source=checkout, ca_bundle=ca, wheels=wheels)

    assert {"Dockerfile", "build.sh", "entrypoint.sh", "comfyui/main.py", "comfyui/comfyui_version.py",
            f"wheels/torch-{STUB_TORCH_VERSION}-py3-none-any.whl", "extra-ca.pem"} <= set(names)
    assert names["build.sh"].mode & 0o111
    assert not [name for name in names if "__pycache__" in name or name.endswith(".pyc")]


@pytest.mark.parametrize("index_version", ["2", "3", "4"])
def test_a_git_checkout_gives_only_its_tracked_files_read_from_the_index(checkout, tmp_path, index_version):
    (checkout / "nodes").mkdir()
    (checkout / "nodes" / "a_rather_long_name_for_prefix_compression.py").write_text("a = 1\n")
    (checkout / "nodes" / "a_rather_long_name_for_prefix_compression_too.py").write_text("b = 2\n")
    (checkout / "link_inside").symlink_to("nodes")
    git(checkout, "init", "-q")
    git(checkout, "add", ".")
    git(checkout, "commit", "-q", "-m", "checkout")
    git(checkout, "update-index", "--index-version", index_version)
    # What git ignores or never saw stays out, links leading outside among it too (a virtual environment's python).
    (checkout / "models").mkdir()
    (checkout / "models" / "big.safetensors").write_bytes(b"x" * 1024)
    (checkout / "venv").mkdir()
    (checkout / "venv" / "python").symlink_to("/usr/bin/python3")
    (checkout / "untracked.py").write_text("")

    names = context_names(comfyui_source=checkout)

    theirs = {name.removeprefix("comfyui/") for name in names if name.startswith("comfyui/")}
    assert theirs == {"main.py", "comfyui_version.py", "requirements.txt", "this_test.txt", "link_inside",
                      "nodes/a_rather_long_name_for_prefix_compression.py",
                      "nodes/a_rather_long_name_for_prefix_compression_too.py"}
    assert names["comfyui/link_inside"].issym() and names["comfyui/link_inside"].linkname == "nodes"
    assert images.checkout_problem(checkout) is None


@pytest.mark.parametrize("image, build", [
    ("comfyhub/comfyui:latest", True), ("comfyhub/comfyui:v0.8.0-cu128", True), ("comfyhub/comfyui", True),
    ("registry.example.org:5000/team/comfy:v2", True),  # COMFY_IMAGE's repository, another tag
    ("comfyhub/comfyui@sha256:" + "0" * 64, False),  # a digest cannot be built
    ("example/comfyui:1", False), ("comfyhub/comfyui-other:1", False),
])
def test_build_is_offered_for_tags_of_comfyhubs_image_and_of_comfy_image(settings, image, build):
    settings.COMFY_IMAGE = "registry.example.org:5000/team/comfy:v1"
    assert images.buildable(image) is build


# --- describe, refresh -------------------------------------------------------------------------------------------

@pytest.fixture
def engine(docker_engine, db):
    """ComfyHub's own client of the local node's engine."""
    client = images.engine_for(services.local_node())
    yield client
    client.close()


@pytest.mark.django_db
def test_describe_reads_a_foreign_image_as_unknown_and_a_missing_one_as_none(engine, comfyui_double_image):
    base = images.describe(engine, BASE_TAG)
    assert base.id.startswith("sha256:") and base.size > 0
    assert (base.comfyui_version, base.torch_version, base.versions_known, base.comfyhub_image) == (
        None, None, False, False)
    assert images.describe(engine, "comfyhub-test-images:not-here") is None


@pytest.mark.django_db
def test_refresh_builds_again_with_the_recorded_arguments_and_the_tag_moves(engine, tag, checkout, wheels):
    first = images.build_image(engine, tag=tag, comfyui_source=checkout, wheels=wheels, base_image=BASE_TAG,
                               torch_index_url="none", build_args=OFFLINE_ARGS)
    (checkout / "main.py").write_text((checkout / "main.py").read_text() + "\n# changed in the checkout\n")

    old, new = images.refresh_image(engine, tag)

    assert old == first and new != first
    info = images.describe(engine, tag)
    assert info.id == new and info.built_by_comfyhub
    assert info.build_arguments == {"BASE_IMAGE": BASE_TAG, "TORCH_INDEX_URL": "none", **OFFLINE_ARGS}
    assert (info.comfyui_version, info.torch_version) == (DOUBLE_VERSION, STUB_TORCH_VERSION)


@pytest.mark.django_db
def test_refresh_pulls_an_image_comfyhub_did_not_build(engine):
    with pytest.raises(engine_adapter.EngineError, match="Could not pull image registry.invalid/comfyhub-test:3"):
        images.refresh_image(engine, "registry.invalid/comfyhub-test:3")
