"""File operations in a tree hostile code can write: no link is ever followed, at any depth, and a folder outside
(the canary, standing for the host) stays byte-for-byte as it was: contents, owners and modes."""
import os

import pytest

from storage_app import safefs


@pytest.fixture
def root(tmp_path):
    tree = tmp_path / "instance"
    (tree / "d1" / "d2").mkdir(parents=True)
    return tree


LEVELS = ["a", "d1/a", "d1/d2/a"]


def plant(root, relpath, canary, how):
    """A link at root/relpath to the canary: absolute, relative, or a chain of relative links."""
    link = root / relpath
    depth = len(relpath.split("/"))
    if how == "absolute":
        os.symlink(canary, link)
    elif how == "relative":
        os.symlink("../" * depth + canary.name, link)
    else:  # hop -> .. (alone it stays at the root's parent), then a -> hop/<up>/host
        os.symlink("..", root / "hop")
        os.symlink("../" * (depth - 1) + "hop/" + canary.name, link)
    return link


@pytest.mark.parametrize("how", ["absolute", "relative", "chain"])
@pytest.mark.parametrize("level", LEVELS)
def test_it_refuses_a_link_at_any_level_and_names_it(root, canary, level, how):
    link = plant(root, level, canary, how)
    with pytest.raises(safefs.UnsafePathError) as refused:
        safefs.open_dir(root, f"{level}/sub")
    assert str(link) in str(refused.value) and f"rm '{link}'" in str(refused.value)
    assert refused.value.path == str(link)
    with pytest.raises(safefs.UnsafePathError):
        safefs.read_bytes(root, f"{level}/secret.txt", 1 << 20)
    with pytest.raises(safefs.UnsafePathError):
        safefs.write_bytes(root, f"{level}/secret.txt", b"pwned", create_parents=True)
    with pytest.raises(safefs.UnsafePathError):
        safefs.open_dir(root, f"{level}/new/folder", create=True)
    with pytest.raises(safefs.UnsafePathError):
        safefs.lstat(root, f"{level}/secret.txt")
    with pytest.raises(safefs.UnsafePathError):
        safefs.remove_tree(root, f"{level}/sub")
    with pytest.raises(safefs.UnsafePathError):
        list(safefs.walk(root, level))
    assert os.path.islink(link)


def test_a_link_as_the_final_name_is_replaced_never_written_through(root, canary):
    os.symlink(canary / "secret.txt", root / "d1" / "settings.json")
    safefs.write_bytes(root, "d1/settings.json", b"{}")
    assert not os.path.islink(root / "d1" / "settings.json")
    assert (root / "d1" / "settings.json").read_bytes() == b"{}"


def test_without_replace_an_existing_name_of_any_kind_is_left_alone(root, canary):
    os.symlink(canary / "secret.txt", root / "d1" / "new.json")
    (root / "d1" / "taken.json").write_bytes(b"mine")
    for name in ("new.json", "taken.json"):
        with pytest.raises(FileExistsError):
            safefs.write_bytes(root, f"d1/{name}", b"theirs", replace=False)
    assert os.readlink(root / "d1" / "new.json") == str(canary / "secret.txt")
    assert (root / "d1" / "taken.json").read_bytes() == b"mine"
    assert sorted(os.listdir(root / "d1")) == ["d2", "new.json", "taken.json"]  # no temporary file left


def test_reading_refuses_a_link_as_the_final_name_a_fifo_and_what_is_too_big(root, canary):
    os.symlink(canary / "secret.txt", root / "link.json")
    with pytest.raises(safefs.UnsafePathError, match="link.json is a link"):
        safefs.read_bytes(root, "link.json", 1 << 20)
    os.mkfifo(root / "fifo.json")
    with pytest.raises(safefs.UnsafePathError, match="not a regular file"):
        safefs.read_bytes(root, "fifo.json", 1 << 20)  # opened without blocking: no writer needed
    (root / "big.json").write_bytes(b"x" * 11)
    with pytest.raises(safefs.UnsafePathError, match="over the limit of 10"):
        safefs.read_bytes(root, "big.json", 10)
    assert safefs.read_bytes(root, "big.json", 11) == b"x" * 11


def test_temporary_files_get_fresh_names_and_never_open_a_planted_one(root, canary, monkeypatch):
    names = iter(["planted", "planted", "fresh"])
    monkeypatch.setattr(safefs.secrets, "token_hex", lambda _count: next(names))
    os.symlink(canary / "secret.txt", root / ".comfyhub-planted.tmp")
    with safefs.opened_dir(root) as fd:
        tmp_fd, tmp_name = safefs.create_temp(fd)
        os.write(tmp_fd, b"ours")
        os.close(tmp_fd)
    assert tmp_name == ".comfyhub-fresh.tmp"
    assert (root / tmp_name).read_bytes() == b"ours" and not os.path.islink(root / tmp_name)


def test_random_temporary_names_differ(root):
    with safefs.opened_dir(root) as fd:
        made = [safefs.create_temp(fd) for _ in range(20)]
        for tmp_fd, _ in made:
            os.close(tmp_fd)
    assert len({name for _, name in made}) == 20


