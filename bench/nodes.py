"""Many nodes cost the pages nothing, and a node's agent takes an operation as fast as the hub's worker does.

1. Queries: the dashboard (`/`) and the Nodes page (`/nodes/`), a logged-in superuser (django.test.Client), with
   1 node (`local`) holding 50 instances (the baseline), then with 10 nodes (9 more, online by a heartbeat, each
   with 2 GPUs) holding 50 instances each. Target: the same number of SQL queries per page. Median render times
   (REQUESTS requests each, after the query count) are printed for information.
2. Dispatch: `operations.enqueue(comfyhub.jobs.noop, node=...)` for node `bench-b`, taken by a real `manage.py agent
   --node bench-b` (approved; heartbeat every second), until its Operation row reads `succeeded`; baseline, in the
   same run: the same no-op operation for `local`, taken by `manage.py rqworker default` (the hub's worker). Both are
   ComfyHubWorker, so the ratio is what a node's queue costs. Runs alternate, each on an idle worker. The median of
   queued -> running (the row's `created_at` -> `started_at`, stamped by the processes) is the measure; the polled
   total until `succeeded` is printed too. Target: median ratio <= 1.5.
"""
from __future__ import annotations

import functools
import os
import re
import sys
import time

from .environment import (
    BenchError, PrivateEnvironment, admin_client, median, ms, percentile, run, save_result, set_up_as_running,
    verdict, wait,
)

NAME = "nodes"
DISPATCH_TARGET = 1.5
NODES, PER_NODE = 10, 50
REQUESTS = int(os.environ.get("BENCH_PAGES_REQUESTS", "20"))
RUNS = int(os.environ.get("BENCH_NODES_RUNS", "30"))
WARMUP = 3
POLL_INTERVAL = float(os.environ.get("BENCH_POLL_MS", "2")) / 1000
AGENT_NODE = "bench-b"
PAGES = ("/", "/nodes/")


_wait = functools.partial(wait, timeout=60.0, interval=POLL_INTERVAL)


def _fill(node, first, count):
    from instances import services

    for number in range(first, first + count):
        services.instance_create(instance_id=f"inst-{number:04d}", image="", node=node, gpu_indexes=[])


def _pages(client):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    counts = {}
    for url in PAGES:
        for _ in range(2):
            client.get(url)
        with CaptureQueriesContext(connection) as captured:
            response = client.get(url)
        # Read them now: the next request's request_started signal empties the connection's query log.
        sql = [query["sql"] for query in captured.captured_queries]
        if response.status_code != 200:
            raise BenchError(f"GET {url} answered {response.status_code}")
        times = []
        for _ in range(REQUESTS):
            begin = time.perf_counter()
            client.get(url)
            times.append(time.perf_counter() - begin)
        counts[url] = {"queries": len(sql), "sql": sql, "times": times,
                       "rows": len(re.findall(rb"<tr", response.content))}
    return counts


