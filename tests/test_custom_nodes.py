"""Custom nodes per instance from real git repositories (file:// URLs), git running in a real container."""
import os

import pytest
from django.core.exceptions import ValidationError

from comfyhub.models import Operation
from instances import customnodes, services
from instances.models import CustomNode
from storage_app import layout
from tests.support.gitrepos import add_commit, make_node_repo

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker, pytest.mark.usefixtures("node_git")]


@pytest.fixture
def instance(storage):
    created = services.instance_create(instance_id="noded")
    layout.build_instance_tree("noded")
    return created


@pytest.fixture
def repo(tmp_path):
    return make_node_repo(tmp_path / "repos")


def run(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    return operation


def test_it_installs_a_node_at_a_tag_and_records_url_and_commit(instance, repo, run_worker, storage):
    url, commits = repo
    operation = run(services.node_install(instance=instance, url=url, ref="v1"), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    node = CustomNode.objects.get(instance=instance)
    assert (node.name, node.url, node.ref, node.commit) == ("ComfyUI-Test-Nodes", url, "v1", commits["v1"])
    folder = storage["instances"] / "noded" / "custom_nodes" / "ComfyUI-Test-Nodes"
    assert (folder / "__init__.py").exists() and not (folder / "CHANGELOG").exists()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".comfyhub-clone")]


@pytest.mark.parametrize("ref, commit_key", [("main", "main"), ("", "main")])
def test_it_installs_at_a_branch_or_the_default_branch(instance, repo, ref, commit_key):
    url, commits = repo
    assert customnodes.install(instance, url, ref).commit == commits[commit_key]


def test_it_installs_at_a_commit(instance, repo):
    url, commits = repo
    assert customnodes.install(instance, url, commits["v1"][:10]).commit == commits["v1"]


def test_a_url_that_fails_leaves_nothing_behind(instance, run_worker, tmp_path, storage):
    operation = run(services.node_install(instance=instance, url=f"file://{tmp_path}/no-such-repo"), run_worker)
    assert operation.status == Operation.Status.FAILED
    assert "git clone failed" in operation.error and "Nothing was installed." in operation.error
    assert list((storage["instances"] / "noded" / "custom_nodes").iterdir()) == []
    assert not CustomNode.objects.exists()


def test_a_ref_that_does_not_exist_leaves_nothing_behind(instance, repo, storage):
    url, _ = repo
    with pytest.raises(customnodes.CustomNodeError, match="'nope' is not a branch, tag or commit"):
        customnodes.install(instance, url, "nope")
    assert list((storage["instances"] / "noded" / "custom_nodes").iterdir()) == []


@pytest.mark.parametrize("url", ["not a url", "--upload-pack=evil", "ext::sh -c evil", "ftp://x/y", ""])
def test_it_refuses_what_is_not_a_git_url(instance, url):
    with pytest.raises(ValidationError):
        services.node_install(instance=instance, url=url)


def test_installing_twice_is_refused(instance, repo):
    url, _ = repo
    customnodes.install(instance, url)
    with pytest.raises(customnodes.CustomNodeError, match="already exists"):
        customnodes.install(instance, url)


def test_update_moves_to_another_ref_and_refuses_a_dirty_tree(instance, repo):
    url, commits = repo
    node = customnodes.install(instance, url, "v1")
    assert customnodes.update(node, "main").commit == commits["main"]
    (customnodes.folder_of(instance, node.name) / "__init__.py").write_text("# edited\n")
    listed = customnodes.list_nodes(instance)
    assert listed[0]["dirty"] is None and listed[0]["commit"] == commits["main"]
    with pytest.raises(customnodes.CustomNodeError, match="local changes"):
        customnodes.update(node, "v1")
    assert customnodes.list_nodes(instance)[0]["commit"] == commits["main"]


def test_files_python_writes_or_git_ignores_are_not_local_changes(instance, tmp_path):
    url, commits = make_node_repo(tmp_path / "repos", files={
        "__init__.py": "NODE_CLASS_MAPPINGS = {}\n", ".gitignore": "settings.local.json\n",
        "__pycache__/nodes.cpython-312.pyc": "committed by mistake\n", "legacy.pyc": "committed too\n"})
    node = customnodes.install(instance, url, "v1")
    newer = add_commit(tmp_path / "repos" / "ComfyUI-Test-Nodes", "__pycache__/nodes.cpython-312.pyc", "newer\n")
    folder = customnodes.folder_of(instance, node.name)
    (folder / "__pycache__" / "__init__.cpython-312.pyc").write_bytes(b"\x00written by the first run")
    (folder / "__pycache__" / "nodes.cpython-312.pyc").write_bytes(b"\x00rewritten by the first run")
    (folder / "legacy.pyc").unlink()
    (folder / "settings.local.json").write_text("{}\n")
    assert customnodes.update(node, "main").commit == newer != commits["main"]
    assert (folder / "__pycache__" / "nodes.cpython-312.pyc").read_text() == "newer\n"
    assert (folder / "settings.local.json").read_text() == "{}\n"
    assert (folder / "__pycache__" / "__init__.cpython-312.pyc").exists()


