"""Multi-GPU instances and NetDist peers (instances/distribution.py): the built-in "multi-gpu" template, which host GPU
each cuda:N inside a container is, the URLs at which other instances answer from inside one, and the check from
inside. Real Docker with the ComfyUI test double (it names each device after the host GPU id it was given), real git
for ComfyUI-MultiGPU's stand-in, real RQ workers."""
import json
import urllib.request

import pytest
from django.contrib.auth.models import Permission, User
from django.core.exceptions import ValidationError
from django.core.management.sql import emit_post_migrate_signal
from django.urls import reverse

from comfyhub.models import Operation
from instances import distribution, docker_engine, selfservice, services
from instances.forms import TemplateForm
from instances.models import GPU, Cluster, ClusterWorker, Instance, InstanceTemplate, Node
from tests.support.gitrepos import make_node_repo

pytestmark = pytest.mark.django_db(transaction=True)

UUIDS = {1: "GPU-11111111-2222-3333-4444-000000000001", 3: "GPU-11111111-2222-3333-4444-000000000003"}


def started(instance, run_worker):
    operation = services.instance_start(instance=instance)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log
    instance.refresh_from_db()
    return instance


def system_stats(instance):
    with urllib.request.urlopen(f"{instance.url}system_stats", timeout=5) as answer:
        return json.loads(answer.read())


def container_environment(instance) -> dict:
    engine = docker_engine.require_engine()
    try:
        pairs = engine.api.inspect_container(instance.container_name)["Config"]["Env"]
    finally:
        engine.close()
    return dict(pair.split("=", 1) for pair in pairs)


def panel(client, instance):
    return client.get(reverse("instance-distribution", args=[instance.instance_id])).content.decode()


def row(html, marker):
    return html.split(marker, 1)[1].split("</tr>", 1)[0]


def migrate_again():
    """What every `manage.py migrate` does after migrating (serve runs it at each start)."""
    emit_post_migrate_signal(verbosity=0, interactive=False, db="default")


# --- GPUs inside the container ---------------------------------------------------------------------------------

@pytest.mark.docker
def test_an_instance_on_gpus_1_and_3_sees_two_gpus_and_the_page_maps_cuda_0_to_gpu_1_and_cuda_1_to_gpu_3(
        comfyui_double_image, docker_cleanup, run_worker, client, operator):
    for index, uuid in UUIDS.items():
        GPU.objects.filter(node__name="local", index=index).update(uuid=uuid, name=f"Test card {index}")
    instance = services.instance_create(instance_id="spread", image=comfyui_double_image, gpu_indexes=[3, 1])
    started(instance, run_worker)

    devices = system_stats(instance)["devices"]
    # The double names each device after the host GPU id Docker gave the container, in the order CUDA numbers them.
    assert [d["name"] for d in devices] == [f"cuda:0 host GPU {UUIDS[1]} : test double",
                                            f"cuda:1 host GPU {UUIDS[3]} : test double"]
    assert container_environment(instance).get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    assert distribution.gpu_map(instance) == [
        {"cuda": "cuda:0", "index": 1, "uuid": UUIDS[1], "name": "Test card 1"},
        {"cuda": "cuda:1", "index": 3, "uuid": UUIDS[3], "name": "Test card 3"}]

    client.force_login(operator)
    page = client.get(instance.get_absolute_url()).content.decode()
    assert f'hx-get="{reverse("instance-distribution", args=["spread"])}"' in page
    shown = panel(client, instance)
    first, second = row(shown, 'data-cuda="cuda:0"'), row(shown, 'data-cuda="cuda:1"')
    assert "GPU 1<" in first and UUIDS[1] in first and "Test card 1" in first
    assert "GPU 3<" in second and UUIDS[3] in second and "Test card 3" in second


def test_a_cpu_instance_shows_no_gpu_map(client, stranger):
    instance = services.instance_create(instance_id="sketch")
    client.force_login(stranger)
    shown = panel(client, instance)
    assert distribution.gpu_map(instance) == []
    assert "No GPUs: it runs on the CPU." in shown and 'data-testid="gpu-map"' not in shown


