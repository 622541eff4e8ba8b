"""The runtime contract (instances/runtime.py): extra arguments judged the way ComfyUI's own argparse parser reads
them, the environment denylist, image references as Docker reads them, and the container spec: what its hash covers
and what the container made from it really has."""
import argparse
import contextlib
import dataclasses
import io

import pytest

from comfyhub.models import Operation
from instances import comfyui_flags, runtime, services

PROTECTED = runtime.RESERVED_ARGS


def comfyui_parser() -> argparse.ArgumentParser:
    """A parser with ComfyUI's option strings and argparse's defaults (allow_abbrev=True), each option taking an
    optional value, so that which option an argument reaches is all that decides."""
    parser = argparse.ArgumentParser(prog="comfyui", exit_on_error=False)
    for option in comfyui_flags.OPTION_STRINGS:
        if option not in ("-h", "--help"):
            parser.add_argument(option, dest=option, nargs="?", const="given", default=None)
    return parser


PARSER = comfyui_parser()


def reached(arg: str) -> set[str]:
    """The options argparse sets when ComfyUI is started with `arg`; empty when it refuses the argument."""
    with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit, argparse.ArgumentError):
        namespace, _ = PARSER.parse_known_args([arg])
        return {dest for dest, value in vars(namespace).items() if value is not None}
    return set()


def abbreviations_argparse_accepts() -> list[tuple[str, str]]:
    """(argument, protected flag) for every prefix of every protected flag that argparse reads as that flag, alone
    and with '=VALUE'. Derived from ComfyUI's flag list, not written by hand."""
    found = []
    for flag in PROTECTED:
        for end in range(3, len(flag) + 1):
            for arg in (flag[:end], f"{flag[:end]}=1"):
                if reached(arg) == {flag}:
                    found.append((arg, flag))
    return found


ACCEPTED_ABBREVIATIONS = abbreviations_argparse_accepts()


def test_every_protected_flag_is_one_comfyui_has():
    assert set(PROTECTED) <= set(comfyui_flags.OPTION_STRINGS)


def test_the_derived_abbreviations_include_the_ones_people_type():
    accepted = {arg for arg, _ in ACCEPTED_ABBREVIATIONS}
    assert {"--i", "--inp", "--input-dir", "--liste", "--port=1", "--po", "--outp", "--extra", "--ba=1",
            "--user-d", "--default-d", "--cuda-d", "--te", "--mo", "--base-director"} <= accepted


@pytest.mark.parametrize("arg, flag", ACCEPTED_ABBREVIATIONS)
def test_it_refuses_every_abbreviation_comfyui_reads_as_a_protected_flag(arg, flag):
    problem = runtime.argument_problem(arg)
    assert problem is not None and "is set by ComfyHub to keep instances isolated" in problem
    assert flag in runtime.comfyui_reads_as(arg)


@pytest.mark.parametrize("arg", ["--p", "--c", "--u", "--d", "--o", "--l", "--b", "--t", "--in=1"])
def test_it_refuses_a_prefix_that_is_ambiguous_today_but_names_a_protected_flag(arg):
    # Another ComfyUI version, with fewer options, would read it as the protected one.
    assert "is set by ComfyHub to keep instances isolated" in runtime.argument_problem(arg)


def test_the_message_names_the_flag_comfyui_takes_an_abbreviation_for():
    assert runtime.argument_problem("--i") == (
        "'--i' is set by ComfyHub to keep instances isolated: ComfyUI takes it for --input-directory (directories, "
        "listening address, port and GPUs come from the instance's settings); remove it.")


@pytest.mark.parametrize("option", sorted(set(comfyui_flags.OPTION_STRINGS) - set(PROTECTED) - {"-h", "--help"}))
def test_every_other_comfyui_option_is_allowed(option):
    assert reached(option) == {option}  # ComfyUI reads it as itself
    assert runtime.argument_problem(option) is None
    assert runtime.argument_problem(f"{option}=1") is None


