"""Questions asked from inside an instance's container: which of these URLs answer from there?

A cluster's master must reach its workers, and a NetDist node calls its peers, from inside the container: the host's
view (its loopback, its routes) says nothing about that. The probe runs the container's own python3 with `docker exec`
(in the container, with its rights, never on the host) and its answer is read as hostile text: bounded, and only the
URLs that were asked about are taken from it. A container can lie about what it reaches; the answer is a diagnosis for
the person looking, never a decision ComfyHub acts on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from . import containers, docker_engine
from .models import Instance

# Runs inside the container: every URL is asked at once (GET, no proxy from the container's environment), each within
# the timeout; prints {url: [ok, detail]}.
_PROBE = """
import concurrent.futures, json, sys, urllib.request
timeout, urls = float(sys.argv[1]), sys.argv[2:]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def ask(url):
    try:
        with opener.open(url, timeout=timeout) as answer:
            answer.read(65536)
            return [200 <= answer.status < 300, "HTTP %d" % answer.status]
    except Exception as exc:
        return [False, (type(exc).__name__ + ": " + str(exc))[:200]]
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    print(json.dumps(dict(zip(urls, pool.map(ask, urls)))))
"""
_PARALLEL = 8  # the probe's threads, as in _PROBE
MAX_URLS = 64


@dataclass(frozen=True)
class Reach:
    url: str
    ok: bool
    detail: str

    def as_dict(self) -> dict:
        return {"url": self.url, "ok": self.ok, "detail": self.detail}


def reach_from_inside(instance: Instance, urls: list[str], *, timeout: float = 3.0) -> list[Reach]:
    """For each URL, whether it answers a GET with 2xx from inside `instance`'s running container (on its node's
    engine). Raises OperationError when the engine cannot be reached; a container that is not running, or cannot run
    the probe, gives every URL ok=False with the reason."""
    urls = list(dict.fromkeys(urls))[:MAX_URLS]
    if not urls:
        return []
    engine = containers.engine_for(instance, "The probe was not run.")
    try:
        state = docker_engine.container_state(engine, instance.container_name)
        if state is None or not state.running:
            return [Reach(url, False, f"{instance.instance_id} is not running") for url in urls]
        try:
            # -I -S: the container's PYTHONPATH, user site and working folder (all writable from inside) are not
            # read, so planted modules cannot take the probe over; it still runs with the container's rights only.
            result = docker_engine.exec_in(engine, instance.container_name,
                                           ["python3", "-I", "-S", "-c", _PROBE, str(timeout), *urls],
                                           timeout=timeout * -(-len(urls) // _PARALLEL) + 5)
        except docker_engine.EngineError as exc:
            return [Reach(url, False, f"the probe could not run in {instance.instance_id}: {exc}"[:300])
                    for url in urls]
    finally:
        engine.close()
    if result.timed_out:
        return [Reach(url, False, f"the probe did not finish in {instance.instance_id} in time") for url in urls]
    answers = _answers(result.output) if result.exit_code == 0 else None
    if answers is None:
        why = result.output.strip().splitlines()[-1:] or [f"exit code {result.exit_code}"]
        return [Reach(url, False, f"the probe failed in {instance.instance_id}: {why[0][:200]}") for url in urls]
    return [answers.get(url) or Reach(url, False, "the probe gave no answer for it") for url in urls]


def _answers(output: str) -> dict[str, Reach] | None:
    try:
        data = json.loads(output.strip().splitlines()[-1]) if output.strip() else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    answers = {}
    for url, answer in data.items():
        if (isinstance(url, str) and isinstance(answer, list) and len(answer) == 2 and isinstance(answer[0], bool)
                and isinstance(answer[1], str)):
            answers[url] = Reach(url, answer[0], answer[1][:200])
    return answers
