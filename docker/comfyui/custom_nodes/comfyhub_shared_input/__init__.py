"""ComfyHub's upload guard, shipped in ComfyHub's ComfyUI image: an upload over the name of a shared input image
replaces the instance's link to /shared/input/<name> with the uploaded file, instead of ComfyUI answering 500.

ComfyHub links each file of the shared input folder into the instance's input/ as a link to the read-only /shared
mount. ComfyUI's POST /upload/image (and /upload/mask) with overwrite=true opens input/<subfolder>/<name> for
writing, which follows such a link onto the read-only mount and fails. This extension adds one aiohttp middleware that
runs just before those two handlers and turns that link into the instance's own copy of the shared file (uploads.py
holds the rule); the handler then writes the upload over that copy, and ComfyHub's link refresh never puts a link back
over a file.

Loaded by ComfyUI as a custom node from /opt/comfyhub/custom_nodes (the image's /opt/comfyui/extra_model_paths.yaml
names that folder). It defines no nodes; nodes.json (an empty list) says so to ComfyHub's test double, which reads
that file instead of importing a custom node's Python."""

import logging
import re

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

UPLOAD_PATH = re.compile(r"^(/api)?/upload/(image|mask)$")


def _install():
    from aiohttp import web

    import folder_paths
    import server

    from .uploads import overwrite_requested, replace_shared_link_before_upload

    @web.middleware
    async def comfyhub_shared_input_uploads(request, handler):
        if request.method == "POST" and UPLOAD_PATH.match(request.path):
            # aiohttp keeps the parsed form on the request: the handler's own request.post() gets the same one.
            post = await request.post()
            if post.get("type") in (None, "input"):
                image = post.get("image")
                try:
                    replaced = replace_shared_link_before_upload(
                        folder_paths.get_input_directory(), post.get("subfolder", ""),
                        getattr(image, "filename", None), overwrite=overwrite_requested(post.get("overwrite")))
                except Exception:  # never let the guard itself break an upload: ComfyUI decides as before
                    logging.exception("ComfyHub: could not check the upload's target for a shared input link")
                    replaced = None
                if replaced:
                    logging.info("ComfyHub: the upload replaces the link to the shared input image %s", replaced)
        return await handler(request)

    # Custom nodes load before the server starts, while the application's middleware list can still change; the
    # last one runs closest to the handler, after ComfyUI's own (origin check included).
    server.PromptServer.instance.app.middlewares.append(comfyhub_shared_input_uploads)


try:
    _install()
except Exception:  # a ComfyUI this guard does not know: uploads behave as in plain ComfyUI
    logging.exception("ComfyHub: the shared input upload guard is not active")
