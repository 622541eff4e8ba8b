"""Custom nodes' requirements, installed by real pip in the real test image (docker/comfyui/Dockerfile: PyYAML from
Debian installed, a stub torch 2.13.0 pinned in /etc/comfyhub/constraints.txt): what the image has is never installed
twice, its torch is never replaced, and what pip adds lives in the instance's own python-packages/."""
import base64
import hashlib
import zipfile

import pytest

from comfyhub.models import Operation
from instances import customnodes, docker_engine, services
from instances.models import CustomNode
from storage_app import layout
from tests.support.gitrepos import add_commit, make_node_repo
from tests.support.images import BASE_TAG



def in_the_image(test):
    """A test that installs nodes for real: git and pip in containers, operations in the database."""
    for mark in (pytest.mark.django_db(transaction=True), pytest.mark.docker, pytest.mark.usefixtures("node_git")):
        test = mark(test)
    return test

NODE = "ComfyUI-Foo"


def make_wheel(folder, name, version, requires=()):
    """A pure-Python wheel of one module (`name` with '_' for '-') whose VERSION is `version`; pip installs it
    from a --find-links folder with no network."""
    module, dist = name.replace("-", "_"), f"{name.replace('-', '_')}-{version}"
    files = {
        f"{module}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                      + "".join(f"Requires-Dist: {requirement}\n" for requirement in requires),
        f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: comfyhub-tests\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
    }
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()}"
              f",{len(text.encode())}" for path, text in files.items()]
    files[f"{dist}.dist-info/RECORD"] = "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)


@pytest.fixture
def offline_wheels(tmp_path, settings):
    """pip finds nothing but two wheels made here: a new package, and one that needs torch<2."""
    wheels = tmp_path / "wheels"
    make_wheel(wheels, "comfyhub-test-extra", "1.0")
    make_wheel(wheels, "needs-old-torch", "1.0", requires=["torch<2"])
    settings.NODE_PIP_INDEX_URL = "none"
    settings.NODE_PIP_FIND_LINKS = wheels
    return wheels


def instance_on(image, settings, instance_id="pips"):
    settings.INSTANCE_IMAGES_ALLOWED = [image]
    instance = services.instance_create(instance_id=instance_id, image=image)
    layout.build_instance_tree(instance_id)
    return instance


@pytest.fixture
def instance(comfyui_double_image, settings, offline_wheels, docker_cleanup):
    return instance_on(comfyui_double_image, settings)


def node_asking_for(tmp_path, requirements, name=NODE):
    url, _ = make_node_repo(tmp_path / "repos", name, files={"__init__.py": "NODE_CLASS_MAPPINGS = {}\n",
                                                             "requirements.txt": requirements})
    return url


def files_in(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir())


def packages(storage, instance_id="pips"):
    return storage["instances"] / instance_id / "python-packages"


