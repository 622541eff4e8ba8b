"""The instance pages: dashboard, one instance, actions, delete, logs and GPUs, seen by an operator, a viewer and
someone not logged in."""
import pytest
from django.contrib.contenttypes.models import ContentType
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from comfyhub import queues
from comfyhub.models import Operation
from instances import docker_engine as engine_adapter
from instances import services
from instances.models import GPU, Instance

pytestmark = pytest.mark.django_db

DEAD_REDIS = "unix:///nonexistent/comfyhub-redis.sock?db=0"
DEAD_ENGINE = "unix:///nonexistent/docker.sock"


@pytest.fixture
def alpha(db):
    return services.instance_create(instance_id="view-alpha", display_name="Alpha", image="example/comfyui:1",
                                    gpu_indexes=[1, 2])


@pytest.fixture
def redis_down(settings):
    settings.REDIS_URL = DEAD_REDIS
    settings.RQ_QUEUES = {name: {"URL": DEAD_REDIS} for name in settings.RQ_QUEUES}


@pytest.fixture
def engine_down(settings):
    settings.DOCKER_HOST = DEAD_ENGINE
    engine_adapter.forget_cached_status()
    yield
    engine_adapter.forget_cached_status()


def url(name, instance=None):
    return reverse(name, args=[instance.instance_id] if instance is not None else [])


INSTANCE_PAGES = ["instance-detail", "instance-live", "instance-edit", "instance-delete", "instance-logs",
                  "instance-logs-download"]
INSTANCE_ACTIONS = ["instance-build", "instance-start", "instance-stop", "instance-restart"]


# --- Who may do what -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", INSTANCE_PAGES + INSTANCE_ACTIONS)
def test_every_instance_page_sends_someone_not_logged_in_to_the_login_page(client, alpha, name):
    for response in (client.get(url(name, alpha)), client.post(url(name, alpha))):
        assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.parametrize("name", ["instance-create", "instance-rows", "gpu-list", "gpu-discover"])
def test_every_other_page_sends_someone_not_logged_in_to_the_login_page(client, name):
    for response in (client.get(url(name)), client.post(url(name))):
        assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.parametrize("name", INSTANCE_ACTIONS + ["instance-edit", "instance-delete"])
def test_a_stranger_may_not_act_on_an_instance(client, stranger, alpha, name):
    before = Instance.objects.values().get(pk=alpha.pk)
    client.force_login(stranger)
    response = client.post(url(name, alpha), {"display_name": "mine", "purge_data": "on", "confirm": alpha.instance_id})
    assert response.status_code == 403
    assert not Operation.objects.exists()
    assert Instance.objects.values().get(pk=alpha.pk) == before


def test_a_stranger_may_not_create_an_instance_or_rediscover_gpus(client, stranger):
    client.force_login(stranger)
    assert client.post(url("instance-create"), {"instance_id": "sneaky"}).status_code == 403
    assert client.get(url("instance-create")).status_code == 403
    GPU.objects.filter(index=0).update(present=False)
    assert client.post(url("gpu-discover")).status_code == 403
    assert not Instance.objects.exists()
    assert not GPU.objects.get(index=0).present


def test_a_stranger_may_look_but_is_shown_no_buttons(client, stranger, alpha):
    client.force_login(stranger)
    for page in (url("dashboard"), url("instance-detail", alpha), url("gpu-list")):
        response = client.get(page)
        assert response.status_code == 200
        content = response.content.decode()
        for button in (">Start<", ">Stop<", ">Restart<", ">Build<", "New instance", "Delete…", ">Edit<",
                       "Rediscover GPUs"):
            assert button not in content, f"{button} shown on {page}"


def test_an_operator_is_shown_every_button(client, operator, alpha):
    client.force_login(operator)
    detail = client.get(url("instance-detail", alpha)).content.decode()
    for button in (">Start<", ">Stop<", ">Restart<", ">Build<", "Delete…", ">Edit<"):
        assert button in detail
    assert "New instance" in client.get(url("dashboard")).content.decode()
    assert "Rediscover GPUs" in client.get(url("gpu-list")).content.decode()


