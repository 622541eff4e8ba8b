"""Bad input never ends in a 500 or a traceback: every form field and every command argument, given values a person
could type or upload by mistake (empty, 1 MB of text, a NUL byte, a trailing newline, a word for a number, a negative
number, digits that are not ASCII, JSON nested 100,000 deep, bytes that are not UTF-8, the wrong JSON types), gets a
clear message: a form error or a message on the page, exit code 2 and the message on stderr.

The tables are checked against the code: a new form, page or command argument that no table names fails
`test_every_form_page_and_argument_is_in_a_table`.
"""
import argparse
import inspect
import json
import os
import subprocess
import sys
from io import StringIO

import pytest
from django import forms
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management import call_command, load_command_class
from django.core.management.base import CommandError
from django.urls import URLPattern, URLResolver, get_resolver, reverse

import comfyhub.forms
import instances.forms
import instances.forms_clusters
import storage_app.forms
from comfyhub import jsonlimits
from instances import access, services, workflows
from instances.models import Cluster, Instance, WorkflowEntry, WorkflowVersion
from storage_app import layout
from storage_app.models import Snapshot
from tests.conftest import REPO, worker_database_url

pytestmark = pytest.mark.django_db

DEEP = "[" * 100_000 + "]" * 100_000
BAD_TEXT = {
    "empty": "",
    "1 MB": "x" * (1 << 20),
    "NUL byte": "bad\x00value",
    "trailing newline": "bad\n",
    "a word for a number": "abc",
    "negative": "-1",
    "non-ASCII digits": "²",
    "deeply nested JSON": DEEP,
}
# Files: (name, content). A small UPLOAD_MAX_BYTES (see `limits`) makes "too big" cheap.
BAD_FILES = {
    "empty": b"",
    "not UTF-8": b"\xff\xfe\x00\x81binary",
    "deeply nested JSON": DEEP.encode(),
    "too big": b" " * 70_000,
    "not JSON": b"{oops",
    "NaN": b'{"a": NaN}',
    "a list": b"[1, 2, 3]",
}
BAD_WORKFLOWS = {
    "nodes is a string": {"nodes": "KSampler"},
    "a node type is a list": {"nodes": [{"id": 1, "type": ["KSampler"]}]},
    "definitions is a list": {"nodes": [], "definitions": [1]},
    "subgraphs hold numbers": {"nodes": [], "definitions": {"subgraphs": [1, 2]}},
    "a subgraph id is an object": {"nodes": [], "definitions": {"subgraphs": [{"id": {}, "nodes": []}]}},
    "inputs is a list": {"1": {"class_type": "KSampler", "inputs": [1, 2]}},
    "class_type is a number": {"1": {"class_type": 5}},
}
BAD_MANAGER_SNAPSHOTS = {
    "git_custom_nodes is a list of ints": {"git_custom_nodes": [1, 2, 3]},
    "a node is a string": {"git_custom_nodes": {"https://example.com/a/b": "abc"}},
    "a hash is a list": {"git_custom_nodes": {"https://example.com/a/b": {"hash": ["x"]}}},
    "disabled is a string": {"git_custom_nodes": {"https://example.com/a/b": {"disabled": "no"}}},
    "file_custom_nodes holds numbers": {"git_custom_nodes": {}, "file_custom_nodes": [1]},
    "pips is a list": {"git_custom_nodes": {}, "pips": ["torch"]},
    "a string": "git_custom_nodes",
}


@pytest.fixture(autouse=True)
def limits(settings):
    settings.UPLOAD_MAX_BYTES = 64 * 1024
    settings.UPLOAD_MAX_DEPTH = 64


@pytest.fixture
def world(storage, admin_user):
    """An instance with a workflow, a snapshot row, a template and a library entry: something for every form."""
    instance = services.instance_create(instance_id="bad")
    layout.build_instance_tree("bad")
    (workflows.workflows_dir(instance) / "w.json").write_text('{"nodes": []}')
    snapshot = Snapshot.objects.create(instance=instance, instance_label="bad", kind="config", archive="none.tar.gz",
                                       sha256="0" * 64)
    services.template_create(name="tpl")
    share = access.share_add(instance=instance, username=admin_user.username)
    entry = WorkflowEntry.objects.create(name="lib")
    WorkflowVersion.objects.create(entry=entry, number=1, sha256="1" * 64, content='{"nodes": []}')
    return {"instance": instance, "snapshot": snapshot, "share": share}


def shows_a_message(response) -> bool:
    text = response.content.decode(errors="replace")
    return 'class="errorlist' in text or 'class="messages"' in text


# --- Pages: (url name, url args, method, the form's other fields, the fields to spoil) ----------------------------