def run(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    return operation


class Log:
    def __init__(self):
        self.lines = []

    def log(self, message, level="INFO"):
        self.lines.append(message)

    def progress(self, percent, message=None):
        pass

    def check_cancelled(self):
        pass


@in_the_image
def test_a_package_the_image_already_has_is_not_installed_again(instance, tmp_path, storage):
    log = Log()
    node = customnodes.install(instance, node_asking_for(tmp_path, "pyyaml\nPyYAML>=5\n"), report=log)
    assert node.requirements == "pyyaml\nPyYAML>=5\n"
    assert files_in(packages(storage)) == []
    assert ("pip installed nothing: every requirement is already there (in the image, or in this instance's "
            "python-packages/)") in log.lines


@in_the_image
def test_a_new_package_goes_into_the_instances_folder_and_survives_a_recreated_container(
        instance, tmp_path, storage, settings, run_worker, docker_engine):
    log = Log()
    customnodes.install(instance, node_asking_for(tmp_path, "comfyhub-test-extra==1.0\npyyaml\n"), report=log)
    installed = [path for path in files_in(packages(storage)) if path.endswith("comfyhub_test_extra/__init__.py")]
    assert len(installed) == 1 and installed[0].startswith("lib/python3"), files_in(packages(storage))
    assert "site-packages/yaml/" not in " ".join(files_in(packages(storage)))  # the image's PyYAML, not a copy
    assert any("Successfully installed comfyhub-test-extra-1.0" in line for line in log.lines), log.lines
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in packages(storage).rglob("*")}
    assert owners == {(settings.PUID, settings.PGID)}

    def imported_in_the_container():
        container = docker_engine.containers.get(instance.container_name)
        result = container.exec_run(["python3", "-c", "import comfyhub_test_extra as m, os; "
                                     "print(m.VERSION, m.__file__.startswith('/instance/python-packages/'), "
                                     "os.getuid())"], user=f"{settings.PUID}:{settings.PGID}")
        assert result.exit_code == 0, result.output.decode()
        return container.id, result.output.decode().split()

    operation = run(services.instance_start(instance=instance), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    first, seen = imported_in_the_container()
    assert seen == ["1.0", "True", str(settings.PUID)]
    run(services.instance_stop(instance=instance), run_worker)
    services.instance_update(instance=instance, display_name="", description="", image=instance.image,
                             extra_args=["--preview-method", "auto"], extra_env={}, host_port=None, gpu_indexes=[])
    operation = run(services.instance_start(instance=instance), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    second, seen = imported_in_the_container()
    assert second != first
    assert seen == ["1.0", "True", str(settings.PUID)]


@pytest.mark.parametrize("asked", ["torch==1.13.1", "torch>=3"])
@in_the_image
def test_a_node_asking_for_another_torch_is_refused_with_the_conflict_named(instance, tmp_path, storage, asked,
                                                                            run_worker):
    url = node_asking_for(tmp_path, f"comfyhub-test-extra==1.0\n{asked}\n")
    operation = run(services.node_install(instance=instance, url=url), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert operation.error == (
        f"{NODE} asks for {asked}, but this image pins torch==2.13.0 (its CUDA build); installing it would replace "
        "the image's torch. Ask the node's author, or use an image with that torch. Nothing was installed.")
    assert files_in(packages(storage)) == []
    assert list((storage["instances"] / "pips" / "custom_nodes").iterdir()) == []
    assert not CustomNode.objects.exists()


@in_the_image
def test_a_package_that_needs_an_older_torch_is_refused_by_pips_resolver(instance, tmp_path, storage):
    with pytest.raises(customnodes.CustomNodeError) as refused:
        customnodes.install(instance, node_asking_for(tmp_path, "comfyhub-test-extra\nneeds-old-torch\n"))
    assert str(refused.value) == (
        f"{NODE}'s requirements cannot be installed beside this image's packages: needs-old-torch 1.0 depends on "
        "torch<2; this image pins torch==2.13.0. Installing them would replace the image's torch. Ask the node's "
        "author, or use an image with that torch.")
    assert files_in(packages(storage)) == []
    assert list((storage["instances"] / "pips" / "custom_nodes").iterdir()) == []


@in_the_image
def test_a_refused_update_leaves_the_node_at_its_recorded_commit(instance, tmp_path, storage):
    url = node_asking_for(tmp_path, "pyyaml\n")
    node = customnodes.install(instance, url, "main")
    recorded = node.commit
    add_commit(tmp_path / "repos" / NODE, "requirements.txt", "torch==1.13.1\n")
    with pytest.raises(customnodes.CustomNodeError, match=r"asks for torch==1\.13\.1, but this image pins"):
        customnodes.update(node)
    folder = storage["instances"] / "pips" / "custom_nodes" / NODE
    assert (folder / "requirements.txt").read_text() == "pyyaml\n"
    assert customnodes.status(node)["commit"] == recorded
    assert CustomNode.objects.get(pk=node.pk).commit == recorded
    assert files_in(packages(storage)) == []


@in_the_image
def test_a_package_missing_offline_says_where_pip_looked(instance, tmp_path, offline_wheels):
    with pytest.raises(customnodes.CustomNodeError) as refused:
        customnodes.install(instance, node_asking_for(tmp_path, "not-in-the-wheels-folder==2.0\n"))
    message = str(refused.value)
    assert message.startswith(f"Installing the requirements of {NODE} failed: pip said: ")
    assert "not-in-the-wheels-folder==2.0" in message
    assert f"pip installs only from NODE_PIP_FIND_LINKS ({offline_wheels}); add the wheel there." in message


@in_the_image
def test_an_image_without_constraints_keeps_installing_with_target(tmp_path, storage, settings, offline_wheels,
                                                                   docker_cleanup):
    other = instance_on(BASE_TAG, settings, "plain")
    customnodes.install(other, node_asking_for(tmp_path, "comfyhub-test-extra==1.0\n"))
    assert "comfyhub_test_extra/__init__.py" in files_in(packages(storage, "plain"))


# --- Reading requirements and pins, host-side ------------------------------------------------------------------

PINS = {"torch": "torch==2.13.0", "nvidia-cublas-cu12": "nvidia-cublas-cu12==12.8.4.1"}


def test_the_pins_are_the_exact_versions_of_the_constraints_file():
    text = "# The image's torch stack\ntorch==2.13.0\nnvidia-cublas-cu12==12.8.4.1  # CUDA\nnumpy<3\n"
    assert customnodes.pinned_versions(text) == PINS


@pytest.mark.parametrize("requirements, conflicts", [
    ("torch\ntorch>=2.0\nTorch==2.13\ntorch[extra]~=2.13\npyyaml\n", []),
    ("torch==1.13.1 --hash=sha256:0123\n", [("torch==1.13.1", "torch==2.13.0")]),
    ("torch \\\n  <2\n", [("torch   <2", "torch==2.13.0")]),
    ("nvidia_cublas_cu12<12  # an old CUDA\n", [("nvidia_cublas_cu12<12", "nvidia-cublas-cu12==12.8.4.1")]),
    ("-r other.txt\n--index-url https://example.org/simple\n# torch==1.0\n", []),
    ('torch==1.0; python_version < "3"\ntorch @ https://example.org/torch-1.0-py3-none-any.whl\n', []),
])
def test_a_requirement_conflicts_when_the_pinned_version_does_not_satisfy_it(requirements, conflicts):
    assert customnodes.pin_conflicts(requirements, PINS) == conflicts
