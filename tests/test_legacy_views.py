"""The legacy migration page: planning as an operation (operators only; the request never looks at the folder), the
plan (totals, conflicts, reports, what is not carried), refusals, and a migration through an operation."""
import html
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


def plan(client, source, instance_id="old", mode="copy"):
    """Ask for a plan as the page does; returns the response (a redirect to the plan's page when queued)."""
    return client.post(reverse("legacy-plan"), {"source": str(source), "instance_id": instance_id, "mode": mode})


def planned(client, run_worker, source, **kwargs):
    """The plan's page once the worker has run the planning operation."""
    response = plan(client, source, **kwargs)
    assert response.status_code == 302, response.content.decode()[:500]
    run_worker()
    return client.get(response["Location"])


def test_the_form_defaults_to_the_single_instance_id(client, stranger, settings):
    client.force_login(stranger)
    response = client.get("/legacy/")
    assert response.status_code == 200
    assert response.context["form"]["instance_id"].value() == settings.COMFY_INSTANCE_ID
    text = response.content.decode()
    assert 'id="legacy-plan' not in text and "Show plan" not in text
    assert "Planning and migrating need the permissions" in text


def test_a_stranger_may_not_plan_nor_see_a_plan(client, stranger, operator, old_install):
    client.force_login(stranger)
    assert plan(client, old_install).status_code == 403
    assert not Operation.objects.exists()
    client.force_login(operator)
    location = plan(client, old_install)["Location"]
    operation = Operation.objects.get()
    client.force_login(stranger)
    assert client.get(location).status_code == 403
    assert client.get(reverse("legacy-plan-live", args=[operation.pk])).status_code == 403


def test_the_plan_shows_totals_conflicts_reports_and_what_is_not_carried(client, operator, old_install, storage,
                                                                         run_worker):
    client.force_login(operator)
    response = planned(client, run_worker, old_install)
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
    assert f'value="{old_install}"' in text.split('id="legacy-form"')[1].split("</form>")[0]  # the form, refilled
    assert (old_install / "models" / "vae" / "v.pt").exists()  # planning moves nothing
    operation = Operation.objects.get()
    assert (operation.kind, operation.status) == ("legacy_plan", Operation.Status.SUCCEEDED)
    assert not Instance.objects.exists()
    live = client.get(reverse("legacy-plan-live", args=[operation.pk]))
    assert live.status_code == 286 and 'id="legacy-totals"' in live.content.decode()  # polling stops


def test_the_request_answers_the_same_for_a_missing_and_an_existing_folder(client, operator, old_install, tmp_path,
                                                                            run_worker):
    """The folder is looked at by the job only: until it runs, nothing in the answers tells the two apart."""
    client.force_login(operator)
    missing = tmp_path / "old" / "Missing"
    answers = []
    for source in (old_install, missing):
        response = plan(client, source)
        assert response.status_code == 302
        page = client.get(response["Location"])
        operation = Operation.objects.order_by("-created_at").first()
        text = page.content.decode().replace(str(operation.pk), "ID").replace(str(source), "SOURCE")
        answers.append((page.status_code, re.sub(r"[A-Za-z0-9]{64}", "CSRF-TOKEN", text)))
    assert answers[0] == answers[1]
    assert 'id="legacy-plan-pending"' in answers[0][1] and "hx-get" in answers[0][1]
    run_worker()
    failed = Operation.objects.get(status=Operation.Status.FAILED)
    assert f"{missing} is not a folder." in failed.error
    text = client.get(reverse("legacy-plan-result", args=[failed.pk])).content.decode()
    assert f"{missing} is not a folder." in text.split('id="legacy-plan-error"')[1]


