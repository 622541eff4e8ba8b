"""Model library jobs: thin wrappers around storage_app.library."""
from comfyhub.operations import OperationError, operation_job

from . import library


@operation_job("models_scan", label="Scan model library", queue="long")
def scan_models(report):
    result = library.scan(report)
    report.progress(100, f"{result.new} new, {result.changed} changed, {result.missing} missing")
    return {"new": result.new, "changed": result.changed, "missing": result.missing, "unchanged": result.unchanged,
            "problems": [{"path": p, "reason": r} for p, r in result.problems]}


@operation_job("models_verify", label="Verify model checksums", queue="long", timeout=48 * 3600)
def verify_models(report, *, full=False):
    report.log("Scanning the library first.")
    library.scan(report)
    result = library.verify(report, full=full)
    summary = {"hashed": result.hashed, "skipped": result.skipped, "bytes": result.bytes,
               "mismatches": result.mismatches, "problems": [{"path": p, "reason": r} for p, r in result.problems]}
    if result.hashed:
        report.log("Checking what running instances see of the library.")
        summary["sharing"] = check_sharing.body(report)
    if result.mismatches:
        raise OperationError(f"{len(result.mismatches)} file(s) do not match their expected or previous hash: "
                             + ", ".join(result.mismatches[:10]) + ". See the models page for the evidence.")
    return summary


@operation_job("models_promote", label="Promote inbox file", queue="long")
def promote_model(report, *, instance_pk, path):
    from instances.models import Instance

    instance = Instance.objects.select_related("node").filter(pk=instance_pk).first()
    if instance is None:
        raise OperationError("The instance no longer exists.")
    try:
        return library.promote(instance, path, report)
    except library.PromoteError as exc:
        raise OperationError(str(exc)) from exc


@operation_job("models_sharing", label="Check model sharing", queue="long")
def check_sharing(report):
    """Ask every running instance what it sees of the library; record it on the instance."""
    from django.utils import timezone

    from instances.models import Instance

    from .services import library_visibility

    running = list(Instance.objects.select_related("node").filter(desired_state=Instance.DesiredState.RUNNING))
    summary = {}
    for number, instance in enumerate(running, 1):
        visibility = library_visibility(instance)
        visibility["checked_at"] = timezone.now().isoformat()
        Instance.objects.filter(pk=instance.pk).update(library_check=visibility)
        if not visibility["reachable"]:
            report.log(f"{instance}: not reachable ({visibility['error']})", "WARNING")
        elif visibility["unseen_verified"]:
            report.log(f"{instance}: cannot see {len(visibility['unseen_verified'])} verified file(s): "
                       + ", ".join(visibility["unseen_verified"][:5]), "ERROR")
        else:
            report.log(f"{instance}: sees the whole library")
        summary[instance.instance_id] = {"reachable": visibility["reachable"],
                                         "unseen_verified": visibility.get("unseen_verified", [])}
        report.progress(100 * number / len(running), instance.instance_id)
    return summary


def scheduled_full_verify():
    """Periodic (rq cron): a full re-verification, recorded as an operation like any other."""
    from comfyhub import operations

    return str(operations.enqueue(verify_models, full=True).pk)