def test_chown_never_reaches_a_links_target(root, canary, settings):
    if os.geteuid() != 0:
        pytest.fail("this suite runs as root (make test on CI); ownership cannot be checked otherwise")
    settings.PUID, settings.PGID = 1234, 2345
    (root / "d1" / "own.txt").write_bytes(b"own")
    os.symlink(canary / "secret.txt", root / "d1" / "to-file")
    os.symlink(canary, root / "d1" / "d2" / "to-folder")
    os.symlink("../../../host/secret.txt", root / "d1" / "d2" / "relative")
    os.mkfifo(root / "d1" / "fifo")
    safefs.chown_tree(root)
    for path in ("d1", "d1/own.txt", "d1/to-file", "d1/d2/to-folder", "d1/d2/relative", "d1/fifo"):
        info = os.lstat(root / path)
        assert (info.st_uid, info.st_gid) == (1234, 2345), path


def test_folders_made_on_the_way_are_given_to_puid_and_reported(root, settings):
    if os.geteuid() != 0:
        pytest.fail("this suite runs as root (make test on CI); ownership cannot be checked otherwise")
    settings.PUID, settings.PGID = 1234, 2345
    created = []
    with safefs.opened_dir(root, "d1/new/deeper", create=True, created=created):
        pass
    assert created == [root / "d1" / "new", root / "d1" / "new" / "deeper"]
    assert os.stat(root / "d1" / "new" / "deeper").st_uid == 1234
    assert os.stat(root / "d1").st_uid == 0  # what existed is not touched


def test_rename_and_move_never_replace(root, canary):
    (root / "d1" / "a.txt").write_bytes(b"a")
    (root / "d1" / "b.txt").write_bytes(b"b")
    with safefs.opened_dir(root, "d1") as fd, pytest.raises(FileExistsError):
        safefs.rename_noreplace(fd, "a.txt", fd, "b.txt")
    with pytest.raises(FileExistsError):
        safefs.move(root, "d1/a.txt", root, "d1/b.txt")
    assert (root / "d1" / "a.txt").read_bytes() == b"a" and (root / "d1" / "b.txt").read_bytes() == b"b"
    os.symlink(canary, root / "d1" / "d2" / "away")
    with pytest.raises(safefs.UnsafePathError):
        safefs.move(root, "d1/a.txt", root, "d1/d2/away/a.txt")
    safefs.move(root, "d1/a.txt", root, "d1/d2/a.txt")
    assert (root / "d1" / "d2" / "a.txt").read_bytes() == b"a"


def test_removing_a_tree_removes_links_and_never_what_they_point_to(root, canary):
    os.symlink(canary, root / "d1" / "d2" / "to-folder")
    os.symlink(canary / "secret.txt", root / "d1" / "to-file")
    safefs.remove_tree(root, "d1")
    assert not os.path.lexists(root / "d1")


def test_the_walk_lists_links_and_never_enters_them(root, canary):
    os.symlink(canary, root / "d1" / "away")
    (root / "d1" / "d2" / "file.json").write_bytes(b"{}")
    walked = [(folder, dirs, files, links) for folder, dirs, files, links in safefs.walk(root)]
    assert walked == [(".", ["d1"], [], []), ("d1", ["d2"], [], ["away"]), ("d1/d2", [], ["file.json"], [])]


def test_links_that_stay_inside_are_told_apart_from_those_that_leave(root, canary):
    (root / "d1" / "d2" / "real.txt").write_bytes(b"r")
    os.symlink("d2/real.txt", root / "d1" / "inside")
    os.symlink("../d1/./d2", root / "d1" / "up-and-back")
    os.symlink(str(root / "d1"), root / "absolute")  # absolute: means something else inside a container
    os.symlink("../../host", root / "d1" / "out")
    os.symlink(".", root / "x")  # x -> . stays inside; y -> x/.. leaves through it
    os.symlink("x/..", root / "y")
    os.symlink("loop-b", root / "loop-a")
    os.symlink("loop-a", root / "loop-b")
    os.symlink("missing/..", root / "dangling")
    found = dict(safefs.find_links(root))
    assert found == {"d1/inside": "d2/real.txt", "d1/up-and-back": "../d1/./d2", "absolute": str(root / "d1"),
                     "d1/out": "../../host", "x": ".", "y": "x/..", "loop-a": "loop-b", "loop-b": "loop-a",
                     "dangling": "missing/.."}
    leave = {path for path in found if not safefs.link_resolves_inside(root, path)}
    assert leave == {"absolute", "d1/out", "y", "loop-a", "loop-b"}
    assert safefs.link_stays_inside("y", "x/..")  # by its spelling alone it would pass: chains need resolving
    assert not safefs.link_stays_inside("d1/out", "../../host")


def test_unlinking_removes_only_a_link(root, canary):
    os.symlink(canary, root / "d1" / "away")
    (root / "d1" / "file").write_bytes(b"f")
    assert safefs.unlink_link(root, "d1/away") is True and not os.path.lexists(root / "d1" / "away")
    assert safefs.unlink_link(root, "d1/file") is False and (root / "d1" / "file").exists()
    assert safefs.unlink_link(root, "d1/absent") is False


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/../../b", "a\0b"])
def test_paths_that_leave_the_root_by_their_spelling_are_refused(root, bad):
    with pytest.raises(safefs.UnsafePathError, match="not a relative path"):
        safefs.parts_of(bad)


def test_the_root_itself_may_not_be_a_link(tmp_path, root):
    os.symlink(root, tmp_path / "alias")
    with pytest.raises(safefs.UnsafePathError, match="alias is a link"):
        safefs.open_dir(tmp_path / "alias")


def test_a_refusal_quotes_a_path_for_the_shell():
    assert safefs.shell_quote("/srv/it's here") == "'/srv/it'\\''s here'"
