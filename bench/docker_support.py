"""Docker helpers shared by the benchmarks that start containers (start_latency, reconcile).

Every container a benchmark makes carries `comfyhub.test=1` (as the test suite's) plus `comfyhub.bench=<run token>`,
so a benchmark removes exactly its own containers, by that label, when it ends (also on Ctrl-C/SIGTERM).
ComfyHub's own containers get both labels through CONTAINER_EXTRA_LABELS in the private environment (`extra_env()`).
"""
from __future__ import annotations

import json
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from .environment import BenchError

TEST_LABEL = "comfyhub.test"
BENCH_LABEL = "comfyhub.bench"


def run_token(name: str) -> str:
    return f"{name}-{secrets.token_hex(4)}"


def extra_env(token: str, **more) -> dict[str, str]:
    """Private-environment variables for a benchmark that lets ComfyHub create containers."""
    return {
        "CONTAINER_EXTRA_LABELS": f"{TEST_LABEL}=1,{BENCH_LABEL}={token}",
        "COMFY_GPUS": "0,1,2,3",
        # No default `comfy` instance on port 8188: the benchmark creates exactly the instances it measures.
        "COMFY_DEFAULT_INSTANCE": "false",
        # The instances it creates run the test double: COMFY_IMAGE's repository is what INSTANCE_IMAGES_ALLOWED allows.
        "COMFY_IMAGE": "comfyhub-comfyui-double:test",
        # Container and network names of this run's own: they never meet a running hub's (`make run` on the same
        # engine) nor an earlier run's.
        "CONTAINER_NAME_PREFIX": f"bench-{token}-",
        **more,
    }


def client():
    """A Docker SDK client on the engine that answers, and the ComfyUI test double image (built if missing)."""
    import docker

    try:
        engine = docker.from_env(use_context=False)  # as tests/support/engine.py
        engine.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means: no engine to benchmark against
        raise BenchError(f"no Docker engine answers ({exc}); start dockerd (see tests/support/engine.py)") from exc
    from tests.support.images import ensure_test_images

    try:
        image = ensure_test_images(engine)["comfyui_double"]
    except Exception as exc:  # noqa: BLE001
        raise BenchError(f"the ComfyUI test double image could not be built: {exc}") from exc
    return engine, image


def remove_labelled(engine, token: str, workers: int = 4) -> int:
    """Force-remove every container of this run (label comfyhub.bench=<token>); returns how many."""
    import docker.errors

    found = engine.api.containers(all=True, filters={"label": f"{BENCH_LABEL}={token}"})

    def remove(summary):
        try:
            engine.api.remove_container(summary["Id"], force=True, v=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:
            if exc.status_code != 409:  # a removal already in progress finishes by itself
                raise

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(remove, found))
    return len(found)


def remove_labelled_networks(engine, token: str) -> int:
    """Remove this run's networks (ComfyHub labels them with CONTAINER_EXTRA_LABELS, so they carry the run's token),
    once its containers are gone; returns how many."""
    import docker.errors

    found = engine.api.networks(filters={"label": f"{BENCH_LABEL}={token}"})
    for network in found:
        try:
            engine.api.remove_network(network["Id"])
        except docker.errors.NotFound:
            pass
    return len(found)


def clean_up(engine, name: str, token: str) -> None:
    """Remove this run's containers, then its networks (also when removing a container failed), and close the
    client; says what it removed."""
    try:
        removed = remove_labelled(engine, token)
        print(f"{name}: removed {removed} container(s) labelled {BENCH_LABEL}={token}", flush=True)
    finally:
        try:
            networks = remove_labelled_networks(engine, token)
            print(f"{name}: removed {networks} network(s) labelled {BENCH_LABEL}={token}", flush=True)
        finally:
            engine.close()


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            if response.status == 200:
                response.read()
                return True
    except (OSError, urllib.error.URLError, ValueError):
        pass
    return False


def wait_http(url: str, *, timeout: float, interval: float) -> float:
    """Poll `url` until it answers 200; returns time.perf_counter() at that moment."""
    deadline = time.perf_counter() + timeout
    while True:
        if http_ok(url):
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(f"{url} did not answer 200 within {timeout:.0f}s")
        time.sleep(interval)


def docker_run_argv(spec, *, name: str, host_port: int) -> list[str]:
    """`docker run -d` with exactly the arguments ComfyHub's adapter gives the engine for `spec`
    (instances.docker_engine.create_container), under another name and host port."""
    argv = ["docker", "run", "-d", "--name", name]
    for key, value in spec.environment.items():
        argv += ["-e", f"{key}={value}"]
    for key, value in spec.labels.items():
        argv += ["--label", f"{key}={value}"]
    for mount in spec.mounts:
        argv += ["--mount", f"type=bind,source={mount.source},target={mount.target}"
                 + (",readonly" if mount.read_only else "")]
    argv += ["-p", f"{spec.host_ip}:{host_port}:{spec.container_port}/tcp",
             "--restart", f"{spec.restart_policy}:{spec.restart_max}", "--shm-size", spec.shm_size,
             "--log-driver", spec.log_driver]
    for key, value in spec.log_options.items():
        argv += ["--log-opt", f"{key}={value}"]
    if spec.init:
        argv.append("--init")
    if spec.user:
        argv += ["--user", spec.user]
    for option in spec.security_opt:
        argv += ["--security-opt", option]
    if spec.gpu_ids:
        argv += ["--gpus", f'"device={",".join(spec.gpu_ids)}"']
    return argv + [spec.image, *spec.command]


def cli(*args: str, timeout: float = 120) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"docker {' '.join(args[:3])} ... failed: {done.stderr.strip()[:500]}")
    return done.stdout


def inspect_json(name: str) -> dict:
    return json.loads(cli("inspect", name))[0]
