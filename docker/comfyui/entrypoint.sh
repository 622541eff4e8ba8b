#!/bin/sh
# Starts ComfyUI as whatever uid:gid the container runs as. The container's arguments are ComfyUI's arguments.
set -eu

if [ "$(id -u)" = 0 ] && [ -z "${COMFYHUB_ALLOW_ROOT:-}" ]; then
    echo "comfyhub-entrypoint: refusing to run ComfyUI as root; run the container with --user UID:GID" \
         "(ComfyHub uses PUID:PGID), or set COMFYHUB_ALLOW_ROOT=1." >&2
    exit 1
fi
for folder in "$HOME" "${XDG_CACHE_HOME:-$HOME/.cache}"; do
    if ! mkdir -p "$folder" 2>/dev/null || [ ! -w "$folder" ]; then
        echo "comfyhub-entrypoint: cannot write $folder as uid $(id -u) gid $(id -g): make the instance folder" \
             "mounted at /instance (and its home/) writable for that uid:gid." >&2
        exit 1
    fi
done
# ComfyUI keeps its database beside its code by default (/opt/comfyui/user/comfyui.db), which this uid cannot
# write: the instance's user/ folder holds it instead. A --database-url among the arguments comes later and wins.
if grep -q -e "--database-url" /opt/comfyui/comfy/cli_args.py 2>/dev/null; then
    set -- --database-url "sqlite:////instance/user/comfyui.db" "$@"
fi
exec python3 /opt/comfyui/main.py "$@"
