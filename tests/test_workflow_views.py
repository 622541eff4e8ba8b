"""The workflow pages: an instance's workflows (pre-flight, copy, publish, checking an uploaded file) and the shared
library, seen by an operator, a stranger and someone not logged in."""
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from comfyhub.models import Operation
from instances import services, workflows
from instances.models import Instance, WorkflowEntry, WorkflowInstall, WorkflowVersion
from storage_app import layout, library

pytestmark = pytest.mark.django_db(transaction=True)

DEAD_REDIS = "unix:///nonexistent/comfyhub-redis.sock?db=0"
PORTRAIT = {
    "last_node_id": 3, "links": [],
    "nodes": [
        {"id": 1, "type": "CheckpointLoaderSimple", "widgets_values": ["dreamy_v2.safetensors"]},
        {"id": 2, "type": "FancyCustomNode", "widgets_values": [42]},
    ],
}
API_WORKFLOW = {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "dreamy_v1.safetensors"}}}


@pytest.fixture
def source(storage):
    instance = services.instance_create(instance_id="wf-source")
    layout.build_instance_tree(instance.instance_id)
    return instance


@pytest.fixture
def target(storage):
    instance = services.instance_create(instance_id="wf-target")
    layout.build_instance_tree(instance.instance_id)
    return instance


@pytest.fixture
def redis_down(settings):
    settings.REDIS_URL = DEAD_REDIS
    settings.RQ_QUEUES = {name: {"URL": DEAD_REDIS} for name in settings.RQ_QUEUES}


def put_workflow(instance, relpath, data):
    path = workflows.workflows_dir(instance) / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def put_shared_model(storage, relpath):
    path = storage["shared"] / "models" / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    library.scan()


def url(name, instance=None):
    return reverse(name, args=[instance.instance_id] if instance is not None else [])


def messages_of(response):
    return [str(m) for m in response.context["messages"]] if response.context else []


INSTANCE_PAGES = ["instance-workflows"]
INSTANCE_POSTS = ["instance-workflows-check", "instance-workflows-copy", "instance-workflow-publish",
                  "instance-workflow-check-file"]


# --- Who may do what -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", INSTANCE_PAGES + INSTANCE_POSTS)
def test_every_workflow_page_sends_someone_not_logged_in_to_the_login_page(client, source, name):
    for response in (client.get(url(name, source)), client.post(url(name, source))):
        assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.parametrize("name", ["library", "library-install"])
def test_the_library_sends_someone_not_logged_in_to_the_login_page(client, name):
    for response in (client.get(url(name)), client.post(url(name))):
        assert response.status_code == 302 and response["Location"].startswith("/login/")


@pytest.mark.parametrize("name", INSTANCE_POSTS)
def test_a_stranger_may_not_check_copy_publish_or_upload(client, stranger, source, target, name):
    put_workflow(source, "a.json", PORTRAIT)
    client.force_login(stranger)
    response = client.post(url(name, source), {
        "paths": ["a.json"], "targets": ["wf-target"], "on_conflict": "skip", "path": "a.json", "name": "a",
        "file": SimpleUploadedFile("a.json", json.dumps(PORTRAIT).encode()),
    })
    assert response.status_code == 403
    assert not Operation.objects.exists() and not WorkflowEntry.objects.exists()


def test_a_stranger_may_not_install_from_the_library(client, stranger, source, target):
    put_workflow(source, "a.json", PORTRAIT)
    services.workflow_publish(instance=source, path="a.json", name="portrait")
    client.force_login(stranger)
    response = client.post(url("library-install"), {"name": "portrait", "version": "1", "instances": ["wf-target"]})
    assert response.status_code == 403 and not Operation.objects.exists()


