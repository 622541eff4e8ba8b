"""`instances update-image`: a rebuilt tag reaches the running instances one at a time, each healthy before the next,
and an instance that does not come up on it goes back to its old image, on the real engine and the production
worker."""
import io
import json
import urllib.request
from datetime import datetime, timezone
from functools import partial

import pytest

from comfyhub.models import Operation
from instances import docker_engine, services
from instances.models import Instance
from tests.support.cli import run
from tests.support.docker_fixtures import session_label

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]

cli = partial(run, "instances")


@pytest.fixture
def tag(comfyui_double_image, docker_cleanup):
    """The instances' image reference: this session's own tag, which each test points at images it builds."""
    return f"comfyhub-test-update:{session_label()['comfyhub.test']}"


@pytest.fixture
def build(tag, comfyui_double_image, docker_cleanup):
    """Build a variant of the test double (one more label; `entrypoint` replaces its entrypoint) and tag it as the
    instances' image. Labelled with the session, so the cleanup removes it."""

    def make(variant, entrypoint=None, as_tag=tag):
        dockerfile = f"FROM {comfyui_double_image}\nLABEL comfyhub.test.update={variant}\n"
        if entrypoint:
            dockerfile += f"ENTRYPOINT {json.dumps(entrypoint)}\n"
        image, _ = docker_cleanup.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=as_tag, rm=True,
                                               pull=False, labels=session_label())
        return image.id

    return make


@pytest.fixture
def running(tag, production_worker):
    """Instances on the tag, started (and healthy) through the production worker."""

    def start(*instance_ids, image=tag):
        instances = [services.instance_create(instance_id=i, image=image) for i in instance_ids]
        operations = [services.instance_start(instance=instance) for instance in instances]
        production_worker(timeout=120)
        for operation in operations:
            operation.refresh_from_db()
            assert operation.status == Operation.Status.SUCCEEDED, operation.error
        return instances

    return start


def inspect(docker_engine, instance):
    return docker_engine.api.inspect_container(instance.container_name)


def started_at(attrs) -> datetime:
    return datetime.fromisoformat(attrs["State"]["StartedAt"][:26].rstrip("Z")).replace(tzinfo=timezone.utc)


def answers(instance) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{instance.host_port}/system_stats", timeout=5) as response:
        return response.status == 200


def last_update():
    return Operation.objects.filter(kind="update_image").get()


def test_it_restarts_the_running_instances_one_at_a_time_on_the_new_image(build, running, production_worker,
                                                                          docker_engine):
    old = build("old")
    alpha, beta = running("alpha", "beta")
    new = build("new")
    assert new != old

    result = cli("update-image", "--all", "--no-pull")

    assert result.code == 0, result.err + result.out
    assert "alpha: updated" in result.out and "beta: updated" in result.out
    for instance in (alpha, beta):
        attrs = inspect(docker_engine, instance)
        assert attrs["Image"] == new
        assert attrs["Config"]["Labels"]["comfyhub.image-id"] == new
        assert answers(instance)
        instance.refresh_from_db()
        assert instance.status == Instance.Status.HEALTHY
        assert services.instance_pending_change_kinds(instance) == set()
    operation = last_update()
    assert operation.status == Operation.Status.SUCCEEDED
    assert operation.target_label == ""  # several instances: the rollout's own operation, its log names each
    # beta's new container started only after alpha answered on the new image.
    alpha_healthy = datetime.fromisoformat(operation.result["instances"][0]["healthy_at"])
    assert operation.result["instances"][0]["instance"] == "alpha"
    assert started_at(inspect(docker_engine, beta)) > alpha_healthy > started_at(inspect(docker_engine, alpha))
    assert operation.log.index("alpha: healthy on") < operation.log.index("beta: restarting on")
    assert operation.result["restarted"] == 2


