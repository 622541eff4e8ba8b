"""The Docker adapter's exec and network functions, against the real engine."""
import pytest

from instances import docker_engine as adapter
from tests.support.docker_fixtures import session_label
from tests.support.images import BASE_TAG

pytestmark = [pytest.mark.docker, pytest.mark.usefixtures("comfyui_double_image")]  # builds the base image too


def sleeper(client, name, network="bridge"):
    return client.containers.run(BASE_TAG, ["sleep", "300"], name=name, detach=True, labels=session_label(),
                                 network=network)


def test_two_containers_on_a_comfyhub_network_reach_each_other_by_name(docker_engine):
    labels = {**session_label(), "comfyhub.cluster": "c1"}
    network_id = adapter.ensure_network(docker_engine, "chub-test-net", labels)
    assert network_id == adapter.ensure_network(docker_engine, "chub-test-net", labels)  # found, not made again
    sleeper(docker_engine, "chub-test-a")
    sleeper(docker_engine, "chub-test-b")
    for name in ("chub-test-a", "chub-test-b"):
        adapter.connect_network(docker_engine, "chub-test-net", name)
    adapter.connect_network(docker_engine, "chub-test-net", "chub-test-a")  # twice: no error
    assert set(adapter.network_members(docker_engine, "chub-test-net")) == {"chub-test-a", "chub-test-b"}

    found = adapter.exec_in(docker_engine, "chub-test-a", ["getent", "hosts", "chub-test-b"])
    assert found.exit_code == 0 and found.output.split()[1] == "chub-test-b"

    adapter.disconnect_network(docker_engine, "chub-test-net", "chub-test-b")
    adapter.disconnect_network(docker_engine, "chub-test-net", "chub-test-b")  # twice: no error
    assert adapter.exec_in(docker_engine, "chub-test-a", ["getent", "hosts", "chub-test-b"]).exit_code != 0


def test_a_network_of_that_name_that_is_not_comfyhubs_is_refused(docker_engine):
    docker_engine.networks.create("chub-test-theirs", labels=session_label())
    with pytest.raises(adapter.EngineError, match="exists and is not ComfyHub's"):
        adapter.ensure_network(docker_engine, "chub-test-theirs",
                                              {**session_label(), "comfyhub.cluster": "c1"})
    adapter.remove_network(docker_engine, "chub-test-theirs")
    adapter.remove_network(docker_engine, "chub-test-theirs")  # gone: no error
    assert adapter.network_members(docker_engine, "chub-test-theirs") is None


def test_two_networks_of_one_name_made_at_once_are_left_as_one_that_containers_start_on(docker_engine):
    # What Docker's best-effort duplicate check lets through when workers make the network at the same moment.
    labels = {**session_label(), "comfyhub.cluster": "c1"}
    made = sorted(docker_engine.api.create_network("chub-test-twice", driver="bridge", labels=labels)["Id"]
                  for _ in range(2))
    kept = adapter.ensure_network(docker_engine, "chub-test-twice", labels)
    assert kept == made[0]
    assert [network.id for network in docker_engine.networks.list(names=["chub-test-twice"])] == [kept]
    assert adapter.ensure_network(docker_engine, "chub-test-twice", labels) == kept  # every caller keeps that one
    sleeper(docker_engine, "chub-test-on-it", network="chub-test-twice").reload()  # not "ambiguous": it starts
    assert set(adapter.network_members(docker_engine, "chub-test-twice")) == {"chub-test-on-it"}


def test_exec_output_from_inside_is_cut_at_the_limit_and_the_exit_code_kept(docker_engine):
    sleeper(docker_engine, "chub-test-noisy")
    result = adapter.exec_in(docker_engine, "chub-test-noisy",
                                            ["sh", "-c", "head -c 200000 /dev/zero | tr '\\0' x; exit 4"],
                                            max_output=1000)
    assert result.exit_code == 4 and result.output == "x" * 1000


def test_a_command_that_never_ends_is_left_after_the_deadline(docker_engine):
    sleeper(docker_engine, "chub-test-stuck")
    result = adapter.exec_in(docker_engine, "chub-test-stuck", ["sh", "-c", "echo started; sleep 600"], timeout=2)
    assert (result.exit_code, result.timed_out, result.output) == (-1, True, "started\n")