# --- The multi-gpu template ------------------------------------------------------------------------------------

def test_the_multi_gpu_template_exists_after_migrate_with_comfyui_multigpu_at_its_pinned_ref(settings):
    template = InstanceTemplate.objects.get(name="multi-gpu")
    assert template.custom_nodes == [{"url": settings.MULTIGPU_NODE_URL, "ref": settings.MULTIGPU_NODE_REF}]
    assert (template.gpu_count, template.min_gpus) == (2, 2)
    assert "ComfyUI-MultiGPU" in template.description and "cuda:N" in template.description


def test_an_operators_edits_of_the_multi_gpu_template_survive_the_next_migrate_and_a_deleted_one_comes_back():
    template = InstanceTemplate.objects.get(name="multi-gpu")
    services.template_update(template=template, description="Ours now", gpu_count=4, min_gpus=3,
                             custom_nodes=template.custom_nodes, image="example/comfyui:2")
    migrate_again()
    kept = InstanceTemplate.objects.get(name="multi-gpu")
    assert (kept.description, kept.gpu_count, kept.min_gpus, kept.image) == ("Ours now", 4, 3, "example/comfyui:2")

    kept.delete()
    migrate_again()
    assert InstanceTemplate.objects.get(name="multi-gpu").min_gpus == 2


def test_the_multi_gpu_template_refuses_an_instance_with_one_gpu():
    template = InstanceTemplate.objects.get(name="multi-gpu")
    with pytest.raises(ValidationError) as refused:
        services.instance_create_from_template(template=template, instance_id="lonely", gpu_indexes=[0])
    assert refused.value.message_dict == {"gpus": [
        "Template 'multi-gpu' needs at least 2 GPUs per instance; this one would get 1. Give it 2 or more GPUs, or "
        "pick another template."]}
    assert not Instance.objects.filter(instance_id="lonely").exists()


@pytest.mark.parametrize("gpu_count, min_gpus, field, message", [
    (1, 2, "min_gpus", "Instances made from it get 1 GPU(s) (the GPU count) but need at least 2"),
    (0, 2, "min_gpus", "raise the GPU count to 2 or more, or lower the minimum"),
    (2, -1, "min_gpus", "Give a whole number of GPUs from 0 to 32767."),
    (2, True, "min_gpus", "Give a whole number of GPUs from 0 to 32767."),
])
def test_a_template_whose_minimum_exceeds_its_gpu_count_is_refused(gpu_count, min_gpus, field, message):
    with pytest.raises(ValidationError) as refused:
        services.template_create(name="lopsided", gpu_count=gpu_count, min_gpus=min_gpus)
    assert message in " ".join(refused.value.message_dict[field])
    assert not InstanceTemplate.objects.filter(name="lopsided").exists()
    template = InstanceTemplate.objects.get(name="multi-gpu")
    with pytest.raises(ValidationError, match="GPU"):
        services.template_update(template=template, gpu_count=gpu_count, min_gpus=min_gpus,
                                 custom_nodes=template.custom_nodes)
    assert InstanceTemplate.objects.get(name="multi-gpu").gpu_count == 2


def test_lowering_the_multi_gpu_templates_gpu_count_below_its_minimum_is_refused_even_without_naming_the_minimum():
    template = InstanceTemplate.objects.get(name="multi-gpu")
    with pytest.raises(ValidationError, match="need at least 2"):
        services.template_update(template=template, gpu_count=1, custom_nodes=template.custom_nodes)


def test_the_template_form_puts_the_minimum_next_to_its_field_and_passes_it_on():
    form = TemplateForm({"name": "duo", "gpu_count": "1", "min_gpus": "2"})
    assert not form.is_valid()
    assert "but need at least 2" in " ".join(form.errors["min_gpus"])
    form = TemplateForm({"name": "duo", "gpu_count": "2", "min_gpus": ""})
    assert form.is_valid(), form.errors
    assert form.arguments()["min_gpus"] == 0
    form = TemplateForm({"name": "duo", "gpu_count": "3", "min_gpus": "2"})
    assert form.is_valid(), form.errors
    assert services.template_create(**form.arguments()).min_gpus == 2


