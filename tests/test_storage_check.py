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


# --- A hostile instance folder: links the container planted ---------------------------------------------------

def test_it_lists_every_link_out_of_an_instance_and_the_fix_removes_only_the_links(storage, canary):
    services.instance_create(instance_id="trapped")
    layout.build_shared_tree()
    (storage["shared"] / "input" / "photo.png").write_bytes(b"p")
    layout.build_instance_tree("trapped")  # links input/photo.png -> /shared/input/photo.png: ComfyHub's own
    root = storage["instances"] / "trapped"
    (root / "custom_nodes" / "node" / "deep").mkdir(parents=True)
    os.symlink(canary, root / "custom_nodes" / "node" / "deep" / "absolute")
    os.symlink("../../../../../host", root / "custom_nodes" / "node" / "relative")  # climbs out of storage
    os.symlink(".", root / "models" / "here")  # stays inside by itself...
    os.symlink("here/../..", root / "models" / "chain")  # ...and this one leaves through it
    os.symlink("../models", root / "user" / "fine")  # stays inside: not a finding
    os.symlink("/shared/input/secret.txt", root / "user" / "spoofed")  # ComfyHub's target, not ComfyHub's place
    found = {f.message.split(" is a link")[0]: f for f in check_storage() if f.code == "unsafe-link"}
    leaving = [root / "custom_nodes/node/deep/absolute", root / "custom_nodes/node/relative", root / "models/chain",
               root / "user/spoofed"]
    assert sorted(found) == sorted(str(path) for path in leaving)
    for path in leaving:
        assert found[str(path)].fix.startswith(f"rm '{path}'") and found[str(path)].subject == "trapped"
    fixed = [f for f in check_storage(fix=True) if f.code == "unsafe-link"]
    assert len(fixed) == 4 and all(f.fixed for f in fixed)
    assert not any(os.path.lexists(path) for path in leaving)
    assert os.readlink(root / "input" / "photo.png") == "/shared/input/photo.png"
    assert os.path.islink(root / "user" / "fine") and os.path.islink(root / "models" / "here")
    assert check_storage() == []


def test_a_planted_link_where_a_folder_belongs_is_removed_then_the_folder_built(storage, canary):
    services.instance_create(instance_id="swapped")
    layout.build_instance_tree("swapped")
    root = storage["instances"] / "swapped"
    os.rmdir(root / "output")
    os.symlink(canary, root / "output")
    (root / "extra_model_paths.yaml").unlink()
    os.symlink(canary / "secret.txt", root / "extra_model_paths.yaml")
    findings = {(f.code, f.subject): f for f in check_storage()}
    assert set(findings) == {("unsafe-link", "swapped"), ("extra-model-paths", "swapped")}
    assert "is a link" in findings[("extra-model-paths", "swapped")].message  # never read through
    check_storage(fix=True)
    assert (root / "output").is_dir() and not (root / "output").is_symlink()
    assert (root / "extra_model_paths.yaml").read_text() == layout.extra_model_paths_yaml()
    assert check_storage() == []


def test_the_command_prints_each_link_with_its_rm(storage, canary, capsys):
    services.instance_create(instance_id="cli")
    layout.build_instance_tree("cli")
    link = storage["instances"] / "cli" / "temp" / "away"
    os.symlink(canary, link)
    with pytest.raises(SystemExit):
        call_command("storage", "check")
    out = capsys.readouterr().out
    assert f"unsafe-link (cli) [fixable with --fix]: {link} is a link to {canary}" in out
    assert f"fix: rm '{link}'" in out
    call_command("storage", "check", "--fix")
    assert not os.path.lexists(link)
