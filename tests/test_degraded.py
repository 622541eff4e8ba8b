"""Redis or the Docker engine down: pages still render and say so; actions explain instead of hanging."""
import pytest
from django.urls import reverse

from comfyhub.models import Operation
from instances import docker_engine as engine_adapter

pytestmark = pytest.mark.django_db

DEAD_SOCKET = "unix:///nonexistent/comfyhub-redis.sock?db=0"


@pytest.fixture
def redis_down(settings):
    settings.REDIS_URL = DEAD_SOCKET
    settings.RQ_QUEUES = {name: {"URL": DEAD_SOCKET} for name in settings.RQ_QUEUES}


@pytest.fixture
def engine_down(settings):
    settings.DOCKER_HOST = "unix:///nonexistent/docker.sock"
    engine_adapter.forget_cached_status()
    yield
    engine_adapter.forget_cached_status()


@pytest.mark.parametrize("url", ["/", "/operations/"])
def test_pages_render_while_redis_is_down(client, stranger, redis_down, url):
    client.force_login(stranger)
    response = client.get(url)
    assert response.status_code == 200


def test_the_dashboard_says_the_queue_is_unavailable(client, stranger, redis_down):
    client.force_login(stranger)
    content = client.get("/").content.decode()
    assert "The job queue is unavailable" in content
    assert "/nonexistent/comfyhub-redis.sock" in content


def test_an_action_says_the_job_queue_is_unavailable_and_queues_nothing(client, operator, redis_down):
    client.force_login(operator)
    response = client.post(reverse("diagnostics-run"), follow=True)
    assert "The job queue is unavailable" in response.content.decode()
    assert not Operation.objects.exists()


def test_every_page_shows_a_banner_naming_the_unreachable_engine(client, stranger, engine_down):
    client.force_login(stranger)
    for url in ("/", "/operations/"):
        content = client.get(url).content.decode()
        assert 'id="engine-banner"' in content
        assert "unix:///nonexistent/docker.sock" in content


def test_no_banner_when_the_engine_answers(client, stranger, docker_engine):
    client.force_login(stranger)
    engine_adapter.forget_cached_status()
    content = client.get("/").content.decode()
    assert 'id="engine-banner"' not in content
    assert "Reachable" in content


@pytest.mark.django_db(transaction=True)
def test_the_dashboard_counts_workers_and_waiting_jobs(client, stranger, worker_process):
    from comfyhub import operations
    from comfyhub.jobs import noop

    client.force_login(stranger)
    content = client.get("/").content.decode()
    assert "none</span>" in content  # no worker yet: said plainly
    operations.enqueue(noop)
    operations.enqueue(noop)
    response = client.get("/")
    default = next(q for q in response.context["queue"].queues if q.name == "default")
    assert default.waiting == 2 and default.workers == 0
    worker_process("default", "long")
    response = client.get("/")
    default = next(q for q in response.context["queue"].queues if q.name == "default")
    assert default.workers == 1