def test_the_new_template_page_refuses_a_minimum_above_the_gpu_count(client, operator):
    client.force_login(operator)
    response = client.post(reverse("template-create"), {"name": "duo", "gpu_count": "1", "min_gpus": "3"})
    assert response.status_code in (200, 400)
    assert "but need at least 3" in " ".join(response.context["form"].errors["min_gpus"])
    assert not InstanceTemplate.objects.filter(name="duo").exists()


def test_self_service_refuses_a_template_below_its_own_minimum_on_the_template_field():
    olive = User.objects.create_user("olive", password="olive-password-1")
    olive.user_permissions.add(Permission.objects.get(codename="create_own_instance"))
    # Made before minimums were checked: one GPU per instance, two needed.
    template = services.template_create(name="old-multi", gpu_count=1, self_service=True)
    InstanceTemplate.objects.filter(pk=template.pk).update(min_gpus=2)
    template.refresh_from_db()
    with pytest.raises(ValidationError) as refused:
        selfservice.instance_create_own(user=olive, template=template, instance_id="mine")
    assert "Template 'old-multi' needs at least 2 GPUs per instance; this one would get 1." in \
        refused.value.message_dict["template"][0]
    assert not Instance.objects.filter(instance_id="mine").exists()


@pytest.mark.docker
def test_an_instance_from_the_multi_gpu_template_gets_comfyui_multigpu_installed(settings, tmp_path, node_git,
                                                                                 run_worker):
    url, commits = make_node_repo(tmp_path / "repos", name="ComfyUI-MultiGPU",
                                  files={"__init__.py": "NODE_CLASS_MAPPINGS = {}\n"})
    settings.MULTIGPU_NODE_URL, settings.MULTIGPU_NODE_REF = url, commits["v1"]
    InstanceTemplate.objects.filter(name="multi-gpu").delete()
    migrate_again()  # made again from the settings of this install
    template = InstanceTemplate.objects.get(name="multi-gpu")
    assert template.custom_nodes == [{"url": url, "ref": commits["v1"]}]

    instance, operation = services.instance_create_from_template(template=template, instance_id="spread")
    assert len(instance.assigned_gpus()) == 2
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log
    assert operation.result["failed_nodes"] == []
    node = instance.custom_nodes.get()
    assert (node.name, node.commit) == ("ComfyUI-MultiGPU", commits["v1"])
    assert (settings.COMFY_INSTANCES_PATH / "spread" / "custom_nodes" / "ComfyUI-MultiGPU" / "__init__.py").is_file()


# --- NetDist peers ---------------------------------------------------------------------------------------------

@pytest.fixture
def far_node(db):
    """Another node whose address containers reach (a documentation address: listed, never asked here)."""
    return Node.objects.create(name="far", bind_address="198.51.100.7", approved=True)


def test_netdist_peers_are_listed_with_their_urls_or_why_they_have_none(far_node, settings):
    alpha = services.instance_create(instance_id="alpha")
    beta = services.instance_create(instance_id="beta")
    gamma = services.instance_create(instance_id="gamma", node=far_node)
    loop = Node.objects.create(name="loop", bind_address="127.0.0.2", approved=True)
    services.instance_create(instance_id="delta", node=loop)
    wild = Node.objects.create(name="wild", bind_address="0.0.0.0", approved=True)
    services.instance_create(instance_id="omega", node=wild)

    peers = {peer["instance"].instance_id: peer for peer in distribution.netdist_peers(alpha)}

    assert set(peers) == {"beta", "gamma", "delta", "omega"}
    assert peers["gamma"]["url"] == f"http://198.51.100.7:{gamma.host_port}/"
    assert peers["beta"]["url"] is None
    assert peers["beta"]["how"] == (
        "only on node local's loopback (127.0.0.1), which no container reaches: set its bind address (the admin's "
        "Nodes) to an address containers reach, or put alpha and beta in a cluster (they then reach each other over "
        "its network).")
    assert peers["delta"]["url"] is None and "only on node loop's loopback (127.0.0.2)" in peers["delta"]["how"]
    assert "NODE_ADDRESS" in peers["delta"]["how"] and "cluster" not in peers["delta"]["how"]
    assert peers["omega"]["url"] is None and "every address of node wild (0.0.0.0)" in peers["omega"]["how"]
    assert "alpha" not in peers  # not its own peer


