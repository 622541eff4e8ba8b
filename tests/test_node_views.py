"""The custom nodes page of an instance: the list, installing from a real git repository, update, disable, enable
and remove."""
import pytest
from django.urls import reverse

from comfyhub.models import Operation
from instances import customnodes, services
from instances.models import CustomNode
from storage_app import layout
from tests.support.gitrepos import git, make_node_repo

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.docker, pytest.mark.usefixtures("node_git")]

DEAD_REDIS = "unix:///nonexistent/comfyhub-redis.sock?db=0"
NODE = "ComfyUI-Test-Nodes"


@pytest.fixture
def instance(storage):
    created = services.instance_create(instance_id="noded")
    layout.build_instance_tree("noded")
    return created


@pytest.fixture
def repo(tmp_path):
    return make_node_repo(tmp_path / "repos")


@pytest.fixture
def redis_down(settings):
    settings.REDIS_URL = DEAD_REDIS
    settings.RQ_QUEUES = {name: {"URL": DEAD_REDIS} for name in settings.RQ_QUEUES}


def url(name, instance):
    return reverse(name, args=[instance.instance_id])


def messages_of(response):
    return [str(m) for m in response.context["messages"]]


def row_of(content, name):
    return content.split(f'data-node="{name}"')[1].split("</tr>")[0]


