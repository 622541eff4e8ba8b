#!/usr/bin/env python
"""Django's command-line utility for ComfyHub."""
import os
import sys


def main():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "comfyhub.settings")
    from django.conf import settings
    from django.core.exceptions import ImproperlyConfigured
    from django.core.management import execute_from_command_line

    try:
        execute_from_command_line(sys.argv)
    except ImproperlyConfigured as exc:
        if settings.configured:
            raise
        # The settings refused a variable: the message names it and what to write; a traceback would bury it.
        sys.exit(f"ComfyHub cannot start: {exc}")


if __name__ == "__main__":
    main()
