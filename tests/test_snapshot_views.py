"""The snapshots pages: lists, create, download, restore, clone, delete, ComfyUI-Manager export and import, the
schedule; who may do what, and what bad input says."""
import json

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.template.defaultfilters import filesizeformat
from django.urls import reverse

from comfyhub.models import Operation
from instances import services as instance_services
from instances.models import Instance
from storage_app import layout, snapshots
from storage_app.models import Snapshot
from tests.support.gitrepos import make_node_repo

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def instance(storage):
    created = instance_services.instance_create(instance_id="snappy", gpu_indexes=[1], extra_args=["--lowvram"])
    layout.build_instance_tree("snappy")
    root = storage["instances"] / "snappy"
    (root / "user" / "default" / "workflows" / "w.json").write_text('{"nodes": []}')
    (root / "output" / "image.png").write_bytes(b"png")
    return created


@pytest.fixture
def workflow(storage, instance):
    return storage["instances"] / "snappy" / "user" / "default" / "workflows" / "w.json"


@pytest.fixture
def snapshot(instance, operator):
    return snapshots.create(instance, kind="config", note="before the upgrade", user=operator)


def operation_after(response):
    """The operation a POST redirected to."""
    operation = Operation.objects.get()
    assert response.status_code == 302 and response["Location"] == operation.get_absolute_url()
    return operation


def finished(operation, run_worker):
    run_worker()
    operation.refresh_from_db()
    return operation


# --- Looking -------------------------------------------------------------------------------------------------

def test_it_sends_someone_not_logged_in_to_the_login_page(client, snapshot):
    for url in ("/snapshots/", "/snapshots/instance/snappy/", reverse("snapshot-download", args=[snapshot.pk])):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/login/")


def test_the_page_lists_every_snapshot_with_kind_size_age_note_reason_and_who(client, stranger, instance, snapshot):
    other = instance_services.instance_create(instance_id="other")
    layout.build_instance_tree("other")
    automatic = snapshots.create(other, kind="full", include_output=True, automatic="schedule")
    client.force_login(stranger)
    response = client.get("/snapshots/")
    assert response.status_code == 200
    text = response.content.decode()
    assert f'data-snapshot="{snapshot.pk}"' in text and f'data-snapshot="{automatic.pk}"' in text
    row = text.split(f'data-snapshot="{snapshot.pk}"')[1].split("</tr>")[0]
    assert "snappy" in row and ">config<" in row and "before the upgrade" in row and "oscar" in row
    assert "0\xa0minutes ago" in row
    assert filesizeformat(snapshot.size) in row
    auto_row = text.split(f'data-snapshot="{automatic.pk}"')[1].split("</tr>")[0]
    assert ">full<" in auto_row and "+ output" in auto_row and "schedule" in auto_row and "system" in auto_row
    assert reverse("snapshot-download", args=[snapshot.pk]) in row
    assert reverse("snapshot-export", args=[snapshot.pk]) in row
    # A viewer sees no buttons that would act.
    assert reverse("snapshot-restore", args=[snapshot.pk]) not in text
    assert ">Snapshots</a>" in text and ">Storage</a>" in text


def test_the_instance_page_lists_only_its_snapshots_and_offers_the_forms(client, operator, instance, snapshot):
    other = instance_services.instance_create(instance_id="other")
    layout.build_instance_tree("other")
    elsewhere = snapshots.create(other, kind="config")
    client.force_login(operator)
    text = client.get("/snapshots/instance/snappy/").content.decode()
    assert f'data-snapshot="{snapshot.pk}"' in text and f'data-snapshot="{elsewhere.pk}"' not in text
    for form in ("snapshot-create", "snapshot-schedule", "snapshot-import"):
        assert reverse(form, args=["snappy"]) in text
    for action in ("snapshot-restore", "snapshot-clone", "snapshot-delete"):
        assert reverse(action, args=[snapshot.pk]) in text


def test_a_viewer_sees_the_instance_page_without_its_forms(client, stranger, instance, snapshot):
    client.force_login(stranger)
    text = client.get("/snapshots/instance/snappy/").content.decode()
    assert f'data-snapshot="{snapshot.pk}"' in text
    assert reverse("snapshot-create", args=["snappy"]) not in text


def test_snapshots_of_a_deleted_instance_stay_listed_and_can_only_be_cloned(client, operator, instance, snapshot):
    Instance.objects.filter(pk=instance.pk).delete()
    client.force_login(operator)
    text = client.get("/snapshots/instance/snappy/").content.decode()
    assert 'id="instance-gone"' in text and f'data-snapshot="{snapshot.pk}"' in text
    assert reverse("snapshot-restore", args=[snapshot.pk]) not in text
    assert reverse("snapshot-clone", args=[snapshot.pk]) in text
    assert "Clone the snapshot into a new instance" in client.get(
        reverse("snapshot-restore", args=[snapshot.pk])).content.decode()
    response = client.post(reverse("snapshot-restore", args=[snapshot.pk]), follow=True)
    assert "no longer exists; clone the snapshot into a new instance instead" in response.content.decode()
    assert not Operation.objects.exists()