PAGE_FIELDS = [
    ("instance-create", [], "post", {"instance_id": "new-one"},
     ["instance_id", "display_name", "description", "image", "extra_args", "extra_env", "host_port", "gpus",
      "adopt", "image_arguments", "arguments_variable", "owner", "idle_stop_after", "node"]),
    ("instance-edit", ["bad"], "post", {},
     ["display_name", "description", "image", "extra_args", "extra_env", "host_port", "gpus", "image_arguments",
      "arguments_variable", "owner", "idle_stop_after"]),
    ("instance-create-own", [], "post", {"template": "tpl", "instance_id": "own-one"},
     ["template", "instance_id", "display_name"]),
    ("instance-share-add", ["bad"], "post", {"username": "sam"}, ["username", "group"]),
    ("instance-share-remove", ["bad", "{share}"], "post", {}, ["confirm"]),
    ("instance-delete", ["bad"], "post", {}, ["confirm", "purge_data"]),
    ("instance-workflows-check", ["bad"], "post", {"paths": "w.json"}, ["paths", "targets", "on_conflict"]),
    ("instance-workflows-copy", ["bad"], "post", {"paths": "w.json"}, ["paths", "targets", "on_conflict",
                                                                       "all_workflows"]),
    ("instance-workflow-publish", ["bad"], "post", {"path": "w.json", "name": "n"}, ["path", "name"]),
    ("instance-node-install", ["bad"], "post", {"url": "https://example.com/o/n"}, ["url", "ref"]),
    ("instance-node-action", ["bad"], "post", {"name": "n", "action": "update"}, ["name", "action"]),
    ("library-install", [], "post", {"name": "lib", "instances": "bad"}, ["name", "version", "instances"]),
    ("template-create", [], "post", {"name": "t2", "gpu_count": "0"},
     ["name", "description", "image", "extra_args", "extra_env", "gpu_count", "min_gpus", "custom_nodes", "settings",
      "starter_workflows", "self_service"]),
    ("template-new-instance", ["tpl"], "post", {"instance_id": "from-tpl"},
     ["instance_id", "display_name", "host_port"]),
    ("template-apply", ["tpl"], "post", {}, ["instance"]),
    ("gpu-shareable", ["{gpu}"], "post", {}, ["shareable"]),
    ("instance-start", ["bad"], "post", {}, ["next"]),
    ("instance-move", ["bad"], "post", {}, ["node"]),
    ("models-verify", [], "post", {}, ["full"]),
    ("models-verify-node", [], "post", {}, ["node", "full"]),
    ("models-promote", ["bad"], "post", {}, ["path"]),
    ("models-cache-warm", [], "post", {}, ["instance", "node"]),
    ("models-cache-check", [], "post", {}, ["node"]),
    ("snapshot-create", ["bad"], "post", {"kind": "config"}, ["kind", "include_output", "note"]),
    ("snapshot-schedule", ["bad"], "post", {"snapshot_every_hours": "1", "snapshot_keep": "2"},
     ["snapshot_every_hours", "snapshot_keep"]),
    ("snapshot-clone", ["{snapshot}"], "post", {"new_instance_id": "cloned"}, ["new_instance_id", "gpus", "node"]),
    ("snapshot-delete", ["{snapshot}"], "post", {}, ["confirm"]),
    ("legacy-migrate", [], "post", {"source": "/nonexistent-source"}, ["source", "instance_id", "mode"]),
    ("legacy-plan", [], "post", {"source": "/nonexistent-source"}, ["source", "instance_id", "mode"]),
    ("legacy", [], "get", {"source": "/nonexistent-source"}, ["source", "instance_id", "mode"]),
    ("model-list", [], "get", {}, ["q", "folder", "status", "page", "node"]),
    ("operation-list", [], "get", {}, ["status", "kind", "page"]),
    ("dashboard", [], "get", {}, ["page"]),
    ("instance-rows", [], "get", {}, ["page"]),
    ("snapshot-list", [], "get", {}, ["page"]),
    ("snapshot-instance", ["bad"], "get", {}, ["page"]),
    ("instance-logs", ["bad"], "get", {}, ["tail"]),
    ("image-build", [], "post", {"node": "local"}, ["node", "image"]),
    ("image-pull", [], "post", {"node": "local"}, ["node", "image"]),
    ("account-token-create", [], "post", {"name": "render script"}, ["name", "expires", "password"]),
    ("node-revoke-approval", ["local"], "post", {}, ["confirm"]),
    ("cluster-create", [], "post", {"name": "bad-cluster", "master": "bad"},
     ["name", "description", "template", "new_members", "master", "workers", "cors_origin"]),
    ("cluster-add-worker", ["{cluster}"], "post", {}, ["instance"]),
    ("cluster-remove-worker", ["{cluster}"], "post", {"instance": "clu-w1"}, ["instance", "confirm"]),
    ("cluster-delete", ["{cluster}"], "post", {}, ["confirm"]),
]
# Upload fields: (url name, url args, field, the bad contents to send).
UPLOAD_FIELDS = [
    ("instance-workflow-check-file", ["bad"], "file",
     {**BAD_FILES, **{k: json.dumps(v).encode() for k, v in BAD_WORKFLOWS.items()}}),
    ("snapshot-import", ["bad"], "file",
     {**BAD_FILES, **{k: json.dumps(v).encode() for k, v in BAD_MANAGER_SNAPSHOTS.items()}}),
    ("models-import", [], "file", BAD_FILES),
    ("models-cache-warm", [], "workflow",
     {**BAD_FILES, **{k: json.dumps(v).encode() for k, v in BAD_WORKFLOWS.items()}}),
]
# Pages whose only input is in the URL (a slug or a number Django's URL patterns check) or none at all.
NO_FORM_INPUT = {
    "instance-detail", "instance-live", "instance-build", "instance-stop", "instance-restart", "instance-logs-download",
    "gpu-list", "gpu-discover", "instance-workflows", "instance-drift", "instance-nodes", "library", "template-list",
    "template-detail", "models-scan", "models-export", "snapshot-download", "snapshot-export", "snapshot-restore",
    "storage-check", "storage-fix", "operation-detail", "operation-live", "operation-cancel", "diagnostics-run",
    "login", "logout", "legacy-plan-live", "legacy-plan-result", "account", "account-token-revoke",
    "instance-open", "instance-open-path", "node-list", "node-detail", "node-approve",
    "cluster-list", "cluster-detail", "cluster-live", "cluster-start", "cluster-stop", "cluster-sync", "cluster-probe",
    "instance-distribution", "instance-netdist-check",
}
# The proxy's endpoints: their input is the headers nginx passes (the original URI, a Bearer token), spoiled below and
# through a real nginx in tests/test_proxy.py.
HEADER_INPUT = {"hub-auth", "hub-denied", "hub-unavailable"}


