"""The cluster pages: the list, a new cluster (existing instances adopted, or new members on chosen GPUs), one cluster
with its members, their health and what the master's last reachability probe found, and its actions; who may do
what. Start, stop and the probe run on a real worker against the real Docker engine with the ComfyUI test double;
one test drives the cluster page in real Chromium."""
import random

import pytest
from django.contrib.contenttypes.models import ContentType
from django.urls import reverse
from django.utils import timezone

from comfyhub.models import Operation
from instances import clusters, services
from instances.models import Cluster, ClusterWorker, Instance, Node
from tests.conftest import wait_for
from tests.support.distributed import make_distributed_source

NAMED_PAGES = ["cluster-detail", "cluster-live", "cluster-start", "cluster-stop", "cluster-sync", "cluster-probe",
               "cluster-add-worker", "cluster-remove-worker", "cluster-delete"]
ACTIONS = ["cluster-start", "cluster-stop", "cluster-sync", "cluster-probe", "cluster-add-worker",
           "cluster-remove-worker", "cluster-delete"]


@pytest.fixture
def trio(db):
    """Three plain instances on the local node, each on a GPU of its own."""
    return [services.instance_create(instance_id=f"inst-{n}", gpu_indexes=[n]) for n in range(3)]


@pytest.fixture
def cluster(trio, admin_user):
    """A cluster made from the three: inst-0 the master, inst-1 and inst-2 its workers."""
    return clusters.cluster_create(name="render", master=trio[0], workers=trio[1:], user=admin_user)


def messages_of(response):
    return [str(m) for m in response.context["messages"]]


def form_errors(response, field):
    return response.context["form"].errors.get(field, [])


def row_of(content, instance_id):
    return content.split(f'data-member="{instance_id}"')[1].split("</tr>")[0]


def cluster_operations():
    return Operation.objects.filter(target_type=ContentType.objects.get_for_model(Cluster))


# --- Who may do what -----------------------------------------------------------------------------------------

def test_someone_not_logged_in_is_sent_to_the_login_page(client, cluster):
    urls = [reverse("cluster-list"), reverse("cluster-create")] + [reverse(n, args=["render"]) for n in NAMED_PAGES]
    for url in urls:
        for response in (client.get(url), client.post(url)):
            assert response.status_code == 302 and response["Location"].startswith("/login/"), url
    assert Cluster.objects.filter(name="render").exists()


def test_a_stranger_may_look_but_not_create_start_stop_sync_probe_change_or_delete(client, stranger, cluster, trio):
    client.force_login(stranger)
    before = Operation.objects.count()
    assert client.get(reverse("cluster-list")).status_code == 200
    page = client.get(reverse("cluster-detail", args=["render"]))
    assert page.status_code == 200
    for name in ACTIONS:
        assert reverse(name, args=["render"]) not in page.content.decode(), name
    assert client.get(reverse("cluster-create")).status_code == 403
    assert client.post(reverse("cluster-create"), {"name": "mine", "master": "inst-0"}).status_code == 403
    assert client.get(reverse("cluster-delete", args=["render"])).status_code == 403
    for name in ACTIONS:
        response = client.post(reverse(name, args=["render"]), {"instance": "inst-1", "confirm": "render"})
        assert response.status_code == 403, name
    assert Operation.objects.count() == before
    assert list(Cluster.objects.values_list("name", flat=True)) == ["render"]
    assert ClusterWorker.objects.count() == 2


# --- The list and a new cluster --------------------------------------------------------------------------------

def test_the_list_shows_each_cluster_with_its_master_workers_nodes_and_members_status(client, stranger, cluster):
    Instance.objects.filter(instance_id="inst-1").update(status=Instance.Status.HEALTHY)
    client.force_login(stranger)
    content = client.get(reverse("cluster-list")).content.decode()
    assert '<a href="/clusters/" aria-current="page">Clusters</a>' in content
    row = content.split('data-cluster="render"')[1].split("</tr>")[0]
    assert ">inst-0</a>" in row and "<td>2</td>" in row and "<td>local</td>" in row
    fresh = Instance.objects.get(instance_id="inst-0").get_status_display().lower()
    assert f"2 {fresh}, 1 healthy" in row


