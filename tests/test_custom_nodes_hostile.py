"""A custom node repository that the code inside an instance has turned into a trap: its `.git/config` sets
core.fsmonitor, core.pager and a filter driver (applied through attributes), and it carries hooks, each writing a
marker file on the host. Listing it (page, command), snapshotting it (directly, as a job, as the scheduled job) and
updating it never run any of them on the host: git runs only in a throw-away container, listings read files.

Also: local sources (file://, paths) are refused unless CUSTOM_NODE_LOCAL_SOURCES allows them, and an image without
git is named in a clear error."""
import json
import os
import shutil
import subprocess
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.urls import reverse

from comfyhub.models import Operation
from instances import customnodes, gitrepo, services
from instances.models import CustomNode
from storage_app import jobs as storage_jobs, layout, services as storage_services, snapshots
from tests.support.docker_fixtures import session_label
from tests.support.gitrepos import make_node_repo

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker]

NODE = "ComfyUI-Test-Nodes"


@pytest.fixture
def instance(storage):
    created = services.instance_create(instance_id="hostile")
    layout.build_instance_tree("hostile")
    return created


@pytest.fixture
def markers(tmp_path):
    """A host folder outside every instance, where each trap would leave its marker."""
    folder = tmp_path / "host-markers"
    folder.mkdir()
    return folder


@pytest.fixture
def node(instance, tmp_path, node_git):
    url, commits = make_node_repo(tmp_path / "repos")
    installed = customnodes.install(instance, url, "v1")
    return installed, commits


def plant_traps(docker_engine, base_image, instance_folder, markers, settings):
    """From inside a real container that sees only the instance's folder (as the instance's own code would), turn
    the node's repository into a trap whose every command writes a marker at a HOST path."""
    m = str(markers)
    config = f"""
[core]
\tfsmonitor = "touch {m}/fsmonitor; false"
\tpager = "touch {m}/pager; cat"
[filter "evil"]
\tclean = "touch {m}/clean; cat"
\tsmudge = "touch {m}/smudge; (id -u; ls /sys/class/net) > /instance/sandbox-evidence; cat"
"""
    hook = "#!/bin/sh\ntouch {m}/hook-{name}\n"
    script = (
        f"cd /instance/custom_nodes/{NODE} && printf '%s' \"$CONFIG\" >> .git/config"
        " && echo '* filter=evil' > .gitattributes && mkdir -p .git/info && echo '* filter=evil' > .git/info/attributes"
        " && mkdir -p .git/hooks"
        + "".join(f" && printf '%s' \"{hook.format(m=m, name=name)}\" > .git/hooks/{name} && chmod +x .git/hooks/{name}"
                  for name in ("post-checkout", "reference-transaction", "post-merge"))
    )
    docker_engine.containers.run(
        base_image, ["sh", "-c", script], environment={"CONFIG": config}, user=f"{settings.PUID}:{settings.PGID}",
        volumes={str(instance_folder): {"bind": "/instance", "mode": "rw"}}, labels=session_label(), remove=True,
        network_mode="none")


@pytest.fixture
def trapped(node, instance, markers, docker_engine, node_git, settings, storage):
    plant_traps(docker_engine, node_git, storage["instances"] / "hostile", markers, settings)
    return node


def markers_left(markers):
    return sorted(p.name for p in markers.iterdir())


# --- The traps are real --------------------------------------------------------------------------------------

def test_the_planted_traps_fire_when_git_runs_on_the_host(trapped, storage, tmp_path, markers):
    """The control: the same repository, copied, with git run on the host as ComfyHub used to run it."""
    copy = tmp_path / "copy"
    shutil.copytree(storage["instances"] / "hostile" / "custom_nodes" / NODE, copy, symlinks=True)
    (copy / "__init__.py").unlink()

    def host_git(*args):
        subprocess.run(["git", "-c", "safe.directory=*", *args], cwd=copy, capture_output=True, timeout=60,
                       env={**os.environ, "GIT_PAGER": ""})

    host_git("status", "--porcelain")
    host_git("checkout", "--", "__init__.py")
    host_git("-c", "advice.detachedHead=false", "checkout", "--detach", "HEAD")
    assert {"fsmonitor", "smudge", "hook-post-checkout"} <= set(markers_left(markers))


# --- Nothing fires on the host -------------------------------------------------------------------------------

