"""`manage.py images`: the ComfyUI images instances run, on a node's Docker engine: build ComfyHub's own
(docker/comfyui), pull others, list what instances use with the versions read from each image.

Build and pull run as operations and are followed until they end. The `--json` output and the exit codes are a
contract, documented in docs/cli.md.
"""
from __future__ import annotations

from django.core.management.base import CommandError

from comfyhub import cli
from comfyhub.cli import EXIT_FAILED, human_size, input_error
from instances import docker_engine, images, services
from instances.models import Node


class Command(cli.Command):
    help = "Build ComfyHub's ComfyUI image, pull images, and list the images instances use (see docs/cli.md)."
    handlers = {"build": "build", "pull": "pull", "list": "list_images"}

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        waiting = cli.waiting_options()
        node = {"default": None, "metavar": "NAME", "help": "The node whose Docker engine does it (default: local)."}

        build = actions.add_parser("build", parents=[waiting],
                                   help="Build ComfyHub's ComfyUI image (docker/comfyui) on a node's engine.")
        build.add_argument("--tag", default=None, help="The tag it gets (default: COMFY_IMAGE).")
        build.add_argument("--comfyui-ref", default=None, metavar="REF",
                           help="The ComfyUI release tag, branch or commit to download (default: the Dockerfile's).")
        build.add_argument("--comfyui-source", default=None, metavar="PATH",
                           help="A local ComfyUI checkout to use instead of downloading (its tracked files).")
        build.add_argument("--torch-index-url", default=None, metavar="URL",
                           help="Where torch comes from, e.g. https://download.pytorch.org/whl/cu128, or 'none' "
                                "(only --wheels).")
        build.add_argument("--base-image", default=None, metavar="IMAGE",
                           help="The image to build on (default: the Dockerfile's python:3.12-slim-bookworm).")
        build.add_argument("--ca-bundle", default=None, metavar="PATH",
                           help="Extra certificate authorities (PEM) for the build: a TLS-inspecting proxy's.")
        build.add_argument("--wheels", default=None, metavar="DIR",
                           help="A folder of wheels pip may install from (offline hosts).")
        build.add_argument("--build-arg", action="append", default=[], metavar="NAME=VALUE",
                           help="Another build argument of the Dockerfile (TORCH_PACKAGES, PIP_INDEX_URL, "
                                "EXTRA_PACKAGES, COMFYUI_URL); repeat for each.")
        build.add_argument("--node", **node)

        pull = actions.add_parser("pull", parents=[waiting], help="Pull an image onto a node's engine.")
        pull.add_argument("image", metavar="IMAGE")
        pull.add_argument("--node", **node)

        listing = actions.add_parser("list", help="The images instances use (and COMFY_IMAGE), with what they hold.")
        listing.add_argument("--node", **node)
        listing.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")

    def build(self, options):
        node = find_node(options["node"])
        build_args = {}
        for pair in options["build_arg"]:
            name, sep, value = pair.partition("=")
            if not sep or not name:
                raise input_error({"build_args": [f"'{pair}' is not NAME=VALUE, e.g. TORCH_PACKAGES=torch==2.9.1."]})
            build_args[name] = value
        operation = cli.call_service(
            images.image_build, node=node, tag=options["tag"], comfyui_ref=options["comfyui_ref"],
            comfyui_source=options["comfyui_source"], torch_index_url=options["torch_index_url"],
            base_image=options["base_image"], ca_bundle=options["ca_bundle"], wheels=options["wheels"],
            build_args=build_args)
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            self.stdout.write(summary("Built", done.result or {}))

    def pull(self, options):
        node = find_node(options["node"])
        operation = cli.call_service(images.image_pull, node=node, image=options["image"])
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is not None:
            self.stdout.write(summary("Pulled", done.result or {}))

    def list_images(self, options):
        node = find_node(options["node"])
        try:
            rows = images.image_listing(node)
        except docker_engine.EngineError as exc:
            raise CommandError(str(exc), returncode=EXIT_FAILED) from exc
        if options["json"]:
            self.write_json(rows)
            return
        table = [("IMAGE", "NODE", "ID", "SIZE", "COMFYUI", "TORCH", "PYTHON", "INSTANCES")]
        for row in rows:
            if not row["present"]:
                table.append((row["image"], row["node"], "missing", "-", "-", "-", "-", used_by(row)))
                continue
            table.append((row["image"], row["node"], short_id(row["id"]), human_size(row["size"]),
                          version(row, "comfyui_version"), version(row, "torch_version"),
                          version(row, "python_version"), used_by(row)))
        self.write_table(table)
        if any(not row["present"] for row in rows):
            self.stdout.write("Missing images: build ComfyHub's with `manage.py images build [--tag IMAGE]`, pull "
                              "others with `manage.py images pull IMAGE`.")


def find_node(name: str | None) -> Node:
    if name is None:
        return services.local_node()
    node = Node.objects.filter(name=name).first()
    if node is None:
        raise cli.unknown("node", name, Node.objects.values_list("name", flat=True))
    return node


def short_id(image_id: str | None) -> str:
    return (image_id or "").removeprefix("sha256:")[:12] or "-"


def version(row: dict, key: str) -> str:
    """A version read from the image; "none" when the image says it has none, "unknown" when it does not say."""
    return row.get(key) or ("none" if row.get("versions_from") else "unknown")


def used_by(row: dict) -> str:
    names = ", ".join(row["instances"])
    if row.get("default"):
        names = f"{names} (COMFY_IMAGE)" if names else "COMFY_IMAGE"
    return names or "-"


def summary(verb: str, result: dict) -> str:
    if not result.get("present", True):
        return f"{verb} {result.get('image')} on {result.get('node')}."
    size = human_size(result["size"]) if result.get("size") is not None else "size unknown"
    versions = ", ".join(f"{label} {version(result, key)}" for label, key in
                         (("ComfyUI", "comfyui_version"), ("torch", "torch_version"), ("Python", "python_version")))
    return f"{verb} {result.get('image')} on {result.get('node')}: {short_id(result.get('id'))} ({size}), {versions}."
