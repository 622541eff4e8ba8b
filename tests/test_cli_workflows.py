"""`manage.py workflows`, `templates` and `nodes`: workflow files, the workflow library, instance templates and custom
nodes from a shell, with the exit codes and JSON that docs/cli.md promises.

Real workflow files in real instance folders, real git repositories (file:// URLs) for custom nodes, and real RQ
workers: in this process (`run_worker`) after `--no-wait`, or a separate worker process that the command waits for.
"""
import json
import uuid

import pytest

from comfyhub.models import Operation
from instances import customnodes, services, templating, workflows
from instances.models import CustomNode, Instance, InstanceTemplate, WorkflowInstall
from storage_app import layout
from tests.support.cli import run, run_process
from tests.support.gitrepos import make_node_repo

pytestmark = pytest.mark.django_db(transaction=True)

UI_WORKFLOW = {
    "last_node_id": 3, "links": [],
    "nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "widgets_values": ["dreamy.safetensors"]},
        {"id": 2, "type": "FancyCustomNode", "widgets_values": [42]},
        {"id": 3, "type": "KSampler", "widgets_values": [1, "fixed"]},
    ],
}
API_WORKFLOW = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamy_v2.safetensors"}},
    "6": {"class_type": "KSampler", "inputs": {"seed": 1, "model": ["4", 0]}},
}
WORKFLOW_KEYS = {"path", "size", "modified", "symlink"}
CHECK_KEYS = {"instance", "file", "ready", "format", "node_types", "missing_node_types", "node_types_known", "models",
              "missing_models", "models_source"}
ENTRY_KEYS = {"name", "created_at", "latest", "versions", "holders"}
VERSION_KEYS = {"number", "sha256", "published_from", "author", "created_at"}
TEMPLATE_KEYS = {"name", "description", "image", "extra_args", "extra_env", "gpu_count", "self_service",
                 "custom_nodes", "settings", "starter_workflows", "instances", "created_at"}
NODE_KEYS = {"name", "url", "ref", "commit", "recorded_commit", "dirty", "enabled", "managed", "present"}


def made(instance_id, **fields):
    instance = services.instance_create(instance_id=instance_id, **fields)
    layout.build_instance_tree(instance_id)
    return instance


def put_workflow(instance, relpath, data):
    path = workflows.workflows_dir(instance) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture
def pair(storage):
    return made("source"), made("target")


@pytest.fixture
def repo(tmp_path, node_git):
    return make_node_repo(tmp_path / "repos")


# === workflows =====================================================================================================

def test_workflows_list_json_holds_the_documented_keys(pair):
    source, _ = pair
    put_workflow(source, "a.json", UI_WORKFLOW)
    put_workflow(source, "portraits/b.json", API_WORKFLOW)
    put_workflow(source, "notes.txt", "not a workflow")

    data = json.loads(run("workflows", "list", "source", "--json").out)
    table = run("workflows", "list", "source").out.splitlines()

    assert [item["path"] for item in data] == ["a.json", "portraits/b.json"]
    assert all(set(item) == WORKFLOW_KEYS for item in data)
    assert data[0]["size"] == len(json.dumps(UI_WORKFLOW)) and data[0]["symlink"] is False
    assert data[0]["modified"].endswith("+00:00")
    assert table[0].split() == ["PATH", "SIZE", "MODIFIED"]
    assert table[2].split()[0] == "portraits/b.json"


def test_workflows_list_of_an_unknown_instance_names_the_known_ones(pair):
    result = run("workflows", "list", "nope")

    assert result.code == 2
    assert result.err == "No instance 'nope'. Known: source, target"


def test_copy_waits_for_the_worker_and_prints_each_file(pair, worker_process, storage):
    source, target = pair
    third = made("third")
    put_workflow(source, "a.json", UI_WORKFLOW)
    put_workflow(source, "portraits/b.json", API_WORKFLOW)
    put_workflow(target, "a.json", {"nodes": [], "mine": True})
    worker_process()

    result = run("workflows", "copy", "source", "target", "third", "--name", "a.json", "--name", "portraits/b.json",
                 "--on-conflict", "rename")

    assert result.code == 0, result.err
    assert "Copy workflows 'source' succeeded." in result.out
    assert "  a.json -> target: renamed to a (2).json" in result.out
    assert "  portraits/b.json -> target: written" in result.out
    assert "  a.json -> third: written" in result.out
    assert result.out.splitlines()[-1] == "4 copied, 0 skipped, 0 failed."
    assert json.loads((workflows.workflows_dir(target) / "a (2).json").read_text()) == UI_WORKFLOW
    assert json.loads((workflows.workflows_dir(third) / "portraits" / "b.json").read_text()) == API_WORKFLOW