def page_cases() -> list:
    return list(_page_cases())


def _page_cases():
    for name, args, method, base, fields in PAGE_FIELDS:
        for field in fields:
            for label in BAD_TEXT:
                yield pytest.param(name, args, method, base, field, label, id=f"{name}-{field}-{label}")


def resolved(args, world):
    from instances.models import GPU

    gpu = GPU.objects.first()
    cluster = a_cluster() if "{cluster}" in args else None
    return [str(world["snapshot"].pk) if a == "{snapshot}" else str(gpu.pk if gpu else 1) if a == "{gpu}" else
            str(world["share"].pk) if a == "{share}" else cluster.name if a == "{cluster}" else a for a in args]


def a_cluster():
    """A cluster "clu" of two CPU instances (made only for the cluster pages' cases)."""
    from instances import clusters

    master = services.instance_create(instance_id="clu-master")
    worker = services.instance_create(instance_id="clu-w1")
    return clusters.cluster_create(name="clu", master=master, workers=[worker])


@pytest.mark.parametrize("label", list(BAD_TEXT))
@pytest.mark.parametrize("name", sorted(HEADER_INPUT))
def test_a_bad_original_uri_or_token_at_the_proxy_endpoints_is_refused_never_a_500(client, admin_user, world, name,
                                                                                   label):
    bad = BAD_TEXT[label]
    # "This instance is not running" (the unavailable page, which hub-denied also shows for a stopped one): by design.
    designed = {503} if name in ("hub-unavailable", "hub-denied") else set()
    for headers in ({"HTTP_X_ORIGINAL_URI": f"/i/{bad}/"}, {"HTTP_X_ORIGINAL_URI": f"/i/bad/{bad}"},
                    {"HTTP_X_ORIGINAL_URI": "/i/bad/", "HTTP_AUTHORIZATION": f"Bearer {bad}"},
                    {"HTTP_X_FORWARDED_URI": bad}):
        client.logout()
        response = client.get(reverse(name), **headers)
        assert response.status_code < 500 or response.status_code in designed, (headers, response.content[:500])
        client.force_login(admin_user)
        response = client.get(reverse(name), **headers)
        assert response.status_code < 500 or response.status_code in designed, (headers, response.content[:500])


@pytest.mark.parametrize("name, args, method, base, field, label", page_cases())
def test_a_bad_value_in_any_field_gets_a_message_never_a_500(client, admin_user, world, name, args, method, base,
                                                             field, label):
    client.force_login(admin_user)
    url = reverse(name, args=resolved(args, world))
    data = {**base, field: BAD_TEXT[label]}
    response = getattr(client, method)(url, data)
    assert response.status_code < 500, response.content[:2000]
    if response.status_code in (301, 302):
        response = client.get(response["Location"])
        assert response.status_code < 500
    if method == "post" and response.status_code != 404:
        assert shows_a_message(response), f"{name} {field}={label!r}: no form error and no message"


def upload_cases() -> list:
    return list(_upload_cases())


def _upload_cases():
    for name, args, field, contents in UPLOAD_FIELDS:
        for label in contents:
            yield pytest.param(name, args, field, contents[label], id=f"{name}-{label}")