def test_an_operator_creates_a_cluster_from_existing_instances(client, operator, trio):
    client.force_login(operator)
    form = client.get(reverse("cluster-create")).content.decode()
    assert 'value="inst-1"' in form and "Create cluster" in form
    response = client.post(reverse("cluster-create"), {"name": "adopted", "description": "three GPUs",
                                                       "master": "inst-0", "workers": ["inst-1", "inst-2"]})
    assert response.status_code == 302 and response["Location"] == "/clusters/adopted/"
    made = Cluster.objects.get(name="adopted")
    assert made.master.instance_id == "inst-0" and made.created_by == operator
    assert sorted(w.instance.instance_id for w in made.workers.all()) == ["inst-1", "inst-2"]
    page = client.get(response["Location"])
    assert "Cluster adopted created." in " ".join(messages_of(page))
    content = page.content.decode()
    assert ">master<" in row_of(content, "inst-0")
    for worker in ("inst-1", "inst-2"):
        assert ">worker<" in row_of(content, worker)
        container = Instance.objects.get(instance_id=worker).container_name  # over the cluster's own network
        assert f"<code>http://{container}:8188</code>" in row_of(content, worker)
    # Each member is prepared (ComfyUI-Distributed installed, its gpu_config.json written) by an operation.
    prepared = Operation.objects.filter(target_type=ContentType.objects.get_for_model(Instance))
    assert sorted(o.target_label for o in prepared) == ["inst-0", "inst-1", "inst-2"]
    listed = content.split('id="cluster-operations"')[1]
    assert all(operation.get_absolute_url() in listed for operation in prepared)
    assert 'hx-get="/clusters/adopted/live/"' in content  # the members' table follows them
    # An adopted instance is no longer offered to the next cluster.
    assert 'value="inst-1"' not in client.get(reverse("cluster-create")).content.decode()


def test_the_form_refuses_a_new_member_on_a_gpu_another_instance_holds(client, operator, db):
    services.template_create(name="tpl")
    services.instance_create(instance_id="holder", gpu_indexes=[0])
    client.force_login(operator)
    response = client.post(reverse("cluster-create"), {"name": "busy", "template": "tpl",
                                                       "new_members": "local: 1\nlocal: 0"})
    assert response.status_code == 400
    assert "holder" in " ".join(form_errors(response, "new_members"))
    assert 'data-testid="error-new_members"' in response.content.decode()
    assert response.context["form"]["new_members"].value() == "local: 1\nlocal: 0"  # what was typed is kept
    assert not Cluster.objects.exists()
    assert list(Instance.objects.values_list("instance_id", flat=True)) == ["holder"]
    assert not Operation.objects.exists()


def test_the_form_refuses_a_worker_that_is_already_in_another_cluster(client, operator, cluster, trio):
    other = services.instance_create(instance_id="other-master", gpu_indexes=[3])
    client.force_login(operator)
    before = Operation.objects.count()
    response = client.post(reverse("cluster-create"), {"name": "second", "master": other.instance_id,
                                                       "workers": ["inst-2"]})
    assert response.status_code == 400
    assert "'inst-2' is already the worker of cluster 'render'" in " ".join(form_errors(response, "workers"))
    assert list(Cluster.objects.values_list("name", flat=True)) == ["render"]
    assert Operation.objects.count() == before


def test_the_form_refuses_a_master_that_is_also_a_worker(client, operator, trio):
    client.force_login(operator)
    response = client.post(reverse("cluster-create"), {"name": "twice", "master": "inst-0",
                                                       "workers": ["inst-0", "inst-1"]})
    assert response.status_code == 400
    assert "'inst-0' cannot be the master and a worker" in " ".join(form_errors(response, "master"))
    assert not Cluster.objects.exists() and not Operation.objects.exists()