def test_the_nodes_page_lists_the_trapped_node_without_running_it(client, stranger, operator, instance, trapped,
                                                                   markers):
    _, commits = trapped
    for user in (stranger, operator):
        client.force_login(user)
        response = client.get(reverse("instance-nodes", args=["hostile"]))
        assert response.status_code == 200
        row = response.content.decode().split(f'data-node="{NODE}"')[1].split("</tr>")[0]
        assert commits["v1"][:12] in row
    assert markers_left(markers) == []


def test_nodes_list_reads_the_trapped_node_without_running_it(instance, trapped, markers):
    _, commits = trapped
    out = StringIO()
    call_command("nodes", "list", "hostile", "--json", stdout=out)
    listed = json.loads(out.getvalue())
    assert [(n["name"], n["commit"], n["dirty"]) for n in listed] == [(NODE, commits["v1"], None)]
    call_command("nodes", "list", "hostile", stdout=StringIO())
    assert markers_left(markers) == []


def test_snapshots_of_the_trapped_node_run_nothing_directly_as_a_job_or_on_schedule(instance, trapped, markers,
                                                                                     run_worker, operator):
    installed, commits = trapped
    full = snapshots.create(instance, kind="full")
    entry = full.manifest["custom_nodes"][0]
    assert (entry["folder"], entry["commit"], entry["git_url"]) == (NODE, commits["v1"], installed.url)
    storage_services.snapshot_create(instance=instance, kind="full", user=operator)
    instance.snapshot_every_hours = 1
    instance.save(update_fields=["snapshot_every_hours"])
    assert storage_jobs.scheduled_snapshots() == ["hostile"]
    run_worker()
    assert list(Operation.objects.values_list("status", flat=True)) == [Operation.Status.SUCCEEDED] * 2
    assert markers_left(markers) == []


def test_updating_the_trapped_node_runs_its_traps_only_in_the_sandbox(instance, trapped, markers, run_worker,
                                                                      storage, settings):
    installed, commits = trapped
    operation = services.node_action(instance=instance, name=NODE, action="update", ref="main")
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert CustomNode.objects.get().commit == commits["main"]
    assert markers_left(markers) == []
    # The filter did run, in the container: as PUID, with no network but the loopback.
    evidence = (storage["instances"] / "hostile" / "sandbox-evidence").read_text().split()
    assert evidence == [str(settings.PUID), "lo"]


# --- Reading a repository as files ---------------------------------------------------------------------------

def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_reader_follows_a_branch_to_a_loose_or_packed_ref_and_reads_the_origin(tmp_path):
    sha_a, sha_b = "a" * 40, "b" * 40
    write(tmp_path / "n" / ".git" / "HEAD", "ref: refs/heads/main\n")
    write(tmp_path / "n" / ".git" / "packed-refs", f"# pack-refs with: peeled\n{sha_a} refs/heads/main\n^{sha_b}\n")
    write(tmp_path / "n" / ".git" / "config",
          '[core]\n\tbare = false\n[remote "origin"]\n\turl = "https://example.org/x.git" ; a comment\n'
          '[include]\n\tpath = /etc/gitconfig\n')
    info = gitrepo.read(tmp_path, "n")
    assert (info.commit, info.origin_url, info.problem) == (sha_a, "https://example.org/x.git", "")
    write(tmp_path / "n" / ".git" / "refs" / "heads" / "main", sha_b + "\n")
    assert gitrepo.read(tmp_path, "n").commit == sha_b


def test_the_reader_follows_a_gitdir_file_only_inside_the_node_folder(tmp_path):
    write(tmp_path / "n" / "real-git" / "HEAD", "c" * 40 + "\n")
    write(tmp_path / "n" / ".git", "gitdir: real-git\n")
    assert gitrepo.read(tmp_path, "n").commit == "c" * 40
    write(tmp_path / "n" / ".git", f"gitdir: {tmp_path}/n/real-git\n")
    assert "outside the node's folder" in gitrepo.read(tmp_path, "n").problem
    write(tmp_path / "n" / ".git", "gitdir: ../../elsewhere\n")
    assert "outside the node's folder" in gitrepo.read(tmp_path, "n").problem


