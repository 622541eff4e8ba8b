"""Workflows between instances: listing, copying safely, the dependency pre-flight, and the shared library."""
import json
import os
import shutil

import pytest
from django.core.exceptions import ValidationError

from comfyhub.models import Operation
from instances import services, workflows
from instances.models import WorkflowInstall
from storage_app import layout, library

pytestmark = pytest.mark.django_db(transaction=True)

UI_WORKFLOW = {
    "last_node_id": 3, "links": [],
    "nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "widgets_values": ["sd15/dreamy.safetensors"]},
        {"id": 2, "type": "LoraLoader", "widgets_values": ["detail-tweaker.safetensors", 1.0, 1.0]},
        {"id": 3, "type": "FancyCustomNode", "widgets_values": [42, "upscaler_x4.pth"]},
        {"id": 4, "type": "Note", "widgets_values": ["just a note"]},
    ],
}
API_WORKFLOW = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl_base.safetensors"}},
    "5": {"class_type": "VAELoader", "inputs": {"vae_name": "sdxl_vae.safetensors"}},
    "6": {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["4", 0]}},
}


@pytest.fixture
def pair(storage):
    source = services.instance_create(instance_id="source")
    target = services.instance_create(instance_id="target")
    for instance in (source, target):
        layout.build_instance_tree(instance.instance_id)
    return source, target


def put_workflow(instance, relpath, data):
    path = workflows.workflows_dir(instance) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_it_lists_an_instances_workflows_with_sub_folders(pair):
    source, _ = pair
    put_workflow(source, "a.json", UI_WORKFLOW)
    put_workflow(source, "portraits/b.json", API_WORKFLOW)
    put_workflow(source, "notes.txt", "not a workflow")
    listed = workflows.list_workflows(source)
    assert [w["path"] for w in listed] == ["a.json", "portraits/b.json"]
    assert listed[0]["size"] == len(json.dumps(UI_WORKFLOW))


def test_copy_keeps_sub_folders_and_reports_each_file(pair, run_worker):
    source, target = pair
    put_workflow(source, "portraits/b.json", API_WORKFLOW)
    operation = services.workflows_copy(source=source, targets=[target], paths=["portraits/b.json"])
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert json.loads((workflows.workflows_dir(target) / "portraits/b.json").read_text()) == API_WORKFLOW
    assert operation.result["files"] == [{"source": "source", "target": "target", "path": "portraits/b.json",
                                          "result": "written"}]


@pytest.mark.parametrize("policy, expected_file, expected_result", [
    ("skip", "a.json", "skipped (exists)"),
    ("overwrite", "a.json", "overwritten"),
    ("rename", "a (2).json", "renamed to a (2).json"),
])
def test_conflicts_follow_the_chosen_policy(pair, policy, expected_file, expected_result):
    source, target = pair
    put_workflow(source, "a.json", UI_WORKFLOW)
    put_workflow(target, "a.json", {"nodes": [], "mine": True})
    result = workflows.copy_workflows(source, [target], ["a.json"], policy)
    assert result.files[0]["result"] == expected_result
    written = json.loads((workflows.workflows_dir(target) / expected_file).read_text())
    assert written == ({"nodes": [], "mine": True} if policy == "skip" else UI_WORKFLOW)
    if policy == "rename":
        assert json.loads((workflows.workflows_dir(target) / "a.json").read_text())["mine"] is True


@pytest.mark.parametrize("bad", ["../escape.json", "/etc/passwd.json", "a/../../b.json", "x.txt", ".hidden.json", ""])
def test_paths_that_leave_the_workflows_folder_are_refused(pair, bad):
    source, target = pair
    with pytest.raises(ValidationError):
        services.workflows_copy(source=source, targets=[target], paths=[bad])


def test_a_symlinked_workflow_is_never_followed(pair, tmp_path):
    source, target = pair
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": true}')
    workflows.workflows_dir(source).mkdir(parents=True, exist_ok=True)
    os.symlink(secret, workflows.workflows_dir(source) / "link.json")
    os.symlink(tmp_path, workflows.workflows_dir(source) / "linked-folder")
    (tmp_path / "inner.json").write_text('{"nodes": []}')
    result = workflows.copy_workflows(source, [target], ["link.json", "linked-folder/inner.json"], "overwrite")
    assert [f["result"].split(":")[0] for f in result.files] == ["refused", "refused"]
    assert not (workflows.workflows_dir(target) / "link.json").exists()
    assert not (workflows.workflows_dir(target) / "linked-folder").exists()


