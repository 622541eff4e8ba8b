"""The create and edit forms: what a person types reaches the services, and every refusal lands next to its field."""
import html
import socket

import pytest
from django.urls import reverse

from comfyhub.models import Operation
from instances import runtime, services
from instances.forms import InstanceForm, args_to_text
from instances.models import GPU, Instance
from tests import testenv

pytestmark = pytest.mark.django_db

CREATE = reverse("instance-create")


def create_data(**fields):
    data = {"instance_id": "formed", "display_name": "", "description": "", "image": "example/comfyui:1",
            "extra_args": "", "extra_env": "", "host_port": "", "gpus": []}
    data.update(fields)
    return data


def edit_data(instance, **fields):
    data = {"display_name": instance.display_name, "description": instance.description, "image": instance.image,
            "extra_args": args_to_text(instance.extra_args), "extra_env": "", "host_port": str(instance.host_port),
            "gpus": [str(gpu.index) for gpu in instance.assigned_gpus()]}
    data.update(fields)
    return data


def assert_refused(response, field, message):
    """The form came back (nothing was redirected), with `message` on `field`, shown next to that field."""
    assert response.status_code == 200, response.get("Location")
    errors = response.context["form"].errors.get(field, [])
    assert any(message in error for error in errors), f"{field}: {errors} (all: {response.context['form'].errors})"
    page = html.unescape(response.content.decode())
    shown = page.split(f'data-testid="error-{field}"', 1)
    assert len(shown) == 2 and message in shown[1].split("</ul>", 1)[0], f"{message!r} is not shown next to {field}"


@pytest.fixture
def held_gpu_1(db):
    return services.instance_create(instance_id="holder", image="example/comfyui:1", gpu_indexes=[1])


