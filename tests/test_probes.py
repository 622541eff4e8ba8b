"""Probes from inside an instance's container: what answers there, not what answers on the host."""
import pytest

from instances import probes, services
from tests.support.running import started

pytestmark = [pytest.mark.docker, pytest.mark.django_db(transaction=True)]


def test_the_probe_sees_from_inside_the_container_not_from_the_host(comfyui_double_image, docker_cleanup, run_worker):
    alpha = started(services.instance_create(instance_id="alpha", image=comfyui_double_image), run_worker)
    beta = started(services.instance_create(instance_id="beta", image=comfyui_double_image), run_worker)
    own = "http://127.0.0.1:8188/system_stats"  # alpha's own ComfyUI, inside alpha
    beta_on_host = f"http://127.0.0.1:{beta.host_port}/system_stats"  # answers on the host, not inside alpha
    missing = "http://127.0.0.1:8188/no-such-page"

    found = {reach.url: reach for reach in probes.reach_from_inside(alpha, [own, beta_on_host, missing, own])}

    assert list(found) == [own, beta_on_host, missing]
    assert found[own].ok and found[own].detail == "HTTP 200"
    assert not found[beta_on_host].ok and "refused" in found[beta_on_host].detail.lower()
    assert not found[missing].ok and "404" in found[missing].detail


def test_a_stopped_instance_is_probed_as_not_running(comfyui_double_image, docker_cleanup):
    gamma = services.instance_create(instance_id="gamma", image=comfyui_double_image)
    (reach,) = probes.reach_from_inside(gamma, ["http://127.0.0.1:8188/system_stats"])
    assert (reach.ok, reach.detail) == (False, "gamma is not running")


@pytest.mark.parametrize("output", ['{"http://x/": [true, 3]}', "not json", '["http://x/"]', '{"http://x/": true}'])
def test_a_probe_answer_of_the_wrong_shape_is_not_believed(output):
    answers = probes._answers(output)
    assert answers is None or "http://x/" not in answers
