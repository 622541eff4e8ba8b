"""Instance templates: shared configuration, instances made from them, and drift."""
import json
import os
import shutil

import pytest
from django.core.exceptions import ValidationError

from comfyhub.models import Operation
from instances import services, templating, workflows
from instances.distribution import MULTIGPU_TEMPLATE
from instances.models import Instance, InstanceTemplate
from storage_app import layout
from tests.support.canary import make_canary, snapshot
from tests.support.gitrepos import make_node_repo

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def starter(storage):
    author = services.instance_create(instance_id="author")
    layout.build_instance_tree("author")
    path = workflows.workflows_dir(author) / "hello.json"
    path.write_text(json.dumps({"nodes": [{"id": 1, "type": "KSampler"}]}))
    version, _ = services.workflow_publish(instance=author, path="hello.json", name="hello")
    return version


@pytest.fixture
def template(starter, tmp_path, node_git):
    url, _ = make_node_repo(tmp_path / "repos")
    return services.template_create(
        name="studio-sdxl", image="comfy:sdxl", extra_args=["--preview-method", "auto"], extra_env={"TEAM": "art"},
        gpu_count=2, custom_nodes=[{"url": url, "ref": "v1"}], settings_values={"Comfy.LinkRenderMode": 2},
        starter_workflows=[starter])


def test_an_instance_made_from_a_template_gets_all_of_it(template, run_worker, storage):
    instance, operation = services.instance_create_from_template(template=template, instance_id="made")
    assert (instance.image, instance.extra_args, instance.extra_env) == ("comfy:sdxl", ["--preview-method", "auto"],
                                                                         {"TEAM": "art"})
    assert len(instance.assigned_gpus()) == 2 and instance.template == template
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    settings_file = storage["instances"] / "made" / "user" / "default" / "comfy.settings.json"
    assert json.loads(settings_file.read_text()) == {"Comfy.LinkRenderMode": 2}
    assert (workflows.workflows_dir(instance) / "hello.json").exists()
    assert instance.custom_nodes.get().ref == "v1"
    assert templating.drift(instance) == []


def test_drift_shows_what_differs_from_the_template(template, run_worker, storage):
    instance, _ = services.instance_create_from_template(template=template, instance_id="drifty")
    run_worker()
    services.instance_update(instance=instance, display_name="", description="", image="comfy:other",
                             extra_args=[], extra_env={"TEAM": "art"}, host_port=None,
                             gpu_indexes=[g.index for g in instance.assigned_gpus()][:1])
    settings_file = storage["instances"] / "drifty" / "user" / "default" / "comfy.settings.json"
    settings_file.write_text(json.dumps({"Comfy.LinkRenderMode": 0}))
    found = {d["what"]: (d["template"], d["instance"]) for d in templating.drift(Instance.objects.get(pk=instance.pk))}
    assert found == {"image": ("comfy:sdxl", "comfy:other"),
                     "extra arguments": (["--preview-method", "auto"], []),
                     "GPU count": (2, 1),
                     "setting Comfy.LinkRenderMode": (2, 0)}


def test_applying_merges_settings_and_keeps_existing_workflows(template, storage, run_worker):
    instance = services.instance_create(instance_id="existing")
    layout.build_instance_tree("existing")
    settings_file = storage["instances"] / "existing" / "user" / "default" / "comfy.settings.json"
    settings_file.write_text(json.dumps({"Mine": True}))
    (workflows.workflows_dir(instance) / "hello.json").write_text('{"nodes": [], "mine": true}')
    services.template_apply(template=template, instance=instance)
    run_worker()
    assert json.loads(settings_file.read_text()) == {"Mine": True, "Comfy.LinkRenderMode": 2}
    assert json.loads((workflows.workflows_dir(instance) / "hello.json").read_text())["mine"] is True
    assert (workflows.workflows_dir(instance) / "hello (2).json").exists()


def test_a_template_asking_for_more_gpus_than_are_free_is_refused(template):
    services.instance_create(instance_id="hog", gpu_indexes=[0, 1, 2])
    with pytest.raises(ValidationError, match="asks for 2 GPU"):
        services.instance_create_from_template(template=template, instance_id="late")
    assert not Instance.objects.filter(instance_id="late").exists()


@pytest.mark.parametrize("field, value, message", [
    ("extra_args", ["--base-directory", "/x"], "keep instances isolated"),
    ("extra_env", {"CUDA_VISIBLE_DEVICES": "0"}, "assign GPUs instead"),
    ("custom_nodes", [{"url": "not a url"}], "is not a git URL"),
])
def test_a_template_that_would_break_isolation_is_refused(field, value, message):
    with pytest.raises(ValidationError, match=message):
        services.template_create(name="bad", **{field: value})


