"""The registry's safety checks, enforced by the services and, where requests race, by the database."""
import os
import socket
import threading

import pytest
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db import IntegrityError, transaction

from instances import gpus as gpu_discovery
from instances import services, signals
from instances.models import GPU, GPUAssignment, Instance, Node
from storage_app import layout
from tests.support.canary import make_canary, snapshot

pytestmark = pytest.mark.django_db(transaction=True)


def errors_of(excinfo):
    return excinfo.value.message_dict


def test_a_fresh_install_has_the_comfy_instance_on_port_8188_ready_to_start(settings):
    settings.COMFY_DEFAULT_INSTANCE = True
    settings.INSTANCE_PORT_RANGE = "8188-8387"
    Instance.objects.all().delete()
    Node.objects.all().delete()
    signals.ensure_local_node(sender=apps.get_app_config("instances"))
    comfy = Instance.objects.get()
    assert comfy.instance_id == "comfy"
    assert comfy.host_port == 8188
    assert comfy.node.name == "local"
    assert comfy.image == settings.COMFY_IMAGE
    assert [g.index for g in comfy.assigned_gpus()] == [0, 1, 2, 3]
    assert comfy.status == Instance.Status.NEW
    # Migrating again later does not bring a deleted default instance back.
    comfy.delete()
    signals.ensure_local_node(sender=apps.get_app_config("instances"))
    assert not Instance.objects.exists()


def test_the_default_instance_id_comes_from_the_environment(settings):
    settings.COMFY_DEFAULT_INSTANCE = True
    settings.COMFY_INSTANCE_ID = "studio"
    Node.objects.all().delete()
    signals.ensure_local_node(sender=apps.get_app_config("instances"))
    assert Instance.objects.get().instance_id == "studio"


@pytest.mark.postgres
def test_ports_are_allocated_from_the_range_skipping_taken_and_bound_ones():
    node = services.local_node()
    # A range of its own, away from the ports other tests' containers publish and below the kernel's ephemeral
    # range (32768 up), where another test's outgoing connection could hold a port for a moment.
    Node.objects.filter(pk=node.pk).update(port_range_start=29188, port_range_end=29199)
    first = services.instance_create(instance_id="first")
    assert first.host_port == 29188
    with socket.socket() as held:
        held.bind(("127.0.0.1", 29189))
        held.listen()
        second = services.instance_create(instance_id="second")
    assert second.host_port == 29190


@pytest.mark.parametrize("instance_id, message", [
    ("Upper", "Use lowercase letters"),
    ("-lead", "Use lowercase letters"),
    ("trail-", "Use lowercase letters"),
    ("a" * 64, "at most 63 characters"),
    ("../escape", "Use lowercase letters"),
    ("a/b", "Use lowercase letters"),
    ("", "An instance id is required."),
    ("shared", "reserved"),
    ("backups", "reserved"),
])
def test_it_refuses_a_bad_instance_id(instance_id, message):
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id=instance_id)
    assert message in " ".join(errors_of(excinfo)["instance_id"])
    assert not Instance.objects.exists()


@pytest.mark.postgres
def test_it_refuses_a_taken_id_and_a_leftover_data_folder(settings):
    services.instance_create(instance_id="taken")
    with pytest.raises(ValidationError, match="already exists; pick another id"):
        services.instance_create(instance_id="taken")
    (settings.COMFY_INSTANCES_PATH / "leftover").mkdir(parents=True)
    with pytest.raises(ValidationError, match="data kept from a deleted instance"):
        services.instance_create(instance_id="leftover")


@pytest.mark.postgres
def test_it_refuses_a_port_used_by_another_instance_or_bound_on_the_host():
    services.instance_create(instance_id="holder", host_port=18200)
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id="wanter", host_port=18200)
    assert errors_of(excinfo)["host_port"] == [
        "Port 18200 is used by instance 'holder'; pick another or leave it empty to choose one automatically."]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 18201))
        held.listen()
        with pytest.raises(ValidationError, match="already in use on this host"):
            services.instance_create(instance_id="wanter", host_port=18201)
    with pytest.raises(ValidationError, match="from 1024 to 65535"):
        services.instance_create(instance_id="wanter", host_port=80)