@pytest.mark.parametrize("name, args, field, content", upload_cases())
def test_a_bad_upload_gets_a_message_never_a_500(client, admin_user, world, name, args, field, content):
    client.force_login(admin_user)
    response = client.post(reverse(name, args=args), {field: SimpleUploadedFile("up.json", content)}, follow=True)
    assert response.status_code < 500
    assert shows_a_message(response)


def test_a_workflow_nested_too_deep_is_refused_naming_the_depth_and_the_setting(client, admin_user, world, settings):
    settings.UPLOAD_MAX_BYTES = 1 << 20
    client.force_login(admin_user)
    response = client.post(reverse("instance-workflow-check-file", args=["bad"]),
                           {"file": SimpleUploadedFile("deep.json", DEEP.encode())})
    assert ("deep.json: The workflow nests 100,000 levels deep; at most 64 are taken (UPLOAD_MAX_DEPTH)."
            in response.content.decode())


def test_a_workflow_whose_nodes_is_a_string_says_so(client, admin_user, world):
    client.force_login(admin_user)
    response = client.post(reverse("instance-workflow-check-file", args=["bad"]),
                           {"file": SimpleUploadedFile("w.json", b'{"nodes": "KSampler"}')})
    assert "&#x27;nodes&#x27; is a string; a UI-format workflow has a list of nodes there." in \
        response.content.decode()


def test_an_upload_over_the_limit_is_refused_by_its_size_before_it_is_read(world):
    class Unreadable(SimpleUploadedFile):
        def read(self, *args):
            raise AssertionError("read")

    upload = Unreadable("big.json", b"")
    upload.size = 1 << 40
    with pytest.raises(jsonlimits.JSONInputError, match=r"is 1\.0\xa0TB; at most 64\.0\xa0KB is taken "
                                                        r"\(UPLOAD_MAX_BYTES\)"):
        jsonlimits.read_upload(upload, what="big.json")


def test_a_manager_snapshot_with_a_list_of_ints_is_refused_with_what_belongs_there(client, admin_user, world):
    client.force_login(admin_user)
    response = client.post(reverse("snapshot-import", args=["bad"]),
                           {"file": SimpleUploadedFile("s.json", b'{"git_custom_nodes": [1, 2]}')})
    assert response.status_code == 400
    assert "&#x27;git_custom_nodes&#x27; is a list; it should be an object of git URLs" in response.content.decode()


def test_template_settings_nested_too_deep_are_refused(client, admin_user, world):
    client.force_login(admin_user)
    settings_text = json.dumps({"a": [[[[[[[[[[1]]]]]]]]]]}).replace("[1]", "[" * 80 + "1" + "]" * 80)
    response = client.post(reverse("template-create"), {"name": "deep", "gpu_count": "0", "settings": settings_text})
    assert response.status_code == 200
    assert "The settings nests 90 levels deep; at most 64 are taken (UPLOAD_MAX_DEPTH)." in response.content.decode()


# --- Commands: (command, argv with {bad} where the bad value goes, the values) ---------------------------------------