def test_copy_through_a_real_process_skips_existing_files_by_default(pair, worker_process):
    source, target = pair
    put_workflow(source, "a.json", UI_WORKFLOW)
    put_workflow(target, "a.json", {"nodes": [], "mine": True})
    worker_process()

    result = run_process("workflows", "copy", "source", "target", "--name", "a.json")

    assert result.code == 0, result.err
    assert "  a.json -> target: skipped (exists)" in result.out
    assert "0 copied, 1 skipped, 0 failed." in result.out
    assert json.loads((workflows.workflows_dir(target) / "a.json").read_text())["mine"] is True


def test_copy_all_copies_every_workflow_of_the_source(pair, worker_process):
    source, target = pair
    put_workflow(source, "a.json", UI_WORKFLOW)
    put_workflow(source, "portraits/b.json", API_WORKFLOW)
    put_workflow(source, "portraits/deep/c.json", {"nodes": [], "c": True})
    worker_process()

    result = run_process("workflows", "copy", "source", "target", "--all")

    assert result.code == 0, result.err
    assert result.out.splitlines()[-1] == "3 copied, 0 skipped, 0 failed."
    copied = workflows.workflows_dir(target)
    assert json.loads((copied / "a.json").read_text()) == UI_WORKFLOW
    assert json.loads((copied / "portraits" / "b.json").read_text()) == API_WORKFLOW
    assert json.loads((copied / "portraits" / "deep" / "c.json").read_text()) == {"nodes": [], "c": True}


def test_a_copy_where_nothing_could_be_copied_exits_1(pair, worker_process):
    worker_process()

    result = run("workflows", "copy", "source", "target", "--name", "missing.json")

    assert result.code == 1
    assert "Copy workflows 'source' failed (operation " in result.err
    assert "Nothing was copied: missing.json: refused: 'missing.json' does not exist." in result.err


@pytest.mark.parametrize("args, message", [
    (["source", "target", "--name", "../escape.json"],
     "paths: '../escape.json' is not a workflow path inside the workflows folder (no '..', not absolute)."),
    (["source", "target", "--name", "/etc/a.json"],
     "paths: '/etc/a.json' is not a workflow path inside the workflows folder"),
    (["source", "target", "--name", "a.txt"], "paths: 'a.txt' is not a .json workflow file."),
    (["source", "target"], "paths: Choose at least one workflow to copy."),
    (["source", "target", "--name", "a.json", "--on-conflict", "merge"],
     "on_conflict: 'merge' is not one of skip, overwrite, rename."),
    (["source", "source", "--name", "a.json"], "targets: Choose at least one other instance to copy to."),
    (["source", "nope", "target", "--name", "a.json"], "No instance 'nope'. Known: source, target"),
    (["source", "target", "--name", "a.json", "--all"], "Error: argument --all: not allowed with argument --name"),
    (["source", "target", "--all"], "paths: 'source' has no workflows to copy."),
])
def test_copy_refuses_bad_input_with_exit_code_2(pair, args, message):
    result = run("workflows", "copy", *args)

    assert result.code == 2
    assert result.err.startswith(message), result.err
    assert not Operation.objects.exists()


@pytest.fixture
def library_model(settings):
    path = settings.COMFY_SHARED_PATH / "models" / "checkpoints" / "dreamy_v2.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"weights")
    from storage_app import library

    library.scan()
    return path


def test_check_names_the_node_types_and_models_the_target_lacks(pair, library_model, tmp_path):
    _, target = pair
    Instance.objects.filter(pk=target.pk).update(node_types=["CheckpointLoaderSimple", "KSampler"])
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(UI_WORKFLOW))

    result = run("workflows", "check", "target", str(workflow))

    assert result.code == 1
    assert result.out.splitlines() == [
        f"{workflow} (ui format) on instance 'target':",
        "  node types: 3 used; target lacks 1:",
        "    FancyCustomNode",
        "  models: 1 named; 1 missing:",
        "    checkpoints/dreamy.safetensors (near: dreamy_v2.safetensors)",
        "  models checked against the files on disk (the instance is stopped).",
    ]
    assert result.err == "target lacks what this workflow needs (see above)."


