"""The storage layout: what the directory build creates, what it never touches, and where paths may go."""
import importlib.util
import os
import shutil
from pathlib import Path

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
    assert section["base_path"] == "/shared/models" and "is_default" not in section
    assert section["checkpoints"] == "checkpoints/"
    assert section["diffusion_models"].split() == ["diffusion_models/", "unet/"]
    assert set(section) - {"base_path"} == set(layout.MODEL_FOLDERS)


def _comfyui_double():
    spec = importlib.util.spec_from_file_location(
        "comfyui_double_server", Path(__file__).parent / "comfyui_double" / "server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_instance_models_folder_comes_first_for_every_model_folder_so_downloads_land_there(settings):
    # Nodes save downloads to folder_paths.get_folder_paths(kind)[0]: it must be the instance's writable
    # /instance/models/<folder>, never the read-only /shared. Read with ComfyUI's rules as the test double has them
    # (utils/extra_config.py, folder_paths.add_model_folder_path with is_default), started as docs/runtime-contract.md
    # says.
    layout.build_instance_tree("downloads")
    config = settings.COMFY_INSTANCES_PATH / "downloads" / "extra_model_paths.yaml"
    double = _comfyui_double()
    args = double.build_parser().parse_args(
        ["--listen", "0.0.0.0", "--base-directory", "/instance", "--extra-model-paths-config", str(config)])
    paths = double.Paths(args)
    paths.apply_custom_paths(args)
    for key, folders in layout.MODEL_FOLDERS.items():
        search = paths.folders[key][0]
        assert search[0] == f"/instance/models/{folders[0]}", (key, search)
        shared = [f"/shared/models/{folder}" for folder in folders]
        assert set(shared) <= set(search), (key, search)
        assert all(search.index(f"/instance/models/{folder}") < search.index(path)
                   for folder in folders if f"/instance/models/{folder}" in search for path in shared), (key, search)
        assert len(search) == len(set(search)), (key, search)


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
    with pytest.raises(layout.LayoutError, match="output is not a folder; move it away"):
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


# --- A hostile instance folder: links the container planted ---------------------------------------------------

def plant(link, canary, how):
    """A link to the canary: absolute, or relative (climbing out of storage by '..')."""
    if how == "absolute":
        os.symlink(canary, link)
    else:
        os.symlink(os.path.relpath(canary, link.parent), link)


@pytest.mark.parametrize("how", ["absolute", "relative"])
@pytest.mark.parametrize("level", ["custom_nodes", "user", "user/default", "user/default/workflows", "models",
                                   "input", "temp"])
def test_a_build_refuses_a_planted_link_where_a_folder_belongs_and_names_it(settings, canary, level, how):
    if os.geteuid() == 0:
        settings.PUID, settings.PGID = 1234, 2345  # a chown through the link would show on the canary
    layout.build_instance_tree("trapped")
    link = settings.COMFY_INSTANCES_PATH / "trapped" / level
    shutil.rmtree(link)
    plant(link, canary, how)
    with pytest.raises(layout.LayoutError) as refused:
        layout.build_instance_tree("trapped")
    assert f"{link} is a link" in str(refused.value) and f"rm '{link}'" in str(refused.value)
    assert os.path.islink(link)


def test_the_generated_file_replaces_a_planted_link_and_never_writes_through_it(settings, canary):
    layout.build_instance_tree("generated")
    root = settings.COMFY_INSTANCES_PATH / "generated"
    (root / "extra_model_paths.yaml").unlink()
    os.symlink(canary / "secret.txt", root / "extra_model_paths.yaml")
    # The old temporary name (predictable: .<name>.tmp-<pid>) planted as a link too: it is never used.
    os.symlink(canary / "secret.txt", root / f".extra_model_paths.yaml.tmp-{os.getpid()}")
    layout.build_instance_tree("generated")
    config = root / "extra_model_paths.yaml"
    assert not config.is_symlink() and config.read_text() == layout.extra_model_paths_yaml()
    assert os.path.islink(root / f".extra_model_paths.yaml.tmp-{os.getpid()}")
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".comfyhub-")) == []


def test_an_instance_folder_that_is_a_link_is_refused(settings, canary):
    settings.COMFY_INSTANCES_PATH.mkdir(parents=True)
    os.symlink(canary, settings.COMFY_INSTANCES_PATH / "aliased")
    with pytest.raises(layout.LayoutError, match="aliased is a link"):
        layout.build_instance_tree("aliased")


def test_shared_input_links_never_follow_or_chown_what_the_instance_planted(settings, canary):
    if os.geteuid() == 0:
        settings.PUID, settings.PGID = 1234, 2345
    layout.build_shared_tree()
    layout.build_instance_tree("inputs")
    shared_input = settings.COMFY_SHARED_PATH / "input"
    own_input = settings.COMFY_INSTANCES_PATH / "inputs" / "input"
    (shared_input / "photo.png").write_bytes(b"p")
    os.symlink(canary / "secret.txt", own_input / "photo.png")  # named like a shared file
    os.symlink(canary / "sub", own_input / "stale.png")  # not ComfyHub's: kept
    os.symlink("/shared/input/gone.png", own_input / "gone.png")  # ComfyHub's, its file gone: dropped
    report = layout.link_shared_input("inputs")
    assert report.skipped_links == ["photo.png"] and report.links == []
    assert os.readlink(own_input / "photo.png") == str(canary / "secret.txt")
    assert os.path.islink(own_input / "stale.png") and not os.path.lexists(own_input / "gone.png")
    shutil.rmtree(own_input)
    plant(own_input, canary, "absolute")
    with pytest.raises(layout.LayoutError, match="input is a link"):
        layout.link_shared_input("inputs")