@pytest.mark.postgres
def test_it_refuses_a_gpu_held_exclusively_and_an_unknown_gpu():
    services.instance_create(instance_id="owner", gpu_indexes=[1])
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id="thief", gpu_indexes=[1])
    assert "held exclusively by instance 'owner'" in errors_of(excinfo)["gpus"][0]
    with pytest.raises(ValidationError, match="GPU 9 does not exist on node local"):
        services.instance_create(instance_id="thief", gpu_indexes=[9])


def test_a_shareable_gpu_may_serve_several_instances():
    GPU.objects.filter(index=2).update(shareable=True)
    services.instance_create(instance_id="one", gpu_indexes=[2])
    services.instance_create(instance_id="two", gpu_indexes=[2, 3])
    assert GPUAssignment.objects.filter(gpu__index=2).count() == 2


@pytest.mark.parametrize("args", [["--base-directory", "/x"], ["--port=1"], ["--listen"], ["--cuda-device", "1"],
                                  ["--output-directory=/tmp"], ["--base", "/x"], ["--extra-model-paths-config", "y"]])
def test_it_refuses_arguments_that_would_break_isolation(args):
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id="argy", extra_args=args)
    assert "set by ComfyHub to keep instances isolated" in errors_of(excinfo)["extra_args"][0]


def test_harmless_arguments_are_kept():
    instance = services.instance_create(instance_id="argy", extra_args=["--preview-method", "auto", "--lowvram"])
    assert instance.extra_args == ["--preview-method", "auto", "--lowvram"]


@pytest.mark.parametrize("key, message", [("NVIDIA_VISIBLE_DEVICES", "assign GPUs instead"),
                                          ("CUDA_VISIBLE_DEVICES", "assign GPUs instead"),
                                          ("COMFY_INSTANCE_ID", "COMFY_* variables")])
def test_it_refuses_environment_that_would_break_isolation(key, message):
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id="envy", extra_env={key: "all"})
    assert message in errors_of(excinfo)["extra_env"][0]


def test_env_lines_must_be_key_equals_value():
    assert services.parse_env(["A=1", "B_2=x=y"]) == {"A": "1", "B_2": "x=y"}
    for bad in (["NOEQUALS"], ["=value"], ["1A=x"], ["A B=x"]):
        with pytest.raises(ValidationError, match="is not KEY=VALUE"):
            services.parse_env(bad)


def test_gpu_selection_parses_indexes_and_none():
    assert services.parse_gpu_selection("1, 0") == [0, 1]
    assert services.parse_gpu_selection("none") == []
    with pytest.raises(ValidationError, match="GPUs are given by index"):
        services.parse_gpu_selection("first")


@pytest.mark.postgres
def test_the_database_refuses_two_instances_on_one_port_even_past_the_checks():
    node = services.local_node()
    Instance.objects.create(instance_id="a", node=node, image="i", host_port=18300)
    with pytest.raises(IntegrityError), transaction.atomic():
        Instance.objects.create(instance_id="b", node=node, image="i", host_port=18300)


@pytest.mark.postgres
def test_the_database_refuses_a_second_holder_of_an_exclusive_gpu():
    node = services.local_node()
    gpu = GPU.objects.get(node=node, index=0)
    a = Instance.objects.create(instance_id="a", node=node, image="i", host_port=18301)
    b = Instance.objects.create(instance_id="b", node=node, image="i", host_port=18302)
    GPUAssignment.objects.create(instance=a, gpu=gpu, exclusive=True)
    with pytest.raises(IntegrityError), transaction.atomic():
        GPUAssignment.objects.create(instance=b, gpu=gpu, exclusive=True)


