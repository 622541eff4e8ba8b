"""The legacy migration page: the plan (totals, conflicts, reports, what is not carried), refusals, and a migration
through an operation."""
import re

import pytest
from django.contrib.auth.models import Permission, User
from django.urls import reverse
from playwright.sync_api import expect

from comfyhub.models import Operation
from instances.models import Instance

pytestmark = pytest.mark.django_db(transaction=True)


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def old_install(tmp_path, storage):
    """A small ComfyUI folder; the shared library already holds a different file of the same name as one model."""
    install = tmp_path / "old" / "ComfyUI"
    write(install / "main.py", b"")
    write(install / "models" / "vae" / "v.pt", b"vae" * 1000)
    write(install / "models" / "loras" / "style.pt", b"lora")
    write(install / "custom_nodes" / "Pack" / "__init__.py", b"# node")
    write(install / "custom_nodes" / "Pack" / "bundled.safetensors", b"bundled")
    write(install / "user" / "default" / "workflows" / "w.json", b"{}")
    write(install / "input" / "photo.png", b"photo")
    write(install / "temp" / "scratch.png", b"tmp")
    write(storage["shared"] / "models" / "loras" / "style.pt", b"another lora")
    return install


def plan_url(source, instance_id="old", mode="copy"):
    return f"/legacy/?source={source}&instance_id={instance_id}&mode={mode}"


def test_the_form_defaults_to_the_single_instance_id(client, stranger, settings):
    client.force_login(stranger)
    response = client.get("/legacy/")
    assert response.status_code == 200
    assert response.context["form"]["instance_id"].value() == settings.COMFY_INSTANCE_ID
    assert 'id="legacy-plan"' not in response.content.decode()


def test_the_plan_shows_totals_conflicts_reports_and_what_is_not_carried(client, operator, old_install, storage):
    client.force_login(operator)
    response = client.get(plan_url(old_install))
    assert response.status_code == 200
    text = response.content.decode()
    totals = text.split('id="legacy-totals"')[1].split("</table>")[0]
    models = totals.split('data-group="shared-models"')[1].split("</tr>")[0]
    assert re.findall(r"<td>([^<]*)</td>", models) == ["2", "2.9\xa0KB", "0", "1"]
    assert str(storage["shared"] / "models") in models
    for group in ("shared-input", "instance:custom_nodes", "instance:user"):
        assert f'data-group="{group}"' in totals
    assert str(storage["instances"] / "old" / "user") in totals
    conflicts = text.split('id="legacy-conflicts"')[1].split("</section>")[0]
    assert "different content already there" in conflicts and "style (legacy).pt" in conflicts
    assert "model inside custom_nodes" in text.split('id="legacy-reports"')[1]
    assert str(old_install / "temp") in text.split('id="legacy-not-carried"')[1]
    assert 'action="/legacy/migrate/"' in text
    assert (old_install / "models" / "vae" / "v.pt").exists()  # looking moves nothing
    assert not Operation.objects.exists() and not Instance.objects.exists()


@pytest.mark.parametrize("source, message", [
    ("{tmp}/absent", "absent is not a folder."),
    ("{tmp}/empty", "not a ComfyUI install or a legacy data folder"),
])
def test_a_bad_source_shows_the_services_message(client, stranger, tmp_path, source, message):
    (tmp_path / "empty").mkdir()
    client.force_login(stranger)
    response = client.get(plan_url(source.format(tmp=tmp_path)))
    assert response.status_code == 400
    errors = response.content.decode().split('id="field-source"')[1].split("</div>")[0]
    assert message in errors


def test_a_bad_instance_id_is_refused(client, stranger, old_install):
    client.force_login(stranger)
    response = client.get(plan_url(old_install, instance_id="Not/Valid"))
    assert response.status_code == 400
    assert "Use lowercase letters a-z, digits and" in response.content.decode()


def test_a_viewer_sees_the_plan_but_may_not_migrate(client, stranger, old_install):
    client.force_login(stranger)
    text = client.get(plan_url(old_install)).content.decode()
    assert 'id="legacy-plan"' in text and 'action="/legacy/migrate/"' not in text
    response = client.post(reverse("legacy-migrate"), {"source": str(old_install), "instance_id": "old",
                                                       "mode": "copy"})
    assert response.status_code == 403
    assert not Operation.objects.exists()