def test_a_stranger_sees_the_workflows_and_the_library_but_no_forms(client, stranger, source, target):
    put_workflow(source, "a.json", PORTRAIT)
    services.workflow_publish(instance=source, path="a.json", name="portrait")
    client.force_login(stranger)
    content = client.get(url("instance-workflows", source)).content.decode()
    assert "<code>a.json</code>" in content
    for form in ('id="copy-form"', ">Publish<", "Check a workflow file", 'name="paths"'):
        assert form not in content
    content = client.get(url("library")).content.decode()
    assert "portrait" in content and ">Install<" not in content


@pytest.mark.parametrize("name", INSTANCE_POSTS)
def test_the_workflow_actions_only_answer_post(client, operator, source, name):
    client.force_login(operator)
    assert client.get(url(name, source)).status_code == 405


def test_an_unknown_instance_is_not_found(client, operator):
    client.force_login(operator)
    assert client.get(url("instance-workflows", Instance(instance_id="nobody"))).status_code == 404
    assert client.post(url("instance-workflows-copy", Instance(instance_id="nobody"))).status_code == 404


# --- The list ------------------------------------------------------------------------------------------------

def test_the_page_lists_each_workflow_with_size_and_date_and_offers_the_other_instances(client, operator, source,
                                                                                          target):
    put_workflow(source, "a.json", PORTRAIT)
    put_workflow(source, "portraits/b.json", API_WORKFLOW)
    put_workflow(source, "notes.txt", "not a workflow")
    client.force_login(operator)
    response = client.get(url("instance-workflows", source))
    content = response.content.decode()
    rows = [w["path"] for w in response.context["workflows"]]
    assert rows == ["a.json", "portraits/b.json"]
    row = content.split('data-workflow="portraits/b.json"')[1].split("</tr>")[0]
    assert f"{len(json.dumps(API_WORKFLOW))}\xa0bytes" in row
    assert 'name="paths" value="portraits/b.json" form="copy-form"' in row
    assert "notes.txt" not in content
    copy_form = content.split('id="copy-form"')[1]
    assert 'value="wf-target"' in copy_form and 'value="wf-source"' not in copy_form
    assert 'value="skip"' in copy_form and 'value="overwrite"' in copy_form and 'value="rename"' in copy_form


def test_a_linked_workflow_is_marked_and_cannot_be_selected(client, operator, source, tmp_path):
    (tmp_path / "elsewhere.json").write_text("{}")
    workflows.workflows_dir(source).mkdir(parents=True, exist_ok=True)
    (workflows.workflows_dir(source) / "link.json").symlink_to(tmp_path / "elsewhere.json")
    client.force_login(operator)
    row = client.get(url("instance-workflows", source)).content.decode().split('data-workflow="link.json"')[1]
    row = row.split("</tr>")[0]
    assert ">link<" in row and 'name="paths"' not in row


def test_the_instance_page_links_to_its_workflows_nodes_and_drift(client, stranger, source):
    client.force_login(stranger)
    links = client.get(source.get_absolute_url()).content.decode().split('data-testid="instance-subnav"')[1]
    links = links.split("</p>")[0]
    for name in ("instance-workflows", "instance-nodes", "instance-drift"):
        assert f'href="{url(name, source)}"' in links


# --- The pre-flight ------------------------------------------------------------------------------------------

def test_check_lists_what_each_target_lacks_in_place(client, operator, source, target, storage):
    put_workflow(source, "a.json", PORTRAIT)
    put_shared_model(storage, "checkpoints/dreamy_v1.safetensors")
    client.force_login(operator)
    response = client.post(url("instance-workflows-check", source), {"paths": ["a.json"], "targets": ["wf-target"]},
                           headers={"HX-Request": "true"})
    content = response.content.decode()
    assert response.status_code == 200 and "<html" not in content and "{#" not in content
    result = content.split('data-target="wf-target"')[1]
    missing = result.split('class="table compact missing-models"')[1]
    assert "<code>dreamy_v2.safetensors</code>" in missing and "checkpoints" in missing
    assert "<code>dreamy_v1.safetensors</code>" in missing  # the near match
    # It never ran, so its node types are unknown, and the page says so instead of claiming it has them all.
    assert "has never run, so the node types it offers are unknown" in result
    assert "FancyCustomNode" not in result
    # The copy button now says that copying goes ahead despite what is missing.
    assert '<button type="submit" id="copy-submit" class="primary" hx-swap-oob="true">Copy anyway</button>' in content