@pytest.mark.postgres
def test_concurrent_creations_get_distinct_ports_and_one_winner_per_port():
    results, barrier = {}, threading.Barrier(4)

    def create(name, port):
        from django.db import connection

        barrier.wait()
        try:
            results[name] = services.instance_create(instance_id=name, host_port=port).host_port
        except ValidationError as exc:
            results[name] = exc.message_dict
        finally:
            connection.close()

    threads = [threading.Thread(target=create, args=(f"auto-{n}", None)) for n in range(2)]
    threads += [threading.Thread(target=create, args=(f"same-{n}", 18350)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results["auto-0"] != results["auto-1"]
    same = [results["same-0"], results["same-1"]]
    assert same.count(18350) == 1, same
    loser = next(r for r in same if r != 18350)
    assert "18350" in loser["host_port"][0]
    assert Instance.objects.filter(host_port=18350).count() == 1


def test_gpus_come_from_comfy_gpus_without_a_driver(settings):
    node = services.local_node()
    settings.COMFY_GPUS = "0,2"
    source, present = gpu_discovery.gpus_discover(node)
    assert source == "settings"
    assert [g.index for g in present] == [0, 2]
    assert set(GPU.objects.filter(node=node, present=False).values_list("index", flat=True)) == {1, 3}
    settings.COMFY_GPUS = "none"
    assert gpu_discovery.gpus_discover(node) == ("none", [])
    settings.COMFY_GPUS = "zero"
    with pytest.raises(ImproperlyConfigured, match="COMFY_GPUS='zero'"):
        gpu_discovery.gpus_discover(node)


def test_an_absent_gpu_cannot_be_assigned(settings):
    settings.COMFY_GPUS = "0"
    services.discover_gpus()
    with pytest.raises(ValidationError, match="GPU 3 does not exist"):
        services.instance_create(instance_id="late", gpu_indexes=[3])


def test_a_start_refused_for_want_of_a_queue_leaves_the_desired_state_alone(settings):
    instance = services.instance_create(instance_id="patient")
    dead = "unix:///nonexistent/redis.sock?db=0"
    settings.RQ_QUEUES = {name: {"URL": dead} for name in settings.RQ_QUEUES}
    from comfyhub.queues import QueueUnavailable

    with pytest.raises(QueueUnavailable):
        services.instance_start(instance=instance)
    instance.refresh_from_db()
    assert instance.desired_state == Instance.DesiredState.STOPPED


def test_a_display_name_longer_than_100_characters_is_refused():
    with pytest.raises(ValidationError, match="at most 100 characters"):
        services.instance_create(instance_id="named", display_name="n" * 101)


def test_a_flag_and_its_value_in_one_item_is_refused_with_how_to_split_them():
    with pytest.raises(ValidationError, match="give them as separate items"):
        services.instance_create(instance_id="squashed", extra_args=["--preview-method auto"])


def test_losing_a_port_race_while_editing_blames_the_port_not_the_id():
    node = services.local_node()
    editing = services.instance_create(instance_id="editing", host_port=18400)
    with pytest.raises(ValidationError) as excinfo:
        services._raise_for_integrity(IntegrityError("UNIQUE constraint failed"), services.InstanceFields(
            instance_id="editing"), 18401, explicit_port=True, creating=False)
    assert list(errors_of(excinfo)) == ["host_port"]
    assert editing.node == node


@pytest.mark.postgres
def test_making_a_gpu_shareable_updates_its_holders_and_exclusive_again_needs_one_holder():
    gpu = GPU.objects.get(index=2)
    services.instance_create(instance_id="first-holder", gpu_indexes=[2])
    services.gpu_set_shareable(gpu=gpu, shareable=True)
    assert not GPUAssignment.objects.get(gpu=gpu).exclusive
    services.instance_create(instance_id="second-holder", gpu_indexes=[2])
    with pytest.raises(ValidationError, match="held by first-holder, second-holder"):
        services.gpu_set_shareable(gpu=gpu, shareable=False)
    Instance.objects.get(instance_id="second-holder").delete()
    services.gpu_set_shareable(gpu=gpu, shareable=False)
    assert GPUAssignment.objects.get(gpu=gpu).exclusive
    with pytest.raises(ValidationError, match="held exclusively"):
        services.instance_create(instance_id="third-holder", gpu_indexes=[2])


def test_nvml_only_discovery_says_when_there_is_no_driver(settings):
    settings.COMFY_GPU_DISCOVERY = "nvml"
    with pytest.raises(ImproperlyConfigured, match="NVML does not answer"):
        gpu_discovery.gpus_discover(services.local_node())


def test_a_port_whose_last_connection_lingers_in_time_wait_is_free():
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))  # a port the kernel knows to be free, not one another test may hold
        port = server.getsockname()[1]
        server.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT on the port
        client.close()
    assert not services.port_bound_on_host("127.0.0.1", port)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert services.port_bound_on_host("127.0.0.1", listener.getsockname()[1])