def test_template_names_are_checked(template):
    with pytest.raises(ValidationError, match="already exists"):
        services.template_create(name="studio-sdxl")
    with pytest.raises(ValidationError, match="lowercase"):
        services.template_create(name="Bad Name")


@pytest.mark.parametrize("field, value, message", [
    ("image", "has spaces:1", "no spaces"),
    ("custom_nodes", [{"url": "https://example.org/.git"}], "cannot name a custom node folder"),
    ("custom_nodes", [{"url": "https://example.org/x.git", "ref": "--evil"}], "not a branch, tag or commit"),
])
def test_template_images_and_nodes_are_checked_up_front(field, value, message):
    with pytest.raises(ValidationError, match=message):
        services.template_create(name="checked", **{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("name", "studio\n", "Use lowercase letters, digits and '-' for a template name"),
    ("image", "evil.example/x:latest", "INSTANCE_IMAGES_ALLOWED permits"),
    ("image", "repo:tag:tag", "is not a Docker image reference"),
    ("extra_args", ["--liste"], "ComfyUI takes it for --listen"),
    ("extra_args", "--lowvram", "Extra arguments are a list of strings"),
    ("extra_env", {"Comfy_Shared_Path": "/x"}, "'Comfy_Shared_Path' is reserved"),
    ("extra_env", {"LD_PRELOAD": "/x.so"}, "'LD_PRELOAD' is refused"),
    ("custom_nodes", {"url": "https://example.org/x.git"}, "Custom nodes are a list"),
])
def test_a_template_obeys_the_rules_an_instance_made_from_it_would(field, value, message):
    arguments = {"name": "checked", field: value}
    with pytest.raises(ValidationError) as excinfo:
        services.template_create(**arguments)
    assert message in " ".join(excinfo.value.messages)
    # Only the built-in multi-gpu template (made after every migrate) is there.
    assert list(InstanceTemplate.objects.values_list("name", flat=True)) == [MULTIGPU_TEMPLATE]


def test_a_template_change_obeys_the_same_rules_and_keeps_its_name():
    template = services.template_create(name="changing", image="comfy:sdxl")
    with pytest.raises(ValidationError, match="INSTANCE_IMAGES_ALLOWED permits"):
        services.template_update(template=template, image="evil.example/x:latest")
    template.refresh_from_db()
    assert template.image == "comfy:sdxl"
    services.template_update(template=template, image="comfy:other", extra_env={"TEAM": "art"}, gpu_count=1)
    template.refresh_from_db()
    assert (template.name, template.image, template.extra_env, template.gpu_count) == (
        "changing", "comfy:other", {"TEAM": "art"}, 1)


def test_a_template_cannot_be_called_new():
    with pytest.raises(ValidationError, match="'new' is taken"):
        services.template_create(name="new")


def test_without_a_queue_no_instance_is_made_from_a_template(template, settings):
    dead = "unix:///nonexistent/redis.sock?db=0"
    settings.RQ_QUEUES = {name: {"URL": dead} for name in settings.RQ_QUEUES}
    from comfyhub.queues import QueueUnavailable

    with pytest.raises(QueueUnavailable):
        services.instance_create_from_template(template=template, instance_id="half-made")
    assert not Instance.objects.filter(instance_id="half-made").exists()


def test_settings_are_never_read_or_written_through_a_planted_link(storage, tmp_path):
    host = make_canary(tmp_path / "host")
    before = snapshot(host)
    instance = services.instance_create(instance_id="hostile")
    layout.build_instance_tree("hostile")
    template = InstanceTemplate.objects.create(name="plain", settings={"Comfy.LinkRenderMode": 2})
    settings_file = storage["instances"] / "hostile" / "user" / "default" / "comfy.settings.json"
    os.symlink(host / "sub" / "deep.json", settings_file)  # a host JSON file: never merged into the instance's
    with pytest.raises(layout.LayoutError, match="comfy.settings.json is a link"):
        templating.apply(template, instance)
    Instance.objects.filter(pk=instance.pk).update(template=template)
    instance.refresh_from_db()
    [refused] = [d for d in templating.drift(instance) if d["what"] == "settings"]
    assert "comfy.settings.json is a link" in refused["instance"]
    settings_file.unlink()
    default = settings_file.parent
    shutil.rmtree(default)
    os.symlink(host / "sub", default)
    with pytest.raises(layout.LayoutError, match="default is a link"):
        templating.apply(template, instance)
    os.unlink(default)
    templating.apply(template, instance)
    assert json.loads(settings_file.read_text()) == {"Comfy.LinkRenderMode": 2}
    assert snapshot(host) == before