def test_check_finds_a_model_placed_without_a_scan_and_names_where_it_looked(client, operator, source, target,
                                                                             storage):
    put_workflow(source, "a.json", PORTRAIT)
    placed = storage["shared"] / "models" / "checkpoints" / "dreamy_v2.safetensors"
    placed.parent.mkdir(parents=True, exist_ok=True)
    placed.write_bytes(b"x")  # no library scan: ComfyHub's database does not know it
    client.force_login(operator)
    response = client.post(url("instance-workflows-check", source), {"paths": ["a.json"], "targets": ["wf-target"]},
                           headers={"HX-Request": "true"})
    result = response.content.decode().split('data-target="wf-target"')[1]
    assert "It has every model file the workflow names." in result and "missing-models" not in result
    assert "Models checked against the files on disk (the instance is stopped)." in result
    content = upload(client, source, json.dumps(API_WORKFLOW).encode()).content.decode()
    assert "<code>dreamy_v1.safetensors</code>" in content.split('class="table compact missing-models"')[1]
    assert "Models checked against the files on disk (the instance is stopped)." in content


def test_check_lists_node_types_the_target_lacks_when_it_has_run(client, operator, source, target, storage):
    put_workflow(source, "a.json", PORTRAIT)
    put_shared_model(storage, "checkpoints/dreamy_v2.safetensors")
    Instance.objects.filter(pk=target.pk).update(node_types=["CheckpointLoaderSimple", "KSampler"])
    client.force_login(operator)
    content = client.post(url("instance-workflows-check", source), {"paths": ["a.json"], "targets": ["wf-target"]},
                          headers={"HX-Request": "true"}).content.decode()
    assert '<code class="missing">FancyCustomNode</code>' in content
    assert "It has every model file the workflow names." in content
    Instance.objects.filter(pk=target.pk).update(node_types=["CheckpointLoaderSimple", "FancyCustomNode"])
    content = client.post(url("instance-workflows-check", source), {"paths": ["a.json"], "targets": ["wf-target"]},
                          headers={"HX-Request": "true"}).content.decode()
    assert ">ready<" in content and 'hx-swap-oob="true">Copy</button>' in content


def test_check_without_htmx_shows_the_whole_page_with_the_result(client, operator, source, target):
    put_workflow(source, "a.json", PORTRAIT)
    client.force_login(operator)
    response = client.post(url("instance-workflows-check", source), {"paths": ["a.json"], "targets": ["wf-target"]})
    content = response.content.decode()
    assert "<html" in content and "<code>dreamy_v2.safetensors</code>" in content
    assert 'value="a.json" form="copy-form" id="select-1" aria-label="Select a.json" checked' in content
    assert ">Copy anyway</button>" in content


@pytest.mark.parametrize("data, message", [
    ({"targets": ["wf-target"]}, "Choose at least one workflow to check."),
    ({"paths": ["a.json"]}, "Choose at least one other instance to check against."),
])
def test_check_needs_workflows_and_targets(client, operator, source, target, data, message):
    put_workflow(source, "a.json", PORTRAIT)
    client.force_login(operator)
    content = client.post(url("instance-workflows-check", source), data,
                          headers={"HX-Request": "true"}).content.decode()
    assert message in content.split('data-testid="preflight-errors"')[1]