@pytest.mark.parametrize("name", INSTANCE_ACTIONS)
def test_actions_only_answer_post(client, operator, alpha, name):
    client.force_login(operator)
    assert client.get(url(name, alpha)).status_code == 405
    assert not Operation.objects.exists()


@pytest.mark.parametrize("name", INSTANCE_PAGES + INSTANCE_ACTIONS)
def test_an_unknown_instance_is_not_found(client, admin_user, name):
    client.force_login(admin_user)
    response = client.post(url(name, Instance(instance_id="nobody"))) if name in INSTANCE_ACTIONS else \
        client.get(url(name, Instance(instance_id="nobody")))
    assert response.status_code == 404


# --- Dashboard -----------------------------------------------------------------------------------------------

def test_the_dashboard_lists_instances_with_status_gpus_port_and_a_link_to_comfyui(client, operator, alpha):
    cpu = services.instance_create(instance_id="view-cpu", image="example/comfyui:1")
    Instance.objects.filter(pk=alpha.pk).update(
        status=Instance.Status.UNHEALTHY, status_detail="ComfyUI does not answer /system_stats",
        health={"checks": [{"check": "its port is its own", "ok": False, "detail": "x"},
                           {"check": "shared storage is read-only", "ok": True, "detail": "y"}]})
    client.force_login(operator)
    response = client.get(url("dashboard"))
    content = response.content.decode()
    alpha_row = content.split('data-instance="view-alpha"')[1].split("</tr>")[0]
    assert f'href="{alpha.get_absolute_url()}"' in alpha_row and "Alpha" in alpha_row
    assert 'title="ComfyUI does not answer /system_stats"' in alpha_row and ">Unhealthy<" in alpha_row
    assert "1 of 2 checks fail" in alpha_row
    assert "<td>1, 2</td>" in alpha_row
    assert f"<td>{alpha.host_port}</td>" in alpha_row
    assert 'href="/i/view-alpha/" target="_blank" rel="noopener"' in alpha_row
    assert ">Start<" in alpha_row and ">Stop<" not in alpha_row
    cpu_row = content.split('data-instance="view-cpu"')[1].split("</tr>")[0]
    assert "<td>CPU</td>" in cpu_row and "not checked yet" in cpu_row
    # What the dashboard showed before instances joined it is still there.
    assert 'id="engine-status"' in content and 'id="queue-status"' in content and "Latest operations" in content


def test_a_running_instance_offers_stop_and_restart_on_the_dashboard(client, operator, alpha):
    Instance.objects.filter(pk=alpha.pk).update(desired_state=Instance.DesiredState.RUNNING)
    client.force_login(operator)
    row = client.get(url("dashboard")).content.decode().split('data-instance="view-alpha"')[1].split("</tr>")[0]
    assert ">Stop<" in row and ">Restart<" in row and ">Start<" not in row


def test_the_dashboard_rows_refresh_themselves(client, stranger, alpha):
    client.force_login(stranger)
    response = client.get(url("instance-rows"))
    content = response.content.decode()
    assert content.lstrip().startswith('<tbody id="instance-rows"')
    assert 'hx-trigger="every 5s"' in content and "view-alpha" in content
    assert "<html" not in content


def test_the_dashboard_needs_the_same_queries_for_2_and_20_instances(client, stranger):
    def make(first, count):
        for number in range(first, first + count):
            instance = services.instance_create(instance_id=f"many-{number}", image="example/comfyui:1",
                                                host_port=19000 + number)
            Operation.objects.create(kind="instance_start", target_type=ContentType.objects.get_for_model(instance),
                                     target_id=str(instance.pk), target_label=str(instance))
    GPU.objects.update(shareable=True)
    make(0, 2)
    for instance in Instance.objects.all():
        services.instance_update(instance=instance, display_name="", description="", image=instance.image,
                                 extra_args=[], extra_env={}, host_port=None, gpu_indexes=[0, 1])
    client.force_login(stranger)
    client.get(url("dashboard"))  # warm caches that do not depend on the number of instances
    with CaptureQueriesContext(connection) as two:
        assert client.get(url("dashboard")).status_code == 200
    make(2, 18)
    for instance in Instance.objects.all():
        services.instance_update(instance=instance, display_name="", description="", image=instance.image,
                                 extra_args=[], extra_env={}, host_port=None, gpu_indexes=[0, 1])
    with CaptureQueriesContext(connection) as twenty:
        response = client.get(url("dashboard"))
    assert response.content.decode().count('data-instance="many-') == 20
    assert len(twenty) == len(two), [q["sql"] for q in twenty.captured_queries]
    with CaptureQueriesContext(connection) as rows:
        client.get(url("instance-rows"))
    assert len(rows) <= len(two)