def test_a_bare_double_dash_is_refused_since_everything_after_it_would_stop_being_an_option():
    # ComfyHub's own arguments may follow the instance's (a cluster member's --enable-cors-header).
    assert "'--' would end ComfyUI's options" in runtime.argument_problem("--")


@pytest.mark.parametrize("arg", ["auto", "512", "-1", "-h", "/instance/whatever", "--preview-method"])
def test_values_and_harmless_arguments_pass(arg):
    assert runtime.argument_problem(arg) is None


@pytest.mark.parametrize("arg, message", [
    ("--port 8190", "holds a flag and its value in one item"),
    (["--port"], "is not an argument"),
    (None, "is not an argument"),
    ("--preview-method=\0", "NUL"),
    ("--my-directory", "is set by ComfyHub to keep instances isolated"),
])
def test_it_refuses_malformed_arguments(arg, message):
    assert message in runtime.argument_problem(arg)


# --- Environment ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [
    "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "nvidia_visible_devices", "NVIDIA_ANYTHING",
    "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "Cuda_Visible_Devices",
    "LD_PRELOAD", "LD_LIBRARY_PATH", "ld_preload", "LD_AUDIT",
    "COMFY_INSTANCE_ID", "comfy_instance_id", "Comfy_Shared_Path", "COMFY_",
    "HIP_VISIBLE_DEVICES", "PUID", "pgid",
])
def test_it_refuses_reserved_environment_names_in_any_case(name):
    problem = runtime.environment_problem(name, "x")
    assert problem is not None and problem.startswith(f"'{name}' ")


@pytest.mark.parametrize("name", ["1ST", "MY-KEY", "A B", "", "É", "KEY\n", 7])
def test_it_refuses_names_that_are_not_variable_names(name):
    assert "is not a variable name" in runtime.environment_problem(name, "x")


@pytest.mark.parametrize("value", [None, ["a"], {"a": 1}, True, "a\0b"])
def test_it_refuses_values_that_are_not_text(value):
    assert runtime.environment_problem("TEAM", value) is not None


@pytest.mark.parametrize("name", ["TEAM", "PYTHONPATH", "HF_HOME", "MY_LD_PATH", "NVIDIAX", "COMFYUI_THEME", "_X"])
def test_ordinary_names_pass(name):
    assert runtime.environment_problem(name, "value") is None


# --- Images --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("image", [
    "ghcr.io/comfyhub/comfyui:latest", "ghcr.io/comfyhub/comfyui", "comfy:sdxl", "example/comfyui:1",
    "localhost:5000/team/comfyui:1.0", "localhost/comfyui", "registry.example.com:443/a/b/c:v1_2-3",
    "[::1]:5000/comfyui:1", "a__b/c--d.e_f:TAG", "Registry.Example.com/x",
    "ghcr.io/comfyhub/comfyui@sha256:" + "0" * 64, "comfy:1@sha256:" + "ab" * 32,
])
def test_docker_references_are_accepted(image):
    assert runtime.image_reference_problem(image) is None


@pytest.mark.parametrize("image, message", [
    ("UPPER/case", "must be lowercase letters and digits"),
    ("Comfy:1", "(try 'comfy:1')"),
    ("a b", "no spaces"),
    ("comfy:1\n", "no spaces"),
    ("repo:tag:tag", "must be lowercase letters and digits"),
    ("repo:", "is not a tag"),
    ("repo:.hidden", "is not a tag"),
    ("repo:" + "t" * 129, "is not a tag"),
    (":tag", "must be lowercase"),
    ("/repo", "must be lowercase"),
    ("repo/", "must be lowercase"),
    ("a//b", "must be lowercase"),
    ("a___b", "must be lowercase"),
    ("-repo", "must be lowercase"),
    ("--privileged", "must be lowercase"),
    ("repo@sha256:abc", "is not a digest"),
    ("repo@", "is not a digest"),
    ("re_.example:99x/repo", "is not a registry"),
    ("-bad.example/repo", "is not a registry"),
    ("x" * 256, "longer than 255"),
    ("", "Give an image name"),
])
def test_malformed_references_are_refused_with_what_is_wrong(image, message):
    problem = runtime.image_reference_problem(image)
    assert problem is not None and message in problem


