"""The periodic reconcile (health.reconcile_all) over 200 instances with real containers.

200 instances are made by services.instance_create (GPUs 0-3 on the first four), their directories built, and a
container made for each from the ComfyUI test double image through ComfyHub's Docker adapter
(docker_engine.create_container with runtime.container_spec). The first STARTED are started (and recorded as
started by ComfyHub: desired state running, config hash) and answer /system_stats; the rest stay created, as
stopped instances' containers do. Then reconcile_all() is timed PASSES times (the first pass records every status,
the later ones find little to change).
Baseline, in the same run: what the engine itself needs to say the same, through the CLI: `docker ps -a --filter
label=comfyhub.managed=true --format '{{json .}}'` plus one `docker inspect` of all of them (median of PASSES).
All containers of the run are removed at the end (by their run label).

Target: the slowest pass takes less than one scheduler interval, settings.INSTANCE_HEALTH_INTERVAL (30 s). The
ratio to the baseline is printed for information.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

from . import docker_support
from .environment import BenchError, PrivateEnvironment, median, ms, run, save_result, verdict

NAME = "reconcile"
INSTANCES = int(os.environ.get("BENCH_RECONCILE_INSTANCES", "200"))
STARTED = int(os.environ.get("BENCH_RECONCILE_STARTED", "10"))
PASSES = 3
CREATE_THREADS = 4


def main() -> int:
    token = docker_support.run_token(NAME)
    engine, image = docker_support.client()
    with PrivateEnvironment(NAME, extra_env=docker_support.extra_env(token, INSTANCE_PORT_RANGE="41000-41399")) as env:
        try:
            return _measure(env, image, token)
        finally:
            begin = time.perf_counter()
            docker_support.clean_up(engine, NAME, token)
            print(f"{NAME}: cleaned up in {time.perf_counter() - begin:.1f}s", flush=True)


def _measure(env, image, token) -> int:
    env.setup_django()

    from django.conf import settings

    from instances import docker_engine, health, runtime, services
    from instances.models import Instance
    from storage_app import layout

    interval = settings.INSTANCE_HEALTH_INTERVAL
    setup_started = time.perf_counter()
    instances = [
        services.instance_create(instance_id=f"rec-{number:03d}", image=image,
                                 gpu_indexes=[number] if number < 4 else [])
        for number in range(INSTANCES)
    ]
    node = instances[0].node
    layout.build_shared_tree(node)
    for instance in instances:
        layout.build_instance_tree(instance.instance_id, node)
    instances = list(services.instances_with_relations().order_by("instance_id"))
    specs = {instance.pk: runtime.container_spec(instance) for instance in instances}

    def create(chunk):
        client = docker_engine.require_engine()
        try:
            for instance in chunk:
                docker_engine.create_container(client, specs[instance.pk])
        finally:
            client.close()

    chunks = [instances[n::CREATE_THREADS] for n in range(CREATE_THREADS)]
    with ThreadPoolExecutor(max_workers=CREATE_THREADS) as pool:
        list(pool.map(create, chunks))
    client = docker_engine.require_engine()
    try:
        for instance in instances[:STARTED]:
            docker_engine.start_container(client, instance.container_name)
            Instance.objects.filter(pk=instance.pk).update(
                desired_state=Instance.DesiredState.RUNNING, config_hash=specs[instance.pk].config_hash)
        for instance in instances[:STARTED]:
            docker_support.wait_http(f"http://127.0.0.1:{instance.host_port}/system_stats", timeout=60, interval=0.05)
    finally:
        client.close()
    setup_seconds = time.perf_counter() - setup_started
    on_engine = len(docker_support.cli("ps", "-aq").split())
    mine = len(docker_support.cli("ps", "-aq", "--filter", f"label={docker_support.BENCH_LABEL}={token}").split())
    if mine != INSTANCES:
        raise BenchError(f"expected {INSTANCES} containers of this run, found {mine} (a test run's docker_cleanup "
                         "removes every comfyhub.test container); run it again when no Docker tests run")

    def baseline_once():
        begin = time.perf_counter()
        listed = docker_support.cli("ps", "-a", "--filter", "label=comfyhub.managed=true", "--format", "{{json .}}")
        ids = [json.loads(line)["ID"] for line in listed.splitlines() if line.strip()]
        inspected = json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True,
                                              check=True).stdout)
        return time.perf_counter() - begin, len(inspected)

    comfyhub, baseline, counts, listed = [], [], [], []
    for number in range(PASSES):
        pair = ["comfyhub", "baseline"] if number % 2 == 0 else ["baseline", "comfyhub"]
        for side in pair:
            if side == "comfyhub":
                begin = time.perf_counter()
                counts.append(health.reconcile_all())
                comfyhub.append(time.perf_counter() - begin)
            else:
                seconds, inspected = baseline_once()
                baseline.append(seconds)

    mine = len(docker_support.cli("ps", "-aq", "--filter", f"label={docker_support.BENCH_LABEL}={token}").split())
    if mine != INSTANCES:
        raise BenchError(f"{INSTANCES - mine} of this run's containers vanished while it ran (a test run's "
                         "docker_cleanup removes every comfyhub.test container); run it again")

    # Where the time goes: the adapter's listing (one inspect per container) alone, in this process.
    client = docker_engine.require_engine()
    try:
        for _ in range(PASSES):
            begin = time.perf_counter()
            states = docker_engine.list_containers(client)
            listed.append(time.perf_counter() - begin)
    finally:
        client.close()
    by_name = {state.name: state for state in states}
    rows = list(services.instances_with_relations().filter(node=node))
    begin = time.perf_counter()
    for row in rows:
        health.isolation_checks(row, by_name.get(row.container_name), None, states)
    checks_seconds = time.perf_counter() - begin
    statuses = Counter(Instance.objects.values_list("status", flat=True))

    slowest = max(comfyhub)
    ok = slowest < interval
    ratio = median(comfyhub) / median(baseline)
    print(f"{NAME}: {INSTANCES} instances and containers ({STARTED} running) made in {setup_seconds:.1f}s; "
          f"{on_engine} containers on the engine in all (the reconcile looks at every one), {inspected} inspected "
          f"by the baseline", flush=True)
    print(f"  reconcile_all() passes: {', '.join(ms(s) for s in comfyhub)}; statuses after: "
          f"{dict(sorted(statuses.items()))}")
    print(f"  docker ps -a + docker inspect (CLI): {', '.join(ms(s) for s in baseline)}")
    print(f"  of a pass: docker_engine.list_containers() (list + one inspect per container) median "
          f"{ms(median(listed))}; isolation_checks() for all {len(rows)} instances {ms(checks_seconds)}")
    print(f"{NAME}: slowest pass {ms(slowest)} (median {ms(median(comfyhub))}) vs the {interval} s scheduler "
          f"interval {verdict(ok)} | baseline CLI median {ms(median(baseline))} | ratio {ratio:.2f} (information)",
          flush=True)
    save_result(NAME, {"interval_s": interval, "pass": ok, "passes": comfyhub, "baseline": baseline,
                       "ratio": ratio, "list_containers": listed, "isolation_checks_s": checks_seconds,
                       "counts": counts, "containers_on_engine": on_engine})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