def test_check_names_a_workflow_it_cannot_read(client, operator, source, target):
    put_workflow(source, "broken.json", "{not json")
    client.force_login(operator)
    content = client.post(url("instance-workflows-check", source),
                          {"paths": ["broken.json", "../x.json"], "targets": ["wf-target"]},
                          headers={"HX-Request": "true"}).content.decode()
    assert "The workflow is not valid JSON" in content.split('data-path="broken.json"')[1]
    assert "is not a workflow path inside the workflows folder" in content.split('data-path="../x.json"')[1]


# --- Copy ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data, field, message", [
    ({"paths": ["../escape.json"], "targets": ["wf-target"], "on_conflict": "skip"}, "paths",
     "is not a workflow path inside the workflows folder (no '..', not absolute)"),
    ({"paths": ["a.json"], "on_conflict": "skip"}, "targets", "Choose at least one other instance to copy to."),
    ({"paths": ["a.json"], "targets": ["wf-target"], "on_conflict": "bogus"}, "on_conflict",
     "'bogus' is not one of skip, overwrite, rename."),
    ({"targets": ["wf-target"], "on_conflict": "skip"}, "paths", "Choose at least one workflow to copy."),
])
def test_bad_copy_requests_say_what_is_wrong_next_to_the_field_and_queue_nothing(client, operator, source, target,
                                                                                 data, field, message):
    put_workflow(source, "a.json", PORTRAIT)
    client.force_login(operator)
    response = client.post(url("instance-workflows-copy", source), data)
    assert response.status_code == 200
    assert any(message in error for error in response.context["copy_form"].errors[field])
    error = response.content.decode().split(f'data-testid="error-{field}"')[1].split("</ul>")[0]
    assert message.replace("'", "&#x27;") in error
    assert not Operation.objects.exists()
    assert not (workflows.workflows_dir(target) / "a.json").exists()


def test_copying_queues_an_operation_whose_result_lists_each_file(client, operator, source, target, run_worker):
    put_workflow(source, "a.json", PORTRAIT)
    put_workflow(source, "portraits/b.json", API_WORKFLOW)
    put_workflow(target, "a.json", {"nodes": [], "mine": True})
    client.force_login(operator)
    response = client.post(url("instance-workflows-copy", source), {
        "paths": ["a.json", "portraits/b.json"], "targets": ["wf-target"], "on_conflict": "rename"})
    operation = Operation.objects.get()
    assert response.status_code == 302 and response["Location"] == operation.get_absolute_url()
    assert operation.kind == "workflows_copy" and operation.requested_by == operator
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert json.loads((workflows.workflows_dir(target) / "a (2).json").read_text()) == PORTRAIT
    assert json.loads((workflows.workflows_dir(target) / "portraits/b.json").read_text()) == API_WORKFLOW
    page = client.get(operation.get_absolute_url()).content.decode()
    assert "a.json -&gt; wf-target: renamed to a (2).json" in page
    assert "portraits/b.json -&gt; wf-target: written" in page
    listed = client.get(url("instance-workflows", target)).content.decode()
    assert "<code>a (2).json</code>" in listed and "<code>portraits/b.json</code>" in listed


def test_copy_all_copies_every_workflow_of_the_source_whichever_are_ticked(client, operator, source, target,
                                                                          run_worker):
    put_workflow(source, "a.json", PORTRAIT)
    put_workflow(source, "portraits/b.json", API_WORKFLOW)
    client.force_login(operator)
    page = client.get(url("instance-workflows", source)).content.decode()
    button = page.split('id="copy-all-submit"')[1].split(">")[0]
    assert 'name="all_workflows" value="on"' in button  # a submit of the copy form: works without JavaScript

    response = client.post(url("instance-workflows-copy", source), {
        "paths": ["a.json"], "targets": ["wf-target"], "on_conflict": "skip", "all_workflows": "on"})

    operation = Operation.objects.get()
    assert response.status_code == 302 and response["Location"] == operation.get_absolute_url()
    assert any("Copying every workflow from" in m for m in messages_of(client.get(response["Location"])))
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert json.loads((workflows.workflows_dir(target) / "a.json").read_text()) == PORTRAIT
    assert json.loads((workflows.workflows_dir(target) / "portraits/b.json").read_text()) == API_WORKFLOW


