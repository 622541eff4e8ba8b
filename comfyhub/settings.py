"""ComfyHub's one settings module: every knob comes from the environment (or `.env`).

Defaults let a fresh checkout run (SQLite and a local Redis under `var/`); `.env.example` documents each variable.
"""
import fnmatch
import ipaddress
import math
import os
import re
import urllib.parse
import zoneinfo
from pathlib import Path

import environ
from croniter import croniter
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
# A `.env` beside manage.py is optional; real environment variables win over it.
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)


def project_path(value: str) -> Path:
    """Resolve a configured path against the project root and return it absolute."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = BASE_DIR / path
    return path.resolve()


# --- Reading the environment ---------------------------------------------------------------------------------
# Every variable is read through one of these: a value that does not parse, or is out of range, stops the start
# with a message naming the variable, the value and what to write instead. Unset or empty means the default,
# except where a helper's caller says empty means something (e.g. MODEL_FULL_VERIFY_CRON).

def invalid(name: str, value: str, expected: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"{name}={value!r}: {expected}")


def env_text(name: str, default: str = "", *, valid=None, expected: str = "", empty: str | None = None) -> str:
    """The variable as text (stripped); `valid(text)` says whether a non-empty value is acceptable. `empty`: what
    the variable set to nothing means, where that is not the default."""
    raw = os.environ.get(name)
    text = (raw or "").strip()
    if not text:
        return empty if raw is not None and empty is not None else default
    if valid is not None and not valid(text):
        raise invalid(name, text, expected)
    return text


def env_int(name: str, default: int, meaning: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    text = env_text(name)
    if not text:
        return default
    expected = f"use a whole number{_range_words(minimum, maximum)} ({meaning}), e.g. {default}."
    try:
        value = int(text)
    except ValueError:
        raise invalid(name, text, expected) from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise invalid(name, text, expected)
    return value


def env_float(name: str, default: float, meaning: str, *, minimum: float | None = None,
              above: float | None = None) -> float:
    text = env_text(name)
    if not text:
        return default
    limit = f" above {above}" if above is not None else _range_words(minimum, None)
    expected = f"use a number{limit} ({meaning}), e.g. {default}."
    try:
        value = float(text)
    except ValueError:
        raise invalid(name, text, expected) from None
    if not math.isfinite(value) or (minimum is not None and value < minimum) or (above is not None and value <= above):
        raise invalid(name, text, expected)
    return value


def _range_words(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" of {minimum} or more"
    return ""


_TRUE_WORDS, _FALSE_WORDS = ("true", "yes", "y", "on", "1"), ("false", "no", "n", "off", "0")


def env_bool(name: str, default: bool, meaning: str) -> bool:
    text = env_text(name).lower()
    if not text:
        return default
    if text not in _TRUE_WORDS + _FALSE_WORDS:
        raise invalid(name, os.environ[name].strip(), f"use true or false ({meaning}), e.g. {str(default).lower()}.")
    return text in _TRUE_WORDS


def env_choice(name: str, default: str, choices: tuple[str, ...], meaning: str) -> str:
    """One of `choices`, in any case."""
    by_folded = {choice.casefold(): choice for choice in choices}
    text = env_text(name, default, valid=lambda text: text.casefold() in by_folded,
                    expected=f"use {_one_of(choices)} ({meaning}), e.g. {default}.")
    return by_folded[text.casefold()]


def env_list(name: str, default: list[str], *, valid=None, expected: str = "") -> list[str]:
    """A comma-separated list; empty items are dropped. `valid(item)` says whether one item is acceptable."""
    text = env_text(name)
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        return list(default)
    if valid is not None and not all(valid(item) for item in items):
        raise invalid(name, text, expected)
    return items


def env_folder(name: str, default: str, meaning: str) -> Path:
    """A folder (that may not exist yet), resolved against the project folder."""
    text = env_text(name, default)
    if not _may_be_folder(text):
        raise invalid(name, text, f"{project_path(text)} is not a folder; use the path of a folder ({meaning}), "
                                  f"e.g. {default}.")
    return project_path(text)


def _may_be_folder(text: str) -> bool:
    path = project_path(text)
    return path.is_dir() or not path.exists()


def env_url(name: str, default: str, schemes: tuple[str, ...], example: str, meaning: str) -> str:
    """A URL with one of `schemes`; its password never appears in a message."""
    text = env_text(name)
    if not text:
        return default
    scheme = urllib.parse.urlsplit(text).scheme if "://" in text else ""
    if scheme not in schemes:
        raise invalid(name, _without_password(text),
                      f"use a URL starting with {_one_of([s + '://' for s in schemes])} ({meaning}), e.g. {example}.")
    return text


def _one_of(words) -> str:
    return f"{', '.join(words[:-1])} or {words[-1]}"


def _time_zone_exists(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        return False
    return True


# Characters a Docker image reference is made of (the full grammar: instances/runtime.py).
_IMAGE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@\[\]-]*")


def _instance_id_problem(text: str) -> str | None:
    from storage_app.layout import instance_id_problem  # the storage layout owns the rule (core, imports no app)

    return instance_id_problem(text)


def _port_range(text: str) -> tuple[int, int] | None:
    """'8188-8387' (or one port, '8188') as (first, last), or None when it is not a usable range."""
    match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
    if not match:
        return None
    first, last = int(match[1]), int(match[2] or match[1])
    return (first, last) if 1024 <= first <= last <= 65535 else None


def _ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _without_password(url: str) -> str:
    return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", url)


def _secret_key() -> str:
    key = os.environ.get("SECRET_KEY", "").strip()
    key_file = env_text("SECRET_KEY_FILE")
    if not key and key_file:
        try:
            key = project_path(key_file).read_text().strip()
        except OSError as exc:
            raise invalid("SECRET_KEY_FILE", key_file, f"cannot be read ({exc.strerror}); use the path of a readable "
                          "file holding the key, e.g. /run/secrets/comfyhub_secret_key.") from None
        if not key:
            raise invalid("SECRET_KEY_FILE", key_file, "the file is empty; put the key in it.")
    return key


DEBUG = env_bool("DEBUG", False, "detailed error pages and static files from the source folders; never in production")
SECRET_KEY = _secret_key()
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY (or SECRET_KEY_FILE) in the environment or in .env, e.g. "
            "SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(50))'). "
            "`make run` creates one for you in var/secret_key."
        )
    SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"

ALLOWED_HOSTS = env_list(
    "ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"],
    valid=lambda host: re.fullmatch(r"[^\s/:]+|\[[0-9a-fA-F:.]+\]", host),
    expected="use the host names this server answers to, comma-separated, without scheme, port or path, e.g. "
             "comfyhub.example.org,localhost.")
CSRF_TRUSTED_ORIGINS = env_list(
    "CSRF_TRUSTED_ORIGINS", [], valid=lambda origin: re.fullmatch(r"https?://[^\s/]+", origin),
    expected="use origins with their scheme and no path, comma-separated, e.g. https://comfyhub.example.org.")

# Data that belongs to ComfyHub itself: SQLite database, local Redis, collected static files, logs.
DATA_DIR = env_folder("COMFYHUB_DATA_DIR", "var", "ComfyHub's own data: database, local Redis, static files")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django_htmx",
    "django_rq",
    "comfyhub",
    "instances",
    "storage_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.auth.middleware.LoginRequiredMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "comfyhub.urls"
WSGI_APPLICATION = "comfyhub.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "instances.context_processors.engine_banner",
            ],
        },
    },
]

DATABASES = {"default": env.db_url_config(env_url(
    "DATABASE_URL", f"sqlite:///{DATA_DIR / 'comfyhub.sqlite3'}", ("sqlite", "postgres", "postgresql", "pgsql"),
    "postgres://comfyhub:PASSWORD@db-host:5432/comfyhub", "the database ComfyHub keeps its records in"))}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Workers and the web server write concurrently: wait for locks instead of failing at once.
    options = DATABASES["default"].setdefault("OPTIONS", {})
    options.update({"timeout": 20, "transaction_mode": "IMMEDIATE"})
    # WAL: readers never wait for the writer, and a commit costs no fsync of the whole journal. A power loss can
    # lose the last commits but never corrupts the file. (Not for network filesystems.)
    options.setdefault("init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
if env.str("TEST_DATABASE_NAME", default=""):
    # Set by tests/testenv.py: the test database that RQ workers in other processes share with the tests (for
    # SQLite a file, not memory; for PostgreSQL the database's name).
    DATABASES["default"]["TEST"] = {"NAME": env.str("TEST_DATABASE_NAME")}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = env_text("TIME_ZONE", "UTC", valid=_time_zone_exists,
                     expected="use a time zone name from the tz database, e.g. UTC or Europe/Berlin.")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Hashed, compressed static files (served by WhiteNoise) unless DEBUG; tests' live server needs plain names.
STATIC_MANIFEST = env_bool("STATIC_MANIFEST", not DEBUG, "hashed, compressed static file names")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if STATIC_MANIFEST
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}
WHITENOISE_USE_FINDERS = DEBUG

# --- HTTPS (turn on behind TLS; `manage.py check --deploy` is then clean) -------------------------------------
HTTPS = env_bool("HTTPS", False, "ComfyHub is served over TLS: the defaults of the five settings below follow it")
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", HTTPS, "redirect plain HTTP to HTTPS")
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", HTTPS, "send the session cookie over HTTPS only")
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", HTTPS, "send the CSRF cookie over HTTPS only")
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if HTTPS else 0,
                              "how long browsers must use HTTPS only, in seconds; 0 sends no HSTS header", minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", HTTPS, "HSTS covers subdomains too")
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", HTTPS, "ask browsers to preload HSTS for this domain")
if env_bool("SECURE_PROXY_SSL_HEADER", False, "trust X-Forwarded-Proto from a TLS-terminating reverse proxy"):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True

# --- Redis and RQ --------------------------------------------------------------------------------------------
# Unset means "the local Redis that `make run` starts on a unix socket under var/".
REDIS_URL = env_url("REDIS_URL", f"unix://{DATA_DIR / 'redis.sock'}?db=0", ("redis", "rediss", "unix"),
                    "redis://127.0.0.1:6379/0", "the Redis the RQ queues live in")
_redis_queue = {
    "URL": REDIS_URL,
    # A dead Redis must not hang page renders: fail fast on connect.
    "CONNECTION_KWARGS": {"socket_connect_timeout": env_float(
        "REDIS_CONNECT_TIMEOUT", 2.0, "seconds to wait for Redis to accept a connection", above=0)},
}
RQ_QUEUES = {
    # Quick operations: build directories, start/stop containers.
    "default": {**_redis_queue, "DEFAULT_TIMEOUT": 900},
    # Operations that may run for hours: checksums, snapshots, migrations.
    "long": {**_redis_queue, "DEFAULT_TIMEOUT": 6 * 3600},
}
RQ = {
    # comfyhub.operations defers enqueueing to transaction commit itself.
    "COMMIT_MODE": "auto",
    # RQ's forking worker, a work horse per job, plus the socket hygiene and reporting of comfyhub/worker.py.
    "WORKER_CLASS": "comfyhub.worker.ComfyHubWorker",
}
RQ_SHOW_ADMIN_LINK = True

# --- `manage.py serve` (what `make run` starts); its options override these ----------------------------------------
SERVE_BIND = env_text("COMFYHUB_BIND", "127.0.0.1:8000", valid=lambda t: bool(re.fullmatch(
    r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}|unix:/\S+", t)),
    expected="use HOST:PORT ([::1]:8000 for IPv6) or unix:/path/to.sock, e.g. 127.0.0.1:8000.")
SERVE_WORKERS = env_int("COMFYHUB_WORKERS", 2, "RQ worker processes", minimum=1, maximum=64)
SERVE_WEB_WORKERS = env_int("COMFYHUB_WEB_WORKERS", 2, "gunicorn worker processes", minimum=1, maximum=64)

SERVE_NGINX = env_bool("COMFYHUB_NGINX", True, "start nginx in front of gunicorn (the /i/<id>/ proxy; off: "
                       "gunicorn alone on COMFYHUB_BIND, instances not reachable through the hub)")

# --- Distribution: ComfyUI-Distributed clusters, multi-GPU instances, NetDist peers (instances/clusters.py) ---------
_GIT_URL_RE = re.compile(r"(https?|ssh|file)://\S+|git@[\w.-]+:\S+|/\S+")
_GIT_REF_RE = re.compile(r"[A-Za-z0-9._/+-]{1,200}")
# Where clusters' members get ComfyUI-Distributed from, and at which ref (a commit: every member runs the same code).
DISTRIBUTED_NODE_URL = env_text(
    "DISTRIBUTED_NODE_URL", "https://github.com/robertvoy/ComfyUI-Distributed", valid=_GIT_URL_RE.fullmatch,
    expected="use a git URL (https://…, ssh://…, git@host:path, or a file:// URL or path where "
             "CUSTOM_NODE_LOCAL_SOURCES allows it), e.g. https://github.com/robertvoy/ComfyUI-Distributed.")
DISTRIBUTED_NODE_REF = env_text(
    "DISTRIBUTED_NODE_REF", "a91f9fb081eb5fc27db429a7c3f35d2ef7ce4a50",  # v1.4.4 (pyproject), 2026-04-08
    valid=lambda text: _GIT_REF_RE.fullmatch(text) and not text.startswith("-"),
    expected="use a commit, tag or branch of DISTRIBUTED_NODE_URL, e.g. a91f9fb081eb5fc27db429a7c3f35d2ef7ce4a50.")
# The same for ComfyUI-MultiGPU, which the built-in "multi-gpu" template installs.
MULTIGPU_NODE_URL = env_text(
    "MULTIGPU_NODE_URL", "https://github.com/pollockjj/ComfyUI-MultiGPU", valid=_GIT_URL_RE.fullmatch,
    expected="use a git URL (https://…, ssh://…, git@host:path, or a file:// URL or path where "
             "CUSTOM_NODE_LOCAL_SOURCES allows it), e.g. https://github.com/pollockjj/ComfyUI-MultiGPU.")
MULTIGPU_NODE_REF = env_text(
    "MULTIGPU_NODE_REF", "a38cbda5fb64232bfa67867d55ae473d2c44d54e",  # v2.6.3 (pyproject), 2026-03-21
    valid=lambda text: _GIT_REF_RE.fullmatch(text) and not text.startswith("-"),
    expected="use a commit, tag or branch of MULTIGPU_NODE_URL, e.g. a38cbda5fb64232bfa67867d55ae473d2c44d54e.")
# The hub's own origin as browsers see it: what clusters' members allow in --enable-cors-header. Empty: the first of
# CSRF_TRUSTED_ORIGINS, else http://COMFYHUB_BIND.
HUB_ORIGIN = env_text(
    "HUB_ORIGIN", valid=lambda text: re.fullmatch(r"https?://[A-Za-z0-9.-]+(:\d{1,5})?|https?://\[[0-9a-fA-F:.]+\](:\d{1,5})?", text),
    expected="use the scheme, host and port browsers open the hub at, without a path, e.g. "
             "https://comfyhub.example.org.") or (CSRF_TRUSTED_ORIGINS[0] if CSRF_TRUSTED_ORIGINS else (
    f"http://{SERVE_BIND}" if not SERVE_BIND.startswith("unix:") else "http://localhost"))

# --- Access through the hub (/i/<id>/: docker/nginx, instances/access.py, docs/access.md) ---------------------------
# How long nginx may reuse the hub's answer for one session (or token) and one instance; revoking access takes
# effect within this time. 0: ask the hub on every request.
ACCESS_CACHE_SECONDS = env_int("ACCESS_CACHE_SECONDS", 5, "seconds nginx reuses an access decision", minimum=0,
                               maximum=300)
# Opens are recorded once per person, instance and way in (browser or token) per this many minutes.
ACCESS_OPEN_RECORD_MINUTES = env_int("ACCESS_OPEN_RECORD_MINUTES", 10, "minutes between two recorded opens of an "
                                     "instance by the same person", minimum=1)
# Largest request body (an upload) nginx passes to an instance, in megabytes.
PROXY_MAX_UPLOAD_MB = env_int("PROXY_MAX_UPLOAD_MB", 1024, "largest upload through the hub, in megabytes",
                              minimum=1)
# Self-service: what a user with "create own instances" may hold.
SELF_SERVICE_MAX_INSTANCES = env_int("SELF_SERVICE_MAX_INSTANCES", 2, "instances a self-service user may own",
                                     minimum=0)
SELF_SERVICE_MAX_GPUS = env_int("SELF_SERVICE_MAX_GPUS", 1, "GPUs a self-service user's instances may hold in all",
                                minimum=0)
# Idle stop: the minutes offered when someone turns it on for an instance (it is off until they do).
IDLE_STOP_AFTER_DEFAULT = env_int("IDLE_STOP_AFTER_DEFAULT", 60, "minutes of idleness offered for idle stop",
                                  minimum=1)
IDLE_CHECK_INTERVAL = env_int("IDLE_CHECK_INTERVAL", 60, "seconds between idle-stop checks", minimum=5)

# --- Nodes: GPU hosts, each with a node agent (`manage.py agent`, instances/agent.py) -----------------------------
# The node this host's agent serves when `agent` is given no --node ("local" is served by the hub's own workers).
NODE_NAME = env_text(
    "NODE_NAME", "local", valid=lambda text: re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", text),
    expected="use lowercase letters a-z, digits and '-', starting and ending with a letter or digit, at most 63 "
             "characters (the name of this host's node), e.g. gpu-2.")
# The address instance ports on this node bind on, and where the hub and other nodes reach them.
NODE_ADDRESS = env_text("NODE_ADDRESS", "127.0.0.1", valid=lambda text: _ip_address(text),
                        expected="use an IPv4 or IPv6 address, no host name or port (where this node's instances "
                                 "are reached), e.g. 10.0.0.12.")
# A node agent reports this often; a node silent for three of these is shown offline.
NODE_HEARTBEAT_SECONDS = env_int("NODE_HEARTBEAT_SECONDS", 15, "seconds between a node agent's heartbeats",
                                 minimum=1)

# --- Operations ----------------------------------------------------------------------------------------------
# A running operation's runner writes a heartbeat this often; one silent for longer than the timeout is failed
# by the periodic sweep ("the worker died").
OPERATION_HEARTBEAT_SECONDS = env_float("OPERATION_HEARTBEAT_SECONDS", 5.0,
                                        "seconds between a running operation's heartbeats", above=0)
OPERATION_HEARTBEAT_TIMEOUT = env_float(
    "OPERATION_HEARTBEAT_TIMEOUT", 45.0, "seconds without a heartbeat before the sweep fails an operation; more "
    "than OPERATION_HEARTBEAT_SECONDS", above=OPERATION_HEARTBEAT_SECONDS)
OPERATION_SWEEP_INTERVAL = env_int("OPERATION_SWEEP_INTERVAL", 30, "seconds between sweeps", minimum=1)
OPERATION_LOG_MAX_LINES = env_int("OPERATION_LOG_MAX_LINES", 5000, "log lines kept per operation", minimum=1)

# --- Storage (the directory contract: storage_app/layout.py, docs/runtime-contract.md) ------------------------------
COMFY_SHARED_PATH = env_folder("COMFY_SHARED_PATH", "./storage/shared", "models and inputs every instance reads")
COMFY_INSTANCES_PATH = env_folder("COMFY_INSTANCES_PATH", "./storage/instances", "one folder per instance")
COMFY_BACKUPS_PATH = env_folder("COMFY_BACKUPS_PATH", "./storage/backups", "snapshots and archives")
# A node's model cache on fast local disk (issue #14): instances read cached model files from here before the shared
# library. Empty: no cache. MODEL_CACHE_MAX_GB bounds it; the least recently used files go first.
_model_cache = env_text("MODEL_CACHE_PATH", "", valid=lambda text: _may_be_folder(text),
                        expected="use the path of a folder on this node's fast disk (or leave it empty for no cache), "
                                 "e.g. /mnt/nvme/comfyhub-cache.")
MODEL_CACHE_PATH = project_path(_model_cache) if _model_cache else None
MODEL_CACHE_MAX_GB = env_int("MODEL_CACHE_MAX_GB", 200, "gigabytes the model cache may hold", minimum=1)
COMFY_INSTANCE_ID = env_text(
    "COMFY_INSTANCE_ID", "comfy", valid=lambda text: _instance_id_problem(text) is None,
    expected="use lowercase letters a-z, digits and '-', starting and ending with a letter or digit, at most 63 "
             "characters, not a folder name the storage layout reserves (shared, models, ...), e.g. comfy.")
# The image grammar itself is checked where an image is used (instances/runtime.py); this catches typos early.
# The default is the tag `manage.py images build` makes (docker/comfyui, docs/images.md).
COMFY_IMAGE = env_text("COMFY_IMAGE", "comfyhub/comfyui:latest", valid=_IMAGE_RE.fullmatch,
                       expected="use a Docker image reference (the image new instances run), e.g. "
                                "comfyhub/comfyui:latest.")
# What the dashboard says building ComfyHub's image takes ("Build it (about N GB)"): its size with PyPI's torch.
IMAGE_BUILD_SIZE_HINT_GB = env_int("IMAGE_BUILD_SIZE_HINT_GB", 7, "gigabytes the dashboard says a built image takes",
                                   minimum=1, maximum=1000)
# An image build may run this long without printing anything (pip installing torch is silent for minutes).
IMAGE_BUILD_TIMEOUT = env_int("IMAGE_BUILD_TIMEOUT", 3600, "seconds an image build may go without any output",
                              minimum=30)


def env_owner_id(name: str, kind: str) -> int:
    """PUID/PGID: the uid or gid instance containers run as and instance files belong to. Never 0: a container
    running as root could write anything on its mounts as root, and ComfyUI does not need it."""
    text = env_text(name)
    if text.isascii() and text.isdigit() and int(text) == 0:
        raise invalid(name, text, f"instance containers never run as root ({kind} 0); use the {kind} that should "
                                  "own the instance files, e.g. 1000.")
    return env_int(name, 1000, f"the {kind} instance containers run as and instance files are owned by",
                   minimum=1, maximum=4294967294)


PUID = env_owner_id("PUID", "uid")
PGID = env_owner_id("PGID", "gid")

# --- Instances -----------------------------------------------------------------------------------------------
# A fresh install registers the single-instance user's instance (COMFY_INSTANCE_ID on port 8188).
COMFY_DEFAULT_INSTANCE = env_bool("COMFY_DEFAULT_INSTANCE", True, "a fresh install registers COMFY_INSTANCE_ID")
# How GPUs are found: "auto" (NVML when a driver answers, else COMFY_GPUS), "nvml" (only NVML) or "settings".
COMFY_GPU_DISCOVERY = env_choice("COMFY_GPU_DISCOVERY", "auto", ("auto", "nvml", "settings"), "how GPUs are found")
# GPUs when NVML finds no driver: "0,1" (indexes), "none", or empty for "none".
COMFY_GPUS = env_text("COMFY_GPUS", valid=lambda text: re.fullmatch(r"(?i:none)|\d+(\s*,\s*\d+)*", text),
                      expected="use GPU indexes, comma-separated, or none (the GPUs of a host without an NVIDIA "
                               "driver to ask), e.g. 0,1.")
# Host ports instances get when none is given.
INSTANCE_PORT_RANGE = env_text(
    "INSTANCE_PORT_RANGE", "8188-8387", valid=lambda text: _port_range(text) is not None,
    expected="use FIRST-LAST, two ports from 1024 to 65535 with FIRST no higher than LAST (the host ports new "
             "instances get), e.g. 8188-8387.")
# Docker restarts a crashing container this many times (backing off), then ComfyHub marks it crash-looping.
INSTANCE_MAX_RESTARTS = env_int("INSTANCE_MAX_RESTARTS", 5, "Docker's restarts of a crashing container",
                                minimum=0)
INSTANCE_SHM_SIZE = env_text(
    "INSTANCE_SHM_SIZE", "2g", valid=lambda text: re.fullmatch(r"0*[1-9][0-9]*(?:[bkmgBKMG][bB]?)?", text),
    expected="use a size above 0 in bytes or with a unit b, k, m or g (the /dev/shm of each container), e.g. 2g.")
# How long a start waits for ComfyUI to answer /system_stats before calling it unhealthy.
INSTANCE_START_TIMEOUT = env_int("INSTANCE_START_TIMEOUT", 300, "seconds a start waits for ComfyUI to answer",
                                 minimum=1)
# How often the reconcile/health pass runs (seconds).
INSTANCE_HEALTH_INTERVAL = env_int("INSTANCE_HEALTH_INTERVAL", 30, "seconds between health checks", minimum=1)
INSTANCE_HEALTH_TIMEOUT = env_float("INSTANCE_HEALTH_TIMEOUT", 3.0, "seconds a health check waits for ComfyUI",
                                    above=0)
# Extra labels on every container ComfyHub creates, e.g. "team=vision,env=prod".
CONTAINER_EXTRA_LABELS = dict(label.split("=", 1) for label in env_list(
    "CONTAINER_EXTRA_LABELS", [], valid=lambda label: re.fullmatch(r"[^\s=]+=.*", label),
    expected="use KEY=VALUE pairs, comma-separated (labels on every container ComfyHub creates), e.g. "
             "team=vision,env=prod."))

# Containers are named <prefix><instance id>. Two ComfyHubs (or test sessions) sharing one engine need different ones.
CONTAINER_NAME_PREFIX = env_text(
    "CONTAINER_NAME_PREFIX", "comfyhub-", valid=lambda text: re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,60}", text),
    expected="use letters, digits, '_', '.' and '-', starting with a letter or digit, at most 61 characters, e.g. "
             "comfyhub-.")

# --- Security: instance folders are hostile (docs/security.md) -------------------------------------------------
# Images an instance may run: shell-style patterns matched against the whole reference. Default: the repository
# of COMFY_IMAGE, any tag or digest.
_image_repository = re.sub(r"(@.*|:[^/:]*)$", "", COMFY_IMAGE)
INSTANCE_IMAGES_ALLOWED = env_list(
    "INSTANCE_IMAGES_ALLOWED", [_image_repository, f"{_image_repository}:*", f"{_image_repository}@*"],
    valid=lambda pattern: not any(c.isspace() for c in pattern),
    expected="use shell-style patterns without spaces, comma-separated (the images instances may run), e.g. "
             "ghcr.io/comfyhub/comfyui:*.")
if not any(fnmatch.fnmatchcase(COMFY_IMAGE, pattern) for pattern in INSTANCE_IMAGES_ALLOWED):
    raise invalid("INSTANCE_IMAGES_ALLOWED", ",".join(INSTANCE_IMAGES_ALLOWED),
                  f"does not allow COMFY_IMAGE={COMFY_IMAGE!r}; add a pattern for it, e.g. {_image_repository}:*, "
                  "or change COMFY_IMAGE.")
# Custom nodes from file:// URLs or local paths (a way to read host folders into an instance): off unless set.
CUSTOM_NODE_LOCAL_SOURCES = env_bool("CUSTOM_NODE_LOCAL_SOURCES", False,
                                     "allow custom nodes from file:// URLs and host paths")
# The image git runs in (clone, fetch, checkout, status) for custom nodes; empty: the instance's own image.
CUSTOM_NODE_GIT_IMAGE = env_text(
    "CUSTOM_NODE_GIT_IMAGE", valid=_IMAGE_RE.fullmatch,
    expected="use a Docker image reference with git in it, or leave it empty for the instance's own image, e.g. "
             "alpine/git:latest.")
# Where pip finds custom nodes' requirements (in a throw-away container of the instance's image). The index: empty
# for pip's own (or the image's pip configuration), "none" for NODE_PIP_FIND_LINKS alone (offline hosts).
NODE_PIP_INDEX_URL = "none" if env_text("NODE_PIP_INDEX_URL").casefold() == "none" else env_url(
    "NODE_PIP_INDEX_URL", "", ("https", "http"), "https://pypi.org/simple",
    "the package index custom nodes' requirements come from, or none for NODE_PIP_FIND_LINKS alone")


def env_existing_path(name: str, kind: str, meaning: str, example: str) -> Path | None:
    """A folder ("folder") or file ("file") that exists on this host, or None when unset."""
    text = env_text(name)
    if not text:
        return None
    path = project_path(text)
    if not (path.is_dir() if kind == "folder" else path.is_file()):
        raise invalid(name, text, f"{path} is not a {kind} on this host; use an existing {kind} ({meaning}), or "
                                  f"leave it empty, e.g. {example}.")
    return path


# A folder of wheels on this host, mounted read-only into pip's container and searched too (--find-links).
NODE_PIP_FIND_LINKS = env_existing_path("NODE_PIP_FIND_LINKS", "folder", "wheels for custom nodes' requirements",
                                        "/srv/wheels")
# A PEM file of the certificate authorities pip trusts instead of its own, e.g. a TLS-inspecting proxy's.
NODE_PIP_CA_BUNDLE = env_existing_path("NODE_PIP_CA_BUNDLE", "file", "the certificate authorities pip trusts "
                                       "when installing custom nodes' requirements", "/etc/ssl/certs/proxy-ca.pem")
# A restore stops before unpacking more than this many times the archive's size, and never past the free space
# of the instances' filesystem minus this margin.
RESTORE_MAX_UNPACKED_RATIO = env_float("RESTORE_MAX_UNPACKED_RATIO", 4.0,
                                       "how many times its archive's size a restore may unpack", above=0)
RESTORE_FREE_SPACE_MARGIN_MB = env_int("RESTORE_FREE_SPACE_MARGIN_MB", 1024,
                                       "megabytes a restore leaves free on the instances' filesystem", minimum=0)
# Folders legacy migration may read from (comma-separated). Empty: any folder outside the storage roots.
LEGACY_SOURCE_ROOTS = [project_path(path) for path in env_list(
    "LEGACY_SOURCE_ROOTS", [], valid=_may_be_folder,
    expected="use folders, comma-separated (where legacy migration may read from), e.g. /srv/comfyui-old.")]
# Uploaded JSON (workflows, ComfyUI-Manager snapshots, template settings): largest size and deepest nesting taken.
UPLOAD_MAX_BYTES = env_int("UPLOAD_MAX_BYTES", 32 * 1024 * 1024, "largest JSON upload taken, in bytes",
                           minimum=1024)
UPLOAD_MAX_DEPTH = env_int("UPLOAD_MAX_DEPTH", 64, "deepest nesting of JSON taken", minimum=2, maximum=500)

# --- Model library ---------------------------------------------------------------------------------------------
# Also compute BLAKE3 (CivitAI's other hash) in the same pass as SHA-256.
MODEL_HASH_BLAKE3 = env_bool("MODEL_HASH_BLAKE3", False, "also compute BLAKE3 when hashing models")
# Files hashed at once; 0 means one per CPU core.
MODEL_HASH_WORKERS = env_int("MODEL_HASH_WORKERS", 0, "files hashed at once; 0 for one per CPU core", minimum=0)
# When the scheduled full re-verification runs (cron syntax, UTC; set but empty disables it). Default: Sundays 03:00.
MODEL_FULL_VERIFY_CRON = env_text(
    "MODEL_FULL_VERIFY_CRON", "0 3 * * 0", empty="", valid=croniter.is_valid,
    expected="use five cron fields, MINUTE HOUR DAY MONTH WEEKDAY (when the full re-verification runs), or set it "
             "empty to never run it, e.g. 0 3 * * 0.")

# --- Docker engine -------------------------------------------------------------------------------------------
# DOCKER_HOST is the Docker SDK's own variable; empty means the local socket.
DOCKER_HOST = env_url("DOCKER_HOST", "", ("unix", "tcp", "ssh", "http", "https", "npipe"), "tcp://docker-host:2376",
                      "the Docker engine; empty for the local socket")
DOCKER_TIMEOUT = env_float("DOCKER_TIMEOUT", 30.0, "seconds a Docker engine call may take", above=0)
DOCKER_PING_TIMEOUT = env_float("DOCKER_PING_TIMEOUT", 2.0, "seconds a ping of the Docker engine may take", above=0)
# Engine status shown on every page is cached this long per process.
DOCKER_STATUS_CACHE_SECONDS = env_float("DOCKER_STATUS_CACHE_SECONDS", 10.0,
                                        "seconds each process caches the engine's status", minimum=0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_choice(
        "LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), "the least severe messages logged")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
