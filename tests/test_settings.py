"""The one settings module: strict, environment-driven, with defaults that let a fresh checkout run."""
import ast
import concurrent.futures
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

PRODUCTION = {
    "DEBUG": "false",
    "SECRET_KEY": "k3#Gq9!vT2@xLp8$Wm5^Zr7&Nc4*Hb6(Jd1)Fs0_Ye-Ua+Io=Ke[Ph]Qt{Rv}Sw",
    "ALLOWED_HOSTS": "comfyhub.example.org",
    "CSRF_TRUSTED_ORIGINS": "https://comfyhub.example.org",
    "HTTPS": "true",
}


# Variables the test session itself sets that a real deployment would not have.
SESSION_ONLY = ("SECRET_KEY", "DEBUG", "SECRET_KEY_FILE", "DJANGO_ALLOW_ASYNC_UNSAFE")


def run_python(code, env, unset=()):
    return run([sys.executable, "-c", code], env, unset)


def manage(*args, env, unset=()):
    return run([sys.executable, "manage.py", *args], env, unset)


def run(command, env, unset=()):
    clean = {k: v for k, v in os.environ.items() if k not in SESSION_ONLY and k not in unset}
    return subprocess.run(command, cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=120)


def test_it_refuses_to_start_without_a_secret_key_when_debug_is_off():
    result = manage("check", env={"DEBUG": "false"})
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr
    assert "SECRET_KEY_FILE" in result.stderr  # says how to fix it