def test_the_form_refuses_a_cluster_across_nodes_where_a_node_has_no_address(client, operator, trio):
    remote = Node.objects.create(name="gpu-b", approved=True, bind_address="127.0.0.1")
    far = services.instance_create(instance_id="far", node=remote)
    client.force_login(operator)
    response = client.post(reverse("cluster-create"), {"name": "spread", "master": "inst-0",
                                                       "workers": ["inst-1", far.instance_id]})
    assert response.status_code == 400
    errors = " ".join(form_errors(response, "workers"))
    assert "spans nodes gpu-b, local" in errors and "no address other nodes can reach" in errors
    assert not Cluster.objects.exists() and not Operation.objects.exists()


def test_the_form_says_what_is_wrong_with_a_line_of_new_members_and_with_an_unknown_instance(client, operator, trio):
    client.force_login(operator)
    for lines, expected in [("local 0", "Line 1 (local 0): write the node, a colon and its GPU indexes"),
                            ("local: 0\nnowhere: 1", "Line 2 (nowhere: 1): There is no node 'nowhere'."),
                            ("local: zero", "Line 1 (local: zero): GPUs are given by index")]:
        response = client.post(reverse("cluster-create"), {"name": "lines", "template": "", "new_members": lines})
        assert response.status_code == 400
        assert expected in " ".join(form_errors(response, "new_members")), lines
    response = client.post(reverse("cluster-create"), {"name": "ghost", "master": "ghost", "workers": ["inst-1"]})
    assert "There is no instance 'ghost'" in " ".join(form_errors(response, "master"))
    assert not Cluster.objects.exists()


def test_new_members_are_made_from_the_template_on_the_gpus_given(client, operator, db):
    services.template_create(name="tpl")
    client.force_login(operator)
    response = client.post(reverse("cluster-create"), {"name": "fresh", "template": "tpl",
                                                       "new_members": "local: 2\nlocal: 3\n"})
    assert response.status_code == 302, response.context["form"].errors
    made = Cluster.objects.get(name="fresh")
    assert made.master.instance_id == "fresh-master"
    assert [gpu.index for gpu in made.master.assigned_gpus()] == [2]
    assert [(w.instance.instance_id, [g.index for g in w.instance.assigned_gpus()]) for w in made.workers.all()] == \
        [("fresh-w1", [3])]


def test_a_worker_on_another_node_is_reached_at_that_nodes_address_and_port(client, operator, db):
    local = services.local_node()
    local.bind_address = "10.0.0.1"
    local.save()
    remote = Node.objects.create(name="gpu-b", approved=True, bind_address="10.0.0.2",
                                 last_heartbeat_at=timezone.now())
    services.instance_create(instance_id="near")
    far = services.instance_create(instance_id="far", node=remote)
    client.force_login(operator)
    response = client.post(reverse("cluster-create"), {"name": "spread", "master": "near", "workers": ["far"]})
    assert response.status_code == 302, response.context["form"].errors
    row = row_of(client.get(response["Location"]).content.decode(), "far")
    assert "<td>gpu-b</td>" in row and f"<code>http://10.0.0.2:{far.host_port}</code>" in row
    listed = client.get(reverse("cluster-list")).content.decode().split('data-cluster="spread"')[1].split("</tr>")[0]
    assert "<td>gpu-b, local</td>" in listed


def test_only_an_operator_sets_the_members_cors_origin(client, operator, trio):
    client.force_login(operator)
    response = client.post(reverse("cluster-create"), {"name": "open", "master": "inst-0", "workers": ["inst-1"],
                                                       "cors_origin": "*"})
    assert response.status_code == 302
    page = client.get(response["Location"]).content.decode()
    assert "<code>*</code>" in page.split('data-testid="cluster-cors"')[1].split("</dd>")[0]
    response = client.post(reverse("cluster-create"), {"name": "path", "master": "inst-2",
                                                       "cors_origin": "https://x.example/a"})
    assert "is not an origin" in " ".join(form_errors(response, "cors_origin"))