def test_check_json_holds_the_documented_keys(pair, library_model, tmp_path):
    _, target = pair
    Instance.objects.filter(pk=target.pk).update(node_types=["CheckpointLoaderSimple", "KSampler"])
    workflow = tmp_path / "w.json"
    workflow.write_text(json.dumps(UI_WORKFLOW))

    data = json.loads(run("workflows", "check", "target", str(workflow), "--json").out)

    assert set(data) == CHECK_KEYS
    assert (data["instance"], data["file"], data["format"], data["ready"]) == ("target", str(workflow), "ui", False)
    assert data["node_types"] == ["CheckpointLoaderSimple", "FancyCustomNode", "KSampler"]
    assert data["missing_node_types"] == ["FancyCustomNode"] and data["node_types_known"] is True
    assert data["models"] == [{"folder": "checkpoints", "name": "dreamy.safetensors"}]
    assert data["missing_models"] == [{"folder": "checkpoints", "name": "dreamy.safetensors",
                                       "near": ["dreamy_v2.safetensors"]}]


def test_check_reads_another_instances_workflow_and_exits_0_when_nothing_is_missing(pair, library_model):
    source, target = pair
    put_workflow(source, "portraits/api.json", API_WORKFLOW)
    Instance.objects.filter(pk=target.pk).update(node_types=["CheckpointLoaderSimple", "KSampler"])

    result = run("workflows", "check", "target", "source:portraits/api.json")

    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        "source:portraits/api.json (api format) on instance 'target':",
        "  node types: 2 used, all offered by target.",
        "  models: 1 named, all present.",
        "  models checked against the files on disk (the instance is stopped).",
    ]


def test_check_finds_a_model_file_placed_without_a_scan_and_says_it_looked_at_the_files(pair, settings):
    source, target = pair
    placed = settings.COMFY_SHARED_PATH / "models" / "checkpoints" / "dreamy_v2.safetensors"
    placed.parent.mkdir(parents=True, exist_ok=True)
    placed.write_bytes(b"weights")  # no library scan: ComfyHub's database does not know it
    put_workflow(source, "api.json", API_WORKFLOW)
    put_workflow(source, "ui.json", UI_WORKFLOW)

    found = run("workflows", "check", "target", "source:api.json", "--json")
    lacking = run("workflows", "check", "target", "source:ui.json")

    assert found.code == 0, found.out
    data = json.loads(found.out)
    assert data["missing_models"] == [] and data["ready"] is True
    assert data["models_source"] == "checked against the files on disk (the instance is stopped)"
    assert lacking.code == 1
    assert "    checkpoints/dreamy.safetensors (near: dreamy_v2.safetensors)" in lacking.out.splitlines()
    assert "  models checked against the files on disk (the instance is stopped)." in lacking.out.splitlines()


def test_check_says_when_the_node_types_of_an_instance_are_not_known_yet(pair, library_model):
    source, target = pair
    put_workflow(source, "api.json", API_WORKFLOW)

    result = run("workflows", "check", "target", "source:api.json", "--json")

    assert result.code == 0
    assert json.loads(result.out)["node_types_known"] is False
    assert "which target offers is unknown until it has run once" in run("workflows", "check", "target",
                                                                          "source:api.json").out


@pytest.mark.parametrize("name, content, message", [
    ("notes.json", "{not json", "file: {path}: The workflow is not valid JSON: "),
    ("list.json", "[1, 2]", "file: {path}: Not a ComfyUI workflow: the JSON is a list, not an object."),
    ("empty.json", "{}", "file: {path}: Not a ComfyUI workflow: no 'nodes' list (UI format)"),
    ("absent.json", None, "file: Cannot read {path}: No such file or directory."),
])
def test_check_refuses_a_file_that_is_not_a_workflow_with_exit_code_2(pair, tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)

    result = run("workflows", "check", "target", str(path))

    assert result.code == 2
    assert result.err.startswith(message.format(path=path)), result.err