def test_only_images_matching_the_allowed_patterns_may_run(settings):
    settings.INSTANCE_IMAGES_ALLOWED = ["ghcr.io/comfyhub/comfyui:*", "comfyhub-test-*:*"]
    assert runtime.image_problem("ghcr.io/comfyhub/comfyui:v2") is None
    assert runtime.image_problem("comfyhub-test-base:bookworm") is None
    assert runtime.image_problem("evil.example/x:latest") == (
        "Image 'evil.example/x:latest' is not allowed on this ComfyHub: INSTANCE_IMAGES_ALLOWED permits "
        "'ghcr.io/comfyhub/comfyui:*', 'comfyhub-test-*:*'. Pick an image that matches, or have the administrator "
        "add a pattern to INSTANCE_IMAGES_ALLOWED.")
    assert "not allowed" in runtime.image_problem("ghcr.io/comfyhub/comfyui-evil:1")
    assert "not a Docker image reference" in runtime.image_problem("ghcr.io/comfyhub/comfyui:a:b")


# --- The container spec ----------------------------------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.parametrize("name, value", [
    ("RESTART_POLICY", "unless-stopped"),
    ("LOG_DRIVER", "local"),
    ("LOG_OPTIONS", {"max-size": "50m", "max-file": "3"}),
])
def test_the_configuration_hash_covers_the_restart_policy_and_log_rotation(monkeypatch, name, value):
    instance = services.instance_create(instance_id="hashed", image="")
    before = runtime.container_spec(instance).config_hash
    monkeypatch.setattr(runtime, name, value)
    assert runtime.container_spec(instance).config_hash != before


@pytest.mark.django_db
def test_the_configuration_hash_covers_init_and_the_restart_limit(settings):
    instance = services.instance_create(instance_id="hashed", image="")
    spec = runtime.container_spec(instance)
    assert spec.init is True
    assert dataclasses.replace(spec, init=False).config_hash != spec.config_hash
    settings.INSTANCE_MAX_RESTARTS += 1
    assert runtime.container_spec(instance).config_hash != spec.config_hash


@pytest.mark.docker
@pytest.mark.django_db(transaction=True)
def test_the_container_has_the_init_log_rotation_and_restart_policy_of_its_spec(comfyui_double_image, docker_cleanup,
                                                                                run_worker, monkeypatch, settings):
    instance = services.instance_create(instance_id="contract", image=comfyui_double_image)

    def started():
        operation = services.instance_start(instance=instance)
        run_worker()
        operation.refresh_from_db()
        assert operation.status == Operation.Status.SUCCEEDED, operation.error
        return docker_cleanup.api.inspect_container(instance.container_name)

    container = started()
    assert container["HostConfig"]["Init"] is True
    assert container["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "20m", "max-file": "3"}}
    assert container["HostConfig"]["RestartPolicy"] == {"Name": "on-failure",
                                                        "MaximumRetryCount": settings.INSTANCE_MAX_RESTARTS}

    # Smaller logs and fewer restarts make another hash: the next start recreates the container with them.
    monkeypatch.setattr(runtime, "LOG_OPTIONS", {"max-size": "1m", "max-file": "2"})
    settings.INSTANCE_MAX_RESTARTS = 2
    recreated = started()
    assert recreated["Id"] != container["Id"]
    assert recreated["HostConfig"]["LogConfig"] == {"Type": "json-file", "Config": {"max-size": "1m", "max-file": "2"}}
    assert recreated["HostConfig"]["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 2}
    assert recreated["Config"]["Labels"][runtime.LABEL_CONFIG] == runtime.container_spec(
        instance, image_id=recreated["Image"]).config_hash