def test_copying_says_the_job_queue_is_unavailable(client, operator, source, target, redis_down):
    put_workflow(source, "a.json", PORTRAIT)
    client.force_login(operator)
    response = client.post(url("instance-workflows-copy", source),
                           {"paths": ["a.json"], "targets": ["wf-target"], "on_conflict": "skip"})
    assert response.status_code == 200
    assert any("The job queue is unavailable" in m for m in messages_of(response))
    assert not Operation.objects.exists()


# --- Publish -------------------------------------------------------------------------------------------------

def test_publishing_says_new_version_or_nothing_new(client, operator, source):
    put_workflow(source, "a.json", PORTRAIT)
    client.force_login(operator)
    response = client.post(url("instance-workflow-publish", source), {"path": "a.json", "name": "portrait"},
                           follow=True)
    assert response.redirect_chain[-1][0] == url("instance-workflows", source)
    assert "Published a.json to the library as 'portrait': new version 1." in messages_of(response)
    response = client.post(url("instance-workflow-publish", source), {"path": "a.json", "name": "portrait"},
                           follow=True)
    assert "a.json is identical to version 1 of 'portrait': nothing new." in messages_of(response)
    put_workflow(source, "a.json", API_WORKFLOW)
    response = client.post(url("instance-workflow-publish", source), {"path": "a.json", "name": "portrait"},
                           follow=True)
    assert "Published a.json to the library as 'portrait': new version 2." in messages_of(response)
    version = WorkflowVersion.objects.get(number=1)
    assert version.author == operator and version.published_from == "wf-source:a.json"


@pytest.mark.parametrize("data, message", [
    ({"path": "a.json", "name": "a/b"}, "A library name is 1-200 characters without '/', '\\' or '@'"),
    ({"path": "a.json", "name": ""}, "A library name is 1-200 characters without '/', '\\' or '@'"),
    ({"path": "../a.json", "name": "x"}, "is not a workflow path inside the workflows folder"),
    ({"path": "missing.json", "name": "x"}, "'missing.json' does not exist."),
])
def test_publishing_something_wrong_says_why_and_publishes_nothing(client, operator, source, data, message):
    put_workflow(source, "a.json", PORTRAIT)
    client.force_login(operator)
    response = client.post(url("instance-workflow-publish", source), data, follow=True)
    assert any(message in m for m in messages_of(response))
    assert not WorkflowEntry.objects.exists()


# --- Checking an uploaded file -------------------------------------------------------------------------------

def upload(client, instance, content, name="mine.json", htmx=True):
    return client.post(url("instance-workflow-check-file", instance),
                       {"file": SimpleUploadedFile(name, content, content_type="application/json")},
                       headers={"HX-Request": "true"} if htmx else {})


def test_an_uploaded_workflow_is_checked_against_this_instance(client, operator, source):
    client.force_login(operator)
    content = upload(client, source, json.dumps(API_WORKFLOW).encode()).content.decode()
    assert '<code>mine.json</code>' in content and 'data-target="wf-source"' in content
    assert "<code>dreamy_v1.safetensors</code>" in content and "API format" in content
    assert "copy-submit" not in content
    assert not WorkflowEntry.objects.exists()
    assert workflows.list_workflows(source) == []


@pytest.mark.parametrize("content, message", [
    (b"{not json", "mine.json: The workflow is not valid JSON: Expecting property name"),
    (b'{"hello": "world"}', "mine.json: Not a ComfyUI workflow"),
    (b"[1, 2]", "mine.json: Not a ComfyUI workflow: the JSON is a list, not an object."),
    (b'{"nodes": "KSampler"}', "mine.json: 'nodes' is a string; a UI-format workflow has a list of nodes there."),
    (b"[" * 5000 + b"]" * 5000, "mine.json: The workflow nests 5,000 levels deep; at most 64 are taken "
                                "(UPLOAD_MAX_DEPTH)."),
    (b"", "The submitted file is empty."),
])
def test_an_upload_that_is_no_workflow_says_so(client, operator, source, content, message):
    client.force_login(operator)
    errors = upload(client, source, content).content.decode().split('data-testid="preflight-errors"')[1]
    assert message in errors.replace("&#x27;", "'")


