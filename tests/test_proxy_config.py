"""comfyhub/proxy.py and `manage.py proxy_config`: every configuration it renders loads in the real nginx
(`nginx -t`); parameters nginx would misread are refused with a message. What the configuration does is
tests/test_proxy.py's."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command

from comfyhub import proxy
from tests.support.hubproxy import find_nginx


def loads(site_text: str, prefix: Path) -> subprocess.CompletedProcess:
    """nginx -t on `site_text` inside a private nginx.conf."""
    for folder in ("logs", "temp"):
        (prefix / folder).mkdir(parents=True, exist_ok=True)
    site = prefix / "site.conf"
    site.write_text(site_text)
    (prefix / "nginx.conf").write_text(proxy.render_main(prefix=prefix, site=site,
                                                         user="root" if os.geteuid() == 0 else None))
    return subprocess.run(proxy.nginx_command(find_nginx(), prefix, test=True), capture_output=True, text=True)


def site(tmp_path, **overrides):
    params = dict(listen="127.0.0.1:18000", django_upstream=f"unix:{tmp_path}/gunicorn.sock",
                  server_names=["localhost", "127.0.0.1", "[::1]", ".example.org"], cache_dir=tmp_path / "cache",
                  cache_seconds=5, max_upload_mb=1024, session_cookie_name="sessionid")
    return proxy.render_site(**{**params, **overrides})


@pytest.mark.parametrize("listen", ["127.0.0.1:18000", "[::1]:18000", "18000", "unix:/tmp/comfyhub-test.sock"])
def test_the_private_configuration_loads_for_every_kind_of_bind_address(tmp_path, listen):
    result = loads(site(tmp_path, listen=listen), tmp_path)
    assert result.returncode == 0, result.stderr


def test_the_serve_configuration_written_under_a_prefix_loads(tmp_path, settings):
    conf = proxy.write_private_config(tmp_path / "nginx", listen="127.0.0.1:18001", django_upstream="127.0.0.1:18002",
                                      user="root" if os.geteuid() == 0 else None)
    assert conf == tmp_path / "nginx" / "nginx.conf"
    result = subprocess.run(proxy.nginx_command(find_nginx(), tmp_path / "nginx", test=True), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    text = (tmp_path / "nginx" / "comfyhub.conf").read_text()
    assert "client_max_body_size 1024m;" in text and f"server_name {' '.join(settings.ALLOWED_HOSTS)};" in text


def test_a_tls_configuration_with_a_real_certificate_loads(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=hub.example.org"], check=True, capture_output=True)
    text = site(tmp_path, listen="127.0.0.1:18443", tls_certificate=cert, tls_certificate_key=key)
    assert "listen 127.0.0.1:18443 ssl;" in text and "ssl_reject_handshake on;" in text
    result = loads(text, tmp_path)
    assert result.returncode == 0, result.stderr


def test_without_a_cache_time_nothing_is_cached(tmp_path):
    text = site(tmp_path, cache_seconds=0)
    assert "proxy_cache " not in text and "proxy_cache_path" not in text
    assert loads(text, tmp_path).returncode == 0


def test_any_host_allowed_means_no_catch_all_server(tmp_path):
    text = site(tmp_path, server_names=["*"])
    assert "return 444" not in text and "server_name _;" in text
    assert loads(text, tmp_path).returncode == 0
    text = site(tmp_path, default_server=False)
    assert "return 444" not in text and "default_server" not in text


def test_a_custom_session_cookie_name_is_the_cache_key(tmp_path):
    text = site(tmp_path, session_cookie_name="hub.session")
    assert r"hub\.session=(?<comfyhub_session_id>" in text
    assert loads(text, tmp_path).returncode == 0


@pytest.mark.parametrize("overrides, words", [
    ({"listen": "80; include /etc/passwd"}, "listen address"),
    ({"listen": "http://0.0.0.0:80"}, "listen address"),
    ({"django_upstream": "http://127.0.0.1:8001"}, "Django upstream"),
    ({"django_upstream": "unix:/tmp/a b.sock"}, "Django upstream"),
    ({"server_names": ["hub.example.org;"]}, "server name"),
    ({"server_names": []}, "no server name"),
    ({"session_cookie_name": "a;b"}, "session cookie name"),
    ({"cache_dir": Path("relative/cache")}, "absolute path"),
    ({"cache_dir": Path("/tmp/a b")}, "absolute path"),
    ({"tls_certificate": Path("/etc/cert.pem")}, "both a certificate and its key"),
])
def test_parameters_nginx_would_misread_are_refused(tmp_path, overrides, words):
    with pytest.raises(proxy.ProxyConfigError, match=words):
        site(tmp_path, **overrides)


def test_proxy_config_prints_the_configuration_for_a_servers_nginx(tmp_path, settings):
    out = io.StringIO()
    call_command("proxy_config", "--server-name", "hub.example.org", "--upstream", "127.0.0.1:8001",
                 "--cache-dir", str(tmp_path / "cache"), stdout=out)
    text = out.getvalue()
    assert "server_name hub.example.org;" in text and "server 127.0.0.1:8001;" in text and "listen 80;" in text
    assert loads(text, tmp_path).returncode == 0


def test_proxy_config_refuses_a_bad_listen_address_with_exit_code_2(tmp_path):
    result = subprocess.run([sys.executable, "manage.py", "proxy_config", "--listen", "80;"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "SECRET_KEY": "x"})
    assert result.returncode == 2 and "listen address '80;'" in result.stderr


def test_a_clients_scheme_headers_reach_django_only_when_it_is_told_to_trust_a_front(tmp_path, settings):
    """gunicorn behind the socket takes X-Forwarded-Proto for the scheme from anyone, so nginx passes a front's only
    with SECURE_PROXY_SSL_HEADER, and never X-Forwarded-Ssl or -Protocol."""
    for trust in (False, True):
        text = site(tmp_path, trust_forwarded_proto=trust)
        forwarded_map = text[text.index("map $http_x_forwarded_proto"):].split("}", 1)[0]
        assert ("https https;" in forwarded_map) == trust and "default $scheme;" in forwarded_map
        assert text.count('proxy_set_header X-Forwarded-Ssl "";') == text.count("proxy_set_header X-Forwarded-Proto $")
        assert text.count('proxy_set_header X-Forwarded-Protocol "";') == text.count("proxy_set_header X-Forwarded-Proto $")
        assert loads(text, tmp_path).returncode == 0
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    assert "https https;" in site(tmp_path)
    del settings.SECURE_PROXY_SSL_HEADER
    assert "https https;" not in site(tmp_path)
