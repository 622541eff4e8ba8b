"""ComfyHub's one settings module: every knob comes from the environment (or `.env`).

Defaults let a fresh checkout run (SQLite and a local Redis under `var/`); `.env.example` documents each variable.
"""
import fnmatch
import re
from pathlib import Path

import environ
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


def _secret_key() -> str:
    key = env.str("SECRET_KEY", default="")
    key_file = env.str("SECRET_KEY_FILE", default="")
    if not key and key_file:
        try:
            key = project_path(key_file).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"SECRET_KEY_FILE={key_file} cannot be read: {exc.strerror}.") from exc
    return key


DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = _secret_key()
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY is not set. Set SECRET_KEY (or SECRET_KEY_FILE) in the environment or in .env, e.g. "
            "SECRET_KEY=$(python3 -c 'import secrets; print(secrets.token_urlsafe(50))'). "
            "`make run` creates one for you in var/secret_key."
        )
    SECRET_KEY = "django-insecure-development-only-key-do-not-use-in-production"

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# Data that belongs to ComfyHub itself: SQLite database, local Redis, collected static files, logs.
DATA_DIR = project_path(env.str("COMFYHUB_DATA_DIR", default="var"))

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

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'comfyhub.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Workers and the web server write concurrently: wait for locks instead of failing at once.
    options = DATABASES["default"].setdefault("OPTIONS", {})
    options.update({"timeout": 20, "transaction_mode": "IMMEDIATE"})
    # WAL: readers never wait for the writer, and a commit costs no fsync of the whole journal. A power loss can
    # lose the last commits but never corrupts the file. (Not for network filesystems.)
    options.setdefault("init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;")
if env.str("TEST_DATABASE_NAME", default=""):
    # Tests whose RQ workers run in other processes need the test database in a file, not in memory.
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
TIME_ZONE = env.str("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "static"
STATICFILES_DIRS = [BASE_DIR / "static"]
# Hashed, compressed static files (served by WhiteNoise) unless DEBUG; tests' live server needs plain names.
STATIC_MANIFEST = env.bool("STATIC_MANIFEST", default=not DEBUG)
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
HTTPS = env.bool("HTTPS", default=False)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=HTTPS)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=HTTPS)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=HTTPS)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=31536000 if HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=HTTPS)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=HTTPS)
if env.bool("SECURE_PROXY_SSL_HEADER", default=False):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True

# --- Redis and RQ --------------------------------------------------------------------------------------------
# Unset means "the local Redis that `make run` starts on a unix socket under var/".
REDIS_URL = env.str("REDIS_URL", default=f"unix://{DATA_DIR / 'redis.sock'}?db=0")
_redis_queue = {
    "URL": REDIS_URL,
    # A dead Redis must not hang page renders: fail fast on connect.
    "CONNECTION_KWARGS": {"socket_connect_timeout": env.float("REDIS_CONNECT_TIMEOUT", default=2.0)},
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

# --- Operations ----------------------------------------------------------------------------------------------
# A running operation's runner writes a heartbeat this often; one silent for longer than the timeout is failed
# by the periodic sweep ("the worker died").
OPERATION_HEARTBEAT_SECONDS = env.float("OPERATION_HEARTBEAT_SECONDS", default=5.0)
OPERATION_HEARTBEAT_TIMEOUT = env.float("OPERATION_HEARTBEAT_TIMEOUT", default=45.0)
OPERATION_SWEEP_INTERVAL = env.int("OPERATION_SWEEP_INTERVAL", default=30)
OPERATION_LOG_MAX_LINES = env.int("OPERATION_LOG_MAX_LINES", default=5000)

# --- Storage (the contract of ../shared/MULTI_INSTANCE_PLAN.md) --------------------------------------------------
COMFY_SHARED_PATH = project_path(env.str("COMFY_SHARED_PATH", default="./storage/shared"))
COMFY_INSTANCES_PATH = project_path(env.str("COMFY_INSTANCES_PATH", default="./storage/instances"))
COMFY_BACKUPS_PATH = project_path(env.str("COMFY_BACKUPS_PATH", default="./storage/backups"))
COMFY_INSTANCE_ID = env.str("COMFY_INSTANCE_ID", default="comfy")
COMFY_IMAGE = env.str("COMFY_IMAGE", default="ghcr.io/comfyhub/comfyui:latest")
PUID = env.int("PUID", default=1000)
PGID = env.int("PGID", default=1000)

# --- Instances -----------------------------------------------------------------------------------------------
# A fresh install registers the single-instance user's instance (COMFY_INSTANCE_ID on port 8188).
COMFY_DEFAULT_INSTANCE = env.bool("COMFY_DEFAULT_INSTANCE", default=True)
# How GPUs are found: "auto" (NVML when a driver answers, else COMFY_GPUS), "nvml" (only NVML) or "settings".
COMFY_GPU_DISCOVERY = env.str("COMFY_GPU_DISCOVERY", default="auto")
if COMFY_GPU_DISCOVERY not in ("auto", "nvml", "settings"):
    raise ImproperlyConfigured(f"COMFY_GPU_DISCOVERY={COMFY_GPU_DISCOVERY!r}: use auto, nvml or settings.")
# GPUs when NVML finds no driver: "0,1" (indexes), "none", or empty for "none".
COMFY_GPUS = env.str("COMFY_GPUS", default="")
# Host ports instances get when none is given.
INSTANCE_PORT_RANGE = env.str("INSTANCE_PORT_RANGE", default="8188-8387")
# Docker restarts a crashing container this many times (backing off), then ComfyHub marks it crash-looping.
INSTANCE_MAX_RESTARTS = env.int("INSTANCE_MAX_RESTARTS", default=5)
INSTANCE_SHM_SIZE = env.str("INSTANCE_SHM_SIZE", default="2g")
# How long a start waits for ComfyUI to answer /system_stats before calling it unhealthy.
INSTANCE_START_TIMEOUT = env.int("INSTANCE_START_TIMEOUT", default=300)
# How often the reconcile/health pass runs (seconds).
INSTANCE_HEALTH_INTERVAL = env.int("INSTANCE_HEALTH_INTERVAL", default=30)
INSTANCE_HEALTH_TIMEOUT = env.float("INSTANCE_HEALTH_TIMEOUT", default=3.0)
# Extra labels on every container ComfyHub creates, e.g. "team=vision,env=prod".
CONTAINER_EXTRA_LABELS = env.dict("CONTAINER_EXTRA_LABELS", default={})

# Containers are named <prefix><instance id>. Two ComfyHubs (or test sessions) sharing one engine need different ones.
CONTAINER_NAME_PREFIX = env.str("CONTAINER_NAME_PREFIX", default="comfyhub-")
if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,60}", CONTAINER_NAME_PREFIX):
    raise ImproperlyConfigured(f"CONTAINER_NAME_PREFIX={CONTAINER_NAME_PREFIX!r}: use letters, digits, '_', '.' and '-'.")

