"""The shared model library on each node: a real `manage.py agent` for node B, with its own shared root, checks B's
copy against the library's SHA-256s (a file there, one with other bytes, one missing) and warms and checks B's model
cache from B's copy, recording it for the hub; the models page shows each node's files and filters by node."""
import hashlib
import json
from functools import partial
from pathlib import Path

import pytest
from django.urls import reverse

from comfyhub.models import Operation
from instances import nodes
from instances.models import Node
from storage_app import library, services
from storage_app.models import ModelAsset, ModelCacheReport, ModelNodeCheck
from tests.conftest import wait_for
from tests.support.cli import run
from tests.test_agent import AgentProcess, listening_on

pytestmark = pytest.mark.django_db(transaction=True)

models = partial(run, "models")
LIBRARY = {"checkpoints/alpha.ckpt": b"alpha" * 100, "checkpoints/bravo.ckpt": b"bravo" * 100,
           "loras/charlie.pt": b"charlie"}


@pytest.fixture(autouse=True)
def heartbeat_every_second(settings):
    settings.NODE_HEARTBEAT_SECONDS = 1


def put(root, relpath, content):
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def hashed_library(settings):
    """The library (the hub's shared root) with LIBRARY's files, scanned and hashed."""
    for relpath, content in LIBRARY.items():
        put(settings.COMFY_SHARED_PATH / "models", relpath, content)
    library.scan()
    library.verify()
    return settings.COMFY_SHARED_PATH / "models"


@pytest.fixture
def node_b(tmp_path):
    roots = tmp_path / "node-b"
    (roots / "shared" / "models").mkdir(parents=True)
    return Node.objects.create(name="gpu-b", shared_path=str(roots / "shared"), instances_path=str(roots / "instances"),
                               bind_address="127.0.0.2", port_range_start=9000, port_range_end=9100)


@pytest.fixture
def b_models(node_b):
    """Node B's copy of the library: alpha as the library has it, bravo with other bytes of the same size, no
    charlie."""
    root = Path(node_b.shared_path) / "models"
    put(root, "checkpoints/alpha.ckpt", LIBRARY["checkpoints/alpha.ckpt"])
    put(root, "checkpoints/bravo.ckpt", b"BRAVO" * 100)
    return root


@pytest.fixture
def agent_b(node_b, tmp_path):
    process = AgentProcess("gpu-b", log_path=tmp_path / "agent-b.log",
                           env={"MODEL_CACHE_PATH": str(tmp_path / "b-cache"), "MODEL_CACHE_MAX_GB": "1"})
    try:
        wait_for(lambda: listening_on("node.gpu-b.long"), timeout=60, message="B's agent to take jobs")
        yield process
    finally:
        process.stop()


def checks_of(node_name) -> dict:
    return {check.asset.path: check for check in
            ModelNodeCheck.objects.filter(node__name=node_name).select_related("asset")}


# --- With a real agent for node B ---------------------------------------------------------------------------------

