"""The database production runs on: migrations build the schema from nothing, the models have no change without its
migration, `manage.py serve` (what `make run` runs) starts on an empty PostgreSQL database, and conditional updates
racing from several processes each take effect once. `make test` runs this file on SQLite and on PostgreSQL."""
import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
from django.core.exceptions import ValidationError
from django.db import connection

from comfyhub import operations
from comfyhub.models import Operation
from instances import services
from instances.models import GPU, GPUAssignment, Instance
from tests import jobs_for_tests, testenv
from tests.conftest import REPO, wait_for

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


@contextlib.contextmanager
def empty_database(tmp_path):
    """DATABASE_URL of a database with nothing in it, on the server the tests use; dropped afterwards."""
    if not testenv.ON_POSTGRES:
        yield testenv.database_url(tmp_path / "empty.sqlite3")
        return
    name = f"comfyhub_empty_{uuid.uuid4().hex[:12]}"
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield testenv.database_url(name)
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def manage(*argv, database_url, timeout=180):
    return subprocess.run([sys.executable, str(REPO / "manage.py"), *argv], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DATABASE_URL": database_url}, timeout=timeout)


def test_migrations_build_the_schema_on_an_empty_database_and_every_model_change_has_one(tmp_path):
    with empty_database(tmp_path) as url:
        migrated = manage("migrate", "--noinput", database_url=url)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        assert "Applying instances.0001_initial... OK" in migrated.stdout
        nothing_left = manage("migrate", "--check", database_url=url)
        assert nothing_left.returncode == 0, nothing_left.stdout + nothing_left.stderr
        unmade = manage("makemigrations", "--check", "--dry-run", database_url=url)
        assert unmade.returncode == 0, "a model change has no migration:\n" + unmade.stdout + unmade.stderr


@pytest.mark.postgres_only  # on SQLite, tests/test_serve.py is this test
def test_serve_starts_on_an_empty_postgresql_database_and_a_person_logs_in(tmp_path):
    from tests.test_serve import Serve, free_port, log_in

    with empty_database(tmp_path) as url:
        port = free_port()
        serve = Serve(tmp_path / "var", port, {"DATABASE_URL": url, "DJANGO_SUPERUSER_PASSWORD": "a-long-password-42"})
        try:
            serve.wait_until_running()
            _, response = log_in(port, "admin", "a-long-password-42")
            assert "Dashboard" in response.text
        finally:
            serve.interrupt()
        assert serve.process.returncode == 0, serve.text()


def test_a_cancel_racing_the_workers_and_another_cancel_takes_effect_once(worker_process, admin_user, operator):
    """Two worker processes claim operations while two people cancel every second one, in the same order, each on a
    connection of their own: on PostgreSQL these conditional updates really run at once. Every operation ends one
    way: cancelled by exactly one person (and, if no worker had claimed it, never run) or run to the end and
    cancelled by nobody."""
    worker_process()
    worker_process()
    batch = [operations.enqueue(jobs_for_tests.steps, count=2, pause=0.1) for _ in range(24)]
    won = {admin_user.username: set(), operator.username: set()}
    barrier = threading.Barrier(2)

    def cancel_all(user):
        barrier.wait()
        try:
            for operation in batch[::2]:
                time.sleep(0.1)  # the workers' pace: some are cancelled queued, some running, some too late
                try:
                    operations.operation_cancel(operation=Operation.objects.get(pk=operation.pk), user=user)
                except operations.OperationError:
                    continue
                won[user.username].add(operation.pk)
        finally:
            connection.close()

    people = [threading.Thread(target=cancel_all, args=(user,)) for user in (admin_user, operator)]
    for person in people:
        person.start()
    for person in people:
        person.join()
    wait_for(lambda: all(o.is_terminal for o in Operation.objects.filter(pk__in=[o.pk for o in batch])), timeout=60,
             message="every operation to end")

    alice, oscar = won.values()
    assert not alice & oscar, "two people cancelled the same operation"
    for operation in Operation.objects.filter(pk__in=[o.pk for o in batch]):
        winner = next((name for name, pks in won.items() if operation.pk in pks), None)
        if operation.status == Operation.Status.CANCELLED:
            assert winner and operation.error == f"Cancelled by {winner}.", (operation.error, winner)
            if operation.started_at is None:
                assert "step 1 of 2" not in operation.log, "a cancelled operation ran"
        else:
            assert operation.status == Operation.Status.SUCCEEDED, (operation.status, operation.error)
            assert winner is None and operation.error == "" and "step 1 of 2" in operation.log
    assert alice | oscar, "no cancel found a queued or running operation; the race did not happen"


def test_two_creates_racing_for_one_exclusive_gpu_get_one_winner_and_a_message():
    """Both pass the checks before either commits: the database's partial unique index decides, and the loser is
    told which field to change, not shown an IntegrityError."""
    results, barrier = {}, threading.Barrier(4)

    def create(name):
        barrier.wait()
        try:
            results[name] = services.instance_create(instance_id=name, gpu_indexes=[1]).instance_id
        except ValidationError as exc:
            results[name] = exc.message_dict
        finally:
            connection.close()

    racers = [threading.Thread(target=create, args=(f"racer-{n}",)) for n in range(4)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()
    winners = [name for name, result in results.items() if result == name]
    assert len(winners) == 1, results
    for name, result in results.items():
        if name not in winners:
            assert list(result) == ["gpus"], result
    assert [a.instance.instance_id for a in GPUAssignment.objects.filter(gpu__index=1)] == winners


def test_making_a_gpu_exclusive_while_an_instance_joins_it_leaves_one_rule_standing():
    """A person makes shared GPU 2 exclusive while another adds an instance to it, round after round: whichever
    commits first, the other sees it (the GPU's row is locked by both), so an exclusive GPU never ends up with two
    holders and every holder's flag follows the GPU."""
    for round_number in range(8):
        gpu = GPU.objects.get(index=2)
        services.gpu_set_shareable(gpu=gpu, shareable=True)
        services.instance_create(instance_id=f"holder-{round_number}", gpu_indexes=[2])
        barrier = threading.Barrier(2)

        def make_exclusive():
            barrier.wait()
            try:
                services.gpu_set_shareable(gpu=gpu, shareable=False)
            except ValidationError:
                pass
            finally:
                connection.close()

        def join():
            barrier.wait()
            try:
                services.instance_create(instance_id=f"joiner-{round_number}", gpu_indexes=[2])
            except ValidationError:
                pass
            finally:
                connection.close()

        people = [threading.Thread(target=make_exclusive), threading.Thread(target=join)]
        for person in people:
            person.start()
        for person in people:
            person.join()
        gpu.refresh_from_db()
        holders = list(GPUAssignment.objects.filter(gpu=gpu))
        assert gpu.shareable or len(holders) == 1, (round_number, [(a.instance_id, a.exclusive) for a in holders])
        assert all(a.exclusive == (not gpu.shareable) for a in holders), round_number
        Instance.objects.filter(instance_id__in=[f"holder-{round_number}", f"joiner-{round_number}"]).delete()


def test_the_test_database_is_the_one_asked_for():
    """`make test`'s second part must really run on PostgreSQL, not fall back to SQLite unnoticed."""
    vendor = "postgresql" if testenv.ON_POSTGRES else "sqlite"
    assert connection.vendor == vendor
    assert str(connection.settings_dict["NAME"]) == testenv.TEST_DATABASE_NAME