# --- One cluster ---------------------------------------------------------------------------------------------

def test_the_page_shows_members_roles_urls_and_the_last_probe_with_when(client, stranger, cluster):
    probe = Operation.objects.create(
        kind=clusters.KIND_PROBE, target_type=ContentType.objects.get_for_model(Cluster), target_id=str(cluster.pk),
        target_label="render", status=Operation.Status.SUCCEEDED, finished_at=timezone.now(),
        result={"inst-1": {"url": "http://comfyhub-inst-1:8188", "ok": True, "detail": "answered in 12 ms"},
                "inst-2": {"url": "http://comfyhub-inst-2:8188", "ok": False, "detail": "connection refused"}})
    client.force_login(stranger)
    content = client.get(reverse("cluster-detail", args=["render"])).content.decode()
    assert "✓ reached" in row_of(content, "inst-1") and "answered in 12 ms" in row_of(content, "inst-1")
    assert "✗ not reached" in row_of(content, "inst-2") and "connection refused" in row_of(content, "inst-2")
    assert "reached" not in row_of(content, "inst-0")
    assert "Reachability last checked from inside the master's container" in content
    assert probe.get_absolute_url() in content  # listed among the cluster's operations
    # Members' direct addresses (no login there) are for operators.
    assert "operators only" in row_of(content, "inst-1") and "http://" not in row_of(content, "inst-1")


def test_an_unknown_cluster_is_a_404(client, stranger, db):
    client.force_login(stranger)
    for name in ("cluster-detail", "cluster-live", "cluster-delete"):
        assert client.get(reverse(name, args=["nope"])).status_code in (403, 404)
    assert client.get(reverse("cluster-detail", args=["nope"])).status_code == 404


def test_removing_a_worker_asks_first_then_leaves_it_a_plain_instance(client, operator, cluster):
    client.force_login(operator)
    url = reverse("cluster-remove-worker", args=["render"])
    asked = client.post(url, {"instance": "inst-2"})
    assert asked.status_code == 200 and "Remove worker" in asked.content.decode()
    assert cluster.workers.count() == 2
    done = client.post(url, {"instance": "inst-2", "confirm": "yes"}, follow=True)
    assert "'inst-2' is no longer a worker of cluster render" in " ".join(messages_of(done))
    assert [w.instance.instance_id for w in cluster.workers.all()] == ["inst-1"]
    assert Instance.objects.filter(instance_id="inst-2").exists()
    refused = client.post(url, {"instance": "inst-2", "confirm": "yes"}, follow=True)
    assert "'inst-2' is not a worker of cluster render." in " ".join(messages_of(refused))


def test_a_worker_is_added_from_the_page_and_a_taken_one_is_refused(client, operator, cluster, trio):
    spare = services.instance_create(instance_id="spare", gpu_indexes=[3])
    client.force_login(operator)
    url = reverse("cluster-add-worker", args=["render"])
    done = client.post(url, {"instance": "spare"}, follow=True)
    assert "'spare' is now a worker of cluster render." in " ".join(messages_of(done))
    assert ClusterWorker.objects.filter(cluster=cluster, instance=spare).exists()
    refused = client.post(url, {"instance": "inst-0"})
    assert refused.status_code == 400
    assert "is the master of cluster" in refused.content.decode()


def test_deleting_a_cluster_asks_for_its_name_and_keeps_its_members(client, operator, cluster):
    client.force_login(operator)
    url = reverse("cluster-delete", args=["render"])
    assert "Type <code>render</code> to confirm" in client.get(url).content.decode()
    wrong = client.post(url, {"confirm": "rend"})
    assert wrong.status_code == 400 and Cluster.objects.filter(name="render").exists()
    done = client.post(url, {"confirm": "render"}, follow=True)
    assert "Cluster render deleted" in " ".join(messages_of(done))
    assert not Cluster.objects.exists() and not ClusterWorker.objects.exists()
    assert sorted(Instance.objects.values_list("instance_id", flat=True)) == ["inst-0", "inst-1", "inst-2"]


