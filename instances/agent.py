"""The node agent (`manage.py agent --node NAME`): ComfyHub's production worker on a GPU host, taking jobs from its
node's queues once an operator approved the node, and a heartbeat thread reporting the host every
NODE_HEARTBEAT_SECONDS: its GPUs, its Docker engine, free space on its storage roots, ComfyHub's version and load.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from django.conf import settings
from django.db import connections
from django.utils.module_loading import import_string
from rq import Queue

from comfyhub import queues
from storage_app import layout

from . import docker_engine, gpus, nodes, remote
from .models import Instance, Node

logger = logging.getLogger("comfyhub.agent")


def comfyhub_version() -> str:
    """The checkout the agent runs: `git describe` of the project folder, or "unknown" outside a git checkout."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=settings.BASE_DIR,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def storage_usage(node: Node) -> list[dict]:
    """Free and total bytes of the filesystem of each storage root (a root not made yet: an error says so)."""
    roots = (("shared", layout.shared_root(node)), ("instances", layout.instances_root(node)),
             ("backups", Path(settings.COMFY_BACKUPS_PATH)))
    found = []
    for name, path in roots:
        entry = {"root": name, "path": str(path), "free_bytes": None, "total_bytes": None}
        try:
            usage = shutil.disk_usage(path)
        except OSError as exc:
            entry["error"] = f"{exc.strerror or exc}"
        else:
            entry["free_bytes"], entry["total_bytes"] = usage.free, usage.total
        found.append(entry)
    return found


def host_report(node: Node, *, version: str) -> dict:
    """The heartbeat's facts about the host itself (no database): its Docker engine, storage, version and load."""
    engine = docker_engine.engine_status(node.docker_host or None)
    return {
        "docker_version": engine.version,
        "docker_error": engine.error,
        "storage": storage_usage(node),
        "comfyhub_version": version,
        "load": [round(value, 2) for value in os.getloadavg()],
        "cpu_count": os.cpu_count(),
        "hostname": socket.gethostname(),
        # The hub opens this node's instances on a loopback address only when it shares that loopback
        # (views_access.upstream_of).
        "network_identity": nodes.network_identity(),
        "agent_pid": os.getpid(),
        "queues": nodes.node_queue_names(node.name),
    }


def gpu_report(node: Node) -> dict:
    """The node's GPUs, discovered as the hub does for `local` (NVML, else COMFY_GPUS), which also refreshes its GPU
    rows."""
    try:
        source, found = gpus.gpus_discover(node)
    except Exception as exc:  # noqa: BLE001 - a heartbeat reports what it can
        return {"gpus": [], "gpu_source": "", "gpu_error": str(exc)}
    return {"gpu_source": source, "gpus": [{"index": gpu.index, "uuid": gpu.uuid, "name": gpu.name,
                                            "memory_total": gpu.memory_total} for gpu in found]}


def images_in_use(node: Node) -> list[str]:
    return sorted(set(Instance.objects.filter(node=node).values_list("image", flat=True)))


def images_report(node: Node, images: list[str]) -> dict:
    """Which of the images this node's instances use its engine lacks (null when the engine does not answer): the
    dashboard's "missing images" notice reads it from the last heartbeat, never waiting for an agent."""
    return {"images_absent": remote.absent_images_on(node.docker_host or None, images)}


def collect_heartbeat(node: Node, *, version: str) -> dict:
    """Everything a heartbeat reports (docs/cli.md, `hosts show --json`)."""
    return {**gpu_report(node), **host_report(node, version=version), **images_report(node, images_in_use(node))}


