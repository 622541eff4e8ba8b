"""The template pages: the list, creating one, one template with the instances using it, new instances from it,
applying it, and an instance's drift from its template."""
import json

import pytest
from django.urls import reverse

from comfyhub.models import Operation
from instances import services, workflows
from instances.distribution import MULTIGPU_TEMPLATE
from instances.models import Instance, InstanceTemplate
from storage_app import layout
from tests.support.gitrepos import make_node_repo

pytestmark = pytest.mark.django_db(transaction=True)

DEAD_REDIS = "unix:///nonexistent/comfyhub-redis.sock?db=0"


@pytest.fixture
def starter(storage):
    author = services.instance_create(instance_id="author")
    layout.build_instance_tree("author")
    (workflows.workflows_dir(author) / "hello.json").write_text(json.dumps({"nodes": [{"id": 1, "type": "KSampler"}]}))
    version, _ = services.workflow_publish(instance=author, path="hello.json", name="hello")
    return version


@pytest.fixture
def node_repo(tmp_path, node_git):
    url, _ = make_node_repo(tmp_path / "repos")
    return url


@pytest.fixture
def template(starter, node_repo):
    return services.template_create(
        name="studio", description="The studio's setup", image="comfy:studio", extra_args=["--preview-method", "auto"],
        extra_env={"TEAM": "art"}, gpu_count=1, custom_nodes=[{"url": node_repo, "ref": "v1"}],
        settings_values={"Comfy.LinkRenderMode": 2}, starter_workflows=[starter])


@pytest.fixture
def redis_down(settings):
    settings.REDIS_URL = DEAD_REDIS
    settings.RQ_QUEUES = {name: {"URL": DEAD_REDIS} for name in settings.RQ_QUEUES}


def made_templates():
    """The templates' names besides the built-in multi-gpu one (made after every migrate, so in every test)."""
    return list(InstanceTemplate.objects.exclude(name=MULTIGPU_TEMPLATE).values_list("name", flat=True))


def url(name, *args):
    return reverse(name, args=args)


def messages_of(response):
    return [str(m) for m in response.context["messages"]]


def field_error(response, field):
    return response.content.decode().split(f'data-testid="error-{field}"')[1].split("</ul>")[0].replace("&#x27;", "'")


# --- Who may do what -----------------------------------------------------------------------------------------

def test_every_template_page_sends_someone_not_logged_in_to_the_login_page(client, template, starter):
    pages = [url("template-list"), url("template-create"), url("template-detail", "studio"),
             url("template-new-instance", "studio"), url("template-apply", "studio"), url("instance-drift", "author")]
    for page in pages:
        for response in (client.get(page), client.post(page)):
            assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_a_stranger_may_not_create_templates_or_instances_or_apply(client, stranger, template, starter):
    client.force_login(stranger)
    assert client.get(url("template-create")).status_code == 403
    assert client.post(url("template-create"), {"name": "sneaky", "gpu_count": "0"}).status_code == 403
    assert client.post(url("template-new-instance", "studio"), {"instance_id": "sneaky"}).status_code == 403
    assert client.post(url("template-apply", "studio"), {"instance": "author"}).status_code == 403
    assert made_templates() == ["studio"]
    assert list(Instance.objects.values_list("instance_id", flat=True)) == ["author"]
    assert not Operation.objects.exists()


def test_a_stranger_may_look_but_is_shown_no_forms(client, stranger, template):
    client.force_login(stranger)
    assert "New template" not in client.get(url("template-list")).content.decode()
    content = client.get(url("template-detail", "studio")).content.decode()
    assert "Template studio" in content
    assert "New instance from this template" not in content and "Apply template" not in content


def test_the_template_actions_only_answer_post(client, operator, template):
    client.force_login(operator)
    assert client.get(url("template-new-instance", "studio")).status_code == 405
    assert client.get(url("template-apply", "studio")).status_code == 405
    assert client.get(url("template-detail", "nope")).status_code == 404


# --- The list and one template -------------------------------------------------------------------------------

def test_the_list_shows_each_template_with_what_it_holds(client, stranger, template):
    services.instance_create(instance_id="user-1")
    Instance.objects.filter(instance_id="user-1").update(template=template)
    client.force_login(stranger)
    row = client.get(url("template-list")).content.decode().split('data-template="studio"')[1].split("</tr>")[0]
    assert f'href="{url("template-detail", "studio")}"' in row and "<code>comfy:studio</code>" in row
    assert "hello@1" in row and "<td>1</td>" in row


