"""`manage.py serve`: run all of ComfyHub in the foreground (what `make run` calls).

Migrates, makes sure a superuser exists, starts a local Redis unless REDIS_URL was given, RQ workers with the
scheduler, the cron process for periodic jobs, and gunicorn; restarts a crashed worker; Ctrl-C stops all of it.
"""
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from redis import Redis
from redis.exceptions import RedisError

from comfyhub.queues import redis_address
from comfyhub.signals import serve_starting


class Command(BaseCommand):
    help = "Run ComfyHub (web server, workers, scheduler and, unless REDIS_URL is set, a local Redis)."

    def create_parser(self, prog_name, subcommand, **kwargs):
        from comfyhub.cli import input_errors

        return input_errors(super().create_parser(prog_name, subcommand, **kwargs))  # bad arguments: exit code 2

    def add_arguments(self, parser):
        parser.add_argument("--bind", default=settings.SERVE_BIND,
                            help="Address for the web server (default 127.0.0.1:8000, env COMFYHUB_BIND).")
        parser.add_argument("--workers", type=int, default=settings.SERVE_WORKERS,
                            help="RQ worker processes (default 2, env COMFYHUB_WORKERS).")
        parser.add_argument("--web-workers", type=int, default=settings.SERVE_WEB_WORKERS,
                            help="Gunicorn worker processes (default 2, env COMFYHUB_WEB_WORKERS).")

    def handle(self, *args, **options):
        self.children: list[tuple[str, list[str], subprocess.Popen]] = []
        self.stopping = False
        signal.signal(signal.SIGTERM, self._request_stop)
        signal.signal(signal.SIGINT, self._request_stop)
        settings.DATA_DIR.mkdir(parents=True, exist_ok=True)
        self.log_dir = settings.DATA_DIR / "logs"
        self.log_dir.mkdir(exist_ok=True)
        try:
            call_command("migrate", interactive=False, verbosity=0)
            call_command("collectstatic", interactive=False, verbosity=0)
            for _, line in serve_starting.send(sender=self.__class__):
                if line:
                    self.stdout.write(line)
            login = self._ensure_superuser()
            self._start_redis()
            manage = [sys.executable, str(Path(settings.BASE_DIR) / "manage.py")]
            for number in range(max(1, options["workers"])):
                # The first worker takes quick jobs only, so hours of hashing never hold up a container start.
                queues = ["default"] if number == 0 and options["workers"] > 1 else ["default", "long"]
                self._spawn(f"worker-{number + 1}", [*manage, "rqworker", *queues, "--with-scheduler"])
            self._spawn("cron", [*manage, "rqcron", "comfyhub.cron"])
            self._spawn("web", [sys.executable, "-m", "gunicorn", "comfyhub.wsgi", "--bind", options["bind"],
                                "--workers", str(options["web_workers"]), "--threads", "4",
                                "--access-logfile", "-", "--timeout", "60", "--no-control-socket"])
            self._announce(options["bind"], login)
            self._supervise()
        finally:
            self._stop_all()

    # --- set-up ------------------------------------------------------------------------------------------

    def _ensure_superuser(self):
        User = get_user_model()
        username = os.environ.get("DJANGO_SUPERUSER_USERNAME", "admin")
        password = os.environ.get("DJANGO_SUPERUSER_PASSWORD", "")
        if User.objects.filter(is_superuser=True).exists():
            if password and not User.objects.filter(username=username).exists():
                User.objects.create_superuser(username=username, password=password, email="")
            return {"username": username if password else None, "password": None}
        generated = not password
        password = password or secrets.token_urlsafe(12)
        User.objects.create_superuser(username=username, password=password, email="")
        return {"username": username, "password": password if generated else None}

    def _start_redis(self):
        if "REDIS_URL" in os.environ:
            try:
                Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2).ping()
            except RedisError as exc:
                self.stderr.write(self.style.WARNING(
                    f"REDIS_URL points at {redis_address()}, which does not answer ({exc}). ComfyHub starts anyway; "
                    "actions will say the job queue is unavailable until it answers."))
            return
        redis_server = shutil.which("redis-server")
        if not redis_server:
            raise CommandError("redis-server is not installed: install the Debian package 'redis-server' "
                               "(sudo apt-get install redis-server) or set REDIS_URL to a Redis you run.")
        redis_dir = settings.DATA_DIR / "redis"
        redis_dir.mkdir(exist_ok=True)
        socket_path = settings.DATA_DIR / "redis.sock"
        self._spawn("redis", [redis_server, "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
                              "--dir", str(redis_dir), "--appendonly", "yes", "--save", "", "--daemonize", "no"])
        connection = Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1)
        deadline = time.monotonic() + 20
        while True:
            try:
                connection.ping()
                return
            except RedisError:
                if time.monotonic() > deadline:
                    raise CommandError(f"The local Redis did not start; see {self.log_dir / 'redis.log'}.")
                time.sleep(0.2)

    def _spawn(self, name, command):
        log = open(self.log_dir / f"{name}.log", "ab") if name == "redis" else None
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT if log else None,
                                   start_new_session=True)
        self.children.append((name, command, process))
        return process

    def _announce(self, bind, login):
        host, _, port = bind.rpartition(":")
        host = "localhost" if host in ("127.0.0.1", "0.0.0.0", "") else host
        lines = ["", f"ComfyHub is running at http://{host}:{port}/"]
        if login["password"]:
            lines.append(f"Log in as '{login['username']}' with password: {login['password']}")
            lines.append("(This password is shown only once; change it with `python manage.py changepassword`.)")
        elif login["username"]:
            lines.append(f"Log in as '{login['username']}' (password from DJANGO_SUPERUSER_PASSWORD).")
        else:
            lines.append("Log in with your existing superuser account.")
        lines.append(f"Redis: {redis_address()} · logs: {self.log_dir} · press Ctrl-C to stop everything.")
        self.stdout.write(self.style.SUCCESS("\n".join(lines) + "\n"))

    # --- running -----------------------------------------------------------------------------------------

    def _request_stop(self, signum, frame):
        self.stopping = True

    def _supervise(self):
        restarts: dict[str, list[float]] = {}
        while not self.stopping:
            time.sleep(0.5)
            for index, (name, command, process) in enumerate(self.children):
                if self.stopping or process.poll() is None:
                    continue
                recent = [t for t in restarts.get(name, []) if time.monotonic() - t < 60]
                if name in ("redis", "web") or len(recent) >= 5:
                    raise CommandError(f"{name} exited with status {process.returncode}; stopping ComfyHub.")
                self.stderr.write(self.style.WARNING(f"{name} exited with status {process.returncode}; restarting it."))
                recent.append(time.monotonic())
                restarts[name] = recent
                self.children[index] = (name, command, subprocess.Popen(command, start_new_session=True))

    def _stop_all(self):
        # Web and workers first (workers finish their current job on SIGTERM), Redis last.
        for name, _, process in reversed(self.children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.stderr.write(self.style.WARNING(f"{name} did not stop in 20 s; killing it."))
                    process.kill()
                    process.wait()
        if self.children:
            self.stdout.write("ComfyHub stopped.")