def test_node_bs_agent_finds_the_file_it_has_the_one_that_differs_and_the_one_missing(
        hashed_library, b_models, agent_b, client, operator):
    before = {asset.path: (asset.status, asset.sha256) for asset in ModelAsset.objects.all()}

    checked = models("verify", "--node", "gpu-b", "--timeout", "120")

    assert checked.code == 1, checked.err  # the operation fails, naming what B lacks
    operation = Operation.objects.get(kind="models_verify_node")
    assert operation.queue_name == "node.gpu-b.long" and operation.target_label == "gpu-b"
    assert operation.worker_name in _workers_on("node.gpu-b.long")
    assert "checkpoints/bravo.ckpt differs" in operation.error and "loras/charlie.pt missing" in operation.error
    checks = checks_of("gpu-b")
    assert {path: check.status for path, check in checks.items()} == {
        "checkpoints/alpha.ckpt": "ok", "checkpoints/bravo.ckpt": "differs", "loras/charlie.pt": "missing"}
    assert checks["checkpoints/bravo.ckpt"].sha256 == hashlib.sha256(b"BRAVO" * 100).hexdigest()
    assert checks["checkpoints/bravo.ckpt"].library_sha256 == hashlib.sha256(b"bravo" * 100).hexdigest()
    assert str(b_models) in checks["loras/charlie.pt"].detail
    # The library itself is what it was: B's copy is judged against it, never the other way round.
    assert {asset.path: (asset.status, asset.sha256) for asset in ModelAsset.objects.all()} == before

    # The page: B's summary, and the filter lists only the two files B lacks.
    client.force_login(operator)
    page = client.get(reverse("model-list")).content.decode()
    row = page[page.index('data-node="gpu-b"'):]
    row = row[:row.index("</tr>")]
    for status, count in (("ok", 1), ("differs", 1), ("missing", 1), ("unreadable", 0)):
        assert f'<td data-status="{status}">{count}</td>' in row
    assert "gpu-b: differs" in page and "gpu-b: missing" in page
    filtered = client.get(reverse("model-list"), {"node": "gpu-b"}).content.decode()
    table = filtered[filtered.index('id="model-table"'):]
    assert "checkpoints/bravo.ckpt" in table and "loras/charlie.pt" in table
    assert "checkpoints/alpha.ckpt" not in table

    # B gets the right bytes: the next check reads only what changed there and finds all three.
    put(b_models, "checkpoints/bravo.ckpt", LIBRARY["checkpoints/bravo.ckpt"])
    put(b_models, "loras/charlie.pt", LIBRARY["loras/charlie.pt"])
    again = models("verify", "--node", "gpu-b", "--timeout", "120")
    assert again.code == 0, again.err
    assert "Node gpu-b: 3 file(s) checked, 2 hashed" in again.out
    assert "1 unchanged since last checked: 3 ok, 0 differs, 0 missing, 0 unreadable." in again.out
    assert {check.status for check in checks_of("gpu-b").values()} == {"ok"}


def test_node_bs_cache_is_warmed_from_bs_copy_by_its_agent_and_recorded_for_the_hub(
        hashed_library, b_models, agent_b, tmp_path, settings, client, operator):
    settings.MODEL_CACHE_PATH = tmp_path / "hub-cache"
    b_cache = tmp_path / "b-cache"
    assert json.loads(models("cache", "status", "--node", "gpu-b", "--json").out) == {
        "node": "gpu-b", "configured": None, "reported_at": None}
    assert "has not reported its model cache yet" in models("cache", "status", "--node", "gpu-b").out

    warmed = models("cache", "warm", "--node", "gpu-b", "models/checkpoints/alpha.ckpt",
                    "models/checkpoints/bravo.ckpt", "--timeout", "120")

    # alpha is copied from B's copy; B's bravo is not the library's file, so its copy is refused.
    assert warmed.code == 1, warmed.out
    operation = Operation.objects.get(kind="model_cache_warm")
    assert operation.queue_name == "node.gpu-b.long"
    assert "checkpoints/bravo.ckpt: its copy's SHA-256" in operation.error
    assert (b_cache / "models" / "checkpoints" / "alpha.ckpt").read_bytes() == LIBRARY["checkpoints/alpha.ckpt"]
    assert not (b_cache / "models" / "checkpoints" / "bravo.ckpt").exists()
    assert not (tmp_path / "hub-cache").exists()  # the hub's own cache is not B's

    status = json.loads(models("cache", "status", "--node", "gpu-b", "--json").out)
    assert status["node"] == "gpu-b" and status["configured"] is True and status["path"] == str(b_cache)
    assert status["files"] == 1 and status["entries"][0]["path"] == "checkpoints/alpha.ckpt"
    assert status["reported_at"] is not None
    client.force_login(operator)
    page = client.get(reverse("model-list")).content.decode()
    section = page[page.index('id="model-cache-nodes"'):]
    assert 'data-node="gpu-b"' in section and "<td>1</td>" in section

    # A damaged copy on B is dropped by B's check, and the hub's record follows.
    (b_cache / "models" / "checkpoints" / "alpha.ckpt").write_bytes(b"ALPHA" * 100)
    checked = models("cache", "check", "--node", "gpu-b", "--timeout", "120")
    assert checked.code == 0, checked.err
    assert "1 cached file(s) hashed, 1 dropped." in checked.out
    assert json.loads(models("cache", "status", "--node", "gpu-b", "--json").out)["files"] == 0