ID_VALUES = ["", "nope", "bad\n", "bad\x00", "x" * 100_000, "../bad"]
NUMBER_VALUES = ["abc", "-1", "²", "1e400", "9" * 40, ""]
TEXT_VALUES = ["bad\x00value", "x" * 100_000]
COMMAND_ARGS = [
    # Instance ids, wherever a command takes one.
    *[("instances", [action, "{bad}"], ID_VALUES) for action in ("status", "start", "stop", "restart", "build",
                                                                 "delete", "logs", "update-image")],
    ("instances", ["create", "{bad}"], ["", "bad\n", "bad\x00", "x" * 100_000, "Bad", "../x"]),
    ("instances", ["move", "{bad}", "--to", "local"], ID_VALUES),
    ("instances", ["move", "bad", "--to", "{bad}"], ["", "local", "nope", "Bad", "bad\x00", "x" * 100_000]),
    ("instances", ["create", "okay", "--port", "{bad}"], NUMBER_VALUES[:-1]),
    ("instances", ["create", "okay", "--gpus", "{bad}"], NUMBER_VALUES[:-1]),
    ("instances", ["create", "okay", "--node", "{bad}"], ["nope", "Bad", "bad\n", "bad\x00", "x" * 100_000]),
    ("instances", ["create", "okay", "--env", "{bad}"], ["novalue", "1X=y", "A\x00=b", "LD_PRELOAD=/x"]),
    ("instances", ["create", "okay", "--arg={bad}"], ["--listen", "--port=1", "--output-directory=/x"]),
    ("instances", ["create", "okay", "--image", "{bad}"], ["has space", "x" * 100_000, "bad\n"]),
    ("instances", ["create", "okay", "--arguments-env", "{bad}"], ["", "1X", "A B", "HOME", "LD_PRELOAD", "x" * 100]),
    ("instances", ["create", "okay", "--owner", "{bad}"], ["nobody", "bad\x00", "x" * 100_000]),
    ("instances", ["create", "okay", "--idle-stop", "{bad}"], ["abc", "-1", "1.5", "²", "9" * 20]),
    ("instances", ["edit", "{bad}", "--name", "x"], ID_VALUES),
    ("instances", ["edit", "bad", "--owner", "{bad}"], ["", "nobody", "bad\x00", "x" * 100_000]),
    ("instances", ["edit", "bad", "--idle-stop", "{bad}"], ["", "abc", "-1", "1.5", "²", "9" * 20]),
    *[("instances", [action, "{bad}", "--user", "alice"], ID_VALUES) for action in ("share", "unshare")],
    *[("instances", [action, "bad", option, "{bad}"], ["", "nobody", "bad\x00", "x" * 100_000])
      for action in ("share", "unshare") for option in ("--user", "--group")],
    ("instances", ["logs", "bad", "--tail", "{bad}"], ["abc", "1.5", "²"]),
    ("instances", ["start", "bad", "--timeout", "{bad}"], ["abc", "²"]),
    *[("nodes", [action, "{bad}", "name"], ID_VALUES) for action in ("update", "disable", "enable", "remove")],
    ("nodes", ["list", "{bad}"], ID_VALUES),
    ("nodes", ["install", "bad", "{bad}", "--no-wait"], ["", "not a url", "-c", "x" * 100_000, "file:///etc"]),
    ("nodes", ["install", "bad", "https://example.com/o/n", "--ref={bad}", "--no-wait"], ["--upload-pack=x"]),
    *[("nodes", [action, "bad", "{bad}"], ["", "../x", "nope", "a\x00b"]) for action in ("update", "disable", "enable",
                                                                                          "remove")],
    ("nodes", ["install", "{bad}", "https://example.com/o/n", "--no-wait"], ID_VALUES),
    ("nodes", ["update", "bad", "n", "--ref={bad}"], ["--upload-pack=x", "-c"]),
    ("templates", ["create", "{bad}"], ["", "Bad", "bad\n", "x" * 100_000, "tpl"]),
    ("templates", ["create", "t2", "--gpus", "{bad}"], NUMBER_VALUES),
    ("templates", ["create", "t2", "--setting", "{bad}"],
     ["novalue", "k=" + DEEP, "k=NaN", "k={oops", "k=" + "1" * 5000, "=1"]),
    ("templates", ["create", "t2", "--node={bad}"], ["not a url", "-c"]),
    ("templates", ["create", "t2", "--workflow", "{bad}"], ["nope", "lib@abc", "lib@²", "lib@99"]),
    ("templates", ["create", "t2", "--env", "{bad}"], ["novalue", "LD_PRELOAD=x"]),
    ("templates", ["create", "t2", "--arg={bad}"], ["--listen"]),
    ("templates", ["create", "t2", "--image", "{bad}"], ["has space"]),
    ("templates", ["apply", "{bad}", "bad"], ID_VALUES),
    ("templates", ["apply", "tpl", "{bad}"], ID_VALUES),
    ("templates", ["new", "{bad}", "n1"], ID_VALUES),
    ("templates", ["new", "tpl", "{bad}"], ["", "bad\n", "Bad", "bad"]),
    ("templates", ["new", "tpl", "n1", "--port", "{bad}"], NUMBER_VALUES[:-1]),
    ("templates", ["drift", "{bad}"], ID_VALUES),
    ("workflows", ["list", "{bad}"], ID_VALUES),
    ("workflows", ["copy", "{bad}", "bad"], ID_VALUES),
    ("workflows", ["copy", "bad", "{bad}"], ID_VALUES),
    ("workflows", ["copy", "bad", "bad", "--name", "{bad}"], ["../x.json", "/etc/passwd", "x.txt", "a\x00.json"]),
    ("workflows", ["copy", "bad", "bad", "--name", "w.json", "--on-conflict", "{bad}"], ["", "clobber"]),
    ("workflows", ["check", "{bad}", "-"], ID_VALUES),
    ("workflows", ["check", "bad", "{bad}"], ["{file}", "/nonexistent", "/", "nope:w.json", "bad:../x.json"]),
    ("workflows", ["publish", "{bad}", "n"], ID_VALUES),
    ("workflows", ["publish", "bad", "{bad}"], ["", "a/b", "a@b", ".hidden", "x" * 300]),
    ("workflows", ["publish", "bad", "n", "--path", "{bad}"], ["../x.json", "nope.json", "x.txt"]),
    ("workflows", ["install", "{bad}", "bad"], ["nope", "lib@abc", "lib@²", "lib@99", ""]),
    ("workflows", ["install", "lib", "{bad}"], ID_VALUES),
    ("models", ["list", "--status", "{bad}"], ["nope", *TEXT_VALUES]),
    ("models", ["import-hashes", "{bad}"], ["{not-utf-8}", "/nonexistent", "/"]),
    ("models", ["export-hashes", "{bad}"], ["/nonexistent/folder/x", "/"]),
    ("models", ["inbox", "{bad}"], ID_VALUES[1:]),
    ("models", ["promote", "{bad}", "checkpoints/a.safetensors"], ID_VALUES),
    ("models", ["promote", "bad", "{bad}"], ["", "../x", "/etc/passwd"]),
    ("models", ["scan", "--timeout", "{bad}"], ["abc"]),
    ("models", ["verify", "--timeout", "{bad}"], ["abc"]),
    ("models", ["verify", "--node", "{bad}"], ["", "nope", "Bad", "bad\x00", "x" * 100_000]),
    ("models", ["cache", "status", "--node", "{bad}"], ["nope", "Bad", "bad\x00", "x" * 100_000]),
    ("models", ["cache", "{bad}"], ["", "nope", "bad\x00", "x" * 100_000]),
    ("models", ["cache", "warm", "{bad}"], ["", "../x.ckpt", "/etc/passwd", "checkpoints/nope.ckpt", "bad\x00"]),
    ("models", ["cache", "warm", "--node", "{bad}", "checkpoints/a.ckpt"], ["nope", "Bad", "bad\x00", "x" * 100_000]),
    ("models", ["cache", "warm", "--for-instance", "{bad}"], ID_VALUES),
    ("models", ["cache", "warm", "--workflow", "{bad}"], ["{file}", "/nonexistent", "/"]),
    ("snapshots", ["create", "{bad}"], ID_VALUES),
    ("snapshots", ["create", "bad", "--kind", "{bad}"], ["", "everything", *TEXT_VALUES]),
    ("snapshots", ["create", "bad", "--note", "{bad}"], ["x" * 100_000]),
    ("snapshots", ["list", "{bad}"], ID_VALUES[1:]),
    *[("snapshots", [action, "{bad}"], ["", "abc", "-1", "²", "9" * 40, "999"])
      for action in ("restore", "delete")],
    ("snapshots", ["export-manager", "{bad}", "-"], ["", "abc", "²", "9" * 40]),
    ("snapshots", ["export-manager", "{snapshot}", "{bad}"], ["/nonexistent/folder/x.json", "/"]),
    ("snapshots", ["restore", "{snapshot}", "--as", "{bad}"], ["Bad", "bad", "x\n", "x" * 100_000]),
    ("snapshots", ["restore", "{snapshot}", "--as", "n2", "--gpus", "{bad}"], ["abc", "²", "-1", "0,abc"]),
    ("snapshots", ["restore", "{snapshot}", "--gpus", "{bad}"], ["0"]),
    ("snapshots", ["restore", "{snapshot}", "--as", "n2", "--node", "{bad}"], ["nope", "bad\x00", "x" * 100_000]),
    ("snapshots", ["restore", "{snapshot}", "--node", "{bad}"], ["local"]),
    ("snapshots", ["import-manager", "{bad}", "-"], ID_VALUES),
    ("snapshots", ["import-manager", "bad", "{bad}"], ["{file}", "/nonexistent", "/"]),
    ("legacy", ["plan", "--from", "{bad}"], ["", "/nonexistent", "bad\x00"]),
    ("legacy", ["plan", "--from", "/nonexistent", "--instance-id", "{bad}"], ["Bad", "bad\n"]),
    ("legacy", ["migrate", "--from", "{bad}"], ["", "/nonexistent"]),
    ("legacy", ["migrate", "--from", "/nonexistent", "--instance-id", "{bad}"], ["Bad"]),
    *[("images", [action, "--node", "{bad}"], ["", "nope", "bad\x00", "x" * 100_000]) for action in ("build", "list")],
    ("images", ["pull", "img:1", "--node", "{bad}"], ["nope", "bad\x00"]),
    ("images", ["pull", "{bad}"], ["", "has space", "bad\x00", "x" * 100_000, "registry.example.org/other:1"]),
    ("images", ["build", "--tag", "{bad}"], ["", "has space", "x" * 100_000, "img@sha256:" + "0" * 64,
                                              "registry.example.org/other:1"]),
    ("images", ["build", "--comfyui-ref={bad}"], ["", "--upload-pack=x", "a b", "x" * 300]),
    *[("images", ["build", option, "{bad}"], ["", "/nonexistent", "bad\x00", "/etc/hostname"])
      for option in ("--comfyui-source", "--wheels")],
    ("images", ["build", "--ca-bundle", "{bad}"], ["", "/nonexistent", "bad\x00", "/"]),
    ("images", ["build", "--torch-index-url", "{bad}"], ["", "pypi.org/simple", "ftp://x", "a b"]),
    ("images", ["build", "--base-image", "{bad}"], ["", "has space", "x" * 100_000]),
    ("images", ["build", "--build-arg", "{bad}"], ["novalue", "=1", "OTHER=1", "PIP_INDEX_URL=a\nb"]),
    *[("hosts", [action, "{bad}"], ID_VALUES) for action in ("show", "approve")],
    ("hosts", ["revoke-approval", "{bad}", "--yes"], ID_VALUES),
    ("agent", ["--node", "{bad}"], ["", "local", "Bad", "bad\n", "bad\x00", "x" * 100_000, "../x", "-x"]),
    *[("clusters", [action, "{bad}"], ID_VALUES) for action in ("show", "start", "stop", "sync", "probe")],
    ("clusters", ["delete", "{bad}", "--yes"], ID_VALUES),
    ("clusters", ["create", "{bad}", "--master", "bad"], ["", "Bad", "bad\n", "x" * 100_000, "../x", "bad\x00", "new"]),
    ("clusters", ["create", "c2", "--template", "{bad}", "--gpus", "local:0"], ["", "nope", "bad\x00", "x" * 100_000]),
    ("clusters", ["create", "c2", "--gpus", "{bad}"], ["abc", "local:abc", "nope:0", "local:", "²", "local:-1",
                                                       "bad\x00:0", "x" * 100_000]),
    ("clusters", ["create", "c2", "--master", "{bad}"], ID_VALUES),
    ("clusters", ["create", "c2", "--master", "bad", "--worker", "{bad}"], [*ID_VALUES, "bad"]),
    ("clusters", ["create", "c2", "--master", "bad", "--cors-origin", "{bad}"],
     ["https://x.example/a", "ftp://x", "a b", "bad\x00", "x" * 100_000]),
    ("clusters", ["create", "c2", "--master", "bad", "--description", "{bad}"], ["x" * 100_000]),
    *[("clusters", [action, "{bad}", "bad"], ID_VALUES) for action in ("add-worker", "remove-worker")],
    ("clusters", ["add-worker", "{cluster}", "{bad}"], [*ID_VALUES, "clu-master", "clu-w1"]),
    ("clusters", ["remove-worker", "{cluster}", "{bad}"], [*ID_VALUES, "clu-master", "bad"]),
    ("serve", ["--workers", "{bad}"], ["abc", "²"]),
    ("serve", ["--web-workers", "{bad}"], ["abc"]),
]
# Arguments that take any text (the service stores it as typed, a filter matches nothing), `serve --bind` (the
# server refuses it itself), and `legacy --mode`, a choice argparse checks (legacy.py is not built on cli.Command, so
# through call_command its refusal is exit code 1; on the command line argparse exits 2).
FREE_TEXT_ARGS = {("models", "list", "folder"), ("legacy", "plan", "mode"), ("legacy", "migrate", "mode"),
                  ("instances", "create", "name"), ("instances", "create", "description"),
                  ("instances", "edit", "name"), ("instances", "edit", "description"),
                  ("templates", "create", "description"), ("templates", "new", "name"), ("serve", "", "bind")}


