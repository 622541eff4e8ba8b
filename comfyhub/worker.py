"""The RQ worker ComfyHub runs: RQ's forking worker, warmed up once so every work horse starts with the jobs
imported and the ORM ready (forking a cold Django per job costs more than the job itself)."""
import uuid

from django.db import connections
from rq import Worker


class ComfyHubWorker(Worker):
    def work(self, *args, **kwargs):
        warm_up()
        return super().work(*args, **kwargs)


def warm_up():
    # The apps import their jobs when Django starts; what is left to warm is the ORM's first query.
    from .models import Operation

    nobody = uuid.UUID(int=0)
    Operation.objects.filter(pk=nobody, status=Operation.Status.QUEUED).update(status=Operation.Status.QUEUED)
    connections.close_all()  # never carry an open database connection across fork()
