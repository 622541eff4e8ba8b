"""The baselines' job: a plain module-level function (no Django, no Operation row).

`python -m bench.bare_jobs QUEUE` works QUEUE with ComfyHub's own worker class (`comfyhub.worker.ComfyHubWorker`),
so the round trip can also be measured like for like: the same worker, without the Operation bookkeeping.
"""
import sys


def noop():
    return {"ok": True}


def work_with_comfyhub_worker(queue_name: str):
    import django

    django.setup()
    from rq import Queue

    from comfyhub import queues
    from comfyhub.worker import ComfyHubWorker

    connection = queues.get_connection("default")
    ComfyHubWorker([Queue(queue_name, connection=connection)], connection=connection).work()


if __name__ == "__main__":
    work_with_comfyhub_worker(sys.argv[1])