def test_an_unknown_instance_is_not_found(client, stranger):
    client.force_login(stranger)
    assert client.get("/snapshots/instance/nobody/").status_code == 404


# --- Who may act ---------------------------------------------------------------------------------------------

def test_a_stranger_may_not_create_restore_clone_delete_import_or_schedule(client, stranger, instance, snapshot):
    client.force_login(stranger)
    posts = [
        (reverse("snapshot-create", args=["snappy"]), {"kind": "config"}),
        (reverse("snapshot-import", args=["snappy"]),
         {"file": SimpleUploadedFile("s.json", b'{"git_custom_nodes": {}}')}),
        (reverse("snapshot-schedule", args=["snappy"]), {"snapshot_every_hours": 1, "snapshot_keep": 2}),
        (reverse("snapshot-restore", args=[snapshot.pk]), {}),
        (reverse("snapshot-clone", args=[snapshot.pk]), {"new_instance_id": "copy"}),
        (reverse("snapshot-delete", args=[snapshot.pk]), {}),
    ]
    for url, data in posts:
        assert client.post(url, data).status_code == 403, url
    for name in ("snapshot-restore", "snapshot-clone", "snapshot-delete"):
        assert client.get(reverse(name, args=[snapshot.pk])).status_code == 403, name
    assert not Operation.objects.exists()
    assert list(Snapshot.objects.all()) == [snapshot] and snapshots.archive_path(snapshot).exists()
    instance.refresh_from_db()
    assert (instance.snapshot_every_hours, instance.snapshot_keep) == (0, 7)


# --- Create --------------------------------------------------------------------------------------------------

def test_an_operator_creates_a_snapshot_through_an_operation(client, operator, instance, run_worker):
    client.force_login(operator)
    response = client.post(reverse("snapshot-create", args=["snappy"]),
                           {"kind": "full", "include_output": "on", "note": "all of it"})
    operation = finished(operation_after(response), run_worker)
    assert (operation.kind, operation.status) == ("snapshot_create", Operation.Status.SUCCEEDED), operation.error
    created = Snapshot.objects.get()
    assert (created.kind, created.include_output, created.note, created.created_by) == ("full", True, "all of it",
                                                                                      operator)
    assert "output" in created.manifest["trees"]


def test_a_bad_kind_or_a_long_note_is_refused_next_to_its_field(client, operator, instance):
    client.force_login(operator)
    response = client.post(reverse("snapshot-create", args=["snappy"]), {"kind": "weekly"})
    assert response.status_code == 400
    assert "Select a valid choice. weekly is not one of the available choices." in response.content.decode()
    response = client.post(reverse("snapshot-create", args=["snappy"]), {"kind": "config", "note": "n" * 301})
    assert response.status_code == 400 and "at most 300 characters" in response.content.decode()
    assert not Operation.objects.exists()


# --- Download and export -------------------------------------------------------------------------------------

def test_a_viewer_may_not_download_archives_they_hold_settings_and_environment(client, stranger, snapshot):
    client.force_login(stranger)
    assert client.get(reverse("snapshot-download", args=[snapshot.pk])).status_code == 403
    assert client.get(reverse("snapshot-export", args=[snapshot.pk])).status_code == 403


def test_download_returns_the_exact_archive_as_an_attachment(client, operator, snapshot):
    client.force_login(operator)
    response = client.get(reverse("snapshot-download", args=[snapshot.pk]))
    assert response.status_code == 200
    path = snapshots.archive_path(snapshot)
    assert b"".join(response.streaming_content) == path.read_bytes()
    assert response["Content-Disposition"] == f'attachment; filename="{path.name}"'
    assert response["Content-Type"] == "application/gzip"


def test_download_refuses_an_archive_outside_the_backups_folder(client, operator, instance, storage):
    outside = storage["backups"].parent / "secret.tar.gz"
    outside.write_bytes(b"not yours")
    evil = Snapshot.objects.create(instance=instance, instance_label="snappy", kind="config",
                                   archive="../secret.tar.gz", sha256="0" * 64)
    client.force_login(operator)
    response = client.get(reverse("snapshot-download", args=[evil.pk]))
    assert response.status_code == 404 and b"not yours" not in response.content


def test_download_of_a_missing_archive_says_so(client, operator, snapshot):
    snapshots.archive_path(snapshot).unlink()
    client.force_login(operator)
    response = client.get(reverse("snapshot-download", args=[snapshot.pk]), follow=True)
    assert f"The archive {snapshot.archive} is missing" in response.content.decode()


