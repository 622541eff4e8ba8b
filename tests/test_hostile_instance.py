"""Code inside an instance attacks the host. A real container, started by ComfyHub, plants every kind of trap in its
own folder from the inside: links at every level to a canary folder on the host, links named like ComfyHub's
temporary files, and a custom-node repository whose git configuration, attributes and hooks would each write a marker
file on the host. Then every page, command and job that touches the instance runs, as a plain user, as an operator
and as the scheduled jobs. Afterwards no marker exists, the canary is byte-for-byte unchanged (content, owners,
modes), and each refusal was shown to whoever asked."""
import json
import os
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse

from comfyhub.models import Operation
from instances import docker_engine, health, services
from instances.models import Instance
from storage_app import jobs as storage_jobs
from storage_app import layout
from storage_app import services as storage_services
from storage_app.models import Snapshot
from tests.support.canary import snapshot as snapshot_of
from tests.support.gitrepos import make_node_repo

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

NODE = "ComfyUI-Test-Nodes"
WORKFLOW = {"last_node_id": 1, "nodes": [{"id": 1, "type": "KSampler", "widgets_values": []}], "links": []}


@pytest.fixture
def canary(tmp_path):
    """A host folder the instance must never reach: files a careless host process would list, read, write, chown or
    move (a workflow, a model, settings, an empty target for temporary files), with modes no chown would keep."""
    folder = tmp_path / "canary"
    (folder / "sub").mkdir(parents=True)
    (folder / "secret.json").write_text(json.dumps(WORKFLOW))
    (folder / "host.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0{}      " + os.urandom(4096))
    (folder / "comfy.settings.json").write_text('{"host": true}')
    (folder / "host-config.yaml").write_text("host: config\n")
    (folder / "sub" / "deep.txt").write_text("deep\n")
    for path in folder.rglob("*"):
        os.chmod(path, 0o750 if path.is_dir() else 0o600)
    os.chmod(folder, 0o751)
    return folder


@pytest.fixture
def markers(tmp_path):
    """Where each trap would write its marker: a host folder anyone may write, so no trap fails for lack of rights."""
    folder = tmp_path / "markers"
    folder.mkdir()
    os.chmod(folder, 0o777)
    return folder


