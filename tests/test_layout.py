"""The storage layout: what the directory build creates, what it never touches, and where paths may go."""
import os

import pytest
import yaml

from storage_app import layout


def test_the_build_creates_the_plans_tree_and_the_model_paths_file(settings):
    report = layout.build_shared_tree()
    layout.build_instance_tree("studio", report=report)
    shared, instance = settings.COMFY_SHARED_PATH, settings.COMFY_INSTANCES_PATH / "studio"
    for folder in ("checkpoints", "vae", "loras", "embeddings", "diffusion_models", "unet", "text_encoders", "clip"):
        assert (shared / "models" / folder).is_dir()
    assert (shared / "input").is_dir()
    for sub in ("custom_nodes", "user", "temp", "output", "input", "models"):
        assert (instance / sub).is_dir()
    config = yaml.safe_load((instance / "extra_model_paths.yaml").read_text())
    section = config["comfyhub_shared"]
    assert section["base_path"] == "/shared/models" and section["is_default"] is True
    assert section["checkpoints"] == "checkpoints/"
    assert section["diffusion_models"].split() == ["diffusion_models/", "unet/"]
    assert set(section) - {"base_path", "is_default"} == set(layout.MODEL_FOLDERS)


def test_building_twice_changes_nothing_and_never_overwrites(settings):
    layout.build_instance_tree("again")
    workflow = settings.COMFY_INSTANCES_PATH / "again" / "user" / "default" / "workflows" / "mine.json"
    workflow.write_text('{"mine": true}')
    second = layout.build_instance_tree("again")
    assert second.created == []
    assert workflow.read_text() == '{"mine": true}'


def test_a_file_where_a_folder_belongs_is_reported_not_replaced(settings):
    root = settings.COMFY_INSTANCES_PATH / "blocked"
    root.mkdir(parents=True)
    (root / "output").write_text("not a folder")
    with pytest.raises(layout.LayoutError, match="exists but is not a directory"):
        layout.build_instance_tree("blocked")
    assert (root / "output").read_text() == "not a folder"


def test_shared_input_files_appear_as_links_without_hiding_the_instances_own(settings):
    layout.build_shared_tree()
    layout.build_instance_tree("linker")
    shared_input = settings.COMFY_SHARED_PATH / "input"
    own_input = settings.COMFY_INSTANCES_PATH / "linker" / "input"
    (shared_input / "shared.png").write_bytes(b"s")
    (shared_input / "clash.png").write_bytes(b"s")
    (own_input / "clash.png").write_bytes(b"mine")
    report = layout.link_shared_input("linker")
    assert report.links == ["shared.png"] and report.skipped_links == ["clash.png"]
    assert os.readlink(own_input / "shared.png") == "/shared/input/shared.png"
    assert (own_input / "clash.png").read_bytes() == b"mine"
    (shared_input / "shared.png").unlink()
    layout.link_shared_input("linker")
    assert not os.path.lexists(own_input / "shared.png")
    assert (own_input / "clash.png").exists()


@pytest.mark.parametrize("bad", ["..", "../x", "a/../../b", "/etc", "", "x" * 64, "UPPER"])
def test_an_instance_path_never_escapes_the_instances_root(bad):
    with pytest.raises(layout.LayoutError):
        layout.instance_dir(bad)


def test_created_folders_belong_to_puid_and_pgid_when_running_as_root(settings):
    if os.geteuid() != 0:
        pytest.fail("this suite runs as root (make test on CI); ownership cannot be checked otherwise")
    settings.PUID, settings.PGID = 1234, 2345
    layout.build_instance_tree("owned")
    stat = (settings.COMFY_INSTANCES_PATH / "owned" / "custom_nodes").stat()
    assert (stat.st_uid, stat.st_gid) == (1234, 2345)
    stat = (settings.COMFY_INSTANCES_PATH / "owned" / "extra_model_paths.yaml").stat()
    assert (stat.st_uid, stat.st_gid) == (1234, 2345)