# --- Validation without gaps (issue #10) ---------------------------------------------------------------------

BAD_IDS = ["abc\n", "abc\r\n", "abc ", " abc", "a\nb", "abc\x00"]


@pytest.mark.parametrize("instance_id", BAD_IDS)
def test_it_refuses_an_instance_id_with_a_trailing_newline_or_blank_instead_of_trimming_it(instance_id):
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id=instance_id)
    assert "Use lowercase letters a-z, digits and '-'" in errors_of(excinfo)["instance_id"][0]
    assert not Instance.objects.exists()


@pytest.mark.parametrize("name", BAD_IDS)
def test_it_refuses_a_template_name_with_a_trailing_newline(name):
    from instances.models import InstanceTemplate

    with pytest.raises(ValidationError) as excinfo:
        services.template_create(name=name)
    assert "Use lowercase letters, digits and '-' for a template name" in errors_of(excinfo)["name"][0]
    assert not InstanceTemplate.objects.exclude(name="multi-gpu").exists()


@pytest.mark.parametrize("new_instance_id", BAD_IDS)
def test_it_refuses_a_clone_id_with_a_trailing_newline(new_instance_id):
    from storage_app import services as storage_services
    from storage_app.models import Snapshot

    snapshot = Snapshot.objects.create(instance_label="origin", kind="config", archive="origin/1.tar", sha256="0")
    with pytest.raises(ValidationError) as excinfo:
        storage_services.snapshot_clone(snapshot=snapshot, new_instance_id=new_instance_id)
    assert "Use lowercase letters a-z" in errors_of(excinfo)["new_instance_id"][0]


@pytest.mark.parametrize("instance_id", BAD_IDS)
def test_it_refuses_a_legacy_instance_id_with_a_trailing_newline(instance_id, tmp_path):
    from storage_app import services as storage_services

    (tmp_path / "old" / "models").mkdir(parents=True)
    with pytest.raises(ValidationError) as excinfo:
        storage_services.legacy_plan(source=str(tmp_path / "old"), instance_id=instance_id)
    assert "Use lowercase letters a-z" in " ".join(errors_of(excinfo)["instance_id"])


@pytest.mark.parametrize("arg", ["--i", "--inp", "--input-dir", "--liste", "--port=1", "--outp", "--base=/x",
                                 "--extra=/x.yaml", "--cuda-d=1", "--default-dev", "--user-d", "--mo"])
def test_create_and_update_refuse_every_abbreviation_of_a_protected_flag(arg):
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id="abbrev", extra_args=["--preview-method", "auto", arg])
    assert "is set by ComfyHub to keep instances isolated" in errors_of(excinfo)["extra_args"][0]
    assert not Instance.objects.exists()
    instance = services.instance_create(instance_id="abbrev")
    with pytest.raises(ValidationError):
        services.instance_update(instance=instance, display_name="", description="", image="", extra_args=[arg],
                                 extra_env={}, host_port=None, gpu_indexes=[])
    instance.refresh_from_db()
    assert instance.extra_args == []


@pytest.mark.parametrize("name", ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "LD_PRELOAD", "comfy_instance_id",
                                  "Comfy_Shared_Path", "nvidia_driver_capabilities", "CUDA_MPS_PIPE_DIRECTORY"])
def test_create_refuses_the_reserved_environment_in_any_case(name):
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id="envy", extra_env={"TEAM": "a", name: "x"})
    assert errors_of(excinfo)["extra_env"][0].startswith(f"'{name}' ")
    assert not Instance.objects.exists()