@pytest.mark.parametrize("source, message", [
    ("{shared}", "is the shared library (COMFY_SHARED_PATH)"),
    ("{instances}", "is the instances' folders (COMFY_INSTANCES_PATH)"),
    ("{backups}", "is the snapshots folder (COMFY_BACKUPS_PATH)"),
    ("{instances}/comfy", "is inside the instances' folders (COMFY_INSTANCES_PATH)"),
    ("{storage}", "contains the shared library (COMFY_SHARED_PATH)"),
    ("{tmp}/link", "(a link to {shared}) is the shared library (COMFY_SHARED_PATH)"),
    ("{project}", "is ComfyHub's project folder"),
])
def test_planning_and_migrating_from_comfyhubs_storage_fail_in_the_job_and_delete_nothing(
        client, operator, storage, tmp_path, run_worker, settings, source, message):
    files = {storage["shared"] / "models" / "loras" / "only.safetensors": b"only copy",
             storage["instances"] / "comfy" / "user" / "default" / "w.json": b"{}",
             storage["backups"] / "comfy" / "models" / "vae" / "v.pt": b"vae"}
    for path, content in files.items():
        write(path, content)
    (tmp_path / "link").symlink_to(storage["shared"])
    values = {"shared": storage["shared"], "instances": storage["instances"], "backups": storage["backups"],
              "storage": storage["shared"].parent, "tmp": tmp_path, "project": settings.BASE_DIR}
    source, message = source.format(**values), message.format(**values)
    client.force_login(operator)
    text = html.unescape(planned(client, run_worker, source, instance_id="comfy", mode="move").content.decode())
    assert message in text.split('id="legacy-plan-error"')[1]
    response = client.post(reverse("legacy-migrate"), {"source": source, "instance_id": "comfy", "mode": "move"})
    assert response.status_code == 302
    run_worker()
    migrate = Operation.objects.get(kind="legacy_migrate")
    assert migrate.status == Operation.Status.FAILED and message in migrate.error
    assert {path: path.read_bytes() for path in files} == files
    assert not Instance.objects.exists()


def test_a_bad_instance_id_is_refused(client, operator, old_install):
    client.force_login(operator)
    response = plan(client, old_install, instance_id="Not/Valid")
    assert response.status_code == 400
    assert "Use lowercase letters a-z, digits and" in response.content.decode()
    assert not Operation.objects.exists()


def test_a_viewer_may_not_migrate(client, stranger, old_install):
    client.force_login(stranger)
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
    assert plan(client, old_install).status_code == 403
    restorer.user_permissions.add(Permission.objects.get(codename="add_instance"))
    restorer = User.objects.get(pk=restorer.pk)  # permissions are cached on the object
    client.force_login(restorer)
    assert client.post(reverse("legacy-migrate"), data).status_code == 302
    assert Operation.objects.get().kind == "legacy_migrate"


def test_migrating_a_missing_folder_fails_in_the_operation(client, operator, tmp_path, run_worker):
    client.force_login(operator)
    response = client.post(reverse("legacy-migrate"), {"source": str(tmp_path / "absent"), "instance_id": "old",
                                                       "mode": "move"})
    assert response.status_code == 302  # the request does not look at the folder
    run_worker()
    operation = Operation.objects.get()
    assert operation.status == Operation.Status.FAILED and "absent is not a folder." in operation.error
    assert not Instance.objects.exists()


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
    expect(page.locator("#legacy-plan-error")).to_contain_text("nowhere is not a folder.", timeout=30_000)
    page.fill("#id_source", str(old_install))
    page.fill("#id_instance_id", "old")
    page.check("input[name=mode][value=copy]")
    page.click("button:has-text('Show plan')")
    expect(page.locator("#legacy-totals tr[data-group='shared-models']")).to_contain_text("2.9 KB", timeout=30_000)
    expect(page.locator("#legacy-conflicts")).to_contain_text("style (legacy).pt")
    page.screenshot(path=str(tmp_path / "legacy-plan.png"), full_page=True)
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#legacy-migrate button:has-text('Migrate')")
    page.wait_for_url(re.compile(r"/operations/[0-9a-f-]+/$"))
    expect(page.get_by_test_id("operation-status")).to_have_text("Succeeded", timeout=30_000)
    assert (storage["shared"] / "models" / "vae" / "v.pt").exists()
    assert (old_install / "models" / "vae" / "v.pt").exists()  # copy mode keeps the source