# --- Security: instance folders are hostile (docs/security.md) -------------------------------------------------
# Images an instance may run: shell-style patterns matched against the whole reference. Default: the repository
# of COMFY_IMAGE, any tag or digest.
_image_repository = re.sub(r"(@.*|:[^/:]*)$", "", COMFY_IMAGE)
INSTANCE_IMAGES_ALLOWED = [pattern for pattern in env.list("INSTANCE_IMAGES_ALLOWED", default=[]) if pattern] or [
    _image_repository, f"{_image_repository}:*", f"{_image_repository}@*"]
if not any(fnmatch.fnmatchcase(COMFY_IMAGE, pattern) for pattern in INSTANCE_IMAGES_ALLOWED):
    raise ImproperlyConfigured(
        f"INSTANCE_IMAGES_ALLOWED ({','.join(INSTANCE_IMAGES_ALLOWED)}) does not allow COMFY_IMAGE={COMFY_IMAGE}: "
        "add a pattern for it, or change COMFY_IMAGE.")
# Custom nodes from file:// URLs or local paths (a way to read host folders into an instance): off unless set.
CUSTOM_NODE_LOCAL_SOURCES = env.bool("CUSTOM_NODE_LOCAL_SOURCES", default=False)
# The image git runs in (clone, fetch, checkout, status) for custom nodes; empty: the instance's own image.
CUSTOM_NODE_GIT_IMAGE = env.str("CUSTOM_NODE_GIT_IMAGE", default="")
# A restore stops before unpacking more than this many times the archive's size, and never past the free space
# of the instances' filesystem minus this margin.
RESTORE_MAX_UNPACKED_RATIO = env.float("RESTORE_MAX_UNPACKED_RATIO", default=4.0)
RESTORE_FREE_SPACE_MARGIN_MB = env.int("RESTORE_FREE_SPACE_MARGIN_MB", default=1024)
if RESTORE_MAX_UNPACKED_RATIO <= 0 or RESTORE_FREE_SPACE_MARGIN_MB < 0:
    raise ImproperlyConfigured(
        "RESTORE_MAX_UNPACKED_RATIO must be above 0 and RESTORE_FREE_SPACE_MARGIN_MB 0 or more.")
# Folders legacy migration may read from (comma-separated). Empty: any folder outside the storage roots.
LEGACY_SOURCE_ROOTS = [project_path(path) for path in env.list("LEGACY_SOURCE_ROOTS", default=[])]
# Uploaded JSON (workflows, ComfyUI-Manager snapshots, template settings): largest size and deepest nesting taken.
UPLOAD_MAX_BYTES = env.int("UPLOAD_MAX_BYTES", default=32 * 1024 * 1024)
UPLOAD_MAX_DEPTH = env.int("UPLOAD_MAX_DEPTH", default=64)
if UPLOAD_MAX_BYTES < 1024 or not 2 <= UPLOAD_MAX_DEPTH <= 500:
    raise ImproperlyConfigured("UPLOAD_MAX_BYTES must be 1024 or more and UPLOAD_MAX_DEPTH between 2 and 500.")

# --- Model library ---------------------------------------------------------------------------------------------
# Also compute BLAKE3 (CivitAI's other hash) in the same pass as SHA-256.
MODEL_HASH_BLAKE3 = env.bool("MODEL_HASH_BLAKE3", default=False)
# Files hashed at once; 0 means one per CPU core.
MODEL_HASH_WORKERS = env.int("MODEL_HASH_WORKERS", default=0)
# When the scheduled full re-verification runs (cron syntax; empty disables it). Default: Sundays 03:00.
MODEL_FULL_VERIFY_CRON = env.str("MODEL_FULL_VERIFY_CRON", default="0 3 * * 0")

# --- Docker engine -------------------------------------------------------------------------------------------
# DOCKER_HOST is the Docker SDK's own variable; empty means the local socket.
DOCKER_HOST = env.str("DOCKER_HOST", default="")
DOCKER_TIMEOUT = env.float("DOCKER_TIMEOUT", default=30.0)
DOCKER_PING_TIMEOUT = env.float("DOCKER_PING_TIMEOUT", default=2.0)
# Engine status shown on every page is cached this long per process.
DOCKER_STATUS_CACHE_SECONDS = env.float("DOCKER_STATUS_CACHE_SECONDS", default=10.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
