"""Files added to or removed from shared/input while instances run: the periodic refresh job (run as a job, on a real
worker) brings each instance's input/ links up to date, never touching the instance's own files."""
import os
import shutil

import pytest
from django.apps import apps

from comfyhub import queues
from instances import services as instance_services
from storage_app import jobs, layout, services

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def instance(storage):
    created = instance_services.instance_create(instance_id="studio")
    layout.build_shared_tree()
    layout.build_instance_tree("studio")
    return created


def refresh(run_worker):
    """The periodic job as comfyhub.cron registers it (the storage app's periodic_jobs, every minute), enqueued on its
    queue and run by a real worker; its return value."""
    periodic = [entry for entry in apps.get_app_config("storage_app").periodic_jobs()
                if entry["func"] is jobs.refresh_shared_input]
    assert len(periodic) == 1 and periodic[0]["interval"] <= 60
    job = queues.get_queue(periodic[0]["queue_name"]).enqueue(periodic[0]["func"],
                                                              job_timeout=periodic[0]["job_timeout"])
    run_worker()
    job.refresh()
    assert job.is_finished, job.latest_result().exc_string
    return job.return_value()


def test_a_file_added_to_the_shared_input_is_linked_and_a_removed_one_unlinked(instance, storage, run_worker):
    shared_input, own_input = storage["shared"] / "input", storage["instances"] / "studio" / "input"
    (shared_input / "added.png").write_bytes(b"a")
    assert not os.path.lexists(own_input / "added.png")
    assert refresh(run_worker)["local"]["linked"] == {"studio": ["added.png"]}
    assert os.readlink(own_input / "added.png") == "/shared/input/added.png"
    (shared_input / "added.png").unlink()
    assert refresh(run_worker)["local"]["unlinked"] == {"studio": ["added.png"]}
    assert not os.path.lexists(own_input / "added.png")


def test_an_unchanged_shared_input_visits_no_instance(instance, storage, run_worker):
    shared_input, own_input = storage["shared"] / "input", storage["instances"] / "studio" / "input"
    (shared_input / "once.png").write_bytes(b"o")
    assert refresh(run_worker)["local"]["linked"] == {"studio": ["once.png"]}
    os.unlink(own_input / "once.png")
    (shared_input / "once.png").write_bytes(b"rewritten")  # same names: nothing for the links to follow
    assert refresh(run_worker) == {}
    assert not os.path.lexists(own_input / "once.png")
    (shared_input / "other.png").write_bytes(b"x")  # a change: every instance is brought up to date
    assert sorted(refresh(run_worker)["local"]["linked"]["studio"]) == ["once.png", "other.png"]


def test_the_instances_own_file_of_the_same_name_wins(instance, storage, run_worker):
    shared_input, own_input = storage["shared"] / "input", storage["instances"] / "studio" / "input"
    (own_input / "mine.png").write_bytes(b"uploaded")
    os.symlink("elsewhere.png", own_input / "relative.png")  # the instance's own link, not ComfyHub's
    (shared_input / "mine.png").write_bytes(b"shared")
    (shared_input / "relative.png").write_bytes(b"shared")
    assert refresh(run_worker)["local"]["linked"] == {}
    assert (own_input / "mine.png").read_bytes() == b"uploaded" and not os.path.islink(own_input / "mine.png")
    (shared_input / "mine.png").unlink()
    (shared_input / "relative.png").unlink()
    refresh(run_worker)
    assert (own_input / "mine.png").read_bytes() == b"uploaded"
    assert os.readlink(own_input / "relative.png") == "elsewhere.png"


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_a_planted_input_link_is_refused_named_and_nothing_outside_is_written(instance, storage, run_worker,
                                                                             canary, settings, how):
    if os.geteuid() == 0:
        settings.PUID, settings.PGID = 1234, 2345  # a chown through the link would show on the canary
    instance_services.instance_create(instance_id="neighbour")
    layout.build_instance_tree("neighbour")
    own_input = storage["instances"] / "studio" / "input"
    shutil.rmtree(own_input)
    os.symlink(canary if how == "absolute" else os.path.relpath(canary, own_input.parent), own_input)
    (storage["shared"] / "input" / "secret.txt").write_bytes(b"named like a canary file")
    (storage["shared"] / "input" / "new.png").write_bytes(b"n")
    result = refresh(run_worker)["local"]
    assert "input is a link" in result["refused"]["studio"]
    assert list(result["linked"]) == ["neighbour"]  # the others go on
    assert sorted(result["linked"]["neighbour"]) == ["new.png", "secret.txt"]


def test_models_scan_refreshes_the_links_even_when_the_listing_was_seen(instance, storage, run_worker):
    shared_input, own_input = storage["shared"] / "input", storage["instances"] / "studio" / "input"
    (shared_input / "scanned.png").write_bytes(b"s")
    refresh(run_worker)
    os.unlink(own_input / "scanned.png")  # the listing is unchanged: the periodic job alone would not look
    operation = services.models_scan()
    run_worker()
    operation.refresh_from_db()
    assert operation.status == "succeeded", operation.error
    assert os.readlink(own_input / "scanned.png") == "/shared/input/scanned.png"