# --- One instance --------------------------------------------------------------------------------------------

def test_the_instance_page_shows_its_facts(client, stranger, alpha, admin_user):
    Instance.objects.filter(pk=alpha.pk).update(container_id="0123456789abcdef0123", created_by=admin_user,
                                                desired_state=Instance.DesiredState.RUNNING)
    client.force_login(stranger)
    content = client.get(url("instance-detail", alpha)).content.decode()
    assert "<code>example/comfyui:1</code>" in content
    # People open it through the hub; the node's own address is for operators (tests/test_shares.py).
    assert f'href="{alpha.hub_path}"' in content and f"http://127.0.0.1:{alpha.host_port}/" not in content
    gpus = content.split('data-testid="instance-gpus">')[1].split("</dd>")[0]
    assert "GPU 1" in gpus and "GPU 2" in gpus and "GPU 0" not in gpus
    assert '<code title="0123456789abcdef0123">0123456789ab</code>' in content
    assert "<dd>Running</dd>" in content and "by alice" in content
    assert ">Not built<" in content and "never" in content


def test_the_instance_page_shows_failing_checks_in_red_and_the_devices_comfyui_reports(client, stranger, alpha):
    Instance.objects.filter(pk=alpha.pk).update(health={
        "checks": [{"check": "shared storage is read-only", "ok": True, "detail": "/shared is read-only"},
                   {"check": "its port is its own", "ok": False, "detail": "port 1 also published by evil"}],
        "devices": ["cuda:0 NVIDIA H200 : cudaMallocAsync"], "comfyui_version": "0.3.40"})
    client.force_login(stranger)
    content = client.get(url("instance-detail", alpha)).content.decode()
    failed = content.split('class="check-failed"')[1].split("</tr>")[0]
    assert "its port is its own" in failed and "port 1 also published by evil" in failed
    passed = content.split('class="check-ok"')[1].split("</tr>")[0]
    assert "shared storage is read-only" in passed
    assert "cuda:0 NVIDIA H200 : cudaMallocAsync" in content.split('data-testid="instance-devices"')[1]
    assert "0.3.40" in content


def test_the_instance_page_says_restart_to_apply_when_the_container_is_out_of_date(client, stranger, alpha,
                                                                                   docker_engine):
    # The page compares with what the engine says the container was made from: it needs an engine to ask.
    client.force_login(stranger)
    assert 'data-testid="pending-changes"' not in client.get(url("instance-detail", alpha)).content.decode()
    Instance.objects.filter(pk=alpha.pk).update(config_hash="made-from-an-older-configuration")
    content = client.get(url("instance-detail", alpha)).content.decode()
    assert 'data-testid="pending-changes"' in content and "Restart to apply" in content


def test_the_instance_page_lists_its_own_operations_and_follows_the_active_one(client, stranger, alpha):
    other = services.instance_create(instance_id="view-other", image="example/comfyui:1")
    content_type = ContentType.objects.get_for_model(Instance)
    done = Operation.objects.create(kind="instance_build", target_type=content_type, target_id=str(alpha.pk),
                                    target_label="view-alpha", status=Operation.Status.SUCCEEDED)
    running = Operation.objects.create(kind="instance_start", target_type=content_type, target_id=str(alpha.pk),
                                       target_label="view-alpha", status=Operation.Status.RUNNING, progress=70,
                                       progress_message="waiting for ComfyUI to answer")
    elsewhere = Operation.objects.create(kind="instance_stop", target_type=content_type, target_id=str(other.pk),
                                         target_label="view-other")
    client.force_login(stranger)
    response = client.get(url("instance-detail", alpha))
    assert list(response.context["operations"]) == [running, done]
    assert elsewhere.get_absolute_url() not in response.content.decode()
    assert response.context["active_operation"] == running
    content = response.content.decode()
    assert f'hx-get="{reverse("operation-live", args=[running.pk])}" hx-trigger="every 1s"' in content
    assert "waiting for ComfyUI to answer" in content
    assert f'hx-get="{url("instance-live", alpha)}" hx-trigger="every 2s"' in content


