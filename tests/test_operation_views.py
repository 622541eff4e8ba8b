"""The operations list, one operation's page with its live fragment, and the actions on them."""
import pytest
from django.urls import reverse

from comfyhub import operations
from comfyhub.jobs import diagnostics
from comfyhub.models import Operation
from tests import jobs_for_tests

pytestmark = pytest.mark.django_db(transaction=True)


def make_operations(count, **fields):
    return Operation.objects.bulk_create(Operation(kind="noop", **fields) for _ in range(count))


def test_the_list_shows_the_newest_first_and_paginates(client, stranger):
    make_operations(30)
    newest = Operation.objects.create(kind="diagnostics", target_label="the newest one")
    client.force_login(stranger)
    response = client.get("/operations/")
    assert response.status_code == 200
    page = response.context["page"]
    assert page.paginator.count == 31 and page.paginator.num_pages == 2
    assert list(page.object_list)[0] == newest
    assert b"Page 1 of 2" in response.content
    assert client.get("/operations/?page=2").context["page"].number == 2


def test_the_list_filters_by_status_and_kind(client, stranger):
    make_operations(3, status=Operation.Status.FAILED)
    make_operations(2, status=Operation.Status.SUCCEEDED)
    Operation.objects.create(kind="diagnostics", status=Operation.Status.FAILED)
    client.force_login(stranger)
    by_status = client.get("/operations/?status=failed").context["page"]
    assert by_status.paginator.count == 4
    both = client.get("/operations/?status=failed&kind=diagnostics").context["page"]
    assert [op.kind for op in both.object_list] == ["diagnostics"]


def test_a_bad_filter_value_is_ignored_not_an_error(client, stranger):
    make_operations(2)
    client.force_login(stranger)
    response = client.get("/operations/?status=exploded&page=abc")
    assert response.status_code == 200
    assert response.context["page"].paginator.count == 2


def test_the_live_fragment_keeps_polling_while_running_and_stops_when_done(client, stranger, run_worker):
    operation = operations.enqueue(jobs_for_tests.steps, count=2)
    client.force_login(stranger)
    live = reverse("operation-live", args=[operation.pk])
    response = client.get(live)
    assert response.status_code == 200
    assert b'hx-trigger="every 1s"' in response.content

    run_worker()

    response = client.get(live)
    assert response.status_code == 286  # htmx: stop polling
    assert b'hx-trigger' not in response.content
    assert b"Succeeded" in response.content and b"step 2 of 2" in response.content


def test_an_operator_runs_diagnostics_from_the_dashboard_and_lands_on_its_page(client, operator):
    client.force_login(operator)
    response = client.post(reverse("diagnostics-run"))
    operation = Operation.objects.get()
    assert response.status_code == 302 and response["Location"] == operation.get_absolute_url()
    assert operation.kind == "diagnostics" and operation.requested_by == operator


def test_an_operator_cancels_a_queued_operation(client, operator):
    operation = operations.enqueue(jobs_for_tests.steps)
    client.force_login(operator)
    response = client.post(reverse("operation-cancel", args=[operation.pk]), follow=True)
    assert b"The operation was cancelled." in response.content
    operation.refresh_from_db()
    assert operation.status == Operation.Status.CANCELLED


def test_cancelling_a_finished_operation_says_why_not(client, operator, run_worker):
    operation = operations.enqueue(diagnostics)
    run_worker()
    client.force_login(operator)
    response = client.post(reverse("operation-cancel", args=[operation.pk]), follow=True)
    assert b"only queued or running ones can be cancelled" in response.content


def test_cancel_only_accepts_post(client, operator):
    operation = Operation.objects.create(kind="noop")
    client.force_login(operator)
    assert client.get(reverse("operation-cancel", args=[operation.pk])).status_code == 405


def test_a_fresh_web_process_knows_every_operation_kind_to_filter_by():
    """Kinds are declared where the jobs are; a process that never imported a jobs module must still list them."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, worker_database_url

    done = subprocess.run(
        [sys.executable, "-c", "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', "
         "'comfyhub.settings'); django.setup(); from comfyhub.forms import OperationFilterForm; "
         "print(' '.join(k for k, _ in OperationFilterForm().fields['kind'].choices if k))"],
        cwd=REPO, env={**os.environ, "DATABASE_URL": worker_database_url()}, capture_output=True, text=True,
        timeout=60)
    assert done.returncode == 0, done.stderr
    kinds = set(done.stdout.split())
    assert {"diagnostics", "instance_start", "models_verify", "snapshot_restore", "workflows_copy"} <= kinds