def test_the_template_page_shows_its_configuration(client, stranger, template, node_repo):
    client.force_login(stranger)
    facts = client.get(url("template-detail", "studio")).content.decode().split('id="template-facts"')[1]
    for fact in ("<code>comfy:studio</code>", "<code>--preview-method auto</code>", "<code>TEAM=art</code>",
                 f"<code>{node_repo}</code> @ <code>v1</code>", "<code>Comfy.LinkRenderMode</code> = <code>2</code>",
                 "hello@1"):
        assert fact in facts


# --- Creating a template -------------------------------------------------------------------------------------

def test_an_operator_creates_a_template_with_everything(client, operator, starter, node_repo):
    client.force_login(operator)
    assert "Create template" in client.get(url("template-create")).content.decode()
    response = client.post(url("template-create"), {
        "name": "portraits", "description": "For portraits", "image": "comfy:portraits",
        "extra_args": "--preview-method auto\n--lowvram", "extra_env": "TEAM=art\nMODE=fast", "gpu_count": "2",
        "custom_nodes": f"{node_repo} v1\n\n{node_repo}-other", "settings": '{"Comfy.LinkRenderMode": 2}',
        "starter_workflows": [str(starter.pk)],
    })
    assert response.status_code == 302 and response["Location"] == url("template-detail", "portraits")
    template = InstanceTemplate.objects.get(name="portraits")
    assert (template.description, template.image, template.gpu_count) == ("For portraits", "comfy:portraits", 2)
    assert template.extra_args == ["--preview-method", "auto", "--lowvram"]
    assert template.extra_env == {"TEAM": "art", "MODE": "fast"}
    assert template.custom_nodes == [{"url": node_repo, "ref": "v1"}, {"url": f"{node_repo}-other", "ref": ""}]
    assert template.settings == {"Comfy.LinkRenderMode": 2}
    assert list(template.starter_workflows.all()) == [starter]


@pytest.mark.parametrize("data, field, message", [
    ({"name": "Bad Name"}, "name", "Use lowercase letters, digits and '-' for a template name ('new' is taken by the page that creates one)."),
    ({"name": "studio"}, "name", "A template 'studio' already exists."),
    ({"extra_args": "--base-directory /x"}, "extra_args", "keep instances isolated"),
    ({"extra_args": "--foo 'unclosed"}, "extra_args", "Line 1 (--foo 'unclosed): No closing quotation"),
    ({"extra_env": "CUDA_VISIBLE_DEVICES=0"}, "extra_env", "assign GPUs instead"),
    ({"extra_env": "no equals sign"}, "extra_env", "'no equals sign' is not KEY=VALUE"),
    ({"custom_nodes": "not-a-url"}, "custom_nodes", "'not-a-url' is not a git URL"),
    ({"custom_nodes": "https://example.org/a.git v1 extra"}, "custom_nodes", "give a git URL and at most one ref"),
    ({"settings": "[1, 2]"}, "settings", "Settings are a JSON object of comfy.settings.json values."),
    ({"settings": "{oops"}, "settings", "The settings is not valid JSON"),
    ({"gpu_count": "-1"}, "gpu_count", "greater than or equal to 0"),
    ({"name": "fresh\n"}, "name", "Use lowercase letters, digits and '-' for a template name"),
    ({"image": "evil.example/x:latest"}, "image", "INSTANCE_IMAGES_ALLOWED permits"),
    ({"image": "UPPER/case"}, "image", "is not a Docker image reference"),
    ({"extra_args": "--inp /x"}, "extra_args", "ComfyUI takes it for --input-directory"),
    ({"extra_env": "LD_PRELOAD=/x.so"}, "extra_env", "'LD_PRELOAD' is refused"),
    ({"extra_env": "comfy_shared_path=/x"}, "extra_env", "'comfy_shared_path' is reserved"),
])
def test_a_bad_template_says_what_is_wrong_next_to_the_field_and_creates_nothing(client, operator, template, data,
                                                                                 field, message):
    client.force_login(operator)
    response = client.post(url("template-create"), {"name": "fresh", "gpu_count": "0", **data})
    assert response.status_code == 200
    assert message in field_error(response, field)
    assert made_templates() == ["studio"]


# --- New instances from a template, applying it, drift -------------------------------------------------------