def test_the_action_buttons_queue_operations_on_the_cluster(client, operator, cluster):
    client.force_login(operator)
    for name, kind, said in [("cluster-sync", clusters.KIND_SYNC, "Writing the members&#x27; gpu_config.json"),
                             ("cluster-probe", clusters.KIND_PROBE, "Checking from inside the master"),
                             ("cluster-start", clusters.KIND_START, "Starting cluster render: its workers, then"),
                             ("cluster-stop", clusters.KIND_STOP, "Stopping cluster render: its workers, then")]:
        response = client.post(reverse(name, args=["render"]), follow=True)
        assert said in response.content.decode(), name
        assert cluster_operations().filter(kind=kind, status=Operation.Status.QUEUED).count() == 1, name


# --- On a real worker, against the real Docker engine and the ComfyUI test double --------------------------------

@pytest.fixture
def distributed_source(tmp_path, settings, monkeypatch, node_git):
    """ComfyUI-Distributed's stand-in repository, pinned as the settings pin the real one."""
    return make_distributed_source(tmp_path / "repos", settings, monkeypatch)


@pytest.fixture
def double_trio(comfyui_double_image, docker_cleanup, distributed_source, transactional_db):
    """Three CPU instances of the ComfyUI test double on the local node, on ports of a window of their own (another
    test session on this engine publishes its containers' ports from the usual range at the same time)."""
    start = random.randrange(30000, 60000, 100)
    Node.objects.filter(pk=services.local_node().pk).update(port_range_start=start, port_range_end=start + 99)
    return [services.instance_create(instance_id=f"dbl-{n}", image=comfyui_double_image) for n in range(3)]