def test_the_reader_never_follows_a_link(tmp_path):
    canary = tmp_path / "canary"
    write(canary / "HEAD", "d" * 40 + "\n")
    write(tmp_path / "n" / ".git" / "config", "")
    os.symlink(canary / "HEAD", tmp_path / "n" / ".git" / "HEAD")
    first = gitrepo.read(tmp_path, "n")
    assert first.commit == "" and "is a link" in first.problem
    (tmp_path / "o").mkdir()
    os.symlink(canary, tmp_path / "o" / ".git")
    second = gitrepo.read(tmp_path, "o")
    assert second.commit == "" and "is a link" in second.problem


def test_the_page_shows_a_node_whose_repository_is_a_link_as_unreadable(client, operator, instance, storage,
                                                                        tmp_path):
    canary = tmp_path / "canary"
    write(canary / "HEAD", "e" * 40 + "\n")
    os.symlink(canary, storage["instances"] / "hostile" / "custom_nodes" / "linked")
    (storage["instances"] / "hostile" / "custom_nodes" / "gitfile").mkdir()
    write(storage["instances"] / "hostile" / "custom_nodes" / "gitfile" / ".git", f"gitdir: {canary}\n")
    client.force_login(operator)
    content = client.get(reverse("instance-nodes", args=["hostile"])).content.decode()
    linked, gitfile = content.split('data-node="linked"')[1], content.split('data-node="gitfile"')[1]
    assert "custom_nodes/linked is a link; ComfyHub does not follow it." in linked.split("</tr>")[0]
    assert "outside the node&#x27;s folder" in gitfile.split("</tr>")[0]
    assert "e" * 12 not in content


# --- Local sources -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["file:///srv/repos/nodes.git", "/srv/repos/nodes", "./nodes", "../nodes",
                                 "~/nodes"])
def test_a_local_source_is_refused_by_default_with_the_setting_named(instance, url, settings):
    settings.CUSTOM_NODE_LOCAL_SOURCES = False
    with pytest.raises(ValidationError) as refused:
        services.node_install(instance=instance, url=url)
    assert "is a local source" in str(refused.value) and "CUSTOM_NODE_LOCAL_SOURCES=true" in str(refused.value)
    assert not Operation.objects.exists()


def test_a_local_source_installs_when_the_setting_allows_it_in_path_form_too(instance, tmp_path, node_git, storage):
    url, commits = make_node_repo(tmp_path / "repos")
    node = customnodes.install(instance, url.removeprefix("file://"), "v1")
    assert node.commit == commits["v1"]
    assert (storage["instances"] / "hostile" / "custom_nodes" / NODE / "__init__.py").is_file()


def test_a_node_from_a_local_source_is_not_updated_once_the_setting_is_off(instance, node, settings):
    installed, commits = node
    settings.CUSTOM_NODE_LOCAL_SOURCES = False
    with pytest.raises(customnodes.CustomNodeError, match="is a local source .* CUSTOM_NODE_LOCAL_SOURCES=true"):
        customnodes.update(installed, "main")
    assert CustomNode.objects.get().commit == commits["v1"]


def test_a_local_source_inside_the_instances_folders_is_refused(instance, node, storage):
    source = storage["instances"] / "hostile" / "custom_nodes" / NODE
    with pytest.raises(customnodes.CustomNodeError, match="inside the instances' folders"):
        customnodes.install(instance, f"file://{source}", name="copy")


# --- The git image -------------------------------------------------------------------------------------------

def test_an_image_without_git_is_named_with_the_fix(instance, tmp_path, node_git, docker_engine, settings, storage):
    carrier = docker_engine.containers.run(node_git, ["rm", "-f", "/usr/bin/git"], detach=True,
                                           labels=session_label())
    carrier.wait()
    tag = f"comfyhub-test-nogit:{session_label()['comfyhub.test']}"
    carrier.commit(repository=tag.split(":")[0], tag=tag.split(":")[1],
                   changes=[f"LABEL comfyhub.test={session_label()['comfyhub.test']}"])
    carrier.remove()
    settings.CUSTOM_NODE_GIT_IMAGE = tag
    url, _ = make_node_repo(tmp_path / "repos")
    with pytest.raises(customnodes.CustomNodeError) as refused:
        customnodes.install(instance, url)
    assert str(refused.value).startswith(f"The image {tag} has no git; set CUSTOM_NODE_GIT_IMAGE to an image with git")
    assert list((storage["instances"] / "hostile" / "custom_nodes").iterdir()) == []
