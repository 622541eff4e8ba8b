"""`manage.py serve`: run all of ComfyHub in the foreground (what `make run` calls).

Migrates, makes sure a superuser exists, starts a local Redis unless REDIS_URL was given, RQ workers with the
scheduler, the cron process for periodic jobs, gunicorn, and nginx in front of it (docker/nginx, the /i/<id>/ proxy;
COMFYHUB_NGINX=false: gunicorn alone on the bind address); restarts a crashed worker; Ctrl-C stops all of it.
"""
import os
import pwd
import socket
import stat
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

from comfyhub import proxy
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
            nginx = self._nginx_binary() if settings.SERVE_NGINX else None
            if nginx:
                self.nginx_prefix.mkdir(exist_ok=True)
            web_bind = f"unix:{self.nginx_prefix / 'gunicorn.sock'}" if nginx else options["bind"]
            self._spawn("web", [sys.executable, "-m", "gunicorn", "comfyhub.wsgi", "--bind", web_bind,
                                "--workers", str(options["web_workers"]), "--threads", "4",
                                "--access-logfile", "-", "--timeout", "60", "--no-control-socket",
                                # Scheme headers count only where Django's SECURE_PROXY_SSL_HEADER says; gunicorn
                                # would otherwise take X-Forwarded-Proto/-Ssl from 127.0.0.1 for the scheme. (On a
                                # unix socket gunicorn trusts every peer whatever this says: nginx overwrites those
                                # headers there, docker/nginx.)
                                "--forwarded-allow-ips", ""])
            if nginx:
                self._start_nginx(nginx, options["bind"], web_bind)
            self._announce(options["bind"], login, nginx=bool(nginx))
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

    @property
    def nginx_prefix(self) -> Path:
        return settings.DATA_DIR / "nginx"

    def _nginx_binary(self) -> str:
        # Debian puts nginx in /usr/sbin, which is not on a normal user's PATH.
        search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
        nginx = shutil.which("nginx", path=search)
        if not nginx:
            raise CommandError("nginx is not installed: install the Debian package 'nginx' (sudo apt-get install "
                               "nginx; `make run` does it when run as root), or set COMFYHUB_NGINX=false to run "
                               "the web server alone on COMFYHUB_BIND (instances then cannot be opened through "
                               "the hub).")
        return nginx

    def _nginx_worker_user(self, socket_path: Path) -> str | None:
        """As root, nginx's workers run as 'nobody' when that user can reach gunicorn's socket; else as root."""
        if os.geteuid() != 0:
            return None
        try:
            nobody = pwd.getpwnam("nobody")
        except KeyError:
            return "root"
        for folder in socket_path.parents:
            if not folder.stat().st_mode & stat.S_IXOTH:
                self.stderr.write(self.style.WARNING(
                    f"nginx's workers run as root: the user 'nobody' cannot enter {folder} to reach {socket_path}. "
                    f"`chmod o+x {folder}` (or keep COMFYHUB_DATA_DIR elsewhere) lets them run as 'nobody'."))
                return "root"
        self.nginx_worker_ids = (nobody.pw_uid, nobody.pw_gid)
        return f"nobody {self._group_name(nobody.pw_gid)}"

    @staticmethod
    def _group_name(gid):
        import grp

        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return str(gid)

    def _start_nginx(self, nginx, bind, web_bind):
        prefix = self.nginx_prefix
        prefix.mkdir(exist_ok=True)
        try:
            proxy.write_private_config(prefix, listen=bind, django_upstream=web_bind,
                                       user=self._nginx_worker_user(prefix / "gunicorn.sock"))
        except proxy.ProxyConfigError as exc:
            raise CommandError(f"Cannot configure nginx: {exc}")
        if getattr(self, "nginx_worker_ids", None):
            os.chown(prefix / "cache", *self.nginx_worker_ids)  # private to the workers (0700), who write it
        checked = subprocess.run(proxy.nginx_command(nginx, prefix, test=True), capture_output=True, text=True)
        if checked.returncode != 0:
            raise CommandError(f"nginx refuses its configuration ({prefix / 'nginx.conf'}): {checked.stderr.strip()}")
        process = self._spawn("nginx", proxy.nginx_command(nginx, prefix))
        deadline = time.monotonic() + 20
        while not self._listening(bind):
            if process.poll() is not None or time.monotonic() > deadline:
                log = prefix / "logs" / "error.log"
                tail = log.read_text(errors="replace").strip().splitlines()[-3:] if log.exists() else []
                raise CommandError(f"nginx did not start on {bind}: {' '.join(tail) or 'see its output above'}")
            time.sleep(0.1)

    @staticmethod
    def _listening(bind) -> bool:
        if bind.startswith("unix:"):
            family, address = socket.AF_UNIX, bind[5:]
        else:
            host, _, port = bind.rpartition(":")
            host = host.strip("[]") or "127.0.0.1"
            host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
            family, address = (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            try:
                probe.connect(address)
                return True
            except OSError:
                return False

    def _spawn(self, name, command):
        log = open(self.log_dir / f"{name}.log", "ab") if name == "redis" else None
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT if log else None,
                                   start_new_session=True)
        self.children.append((name, command, process))
        return process

    def _announce(self, bind, login, nginx=False):
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
        if nginx:
            lines.append(f"Instances open at /i/<instance-id>/ through nginx (its logs: {self.nginx_prefix / 'logs'}).")
        else:
            lines.append("COMFYHUB_NGINX=false: no proxy in front, so instances cannot be opened through the hub.")
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
                if name in ("redis", "web", "nginx") or len(recent) >= 5:
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
