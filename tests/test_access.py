"""Every page needs a login; acting needs a permission; the admin and the RQ dashboard are for staff."""
import pytest
from django.urls import reverse

from comfyhub.models import Operation

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("url", ["/", "/operations/", "/admin/django_rq/dashboard/"])
def test_it_sends_a_stranger_who_is_not_logged_in_to_the_login_page(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/login/") or response["Location"].startswith("/admin/login/")


def test_it_shows_the_login_page_styled_like_the_rest(client):
    response = client.get("/login/")
    assert response.status_code == 200
    assert b"/static/comfyhub/comfyhub." in response.content
    assert b"Log in to ComfyHub" in response.content


def test_it_logs_in_and_out(client, stranger):
    response = client.post("/login/", {"username": "sam", "password": "sam-password-1"})
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    assert client.get("/").status_code == 200
    client.post("/logout/")
    assert client.get("/").status_code == 302


def test_a_viewer_may_look_at_an_operation_but_not_cancel_it(client, stranger):
    operation = Operation.objects.create(kind="noop")
    client.force_login(stranger)
    assert client.get(operation.get_absolute_url()).status_code == 200
    assert client.post(reverse("operation-cancel", args=[operation.pk])).status_code == 403
    assert client.post(reverse("diagnostics-run")).status_code == 403
    operation.refresh_from_db()
    assert operation.status == Operation.Status.QUEUED


def test_the_cancel_button_is_shown_only_to_those_who_may_cancel(client, stranger, operator):
    operation = Operation.objects.create(kind="noop")
    client.force_login(stranger)
    assert b"Cancel" not in client.get(operation.get_absolute_url()).content
    client.force_login(operator)
    assert b"Cancel" in client.get(operation.get_absolute_url()).content


def test_the_rq_dashboard_is_for_staff_only(client, operator, admin_user):
    client.force_login(operator)
    assert client.get("/admin/django_rq/dashboard/").status_code == 302
    client.force_login(admin_user)
    response = client.get("/admin/django_rq/dashboard/")
    assert response.status_code == 200
    assert b"default" in response.content


def test_the_admin_shows_operations_read_only(client, admin_user):
    operation = Operation.objects.create(kind="noop", error="boom")
    client.force_login(admin_user)
    response = client.get(reverse("admin:comfyhub_operation_change", args=[operation.pk]))
    assert response.status_code == 200
    assert b"boom" in response.content
    assert b'name="_save"' not in response.content
    assert client.get(reverse("admin:comfyhub_operation_add")).status_code == 403


def test_operators_hold_the_operational_permissions(operator, stranger):
    assert operator.has_perm("comfyhub.cancel_operation")
    assert operator.has_perm("comfyhub.run_diagnostics")
    assert not stranger.has_perm("comfyhub.cancel_operation")
