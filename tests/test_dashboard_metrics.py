"""What the dashboard rows and the instance page's activity panel show of each instance's use: ComfyUI's queue, the
memory of its GPUs, its last activity, idle stop, and when and why it was stopped (from the health record and the
registry; no container is needed)."""
from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from instances import services
from instances.models import Instance

pytestmark = pytest.mark.django_db

GIB = 1024 ** 3


def busy_health(**changes):
    """The health record a pass writes for an instance on host GPU 1 with work in its queue."""
    return {"checks": [{"check": "its port is its own", "ok": True, "detail": "x"}],
            "devices": ["cuda:0 NVIDIA RTX A5000 : cudaMallocAsync"], "comfyui_version": "0.3.40",
            "queue": {"running": 1, "pending": 2},
            "vram": [{"name": "cuda:0 NVIDIA RTX A5000 : cudaMallocAsync", "index": 0, "gpu": 1,
                      "used": int(6.2 * GIB), "total": 24 * GIB}],
            **changes}


@pytest.fixture
def busy(db):
    instance = services.instance_create(instance_id="busy", image="example/comfyui:1", gpu_indexes=[1],
                                        idle_stop_after=30)
    Instance.objects.filter(pk=instance.pk).update(
        desired_state=Instance.DesiredState.RUNNING, status=Instance.Status.HEALTHY, health=busy_health(),
        started_at=timezone.now() - timedelta(hours=3), last_activity_at=timezone.now() - timedelta(minutes=4))
    return Instance.objects.get(pk=instance.pk)


def page(client, url):
    """The page's text with timesince's non-breaking spaces ("4\xa0minutes ago") as plain ones."""
    return client.get(url).content.decode().replace("\xa0", " ")


def row_of(client, instance_id):
    content = page(client, reverse("dashboard"))
    return content.split(f'data-instance="{instance_id}"')[1].split("</tr>")[0]


def cell(row, testid):
    return row.split(f'data-testid="{testid}">')[1].split("</td>")[0]


def panel_of(client, instance):
    content = page(client, reverse("instance-detail", args=[instance.instance_id]))
    return content.split('id="instance-activity"')[1].split("</section>")[0]


def test_a_busy_instance_row_shows_its_queue_gpu_memory_last_activity_and_idle_stop(client, stranger, busy):
    client.force_login(stranger)
    row = row_of(client, "busy")
    assert cell(row, "instance-queue") == "1 running · 2 pending"
    assert "GPU 1 6.2/24 GB" in cell(row, "instance-vram")
    activity = cell(row, "instance-activity")
    exact = timezone.localtime(busy.last_activity_at).strftime("%Y-%m-%d %H:%M:%S")
    assert f'title="{exact} UTC">4 minutes ago<' in activity
    assert "idle stop 30 min" in activity


def test_an_instance_on_an_offline_node_shows_no_queue_or_gpu_memory_as_if_current(client, stranger, busy):
    from instances.models import Node

    away = Node.objects.create(name="gpu-b", approved=True, last_heartbeat_at=timezone.now() - timedelta(hours=1))
    Instance.objects.filter(pk=busy.pk).update(node=away)
    client.force_login(stranger)
    row = row_of(client, "busy")
    assert "node offline since" in row
    assert "running" not in cell(row, "instance-queue") and "GB" not in cell(row, "instance-vram")


def test_open_comfyui_goes_through_the_hub_in_a_new_tab(client, stranger, busy):
    client.force_login(stranger)
    row = row_of(client, "busy")
    assert '<a href="/i/busy/" target="_blank" rel="noopener">Open ComfyUI</a>' in row
    assert f":{busy.host_port}/" not in row