class Agent:
    """Registers the node, heartbeats in a thread, and runs the worker while the node is approved."""

    def __init__(self, name: str, *, address: str | None = None, interval: float | None = None):
        self.name = name
        self.address = address or settings.NODE_ADDRESS
        self.interval = interval or settings.NODE_HEARTBEAT_SECONDS
        self.version = comfyhub_version()
        self.node: Node | None = None
        self.stopping = threading.Event()
        self.approved = threading.Event()
        self.revoked = False
        self.worker = None
        self._last_beat: float | None = None
        # The heartbeat thread's database connection must not be open when the worker forks a work horse: a copy in
        # the child, dropped there, could end the parent's session (PostgreSQL) under it. The thread writes and
        # closes its connection holding this lock; a fork waits for it.
        self._database_lock = threading.Lock()
        os.register_at_fork(before=self._database_lock.acquire, after_in_parent=self._database_lock.release,
                            after_in_child=self._database_lock.release)

    # --- The main thread ---------------------------------------------------------------------------------------

    def run(self):
        self.node, created = nodes.node_register(name=self.name, address=self.address)
        if created:
            logger.info("Registered node %s (address %s). An operator must approve it before it takes jobs: "
                        "`manage.py hosts approve %s` or the Nodes page.", self.name, self.address, self.name)
        self._catch_stop_signals()
        beating = threading.Thread(target=self._heartbeats, name=f"heartbeat {self.name}", daemon=True)
        beating.start()
        try:
            while not self.stopping.is_set():
                if not self.approved.is_set():
                    logger.info("Node %s is waiting for approval: heartbeats go on, no jobs are taken. Approve it "
                                "with `manage.py hosts approve %s` or on the Nodes page.", self.name, self.name)
                    while not self.approved.wait(0.2):
                        if self.stopping.is_set():
                            return
                logger.info("Node %s is approved: taking jobs from %s.", self.name,
                            ", ".join(nodes.node_queue_names(self.name)))
                self._work()
                if self.revoked and not self.stopping.is_set():
                    self.revoked = False
                    self._catch_stop_signals()  # RQ's handlers were in place while it worked
                    continue
                break
        finally:
            self.stopping.set()
            beating.join(timeout=self.interval + 5)
            logger.info("Node %s's agent stopped.", self.name)

    def _work(self):
        connection = queues.get_connection("default")
        node_queues = [
            Queue(name, connection=connection, default_timeout=settings.RQ_QUEUES[kind]["DEFAULT_TIMEOUT"])
            for name, kind in zip(nodes.node_queue_names(self.name), ("default", "long"))
        ]
        worker_class = import_string(settings.RQ["WORKER_CLASS"])
        self.worker = worker_class(node_queues, connection=connection)
        # Coming online (started, or approved again): what its instances did meanwhile is recorded first. This
        # agent runs no job yet, so a reconcile "started" on its queue was a dead predecessor's: queue one anyway.
        self.queue_reconcile(replace_abandoned=True)
        connections.close_all()  # none of this thread's connections crosses a fork (rqworker does the same)
        if self.stopping.is_set():
            return
        try:
            # RQ's SIGTERM handling from here on: a stop finishes the current job.
            self.worker.work(with_scheduler=True, logging_level=logging.getLevelName(logger.getEffectiveLevel()))
        finally:
            self.worker = None
        if not self.revoked:
            self.stopping.set()

    def _catch_stop_signals(self):
        def stop(signum, frame):
            logger.info("Node %s's agent: %s, stopping.", self.name, signal.Signals(signum).name)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def queue_reconcile(self, replace_abandoned=False):
        """Queue a reconcile pass of this node's instances on its own queue (instances.jobs.reconcile_instances)."""
        from .jobs import queue_node_reconcile

        with self._database_lock:
            try:
                queue_node_reconcile(self.node, replace_abandoned=replace_abandoned)
            finally:
                connections.close_all()

    # --- The heartbeat thread ----------------------------------------------------------------------------------

    def _heartbeats(self):
        while not self.stopping.is_set():
            self.beat()
            self.stopping.wait(self.interval)

    def beat(self):
        """One heartbeat; a failure is one log line, never the end of the agent."""
        try:
            with self._database_lock:
                try:
                    images = images_in_use(self.node)
                finally:
                    connections.close_all()
            # The slow part (Docker) outside the lock.
            report = {**host_report(self.node, version=self.version), **images_report(self.node, images)}
            with self._database_lock:
                try:
                    report = {**gpu_report(self.node), **report}
                    approved = nodes.node_heartbeat(node=self.node, heartbeat=report, address=self.address)
                finally:
                    connections.close_all()
        except Exception as exc:  # noqa: BLE001 - the next heartbeat tries again
            logger.warning("Node %s: heartbeat failed: %s", self.name, str(exc).strip() or type(exc).__name__)
            return
        now = time.monotonic()
        away = self._last_beat is not None and now - self._last_beat > nodes.offline_after().total_seconds()
        self._last_beat = now
        if approved and away and self.worker is not None:
            # The hub showed it offline meanwhile: its instances' recorded state is old.
            logger.info("Node %s is back online after missed heartbeats: reconciling its instances.", self.name)
            self.queue_reconcile()
        if approved:
            self.approved.set()
        elif self.approved.is_set():
            self.approved.clear()
            if self.worker is not None:
                logger.info("Node %s's approval was revoked: finishing the current job, then taking no more.",
                            self.name)
                self.revoked = True
                os.kill(os.getpid(), signal.SIGTERM)  # RQ's warm stop, as a person's SIGTERM