def test_the_live_status_polls_while_an_operation_runs_and_stops_after(client, stranger, alpha):
    operation = Operation.objects.create(kind="instance_start", target_type=ContentType.objects.get_for_model(Instance),
                                         target_id=str(alpha.pk), status=Operation.Status.RUNNING)
    client.force_login(stranger)
    response = client.get(url("instance-live", alpha))
    assert response.status_code == 200 and 'hx-trigger="every 2s"' in response.content.decode()
    Operation.objects.filter(pk=operation.pk).update(status=Operation.Status.SUCCEEDED)
    Instance.objects.filter(pk=alpha.pk).update(status=Instance.Status.HEALTHY)
    response = client.get(url("instance-live", alpha))
    assert response.status_code == 286  # htmx: stop polling
    assert "hx-trigger" not in response.content.decode() and ">Healthy<" in response.content.decode()


def test_the_page_of_a_starting_instance_keeps_polling(client, stranger, alpha):
    Instance.objects.filter(pk=alpha.pk).update(status=Instance.Status.STARTING)
    client.force_login(stranger)
    assert client.get(url("instance-live", alpha)).status_code == 200


# --- Actions -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, kind, desired", [
    ("instance-build", "instance_build", "stopped"),
    ("instance-start", "instance_start", "running"),
    ("instance-stop", "instance_stop", "stopped"),
    ("instance-restart", "instance_restart", "running"),
])
def test_an_operator_queues_an_action_and_returns_to_the_instance(client, operator, alpha, name, kind, desired):
    client.force_login(operator)
    response = client.post(url(name, alpha))
    assert response.status_code == 302 and response["Location"] == alpha.get_absolute_url()
    operation = Operation.objects.get()
    assert operation.kind == kind and operation.target_id == str(alpha.pk) and operation.requested_by == operator
    assert Instance.objects.get(pk=alpha.pk).desired_state == desired


def test_a_dashboard_button_returns_to_the_dashboard_but_never_to_another_site(client, operator, alpha):
    client.force_login(operator)
    response = client.post(url("instance-start", alpha), {"next": "/"})
    assert response["Location"] == "/"
    response = client.post(url("instance-stop", alpha), {"next": "https://evil.example/"})
    assert response["Location"] == alpha.get_absolute_url()


@pytest.mark.parametrize("name", INSTANCE_ACTIONS)
def test_an_action_says_the_job_queue_is_unavailable_and_queues_nothing(client, operator, alpha, redis_down, name):
    client.force_login(operator)
    response = client.post(url(name, alpha), follow=True)
    assert response.status_code == 200
    assert "The job queue is unavailable" in response.content.decode()
    assert not Operation.objects.exists()


def test_a_new_instance_is_kept_when_the_queue_cannot_build_it(client, operator, redis_down):
    client.force_login(operator)
    response = client.post(url("instance-create"), {"instance_id": "queue-less", "image": "example/comfyui:1"},
                           follow=True)
    instance = Instance.objects.get(instance_id="queue-less")
    assert response.redirect_chain[-1][0] == instance.get_absolute_url()
    content = response.content.decode()
    assert 'class="message message-warning"' in content and "The job queue is unavailable" in content
    assert not Operation.objects.exists()


# --- Delete --------------------------------------------------------------------------------------------------

def queued_kwargs(operation):
    return queues.get_queue(operation.queue_name).fetch_job(str(operation.pk)).kwargs


def test_the_delete_page_asks_before_deleting(client, operator, alpha):
    client.force_login(operator)
    content = client.get(url("instance-delete", alpha)).content.decode()
    assert "Also delete its data" in content and 'name="confirm"' in content
    assert not Operation.objects.exists()