def finished(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    return operation


# --- Who may do what -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["instance-nodes", "instance-node-install", "instance-node-action"])
def test_someone_not_logged_in_is_sent_to_the_login_page(client, instance, name):
    for response in (client.get(url(name, instance)), client.post(url(name, instance))):
        assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_a_stranger_may_not_install_or_change_nodes(client, stranger, instance, repo):
    customnodes.install(instance, repo[0])
    client.force_login(stranger)
    assert client.post(url("instance-node-install", instance), {"url": repo[0]}).status_code == 403
    for action in ("update", "disable", "enable", "remove"):
        response = client.post(url("instance-node-action", instance), {"name": NODE, "action": action})
        assert response.status_code == 403
    assert not Operation.objects.exists() and CustomNode.objects.count() == 1
    content = client.get(url("instance-nodes", instance)).content.decode()
    assert NODE in content and ">Remove<" not in content and "Install a custom node" not in content


@pytest.mark.parametrize("name", ["instance-node-install", "instance-node-action"])
def test_the_node_actions_only_answer_post(client, operator, instance, name):
    client.force_login(operator)
    assert client.get(url(name, instance)).status_code == 405


# --- The list ------------------------------------------------------------------------------------------------

def test_the_page_lists_each_node_with_its_commit_state_and_who_manages_it(client, operator, instance, repo, storage):
    node_url, commits = repo
    customnodes.install(instance, node_url, "v1")
    root = storage["instances"] / "noded" / "custom_nodes"
    (root / NODE / "__init__.py").write_text("# edited\n")
    (root / "hand-made.disabled").mkdir()
    client.force_login(operator)
    content = client.get(url("instance-nodes", instance)).content.decode()
    row = row_of(content, NODE)
    assert f"<code class=\"small\">{node_url}</code>" in row and "<td>v1</td>" in row
    assert f'<code title="{commits["v1"]}">{commits["v1"][:12]}</code>' in row
    assert ">enabled<" in row and "<td>yes</td>" in row and "unreadable" not in row
    assert 'value="update"' in row and 'value="disable"' in row and 'value="remove"' in row
    assert 'onclick="return confirm(this.dataset.confirm);"' in row
    assert ('data-confirm="Remove ComfyUI-Test-Nodes from noded? Its folder custom_nodes/ComfyUI-Test-Nodes is '
            'deleted."') in row
    hand = row_of(content, "hand-made")
    assert ">disabled<" in hand and "installed by hand" in hand and "<button" not in hand


def test_a_node_whose_checkout_moved_shows_both_commits(client, operator, instance, repo):
    node_url, commits = repo
    customnodes.install(instance, node_url, "v1")
    git("-c", "safe.directory=*", "-c", "advice.detachedHead=false", "checkout", "--quiet", commits["main"],
        cwd=customnodes.folder_of(instance, NODE))
    client.force_login(operator)
    row = row_of(client.get(url("instance-nodes", instance)).content.decode(), NODE)
    assert f">{commits['main'][:12]}</code>" in row
    assert f'<code title="{commits["v1"]}" class="error">{commits["v1"][:12]}</code>' in row


# --- Install -------------------------------------------------------------------------------------------------

def test_installing_from_a_git_repository_runs_as_an_operation(client, operator, instance, repo, run_worker):
    node_url, commits = repo
    client.force_login(operator)
    response = client.post(url("instance-node-install", instance), {"url": node_url, "ref": "v1"})
    operation = Operation.objects.get()
    assert response["Location"] == operation.get_absolute_url() and operation.kind == "custom_node_install"
    assert finished(operation, run_worker).status == Operation.Status.SUCCEEDED, operation.error
    node = CustomNode.objects.get(instance=instance)
    assert (node.name, node.ref, node.commit) == (NODE, "v1", commits["v1"])
    row = row_of(client.get(url("instance-nodes", instance)).content.decode(), NODE)
    assert commits["v1"][:12] in row


@pytest.mark.parametrize("data, field, message", [
    ({"url": "not a url"}, "url", "'not a url' is not a git URL"),
    ({"url": "--upload-pack=evil"}, "url", "is not a git URL"),
    ({"url": ""}, "url", "'' is not a git URL"),
    ({"url": "https://example.org/x/.git"}, "url", "cannot name a custom node folder"),
    ({"url": "https://example.org/x/nodes.git", "ref": "--evil"}, "ref", "'--evil' is not a branch, tag or commit."),
])
def test_a_bad_install_says_what_is_wrong_next_to_the_field(client, operator, instance, data, field, message):
    client.force_login(operator)
    response = client.post(url("instance-node-install", instance), data)
    assert response.status_code == 200
    error = response.content.decode().split(f'data-testid="error-{field}"')[1].split("</ul>")[0]
    assert message in error.replace("&#x27;", "'")
    assert not Operation.objects.exists() and not CustomNode.objects.exists()


def test_a_repository_that_cannot_be_cloned_fails_the_operation_and_leaves_nothing(client, operator, instance,
                                                                                   run_worker, tmp_path):
    client.force_login(operator)
    client.post(url("instance-node-install", instance), {"url": f"file://{tmp_path}/no-such-repo"})
    operation = finished(Operation.objects.get(), run_worker)
    assert operation.status == Operation.Status.FAILED and "git clone failed" in operation.error
    assert not CustomNode.objects.exists()


def test_installing_says_the_job_queue_is_unavailable(client, operator, instance, repo, redis_down):
    client.force_login(operator)
    response = client.post(url("instance-node-install", instance), {"url": repo[0]})
    assert any("The job queue is unavailable" in m for m in messages_of(response))
    assert not Operation.objects.exists()


# --- Update, disable, enable, remove -------------------------------------------------------------------------

def test_disable_enable_update_and_remove_each_run_as_an_operation(client, operator, instance, repo, run_worker,
                                                                   storage):
    node_url, commits = repo
    customnodes.install(instance, node_url, "v1")
    root = storage["instances"] / "noded" / "custom_nodes"
    client.force_login(operator)

    def act(action):
        response = client.post(url("instance-node-action", instance), {"name": NODE, "action": action})
        operation = Operation.objects.filter(kind="custom_node_action").first()
        assert response["Location"] == operation.get_absolute_url()
        assert finished(operation, run_worker).status == Operation.Status.SUCCEEDED, operation.error
        return client.get(url("instance-nodes", instance)).content.decode()

    content = act("disable")
    assert (root / f"{NODE}.disabled").is_dir() and ">disabled<" in row_of(content, NODE)
    assert 'value="enable"' in row_of(content, NODE)
    content = act("enable")
    assert (root / NODE).is_dir() and ">enabled<" in row_of(content, NODE)
    CustomNode.objects.filter(name=NODE).update(ref="main")
    act("update")
    assert CustomNode.objects.get().commit == commits["main"]
    content = act("remove")
    assert not (root / NODE).exists() and not CustomNode.objects.exists()
    assert 'data-node="ComfyUI-Test-Nodes"' not in content


@pytest.mark.parametrize("data, message", [
    ({"name": "hand-made", "action": "remove"}, "noded has no custom node 'hand-made' installed by ComfyHub."),
    ({"name": NODE, "action": "explode"}, "Unknown action 'explode'."),
    ({"action": "remove"}, "Say which custom node and what to do with it."),
])
def test_a_bad_node_action_says_why_and_queues_nothing(client, operator, instance, repo, storage, data, message):
    customnodes.install(instance, repo[0])
    (storage["instances"] / "noded" / "custom_nodes" / "hand-made").mkdir()
    client.force_login(operator)
    response = client.post(url("instance-node-action", instance), data, follow=True)
    assert response.redirect_chain[-1][0] == url("instance-nodes", instance)
    assert message in messages_of(response)
    assert not Operation.objects.exists()
    assert (storage["instances"] / "noded" / "custom_nodes" / "hand-made").is_dir()