@pytest.mark.parametrize("image, message", [
    ("UPPER/case", "is not a Docker image reference"),
    ("a b", "no spaces"),
    ("repo:tag:tag", "is not a Docker image reference"),
    ("example/comfyui:1\n", "no spaces"),
    ("evil.example/x:latest", "INSTANCE_IMAGES_ALLOWED permits"),
    ("comfyhub-comfyui-double-evil:test", "INSTANCE_IMAGES_ALLOWED permits"),
])
def test_create_and_update_refuse_an_image_that_is_malformed_or_not_allowed(image, message):
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id="imaged", image=image)
    assert message in errors_of(excinfo)["image"][0]
    assert not Instance.objects.exists()
    instance = services.instance_create(instance_id="imaged", image="example/comfyui:1")
    with pytest.raises(ValidationError):
        services.instance_update(instance=instance, display_name="", description="", image=image, extra_args=[],
                                 extra_env={}, host_port=None, gpu_indexes=[])
    instance.refresh_from_db()
    assert instance.image == "example/comfyui:1"


def test_the_allowed_patterns_are_named_in_the_refusal(settings):
    settings.INSTANCE_IMAGES_ALLOWED = ["ghcr.io/comfyhub/comfyui:*"]
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id="refused", image="example/comfyui:1")
    assert errors_of(excinfo)["image"] == [
        "Image 'example/comfyui:1' is not allowed on this ComfyHub: INSTANCE_IMAGES_ALLOWED permits "
        "'ghcr.io/comfyhub/comfyui:*'. Pick an image that matches, or have the administrator add a pattern to "
        "INSTANCE_IMAGES_ALLOWED."]
    assert services.instance_create(instance_id="allowed", image="ghcr.io/comfyhub/comfyui:v1").image == \
        "ghcr.io/comfyhub/comfyui:v1"


def test_a_clone_of_a_snapshot_whose_image_is_no_longer_allowed_is_refused_up_front(settings):
    from storage_app import services as storage_services
    from storage_app.models import Snapshot

    snapshot = Snapshot.objects.create(instance_label="origin", kind="config", archive="origin/1.tar", sha256="0",
                                       manifest={"instance": {"image": "evil.example/x:1"}})
    with pytest.raises(ValidationError) as excinfo:
        storage_services.snapshot_clone(snapshot=snapshot, new_instance_id="cloned")
    assert "INSTANCE_IMAGES_ALLOWED permits" in errors_of(excinfo)["snapshot"][0]


@pytest.mark.parametrize("extra_args, extra_env, field", [
    ("--lowvram", {}, "extra_args"),
    ({"--lowvram": 1}, {}, "extra_args"),
    ([], ["TEAM=a"], "extra_env"),
    ([], "TEAM=a", "extra_env"),
    ([["--lowvram"]], {}, "extra_args"),
    ([None], {}, "extra_args"),
    ([], {"TEAM": ["a"]}, "extra_env"),
    ([], {"TEAM": None}, "extra_env"),
])
def test_arguments_and_environment_of_the_wrong_shape_are_refused_not_converted(extra_args, extra_env, field):
    with pytest.raises(ValidationError) as excinfo:
        services.instance_create(instance_id="shaped", extra_args=extra_args, extra_env=extra_env)
    assert field in errors_of(excinfo)
    assert not Instance.objects.exists()


def test_numbers_in_arguments_and_environment_become_text():
    instance = services.instance_create(instance_id="numbers", extra_args=["--preview-size", 512],
                                        extra_env={"WORKERS": 4})
    assert (instance.extra_args, instance.extra_env) == (["--preview-size", "512"], {"WORKERS": "4"})


def test_purging_an_instances_data_removes_links_and_never_what_they_point_to(storage, tmp_path):
    host = make_canary(tmp_path / "host")
    before = snapshot(host)
    layout.build_instance_tree("doomed")
    root = storage["instances"] / "doomed"
    os.symlink(host, root / "custom_nodes" / "away")
    os.symlink(host / "secret.txt", root / "user" / "default" / "secret.txt")
    services.purge_instance_data("doomed", None)
    assert not os.path.lexists(root)
    assert snapshot(host) == before