def test_an_idle_queue_reads_empty_and_a_stopped_instance_shows_no_live_figures(client, stranger, busy):
    Instance.objects.filter(pk=busy.pk).update(health=busy_health(queue={"running": 0, "pending": 0}))
    quiet = services.instance_create(instance_id="quiet", image="example/comfyui:1")
    client.force_login(stranger)
    assert cell(row_of(client, "busy"), "instance-queue") == "empty"
    row = row_of(client, "quiet")
    for testid in ("instance-queue", "instance-vram", "instance-activity"):
        assert '<span class="muted">—</span>' in cell(row, testid)
    assert "idle stop" not in row
    assert quiet.idle_stop_after == 0


def test_several_gpus_each_show_their_memory_and_an_unmatched_device_its_name(client, stranger, busy):
    Instance.objects.filter(pk=busy.pk).update(health=busy_health(vram=[
        {"name": "cuda:0 A", "index": 0, "gpu": 2, "used": 0, "total": 80 * GIB},
        {"name": "cuda:1 B", "index": 1, "gpu": None, "used": int(11.5 * GIB), "total": int(23.99 * GIB)},
    ]))
    client.force_login(stranger)
    vram = cell(row_of(client, "busy"), "instance-vram")
    assert "GPU 2 0/80 GB" in vram and "cuda:1 B 11.5/24 GB" in vram


def test_the_activity_panel_says_when_idle_stop_will_stop_a_running_instance(client, stranger, busy):
    client.force_login(stranger)
    panel = panel_of(client, busy)
    at = timezone.localtime(busy.last_activity_at + timedelta(minutes=30)).strftime("%H:%M")
    idle = panel.split('data-testid="idle-stop">')[1].split("</dd>")[0]
    assert idle.startswith("after 30 min with no traffic through the hub and an empty queue: will stop at about ")
    assert f">{at}</span> if still idle" in idle
    assert "4 minutes ago" in panel.split('data-testid="last-activity">')[1].split("</dd>")[0]
    assert "1 running, 2 pending" in panel
    assert "GPU 1" in panel and "6.2/24 GB used" in panel
    assert 'data-testid="stop-reason"' not in panel


def test_the_start_counts_as_activity_when_nothing_came_later(client, stranger, busy):
    Instance.objects.filter(pk=busy.pk).update(last_activity_at=None,
                                               started_at=timezone.now() - timedelta(minutes=10))
    client.force_login(stranger)
    last = panel_of(client, busy).split('data-testid="last-activity">')[1].split("</dd>")[0]
    assert "10 minutes ago" in last and "(its start)" in last


def test_an_instance_past_its_idle_time_says_it_stops_at_the_next_check(client, stranger, busy):
    Instance.objects.filter(pk=busy.pk).update(last_activity_at=timezone.now() - timedelta(minutes=31))
    client.force_login(stranger)
    assert "idle past its time: stops at the next check if its queue is empty" in panel_of(client, busy)


@pytest.mark.parametrize("approved, heartbeat_ago, why", [
    (True, timedelta(hours=1), "is offline"),
    (False, timedelta(seconds=1), "is not approved"),
])
def test_an_instance_on_a_node_taking_no_jobs_says_idle_stop_waits_for_it(client, stranger, busy, approved,
                                                                           heartbeat_ago, why):
    from instances.models import Node

    away = Node.objects.create(name="gpu-b", approved=approved, last_heartbeat_at=timezone.now() - heartbeat_ago)
    Instance.objects.filter(pk=busy.pk).update(node=away, last_activity_at=timezone.now() - timedelta(minutes=31))
    client.force_login(stranger)
    idle = panel_of(client, busy).split('data-testid="idle-stop">')[1].split("</dd>")[0]
    assert f"idle stop waits: its node gpu-b {why}; the check after its agent takes jobs again stops it" in idle
    assert "next check" not in idle


def test_an_instance_on_an_online_approved_node_keeps_its_stop_time(client, stranger, busy):
    from instances.models import Node

    away = Node.objects.create(name="gpu-b", approved=True, last_heartbeat_at=timezone.now())
    Instance.objects.filter(pk=busy.pk).update(node=away)
    client.force_login(stranger)
    assert "if still idle" in panel_of(client, busy).split('data-testid="idle-stop">')[1].split("</dd>")[0]


