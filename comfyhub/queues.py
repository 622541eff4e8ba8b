"""The job queue as the rest of ComfyHub sees it: RQ queues on Redis, whether they answer, and who works them."""
from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

import threading

import django_rq
from django.conf import settings
from redis import Redis
from redis.exceptions import RedisError
from rq import Worker


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


def get_connection(name: str = "default") -> Redis:
    """One client per URL and process (redis-py pools are thread-safe and start afresh after fork()). Unlike
    django_rq's own, it applies CONNECTION_KWARGS (the connect timeout) to URL configurations."""
    config = settings.RQ_QUEUES[name]
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
    return django_rq.get_queue(name, connection=get_connection(name))


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
