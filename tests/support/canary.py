"""A host folder outside storage (the canary) and a byte-for-byte picture of it: what a hostile instance folder must
never change, whatever ComfyHub does in it."""
import os
import stat


def make_canary(folder):
    """A folder standing for the host: a private file, a sub-folder with a workflow-like file, model-like files."""
    (folder / "sub").mkdir(parents=True)
    (folder / "secret.txt").write_bytes(b"host secret\n")
    (folder / "sub" / "deep.json").write_bytes(b'{"host": true}')
    (folder / "host.safetensors").write_bytes(b"host model")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "host.safetensors").write_bytes(b"host checkpoint")
    os.chmod(folder / "secret.txt", 0o600)
    os.chmod(folder / "sub", 0o750)
    return folder


def snapshot(folder):
    """Everything under `folder` (itself included), by lstat: kind, mode, owner, mtime, and content or link target."""
    found = {".": _describe(folder)}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            found[os.path.relpath(path, folder)] = _describe(path)
    return found


def _describe(path):
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        body = ("link", os.readlink(path))
    elif stat.S_ISREG(info.st_mode):
        with open(path, "rb") as handle:
            body = ("file", handle.read())
    else:
        body = ("folder", None)
    return body, stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, info.st_mtime_ns
