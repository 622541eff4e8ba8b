"""How an instance's image takes ComfyUI's arguments (Instance.image_arguments): as the container's command, or in
an environment variable its entrypoint splits ("env:CLI_ARGS"). Proved on the real engine with a stand-in of each
kind: the ComfyHub test image (built from docker/comfyui/Dockerfile) and comfyhub-comfyui-cliargs:test, whose
entrypoint runs `main.py $CLI_ARGS`."""
import json
import urllib.request

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from comfyhub.models import Operation
from instances import runtime, services
from instances.models import Instance
from storage_app import layout, snapshots
from tests.support import cli

pytestmark = pytest.mark.django_db(transaction=True)

COMFYHUB_ARGUMENTS = ["--listen", "0.0.0.0", "--port", "8188", "--base-directory", "/instance",
                      "--extra-model-paths-config", "/instance/extra_model_paths.yaml", "--disable-auto-launch",
                      "--cpu"]


def run(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    return operation


def argv_of(instance):
    with urllib.request.urlopen(f"http://127.0.0.1:{instance.host_port}/system_stats", timeout=5) as response:
        return json.loads(response.read())["system"]["argv"][1:]


# --- The container spec -----------------------------------------------------------------------------------------

def test_by_default_the_arguments_are_the_containers_command():
    instance = services.instance_create(instance_id="commanded", extra_args=["--preview-method", "auto"])
    spec = runtime.container_spec(instance)
    assert instance.image_arguments == "command"
    assert spec.command == [*COMFYHUB_ARGUMENTS, "--preview-method", "auto"]
    assert "CLI_ARGS" not in spec.environment


def test_in_env_mode_the_arguments_go_into_the_variable_joined_by_spaces_and_the_command_is_left_to_the_image():
    instance = services.instance_create(instance_id="enved", extra_args=["--preview-method", "auto"],
                                        image_arguments="env:CLI_ARGS")
    spec = runtime.container_spec(instance)
    assert spec.command == []
    assert spec.environment["CLI_ARGS"] == " ".join([*COMFYHUB_ARGUMENTS, "--preview-method", "auto"])


def test_the_setting_is_part_of_the_configuration_hash():
    instance = services.instance_create(instance_id="hashed")
    before = runtime.container_spec(instance).config_hash
    Instance.objects.filter(pk=instance.pk).update(image_arguments="env:CLI_ARGS")
    instance.refresh_from_db()
    assert runtime.container_spec(instance).config_hash != before


# --- The service's rules --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arg", ["a b", "tab\there", "line\nbreak", " "])
def test_in_env_mode_an_argument_holding_whitespace_is_refused_saying_why(arg):
    with pytest.raises(ValidationError) as refused:
        services.instance_create(instance_id="spaced", extra_args=["--front-end-version", arg],
                                 image_arguments="env:CLI_ARGS")
    message = " ".join(refused.value.message_dict["extra_args"])
    assert "holds whitespace" in message and "$CLI_ARGS, which it splits at every space" in message
    assert not Instance.objects.exists()


def test_in_env_mode_an_empty_argument_is_refused_since_it_would_vanish():
    with pytest.raises(ValidationError, match=r"An empty argument cannot travel in \$ARGS"):
        services.instance_create(instance_id="empty", extra_args=["--front-end-version", ""],
                                 image_arguments="env:ARGS")


def test_the_same_argument_is_fine_as_the_containers_command():
    instance = services.instance_create(instance_id="spaced", extra_args=["--front-end-version", "a b"])
    assert runtime.container_spec(instance).command[-2:] == ["--front-end-version", "a b"]


def test_switching_an_instance_with_such_an_argument_to_env_mode_is_refused():
    instance = services.instance_create(instance_id="spaced", extra_args=["--front-end-version", "a b"])
    with pytest.raises(ValidationError, match="holds whitespace"):
        services.instance_update(instance=instance, display_name="", description="", image="",
                                 extra_args=instance.extra_args, extra_env={}, host_port=None, gpu_indexes=[],
                                 image_arguments="env:CLI_ARGS")
    instance.refresh_from_db()
    assert instance.image_arguments == "command"


@pytest.mark.parametrize("value, message", [
    ("env:", "is not a variable name"),
    ("env:1X", "is not a variable name"),
    ("env:CLI ARGS", "is not a variable name"),
    ("env:" + "X" * 100, "is not a variable name"),
    ("env:HOME", "ComfyHub sets or refuses that variable itself"),
    ("env:PYTHONPATH", "ComfyHub sets or refuses that variable itself"),
    ("env:LD_PRELOAD", "ComfyHub sets or refuses that variable itself"),
    ("env:comfy_instance_id", "ComfyHub sets or refuses that variable itself"),
    ("cli", "use 'command' (as the container's command) or 'env:NAME'"),
    ("", "use 'command'"),
])
def test_a_setting_that_names_no_usable_variable_is_refused(value, message):
    with pytest.raises(ValidationError) as refused:
        services.instance_create(instance_id="named", image_arguments=value)
    assert message in " ".join(refused.value.message_dict["image_arguments"])


def test_the_extra_environment_may_not_set_the_arguments_variable_too():
    with pytest.raises(ValidationError) as refused:
        services.instance_create(instance_id="twice", extra_env={"CLI_ARGS": "--lowvram"},
                                 image_arguments="env:CLI_ARGS")
    assert "'CLI_ARGS' carries ComfyUI's arguments" in " ".join(refused.value.message_dict["extra_env"])


@pytest.mark.parametrize("name", ["HOME", "XDG_CACHE_HOME", "PYTHONUSERBASE", "home"])
def test_the_extra_environment_may_not_move_home_or_the_package_folder(name):
    with pytest.raises(ValidationError) as refused:
        services.instance_create(instance_id="homed", extra_env={name: "/tmp"})
    assert f"'{name}' is reserved: ComfyHub sets HOME, XDG_CACHE_HOME and PYTHONUSERBASE" in " ".join(
        refused.value.message_dict["extra_env"])


# --- The form, the admin, the command line, clones ----------------------------------------------------------------

def test_the_new_instance_form_takes_the_variable_and_refuses_a_spaced_argument_on_its_field(client, admin_user):
    client.force_login(admin_user)
    url = reverse("instance-create")
    page = client.get(url).content.decode()
    assert "How the image takes ComfyUI&#x27;s arguments" in page and 'value="CLI_ARGS"' in page
    response = client.post(url, {"instance_id": "formed", "image_arguments": "env", "arguments_variable": "CLI_ARGS",
                                 "extra_args": "--front-end-version 'a b'"})
    assert response.status_code == 200
    assert "holds whitespace" in response.content.decode() and 'data-testid="error-extra_args"' in (
        response.content.decode())
    assert not Instance.objects.exists()
    response = client.post(url, {"instance_id": "formed", "image_arguments": "env", "arguments_variable": "CLI_ARGS",
                                 "extra_args": "--preview-method auto"})
    assert response.status_code == 302
    assert Instance.objects.get(instance_id="formed").image_arguments == "env:CLI_ARGS"


def test_the_edit_form_shows_the_setting_and_changes_it(client, admin_user):
    instance = services.instance_create(instance_id="edited", image_arguments="env:ARGS")
    client.force_login(admin_user)
    detail = client.get(instance.get_absolute_url()).content.decode()
    assert "in the environment variable <code>ARGS</code>" in detail
    url = reverse("instance-edit", args=["edited"])
    page = client.get(url).content.decode()
    assert '<option value="env" selected>' in page and 'value="ARGS"' in page
    response = client.post(url, {"image_arguments": "command", "arguments_variable": "ARGS"})
    assert response.status_code == 302
    instance.refresh_from_db()
    assert instance.image_arguments == "command"


def test_the_admin_refuses_a_reserved_variable_and_saves_a_good_one(client, admin_user):
    instance = services.instance_create(instance_id="admined")
    client.force_login(admin_user)
    url = reverse("admin:instances_instance_change", args=[instance.pk])
    form = {"display_name": "", "description": "", "image": instance.image, "extra_args": "[]", "extra_env": "{}",
            "assignments-TOTAL_FORMS": "0", "assignments-INITIAL_FORMS": "0",
            # The access fields and inlines since issue #13: no owner, no idle stop, no share added.
            "idle_stop_after": "0", "shares-TOTAL_FORMS": "0", "shares-INITIAL_FORMS": "0",
            "opens-TOTAL_FORMS": "0", "opens-INITIAL_FORMS": "0"}
    response = client.post(url, {**form, "image_arguments": "env:HOME"}, follow=True)
    assert "ComfyHub sets or refuses that variable itself" in response.content.decode()
    instance.refresh_from_db()
    assert instance.image_arguments == "command"
    client.post(url, {**form, "image_arguments": "env:CLI_ARGS"}, follow=True)
    instance.refresh_from_db()
    assert instance.image_arguments == "env:CLI_ARGS"


def test_the_command_line_creates_an_instance_whose_image_reads_an_environment_variable():
    result = cli.run("instances", "create", "clied", "--arguments-env", "CLI_ARGS", "--arg=--preview-method",
                     "--arg=auto")
    assert result.code == 0, result.err
    assert Instance.objects.get(instance_id="clied").image_arguments == "env:CLI_ARGS"
    refused = cli.run("instances", "create", "spaced", "--arguments-env", "CLI_ARGS", "--arg=--front-end-version",
                      "--arg=a b")
    assert refused.code == 2 and "holds whitespace" in refused.err
    assert cli.run("instances", "create", "plain").code == 0
    assert Instance.objects.get(instance_id="plain").image_arguments == "command"


def test_a_clone_keeps_how_the_image_takes_the_arguments(run_worker, storage):
    from storage_app import services as storage_services

    instance = services.instance_create(instance_id="source", image_arguments="env:CLI_ARGS")
    layout.build_instance_tree("source")
    snapshot = snapshots.create(instance, kind="config")
    assert snapshot.manifest["instance"]["image_arguments"] == "env:CLI_ARGS"
    operation = run(storage_services.snapshot_clone(snapshot=snapshot, new_instance_id="copy", gpu_indexes=[]),
                    run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert Instance.objects.get(instance_id="copy").image_arguments == "env:CLI_ARGS"


# --- On the real engine: one stand-in of each kind -------------------------------------------------------------------

@pytest.fixture
def cliargs(cliargs_image, settings):
    settings.INSTANCE_IMAGES_ALLOWED = [*settings.INSTANCE_IMAGES_ALLOWED, cliargs_image]
    return cliargs_image


@pytest.mark.docker
def test_an_image_that_reads_cli_args_starts_healthy_with_the_arguments_in_that_variable(cliargs, docker_cleanup,
                                                                                         run_worker):
    instance = services.instance_create(instance_id="cliargs", image=cliargs, image_arguments="env:CLI_ARGS",
                                        extra_args=["--preview-method", "auto"])
    operation = run(services.instance_start(instance=instance), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log
    instance.refresh_from_db()
    assert instance.status == Instance.Status.HEALTHY
    assert argv_of(instance) == [*COMFYHUB_ARGUMENTS, "--preview-method", "auto"]
    container = docker_cleanup.api.inspect_container(instance.container_name)
    assert f"CLI_ARGS={' '.join([*COMFYHUB_ARGUMENTS, '--preview-method', 'auto'])}" in container["Config"]["Env"]


@pytest.mark.docker
def test_the_same_image_given_the_arguments_as_its_command_does_not_become_healthy_and_the_operation_says_why(
        cliargs, docker_cleanup, run_worker, settings):
    settings.INSTANCE_START_TIMEOUT = 20  # it never answers on the published port: no need to wait 5 minutes
    instance = services.instance_create(instance_id="wrong", image=cliargs)
    operation = run(services.instance_start(instance=instance), run_worker)
    assert operation.status == Operation.Status.FAILED
    instance.refresh_from_db()
    assert instance.status != Instance.Status.HEALTHY
    assert "How the image takes ComfyUI's arguments" in operation.error, operation.error


@pytest.mark.docker
def test_the_comfyhub_image_starts_healthy_with_the_arguments_as_its_command(comfyui_double_image, docker_cleanup,
                                                                             run_worker):
    instance = services.instance_create(instance_id="shipped", image=comfyui_double_image)
    operation = run(services.instance_start(instance=instance), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error + operation.log
    assert argv_of(instance) == COMFYHUB_ARGUMENTS
    container = docker_cleanup.api.inspect_container(instance.container_name)
    assert not any(item.startswith("CLI_ARGS=") for item in container["Config"]["Env"])