def _workers_on(queue_name):
    from rq import Worker

    from comfyhub import queues

    return [w.name for w in Worker.all(connection=queues.get_connection()) if queue_name in w.queue_names()]


# --- Refusals, without an agent --------------------------------------------------------------------------------------

def beating(name, **fields) -> Node:
    node = Node.objects.create(name=name, approved=True, **fields)
    nodes.node_heartbeat(node=node, heartbeat={}, address="127.0.0.1")
    return node


def test_verify_on_a_node_refuses_unknown_offline_and_an_unhashed_library_and_records_nothing(settings):
    from django.utils import timezone

    assert "No node 'gpu-9'" in models("verify", "--node", "gpu-9").err
    assert "is not a node name" in models("verify", "--node", "Bad Name").err
    node = beating("gpu-2")
    unhashed = models("verify", "--node", "gpu-2", "--no-wait")
    assert unhashed.code == 2 and "run models verify first" in unhashed.err
    put(settings.COMFY_SHARED_PATH / "models", "loras/x.pt", b"x")
    library.scan()
    library.verify()
    Node.objects.filter(pk=node.pk).update(last_heartbeat_at=timezone.now() - timezone.timedelta(seconds=30))
    offline = models("verify", "--node", "gpu-2", "--no-wait")
    assert offline.code == 1 and "Node gpu-2 is offline since" in offline.err
    assert not Operation.objects.exists()
    beating("gpu-3")
    queued = models("verify", "--node", "gpu-3", "--no-wait")
    assert queued.code == 0 and Operation.objects.get().queue_name == "node.gpu-3.long"


def test_a_node_whose_agent_reported_no_cache_is_refused_up_front(settings, tmp_path):
    settings.MODEL_CACHE_PATH = tmp_path / "hub-cache"
    put(settings.COMFY_SHARED_PATH / "models", "loras/x.pt", b"x")
    library.scan()
    library.verify()
    node = beating("gpu-2")
    services.model_cache_record(node=node, status={"configured": False})
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="Node 'gpu-2' has no model cache.*its agent reported so"):
        services.model_cache_warm(node_name="gpu-2", paths=["loras/x.pt"])
    assert json.loads(models("cache", "status", "--node", "gpu-2", "--json").out)["configured"] is False
    assert not Operation.objects.exists()
    assert ModelCacheReport.objects.count() == 1


def test_only_those_who_may_verify_check_a_nodes_copy(client, stranger, operator):
    beating("gpu-2")
    client.force_login(stranger)
    assert client.post(reverse("models-verify-node"), {"node": "gpu-2"}).status_code == 403
    assert 'id="verify-node"' not in client.get(reverse("model-list")).content.decode()
    client.force_login(operator)
    assert 'id="verify-node"' in client.get(reverse("model-list")).content.decode()
    response = client.post(reverse("models-verify-node"), {"node": "gpu-2"}, follow=True)
    assert "run models verify first" in response.content.decode()
    assert not Operation.objects.exists()


def test_the_scheduled_full_verification_also_checks_each_online_nodes_copy_on_its_agent(settings):
    from django.utils import timezone

    from storage_app import jobs

    put(settings.COMFY_SHARED_PATH / "models", "loras/x.pt", b"x")
    library.scan()
    library.verify()
    online = Node.objects.create(name="gpu-2", approved=True)
    nodes.node_heartbeat(node=online, heartbeat={}, address="127.0.0.1")
    away = Node.objects.create(name="gpu-3", approved=True)
    nodes.node_heartbeat(node=away, heartbeat={}, address="127.0.0.1")
    Node.objects.filter(pk=away.pk).update(last_heartbeat_at=timezone.now() - timezone.timedelta(minutes=5))

    queued = jobs.scheduled_full_verify()

    operations = {str(op.pk): op for op in Operation.objects.all()}
    assert sorted(operations[pk].queue_name for pk in queued) == ["long", "node.gpu-2.long"]
    assert not any(op.queue_name.startswith("node.gpu-3") for op in operations.values())