def files_to_feed(tmp_path) -> list:
    """Every bad file, each workflow and Manager snapshot of the wrong shape, written to disk."""
    paths = []
    contents = {**BAD_FILES, **{k: json.dumps(v).encode() for k, v in {**BAD_WORKFLOWS,
                                                                      **BAD_MANAGER_SNAPSHOTS}.items()}}
    for number, content in enumerate(contents.values()):
        path = tmp_path / f"bad-{number}.json"
        path.write_bytes(content)
        paths.append(str(path))
    return paths


def command_cases() -> list:
    return list(_command_cases())


def _command_cases():
    for command, argv, values in COMMAND_ARGS:
        for number, value in enumerate(values):
            shown = "-".join(a for a in argv if "{bad}" not in a)[:40]
            yield pytest.param(command, argv, value, id=f"{command}-{shown}-{number}")


@pytest.mark.postgres  # a NUL byte in a lookup is a DataError on PostgreSQL, "not found" on SQLite
@pytest.mark.parametrize("command, argv, value", command_cases())
def test_a_bad_argument_exits_2_with_a_message_never_a_traceback(world, tmp_path, settings, command, argv, value):
    values = files_to_feed(tmp_path) if value == "{file}" else [value]
    if value == "{not-utf-8}":
        (tmp_path / "binary").write_bytes(BAD_FILES["not UTF-8"])
        values = [str(tmp_path / "binary")]
    for bad in values:
        cluster = (Cluster.objects.filter(name="clu").first() or a_cluster()) if "{cluster}" in argv else None
        args = [str(world["snapshot"].pk) if a == "{snapshot}" else cluster.name if a == "{cluster}" else
                a.replace("{bad}", bad) for a in argv]
        out, err = StringIO(), StringIO()
        with pytest.raises(CommandError) as raised:
            call_command(command, *args, stdout=out, stderr=err)
        assert raised.value.returncode == 2, (args, str(raised.value))
        assert str(raised.value).strip(), args