def test_migrating_needs_both_restore_and_add_instance(client, old_install):
    restorer = User.objects.create_user("rita", password="rita-password-1")
    restorer.user_permissions.add(Permission.objects.get(codename="restore_snapshot"))
    client.force_login(restorer)
    data = {"source": str(old_install), "instance_id": "old", "mode": "copy"}
    assert client.post(reverse("legacy-migrate"), data).status_code == 403
    restorer.user_permissions.add(Permission.objects.get(codename="add_instance"))
    restorer = User.objects.get(pk=restorer.pk)  # permissions are cached on the object
    client.force_login(restorer)
    assert client.post(reverse("legacy-migrate"), data).status_code == 302
    assert Operation.objects.get().kind == "legacy_migrate"


def test_migrating_a_bad_source_is_refused_before_queueing(client, operator, tmp_path):
    client.force_login(operator)
    response = client.post(reverse("legacy-migrate"), {"source": str(tmp_path / "absent"), "instance_id": "old",
                                                       "mode": "move"})
    assert response.status_code == 400 and "absent is not a folder." in response.content.decode()
    assert not Operation.objects.exists()


def test_an_operator_migrates_through_an_operation(client, operator, old_install, storage, run_worker):
    client.force_login(operator)
    response = client.post(reverse("legacy-migrate"), {"source": str(old_install), "instance_id": "old",
                                                       "mode": "move"})
    operation = Operation.objects.get()
    assert response["Location"] == operation.get_absolute_url()
    run_worker()
    operation.refresh_from_db()
    assert (operation.kind, operation.status) == ("legacy_migrate", Operation.Status.SUCCEEDED), operation.error
    assert Instance.objects.get(instance_id="old").host_port == operation.result["port"]
    assert (storage["shared"] / "models" / "vae" / "v.pt").read_bytes() == b"vae" * 1000
    assert (storage["shared"] / "models" / "loras" / "style.pt").read_bytes() == b"another lora"
    assert (storage["shared"] / "models" / "loras" / "style (legacy).pt").read_bytes() == b"lora"
    assert (storage["shared"] / "input" / "photo.png").read_bytes() == b"photo"
    assert (storage["instances"] / "old" / "user" / "default" / "workflows" / "w.json").exists()
    assert not (old_install / "models" / "vae" / "v.pt").exists()  # moved, not copied
    assert (old_install / "temp" / "scratch.png").exists()  # temp stays


@pytest.mark.browser
def test_the_plan_and_the_migration_in_the_browser(logged_in_page, admin_user, worker_process, old_install,
                                                   live_server, tmp_path, storage):
    worker_process()
    page = logged_in_page()
    page.click("nav >> text=Storage")
    page.click("text=Migrate a legacy install")
    expect(page.locator("#id_instance_id")).to_have_value("comfy")
    page.fill("#id_source", str(tmp_path / "nowhere"))
    page.click("button:has-text('Show plan')")
    expect(page.locator("#field-source .errorlist")).to_contain_text("nowhere is not a folder.")
    page.fill("#id_source", str(old_install))
    page.fill("#id_instance_id", "old")
    page.check("input[name=mode][value=copy]")
    page.click("button:has-text('Show plan')")
    expect(page.locator("#legacy-totals tr[data-group='shared-models']")).to_contain_text("2.9 KB")
    expect(page.locator("#legacy-conflicts")).to_contain_text("style (legacy).pt")
    page.screenshot(path=str(tmp_path / "legacy-plan.png"), full_page=True)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#legacy-migrate button:has-text('Migrate')")
    page.wait_for_url(re.compile(r"/operations/[0-9a-f-]+/$"))
    expect(page.get_by_test_id("operation-status")).to_have_text("Succeeded", timeout=30_000)
    assert (storage["shared"] / "models" / "vae" / "v.pt").exists()
    assert (old_install / "models" / "vae" / "v.pt").exists()  # copy mode keeps the source