def test_it_reads_the_secret_key_from_a_file(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file-" + "z" * 50 + "\n")
    result = run_python(
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'comfyhub.settings'); django.setup();"
        "from django.conf import settings; print(settings.SECRET_KEY)",
        env={"SECRET_KEY_FILE": str(key_file)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from-a-file-" + "z" * 50


def test_a_missing_secret_key_file_is_a_clear_error(tmp_path):
    result = manage("check", env={"SECRET_KEY_FILE": str(tmp_path / "absent")})
    assert result.returncode != 0
    assert f"SECRET_KEY_FILE={str(tmp_path / 'absent')!r}: cannot be read (No such file or directory)" in result.stderr


def test_relative_storage_paths_resolve_against_the_project_root_and_are_stored_absolute():
    result = run_python(
        "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'comfyhub.settings'); django.setup();"
        "from django.conf import settings as s;"
        "print(s.COMFY_SHARED_PATH); print(s.COMFY_INSTANCES_PATH); print(s.COMFY_BACKUPS_PATH); print(s.DATA_DIR)",
        env={**PRODUCTION, "COMFY_SHARED_PATH": "./somewhere/shared", "COMFY_INSTANCES_PATH": "rel/instances",
             "COMFY_BACKUPS_PATH": "/abs/backups", "COMFYHUB_DATA_DIR": "var-x"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(REPO / "somewhere" / "shared"), str(REPO / "rel" / "instances"), "/abs/backups", str(REPO / "var-x"),
    ]


def test_the_defaults_follow_the_plan():
    env = {k: v for k, v in PRODUCTION.items()}
    result = run_python(
        "import os\n"
        "for k in ('COMFY_SHARED_PATH','COMFY_INSTANCES_PATH','COMFY_BACKUPS_PATH','COMFYHUB_DATA_DIR','DATABASE_URL',"
        "'REDIS_URL','COMFY_INSTANCE_ID'): os.environ.pop(k, None)\n"
        "import django; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'comfyhub.settings'); django.setup()\n"
        "from django.conf import settings as s\n"
        "print(s.COMFY_SHARED_PATH, s.COMFY_INSTANCES_PATH, s.COMFY_BACKUPS_PATH, s.COMFY_INSTANCE_ID,"
        " s.DATABASES['default']['NAME'], s.REDIS_URL)",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        str(REPO / "storage" / "shared"), str(REPO / "storage" / "instances"), str(REPO / "storage" / "backups"),
        "comfy", str(REPO / "var" / "comfyhub.sqlite3"), f"unix://{REPO / 'var' / 'redis.sock'}?db=0",
    ]


def variables_read_by(path):
    """Every environment variable a module reads: the upper-case name given to env.*(), an env_*() helper or
    os.environ, found in its source, so a variable added without a case below fails the test."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and "env" in ast.unparse(node.func).lower() and node.args:
            first = node.args[0]
        elif isinstance(node, ast.Subscript) and "environ" in ast.unparse(node.value):
            first = node.slice
        else:
            continue
        if isinstance(first, ast.Constant) and isinstance(first.value, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+",
                                                                                                first.value):
            names.add(first.value)
    return names


SETTINGS_VARIABLES = variables_read_by(REPO / "comfyhub" / "settings.py")
# A value each variable must refuse; None: the variable unset (with DEBUG off, for SECRET_KEY). Relative paths
# resolve against the project folder, where manage.py, README.md and Makefile are files, not folders.
BAD_VALUES = {
    "DEBUG": ["maybe"],
    "SECRET_KEY": [None],
    "SECRET_KEY_FILE": ["no-such-key-file"],
    "ALLOWED_HOSTS": ["https://comfyhub.example.org", "comfyhub.example.org:8000"],
    "CSRF_TRUSTED_ORIGINS": ["comfyhub.example.org", "https://comfyhub.example.org/login"],
    "COMFYHUB_DATA_DIR": ["manage.py"],
    "DATABASE_URL": ["var/comfyhub.sqlite3", "mongodb://db-host/comfyhub"],
    "TIME_ZONE": ["Mars/Olympus_Mons", "../etc/passwd"],
    "STATIC_MANIFEST": ["sometimes"],
    "HTTPS": ["enabled"],
    "SECURE_SSL_REDIRECT": ["2"],
    "SESSION_COOKIE_SECURE": ["secure"],
    "CSRF_COOKIE_SECURE": ["always"],
    "SECURE_HSTS_SECONDS": ["-1", "one year"],
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": ["all"],
    "SECURE_HSTS_PRELOAD": ["please"],
    "SECURE_PROXY_SSL_HEADER": ["X-Forwarded-Proto"],
    "REDIS_URL": ["127.0.0.1:6379", "http://127.0.0.1:6379"],
    "REDIS_CONNECT_TIMEOUT": ["0", "2s"],
    "OPERATION_HEARTBEAT_SECONDS": ["fast", "0"],
    "OPERATION_HEARTBEAT_TIMEOUT": ["3", "inf"],
    "OPERATION_SWEEP_INTERVAL": ["0", "30.5"],
    "OPERATION_LOG_MAX_LINES": ["1e3", "0"],
    "COMFY_SHARED_PATH": ["manage.py"],
    "COMFY_INSTANCES_PATH": ["README.md"],
    "COMFY_BACKUPS_PATH": ["Makefile"],
    "COMFY_INSTANCE_ID": ["My Instance", "shared", "-comfy"],
    "COMFY_IMAGE": ["comfy ui", ":latest"],
    "IMAGE_BUILD_SIZE_HINT_GB": ["0", "7GB"],
    "IMAGE_BUILD_TIMEOUT": ["10", "1h"],
    "PUID": ["abc", "-1", "4294967295", "0"],
    "PGID": ["1000.5", "0"],
    "COMFY_DEFAULT_INSTANCE": ["perhaps"],
    "COMFY_GPU_DISCOVERY": ["cuda"],
    "COMFY_GPUS": ["all", "0;1", "gpu0"],
    "INSTANCE_PORT_RANGE": ["abc", "8387-8188", "80-90", "8188-70000", "8188:8387"],
    "INSTANCE_MAX_RESTARTS": ["-1", "many"],
    "INSTANCE_SHM_SIZE": ["lots", "0", "2t", "-2g"],
    "INSTANCE_START_TIMEOUT": ["5m", "0"],
    "INSTANCE_HEALTH_INTERVAL": ["0"],
    "INSTANCE_HEALTH_TIMEOUT": ["nan", "-3"],
    "CONTAINER_EXTRA_LABELS": ["team", "team=vision,=prod"],
    "CONTAINER_NAME_PREFIX": ["-comfyhub", "comfy hub-", "x" * 62],
    "INSTANCE_IMAGES_ALLOWED": ["registry.example.org/*", "ghcr.io/comfyhub/comfyui:*,my image:*"],
    "CUSTOM_NODE_LOCAL_SOURCES": ["sure"],
    "CUSTOM_NODE_GIT_IMAGE": ["alpine git"],
    "NODE_PIP_INDEX_URL": ["pypi.org/simple", "ftp://mirror.example.org/simple"],
    "NODE_PIP_FIND_LINKS": ["manage.py", "no-such-wheels-folder"],
    "NODE_PIP_CA_BUNDLE": ["docs", "no-such-ca.pem"],
    "RESTORE_MAX_UNPACKED_RATIO": ["0", "four"],
    "RESTORE_FREE_SPACE_MARGIN_MB": ["-1", "1GB"],
    "LEGACY_SOURCE_ROOTS": ["/srv/old-comfyui,manage.py"],
    "UPLOAD_MAX_BYTES": ["100", "32MB"],
    "UPLOAD_MAX_DEPTH": ["1", "1000"],
    "MODEL_HASH_BLAKE3": ["blake3"],
    "MODEL_HASH_WORKERS": ["-2", "auto"],
    "MODEL_FULL_VERIFY_CRON": ["weekly", "0 3 * *"],
    "DOCKER_HOST": ["docker.example.org:2376", "/var/run/docker.sock"],
    "DOCKER_TIMEOUT": ["-1", "30s"],
    "DOCKER_PING_TIMEOUT": ["soon"],
    "DOCKER_STATUS_CACHE_SECONDS": ["-10"],
    "LOG_LEVEL": ["VERBOSE"],
    "COMFYHUB_BIND": ["8000", "localhost", "::1:8000"],
    "COMFYHUB_WORKERS": ["0", "two"],
    "COMFYHUB_WEB_WORKERS": ["-1", "2.5"],
    "COMFYHUB_NGINX": ["sometimes"],
    "ACCESS_CACHE_SECONDS": ["-1", "5s", "301"],
    "ACCESS_OPEN_RECORD_MINUTES": ["0"],
    "PROXY_MAX_UPLOAD_MB": ["0", "1G"],
    "SELF_SERVICE_MAX_INSTANCES": ["-1", "few"],
    "SELF_SERVICE_MAX_GPUS": ["-1"],
    "IDLE_STOP_AFTER_DEFAULT": ["0", "1h"],
    "IDLE_CHECK_INTERVAL": ["1"],
    "NODE_NAME": ["Gpu 2", "-gpu", "gpu_2"],
    "NODE_ADDRESS": ["gpu-2.example.org", "300.1.1.1", "10.0.0.12:8188"],
    "DISTRIBUTED_NODE_URL": ["github.com/robertvoy/ComfyUI-Distributed", "https://github.com/a b"],
    "DISTRIBUTED_NODE_REF": ["--upload-pack=x", "main branch"],
    "MULTIGPU_NODE_URL": ["not a url"],
    "MULTIGPU_NODE_REF": ["-b", "v1;rm"],
    "HUB_ORIGIN": ["comfyhub.example.org", "https://comfyhub.example.org/", "https://hub/i/"],
    "NODE_HEARTBEAT_SECONDS": ["0", "15s"],
    "MODEL_CACHE_PATH": ["manage.py"],
    "MODEL_CACHE_MAX_GB": ["0", "1TB"],
}
# Read by the settings but set only by the test session, never by a deployment.
TEST_ONLY_VARIABLES = {"TEST_DATABASE_NAME"}


def test_every_variable_the_settings_read_has_a_bad_value_case():
    assert {"PUID", "HTTPS", "SECURE_HSTS_SECONDS", "DATABASE_URL", "LOG_LEVEL"} <= SETTINGS_VARIABLES  # found
    assert SETTINGS_VARIABLES - TEST_ONLY_VARIABLES == set(BAD_VALUES)


BAD_CASES = [(name, value) for name, values in BAD_VALUES.items() for value in values]


@pytest.fixture(scope="module")
def bad_value_results():
    """`manage.py check` with each bad value, run side by side: a process start each is most of the time."""
    def start(case):
        name, value = case
        env = {"DEBUG": "false"} if name == "SECRET_KEY" else {"DEBUG": "true", name: value}
        return manage("check", env=env, unset=[name] if value is None else [])

    with concurrent.futures.ThreadPoolExecutor(max_workers=2 * (os.cpu_count() or 1)) as pool:
        return dict(zip(BAD_CASES, pool.map(start, BAD_CASES)))


@pytest.mark.parametrize("name, value", BAD_CASES)
def test_a_bad_value_stops_the_start_with_a_message_naming_the_variable_and_what_to_write(name, value,
                                                                                           bad_value_results):
    result = bad_value_results[name, value]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    if value is None:
        assert message.startswith(f"ComfyHub cannot start: {name} is not set."), message
    else:
        assert message.startswith(f"ComfyHub cannot start: {name}={value!r}: "), message
    assert re.search(r"(use|Set|add) .*e\.g\. \S", message), message  # says what to write instead


def test_a_database_password_never_appears_in_the_message():
    result = manage("check", env={"DEBUG": "true", "DATABASE_URL": "mongodb://comfyhub:s3cret-pw@db-host/comfyhub"})
    assert "DATABASE_URL='mongodb://comfyhub:***@db-host/comfyhub': use a URL starting with sqlite://" in result.stderr
    assert "s3cret-pw" not in result.stderr


def test_good_values_are_read_as_what_they_mean():
    result = run_python(
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='comfyhub.settings'; django.setup();"
        "from django.conf import settings as s;"
        "print(repr((s.PUID, s.DEBUG, s.INSTANCE_PORT_RANGE, s.CONTAINER_EXTRA_LABELS, s.LOGGING['root']['level'],"
        " s.COMFY_GPU_DISCOVERY, s.ALLOWED_HOSTS, s.MODEL_FULL_VERIFY_CRON, s.OPERATION_HEARTBEAT_TIMEOUT,"
        " s.SECURE_HSTS_SECONDS)))",
        env={"DEBUG": " Yes ", "PUID": "1001", "INSTANCE_PORT_RANGE": "9000-9000", "LOG_LEVEL": "debug",
             "CONTAINER_EXTRA_LABELS": "team=vision, note=a=b,", "COMFY_GPU_DISCOVERY": "NVML",
             "ALLOWED_HOSTS": "comfyhub.example.org, .example.net,[::1]", "MODEL_FULL_VERIFY_CRON": "",
             "OPERATION_HEARTBEAT_SECONDS": "1", "OPERATION_HEARTBEAT_TIMEOUT": "2", "SECURE_HSTS_SECONDS": ""},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == repr((1001, True, "9000-9000", {"team": "vision", "note": "a=b"}, "DEBUG", "nvml",
                                          ["comfyhub.example.org", ".example.net", "[::1]"], "", 2.0, 0))


# --- .env.example ---------------------------------------------------------------------------------------------

ENV_EXAMPLE = REPO / ".env.example"
EXAMPLE_LINE = re.compile(r"^(# ?)?([A-Z][A-Z0-9_]+)=(.*)$")


def example_entries():
    """(name, value, commented out, the comment line above it) for every variable .env.example shows."""
    lines = ENV_EXAMPLE.read_text().splitlines()
    entries = []
    for number, line in enumerate(lines):
        match = EXAMPLE_LINE.match(line)
        if match:
            above = lines[number - 1] if number else ""
            entries.append((match[2], match[3], bool(match[1]), above))
    return entries


def test_env_example_lists_every_variable_the_settings_read():
    listed = {name for name, *_ in example_entries()}
    assert SETTINGS_VARIABLES - TEST_ONLY_VARIABLES - listed == set()


def test_env_example_lists_only_variables_comfyhub_reads():
    read = set().union(*(variables_read_by(path) for path in (REPO / "comfyhub").rglob("*.py")))
    assert {name for name, *_ in example_entries()} - read == set()


def test_every_variable_in_env_example_has_a_comment_line_above_it():
    uncommented = [name for name, _, _, above in example_entries()
                   if not (above.startswith("#") and not EXAMPLE_LINE.match(above))]
    assert uncommented == []


def test_the_values_env_example_shows_are_the_defaults():
    """Settings loaded with every value .env.example sets equal the settings loaded with none of them."""
    code = ("import django, json, os; os.environ['DJANGO_SETTINGS_MODULE']='comfyhub.settings'; django.setup();"
            "from django.conf import settings as s;"
            "print(json.dumps({k: repr(getattr(s, k)) for k in dir(s) if k.isupper()}))")
    unset = sorted(SETTINGS_VARIABLES)
    base = {"SECRET_KEY": "k" * 50}
    example = {name: value for name, value, commented, _ in example_entries()
               if not commented and name in SETTINGS_VARIABLES and name != "SECRET_KEY"}
    assert "PUID" in example and "HTTPS" in example
    defaults = run_python(code, env=base, unset=unset)
    shown = run_python(code, env={**base, **example}, unset=unset)
    assert defaults.returncode == 0 and shown.returncode == 0, defaults.stderr + shown.stderr
    defaults, shown = json.loads(defaults.stdout), json.loads(shown.stdout)
    assert {k: v for k, v in shown.items() if defaults.get(k) != v} == {}


def test_check_deploy_is_clean_with_production_settings():
    result = manage("check", "--deploy", "--fail-level", "WARNING", env=PRODUCTION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_warns_when_https_is_off():
    result = manage("check", "--deploy", env={**PRODUCTION, "HTTPS": "false"})
    assert "security.W004" in result.stderr + result.stdout  # HSTS unset


def test_an_image_allow_list_that_refuses_the_default_image_is_refused_naming_both():
    result = manage("check", env={"DEBUG": "true", "INSTANCE_IMAGES_ALLOWED": "registry.example.org/*",
                                  "COMFY_IMAGE": "ghcr.io/comfyhub/comfyui:latest"})
    assert result.returncode != 0
    assert ("INSTANCE_IMAGES_ALLOWED='registry.example.org/*': does not allow "
            "COMFY_IMAGE='ghcr.io/comfyhub/comfyui:latest'") in result.stderr


def test_the_default_image_allow_list_is_the_default_images_repository():
    result = run_python(
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='comfyhub.settings'; django.setup();"
        "from django.conf import settings; print(settings.INSTANCE_IMAGES_ALLOWED)",
        env={"DEBUG": "true", "INSTANCE_IMAGES_ALLOWED": "", "COMFY_IMAGE": "registry.example.org:5000/team/comfy:v2"})
    assert result.stdout.strip() == ("['registry.example.org:5000/team/comfy', 'registry.example.org:5000/team/comfy:*', "
                                     "'registry.example.org:5000/team/comfy@*']"), result.stderr
