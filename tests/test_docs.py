"""The documentation tells the truth: every command and option is in docs/cli.md, and no document points at a path
outside the repository."""
import argparse
import re
import subprocess

import pytest
from django.core.management import load_command_class
from django.core.management.base import BaseCommand

from tests.conftest import REPO

CLI_DOC = REPO / "docs" / "cli.md"
COMMAND_FOLDERS = ("comfyhub", "instances", "storage_app")
COMMANDS = sorted((folder, path.stem) for folder in COMMAND_FOLDERS
                  for path in (REPO / folder / "management" / "commands").glob("*.py") if path.stem != "__init__")
# Options every Django command has; docs/cli.md names them once, not per command.
DJANGO_OPTIONS = {option for action in BaseCommand().create_parser("manage.py", "x")._actions
                  for option in action.option_strings}


def shared_options():
    """Options docs/cli.md describes once for every command ("--no-wait", "--timeout")."""
    text = CLI_DOC.read_text()
    shared = text[text.index("## Every command: what they share"):]
    return set(re.findall(r"`(--[a-z-]+)", shared[:shared.index("\n## ", 1)]))


def cli_section(name):
    """The part of docs/cli.md under the heading "## `manage.py NAME`", up to the next "## " heading."""
    match = re.search(rf"^## `manage\.py {name}`.*?$(.*?)(?=^## |\Z)", CLI_DOC.read_text(), re.M | re.S)
    assert match, f"docs/cli.md has no section \"## `manage.py {name}`\""
    return match[1]


def actions_and_options(app, name):
    """{action: its long options} of a command; the action is "" for a command without sub-commands."""
    parser = load_command_class(app, name).create_parser("manage.py", name)
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice, sub in action.choices.items():
                found[choice] = {o for a in sub._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    if not found:
        found[""] = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - DJANGO_OPTIONS
    return found


def test_the_commands_are_found():
    assert {"instances", "models", "snapshots", "legacy", "storage", "serve"} <= {name for _, name in COMMANDS}


@pytest.mark.parametrize("app, name", COMMANDS)
def test_every_command_its_actions_and_options_are_in_docs_cli_md(app, name):
    section = cli_section(name)
    shared = shared_options() if name != "instances" else set()
    undocumented = []
    for action, options in actions_and_options(app, name).items():
        if action and not re.search(rf"`{re.escape(action)}[ `]", section):
            undocumented.append(action)
        undocumented += [f"{action} {option}".strip() for option in sorted(options - shared) if option not in section]
    assert undocumented == []


def test_the_title_of_docs_cli_md_names_every_command():
    title = CLI_DOC.read_text().splitlines()[0]
    assert [name for _, name in COMMANDS if f"`{name}`" not in title and f"`manage.py {name}`" not in title] == []


# Paths of the machine the project was written on; the repository's own paths and documented system defaults
# (/var/run/docker.sock, /run/secrets/...) are fine.
OUTSIDE = re.compile(r"/work/|(?<![./])\.\./shared/|/home/\w|/root/")


def test_no_document_or_docstring_names_a_path_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    documents = [name for name in tracked if name.endswith((".md", ".py", ".html", ".txt", ".ini", ".yml", ".yaml"))
                 or name in (".env.example", "Makefile")]
    assert len(documents) > 50
    found = [f"{name}:{number}: {line.strip()}" for name in documents if (REPO / name).is_file()
             for number, line in enumerate((REPO / name).read_text(errors="replace").splitlines(), 1)
             if OUTSIDE.search(line) and name != "tests/test_docs.py"]
    assert found == []