def test_export_downloads_the_comfyui_manager_json(client, operator, instance, tmp_path, node_git):
    from instances import customnodes

    url, commits = make_node_repo(tmp_path / "repos")
    customnodes.install(instance, url, "v1")
    full = snapshots.create(instance, kind="full")
    client.force_login(operator)
    response = client.get(reverse("snapshot-export", args=[full.pk]))
    assert response["Content-Disposition"].startswith("attachment; filename=")
    assert response["Content-Disposition"].endswith('_snappy_snapshot.json"')
    assert json.loads(response.content) == {"comfyui": "", "git_custom_nodes": {
        url: {"hash": commits["v1"], "disabled": False}}, "file_custom_nodes": [], "pips": {}}


# --- Restore -------------------------------------------------------------------------------------------------

def test_the_restore_page_says_what_happens_before_anything_does(client, operator, snapshot):
    client.force_login(operator)
    text = client.get(reverse("snapshot-restore", args=[snapshot.pk])).content.decode()
    assert "An undo snapshot is taken first" in text
    assert "A running instance is stopped, restored and started again" in text
    Instance.objects.filter(pk=snapshot.instance_id).update(desired_state=Instance.DesiredState.RUNNING)
    text = client.get(reverse("snapshot-restore", args=[snapshot.pk])).content.decode()
    assert "is running:</strong> it is stopped, restored and started again" in text
    assert not Operation.objects.exists()


def test_restoring_puts_the_file_back_and_keeps_an_undo_snapshot(client, operator, snapshot, workflow, run_worker):
    workflow.write_text('{"changed": true}')
    client.force_login(operator)
    operation = finished(operation_after(client.post(reverse("snapshot-restore", args=[snapshot.pk]))), run_worker)
    assert (operation.kind, operation.status) == ("snapshot_restore", Operation.Status.SUCCEEDED), operation.error
    assert json.loads(workflow.read_text()) == {"nodes": []}
    undo = Snapshot.objects.get(pk=operation.result["undo_snapshot"])
    assert undo.automatic == "before-restore"
    text = client.get("/snapshots/instance/snappy/").content.decode()
    assert f'data-snapshot="{undo.pk}"' in text and "before-restore" in text


# --- Clone ---------------------------------------------------------------------------------------------------

def test_the_clone_form_offers_only_free_gpus(client, operator, snapshot):
    client.force_login(operator)
    response = client.get(reverse("snapshot-clone", args=[snapshot.pk]))
    values = [str(choice[0]) for choice in response.context["form"].fields["gpus"].choices]
    assert values == ["0", "2", "3"]  # GPU 1 is held by snappy


@pytest.mark.parametrize("data, message", [
    ({"new_instance_id": "Bad/Id"}, "Use lowercase letters a-z, digits and"),
    ({"new_instance_id": "snappy"}, "An instance &#x27;snappy&#x27; already exists; pick another id."),
    ({"new_instance_id": "fine", "gpus": ["1"]}, "Select a valid choice. 1 is not one of the available choices."),
    ({"new_instance_id": ""}, "This field is required."),
])
def test_a_bad_or_taken_id_or_a_held_gpu_is_refused_and_nothing_is_queued(client, operator, snapshot, data, message):
    client.force_login(operator)
    response = client.post(reverse("snapshot-clone", args=[snapshot.pk]), data)
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Operation.objects.exists() and Instance.objects.count() == 1


def test_cloning_makes_a_new_instance_with_the_chosen_gpus(client, operator, snapshot, storage, run_worker):
    client.force_login(operator)
    response = client.post(reverse("snapshot-clone", args=[snapshot.pk]),
                           {"new_instance_id": "snappy-copy", "gpus": ["2", "3"]})
    operation = finished(operation_after(response), run_worker)
    assert operation.status == Operation.Status.SUCCEEDED, operation.error
    clone = Instance.objects.get(instance_id="snappy-copy")
    assert [gpu.index for gpu in clone.assigned_gpus()] == [2, 3] and clone.extra_args == ["--lowvram"]
    assert json.loads((storage["instances"] / "snappy-copy" / "user" / "default" / "workflows" / "w.json")
                      .read_text()) == {"nodes": []}


# --- Delete --------------------------------------------------------------------------------------------------