def run(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    return operation


def plant_traps(instance, canary, markers):
    """From inside the instance's running container, as its code would."""
    script = f"""
set -e
C={canary}; M={markers}
cd /instance
# Links at every level, absolute and relative, to the host's canary.
rm -rf user/default && ln -s $C user/default
rm -rf output && ln -s $C output
ln -s $C custom_nodes/Linked-Node
mkdir -p models/checkpoints models/loras
ln -s $C/host.safetensors models/checkpoints/host.safetensors
rmdir models/loras && ln -s $C models/loras
ln -s $C/secret.json input/secret.png
ln -s ../../../../../../../../../../..$C temp/relative-escape
mkdir -p temp/chain && ln -s chain/.. temp/y && ln -s ../.. temp/chain/x
rm -f extra_model_paths.yaml && ln -s $C/host-config.yaml extra_model_paths.yaml
# Links named like the temporary files ComfyHub writes.
for name in .extra_model_paths.yaml.tmp-1 .extra_model_paths.yaml.tmp-7 .comfyhub-clone-{NODE}-00000000; do
  ln -s $C/planted-temp "$name"
done
# A custom-node repository that runs commands through git's configuration, attributes and hooks.
N=custom_nodes/{NODE}
cat >> $N/.git/config <<EOF
[core]
	fsmonitor = "touch $M/fsmonitor; false"
	pager = "touch $M/pager; cat"
	sshCommand = "touch $M/ssh"
[filter "evil"]
	clean = "touch $M/filter-clean; cat"
	smudge = "touch $M/filter-smudge; cat"
	process = "touch $M/filter-process"
	required = true
[diff "evil"]
	textconv = "touch $M/textconv; cat"
EOF
printf '* filter=evil diff=evil\\n' > $N/.gitattributes
mkdir -p $N/.git/hooks
for hook in post-checkout post-merge pre-commit reference-transaction pre-auto-gc post-rewrite pre-push \\
            post-index-change fsmonitor-watchman; do
  printf '#!/bin/sh\\ntouch %s/hook-%s\\n' "$M" "$hook" > $N/.git/hooks/$hook
  chmod +x $N/.git/hooks/$hook
done
# A repository installed by hand, its git configuration armed the same way.
mkdir -p custom_nodes/Hand-Made/.git/refs/heads custom_nodes/Hand-Made/.git/objects
printf 'ref: refs/heads/main\\n' > custom_nodes/Hand-Made/.git/HEAD
printf '[core]\\n\\trepositoryformatversion = 0\\n\\tfsmonitor = "touch %s/fsmonitor-hand; false"\\n' "$M" \\
  > custom_nodes/Hand-Made/.git/config
"""
    engine = docker_engine.require_engine(None)
    try:
        container = engine.containers.get(instance.container_name)
        exit_code, output = container.exec_run(["sh", "-c", script])
    finally:
        engine.close()
    assert exit_code == 0, output.decode(errors="replace")


@pytest.fixture
def victim(comfyui_double_image, node_git, docker_cleanup, run_worker, tmp_path, admin_user):
    """A running instance with a custom node installed by ComfyHub and a model downloaded into its own folder, and a
    peer instance to copy workflows to and from."""
    url, _commits = make_node_repo(tmp_path / "repos")
    instance = services.instance_create(instance_id="victim", image=comfyui_double_image, user=admin_user)
    peer = services.instance_create(instance_id="peer", image=comfyui_double_image, user=admin_user)
    for target in (instance, peer):
        assert run(services.instance_build(instance=target), run_worker).status == Operation.Status.SUCCEEDED
    operation = run(services.node_install(instance=instance, url=url), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    root = layout.instance_dir("victim")
    (root / "user" / "default" / "workflows" / "mine.json").write_text(json.dumps(WORKFLOW))
    layout.instance_dir("peer").joinpath("user", "default", "workflows", "theirs.json").write_text(json.dumps(WORKFLOW))
    operation = run(services.instance_start(instance=instance), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log
    instance.refresh_from_db()
    return instance, peer


def client_for(user):
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


def command(*args):
    out, err = StringIO(), StringIO()
    try:
        call_command(*args, stdout=out, stderr=err)
        return 0, out.getvalue() + err.getvalue()
    except CommandError as exc:
        return exc.returncode, out.getvalue() + err.getvalue() + str(exc)
    except SystemExit as exc:  # the commands' own exit codes (comfyhub/cli.py)
        return exc.code, out.getvalue() + err.getvalue()


def test_nothing_an_instance_plants_reaches_the_host(victim, canary, markers, run_worker, stranger, operator,
                                                     settings):
    instance, peer = victim
    plant_traps(instance, canary, markers)
    before = snapshot_of(canary)
    root = layout.instance_dir("victim")
    seen = []  # (what ran, status code or operation status, what the person was told)

    # A plain user looks at every page that shows the instance.
    looker = client_for(stranger)
    for name, args in [("dashboard", []), ("instance-detail", ["victim"]), ("instance-live", ["victim"]),
                       ("instance-workflows", ["victim"]), ("instance-nodes", ["victim"]),
                       ("instance-drift", ["victim"]), ("instance-logs", ["victim"]), ("model-list", []),
                       ("snapshot-instance", ["victim"]), ("snapshot-list", []), ("library", []),
                       ("storage-check", []), ("operation-list", [])]:
        response = looker.get(reverse(name, args=args))
        assert response.status_code < 500, (name, response.status_code)
        seen.append((name, response.status_code))

    # The plain user may not act on it.
    for name in ("instance-build", "instance-restart", "snapshot-create", "storage-fix"):
        args = [] if name == "storage-fix" else ["victim"]
        assert looker.post(reverse(name, args=args)).status_code == 403, name

    # An operator acts on it through the pages; each action runs on a worker.
    acting = client_for(operator)
    posts = [
        ("instance-build", ["victim"], {}),
        ("instance-restart", ["victim"], {}),
        ("instance-workflows-copy", ["victim"], {"targets": ["peer"], "paths": ["secret.json"], "on_conflict": "skip"}),
        ("instance-workflows-copy", ["peer"], {"targets": ["victim"], "paths": ["theirs.json"],
                                               "on_conflict": "overwrite"}),
        ("instance-workflow-publish", ["victim"], {"path": "secret.json", "name": "stolen"}),
        ("models-promote", ["victim"], {"path": "checkpoints/host.safetensors"}),
        ("models-promote", ["victim"], {"path": "loras/host.safetensors"}),
        ("snapshot-create", ["victim"], {"kind": "full", "include_output": "on", "note": "attack"}),
        ("instance-node-action", ["victim"], {"name": NODE, "action": "update"}),
        ("instance-node-action", ["victim"], {"name": NODE, "action": "disable"}),
        ("instance-node-action", ["victim"], {"name": NODE + ".disabled", "action": "enable"}),
        ("models-scan", [], {}),
    ]
    for name, args, data in posts:
        response = acting.post(reverse(name, args=args), data)
        assert response.status_code < 500, (name, response.status_code)
        run_worker()
        seen.append((name, response.status_code))

    # The same through the commands. The storage check lists every planted link with its fix.
    check_output = command("storage", "check")[1]
    for args in [("nodes", "list", "victim"), ("nodes", "list", "victim", "--json"), ("workflows", "list", "victim"),
                 ("models", "inbox", "victim"), ("storage", "check"), ("storage", "check", "--json")]:
        code, output = command(*args)
        assert code in (0, 1, 2), (args, code, output)
        seen.append((args, code, output[-300:]))

    # And through the scheduled jobs.
    Instance.objects.filter(pk=instance.pk).update(snapshot_every_hours=1)
    storage_jobs.scheduled_snapshots()
    run_worker()
    health.reconcile_all()

    # A restore of the snapshot taken of the trapped folder, into the instance and as a clone.
    for snapshot in Snapshot.objects.filter(instance__instance_id="victim"):
        run(storage_services.snapshot_restore(snapshot=snapshot, user=operator), run_worker)

    assert sorted(os.listdir(markers)) == [], "git ran a command configured inside the instance on the host"
    assert snapshot_of(canary) == before, "the host's canary folder changed"
    assert not (canary / "planted-temp").exists()

    # The refusals were shown: the operations that met a planted link failed and named it.
    failed = {op.kind: op.error for op in Operation.objects.filter(status=Operation.Status.FAILED)}
    assert any("user/default" in error or "is a link" in error for error in failed.values()), failed
    for planted in ("user/default", "output", "custom_nodes/Linked-Node", "models/loras",
                    "models/checkpoints/host.safetensors", "input/secret.png", "temp/relative-escape",
                    "extra_model_paths.yaml"):
        assert planted in check_output, (planted, check_output)

    # The storage check's fix removes the links (never what they point to), and the canary is still untouched.
    code, output = command("storage", "check", "--fix")
    assert not os.path.islink(root / "user" / "default") and not os.path.islink(root / "models" / "loras")
    assert snapshot_of(canary) == before
    assert sorted(os.listdir(markers)) == []