def test_idle_stop_off_reads_off_and_a_stopped_instance_says_when_and_why(client, stranger, busy):
    stopped_at = timezone.now() - timedelta(minutes=5)
    Instance.objects.filter(pk=busy.pk).update(
        idle_stop_after=0, desired_state=Instance.DesiredState.STOPPED, status=Instance.Status.STOPPED,
        health={"checks": [], "devices": [], "comfyui_version": "", "queue": None, "vram": []},
        stopped_at=stopped_at, stop_reason="Stopped after 30 min idle: no traffic through the hub and an empty queue.")
    client.force_login(stranger)
    panel = panel_of(client, busy)
    assert panel.split('data-testid="idle-stop">')[1].startswith("off</dd>")
    assert timezone.localtime(stopped_at).strftime("%Y-%m-%d %H:%M:%S") in panel
    assert "5 minutes ago" in panel.split('data-testid="stopped-at">')[1].split("</dd>")[0]
    assert ("Stopped after 30 min idle: no traffic through the hub and an empty queue."
            in panel.split('data-testid="stop-reason">')[1].split("</dd>")[0])
    assert "not known (asked while it runs)" in panel


def test_a_stopped_instance_with_idle_stop_on_promises_no_stop_time(client, stranger, busy):
    Instance.objects.filter(pk=busy.pk).update(desired_state=Instance.DesiredState.STOPPED,
                                               status=Instance.Status.STOPPED, stopped_at=timezone.now())
    client.force_login(stranger)
    idle = panel_of(client, busy).split('data-testid="idle-stop">')[1].split("</dd>")[0]
    assert idle == "after 30 min with no traffic through the hub and an empty queue"


def test_the_new_columns_cost_the_dashboard_no_query_per_instance(client, stranger, busy):
    client.force_login(stranger)
    client.get(reverse("dashboard"))  # warm caches that do not depend on the number of instances
    with CaptureQueriesContext(connection) as one:
        client.get(reverse("dashboard"))
    for number in range(12):
        extra = services.instance_create(instance_id=f"more-{number}", image="example/comfyui:1",
                                         idle_stop_after=number)
        Instance.objects.filter(pk=extra.pk).update(
            health=busy_health(), desired_state=Instance.DesiredState.RUNNING, status=Instance.Status.HEALTHY,
            started_at=timezone.now(), last_activity_at=timezone.now() - timedelta(seconds=number * 70))
    with CaptureQueriesContext(connection) as thirteen:
        content = client.get(reverse("dashboard")).content.decode()
    assert content.count("running · 2 pending") == 13
    assert len(thirteen) == len(one), [q["sql"] for q in thirteen.captured_queries]


def test_a_health_record_from_before_these_columns_still_renders(client, stranger, busy):
    Instance.objects.filter(pk=busy.pk).update(health={"checks": [], "devices": [], "comfyui_version": ""})
    client.force_login(stranger)
    row = row_of(client, "busy")
    assert '<span class="muted">—</span>' in cell(row, "instance-queue")
    assert '<span class="muted">—</span>' in cell(row, "instance-vram")
    assert "not known" in panel_of(client, busy)


def test_gpus_idle_stop_gave_back_read_given_back_on_its_page_its_nodes_and_the_dashboard(client, operator, busy):
    services.gpus_give_back(busy)
    client.force_login(operator)
    given_back = 'data-testid="gpus-released">given back (1)</span>'
    instance_page = page(client, reverse("instance-detail", args=["busy"]))
    assert given_back in instance_page.split('data-testid="instance-gpus">')[1].split("</dd>")[0]
    node_page = page(client, reverse("node-detail", args=["local"]))
    assert given_back in node_page.split(">busy</a>")[1].split("</tr>")[0]
    assert given_back in row_of(client, "busy")
    Instance.objects.filter(pk=busy.pk).update(gpus_released=[])
    assert page(client, reverse("instance-detail", args=["busy"])).split(
        'data-testid="instance-gpus">')[1].startswith("CPU</dd>")