def test_a_symlink_in_the_target_is_not_written_through(pair, tmp_path):
    source, target = pair
    put_workflow(source, "sub/a.json", UI_WORKFLOW)
    workflows.workflows_dir(target).mkdir(parents=True, exist_ok=True)
    os.symlink(tmp_path, workflows.workflows_dir(target) / "sub")
    result = workflows.copy_workflows(source, [target], ["sub/a.json"], "overwrite")
    assert result.files[0]["result"].startswith("failed")
    assert not (tmp_path / "a.json").exists()


def test_invalid_and_huge_json_are_refused_and_nothing_is_half_copied(pair, run_worker):
    source, target = pair
    put_workflow(source, "broken.json", "{not json")
    huge = put_workflow(source, "huge.json", "{}")
    with open(huge, "wb") as handle:
        handle.truncate(workflows.MAX_WORKFLOW_BYTES + 1)
    operation = services.workflows_copy(source=source, targets=[target], paths=["broken.json", "huge.json"])
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.FAILED
    assert "is not valid JSON" in operation.error and "refused" in operation.error
    assert list(workflows.workflows_dir(target).iterdir()) == []  # no temp files either


def test_the_preflight_reads_both_formats_and_lists_what_the_target_lacks(pair, storage):
    _, target = pair
    models = storage["shared"] / "models"
    for relpath in ("checkpoints/sd15/dreamy.safetensors", "loras/detail_tweaker.safetensors",
                    "vae/sdxl_vae.safetensors"):
        (models / relpath).parent.mkdir(parents=True, exist_ok=True)
        (models / relpath).write_bytes(b"x")
    library.scan()
    target.node_types = ["CheckpointLoaderSimple", "LoraLoader", "KSampler", "VAELoader"]
    ui = workflows.preflight(UI_WORKFLOW, target)
    assert ui["format"] == "ui"
    assert ui["missing_node_types"] == ["FancyCustomNode"]
    missing = {m["name"]: m for m in ui["missing_models"]}
    assert set(missing) == {"detail-tweaker.safetensors", "upscaler_x4.pth"}
    assert missing["detail-tweaker.safetensors"]["near"] == ["detail_tweaker.safetensors"]
    api = workflows.preflight(API_WORKFLOW, target)
    assert api["format"] == "api" and api["missing_node_types"] == []
    assert [m["name"] for m in api["missing_models"]] == ["sdxl_base.safetensors"]


def test_the_target_instances_own_models_count_for_the_preflight(pair, storage):
    _, target = pair
    own = storage["instances"] / "target" / "models" / "checkpoints" / "sdxl_base.safetensors"
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_bytes(b"x")
    assert "sdxl_base.safetensors" not in [m["name"] for m in workflows.preflight(API_WORKFLOW, target)["missing_models"]]


def test_a_model_file_placed_without_a_scan_is_found_on_disk_when_the_target_is_stopped(pair, storage):
    _, target = pair
    placed = storage["shared"] / "models" / "checkpoints" / "sdxl_base.safetensors"
    placed.parent.mkdir(parents=True, exist_ok=True)
    placed.write_bytes(b"x")  # no library.scan(): ComfyHub's database does not know it
    result = workflows.preflight(API_WORKFLOW, target)
    assert [m["name"] for m in result["missing_models"]] == ["sdxl_vae.safetensors"]
    assert result["models_source"] == "checked against the files on disk (the instance is stopped)"


def test_a_link_in_the_instances_models_folder_is_not_followed_for_the_preflight(pair, storage, tmp_path):
    _, target = pair
    outside = tmp_path / "outside"
    (outside / "checkpoints").mkdir(parents=True)
    (outside / "checkpoints" / "sdxl_base.safetensors").write_bytes(b"x")
    (storage["instances"] / "target" / "models").mkdir(parents=True, exist_ok=True)
    (storage["instances"] / "target" / "models" / "checkpoints").symlink_to(outside / "checkpoints")
    (storage["instances"] / "target" / "models" / "vae").mkdir()
    (storage["instances"] / "target" / "models" / "vae" / "sdxl_vae.safetensors").symlink_to(
        outside / "checkpoints" / "sdxl_base.safetensors")
    missing = [m["name"] for m in workflows.preflight(API_WORKFLOW, target)["missing_models"]]
    assert missing == ["sdxl_base.safetensors", "sdxl_vae.safetensors"]