def succeeded(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, (operation.error, operation.log)
    return operation


def latest(kind):
    return cluster_operations().filter(kind=kind).order_by("-created_at").first()


def pressed(client, url_name, kind, run_worker):
    """The cluster page's button `url_name` pressed and the operation it queued run: that operation, succeeded."""
    client.post(reverse(url_name, args=["dbl"]))
    return succeeded(latest(kind), run_worker)


def in_log_order(operation, verb):
    """The members in the order the operation's log says it was `verb` ("starting", "stopping") them."""
    return [line.split(f"{verb} ", 1)[1].split(" on node")[0] for line in operation.log.splitlines()
            if f"{verb} " in line]


@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_the_page_starts_probes_and_stops_a_cluster_workers_first(client, operator, double_trio, run_worker):
    client.force_login(operator)
    response = client.post(reverse("cluster-create"), {"name": "dbl", "master": "dbl-0",
                                                       "workers": ["dbl-1", "dbl-2"]})
    assert response.status_code == 302, response.context["form"].errors
    run_worker()  # each member prepared: ComfyUI-Distributed cloned at the pinned commit, gpu_config.json written
    prepared = Operation.objects.filter(kind="cluster_member_prepare")
    assert sorted(prepared.values_list("status", flat=True)) == [Operation.Status.SUCCEEDED] * 3, \
        [(o.target_label, o.error) for o in prepared]

    start = pressed(client, "cluster-start", clusters.KIND_START, run_worker)
    assert in_log_order(start, "starting") == ["worker dbl-1", "worker dbl-2", "master dbl-0"]
    assert set(Instance.objects.values_list("status", flat=True)) == {Instance.Status.HEALTHY}
    cluster = Cluster.objects.get(name="dbl")
    assert cluster.synced_at is not None and cluster.sync_detail == ""  # the page no longer says "not yet"

    pressed(client, "cluster-probe", clusters.KIND_PROBE, run_worker)
    content = client.get(reverse("cluster-detail", args=["dbl"])).content.decode()
    for worker in ("dbl-1", "dbl-2"):
        row = row_of(content, worker)
        container = Instance.objects.get(instance_id=worker).container_name
        assert "✓ reached" in row and f"http://{container}:8188" in row, row
    assert "Reachability last checked from inside the master's container" in content

    stop = pressed(client, "cluster-stop", clusters.KIND_STOP, run_worker)
    assert in_log_order(stop, "stopping") == ["worker dbl-1", "worker dbl-2", "master dbl-0"]
    assert set(Instance.objects.values_list("status", flat=True)) == {Instance.Status.STOPPED}
    live = client.get(reverse("cluster-live", args=["dbl"]))
    assert live.status_code == 286  # nothing runs: the page stops polling
    assert live.content.decode().count(">no</td>") == 2  # both workers shown disabled in the master's file


@pytest.mark.browser
@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_in_a_browser_an_admin_makes_a_cluster_starts_it_and_sees_the_master_reach_its_workers(
        logged_in_page, admin_user, double_trio, worker_process, live_server, tmp_path):
    from playwright.sync_api import expect

    worker_process()
    page = logged_in_page()
    page.click("nav.mainnav >> text=Clusters")
    expect(page.locator("table.clusters")).to_contain_text("No clusters yet.")
    page.click("text=New cluster")
    page.fill("#id_name", "dbl")
    page.select_option("#id_master", "dbl-0")
    page.select_option("#id_workers", ["dbl-0", "dbl-1"])
    page.click("button:has-text('Create cluster')")
    # The service's refusal comes back next to its field, and what was chosen is kept.
    expect(page.get_by_test_id("error-master")).to_contain_text("'dbl-0' cannot be the master and a worker")
    expect(page.locator("#id_master")).to_have_value("dbl-0")
    page.screenshot(path=str(tmp_path / "cluster-form.png"), full_page=True)
    assert not Cluster.objects.exists()
    page.select_option("#id_workers", ["dbl-1", "dbl-2"])
    page.click("button:has-text('Create cluster')")
    page.wait_for_url(f"{live_server.url}/clusters/dbl/")
    expect(page.locator(".messages")).to_contain_text("Cluster dbl created.")
    expect(page.locator("#cluster-live tbody tr")).to_have_count(3)
    expect(page.locator("tr[data-member='dbl-0']").get_by_test_id("member-role")).to_have_text("master")

    with page.expect_navigation():
        page.click("#cluster-actions button:has-text('Start cluster')")
    expect(page.locator(".messages")).to_contain_text("Starting cluster dbl: its workers, then its master.")
    page.evaluate("window.__notReloaded = true")
    start = latest(clusters.KIND_START)
    wait_for(lambda: Operation.objects.get(pk=start.pk).is_terminal, timeout=180, message="the cluster's start")
    start.refresh_from_db()
    assert start.status == Operation.Status.SUCCEEDED, (start.error, start.log)
    for member in ("dbl-0", "dbl-1", "dbl-2"):
        expect(page.locator(f"tr[data-member='{member}']").get_by_test_id("instance-status")).to_have_text(
            "Healthy", timeout=180_000)
    expect(page.get_by_test_id("operation-status")).to_have_text("Succeeded", timeout=30_000)
    assert page.evaluate("window.__notReloaded === true"), "the statuses should have arrived through htmx"

    with page.expect_navigation():
        page.click("#cluster-actions button:has-text('Check reachability')")
    for worker in ("dbl-1", "dbl-2"):
        expect(page.locator(f"tr[data-member='{worker}']").get_by_test_id("member-probe")).to_contain_text(
            "✓ reached", timeout=60_000)
    expect(page.get_by_test_id("probe-when")).to_contain_text("Reachability last checked")
    page.screenshot(path=str(tmp_path / "cluster.png"), full_page=True)
