"""The one settings module: strict, environment-driven, with defaults that let a fresh checkout run."""
import os
import subprocess
import sys

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


def run_python(code, env):
    return run([sys.executable, "-c", code], env)


def manage(*args, env):
    return run([sys.executable, "manage.py", *args], env)


def run(command, env):
    clean = {k: v for k, v in os.environ.items() if k not in SESSION_ONLY}
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
    assert f"SECRET_KEY_FILE={tmp_path / 'absent'} cannot be read" in result.stderr


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


def test_a_badly_typed_value_is_refused():
    result = manage("check", env={**PRODUCTION, "PUID": "one thousand"})
    assert result.returncode != 0
    assert "one thousand" in result.stderr


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
    assert "INSTANCE_IMAGES_ALLOWED (registry.example.org/*) does not allow COMFY_IMAGE" in result.stderr


def test_the_default_image_allow_list_is_the_default_images_repository():
    result = run_python(
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='comfyhub.settings'; django.setup();"
        "from django.conf import settings; print(settings.INSTANCE_IMAGES_ALLOWED)",
        env={"DEBUG": "true", "INSTANCE_IMAGES_ALLOWED": "", "COMFY_IMAGE": "registry.example.org:5000/team/comfy:v2"})
    assert result.stdout.strip() == ("['registry.example.org:5000/team/comfy', 'registry.example.org:5000/team/comfy:*', "
                                     "'registry.example.org:5000/team/comfy@*']"), result.stderr