@pytest.mark.parametrize("argument, message", [
    ("source:../../secret.json", "file: source: '../../secret.json' is not a workflow path inside the workflows "
                                 "folder (no '..', not absolute)."),
    ("source:gone.json", "file: source: 'gone.json' does not exist."),
    ("nope:a.json", "No instance 'nope'. Known: source, target"),
])
def test_check_refuses_a_bad_instance_workflow_with_exit_code_2(pair, argument, message):
    result = run("workflows", "check", "target", argument)

    assert result.code == 2
    assert result.err == message


def test_publish_takes_name_json_by_default_and_says_when_content_is_already_there(pair):
    source, _ = pair
    put_workflow(source, "hello.json", UI_WORKFLOW)
    put_workflow(source, "portraits/other.json", API_WORKFLOW)

    first = run("workflows", "publish", "source", "hello")
    again = run("workflows", "publish", "source", "hello")
    second = run("workflows", "publish", "source", "hello", "--path", "portraits/other.json")

    assert first.code == 0, first.err
    assert first.out.strip() == "Published source:hello.json as hello@1."
    assert again.out.strip() == "The library already has this content as hello@1; nothing new was published."
    assert second.out.strip() == "Published source:portraits/other.json as hello@2."


@pytest.mark.parametrize("args, message", [
    (["source", "hello", "--path", "../x.json"],
     "path: '../x.json' is not a workflow path inside the workflows folder (no '..', not absolute)."),
    (["source", "absent"], "path: 'absent.json' does not exist."),
    (["nope", "hello"], "No instance 'nope'. Known: source, target"),
])
def test_publish_refuses_bad_input_with_exit_code_2(pair, args, message):
    result = run("workflows", "publish", *args)

    assert result.code == 2
    assert result.err == message


@pytest.fixture
def published(pair):
    source, _ = pair
    put_workflow(source, "hello.json", UI_WORKFLOW)
    services.workflow_publish(instance=source, path="hello.json", name="hello")
    put_workflow(source, "hello.json", API_WORKFLOW)
    services.workflow_publish(instance=source, path="hello.json", name="hello")
    return source


def test_install_writes_a_library_version_into_instances(published, pair, worker_process):
    _, target = pair
    third = made("third")
    worker_process()

    result = run("workflows", "install", "hello@1", "target", "third")

    assert result.code == 0, result.err
    assert "Install library workflow 'hello': operation" in result.out
    assert "  target: written (hello.json)" in result.out and "  third: written (hello.json)" in result.out
    for instance in (target, third):
        assert json.loads((workflows.workflows_dir(instance) / "hello.json").read_text()) == UI_WORKFLOW
    assert WorkflowInstall.objects.count() == 2


@pytest.mark.parametrize("args, message", [
    (["nope", "target"], "name: No workflow 'nope' in the library."),
    (["hello@7", "target"], "name: 'hello@7': no such version (have: 1, 2)."),
    (["hello", "nope"], "No instance 'nope'. Known: source, target"),
])
def test_install_refuses_an_unknown_library_name_or_version_with_exit_code_2(published, args, message):
    result = run("workflows", "install", *args)

    assert result.code == 2
    assert result.err == message
    assert not Operation.objects.exists()


def test_library_json_lists_entries_versions_and_holders(published, pair, run_worker):
    _, target = pair
    assert run("workflows", "install", "hello", "target", "--no-wait").code == 0
    run_worker()

    [entry] = json.loads(run("workflows", "library", "--json").out)
    text = run("workflows", "library").out

    assert set(entry) == ENTRY_KEYS
    assert (entry["name"], entry["latest"]) == ("hello", 2)
    assert [v["number"] for v in entry["versions"]] == [2, 1]
    assert all(set(v) == VERSION_KEYS for v in entry["versions"])
    assert entry["versions"][0]["published_from"] == "source:hello.json" and entry["versions"][0]["author"] == ""
    assert entry["holders"] == [{"instance": "target", "path": "hello.json", "version": 2, "state": "installed"}]
    assert "hello  latest 2, 2 version(s)" in text
    assert "  held by target:hello.json  @2 (installed)" in text


def test_an_empty_library_is_an_empty_json_list(storage):
    assert json.loads(run("workflows", "library", "--json").out) == []


# === templates =====================================================================================================

@pytest.fixture
def starter(storage):
    author = made("author")
    put_workflow(author, "hello.json", {"nodes": [{"id": 1, "type": "KSampler"}]})
    version, _ = services.workflow_publish(instance=author, path="hello.json", name="hello")
    return version


