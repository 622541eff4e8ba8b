"""The nginx configuration in front of ComfyHub (docker/nginx/): rendered here from a few parameters, for the private
nginx `manage.py serve` runs and for a server's own nginx (`manage.py proxy_config`). Pure functions; the one file
that writes anything is `write_private_config`."""
from __future__ import annotations

import re
from pathlib import Path

from django.conf import settings

TEMPLATES = Path(settings.BASE_DIR) / "docker" / "nginx"
SITE_TEMPLATE = TEMPLATES / "comfyhub.conf.template"
MAIN_TEMPLATE = TEMPLATES / "nginx.conf.template"

_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_LISTEN = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}|\d{1,5}|unix:/[^\s;{}\"']+")
_UPSTREAM = re.compile(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}|unix:/[^\s;{}\"']+")
_SERVER_NAME = re.compile(r"\.?[A-Za-z0-9*_-][A-Za-z0-9*_.-]*|\[[0-9a-fA-F:.]+\]")
_COOKIE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ProxyConfigError(ValueError):
    """A parameter nginx would misread: the message says which and what to use."""


def render(template: Path, values: dict[str, str]) -> str:
    text = template.read_text()
    missing = set(_PLACEHOLDER.findall(text)) - set(values)
    if missing:
        raise ProxyConfigError(f"{template.name} needs {', '.join(sorted(missing))}")
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


def quoted(path: Path | str, what: str) -> str:
    """A path as one nginx word; refused when nginx could read it as more than that."""
    text = str(path)
    if not text.startswith("/") or any(c in text for c in "\"'\\;{}$ \n\r\t"):
        raise ProxyConfigError(f"{what} {text!r} must be an absolute path without spaces, quotes, backslashes, ';', '{{', "
                               "'}', '$' or line breaks.")
    return f'"{text}"'


def listen_address(bind: str) -> str:
    """nginx's listen parameter for HOST:PORT, [IPv6]:PORT, PORT or unix:/path (COMFYHUB_BIND's forms)."""
    if not _LISTEN.fullmatch(bind):
        raise ProxyConfigError(f"listen address {bind!r}: use HOST:PORT, [IPv6]:PORT, PORT or unix:/path, e.g. "
                               "127.0.0.1:8000.")
    return bind


def server_names_of(hosts: list[str]) -> list[str]:
    """ALLOWED_HOSTS as nginx server names ("*" stays: it means any host). Django's ".example.org" (the domain and
    its subdomains) is nginx's too."""
    names = []
    for host in hosts:
        if host == "*":
            return ["*"]
        if not _SERVER_NAME.fullmatch(host):
            raise ProxyConfigError(f"server name {host!r}: use a host name or IP address, e.g. comfyhub.example.org.")
        names.append(host)
    if not names:
        raise ProxyConfigError("no server name: give the host names the hub answers to (ALLOWED_HOSTS).")
    return names


def render_site(*, listen: str, django_upstream: str, server_names: list[str], cache_dir: Path | None,
                cache_seconds: int, max_upload_mb: int, session_cookie_name: str,
                tls_certificate: Path | None = None, tls_certificate_key: Path | None = None,
                default_server: bool = True, trust_forwarded_proto: bool | None = None) -> str:
    """The http{}-level configuration: the hub on `listen`, Django at `django_upstream` (HOST:PORT or unix:/path),
    /i/<id>/ proxied after Django's access check, whose answers nginx keeps in `cache_dir` as long as Django says
    (cache_seconds 0: no cache, asked every time). `default_server`: a catch-all closing requests for other hosts
    (off where the server's nginx already has a default server). `trust_forwarded_proto` (default: the
    SECURE_PROXY_SSL_HEADER setting): pass a TLS front's X-Forwarded-Proto on; otherwise nginx tells Django its own
    scheme. gunicorn, behind a unix socket, turns X-Forwarded-Proto into the request's scheme whatever its
    --forwarded-allow-ips says, so a client's claim must not reach it unless Django is told to trust one."""
    listen = listen_address(listen)
    if not _UPSTREAM.fullmatch(django_upstream):
        raise ProxyConfigError(f"Django upstream {django_upstream!r}: use HOST:PORT or unix:/path/to/gunicorn.sock.")
    if django_upstream.startswith("unix:"):
        quoted(django_upstream[5:], "Django's socket")
    names = server_names_of(server_names)
    if not _COOKIE_NAME.fullmatch(session_cookie_name):
        raise ProxyConfigError(f"session cookie name {session_cookie_name!r}: use letters, digits, '_', '.' or '-'.")
    if (tls_certificate is None) != (tls_certificate_key is None):
        raise ProxyConfigError("TLS needs both a certificate and its key.")
    tls = tls_certificate is not None
    suffix = " ssl" if tls else ""
    tls_lines = ""
    if tls:
        tls_lines = (f"    ssl_certificate {quoted(tls_certificate, 'the TLS certificate')};\n"
                     f"    ssl_certificate_key {quoted(tls_certificate_key, 'the TLS key')};\n")
    if names == ["*"]:
        server_name, catch_all = "_", ""
        main_listen = f"{listen}{suffix}" + (" default_server" if default_server else "")
    elif not default_server:
        server_name, main_listen, catch_all = " ".join(names), f"{listen}{suffix}", ""
    else:
        server_name, main_listen = " ".join(names), f"{listen}{suffix}"
        # A Host header naming no server of ours (or none at all): the connection is closed, unanswered.
        catch_all = "\n".join([
            "# Requests for any other Host: closed without an answer.",
            "server {",
            f"    listen {listen}{suffix} default_server;",
            "    server_name _;",
            *(["    ssl_reject_handshake on;"] if tls else []),
            "    return 444;",
            "}",
            "",
        ])
    if cache_seconds > 0:
        if cache_dir is None:
            raise ProxyConfigError("a cache folder is needed when access decisions are cached.")
        cache = (f"proxy_cache_path {quoted(cache_dir, 'the cache folder')} levels=1:2 keys_zone=comfyhub_auth:4m "
                 "max_size=64m inactive=1m use_temp_path=off;")
        auth_cache = "\n".join([
            "        # Only Django's X-Accel-Expires decides (ACCESS_CACHE_SECONDS for 200 and 403, 0 for 401).",
            "        proxy_cache comfyhub_auth;",
            '        proxy_cache_key "$comfyhub_session|$http_authorization|$comfyhub_instance$comfyhub_per_request";',
            "        proxy_ignore_headers Cache-Control Expires Set-Cookie Vary;",
            "        proxy_hide_header Set-Cookie;",
        ])
    else:
        cache = "# ACCESS_CACHE_SECONDS=0: Django is asked on every request."
        auth_cache = "        # ACCESS_CACHE_SECONDS=0: not cached."
    if trust_forwarded_proto is None:
        trust_forwarded_proto = bool(getattr(settings, "SECURE_PROXY_SSL_HEADER", None))
    if trust_forwarded_proto:
        forwarded_note = "a TLS front's (SECURE_PROXY_SSL_HEADER=true: the front sets it), else nginx's own scheme."
        forwarded_map = "    https https;\n    http http;\n"
    else:
        forwarded_note = "nginx's own scheme, whatever the client sent (SECURE_PROXY_SSL_HEADER=false)."
        forwarded_map = ""
    return render(SITE_TEMPLATE, {
        "forwarded_proto_note": forwarded_note,
        "forwarded_proto_map": forwarded_map,
        "cache": cache,
        "auth_cache": auth_cache,
        "django_upstream": django_upstream,
        "session_cookie_re": re.escape(session_cookie_name),
        "default_server": catch_all,
        "listen": main_listen,
        "server_names": server_name,
        "tls": tls_lines,
        "max_upload_mb": str(int(max_upload_mb)),
    })


