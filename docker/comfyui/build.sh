#!/bin/sh
# Runs once, as root, in the Dockerfile's build stage: installs ComfyUI into /opt/comfyui, the torch stack and
# ComfyUI's requirements into the image's Python, and writes /etc/comfyhub/{constraints.txt,image.json}. Then it
# copies what it added or changed to /tmp/comfyhub-image/ (and lists what it removed) for the image's final stage.
# The build arguments arrive as environment variables (COMFYUI_REF, COMFYUI_URL, TORCH_INDEX_URL, ...).
set -eu
context=/tmp/comfyhub-build
say() { echo "comfyhub-build: $*"; }

if ! command -v python3 >/dev/null 2>&1; then
    say "the base image has no python3; pick a BASE_IMAGE with Python 3 and pip (the default: python:3.12-slim-bookworm)"
    exit 1
fi

# What the base image holds before this build, so that only what the build changes goes into the image: the
# build context (wheels/ can be gigabytes) stays in the build stage.
cat > /tmp/comfyhub-changes.py <<'PY'
"""snapshot: record the state of the file system; stage DIR: copy what changed since into DIR (a tree rooted at
/), and list what was removed in DIR/etc/comfyhub/removed-from-base.txt."""
import os, pickle, shutil, stat, sys

STATE = "/tmp/comfyhub-base-state"
SKIP = {"/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf"}


def state():
    seen = {}
    for folder, dirs, files in os.walk("/"):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in SKIP]
        for name in dirs + files:
            path = os.path.join(folder, name)
            if path in SKIP:
                continue
            try:
                info = os.lstat(path)
            except OSError:
                continue
            link = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
            seen[path] = (info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_mtime_ns, link)
    return seen


def copy_entry(path, staging):
    """Copy one file, link or folder (not its contents) to staging, with its parents' modes and owners."""
    target = staging + path
    parent = os.path.dirname(path)
    if not os.path.isdir(staging + parent):
        copy_entry(parent, staging)
    info = os.lstat(path)
    if stat.S_ISDIR(info.st_mode):
        os.makedirs(target, exist_ok=True)
        shutil.copystat(path, target)
    elif stat.S_ISREG(info.st_mode):
        try:
            os.link(path, target)  # gigabytes of torch need no second copy in the build stage
            return
        except OSError:
            shutil.copy2(path, target)
    elif stat.S_ISLNK(info.st_mode):
        shutil.copy2(path, target, follow_symlinks=False)
    else:
        print(f"comfyhub-build: left out {path}: not a file, link or folder", flush=True)
        return
    os.chown(target, info.st_uid, info.st_gid, follow_symlinks=False)


def stage(staging):
    with open(STATE, "rb") as saved:
        before = pickle.load(saved)
    after = state()
    os.makedirs(staging)
    shutil.copystat("/", staging)
    changed = 0
    for path in sorted(after):
        old, new = before.get(path), after[path]
        if old == new:
            continue
        if old and stat.S_ISDIR(new[0]) and old[:3] == new[:3]:
            continue  # a folder that only gained or lost entries: those are copied or listed themselves
        copy_entry(path, staging)
        changed += 1
    removed = sorted(path for path in before if path not in after)
    os.makedirs(staging + "/etc/comfyhub", exist_ok=True)
    with open(staging + "/etc/comfyhub/removed-from-base.txt", "w") as out:
        out.write("".join(path + "\n" for path in removed))
    print(f"comfyhub-build: the image adds or changes {changed} paths and removes {len(removed)}", flush=True)


if sys.argv[1] == "snapshot":
    with open(STATE, "wb") as out:
        pickle.dump(state(), out)
else:
    stage(sys.argv[2])
PY
python3 /tmp/comfyhub-changes.py snapshot

# A TLS-inspecting proxy's certificate authority, for this build only (images build --ca-bundle).
if [ -s "$context/extra-ca.pem" ]; then
    bundle=/tmp/comfyhub-build-ca.pem
    cat /etc/ssl/certs/ca-certificates.crt "$context/extra-ca.pem" > "$bundle" 2>/dev/null \
        || cp "$context/extra-ca.pem" "$bundle"
    export PIP_CERT="$bundle" SSL_CERT_FILE="$bundle"
fi
# The image's Python is ComfyUI's alone: Debian's "externally managed" marker does not apply.
rm -f /usr/lib/python3*/EXTERNALLY-MANAGED /usr/local/lib/python3*/EXTERNALLY-MANAGED
if ! python3 -m pip --version >/dev/null 2>&1; then
    say "the base image has no pip for python3 (on Debian: apt-get install python3-pip); pick another BASE_IMAGE"
    exit 1
fi