def test_templates_create_self_service_marks_it_for_self_service_users(starter):
    result = run("templates", "create", "sketchpad", "--self-service")

    assert result.code == 0, result.err
    assert result.out.splitlines()[0].startswith("Created self-service template 'sketchpad': 0 GPU(s)")
    [data] = [t for t in json.loads(run("templates", "list", "--json").out) if t["name"] != "multi-gpu"]
    assert data["self_service"] is True


def test_templates_create_saves_every_option_and_list_json_shows_them(starter, repo):
    url, _ = repo

    result = run("templates", "create", "studio-sdxl", "--description", "For the art team", "--image", "comfy:sdxl",
                 "--arg=--preview-method", "--arg=auto", "--env", "TEAM=art", "--gpus", "2", "--node", f"{url}@v1",
                 "--node", "git@github.com:example/Other-Nodes.git", "--setting", "Comfy.LinkRenderMode=2",
                 "--setting", 'Comfy.Locale="en"', "--workflow", "hello")

    assert result.code == 0, result.err
    assert result.out.splitlines()[0] == ("Created template 'studio-sdxl': 2 GPU(s), 2 custom node(s), 2 setting(s), "
                                          "1 starter workflow(s).")
    [data] = [t for t in json.loads(run("templates", "list", "--json").out) if t["name"] != "multi-gpu"]
    assert set(data) == TEMPLATE_KEYS
    assert (data["name"], data["description"], data["image"], data["gpu_count"], data["self_service"]) == (
        "studio-sdxl", "For the art team", "comfy:sdxl", 2, False)
    assert data["extra_args"] == ["--preview-method", "auto"] and data["extra_env"] == {"TEAM": "art"}
    assert data["custom_nodes"] == [{"url": url, "ref": "v1"},
                                    {"url": "git@github.com:example/Other-Nodes.git", "ref": ""}]
    assert data["settings"] == {"Comfy.LinkRenderMode": 2, "Comfy.Locale": "en"}
    assert data["starter_workflows"] == ["hello@1"] and data["instances"] == []
    rows = [line.split() for line in run("templates", "list").out.splitlines()[1:]]
    assert ["studio-sdxl", "2", "2", "1", "-", "comfy:sdxl"] in rows  # beside the built-in multi-gpu


@pytest.mark.parametrize("args, message", [
    (["Bad_Name"], "name: Use lowercase letters, digits and '-' for a template name ('new' is taken by the page that creates one)."),
    (["t", "--node", "not a url"], "custom_nodes: 'not a url' is not a git URL"),
    (["t", "--node=--upload-pack=evil"], "custom_nodes: '--upload-pack=evil' is not a git URL"),
    (["t", "--setting", "Comfy.Locale=en"], "settings: The value of setting Comfy.Locale is not valid JSON"),
    (["t", "--setting", "k=" + "[" * 5000 + "]" * 5000], "settings: The value of setting k nests 5,000 levels deep; "
                                                         "at most 64 are taken (UPLOAD_MAX_DEPTH)."),
    (["t", "--gpus", "²"], "gpu_count: '²' is not a number of GPUs"),
    (["t", "--setting", "novalue"], "settings: 'novalue' is not KEY=JSON"),
    (["t", "--workflow", "nope"], "starter_workflows: No workflow 'nope' in the library."),
    (["t", "--workflow", "hello@9"], "starter_workflows: 'hello@9': no such version (have: 1)."),
    (["t", "--gpus", "two"], "gpu_count: 'two' is not a number of GPUs"),
    (["t", "--env", "COMFY_X=1"], "extra_env: 'COMFY_X' is reserved"),
    (["t", "--arg=--port=1"], "extra_args: '--port' is set by ComfyHub"),
])
def test_templates_create_refuses_bad_input_with_exit_code_2(starter, args, message):
    result = run("templates", "create", *args)

    assert result.code == 2
    assert result.err.startswith(message), result.err
    assert not InstanceTemplate.objects.exclude(name="multi-gpu").exists()


@pytest.fixture
def template(starter, repo):
    url, _ = repo
    return services.template_create(name="studio-sdxl", image="comfy:sdxl", extra_env={"TEAM": "art"}, gpu_count=1,
                                    custom_nodes=[{"url": url, "ref": "v1"}],
                                    settings_values={"Comfy.LinkRenderMode": 2}, starter_workflows=[starter])