def test_a_new_instance_from_a_template_gets_it_applied(client, operator, template, run_worker, storage):
    client.force_login(operator)
    response = client.post(url("template-new-instance", "studio"), {"instance_id": "made", "host_port": "18300"})
    instance = Instance.objects.get(instance_id="made")
    operation = Operation.objects.get(kind="template_apply")
    assert response.status_code == 302 and response["Location"] == operation.get_absolute_url()
    assert instance.template == template and instance.host_port == 18300 and instance.image == "comfy:studio"
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    assert (workflows.workflows_dir(instance) / "hello.json").exists()
    assert instance.custom_nodes.get().ref == "v1"
    row = client.get(url("template-detail", "studio")).content.decode().split('data-instance="made"')[1]
    assert '<span class="ok">none</span>' in row.split("</tr>")[0]
    drift = client.get(url("instance-drift", "made")).content.decode()
    assert 'data-testid="no-drift"' in drift


@pytest.mark.parametrize("data, field, message", [
    ({"instance_id": "Bad Id"}, "instance_id", "e.g. 'bad-id'"),
    ({"instance_id": "author"}, "instance_id", "An instance 'author' already exists; pick another id."),
    ({"instance_id": "fine", "host_port": "80"}, "host_port", "Ports go from 1024 to 65535"),
])
def test_a_bad_new_instance_says_what_is_wrong_and_creates_nothing(client, operator, template, data, field, message):
    client.force_login(operator)
    response = client.post(url("template-new-instance", "studio"), data)
    assert response.status_code == 200 and message in field_error(response, field)
    assert list(Instance.objects.values_list("instance_id", flat=True)) == ["author"]
    assert not Operation.objects.exists()


def test_a_template_wanting_more_gpus_than_are_free_says_so(client, operator, template):
    services.instance_create(instance_id="hog", gpu_indexes=[0, 1, 2, 3])
    client.force_login(operator)
    response = client.post(url("template-new-instance", "studio"), {"instance_id": "late"})
    assert "The template asks for 1 GPU(s) but only 0 are free" in field_error(response, "form")
    assert not Instance.objects.filter(instance_id="late").exists()


def test_no_instance_is_made_when_the_queue_cannot_apply_the_template(client, operator, template, redis_down):
    client.force_login(operator)
    response = client.post(url("template-new-instance", "studio"), {"instance_id": "queue-less"}, follow=True)
    assert not Instance.objects.filter(instance_id="queue-less").exists()
    assert any("was not created" in m and "The job queue is unavailable" in m for m in messages_of(response))
    assert not Operation.objects.exists()


def test_applying_a_template_to_an_instance_queues_it(client, operator, template, run_worker, storage):
    instance = services.instance_create(instance_id="plain")
    client.force_login(operator)
    response = client.post(url("template-apply", "studio"), {"instance": "plain"})
    operation = Operation.objects.get()
    assert response["Location"] == operation.get_absolute_url() and operation.kind == "template_apply"
    run_worker()
    operation.refresh_from_db()
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    settings_file = storage["instances"] / "plain" / "user" / "default" / "comfy.settings.json"
    assert json.loads(settings_file.read_text()) == {"Comfy.LinkRenderMode": 2}
    assert Instance.objects.get(pk=instance.pk).template == template


def test_applying_needs_an_instance(client, operator, template):
    client.force_login(operator)
    response = client.post(url("template-apply", "studio"), {"instance": "nobody"})
    assert response.status_code == 200 and "Select a valid choice" in field_error(response, "instance")
    assert not Operation.objects.exists()


def test_the_drift_page_says_when_there_is_no_template(client, stranger, starter):
    client.force_login(stranger)
    content = client.get(url("instance-drift", "author")).content.decode()
    assert 'data-testid="no-template"' in content and "No template" in content


def test_the_drift_page_lists_what_differs(client, stranger, template, storage):
    instance = services.instance_create(instance_id="drifty", image="comfy:other", extra_env={"TEAM": "art"})
    Instance.objects.filter(pk=instance.pk).update(template=template)
    client.force_login(stranger)
    response = client.get(url("instance-drift", "drifty"))
    rows = {d["what"]: (d["template"], d["instance"]) for d in response.context["differences"]}
    assert rows["image"] == ("comfy:studio", "comfy:other")
    assert rows["extra arguments"] == ('["--preview-method", "auto"]', "[]")
    assert rows["GPU count"] == ("1", "0")
    assert rows["custom node ComfyUI-Test-Nodes"] == ("v1", "missing")
    assert rows["setting Comfy.LinkRenderMode"] == ("2", "(unset)")
    assert rows["workflow hello"] == ("version 1", "missing")
    content = response.content.decode()
    assert "<td>image</td><td><code>comfy:studio</code></td><td><code>comfy:other</code></td>" in content
    detail = client.get(url("template-detail", "studio")).content.decode().split('data-instance="drifty"')[1]
    assert "6 differences" in detail.split("</tr>")[0]