@pytest.mark.docker
def test_a_running_target_is_checked_against_its_own_model_lists(comfyui_double_image, docker_cleanup, run_worker,
                                                                  storage):
    target = services.instance_create(instance_id="runner", image=comfyui_double_image)
    placed = storage["shared"] / "models" / "checkpoints" / "sdxl_base.safetensors"
    placed.parent.mkdir(parents=True, exist_ok=True)
    placed.write_bytes(b"x")  # no library.scan()
    operation = services.instance_start(instance=target)
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    target.refresh_from_db()
    result = services.workflow_check(instance=target, raw=json.dumps(API_WORKFLOW).encode())
    assert [m["name"] for m in result["missing_models"]] == ["sdxl_vae.safetensors"]
    assert result["models_source"] == "checked against the running instance's model lists"


def test_something_that_is_not_a_workflow_is_a_clear_error(pair):
    _, target = pair
    with pytest.raises(ValidationError, match="Not a ComfyUI workflow"):
        services.workflow_check(instance=target, raw=b'{"hello": "world"}')
    with pytest.raises(ValidationError, match="The workflow is not valid JSON"):
        services.workflow_check(instance=target, raw=b"[1, 2")


def test_publishing_makes_versions_and_never_duplicates_identical_content(pair, admin_user):
    source, _ = pair
    put_workflow(source, "a.json", UI_WORKFLOW)
    first, created = services.workflow_publish(instance=source, path="a.json", name="portrait", user=admin_user)
    again, created_again = services.workflow_publish(instance=source, path="a.json", name="portrait")
    assert (first.number, created, again.pk, created_again) == (1, True, first.pk, False)
    put_workflow(source, "a.json", API_WORKFLOW)
    second, _ = services.workflow_publish(instance=source, path="a.json", name="portrait")
    assert second.number == 2 and second.author is None and first.author == admin_user
    assert first.published_from == "source:a.json"


def test_installing_a_version_writes_it_and_the_library_knows_who_holds_what(pair, run_worker):
    source, target = pair
    put_workflow(source, "a.json", UI_WORKFLOW)
    v1, _ = services.workflow_publish(instance=source, path="a.json", name="portrait")
    put_workflow(source, "a.json", API_WORKFLOW)
    services.workflow_publish(instance=source, path="a.json", name="portrait")
    operation = services.workflow_install(spec="portrait@1", instances=[target])
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert json.loads((workflows.workflows_dir(target) / "portrait.json").read_text()) == UI_WORKFLOW
    assert workflows.holders(v1.entry) == [{"instance": "target", "path": "portrait.json", "version": 1,
                                            "state": "installed"}]
    put_workflow(target, "portrait.json", {"nodes": [], "edited": True})
    assert workflows.holders(v1.entry)[0]["state"] == "modified"
    assert WorkflowInstall.objects.count() == 1
    with pytest.raises(ValidationError, match="no such version"):
        services.workflow_install(spec="portrait@9", instances=[target])
    with pytest.raises(ValidationError, match="No workflow 'nope'"):
        services.workflow_install(spec="nope", instances=[target])


def test_library_names_cannot_hold_an_at_sign(pair):
    source, _ = pair
    put_workflow(source, "a.json", UI_WORKFLOW)
    with pytest.raises(ValidationError) as excinfo:
        services.workflow_publish(instance=source, path="a.json", name="a@b")
    assert "separates a name from its version" in excinfo.value.message_dict["name"][0]


def test_installing_a_new_version_replaces_an_unmodified_file_and_keeps_an_edited_one(pair):
    source, target = pair
    put_workflow(source, "a.json", UI_WORKFLOW)
    v1, _ = services.workflow_publish(instance=source, path="a.json", name="flow")
    put_workflow(source, "a.json", API_WORKFLOW)
    v2, _ = services.workflow_publish(instance=source, path="a.json", name="flow")
    assert workflows.install(v1, target) == ("written", "flow.json")
    assert workflows.install(v2, target) == ("overwritten", "flow.json")  # an upgrade
    put_workflow(target, "flow.json", {"nodes": [], "edited": True})
    assert workflows.install(v1, target) == ("renamed", "flow (2).json")
    assert json.loads((workflows.workflows_dir(target) / "flow.json").read_text())["edited"] is True


