"""Model library services, shared by the models page, the admin, the `models` command and the jobs."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

from django.core.exceptions import ValidationError

from comfyhub import operations

from . import jobs, layout, library
from .models import ModelAsset


def models_scan(*, user=None):
    return operations.enqueue(jobs.scan_models, user=user)


def models_verify(*, full: bool = False, user=None):
    return operations.enqueue(jobs.verify_models, user=user, full=full)


def models_promote(*, instance, path: str, user=None):
    if not path or ".." in path.split("/") or path.startswith("/"):
        raise ValidationError({"path": [f"'{path}' is not a path inside the instance's models/ folder."]})
    return operations.enqueue(jobs.promote_model, target=instance, user=user, instance_pk=instance.pk, path=path)


def validate_sha256(value: str) -> str:
    digest = (value or "").strip().lower()
    if digest and not library.SHA256_RE.match(digest):
        raise ValidationError({"expected_sha256": ["A SHA-256 is 64 hexadecimal digits (0-9, a-f)."]})
    return digest


def asset_set_expected(*, asset: ModelAsset, sha256: str) -> ModelAsset:
    """Type in the expected SHA-256 of one file; the next verify compares against it."""
    digest = validate_sha256(sha256)
    asset.expected_sha256 = digest
    asset.expected_source = ModelAsset.ExpectedSource.TYPED if digest else ModelAsset.ExpectedSource.NONE
    if asset.sha256 and digest:
        if asset.sha256 == digest:
            asset.status, asset.status_reason = ModelAsset.Status.VERIFIED, ""
        else:
            asset.status = ModelAsset.Status.MISMATCH
            asset.status_reason = "differs from the expected hash (typed in)"
    asset.save()
    return asset


def models_import_hashes(*, text: str) -> dict:
    result = library.import_hashes(text)
    if result["bad"] and not result["matched"] and not result["unknown"]:
        raise ValidationError({"file": ["No line is in sha256sum format ('<64 hex digits>  <path>'): "
                                        + "; ".join(result["bad"][:5])]})
    return result


def models_export_hashes() -> str:
    return library.export_hashes()


def library_visibility(instance, timeout: float = 5.0) -> dict:
    """Ask a running instance which model files it sees per folder and compare with the library and its inbox.

    Returns {"reachable", "folders": {folder: {"missing": [...], "extra": [...]}}, "unseen_verified": [...]}."""
    from instances.health import probe_host

    base = f"http://{probe_host(instance)}:{instance.host_port}"
    library_names: dict[str, set[str]] = {}
    verified: dict[str, set[str]] = {}
    for asset in ModelAsset.objects.exclude(status=ModelAsset.Status.MISSING).only("path", "folder", "status"):
        name = asset.path.split("/", 1)[1] if "/" in asset.path else asset.path
        library_names.setdefault(asset.folder, set()).add(name)
        if asset.status == ModelAsset.Status.VERIFIED:
            verified.setdefault(asset.folder, set()).add(name)
    inbox_names: dict[str, set[str]] = {}
    for item in library.inbox(instance):
        if not item["problem"] and "/" in item["path"]:
            inbox_names.setdefault(item["folder"], set()).add(item["path"].split("/", 1)[1])
    report = {"reachable": True, "folders": {}, "unseen_verified": []}
    for folder in layout.MODEL_FOLDERS:
        try:
            with urllib.request.urlopen(f"{base}/models/{folder}", timeout=timeout) as response:
                seen = set(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                continue  # this ComfyUI version has no such folder
            return {"reachable": False, "error": f"{base}/models/{folder} answered {exc.code}"}
        except (OSError, ValueError) as exc:
            return {"reachable": False, "error": f"{base} does not answer: {exc}"}
        expected = library_names.get(folder, set())
        missing = sorted(expected - seen)
        extra = sorted(seen - expected - inbox_names.get(folder, set()))
        if missing or extra:
            report["folders"][folder] = {"missing": missing, "extra": extra}
        report["unseen_verified"] += [f"{folder}/{n}" for n in sorted(verified.get(folder, set()) - seen)]
    return report
