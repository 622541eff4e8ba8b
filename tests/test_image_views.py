"""The dashboard's notice of an image instances use that their host lacks, and its Build / Pull buttons, seen by an
operator, a viewer and someone not logged in, against the real engine (which has the test images and nothing else
the tests name)."""
import pytest
from django.urls import reverse

from comfyhub.models import Operation
from instances import docker_engine as engine_adapter
from instances import services

pytestmark = pytest.mark.django_db

NEVER_BUILT = "comfyhub/comfyui:never-built-in-tests"
NEVER_PULLED = "example/comfyui:never-pulled"


@pytest.fixture(autouse=True)
def engine_status_is_read_afresh(docker_engine):
    engine_adapter.forget_cached_status()
    yield
    engine_adapter.forget_cached_status()


@pytest.fixture
def users_of_missing_images(db):
    return [services.instance_create(instance_id="needs-build", image=NEVER_BUILT),
            services.instance_create(instance_id="needs-build-too", image=NEVER_BUILT),
            services.instance_create(instance_id="needs-pull", image=NEVER_PULLED)]


def notices(content: str) -> dict:
    """{image: the notice's HTML} of every missing-image notice on the page."""
    found = {}
    for part in content.split('<section class="card notice image-missing" data-image="')[1:]:
        image, _, rest = part.partition('"')
        found[image] = rest.split("</section>")[0]
    return found


def test_an_operator_is_offered_to_build_comfyhubs_image_and_to_pull_another(client, operator,
                                                                            users_of_missing_images):
    client.force_login(operator)

    shown = notices(client.get(reverse("dashboard")).content.decode())

    assert set(shown) == {NEVER_BUILT, NEVER_PULLED}
    build = shown[NEVER_BUILT]
    assert f"The image <code>{NEVER_BUILT}</code> is not on this host:" in build
    assert f'action="{reverse("image-build")}"' in build and "Build it (about 7 GB)</button>" in build
    assert "Pull it" not in build
    assert "csrfmiddlewaretoken" in build
    assert "Used by needs-build, needs-build-too." in build  # one notice for the image, not one per instance
    pull = shown[NEVER_PULLED]
    assert f'action="{reverse("image-pull")}"' in pull and "Pull it</button>" in pull and "Build it" not in pull


def test_a_notice_names_five_instances_and_counts_the_rest(client, stranger, db):
    for number in range(8):
        services.instance_create(instance_id=f"many-{number}", image=NEVER_BUILT)
    client.force_login(stranger)

    notice = notices(client.get(reverse("dashboard")).content.decode())[NEVER_BUILT]

    assert "Used by many-0, many-1, many-2, many-3, many-4 and 3 more instances." in notice


def test_the_size_the_build_button_names_is_a_setting(client, operator, users_of_missing_images, settings):
    settings.IMAGE_BUILD_SIZE_HINT_GB = 9
    client.force_login(operator)

    assert "Build it (about 9 GB)" in notices(client.get(reverse("dashboard")).content.decode())[NEVER_BUILT]


def test_a_viewer_sees_the_notice_without_buttons(client, stranger, users_of_missing_images):
    client.force_login(stranger)

    shown = notices(client.get(reverse("dashboard")).content.decode())

    assert set(shown) == {NEVER_BUILT, NEVER_PULLED}
    for notice in shown.values():
        assert "<form" not in notice and "<button" not in notice
    assert "an operator can build it (about 7 GB)." in shown[NEVER_BUILT]
    assert "an operator can pull it." in shown[NEVER_PULLED]


def test_an_image_on_the_host_has_no_notice(client, operator, comfyui_double_image):
    services.instance_create(instance_id="has-its-image", image=comfyui_double_image)
    client.force_login(operator)

    response = client.get(reverse("dashboard"))

    assert response.status_code == 200
    assert notices(response.content.decode()) == {}


def test_an_engine_that_does_not_answer_shows_no_notice_and_no_error(client, operator, users_of_missing_images,
                                                                     settings):
    settings.DOCKER_HOST = "unix:///nonexistent/docker.sock"
    engine_adapter.forget_cached_status()
    client.force_login(operator)

    response = client.get(reverse("dashboard"))

    assert response.status_code == 200
    assert notices(response.content.decode()) == {}


def test_build_queues_the_build_of_that_image_on_that_node(client, operator, users_of_missing_images):
    client.force_login(operator)

    response = client.post(reverse("image-build"), {"node": "local", "image": NEVER_BUILT})

    operation = Operation.objects.get()
    assert (operation.kind, operation.status, operation.queue_name) == ("image_build", "queued", "long")
    assert operation.target_label == f"{NEVER_BUILT} on local" and operation.requested_by == operator
    assert response.status_code == 302 and response["Location"] == operation.get_absolute_url()
    assert f"Building {NEVER_BUILT} on local." in client.get(response["Location"]).content.decode()


def test_pull_queues_the_pull_of_that_image_on_that_node(client, operator, users_of_missing_images):
    client.force_login(operator)

    response = client.post(reverse("image-pull"), {"node": "local", "image": NEVER_PULLED})

    operation = Operation.objects.get()
    assert (operation.kind, operation.target_label) == ("image_pull", f"{NEVER_PULLED} on local")
    assert response["Location"] == operation.get_absolute_url()


def test_an_image_instances_may_not_run_is_refused_with_the_reason(client, operator):
    client.force_login(operator)

    response = client.post(reverse("image-pull"), {"node": "local", "image": "registry.example.org/other:1"},
                           follow=True)

    assert not Operation.objects.exists()
    assert "Image &#x27;registry.example.org/other:1&#x27; is not allowed on this ComfyHub" in \
        response.content.decode()


@pytest.mark.parametrize("name", ["image-build", "image-pull"])
def test_only_operators_may_build_or_pull(client, stranger, name):
    assert client.post(reverse(name), {"node": "local", "image": NEVER_BUILT})["Location"].startswith("/login/")
    client.force_login(stranger)
    assert client.post(reverse(name), {"node": "local", "image": NEVER_BUILT}).status_code == 403
    assert not Operation.objects.exists()


@pytest.mark.parametrize("name", ["image-build", "image-pull"])
def test_build_and_pull_only_answer_post_and_know_their_nodes(client, operator, name):
    services.local_node()
    client.force_login(operator)
    assert client.get(reverse(name)).status_code == 405
    assert client.post(reverse(name), {"node": "elsewhere", "image": NEVER_BUILT}).status_code == 404
    assert not Operation.objects.exists()