def test_near_matches_compare_names_not_extensions(pair, storage):
    _, target = pair
    for name in ("dreamy_v1.safetensors", "dup.safetensors"):
        path = storage["shared"] / "models" / "checkpoints" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    library.scan()
    workflow = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamy_v2.safetensors"}}}
    [missing] = workflows.preflight(workflow, target)["missing_models"]
    assert missing["near"] == ["dreamy_v1.safetensors"]


# --- A hostile instance folder: links the container planted ---------------------------------------------------

def swap_for_link(path, canary, how):
    shutil.rmtree(path)
    os.symlink(canary if how == "absolute" else os.path.relpath(canary, path.parent), path)
    return path


@pytest.mark.parametrize("how", ["absolute", "relative"])
@pytest.mark.parametrize("level", ["user", "user/default", "user/default/workflows"])
def test_a_planted_link_on_the_way_to_the_workflows_is_refused_everywhere(pair, storage, canary, level, how):
    source, target = pair
    link = swap_for_link(storage["instances"] / "source" / level, canary, how)
    for call in (lambda: workflows.list_workflows(source),
                 lambda: workflows.read_workflow(source, "sub/deep.json"),
                 lambda: workflows.write_workflow(source, "new.json", b"{}", "overwrite"),
                 lambda: workflows.write_workflow(source, "sub/deep.json", b"{}", "overwrite")):
        with pytest.raises(workflows.WorkflowError) as refused:
            call()
        assert f"{link} is a link" in str(refused.value) and f"rm '{link}'" in str(refused.value)


def test_a_linked_sub_folder_is_not_listed_and_a_linked_file_is_listed_as_a_link(pair, canary):
    source, _ = pair
    os.symlink(canary / "sub", workflows.workflows_dir(source) / "linked")
    os.symlink(canary / "sub" / "deep.json", workflows.workflows_dir(source) / "linked.json")
    put_workflow(source, "real.json", UI_WORKFLOW)
    listed = {w["path"]: w["symlink"] for w in workflows.list_workflows(source)}
    assert listed == {"linked.json": True, "real.json": False}
    with pytest.raises(workflows.WorkflowError, match="linked.json is a link"):
        workflows.read_workflow(source, "linked.json")


@pytest.mark.parametrize("policy", ["overwrite", "rename", "skip"])
def test_a_link_planted_at_the_target_name_is_never_written_through(pair, canary, policy):
    _, target = pair
    os.symlink(canary / "sub" / "deep.json", workflows.workflows_dir(target) / "a.json")
    with pytest.raises(workflows.WorkflowError, match="as a link or folder; not touched"):
        workflows.write_workflow(target, "a.json", b'{"nodes": []}', policy)
    assert os.readlink(workflows.workflows_dir(target) / "a.json") == str(canary / "sub" / "deep.json")


def test_a_written_workflow_belongs_to_puid_and_leaves_no_temporary_file(pair, settings):
    if os.geteuid() != 0:
        pytest.fail("this suite runs as root (make test on CI); ownership cannot be checked otherwise")
    settings.PUID, settings.PGID = 1234, 2345
    _, target = pair
    assert workflows.write_workflow(target, "deep/er/new.json", b"{}", "skip") == ("written", "deep/er/new.json")
    folder = workflows.workflows_dir(target)
    for path in ("deep", "deep/er", "deep/er/new.json"):
        info = os.stat(folder / path)
        assert (info.st_uid, info.st_gid) == (1234, 2345), path
    assert os.listdir(folder / "deep" / "er") == ["new.json"]


def test_the_workflows_page_says_why_it_lists_nothing_behind_a_planted_link(pair, storage, canary, client,
                                                                           admin_user):
    source, _ = pair
    link = swap_for_link(storage["instances"] / "source" / "user" / "default", canary, "absolute")
    client.force_login(admin_user)
    response = client.get(f"/instances/{source.instance_id}/workflows/")
    text = response.content.decode()
    assert response.status_code == 200
    assert f"{link} is a link" in text and "deep.json" not in text
