"""`manage.py proxy_config`: print the nginx configuration for a server's own nginx in front of ComfyHub (the same
docker/nginx template `manage.py serve` runs privately), to save as /etc/nginx/conf.d/comfyhub.conf."""
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from comfyhub import proxy


class Command(BaseCommand):
    help = ("Print an nginx configuration (an http{}-level file, e.g. /etc/nginx/conf.d/comfyhub.conf) that serves "
            "ComfyHub and opens its instances at /i/<id>/ after ComfyHub's access check. Run ComfyHub itself with "
            "COMFYHUB_NGINX=false on the --upstream address.")

    def create_parser(self, prog_name, subcommand, **kwargs):
        from comfyhub.cli import input_errors

        return input_errors(super().create_parser(prog_name, subcommand, **kwargs))  # bad arguments: exit code 2

    def add_arguments(self, parser):
        parser.add_argument("--listen", default="",
                            help="What nginx listens on: PORT, HOST:PORT or unix:/path (default 443 with a "
                                 "certificate, else 80).")
        parser.add_argument("--upstream", default=settings.SERVE_BIND,
                            help="Where ComfyHub's gunicorn listens: HOST:PORT or unix:/path (default COMFYHUB_BIND, "
                                 f"now {settings.SERVE_BIND}).")
        parser.add_argument("--server-name", action="append", default=[], metavar="NAME",
                            help="A host name the hub answers to; repeat for more (default ALLOWED_HOSTS). Requests "
                                 "for any other Host are closed unanswered.")
        parser.add_argument("--cache-dir", default="/var/cache/nginx/comfyhub",
                            help="Folder for nginx's cache of access decisions (default /var/cache/nginx/comfyhub).")
        parser.add_argument("--no-default-server", action="store_true",
                            help="Leave out the catch-all server that closes requests for other hosts (when this "
                                 "nginx already has a default server on that port).")
        parser.add_argument("--ssl-certificate", type=Path, help="TLS certificate (full chain), e.g. "
                            "/etc/letsencrypt/live/hub.example.org/fullchain.pem.")
        parser.add_argument("--ssl-certificate-key", type=Path, help="Its private key, e.g. "
                            "/etc/letsencrypt/live/hub.example.org/privkey.pem.")

    def handle(self, *args, **options):
        tls = options["ssl_certificate"] is not None
        try:
            text = proxy.site_from_settings(
                listen=options["listen"] or ("443" if tls else "80"), django_upstream=options["upstream"],
                cache_dir=Path(options["cache_dir"]), server_names=options["server_name"] or None,
                tls_certificate=options["ssl_certificate"], tls_certificate_key=options["ssl_certificate_key"],
                default_server=not options["no_default_server"])
        except proxy.ProxyConfigError as exc:
            raise CommandError(f"{exc}", returncode=2)
        self.stdout.write(text, ending="")