def test_an_instance_that_does_not_come_up_goes_back_to_the_old_image_and_the_rollout_stops(
        build, running, tag, production_worker, docker_engine):
    old = build("old")
    alpha, beta = running("alpha", "beta")
    beta_container = inspect(docker_engine, beta)["Id"]
    broken = build("broken", entrypoint=["/bin/sh", "-c", "echo this image is broken >&2; exit 3"])

    result = cli("update-image", "alpha", "beta", "--no-pull")

    assert result.code == 1
    operation = last_update()
    assert operation.status == Operation.Status.FAILED
    assert operation.error.startswith("alpha did not come up on the new image (ComfyUI ")
    assert "last log line: this image is broken" in operation.error
    assert f"put back on the old image {old}" in operation.error
    assert "the instances after it (beta) were not touched" in operation.error
    assert f"the new image is {broken} (tag it as {tag} to retry)" in operation.error
    assert operation.error in result.err
    # alpha runs the old image again, healthy; the tag names the old image again.
    attrs = inspect(docker_engine, alpha)
    assert attrs["Image"] == old and attrs["State"]["Running"]
    assert answers(alpha)
    alpha.refresh_from_db()
    assert alpha.status == Instance.Status.HEALTHY
    assert docker_engine.images.get(tag).id == old
    # beta was never touched: the same container, still running the old image.
    attrs = inspect(docker_engine, beta)
    assert attrs["Id"] == beta_container and attrs["Image"] == old and attrs["State"]["Running"]
    assert "beta: restarting" not in operation.log


def test_instances_already_on_the_image_are_not_restarted(build, running, production_worker, docker_engine):
    build("current")
    (alpha,) = running("alpha")
    before = inspect(docker_engine, alpha)

    result = cli("update-image", "alpha", "--no-pull")

    assert result.code == 0, result.err
    assert "alpha: up to date" in result.out
    after = inspect(docker_engine, alpha)
    assert (after["Id"], after["State"]["StartedAt"]) == (before["Id"], before["State"]["StartedAt"])
    operation = last_update()
    assert "already up to date" in operation.log
    assert operation.result["restarted"] == 0
    assert operation.target_label == "alpha"  # one instance: listed on its page


def test_a_stopped_instance_is_not_started_and_takes_the_new_image_at_its_next_start(build, running,
                                                                                    production_worker,
                                                                                    docker_engine):
    old = build("old")
    alpha, beta = running("alpha", "beta")
    services.instance_stop(instance=beta)
    production_worker()
    new = build("new")

    result = cli("update-image", "--all", "--no-pull")

    assert result.code == 0, result.err
    assert "beta: next start" in result.out
    assert "beta: is stopped: it will use the new image" in last_update().log
    assert inspect(docker_engine, alpha)["Image"] == new
    attrs = inspect(docker_engine, beta)
    assert attrs["Image"] == old and not attrs["State"]["Running"]
    beta.refresh_from_db()
    assert beta.desired_state == Instance.DesiredState.STOPPED
    assert services.instance_pending_change_kinds(beta) == {"image"}


def test_an_image_that_cannot_be_pulled_restarts_nothing(build, running, tag, production_worker, docker_engine):
    # A tag of a registry that does not exist: the instance runs it from this host, and the pull fails at once.
    unreachable = f"registry.invalid/{tag}"
    build("local", as_tag=unreachable)
    (alpha,) = running("alpha", image=unreachable)
    before = inspect(docker_engine, alpha)

    result = cli("update-image", "alpha")

    assert result.code == 1
    assert f"Could not pull image {unreachable}" in result.err
    assert f"Nothing was restarted on node local for {unreachable}." in result.err
    after = inspect(docker_engine, alpha)
    assert (after["Id"], after["State"]["StartedAt"], after["Image"]) == \
        (before["Id"], before["State"]["StartedAt"], before["Image"])


@pytest.mark.parametrize("args, message", [
    ((), "Name the instances to update (update-image ID [ID ...]) or give --all."),
    (("alpha", "--all"), "or give --all, not both."),
    (("alpha", "ghost"), "No instance 'ghost'. Known: alpha"),
])
def test_it_refuses_bad_input_and_starts_nothing(args, message, db):
    services.instance_create(instance_id="alpha", image="comfyhub-test-update:any")

    result = cli("update-image", *args)

    assert result.code == 2
    assert message in result.err
    assert not Operation.objects.filter(kind="update_image").exists()


def test_it_refuses_when_there_is_no_instance_at_all(db):
    result = cli("update-image", "--all")
    assert result.code == 2 and "There are no instances to update" in result.err


def test_with_no_pull_an_image_missing_from_the_node_is_named_and_nothing_is_started(production_worker,
                                                                                     docker_engine):
    instance = services.instance_create(instance_id="alpha", image="comfyhub-test-update:never-built")
    production_worker.start()

    result = cli("update-image", "alpha", "--no-pull")

    assert result.code == 1
    assert ("The image comfyhub-test-update:never-built is not on node local, and --no-pull fetches nothing"
            in result.err)
    assert docker_engine.containers.list(all=True, filters={"name": instance.container_name}) == []