def test_deleting_its_data_needs_the_instance_id_typed(client, operator, alpha, django_capture_on_commit_callbacks):
    client.force_login(operator)
    for typed in ("", "view-alph", "VIEW-ALPHA", "view-alpha\n", " view-alpha"):
        response = client.post(url("instance-delete", alpha), {"purge_data": "on", "confirm": typed})
        assert response.status_code == 400
        assert "Type the instance id &#x27;view-alpha&#x27; exactly to delete it." in response.content.decode()
        assert response.context["form"].errors["confirm"]
    assert not Operation.objects.exists()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url("instance-delete", alpha), {"purge_data": "on", "confirm": "view-alpha"})
    operation = Operation.objects.get()
    assert response.status_code == 302 and response["Location"] == operation.get_absolute_url()
    assert operation.kind == "instance_delete" and queued_kwargs(operation)["purge_data"] is True


def test_deleting_needs_the_instance_id_typed_even_keeping_its_data(client, operator, alpha,
                                                                   django_capture_on_commit_callbacks):
    client.force_login(operator)
    for data in ({}, {"confirm": ""}, {"confirm": "view-alpha\n"}):
        refused = client.post(url("instance-delete", alpha), data)
        assert refused.status_code == 400
        assert "Type the instance id &#x27;view-alpha&#x27; exactly to delete it." in refused.content.decode()
    assert not Operation.objects.exists()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(url("instance-delete", alpha), {"confirm": "view-alpha"}, follow=True)
    operation = Operation.objects.get()
    assert queued_kwargs(operation)["purge_data"] is False
    assert "(its data is kept)" in response.content.decode()


def test_delete_says_the_job_queue_is_unavailable(client, operator, alpha, redis_down):
    client.force_login(operator)
    response = client.post(url("instance-delete", alpha), {"confirm": "view-alpha"})
    assert response.status_code == 200 and "The job queue is unavailable" in response.content.decode()
    assert Instance.objects.filter(pk=alpha.pk).exists() and not Operation.objects.exists()


# --- Logs ----------------------------------------------------------------------------------------------------

def test_the_logs_page_says_the_engine_is_unreachable_instead_of_failing(client, stranger, alpha, engine_down):
    client.force_login(stranger)
    response = client.get(url("instance-logs", alpha))
    assert response.status_code == 200
    error = response.content.decode().split('data-testid="logs-error">')[1].split("</p>")[0]
    assert f"The Docker engine at {DEAD_ENGINE} is unreachable" in error


def test_refreshing_the_logs_swaps_only_the_log_fragment(client, stranger, alpha, engine_down):
    client.force_login(stranger)
    response = client.get(url("instance-logs", alpha), headers={"HX-Request": "true"})
    content = response.content.decode()
    assert response.status_code == 200 and content.lstrip().startswith('<div id="instance-logs">')
    assert "<html" not in content and "is unreachable" in content


def test_downloading_logs_with_the_engine_unreachable_comes_back_to_the_page_with_the_reason(client, stranger, alpha,
                                                                                          engine_down):
    client.force_login(stranger)
    response = client.get(url("instance-logs-download", alpha), follow=True)
    assert response.redirect_chain == [(url("instance-logs", alpha), 302)]
    assert f"The Docker engine at {DEAD_ENGINE} is unreachable" in response.content.decode()


@pytest.mark.docker
def test_logs_download_as_a_text_file_named_after_the_instance(client, stranger, alpha, docker_engine):
    client.force_login(stranger)
    response = client.get(url("instance-logs-download", alpha))
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Content-Disposition"] == 'attachment; filename="view-alpha-logs.txt"'
    assert response.content == b""  # it never ran, so there is nothing to read


@pytest.mark.docker
@pytest.mark.parametrize("query, tail", [("", 500), ("?tail=50", 50), ("?tail=999999", 5000), ("?tail=lots", 500),
                                         ("?tail=-3", 1)])