def test_delete_asks_first_then_removes_the_row_and_the_archive(client, operator, snapshot):
    archive = snapshots.archive_path(snapshot)
    client.force_login(operator)
    text = client.get(reverse("snapshot-delete", args=[snapshot.pk])).content.decode()
    assert "deletes the snapshot and its archive file for good" in text
    assert Snapshot.objects.exists()
    refused = client.post(reverse("snapshot-delete", args=[snapshot.pk]), {"confirm": f"{snapshot.pk}\n"})
    assert refused.status_code == 400
    assert f"Type the snapshot number {snapshot.pk} exactly to delete it." in refused.content.decode()
    assert Snapshot.objects.exists() and archive.exists()
    response = client.post(reverse("snapshot-delete", args=[snapshot.pk]), {"confirm": str(snapshot.pk)}, follow=True)
    assert response.redirect_chain[-1][0] == "/snapshots/instance/snappy/"
    assert f"Deleted snapshot {snapshot.pk} of &#x27;snappy&#x27; and its archive." in response.content.decode()
    assert not Snapshot.objects.exists() and not archive.exists()


# --- ComfyUI-Manager import ----------------------------------------------------------------------------------

def test_a_comfyui_manager_snapshot_installs_its_nodes(client, operator, instance, storage, tmp_path, run_worker,
                                                       node_git):
    url, commits = make_node_repo(tmp_path / "repos")
    manager = {"comfyui": "", "git_custom_nodes": {url: {"hash": commits["v1"], "disabled": False}},
               "file_custom_nodes": [], "pips": {}}
    client.force_login(operator)
    response = client.post(reverse("snapshot-import", args=["snappy"]),
                           {"file": SimpleUploadedFile("snapshot.json", json.dumps(manager).encode())})
    operation = finished(operation_after(response), run_worker)
    assert (operation.kind, operation.status) == ("snapshot_import_manager", Operation.Status.SUCCEEDED), \
        operation.error
    assert (storage["instances"] / "snappy" / "custom_nodes" / "ComfyUI-Test-Nodes" / "__init__.py").exists()
    assert operation.result["installed"][0]["result"] == f"installed at {commits['v1'][:12]}"


@pytest.mark.parametrize("content, message", [
    (b'{"git_custom_nodes": {', "The snapshot file snapshot.json is not valid JSON: Expecting property name "
                               "enclosed in double quotes at line 1, column 23."),
    (b'["a", "list"]', "Not a ComfyUI-Manager snapshot: the JSON is a list, not an object with "
                       "&#x27;git_custom_nodes&#x27;."),
    (b'{"git_custom_nodes": [1, 2]}', "&#x27;git_custom_nodes&#x27; is a list; it should be an object of git URLs"),
    (b'{"nodes": []}', "Not a ComfyUI-Manager snapshot: it has none of"),
    (b"\xff\xfe\x00binary", "The snapshot file snapshot.json is not UTF-8 text (byte 0xff at offset 0)"),
    (b" " * (2 << 20) + b"{}", "a ComfyUI-Manager snapshot is a few kilobytes"),
])
def test_a_file_that_is_not_a_manager_snapshot_is_refused_clearly(client, operator, instance, content, message):
    client.force_login(operator)
    response = client.post(reverse("snapshot-import", args=["snappy"]),
                           {"file": SimpleUploadedFile("snapshot.json", content)})
    assert response.status_code == 400
    assert message in response.content.decode()
    assert not Operation.objects.exists()


# --- Schedule ------------------------------------------------------------------------------------------------

def test_the_schedule_is_saved_on_the_instance(client, operator, instance):
    client.force_login(operator)
    response = client.post(reverse("snapshot-schedule", args=["snappy"]),
                           {"snapshot_every_hours": "6", "snapshot_keep": "3"}, follow=True)
    assert "takes a config snapshot every 6 hour(s), keeping the last 3" in response.content.decode()
    instance.refresh_from_db()
    assert (instance.snapshot_every_hours, instance.snapshot_keep) == (6, 3)
    response = client.post(reverse("snapshot-schedule", args=["snappy"]),
                           {"snapshot_every_hours": "0", "snapshot_keep": "3"}, follow=True)
    assert "Scheduled snapshots of &#x27;snappy&#x27; are off." in response.content.decode()


@pytest.mark.parametrize("data, message", [
    ({"snapshot_every_hours": "721", "snapshot_keep": "7"}, "less than or equal to 720"),
    ({"snapshot_every_hours": "-1", "snapshot_keep": "7"}, "greater than or equal to 0"),
    ({"snapshot_every_hours": "6", "snapshot_keep": "0"}, "greater than or equal to 1"),
    ({"snapshot_every_hours": "6", "snapshot_keep": "1001"}, "less than or equal to 1000"),
    ({"snapshot_every_hours": "often", "snapshot_keep": "7"}, "Enter a whole number."),
])
def test_a_schedule_out_of_range_is_refused_and_nothing_changes(client, operator, instance, data, message):
    client.force_login(operator)
    response = client.post(reverse("snapshot-schedule", args=["snappy"]), data)
    assert response.status_code == 400 and message in response.content.decode()
    instance.refresh_from_db()
    assert (instance.snapshot_every_hours, instance.snapshot_keep) == (0, 7)

