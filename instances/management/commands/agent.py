"""`manage.py agent --node NAME`: the node agent of a GPU host (instances/agent.py). It registers the node, reports a
heartbeat every NODE_HEARTBEAT_SECONDS and, once an operator approved the node, runs ComfyHub's worker on the node's
queues until SIGTERM or Ctrl-C (which let the current job finish). See docs/cli.md.
"""
from __future__ import annotations

from django.conf import settings
from django.core.exceptions import ValidationError

from comfyhub import cli
from comfyhub.cli import input_error
from instances import nodes
from instances.agent import Agent


class Command(cli.Command):
    help = "Run the node agent of this GPU host: register the node, heartbeat, take its jobs once approved."

    def add_arguments(self, parser):
        parser.add_argument("--node", default=None, metavar="NAME",
                            help="The node this host is (default: NODE_NAME); not 'local', which the hub serves.")

    def handle(self, *args, **options):
        name = options["node"] if options["node"] is not None else settings.NODE_NAME
        problem = nodes.node_name_problem(name)
        if problem:
            raise input_error({"node": [problem]})
        # This process is that node from here on: what reads NODE_NAME (the node's model cache, which jobs serve
        # which node) must see the name given, not the environment's default.
        settings.NODE_NAME = name
        try:
            Agent(name).run()
        except ValidationError as exc:
            raise input_error(exc) from exc