def test_every_form_page_and_argument_is_in_a_table():
    # Forms: every field of every form in the apps is spoiled by some page case.
    spoiled = {field for *_, fields in PAGE_FIELDS for field in fields} | {field for _, _, field, _ in UPLOAD_FIELDS}
    for module in (instances.forms, instances.forms_clusters, storage_app.forms, comfyhub.forms):
        for name, form in inspect.getmembers(module, inspect.isclass):
            if issubclass(form, forms.BaseForm) and form.__module__ == module.__name__:
                missing = set(form.base_fields) - spoiled
                assert not missing, f"{module.__name__}.{name}: fields {missing} are in no table"
    # Pages: every URL name is tried with bad input, or takes none.
    tried = {name for name, *_ in PAGE_FIELDS} | {name for name, *_ in UPLOAD_FIELDS}
    names = set()

    def collect(patterns):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                if pattern.app_name != "admin":
                    collect(pattern.url_patterns)
            elif isinstance(pattern, URLPattern) and pattern.name:
                names.add(pattern.name)
    collect(get_resolver().url_patterns)
    untested = names - tried - NO_FORM_INPUT - HEADER_INPUT
    assert not untested, f"pages with input in no table: {untested}"
    # Commands: every argument that takes a value.
    covered = {(command, argv[0] if command not in ("serve", "agent") else "", _dest(command, argv))
               for command, argv, _ in COMMAND_ARGS}
    uncovered = []
    for app, command in (("instances", "instances"), ("instances", "nodes"), ("instances", "templates"),
                         ("instances", "workflows"), ("instances", "images"), ("storage_app", "models"),
                         ("storage_app", "snapshots"),
                         ("storage_app", "storage"), ("storage_app", "legacy"), ("comfyhub", "serve"),
                         ("instances", "hosts"), ("instances", "agent"), ("instances", "clusters")):
        for action, dest in _arguments(load_command_class(app, command).create_parser("manage.py", command)):
            if dest in ("timeout",):
                continue  # one float parsed by argparse for all; tried above on a few
            if (command, action, dest) not in covered | FREE_TEXT_ARGS:
                uncovered.append(f"{command} {action} {dest}")
    assert not uncovered, f"command arguments in no table: {', '.join(uncovered)}"


