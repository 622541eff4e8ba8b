"""`manage.py tokens`: personal access tokens for operators' scripts, through the same service as the account page
(comfyhub/tokens.py). `create` prints the token alone on stdout, so a script can capture it; docs/cli.md describes
the output and exit codes."""
from __future__ import annotations

import json

from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from comfyhub import cli, tokens
from comfyhub.cli import EXIT_INPUT, iso, local_time
from comfyhub.models import AccessToken


class Command(cli.Command):
    help = "Create, list and revoke personal access tokens (Authorization: Bearer on /i/<id>/; see docs/cli.md)."
    handlers = {"create": "create_token", "list": "list_tokens", "revoke": "revoke_token"}

    def add_arguments(self, parser):
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

        create = actions.add_parser("create", help="Make a token for a user and print it (only it, once).")
        create.add_argument("--user", required=True, metavar="USERNAME", help="Whose rights the token carries.")
        create.add_argument("--name", required=True, help="What it is for, e.g. 'render farm'.")
        create.add_argument("--expires-days", default="never", metavar="DAYS",
                            help=f"Days until it expires, 1 to {tokens.EXPIRY_DAYS_MAX}, or 'never' (the default).")

        listing = actions.add_parser("list", help="Tokens, newest first, one line each (never the token itself).")
        listing.add_argument("--user", metavar="USERNAME", help="Only this user's tokens.")
        listing.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")

        revoke = actions.add_parser("revoke", help="Revoke a token for good (revoking twice is not an error).")
        revoke.add_argument("token", metavar="ID|PREFIX",
                            help="The token's id or prefix as `tokens list` shows them (or the whole token).")

    # --- Sub-commands ----------------------------------------------------------------------------------------

    def create_token(self, options):
        user = find_user(options["user"])
        expires_at = cli.call_service(tokens.parse_expiry, value=options["expires_days"])
        token, raw = cli.call_service(tokens.token_create, user=user, name=options["name"], expires_at=expires_at)
        self.stdout.write(raw)
        expiry = f"expires {local_time(token.expires_at)}" if token.expires_at else "never expires"
        self.stderr.write(f"Created token {token.pk} '{token.name}' ({token.prefix}…) for {user.get_username()}; it "
                          f"{expiry}. It is not shown again.")

    def list_tokens(self, options):
        queryset = AccessToken.objects.select_related("user").order_by("-created_at", "-pk")
        if options["user"] is not None:
            queryset = queryset.filter(user=find_user(options["user"]))
        rows = list(queryset)
        if options["json"]:
            self.stdout.write(json.dumps([token_data(token) for token in rows], indent=2, ensure_ascii=False))
            return
        if not rows:
            self.stdout.write("No tokens yet. Make one with: python manage.py tokens create --user USERNAME "
                              "--name NAME")
            return
        table = [("ID", "PREFIX", "USER", "STATE", "CREATED", "EXPIRES", "LAST USED", "NAME")]
        for token in rows:
            table.append((token.pk, token.prefix, token.user.get_username(), tokens.token_state(token),
                          local_time(token.created_at), local_time(token.expires_at),
                          local_time(token.last_used_at), token.name))
        self.write_table(table)

    def revoke_token(self, options):
        token = find_token(options["token"])
        owner = token.user.get_username()
        if tokens.token_revoke(token=token, user=None):
            self.stdout.write(f"Revoked token {token.pk} '{token.name}' ({token.prefix}…) of {owner}.")
        else:
            self.stdout.write(f"Token {token.pk} '{token.name}' ({token.prefix}…) of {owner} was already revoked "
                              f"({local_time(token.revoked_at)}).")


# --- Finding rows -------------------------------------------------------------------------------------------------

def find_user(username: str):
    User = get_user_model()
    user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
    if user is None:
        raise cli.unknown("user", username, User.objects.order_by(User.USERNAME_FIELD)
                          .values_list(User.USERNAME_FIELD, flat=True))
    return user


def find_token(text: str) -> AccessToken:
    """A token by its id, its prefix (with or without the '…' `list` shows) or the whole token."""
    value = text.strip().rstrip("…")
    queryset = AccessToken.objects.select_related("user")
    if value.isascii() and value.isdigit() and len(value) <= 18:
        matches = list(queryset.filter(pk=int(value)))
    elif tokens.TOKEN_FORMAT.fullmatch(value):
        matches = list(queryset.filter(digest=tokens.digest_of(value)))
    elif value.startswith(tokens.TOKEN_PREFIX) and len(value) == tokens.PREFIX_LENGTH:
        matches = list(queryset.filter(prefix=value))
    else:
        raise CommandError(f"'{text}' is neither a token id nor a token prefix ({tokens.TOKEN_PREFIX} and 7 more "
                           "characters); see them with: python manage.py tokens list", returncode=EXIT_INPUT)
    if not matches:
        raise CommandError(f"No token '{text}'. See the tokens with: python manage.py tokens list",
                           returncode=EXIT_INPUT)
    if len(matches) > 1:
        ids = ", ".join(str(token.pk) for token in matches)
        raise CommandError(f"Several tokens start with '{value}' (ids {ids}); give the id instead.",
                           returncode=EXIT_INPUT)
    return matches[0]


def token_data(token: AccessToken) -> dict:
    """The documented JSON of one token (docs/cli.md); add keys, never rename or remove them."""
    return {
        "id": token.pk,
        "user": token.user.get_username(),
        "name": token.name,
        "prefix": token.prefix,
        "state": tokens.token_state(token),
        "created_at": iso(token.created_at),
        "expires_at": iso(token.expires_at),
        "last_used_at": iso(token.last_used_at),
        "revoked_at": iso(token.revoked_at),
    }