def test_templates_new_creates_the_instance_and_waits_for_the_template_to_apply(template, worker_process, storage):
    worker_process()

    result = run("templates", "new", "studio-sdxl", "made", "--name", "Made")

    assert result.code == 0, result.err
    instance = Instance.objects.get(instance_id="made")
    assert instance.template == template and instance.display_name == "Made"
    assert result.out.splitlines()[0] == (f"Created instance 'made' from template 'studio-sdxl': port "
                                          f"{instance.host_port}, GPUs {instance.assigned_gpus()[0].index}, image "
                                          "comfy:sdxl.")
    assert "Apply template 'made' succeeded." in result.out
    assert "  settings: 1 written" in result.out
    assert "  workflow hello@1: written (hello.json)" in result.out
    assert "  custom node ComfyUI-Test-Nodes: installed at " in result.out
    assert json.loads((storage["instances"] / "made" / "user" / "default" / "comfy.settings.json").read_text()) == {
        "Comfy.LinkRenderMode": 2}
    assert templating.drift(instance) == []


@pytest.mark.parametrize("args, message", [
    (["nope", "made"], "No template 'nope'. Known: multi-gpu, studio-sdxl"),
    (["studio-sdxl", "Bad_Id"], "instance_id: Use lowercase letters a-z, digits and '-'"),
    (["studio-sdxl", "made", "--port", "eighty"], "host_port: 'eighty' is not a port number"),
])
def test_templates_new_refuses_bad_input_with_exit_code_2(template, args, message):
    result = run("templates", "new", *args)

    assert result.code == 2
    assert result.err.startswith(message), result.err
    assert not Instance.objects.filter(template=template).exists()


def test_templates_apply_writes_the_template_into_an_existing_instance(template, pair, run_worker, storage):
    _, target = pair

    result = run("templates", "apply", "studio-sdxl", "target", "--no-wait")

    assert result.code == 0
    operation = Operation.objects.get(pk=uuid.UUID(result.out.strip()))
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert (workflows.workflows_dir(target) / "hello.json").exists()
    assert Instance.objects.get(pk=target.pk).template == template
    assert run("templates", "apply", "studio-sdxl", "nope").err == "No instance 'nope'. Known: author, source, target"


def test_templates_drift_json_shows_what_differs(template, run_worker, storage):
    instance, _ = services.instance_create_from_template(template=template, instance_id="drifty")
    run_worker()
    settings_file = storage["instances"] / "drifty" / "user" / "default" / "comfy.settings.json"
    settings_file.write_text(json.dumps({"Comfy.LinkRenderMode": 0}))

    data = json.loads(run("templates", "drift", "drifty", "--json").out)
    text = run("templates", "drift", "drifty").out

    assert set(data) == {"instance", "template", "differences"}
    assert (data["instance"], data["template"]) == ("drifty", "studio-sdxl")
    assert data["differences"] == [{"what": "setting Comfy.LinkRenderMode", "template": 2, "instance": 0}]
    assert text.splitlines() == ["drifty differs from template 'studio-sdxl' in 1 place(s):",
                                 "  setting Comfy.LinkRenderMode: template 2, instance 0"]


def test_templates_drift_of_an_instance_without_a_template(pair):
    data = json.loads(run("templates", "drift", "source", "--json").out)

    assert data == {"instance": "source", "template": None, "differences": []}
    assert "was not made from a template" in run("templates", "drift", "source").out
    assert run("templates", "drift", "nope").code == 2


# === nodes =========================================================================================================

@pytest.fixture
def studio(storage):
    return made("studio")


def test_nodes_install_waits_for_the_worker_in_a_real_process(studio, repo, worker_process, storage):
    url, commits = repo
    worker_process()

    result = run_process("nodes", "install", "studio", url, "--ref", "v1")

    assert result.code == 0, result.err
    assert "Install custom node 'studio': operation" in result.out
    assert f"cloning {url}" in result.out
    assert f"Installed ComfyUI-Test-Nodes at {commits['v1'][:12]}; restart studio to load it." in result.out
    node = CustomNode.objects.get(instance=studio)
    assert (node.url, node.ref, node.commit) == (url, "v1", commits["v1"])
    assert (storage["instances"] / "studio" / "custom_nodes" / "ComfyUI-Test-Nodes" / "__init__.py").is_file()