def test_an_oversized_upload_is_refused_by_its_size_naming_the_setting(client, operator, source, settings):
    settings.UPLOAD_MAX_BYTES = 4096
    client.force_login(operator)
    content = upload(client, source, b" " * 5000).content.decode()
    assert "The workflow file mine.json is 4.9\xa0KB; at most 4.0\xa0KB is taken (UPLOAD_MAX_BYTES)." in content


def test_an_upload_without_htmx_shows_the_whole_page(client, operator, source):
    client.force_login(operator)
    content = upload(client, source, b"{not json", htmx=False).content.decode()
    assert "<html" in content and "mine.json: The workflow is not valid JSON" in \
        content.split('data-testid="upload-result"')[1]


# --- The library ---------------------------------------------------------------------------------------------

def test_the_library_lists_versions_and_who_holds_them(client, operator, admin_user, source, target, run_worker):
    put_workflow(source, "a.json", PORTRAIT)
    v1, _ = services.workflow_publish(instance=source, path="a.json", name="portrait", user=admin_user)
    put_workflow(source, "a.json", API_WORKFLOW)
    services.workflow_publish(instance=source, path="a.json", name="portrait")
    services.workflow_install(spec="portrait@1", instances=[target, source])
    run_worker()
    put_workflow(source, "portrait.json", {"nodes": [], "edited": True})
    client.force_login(operator)
    content = client.get(url("library")).content.decode()
    entry = content.split('data-entry="portrait"')[1]
    first = entry.split('data-version="1"')[1].split("</tr>")[0]
    assert f'<code title="{v1.sha256}">{v1.sha256[:12]}</code>' in first
    assert "alice" in first and "<code>wf-source:a.json</code>" in first
    assert 'data-version="2"' in entry
    installed = entry.split('data-holder="wf-target"')[1].split("</tr>")[0]
    assert "<code>portrait.json</code>" in installed and "<td>1</td>" in installed and ">installed<" in installed
    assert ">modified<" in entry.split('data-holder="wf-source"')[1].split("</tr>")[0]
    assert '<option value="2">version 2</option>' in entry


def test_installing_from_the_library_queues_an_operation(client, operator, source, target, run_worker):
    put_workflow(source, "a.json", PORTRAIT)
    services.workflow_publish(instance=source, path="a.json", name="portrait")
    client.force_login(operator)
    response = client.post(url("library-install"), {"name": "portrait", "version": "1", "instances": ["wf-target"]})
    operation = Operation.objects.get()
    assert response["Location"] == operation.get_absolute_url()
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert json.loads((workflows.workflows_dir(target) / "portrait.json").read_text()) == PORTRAIT
    assert WorkflowInstall.objects.get().instance == target


@pytest.mark.parametrize("data, message", [
    ({"name": "portrait", "version": "7", "instances": ["wf-target"]}, "no such version (have: 1)"),
    ({"name": "portrait", "version": "1"}, "Choose at least one instance."),
    ({"name": "nope", "version": "1", "instances": ["wf-target"]}, "No workflow &#x27;nope&#x27; in the library."),
])
def test_a_bad_install_says_why_and_queues_nothing(client, operator, source, target, data, message):
    put_workflow(source, "a.json", PORTRAIT)
    services.workflow_publish(instance=source, path="a.json", name="portrait")
    client.force_login(operator)
    response = client.post(url("library-install"), data)
    assert response.status_code == 200 and message in response.content.decode()
    assert not Operation.objects.exists()