def test_a_fellow_cluster_member_on_the_same_node_is_reached_by_container_name(far_node, settings, client, operator):
    alpha = services.instance_create(instance_id="alpha")
    beta = services.instance_create(instance_id="beta")
    gamma = services.instance_create(instance_id="gamma")
    cluster = Cluster.objects.create(name="duo", master=alpha)
    ClusterWorker.objects.create(cluster=cluster, instance=beta)

    peers = {peer["instance"].instance_id: peer for peer in distribution.netdist_peers(alpha)}
    assert peers["beta"]["url"] == f"http://{settings.CONTAINER_NAME_PREFIX}beta:8188/"
    assert "over cluster duo's network" in peers["beta"]["how"]
    assert peers["gamma"]["url"] is None  # not in the cluster

    client.force_login(operator)
    line = panel(client, beta).split('data-testid="instance-cluster"', 1)[1].split("</p>", 1)[0]
    assert "duo" in line and "worker" in line
    assert f'href="{reverse("cluster-detail", args=["duo"])}"' in line
    assert "master" in panel(client, alpha).split('data-testid="instance-cluster"', 1)[1].split("</p>", 1)[0]
    assert 'data-testid="instance-cluster"' not in panel(client, gamma)


def test_the_panel_lists_peer_urls_to_those_who_may_operate_and_only_peers_they_may_use(far_node, client, operator,
                                                                                       stranger):
    alpha = services.instance_create(instance_id="alpha")
    gamma = services.instance_create(instance_id="gamma", node=far_node)
    private = services.instance_create(instance_id="private", node=far_node)
    olive = User.objects.create_user("olive", password="olive-password-1")
    olive.user_permissions.add(Permission.objects.get(codename="create_own_instance"))
    Instance.objects.filter(pk__in=[alpha.pk, gamma.pk]).update(owner=olive)

    client.force_login(operator)
    shown = panel(client, alpha)
    assert f"http://198.51.100.7:{gamma.host_port}/" in row(shown, 'data-peer="gamma"')
    assert 'data-peer="private"' in shown and "Check from inside" in shown

    client.force_login(olive)  # owns alpha and gamma, may not use private
    shown = panel(client, alpha)
    assert 'data-peer="gamma"' in shown and 'data-peer="private"' not in shown and private.instance_id not in shown

    client.force_login(stranger)
    shown = panel(client, alpha)
    assert "198.51.100.7" not in shown and "Check from inside" not in shown
    assert "Shown to those who may start and stop this instance" in shown
    response = client.post(reverse("instance-netdist-check", args=["alpha"]))
    assert response.status_code == 403
    assert not Operation.objects.filter(kind=distribution.NETDIST_CHECK).exists()


def test_a_check_without_any_peer_url_is_refused_with_the_reason(client, operator):
    alpha = services.instance_create(instance_id="alpha")
    services.instance_create(instance_id="beta")
    with pytest.raises(ValidationError, match="No peer of 'alpha' has a URL to check"):
        distribution.netdist_check(instance=alpha)
    client.force_login(operator)
    assert "Check from inside" not in panel(client, alpha)  # nothing to check: no button
    response = client.post(reverse("instance-netdist-check", args=["alpha"]), follow=True)
    assert "Not checked: No peer of &#x27;alpha&#x27; has a URL to check" in response.content.decode()
    assert client.get(reverse("instance-netdist-check", args=["alpha"])).status_code == 405
    assert not Operation.objects.filter(kind=distribution.NETDIST_CHECK).exists()