def test_nodes_list_json_holds_the_documented_keys(studio, repo, storage):
    url, commits = repo
    customnodes.install(studio, url, "v1")
    (storage["instances"] / "studio" / "custom_nodes" / "By-Hand").mkdir()

    data = json.loads(run("nodes", "list", "studio", "--json").out)
    table = run("nodes", "list", "studio").out.splitlines()

    assert all(set(item) == NODE_KEYS for item in data)
    by_hand, managed = data
    assert (managed["name"], managed["url"], managed["ref"], managed["commit"], managed["recorded_commit"]) == (
        "ComfyUI-Test-Nodes", url, "v1", commits["v1"], commits["v1"])
    assert (managed["dirty"], managed["enabled"], managed["managed"], managed["present"]) == (None, True, True, True)
    assert (by_hand["name"], by_hand["managed"], by_hand["url"]) == ("By-Hand", False, "")
    assert table[0].split() == ["NAME", "STATE", "COMMIT", "REF", "URL"]
    assert table[2].split() == ["ComfyUI-Test-Nodes", "enabled", commits["v1"][:12], "v1", url]


def test_nodes_disable_enable_update_and_remove_wait_for_the_worker(studio, repo, worker_process, storage):
    url, commits = repo
    customnodes.install(studio, url, "v1")
    folder = storage["instances"] / "studio" / "custom_nodes" / "ComfyUI-Test-Nodes"
    worker_process()

    disabled = run("nodes", "disable", "studio", "ComfyUI-Test-Nodes")
    assert disabled.code == 0, disabled.err
    assert "ComfyUI-Test-Nodes disabled (restart the instance to load the change)" in disabled.out
    assert folder.with_name("ComfyUI-Test-Nodes.disabled").is_dir() and not folder.exists()
    assert json.loads(run("nodes", "list", "studio", "--json").out)[0]["enabled"] is False

    assert run("nodes", "enable", "studio", "ComfyUI-Test-Nodes").code == 0
    assert folder.is_dir()

    updated = run("nodes", "update", "studio", "ComfyUI-Test-Nodes", "--ref", "main")
    assert updated.code == 0, updated.err
    assert f"ComfyUI-Test-Nodes is at {commits['main'][:12]}." in updated.out
    assert CustomNode.objects.get().commit == commits["main"]

    removed = run("nodes", "remove", "studio", "ComfyUI-Test-Nodes")
    assert removed.code == 0, removed.err
    assert not folder.exists() and not CustomNode.objects.exists()


def test_a_node_install_that_fails_exits_1_and_leaves_nothing(studio, worker_process, tmp_path, storage, node_git):
    worker_process()

    result = run("nodes", "install", "studio", f"file://{tmp_path}/no-such-repo")

    assert result.code == 1
    assert "Install custom node 'studio' failed (operation " in result.err
    assert "git clone failed" in result.err and "Nothing was installed." in result.err
    assert not CustomNode.objects.exists()
    assert list((storage["instances"] / "studio" / "custom_nodes").iterdir()) == []


@pytest.mark.parametrize("args, message", [
    (["install", "studio", "not a url"], "url: 'not a url' is not a git URL (https://…, ssh://…, git@host:path, or "
                                         "file://… where CUSTOM_NODE_LOCAL_SOURCES allows it)."),
    (["install", "studio", "ftp://example.org/x.git"], "url: 'ftp://example.org/x.git' is not a git URL"),
    (["install", "studio", "https://example.org/x.git", "--ref=-x"], "ref: '-x' is not a branch, tag or commit."),
    (["install", "nope", "https://example.org/x.git"], "No instance 'nope'. Known: studio"),
    (["update", "studio", "Missing"], "name: studio has no custom node 'Missing' installed by ComfyHub."),
    (["disable", "studio", "Missing"], "name: studio has no custom node 'Missing' installed by ComfyHub."),
    (["remove", "nope", "Missing"], "No instance 'nope'. Known: studio"),
])
def test_nodes_refuse_bad_input_with_exit_code_2(studio, args, message):
    result = run("nodes", *args)

    assert result.code == 2
    assert result.err.startswith(message), result.err
    assert not Operation.objects.exists()