def test_an_edited_tracked_file_still_refuses_an_update_beside_generated_ones(instance, repo):
    url, commits = repo
    node = customnodes.install(instance, url, "v1")
    folder = customnodes.folder_of(instance, node.name)
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "__init__.cpython-312.pyc").write_bytes(b"\x00")
    (folder / "__init__.py").write_text("# edited by hand\n")
    with pytest.raises(customnodes.CustomNodeError, match="local changes"):
        customnodes.update(node, "main")
    assert (folder / "__init__.py").read_text() == "# edited by hand\n"
    assert CustomNode.objects.get(pk=node.pk).commit == commits["v1"]


def test_update_fetches_what_the_repository_gained_since_the_install(instance, tmp_path):
    url, commits = make_node_repo(tmp_path / "repos")
    node = customnodes.install(instance, url, "main")
    third = add_commit(tmp_path / "repos" / "ComfyUI-Test-Nodes", "THIRD", "third\n")
    assert customnodes.update(node).commit == third != commits["main"]
    assert (customnodes.folder_of(instance, node.name) / "THIRD").read_text() == "third\n"


def test_the_clone_belongs_to_the_instances_user_and_records_its_origin(instance, repo, storage, settings):
    url, _ = repo
    customnodes.install(instance, url)
    folder = storage["instances"] / "noded" / "custom_nodes" / "ComfyUI-Test-Nodes"
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in [folder, *folder.rglob("*")]}
    assert owners == {(settings.PUID, settings.PGID)}
    assert f"url = {url}" in (folder / ".git" / "config").read_text()


def test_disable_and_enable_use_comfyuis_convention(instance, repo, run_worker, storage):
    url, _ = repo
    customnodes.install(instance, url)
    root = storage["instances"] / "noded" / "custom_nodes"
    run(services.node_action(instance=instance, name="ComfyUI-Test-Nodes", action="disable"), run_worker)
    assert (root / "ComfyUI-Test-Nodes.disabled").is_dir() and not (root / "ComfyUI-Test-Nodes").exists()
    assert customnodes.list_nodes(instance)[0]["enabled"] is False
    run(services.node_action(instance=instance, name="ComfyUI-Test-Nodes", action="enable"), run_worker)
    assert (root / "ComfyUI-Test-Nodes").is_dir()


def test_remove_deletes_the_folder_and_the_record(instance, repo, run_worker, storage):
    url, _ = repo
    customnodes.install(instance, url)
    operation = run(services.node_action(instance=instance, name="ComfyUI-Test-Nodes", action="remove"), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED
    assert not (storage["instances"] / "noded" / "custom_nodes" / "ComfyUI-Test-Nodes").exists()
    assert not CustomNode.objects.exists()


def test_nodes_installed_by_hand_are_listed_too(instance, storage):
    (storage["instances"] / "noded" / "custom_nodes" / "hand-made").mkdir()
    assert [(n["name"], n["managed"]) for n in customnodes.list_nodes(instance)] == [("hand-made", False)]


@pytest.mark.docker
def test_requirements_that_cannot_be_installed_roll_the_node_back(instance, tmp_path, storage, comfyui_double_image,
                                                                  docker_cleanup, settings):
    settings.INSTANCE_IMAGES_ALLOWED = [comfyui_double_image]
    services.instance_update(instance=instance, display_name="", description="", image=comfyui_double_image,
                             extra_args=[], extra_env={}, host_port=None, gpu_indexes=[])
    instance.refresh_from_db()
    url, _ = make_node_repo(tmp_path / "repos", "needs-deps",
                            files={"__init__.py": "", "requirements.txt": "definitely-not-on-this-host==1.0\n"})
    with pytest.raises(customnodes.CustomNodeError, match="Installing the requirements of needs-deps failed"):
        customnodes.install(instance, url)
    assert not os.path.exists(storage["instances"] / "noded" / "custom_nodes" / "needs-deps")
    assert not CustomNode.objects.exists()