BASE_DESTS = {"help", "version", "verbosity", "settings", "pythonpath", "traceback", "no_color", "force_color",
              "skip_checks"}


def _arguments(parser, action=""):
    for argument in parser._actions:
        if isinstance(argument, argparse._SubParsersAction):
            for name, sub in argument.choices.items():
                yield from _arguments(sub, name)
        elif argument.dest not in BASE_DESTS and argument.nargs != 0:
            yield action, argument.dest


def _dest(command, argv) -> str:
    """Which argument `{bad}` stands in for in argv: the option before it (or joined to it with '='), else the
    positional argument that takes a value put in its place."""
    app = {"instances": "instances", "nodes": "instances", "templates": "instances", "workflows": "instances",
           "images": "instances", "models": "storage_app", "snapshots": "storage_app", "storage": "storage_app", "legacy": "storage_app",
           "serve": "comfyhub", "hosts": "instances", "agent": "instances", "clusters": "instances"}[command]
    parser = load_command_class(app, command).create_parser("manage.py", command)
    at = next(i for i, a in enumerate(argv) if "{bad}" in a)
    option = argv[at].split("=", 1)[0] if argv[at].startswith("--") else argv[at - 1] if at else ""
    if option.startswith("--"):
        parsers = [parser] + [sub for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                              for sub in a.choices.values()]
        for candidate in parsers:
            if option in candidate._option_string_actions:
                return candidate._option_string_actions[option].dest
    marker = "7"  # a value every positional argument takes
    options = vars(parser.parse_args(["1" if a == "{snapshot}" else a.replace("{bad}", marker) for a in argv]))
    for dest, value in options.items():
        if value == marker or (isinstance(value, list) and marker in value):
            return dest
    raise AssertionError(f"{command} {argv}: no argument holds the bad value")


def test_on_the_command_line_a_bad_file_exits_2_with_the_message_and_no_traceback(tmp_path, transactional_db,
                                                                                     settings):
    services.instance_create(instance_id="bad")
    layout.build_instance_tree("bad")
    deep, ints = tmp_path / "deep.json", tmp_path / "ints.json"
    deep.write_text(DEEP)
    ints.write_text('{"git_custom_nodes": [1, 2]}')
    env = {**os.environ, "DATABASE_URL": worker_database_url(), "UPLOAD_MAX_DEPTH": "64"}
    for argv, message in [
        (["workflows", "check", "bad", str(deep)],
         "nests 100,000 levels deep; at most 64 are taken (UPLOAD_MAX_DEPTH)"),
        (["snapshots", "import-manager", "bad", str(ints)], "'git_custom_nodes' is a list; it should be an object"),
        (["templates", "create", "t", "--gpus", "²"], "gpu_count: '²' is not a number of GPUs"),
        (["instances", "logs", "bad", "--tail", "abc"], "invalid int value: 'abc'"),
    ]:
        done = subprocess.run([sys.executable, str(REPO / "manage.py"), *argv], cwd=REPO, capture_output=True,
                              text=True, env=env, timeout=120)
        assert done.returncode == 2, (argv, done.stderr)
        assert message in done.stderr and "Traceback" not in done.stderr, (argv, done.stderr)
