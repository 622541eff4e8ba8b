"""Storage validation: each finding, what --fix repairs, and what it never touches."""
import json
import os

import pytest
from django.core.management import call_command

from instances import services
from storage_app import layout
from storage_app.checks import check_storage

pytestmark = pytest.mark.django_db(transaction=True)


def codes(findings):
    return sorted((f.code, f.subject) for f in findings)


def test_a_consistent_install_has_no_findings(storage):
    services.instance_create(instance_id="tidy")
    layout.build_shared_tree()
    layout.build_instance_tree("tidy")
    assert check_storage() == []


def test_it_finds_orphans_missing_folders_and_generated_files(storage):
    services.instance_create(instance_id="registered")
    broken = services.instance_create(instance_id="half")
    layout.build_instance_tree("half")
    (storage["instances"] / "half" / "extra_model_paths.yaml").write_text("edited: by hand\n")
    os.rmdir(storage["instances"] / "half" / "temp")
    (storage["instances"] / "stray").mkdir(parents=True)
    (storage["instances"] / "stray" / "keep.txt").write_text("keep")
    assert codes(check_storage()) == [("extra-model-paths", "half"), ("missing-directory", "registered"),
                                      ("missing-folders", "half"), ("orphan-directory", "stray")]
    fixed = check_storage(fix=True)
    # Building the missing folders also rewrites the generated file, so that finding is gone with them.
    assert {f.code for f in fixed if f.fixed} == {"missing-directory", "missing-folders"}
    assert codes(check_storage()) == [("orphan-directory", "stray")]
    assert (storage["instances"] / "stray" / "keep.txt").read_text() == "keep"  # never touched
    assert broken.instance_id == "half"


def test_it_reports_inbox_files_and_two_instances_sharing_a_folder(storage):
    services.instance_create(instance_id="first")
    services.instance_create(instance_id="second")
    layout.build_instance_tree("first")
    os.symlink(storage["instances"] / "first", storage["instances"] / "second")
    (storage["instances"] / "first" / "models" / "loras").mkdir(parents=True)
    (storage["instances"] / "first" / "models" / "loras" / "got.safetensors").write_bytes(b"x")
    found = {(f.code, f.subject): f for f in check_storage()}
    assert ("shared-read-write", "second") in found
    assert "loras/got.safetensors" in found[("inbox", "first")].message


def test_it_reports_shared_files_the_instances_user_could_write(storage, settings):
    layout.build_shared_tree()
    model = storage["shared"] / "models" / "checkpoints" / "m.ckpt"
    model.write_bytes(b"m")
    os.chmod(model, 0o644)
    os.chown(model, settings.PUID, settings.PGID)
    [finding] = check_storage()
    assert finding.code == "shared-writable" and str(model) in finding.message and "chmod" in finding.fix
    os.chown(model, 0, 0)
    assert check_storage() == []


def test_the_command_prints_json_and_exits_non_zero_while_findings_remain(storage, capsys):
    services.instance_create(instance_id="unbuilt")
    with pytest.raises(SystemExit) as exit_info:
        call_command("storage", "check", "--json")
    assert exit_info.value.code == 1
    [finding] = json.loads(capsys.readouterr().out)
    assert finding["code"] == "missing-directory" and finding["fixable"] is True
    call_command("storage", "check", "--fix")  # fixes everything: exits normally
    call_command("storage", "check")
    assert "Storage is consistent" in capsys.readouterr().out