def bridge_gateway(docker_engine) -> str:
    """The address of the engine's default bridge on this host: ports published there are reached from inside
    containers (and from here), unlike loopback."""
    return docker_engine.networks.get("bridge").attrs["IPAM"]["Config"][0]["Gateway"]


@pytest.mark.docker
def test_the_check_from_inside_says_which_peer_urls_answer(comfyui_double_image, docker_cleanup, docker_engine,
                                                           run_worker, client, operator):
    Node.objects.filter(name="local").update(bind_address=bridge_gateway(docker_engine))
    alpha = started(services.instance_create(instance_id="alpha", image=comfyui_double_image), run_worker)
    beta = started(services.instance_create(instance_id="beta", image=comfyui_double_image), run_worker)
    gamma = services.instance_create(instance_id="gamma", image=comfyui_double_image)  # never started: no answer

    client.force_login(operator)
    response = client.post(reverse("instance-netdist-check", args=["alpha"]))
    assert response.status_code == 302 and response["Location"] == alpha.get_absolute_url() + "#distribution"
    check = distribution.netdist_last_check(alpha)
    assert check.status == Operation.Status.QUEUED and check.requested_by == operator
    assert 'hx-trigger="every 2s"' in panel(client, alpha)  # the panel follows the check while it runs
    run_worker()
    check.refresh_from_db()

    assert check.status == Operation.Status.SUCCEEDED, check.error + check.log
    found = {result["instance"]: result for result in check.result["peers"]}
    gateway = Node.objects.get(name="local").bind_address
    assert found["beta"]["url"] == f"http://{gateway}:{beta.host_port}/"
    assert (found["beta"]["ok"], found["beta"]["detail"]) == (True, "HTTP 200")
    assert found["gamma"]["url"] == f"http://{gateway}:{gamma.host_port}/"
    assert found["gamma"]["ok"] is False and "refused" in found["gamma"]["detail"].lower()
    assert (check.result["checked"], check.result["reachable"]) == (2, 1)

    shown = panel(client, alpha)
    assert 'data-ok="true"' in row(shown.split('data-testid="netdist-check-results"', 1)[1], 'data-peer="beta"')
    assert 'data-ok="false"' in row(shown.split('data-testid="netdist-check-results"', 1)[1], 'data-peer="gamma"')
    assert 'hx-trigger="every 2s"' not in shown


# --- In a real browser -------------------------------------------------------------------------------------------

@pytest.mark.browser
def test_in_the_browser_the_instance_page_loads_its_gpu_map_and_netdist_peers(logged_in_page, admin_user, live_server,
                                                                               far_node):
    from playwright.sync_api import expect

    for index, uuid in UUIDS.items():
        GPU.objects.filter(node__name="local", index=index).update(uuid=uuid)
    services.instance_create(instance_id="spread", gpu_indexes=[1, 3])
    gamma = services.instance_create(instance_id="gamma", node=far_node)

    page = logged_in_page()
    page.goto(f"{live_server.url}/instances/spread/")
    gpus = page.get_by_test_id("gpu-map")  # htmx fetched the panel after the page was shown
    expect(gpus.locator("tr[data-cuda='cuda:0'] td")).to_have_text(["cuda:0", "GPU 1", UUIDS[1],
                                                                     "GPU 1 (declared in COMFY_GPUS)"])
    expect(gpus.locator("tr[data-cuda='cuda:1'] td")).to_have_text(["cuda:1", "GPU 3", UUIDS[3],
                                                                     "GPU 3 (declared in COMFY_GPUS)"])
    expect(page.get_by_test_id("netdist-peers").locator("tr[data-peer='gamma']")).to_contain_text(
        f"http://198.51.100.7:{gamma.host_port}/")