def render_main(*, prefix: Path, site: Path, user: str | None = None) -> str:
    """The nginx.conf of a private nginx whose every path lies under `prefix`; `user` for its workers when the
    master runs as root ("nobody nogroup")."""
    quoted(prefix, "the nginx prefix")
    return render(MAIN_TEMPLATE, {
        "prefix": str(prefix),
        "user": f"user {user};" if user else "# Workers run as the user who started nginx.",
        "log_dir": str(prefix / "logs"),
        "temp_dir": str(prefix / "temp"),
        "site": quoted(site, "the site file"),
    })


def site_from_settings(*, listen: str, django_upstream: str, cache_dir: Path | None,
                       server_names: list[str] | None = None, **tls) -> str:
    """render_site with ComfyHub's settings: ACCESS_CACHE_SECONDS, PROXY_MAX_UPLOAD_MB, SESSION_COOKIE_NAME and
    ALLOWED_HOSTS (unless `server_names`)."""
    return render_site(listen=listen, django_upstream=django_upstream,
                       server_names=server_names or list(settings.ALLOWED_HOSTS), cache_dir=cache_dir,
                       cache_seconds=settings.ACCESS_CACHE_SECONDS, max_upload_mb=settings.PROXY_MAX_UPLOAD_MB,
                       session_cookie_name=settings.SESSION_COOKIE_NAME, **tls)


def write_private_config(prefix: Path, *, listen: str, django_upstream: str, user: str | None = None,
                         server_names: list[str] | None = None, cache: bool | None = None) -> Path:
    """Write a private nginx's configuration under `prefix` (logs, temp, cache and the two files) and return the
    path of its nginx.conf. Start it with `nginx_command(prefix)`. `cache` (default: ACCESS_CACHE_SECONDS > 0)
    turns the access cache on; how long an answer is kept is Django's to say, on each answer."""
    for folder in ("logs", "temp", "cache"):
        (prefix / folder).mkdir(parents=True, exist_ok=True)
    # Cache files hold their keys: session ids and tokens.
    (prefix / "cache").chmod(0o700)
    site = prefix / "comfyhub.conf"
    site.write_text(render_site(
        listen=listen, django_upstream=django_upstream, server_names=server_names or list(settings.ALLOWED_HOSTS),
        cache_dir=prefix / "cache",
        cache_seconds=int(settings.ACCESS_CACHE_SECONDS > 0 if cache is None else cache),
        max_upload_mb=settings.PROXY_MAX_UPLOAD_MB, session_cookie_name=settings.SESSION_COOKIE_NAME))
    conf = prefix / "nginx.conf"
    conf.write_text(render_main(prefix=prefix, site=site, user=user))
    return conf


def nginx_command(nginx: str, prefix: Path, *, test: bool = False) -> list[str]:
    """The private nginx in the foreground (or, with test, checking its configuration)."""
    command = [nginx, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
               "-g", f"daemon off; pid {prefix / 'nginx.pid'};"]
    return command + (["-t", "-q"] if test else [])