def test_the_logs_page_shows_500_lines_unless_asked_and_never_more_than_5000(client, stranger, alpha, docker_engine,
                                                                             query, tail):
    client.force_login(stranger)
    response = client.get(url("instance-logs", alpha) + query)
    assert response.status_code == 200 and response.context["tail"] == tail
    assert "not run yet" in response.content.decode()


# --- GPUs ----------------------------------------------------------------------------------------------------

def test_the_gpu_page_lists_every_gpu_with_its_holders(client, stranger, alpha):
    GPU.objects.filter(index=1).update(name="NVIDIA H200", uuid="GPU-1111", memory_total=141 * 1024**3)
    GPU.objects.filter(index=3).update(present=False, shareable=True)
    client.force_login(stranger)
    content = client.get(url("gpu-list")).content.decode()
    rows = {index: content.split(f'data-gpu="{index}"')[1].split("</tr>")[0] for index in range(4)}
    assert "NVIDIA H200" in rows[1] and "GPU-1111" in rows[1] and "141.0\xa0GB" in rows[1]
    assert f'<a href="{alpha.get_absolute_url()}">view-alpha</a>' in rows[1]
    assert f'<a href="{alpha.get_absolute_url()}">view-alpha</a>' in rows[2]
    assert "free" in rows[0] and "view-alpha" not in rows[0]
    assert 'class="absent"' in rows[3] and '<span class="error">no</span>' in rows[3] and "<td>yes</td>" in rows[3]
    assert "source: settings" in content


def test_rediscovering_gpus_says_which_source_it_used(client, operator):
    GPU.objects.create(node=services.local_node(), index=7, name="gone")
    client.force_login(operator)
    response = client.post(url("gpu-discover"), follow=True)
    assert response.redirect_chain == [(url("gpu-list"), 302)]
    assert "4 GPU(s) declared in COMFY_GPUS (source: settings)" in response.content.decode()
    assert not GPU.objects.get(index=7).present


def test_rediscovering_with_no_gpus_declared_says_none(client, operator, settings):
    settings.COMFY_GPUS = "none"
    client.force_login(operator)
    response = client.post(url("gpu-discover"), follow=True)
    assert "(source: none)" in response.content.decode()
    assert not GPU.objects.filter(present=True).exists()


def test_an_operator_toggles_a_gpu_between_shareable_and_exclusive_on_the_gpu_page(client, operator, stranger):
    from instances.models import GPU

    gpu = GPU.objects.get(index=1)
    client.force_login(stranger)
    assert client.post(reverse("gpu-shareable", args=[gpu.pk]), {"shareable": "1"}).status_code == 403
    client.force_login(operator)
    assert "make shareable" in client.get(reverse("gpu-list")).content.decode()
    client.post(reverse("gpu-shareable", args=[gpu.pk]), {"shareable": "1"})
    gpu.refresh_from_db()
    assert gpu.shareable
    services.instance_create(instance_id="one", gpu_indexes=[1])
    services.instance_create(instance_id="two", gpu_indexes=[1])
    response = client.post(reverse("gpu-shareable", args=[gpu.pk]), {"shareable": "0"}, follow=True)
    assert "free it on all but one" in response.content.decode()
    gpu.refresh_from_db()
    assert gpu.shareable


def test_the_instance_page_links_to_its_snapshots(client, stranger):
    instance = services.instance_create(instance_id="linked")
    client.force_login(stranger)
    assert reverse("snapshot-instance", args=["linked"]) in client.get(instance.get_absolute_url()).content.decode()


def test_the_dashboard_shows_instances_fifty_at_a_time(client, stranger):
    node = services.local_node()
    Instance.objects.bulk_create(Instance(instance_id=f"bulk-{n:03}", node=node, image="i", host_port=20000 + n)
                                 for n in range(60))
    client.force_login(stranger)
    first = client.get("/").content.decode()
    assert "bulk-049" in first and "bulk-050" not in first and "Instances 1–50 of 60" in first
    second = client.get("/?page=2").content.decode()
    assert "bulk-050" in second and "bulk-059" in second
    rows = client.get(reverse("instance-rows") + "?page=2").content.decode()
    assert "bulk-059" in rows and "bulk-000" not in rows