# git: ComfyHub clones and updates custom nodes with the instance's own image (CUSTOM_NODE_GIT_IMAGE empty).
if ! command -v git >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        say "installing git from the base image's package sources"
        if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends git ca-certificates; }; then
            say "apt-get could not install git; pick a BASE_IMAGE that has git (or reaches its package mirror)"
            exit 1
        fi
        rm -rf /var/lib/apt/lists/*
    else
        say "the base image has no git and no apt-get; pick a BASE_IMAGE with git (custom nodes are cloned with it)"
        exit 1
    fi
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
wheels=""
if [ -d "$context/wheels" ]; then wheels="--find-links $context/wheels"; fi
index_options() {  # $1: an index URL or "none"
    if [ "$1" = none ]; then echo "--no-index"; else echo "--index-url $1"; fi
}

# ComfyUI itself.
mkdir -p /opt/comfyui /etc/comfyhub
if [ -f "$context/comfyui/main.py" ]; then
    say "ComfyUI from the local checkout in the build context"
    cp -a "$context/comfyui/." /opt/comfyui/
    rm -rf /opt/comfyui/.git
    source_ref=local
else
    say "ComfyUI $COMFYUI_REF from $COMFYUI_URL"
    python3 - "$COMFYUI_URL/archive/$COMFYUI_REF.tar.gz" /opt/comfyui "$COMFYUI_REF" <<'PY'
import io, sys, tarfile, urllib.request
url, target, ref = sys.argv[1:4]
try:
    data = urllib.request.urlopen(url, timeout=300).read()
except OSError as error:
    sys.exit(f"comfyhub-build: cannot download ComfyUI {ref} from {url}: {error}. Check COMFYUI_REF (a release tag, "
             "branch or commit of ComfyUI) and COMFYUI_URL, or build offline: put a ComfyUI checkout into the build "
             "context's comfyui/ folder (and the wheels pip needs into wheels/).")
with tarfile.open(fileobj=io.BytesIO(data)) as archive:
    members = []
    for member in archive.getmembers():
        parts = member.name.split("/", 1)
        if len(parts) == 2 and parts[1]:
            member.name = parts[1]
            members.append(member)
    try:
        archive.extractall(target, members=members, filter="data")
    except TypeError:  # a Python without extraction filters: GitHub's archive of a release is trusted as it is
        archive.extractall(target, members=members)
PY
    source_ref="$COMFYUI_REF"
fi
if [ ! -f /opt/comfyui/main.py ]; then
    say "the ComfyUI source has no main.py: COMFYUI_REF or the comfyui/ folder does not hold ComfyUI"
    exit 1
fi

# The torch stack, pinned, from its own index (never mixed with another index's builds).
if [ -n "$TORCH_PACKAGES" ]; then
    say "torch stack: $TORCH_PACKAGES from $TORCH_INDEX_URL"
    # shellcheck disable=SC2046,SC2086
    python3 -m pip install $(index_options "$TORCH_INDEX_URL") $wheels $TORCH_PACKAGES
fi
python3 - <<'PY'
import importlib.metadata as metadata, re
stack = re.compile(r"^(torch|torchvision|torchaudio|triton|pytorch-triton.*|nvidia-.*)$")
pins = sorted({f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
               if d.metadata["Name"] and stack.match(d.metadata["Name"].lower())})
with open("/etc/comfyhub/constraints.txt", "w") as out:
    out.write("# The image's torch stack: pip in this image (custom nodes' requirements) may not replace it.\n")
    out.write("".join(pin + "\n" for pin in pins))
print("comfyhub-build: pinned " + (", ".join(pins) or "nothing (no torch in this image)"))
PY

# ComfyUI's requirements (its frontend package among them), without the torch stack: that is installed above.
if [ -f /opt/comfyui/requirements.txt ]; then
    grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;#].*)?$' \
        /opt/comfyui/requirements.txt > /tmp/comfyui-requirements.txt || true
else
    : > /tmp/comfyui-requirements.txt
fi
say "ComfyUI's requirements${EXTRA_PACKAGES:+ and $EXTRA_PACKAGES}"
# shellcheck disable=SC2046,SC2086
python3 -m pip install $(index_options "$PIP_INDEX_URL") $wheels -c /etc/comfyhub/constraints.txt \
    -r /tmp/comfyui-requirements.txt $EXTRA_PACKAGES

# What the image holds, read from it (images list shows it).
COMFYUI_SOURCE_REF="$source_ref" python3 - <<'PY'
import importlib.metadata as metadata, json, os, platform, re
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
comfyui = None
try:
    with open("/opt/comfyui/comfyui_version.py") as source:
        match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)", source.read())
    comfyui = match.group(1) if match else None
except OSError:
    pass
info = {"comfyui_version": comfyui, "comfyui_ref": os.environ["COMFYUI_SOURCE_REF"],
        "python_version": platform.python_version(), "torch_version": version("torch"),
        "torchvision_version": version("torchvision"), "torchaudio_version": version("torchaudio"),
        "frontend_version": version("comfyui-frontend-package"),
        "torch_index_url": os.environ.get("TORCH_INDEX_URL", "")}
with open("/etc/comfyhub/image.json", "w") as out:
    json.dump(info, out, indent=1, sort_keys=True)
print("comfyhub-build: " + json.dumps(info, sort_keys=True))
PY

install -m 0755 "$context/entrypoint.sh" /usr/local/bin/comfyhub-entrypoint
if [ -d "$context/custom_nodes" ]; then
    mkdir -p /opt/comfyhub && cp -a "$context/custom_nodes" /opt/comfyhub/custom_nodes
    # ComfyUI reads the extra_model_paths.yaml next to its main.py at every start: this one adds the folder above to
    # its custom node folders (after the instance's own). A local checkout's own file is kept, this one appended.
    # Only here: ComfyUI stops at start on a custom_nodes folder that does not exist.
    if [ -f "$context/extra_model_paths.yaml" ]; then
        if [ -f /opt/comfyui/extra_model_paths.yaml ]; then echo >> /opt/comfyui/extra_model_paths.yaml; fi
        cat "$context/extra_model_paths.yaml" >> /opt/comfyui/extra_model_paths.yaml
    fi
fi
# Compiled now, as root: at run time /opt is read-only to the instance's uid.
python3 -m compileall -q /opt/comfyui /opt/comfyhub >/dev/null 2>&1 || true
chmod -R a+rX /opt/comfyui /etc/comfyhub
if [ -d /opt/comfyhub ]; then chmod -R a+rX /opt/comfyhub; fi

python3 /tmp/comfyhub-changes.py stage /tmp/comfyhub-image
