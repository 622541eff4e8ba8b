"""The job queue as the rest of ComfyHub sees it: RQ queues on Redis, whether they answer, and who works them.

The hub's own workers take `default` (quick jobs) and `long`; a node's agent takes `node.<name>` and
`node.<name>.long`, configured as `default` and `long` and on the same Redis."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

import threading

import django_rq
from django.conf import settings
from django_rq.jobs import get_job_class
from redis import Redis
from redis.exceptions import RedisError
from rq import Queue, Worker


class QueueUnavailable(Exception):
    """Redis does not answer, so nothing can be enqueued."""


def redis_address() -> str:
    """The Redis address without credentials, for messages."""
    parts = urlsplit(settings.REDIS_URL)
    if parts.scheme == "unix":
        return f"unix://{parts.path}"
    host = parts.hostname or "localhost"
    return f"{parts.scheme}://{host}:{parts.port or 6379}"


def unavailable_message(exc: Exception | None = None) -> str:
    detail = f" ({exc})" if exc else ""
    return (
        f"The job queue is unavailable: Redis at {redis_address()} does not answer{detail}. "
        "Start Redis (make run starts one) or fix REDIS_URL, then try again."
    )


_clients: dict[tuple, Redis] = {}
_clients_lock = threading.Lock()


NODE_QUEUE_PREFIX = "node."
LONG_SUFFIX = ".long"


def base_queue(name: str) -> str:
    """The configured queue (RQ_QUEUES) whose settings `name` uses: itself, or for a node's queue `default`
    (node.<name>) or `long` (node.<name>.long). Node names have no dots, so node.long is a quick queue."""
    if name in settings.RQ_QUEUES:
        return name
    if isinstance(name, str) and name.startswith(NODE_QUEUE_PREFIX) and len(name) > len(NODE_QUEUE_PREFIX):
        rest = name[len(NODE_QUEUE_PREFIX):]
        if rest.endswith(LONG_SUFFIX) and "." not in rest[:-len(LONG_SUFFIX)]:
            return "long"
        if "." not in rest:
            return "default"
    raise KeyError(f"No queue {name!r}: the queues are {', '.join(settings.RQ_QUEUES)} and node.<name>[.long].")


def node_queue(node_name: str, base: str = "default") -> str:
    """The queue of node `node_name` for jobs of the configured queue `base` ("default" or "long")."""
    return f"{NODE_QUEUE_PREFIX}{node_name}" + (LONG_SUFFIX if base == "long" else "")


def get_connection(name: str = "default") -> Redis:
    """One client per URL and process (redis-py pools are thread-safe and start afresh after fork()). Unlike
    django_rq's own, it applies CONNECTION_KWARGS (the connect timeout) to URL configurations."""
    config = settings.RQ_QUEUES[base_queue(name)]
    options = config.get("CONNECTION_KWARGS", {})
    key = (config["URL"], tuple(sorted(options.items())))
    client = _clients.get(key)
    if client is None:
        with _clients_lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = Redis.from_url(config["URL"], **options)
    return client


def get_queue(name: str = "default"):
    base = base_queue(name)
    if base == name:
        return django_rq.get_queue(name, connection=get_connection(name))
    # django_rq's queue class looks its own name up in RQ_QUEUES; a node's queue is a plain RQ queue with its base
    # queue's settings (jobs are enqueued at once either way: COMMIT_MODE is "auto").
    config = settings.RQ_QUEUES[base]
    return Queue(name, connection=get_connection(name), default_timeout=config.get("DEFAULT_TIMEOUT"),
                 job_class=get_job_class(), serializer=config.get("SERIALIZER"))


def ensure_available(name: str = "default"):
    try:
        get_connection(name).ping()
    except RedisError as exc:
        raise QueueUnavailable(unavailable_message(exc)) from exc


@dataclass
class QueueState:
    name: str
    waiting: int
    workers: int
    busy_workers: int


@dataclass
class QueueOverview:
    available: bool
    address: str
    error: str = ""
    queues: list[QueueState] = field(default_factory=list)

    @property
    def workers(self) -> int:
        return max((q.workers for q in self.queues), default=0)

    @property
    def unattended(self) -> list[str]:
        """Queues that no live worker listens on: their jobs would wait forever."""
        return [q.name for q in self.queues if q.workers == 0]


def queue_overview() -> QueueOverview:
    """Workers alive and jobs waiting per queue; never raises (Redis down is a state, not an error)."""
    overview = QueueOverview(available=True, address=redis_address())
    try:
        connection = get_connection("default")
        workers = Worker.all(connection=connection)
        for name in settings.RQ_QUEUES:
            listening = [w for w in workers if name in w.queue_names()]
            overview.queues.append(
                QueueState(
                    name=name,
                    waiting=get_queue(name).count,
                    workers=len(listening),
                    busy_workers=sum(1 for w in listening if w.get_state() == "busy"),
                )
            )
    except RedisError as exc:
        overview.available = False
        overview.error = unavailable_message(exc)
        overview.queues = []
    return overview


def workers_listening(name: str) -> int:
    """How many live workers listen on queue `name` (0 when Redis is down)."""
    try:
        connection = get_connection(name)
        return sum(1 for w in Worker.all(connection=connection) if name in w.queue_names())
    except RedisError:
        return 0