def main() -> int:
    with PrivateEnvironment(NAME, extra_env={"COMFY_GPUS": "0,1", "COMFY_DEFAULT_INSTANCE": "false",
                                             "NODE_HEARTBEAT_SECONDS": "1", "INSTANCE_PORT_RANGE": "20000-20999",
                                             "DOCKER_STATUS_CACHE_SECONDS": "86400"}) as env:
        env.setup_django()

        from comfyhub import jobs, operations, queues
        from comfyhub.models import Operation
        from instances import nodes
        from instances.models import GPU, LOCAL_NODE, Node

        set_up_as_running()

        # --- Part 1: queries with 1 node and with 10 --------------------------------------------------------
        _, client = admin_client()
        local = Node.objects.get(name=LOCAL_NODE)
        _fill(local, 0, PER_NODE)
        one = _pages(client)
        for number in range(1, NODES):
            node = Node.objects.create(name=f"gpu-{number}", approved=True, port_range_start=20000 + number * 60,
                                       port_range_end=20000 + number * 60 + 59)
            GPU.objects.bulk_create([GPU(node=node, index=index, name="bench GPU", uuid=f"GPU-{number}-{index}",
                                         present=True) for index in range(2)])
            nodes.node_heartbeat(node=node, heartbeat={"docker_version": "27.0", "load": [0.1, 0.1, 0.1]},
                                 address="127.0.0.1")
            _fill(node, number * PER_NODE, PER_NODE)
        many = _pages(client)

        # --- Part 2: dispatch to a node's agent vs the hub's worker ---------------------------------------------
        redis = queues.get_connection("default")
        processes = {
            "hub": env.start_process("hub-worker", [sys.executable, "manage.py", "rqworker", "default"]),
            "agent": env.start_process("agent", [sys.executable, "manage.py", "agent", "--node", AGENT_NODE]),
        }
        agent_node = _wait(lambda: Node.objects.filter(name=AGENT_NODE).first(), "the agent to register its node",
                           interval=0.1)
        nodes.node_approve(node=agent_node)
        queue_of = {"hub": "default", "agent": f"node.{AGENT_NODE}"}

        keys = {label: env.worker_key(processes[label], log_label, queue_of[label])
                for label, log_label in (("hub", "hub-worker"), ("agent", "agent"))}
        agent_node.refresh_from_db()
        target_node = {"hub": local, "agent": agent_node}
        queued_to_running = {"hub": [], "agent": []}
        totals = {"hub": [], "agent": []}
        for number in range(WARMUP + RUNS):
            for label in ("hub", "agent") if number % 2 == 0 else ("agent", "hub"):
                target_node[label].refresh_from_db()  # as a request loads it: its last heartbeat now
                start = time.perf_counter()
                try:
                    operation = operations.enqueue(jobs.noop, node=target_node[label])
                except operations.NodeUnavailable as exc:
                    raise BenchError(f"{exc}\n{env.log_tail('agent')}") from exc

                def succeeded():
                    status = Operation.objects.filter(pk=operation.pk).values_list("status", flat=True).first()
                    if status in (Operation.Status.FAILED, Operation.Status.CANCELLED):
                        raise BenchError(f"the noop operation on the {label} {status}: "
                                         f"{Operation.objects.get(pk=operation.pk).error}")
                    return status == Operation.Status.SUCCEEDED

                _wait(succeeded, f"the noop operation on the {label} to succeed", timeout=30)
                end = time.perf_counter()
                _wait(lambda: redis.hget(keys[label], "state") == b"idle", f"the {label} to go idle", timeout=30)
                if number >= WARMUP:
                    row = Operation.objects.get(pk=operation.pk)
                    queued_to_running[label].append((row.started_at - row.created_at).total_seconds())
                    totals[label].append(end - start)
                if operation.queue_name != queue_of[label]:
                    raise BenchError(f"the operation went to {operation.queue_name}, not {queue_of[label]}")

    pages_ok = all(one[url]["queries"] == many[url]["queries"] for url in PAGES)
    ratio = median(queued_to_running["agent"]) / median(queued_to_running["hub"])
    ok = pages_ok and ratio <= DISPATCH_TARGET
    for url in PAGES:
        same = one[url]["queries"] == many[url]["queries"]
        print(f"{NAME}: {url} queries {one[url]['queries']} with 1 node x {PER_NODE} instances vs "
              f"{many[url]['queries']} with {NODES} nodes x {PER_NODE} ({verdict(same)} same) | render median "
              f"{ms(median(one[url]['times']))} -> {ms(median(many[url]['times']))} (for information)", flush=True)
        if not same:
            extra = [sql[:200] for sql in many[url]["sql"] if sql not in one[url]["sql"]]
            print("    queries only with many nodes: " + " | ".join(extra[:10]))
    for label, words in (("hub", "hub's worker (rqworker default)"), ("agent", f"agent of node {AGENT_NODE}")):
        print(f"  {words:36s} queued -> running median {ms(median(queued_to_running[label]))} p90 "
              f"{ms(percentile(queued_to_running[label], 0.9))} | until succeeded (polled) median "
              f"{ms(median(totals[label]))}", flush=True)
    print(f"{NAME}: dispatch, {RUNS} no-op operations each: agent / hub worker queued -> running median ratio "
          f"{ratio:.2f} (target <= {DISPATCH_TARGET}) {verdict(ratio <= DISPATCH_TARGET)}; overall {verdict(ok)}",
          flush=True)
    save_result(NAME, {"pages": {url: {"one_node": one[url]["queries"], "many_nodes": many[url]["queries"]}
                                 for url in PAGES},
                       "dispatch_ratio": ratio, "queued_to_running": queued_to_running, "totals": totals,
                       "pass": ok})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