@pytest.fixture
def open_socket():
    """A port bound and listened on by this test, as another program on the host would."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


# --- Create --------------------------------------------------------------------------------------------------

def test_an_operator_creates_an_instance_with_gpus_and_its_directories_are_queued(client, operator):
    client.force_login(operator)
    response = client.post(CREATE, create_data(
        instance_id="painter", display_name="Painter", extra_args="--preview-method auto\n--lowvram",
        extra_env="TEAM=vision\nHF_HOME=/instance/hf", gpus=["1", "2"],
    ), follow=True)
    instance = Instance.objects.get(instance_id="painter")
    assert response.redirect_chain[-1][0] == instance.get_absolute_url()
    assert [gpu.index for gpu in instance.assigned_gpus()] == [1, 2]
    assert instance.extra_args == ["--preview-method", "auto", "--lowvram"]
    assert instance.extra_env == {"TEAM": "vision", "HF_HOME": "/instance/hf"}
    assert instance.display_name == "Painter" and instance.created_by == operator
    assert testenv.PORT_RANGE[0] <= instance.host_port <= testenv.PORT_RANGE[1]
    build = Operation.objects.get()
    assert build.kind == "instance_build" and build.target_id == str(instance.pk) and build.requested_by == operator
    assert "Instance &#x27;painter&#x27; created" in response.content.decode()


def test_the_new_form_offers_the_default_image_and_every_present_gpu_with_its_holder(client, operator, held_gpu_1):
    GPU.objects.filter(index=3).update(present=False)
    GPU.objects.filter(index=0).update(name="NVIDIA H200", memory_total=141 * 1024**3)
    client.force_login(operator)
    response = client.get(CREATE)
    form = response.context["form"]
    assert form["image"].value() == services.settings.COMFY_IMAGE
    assert [gpu.index for gpu in form.gpu_list] == [0, 1, 2]
    page = response.content.decode()
    assert "NVIDIA H200" in page and "141.0\xa0GB" in page
    holder_row = page.split('value="1"', 1)[1].split("</label>", 1)[0]
    assert 'href="/instances/holder/"' in holder_row


def test_no_gpu_checked_means_cpu_mode(client, operator):
    client.force_login(operator)
    client.post(CREATE, create_data(instance_id="cpu-box"))
    assert Instance.objects.get(instance_id="cpu-box").cpu_only


def test_an_empty_port_picks_a_free_one_and_a_given_one_is_kept(client, operator):
    client.force_login(operator)
    client.post(CREATE, create_data(instance_id="port-auto"))
    client.post(CREATE, create_data(instance_id="port-given", host_port="18300"))
    assert testenv.PORT_RANGE[0] <= Instance.objects.get(instance_id="port-auto").host_port <= testenv.PORT_RANGE[1]
    assert Instance.objects.get(instance_id="port-given").host_port == 18300


@pytest.mark.parametrize("instance_id, message", [
    ("Alpha", "Use lowercase letters a-z"),
    ("-alpha", "starting and ending with a letter or digit"),
    ("a" * 64, "at most 63 characters"),
    ("..", "Use lowercase letters a-z"),
    ("a/b", "Use lowercase letters a-z"),
    ("shared", "'shared' is reserved"),
    ("", "An instance id is required."),
])
def test_it_refuses_a_bad_instance_id(client, operator, instance_id, message):
    client.force_login(operator)
    assert_refused(client.post(CREATE, create_data(instance_id=instance_id)), "instance_id", message)
    assert not Instance.objects.exists()
    assert not Operation.objects.exists()


def test_it_refuses_a_taken_id(client, operator):
    services.instance_create(instance_id="taken", image="example/comfyui:1")
    client.force_login(operator)
    assert_refused(client.post(CREATE, create_data(instance_id="taken")), "instance_id",
                   "An instance 'taken' already exists")
    assert Instance.objects.count() == 1


def test_it_refuses_pages_of_pasted_arguments_before_splitting_them(client, operator):
    client.force_login(operator)
    response = client.post(CREATE, create_data(extra_args="--verbose " + "x" * (1 << 20)))
    assert_refused(response, "extra_args", "at most 16384 characters")
    assert not Instance.objects.exists()


def test_it_refuses_a_port_another_instance_uses(client, operator):
    other = services.instance_create(instance_id="port-owner", image="example/comfyui:1")
    client.force_login(operator)
    response = client.post(CREATE, create_data(host_port=str(other.host_port)))
    assert_refused(response, "host_port", f"Port {other.host_port} is used by instance 'port-owner'")
    assert not Instance.objects.filter(instance_id="formed").exists()


def test_it_refuses_a_port_a_program_on_the_host_listens_on(client, operator, open_socket):
    client.force_login(operator)
    response = client.post(CREATE, create_data(host_port=str(open_socket)))
    assert_refused(response, "host_port", f"Port {open_socket} is already in use on this host")
    assert not Instance.objects.exists()


@pytest.mark.parametrize("port, message", [
    ("80", "Ports go from 1024 to 65535"),
    ("70000", "Ports go from 1024 to 65535"),
    ("eighty", "Enter a whole number."),
])
def test_it_refuses_a_port_out_of_range(client, operator, port, message):
    client.force_login(operator)
    assert_refused(client.post(CREATE, create_data(host_port=port)), "host_port", message)
    assert not Instance.objects.exists()


def test_it_refuses_a_gpu_another_instance_holds_exclusively(client, operator, held_gpu_1):
    client.force_login(operator)
    response = client.post(CREATE, create_data(gpus=["0", "1"]))
    assert_refused(response, "gpus", "GPU 1 is held exclusively by instance 'holder'")
    assert not Instance.objects.filter(instance_id="formed").exists()
    assert [a.instance.instance_id for a in GPU.objects.get(index=1).assignments.all()] == ["holder"]


@pytest.mark.parametrize("gpus, message", [
    (["7"], "GPU 7 does not exist on node local (GPUs: 0, 1, 2, 3)"),
    (["x"], "GPUs are given by index"),
])
def test_it_refuses_an_unknown_gpu(client, operator, gpus, message):
    client.force_login(operator)
    assert_refused(client.post(CREATE, create_data(gpus=gpus)), "gpus", message)
    assert not Instance.objects.exists()


@pytest.mark.parametrize("line, flag", [
    ("--base-directory /x", "--base-directory"),
    ("--port=1", "--port"),
    ("--listen", "--listen"),
    ("--output-directory=/tmp", "--output-directory"),
    ("--base /x", "--base"),
])
def test_it_refuses_arguments_that_would_break_isolation(client, operator, line, flag):
    client.force_login(operator)
    response = client.post(CREATE, create_data(extra_args=f"--preview-method auto\n{line}"))
    assert_refused(response, "extra_args", f"'{flag}' is set by ComfyHub to keep instances isolated")
    assert not Instance.objects.exists()


def test_it_refuses_an_argument_line_with_an_open_quote(client, operator):
    client.force_login(operator)
    response = client.post(CREATE, create_data(extra_args="--preview-method 'auto"))
    assert_refused(response, "extra_args", "Line 1 (--preview-method 'auto): No closing quotation")
    assert not Instance.objects.exists()


@pytest.mark.parametrize("line, message", [
    ("NVIDIA_VISIBLE_DEVICES=all", "'NVIDIA_VISIBLE_DEVICES' is set by ComfyHub from the instance's assigned GPUs"),
    ("CUDA_VISIBLE_DEVICES=0", "'CUDA_VISIBLE_DEVICES' is set by ComfyHub from the instance's assigned GPUs"),
    ("COMFY_INSTANCE_ID=x", "'COMFY_INSTANCE_ID' is reserved"),
    ("JUST_A_WORD", "'JUST_A_WORD' is not KEY=VALUE"),
    ("1ST=x", "'1ST=x' is not KEY=VALUE"),
    ("MY-KEY=x", "'MY-KEY=x' is not KEY=VALUE"),
])
def test_it_refuses_reserved_or_malformed_environment(client, operator, line, message):
    client.force_login(operator)
    response = client.post(CREATE, create_data(extra_env=f"TEAM=vision\n{line}"))
    assert_refused(response, "extra_env", message)
    assert not Instance.objects.exists()


def test_it_refuses_an_image_name_with_spaces(client, operator):
    client.force_login(operator)
    response = client.post(CREATE, create_data(image="my image:1"))
    assert_refused(response, "image", "Give an image name such as 'repository/comfyui:tag'")
    assert not Instance.objects.exists()


def test_an_empty_image_means_the_default_image(client, operator):
    client.force_login(operator)
    client.post(CREATE, create_data(instance_id="defaulted", image=""))
    assert Instance.objects.get(instance_id="defaulted").image == services.settings.COMFY_IMAGE


def test_it_refuses_a_display_name_longer_than_the_registry_keeps(client, operator):
    client.force_login(operator)
    response = client.post(CREATE, create_data(display_name="x" * 101))
    assert_refused(response, "display_name", "at most 100 characters")
    assert not Instance.objects.exists()


def test_several_bad_fields_are_all_reported_at_once(client, operator, held_gpu_1):
    client.force_login(operator)
    response = client.post(CREATE, create_data(
        instance_id="Bad", host_port="80", gpus=["1"], extra_args="--listen", extra_env="CUDA_VISIBLE_DEVICES=0"))
    form = response.context["form"]
    assert set(form.errors) == {"instance_id", "host_port", "gpus", "extra_args", "extra_env"}
    assert Instance.objects.count() == 1


@pytest.mark.parametrize("instance_id", ["formed\n", "formed\r\n", " formed", "formed "])
def test_it_refuses_an_id_with_a_trailing_newline_or_blank_rather_than_trimming_it(client, operator, instance_id):
    client.force_login(operator)
    response = client.post(CREATE, create_data(instance_id=instance_id))
    assert_refused(response, "instance_id", "(e.g. 'formed')")
    assert not Instance.objects.exists()


@pytest.mark.parametrize("line, flag", [
    ("--i /x", "--input-directory"), ("--inp /x", "--input-directory"), ("--input-dir=/x", "--input-directory"),
    ("--liste", "--listen"), ("--po 1", "--port"), ("--outp /x", "--output-directory"),
    ("--extra=/x.yaml", "--extra-model-paths-config"), ("--cuda-d 1", "--cuda-device"),
])
def test_it_refuses_abbreviations_comfyui_reads_as_a_protected_flag(client, operator, line, flag):
    client.force_login(operator)
    response = client.post(CREATE, create_data(extra_args=f"--preview-method auto\n{line}"))
    assert_refused(response, "extra_args", f"ComfyUI takes it for {flag}")
    assert not Instance.objects.exists()


@pytest.mark.parametrize("line, message", [
    ("LD_PRELOAD=/x.so", "'LD_PRELOAD' is refused: LD_* variables"),
    ("comfy_instance_id=x", "'comfy_instance_id' is reserved"),
    ("Comfy_Shared_Path=/x", "'Comfy_Shared_Path' is reserved"),
    ("nvidia_visible_devices=all", "'nvidia_visible_devices' is set by ComfyHub from the instance's assigned GPUs"),
    ("CUDA_HOME=/x", "'CUDA_HOME' is set by ComfyHub from the instance's assigned GPUs"),
])
def test_it_refuses_the_whole_reserved_environment_in_any_case(client, operator, line, message):
    client.force_login(operator)
    response = client.post(CREATE, create_data(extra_env=f"TEAM=vision\n{line}"))
    assert_refused(response, "extra_env", message)
    assert not Instance.objects.exists()


@pytest.mark.parametrize("image, message", [
    ("UPPER/case:1", "is not a Docker image reference"),
    ("repo:tag:tag", "is not a Docker image reference"),
    ("example/comfyui@sha256:abc", "is not a digest"),
    ("evil.example/x:latest", "INSTANCE_IMAGES_ALLOWED permits"),
])
def test_it_refuses_an_image_that_is_not_a_reference_or_not_allowed(client, operator, image, message):
    client.force_login(operator)
    assert_refused(client.post(CREATE, create_data(image=image)), "image", message)
    assert not Instance.objects.exists()


# --- Adopting the folder a deleted instance kept ---------------------------------------------------------------

WORKFLOW = b'{"last_node_id": 1, "nodes": [{"id": 1, "type": "KSampler"}]}\n'
OUTPUT = bytes(range(256)) * 40


def test_the_adopt_box_shows_only_when_a_kept_folder_exists(client, operator, settings):
    client.force_login(operator)
    assert "Adopt the kept folder" not in client.get(CREATE).content.decode()
    (settings.COMFY_INSTANCES_PATH / "kept").mkdir(parents=True)
    services.instance_create(instance_id="owned", image="example/comfyui:1")
    (settings.COMFY_INSTANCES_PATH / "owned").mkdir()  # an instance's own folder is not a kept one
    page = html.unescape(client.get(CREATE).content.decode())
    assert "Adopt the kept folder" in page
    kept = page.split('data-testid="kept-folders"', 1)[1].split("</p>", 1)[0]
    assert "<code>kept</code>" in kept and "owned" not in kept


@pytest.mark.django_db(transaction=True)
def test_an_operator_takes_back_the_data_of_a_deleted_instance(client, operator, settings, run_worker,
                                                               docker_engine):  # deleting asks the engine first
    client.force_login(operator)
    client.post(CREATE, create_data(instance_id="kept"))
    run_worker()
    folder = settings.COMFY_INSTANCES_PATH / "kept"
    (folder / "user/default/workflows/mine.json").write_bytes(WORKFLOW)
    (folder / "output/ComfyUI_00001_.png").write_bytes(OUTPUT)
    client.post(reverse("instance-delete", args=["kept"]), {"confirm": "kept"})  # keeping its data
    run_worker()
    assert not Instance.objects.filter(instance_id="kept").exists()

    assert_refused(client.post(CREATE, create_data(instance_id="kept")), "instance_id",
                   "'Adopt the kept folder' on the form")
    assert not Instance.objects.filter(instance_id="kept").exists()
    response = client.post(CREATE, create_data(instance_id="kept", adopt="on"), follow=True)

    instance = Instance.objects.get(instance_id="kept")
    assert response.redirect_chain[-1][0] == instance.get_absolute_url()
    assert "It took its kept folder as it is." in html.unescape(response.content.decode())
    run_worker()
    build = Operation.objects.filter(kind="instance_build", target_id=str(instance.pk)).get()
    assert build.status == Operation.Status.SUCCEEDED, build.error
    assert (folder / "user/default/workflows/mine.json").read_bytes() == WORKFLOW
    assert (folder / "output/ComfyUI_00001_.png").read_bytes() == OUTPUT


def test_adopting_a_folder_that_does_not_exist_is_refused_on_the_form(client, operator, settings):
    client.force_login(operator)
    assert_refused(client.post(CREATE, create_data(instance_id="nothing-kept", adopt="on")), "instance_id",
                   "Nothing to adopt")
    assert not Instance.objects.exists()
    assert not (settings.COMFY_INSTANCES_PATH / "nothing-kept").exists()


# --- Edit ----------------------------------------------------------------------------------------------------

@pytest.fixture
def editable(db):
    return services.instance_create(instance_id="editable", image="example/comfyui:1", gpu_indexes=[0],
                                    extra_args=["--preview-method", "auto"], extra_env={"TEAM": "a"})


def edit_url(instance):
    return reverse("instance-edit", args=[instance.instance_id])


def test_the_edit_form_shows_the_current_configuration(client, operator, editable):
    client.force_login(operator)
    form = client.get(edit_url(editable)).context["form"]
    assert "instance_id" not in form.fields
    assert form["extra_args"].value() == "--preview-method auto"
    assert form["extra_env"].value() == "TEAM=a"
    assert form["host_port"].value() == editable.host_port
    assert form["gpus"].value() == ["0"]


def test_an_operator_changes_an_instance_and_its_id_stays(client, operator, editable):
    port = editable.host_port
    client.force_login(operator)
    response = client.post(edit_url(editable), edit_data(
        editable, instance_id="renamed", display_name="Edited", gpus=["2", "3"], extra_env="TEAM=b", host_port=""))
    assert response.status_code == 302 and response["Location"] == editable.get_absolute_url()
    editable.refresh_from_db()
    assert editable.instance_id == "editable" and not Instance.objects.filter(instance_id="renamed").exists()
    assert editable.display_name == "Edited" and editable.extra_env == {"TEAM": "b"}
    assert [gpu.index for gpu in editable.assigned_gpus()] == [2, 3]
    assert editable.host_port == port  # an empty port keeps the one it has


def test_saving_a_running_instance_says_restart_to_apply(client, operator, editable, docker_engine):
    # The notice compares with what the engine says the container was made from: it needs an engine to ask.
    # As if its container had been made from the current configuration.
    Instance.objects.filter(pk=editable.pk).update(config_hash=runtime.container_spec(editable).config_hash,
                                                   desired_state=Instance.DesiredState.RUNNING)
    client.force_login(operator)
    assert b"restart" in client.get(edit_url(editable)).content
    response = client.post(edit_url(editable), edit_data(editable, extra_args="--preview-method taesd"), follow=True)
    assert "restart to apply" in response.content.decode()
    assert 'data-testid="pending-changes"' in response.content.decode()


def test_saving_without_changes_says_nothing_about_restarting(client, operator, editable):
    Instance.objects.filter(pk=editable.pk).update(config_hash=runtime.container_spec(editable).config_hash)
    client.force_login(operator)
    response = client.post(edit_url(editable), edit_data(editable, extra_env="TEAM=a"), follow=True)
    assert "Instance &#x27;editable&#x27; saved." in response.content.decode()
    assert "restart to apply" not in response.content.decode()


@pytest.mark.parametrize("fields, field, message", [
    ({"host_port": "80"}, "host_port", "Ports go from 1024 to 65535"),
    ({"host_port": "x"}, "host_port", "Enter a whole number."),
    ({"gpus": ["1"]}, "gpus", "GPU 1 is held exclusively by instance 'holder'"),
    ({"gpus": ["9"]}, "gpus", "GPU 9 does not exist on node local"),
    ({"extra_args": "--base-directory /x"}, "extra_args", "'--base-directory' is set by ComfyHub"),
    ({"extra_args": "--port=1"}, "extra_args", "'--port' is set by ComfyHub"),
    ({"extra_args": "--listen"}, "extra_args", "'--listen' is set by ComfyHub"),
    ({"extra_args": "--output-directory=/tmp"}, "extra_args", "'--output-directory' is set by ComfyHub"),
    ({"extra_args": "--base /x"}, "extra_args", "'--base' is set by ComfyHub"),
    ({"extra_env": "NVIDIA_VISIBLE_DEVICES=all"}, "extra_env", "'NVIDIA_VISIBLE_DEVICES' is set by ComfyHub"),
    ({"extra_env": "CUDA_VISIBLE_DEVICES=0"}, "extra_env", "'CUDA_VISIBLE_DEVICES' is set by ComfyHub"),
    ({"extra_env": "COMFY_INSTANCE_ID=x"}, "extra_env", "'COMFY_INSTANCE_ID' is reserved"),
    ({"extra_env": "no equals sign"}, "extra_env", "is not KEY=VALUE"),
    ({"image": "two words"}, "image", "Give an image name"),
])
def test_the_edit_form_refuses_the_same_bad_input_and_changes_nothing(client, operator, editable, held_gpu_1,
                                                                      fields, field, message):
    before = Instance.objects.values().get(pk=editable.pk)
    client.force_login(operator)
    assert_refused(client.post(edit_url(editable), edit_data(editable, **fields)), field, message)
    assert Instance.objects.values().get(pk=editable.pk) == before
    assert [gpu.index for gpu in Instance.objects.get(pk=editable.pk).assigned_gpus()] == [0]


def test_the_edit_form_refuses_a_port_another_instance_uses_or_a_program_holds(client, operator, editable,
                                                                               held_gpu_1, open_socket):
    client.force_login(operator)
    response = client.post(edit_url(editable), edit_data(editable, host_port=str(held_gpu_1.host_port)))
    assert_refused(response, "host_port", f"Port {held_gpu_1.host_port} is used by instance 'holder'")
    response = client.post(edit_url(editable), edit_data(editable, host_port=str(open_socket)))
    assert_refused(response, "host_port", f"Port {open_socket} is already in use on this host")
    assert Instance.objects.get(pk=editable.pk).host_port == editable.host_port


def test_its_own_port_is_not_taken_from_itself(client, operator, editable):
    client.force_login(operator)
    response = client.post(edit_url(editable), edit_data(editable, display_name="same port"))
    assert response.status_code == 302
    assert Instance.objects.get(pk=editable.pk).display_name == "same port"


# --- The form on its own -------------------------------------------------------------------------------------

def test_arguments_round_trip_through_the_text_box(editable):
    args = ["--preview-method", "auto", "--lowvram", "--extra", "a b"]
    assert args_to_text(args) == "--preview-method auto\n--lowvram\n--extra 'a b'"
    form = InstanceForm(edit_data(editable, extra_args=args_to_text(args)), instance=editable)
    assert form.is_valid(), form.errors
    assert form.cleaned_data["extra_args"] == args


def test_a_service_error_for_a_field_the_form_lacks_goes_above_the_form(editable):
    form = InstanceForm(edit_data(editable), instance=editable)
    assert form.is_valid()
    form.add_service_error(services.ValidationError({"instance_id": ["An instance 'editable' already exists."]}))
    assert form.non_field_errors() == ["An instance 'editable' already exists."]
