"""`manage.py clusters`: ComfyUI-Distributed clusters made of instances (instances/clusters.py, the same services as
the cluster pages). The output and the exit codes are a contract, documented in docs/cli.md."""
from __future__ import annotations

from django.core.exceptions import ValidationError
from django.core.management.base import CommandError

from comfyhub import cli
from comfyhub.cli import EXIT_INPUT, find_instance, input_error, iso
from instances import clusters, services
from instances.models import Cluster, InstanceTemplate, Node


class Command(cli.Command):
    help = ("ComfyUI-Distributed clusters: list, show, create (from a template and GPUs, or from existing instances), "
            "add or remove a worker, start, stop, sync, probe, delete (docs/cli.md).")
    handlers = {"list": "list_clusters", "show": "show", "create": "create", "add-worker": "add_worker",
                "remove-worker": "remove_worker", "start": "run_operation", "stop": "run_operation",
                "sync": "run_operation", "probe": "probe", "delete": "delete"}

    def add_arguments(self, parser):
        waiting = cli.waiting_options()
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        listing = actions.add_parser("list", help="Every cluster: its master, workers and last sync.")
        listing.add_argument("--json", action="store_true", help="A JSON list of objects (see docs/cli.md).")
        show = actions.add_parser("show", help="One cluster: each member, its health, the URL the master reaches it "
                                               "at, and the last probe.")
        show.add_argument("name", metavar="NAME")
        show.add_argument("--json", action="store_true", help="A JSON object (see docs/cli.md).")
        create = actions.add_parser("create", help="Make a cluster from new members (a template and GPUs) and/or "
                                                   "existing instances.")
        create.add_argument("name", metavar="NAME")
        create.add_argument("--template", metavar="TEMPLATE", help="The template new members are made from.")
        create.add_argument("--gpus", action="append", default=[], metavar="NODE:INDEXES",
                            help="One new member on these GPUs of NODE (e.g. local:1,3; without 'NODE:' local); "
                                 "repeat for each. The first is the master unless --master is given.")
        create.add_argument("--master", metavar="ID", help="An existing instance as the master.")
        create.add_argument("--worker", action="append", default=[], metavar="ID",
                            help="An existing instance as a worker; repeat for each.")
        create.add_argument("--description", default="", metavar="TEXT")
        create.add_argument("--cors-origin", default="", metavar="ORIGIN",
                            help="What the members' --enable-cors-header allows (default: the hub's origin, "
                                 "HUB_ORIGIN); '*' allows every origin.")
        add = actions.add_parser("add-worker", parents=[waiting], help="Add an existing instance as a worker.")
        add.add_argument("name", metavar="NAME")
        add.add_argument("instance_id", metavar="ID")
        remove = actions.add_parser("remove-worker", parents=[waiting],
                                    help="Take a worker out (it stays as a plain instance).")
        remove.add_argument("name", metavar="NAME")
        remove.add_argument("instance_id", metavar="ID")
        for action, words in (("start", "Start the workers, each until healthy, then the master."),
                              ("stop", "Stop the workers, then the master."),
                              ("sync", "Write every member's gpu_config.json and put it on the cluster's network."),
                              ("probe", "Ask, from inside the master's container, whether each worker answers.")):
            sub = actions.add_parser(action, parents=[waiting], help=words)
            sub.add_argument("name", metavar="NAME")
        delete = actions.add_parser("delete", parents=[waiting],
                                    help="Delete the cluster; its members stay as plain instances.")
        delete.add_argument("name", metavar="NAME")
        delete.add_argument("--yes", action="store_true", help="Confirm it (it stands for a person saying yes).")

    # --- Looking -----------------------------------------------------------------------------------------

    def list_clusters(self, options):
        found = list(Cluster.objects.select_related("master__node").prefetch_related("workers__instance"))
        if options["json"]:
            self.write_json([cluster_data(cluster) for cluster in found])
            return
        if not found:
            self.stdout.write("No clusters. Make one with `manage.py clusters create NAME ...`.")
            return
        table = [("CLUSTER", "MASTER", "WORKERS", "CORS ORIGIN", "LAST SYNC")]
        for cluster in found:
            workers = [w.instance.instance_id for w in cluster.workers.all()]
            table.append((cluster.name, cluster.master.instance_id, ", ".join(workers) or "-",
                          clusters.cors_origin_of(cluster), sync_text(cluster)))
        self.write_table(table)

    def show(self, options):
        cluster = find_cluster(options["name"])
        if options["json"]:
            self.write_json(cluster_data(cluster, members=True))
            return
        probe = clusters.last_probe(cluster)
        lines = [("Cluster:", cluster.name), ("Description:", cluster.description or "-"),
                 ("CORS origin:", clusters.cors_origin_of(cluster)), ("Last sync:", sync_text(cluster)),
                 ("Last probe:", f"{cli.local_time(probe.created_at)} ({probe.status})" if probe else "never")]
        self.write_table(lines)
        table = [("MEMBER", "ROLE", "NODE", "STATUS", "ENABLED", "URL FROM MASTER", "REACHED")]
        results = probe.result if probe and isinstance(probe.result, dict) else {}
        for row in clusters.cluster_members(cluster):
            instance = row["instance"]
            reached = results.get(instance.instance_id)
            table.append((instance.instance_id, row["role"], row["node"].name, instance.status,
                          "yes" if row["enabled"] else "no", row["url_from_master"] or "-",
                          "-" if row["role"] == "master" or not isinstance(reached, dict)
                          else ("yes" if reached.get("ok") else f"no: {reached.get('detail', '')}")))
        self.write_table(table)

    # --- Changing ----------------------------------------------------------------------------------------

    def create(self, options):
        errors: dict[str, list[str]] = {}
        template = None
        if options["template"]:
            template = InstanceTemplate.objects.filter(name=options["template"]).first()
            if template is None:
                raise cli.unknown("template", options["template"],
                                  InstanceTemplate.objects.values_list("name", flat=True))
        new_members = []
        for spec in options["gpus"]:
            try:
                new_members.append(parse_member(spec))
            except ValidationError as exc:
                errors.setdefault("gpus", []).extend(exc.messages)
        if errors:
            raise input_error(errors)
        master = find_instance(options["master"]) if options["master"] else None
        workers = cli.find_instances(options["worker"]) if options["worker"] else []
        # The command line is the host's administrator: it may set any CORS origin an operator may.
        cluster = cli.call_service(clusters.cluster_create, name=options["name"], template=template,
                                   new_members=new_members, master=master, workers=workers,
                                   description=options["description"], cors_origin=options["cors_origin"],
                                   as_operator=True)
        members = clusters.cluster_members(cluster)
        self.stdout.write(f"Cluster {cluster.name}: master {members[0]['instance']}, workers "
                          f"{', '.join(str(m['instance']) for m in members[1:]) or 'none'}.")
        self.stdout.write("Each member gets ComfyUI-Distributed and its gpu_config.json by an operation on its node "
                          f"(`manage.py clusters show {cluster.name}`); start it with "
                          f"`manage.py clusters start {cluster.name}`.")

    def add_worker(self, options):
        cluster = find_cluster(options["name"])
        instance = find_instance(options["instance_id"])
        cli.call_service(clusters.cluster_add_worker, cluster=cluster, instance=instance)
        operation = clusters.last_sync(cluster)
        self.stdout.write(f"{instance} is a worker of {cluster.name}; it gets ComfyUI-Distributed by an operation on "
                          "its node, and every member's file is synced.")
        if operation is not None:
            self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])

    def remove_worker(self, options):
        cluster = find_cluster(options["name"])
        instance = find_instance(options["instance_id"])
        operation = cli.call_service(clusters.cluster_remove_worker, cluster=cluster, instance=instance)
        if self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"]) is not None:
            self.stdout.write(f"{instance} left cluster {cluster.name}; it is a plain instance again.")

    def run_operation(self, options):
        cluster = find_cluster(options["name"])
        service = {"start": clusters.cluster_start, "stop": clusters.cluster_stop,
                   "sync": clusters.cluster_sync}[options["action"]]
        operation = cli.call_service(service, cluster=cluster)
        self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])

    def probe(self, options):
        cluster = find_cluster(options["name"])
        operation = cli.call_service(clusters.cluster_probe, cluster=cluster)
        done = self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"])
        if done is None:
            return
        table = [("WORKER", "URL", "REACHED")]
        for worker_id, answer in sorted((done.result or {}).items()):
            table.append((worker_id, answer["url"], "yes" if answer["ok"] else f"no: {answer['detail']}"))
        self.write_table(table)
        unreached = [w for w, answer in (done.result or {}).items() if not answer["ok"]]
        if unreached:
            raise CommandError(f"The master does not reach {', '.join(sorted(unreached))}.",
                               returncode=cli.EXIT_FAILED)

    def delete(self, options):
        cluster = find_cluster(options["name"])
        if not options["yes"]:
            raise CommandError(f"Deleting cluster {cluster.name} leaves its members as plain instances (their "
                               "gpu_config.json lists no workers any more); add --yes to confirm.",
                               returncode=EXIT_INPUT)
        operation = cli.call_service(clusters.cluster_delete, cluster=cluster)
        if self.follow(operation, no_wait=options["no_wait"], timeout=options["timeout"]) is not None:
            self.stdout.write(f"Deleted cluster {options['name']}; its members are plain instances.")


def find_cluster(name: str) -> Cluster:
    cluster = Cluster.objects.select_related("master__node").filter(name=name).first()
    if cluster is None:
        raise cli.unknown("cluster", name, Cluster.objects.values_list("name", flat=True))
    return cluster


def parse_member(spec: str) -> tuple[Node, list[int]]:
    """"NODE:1,3" or "1,3" (on local) -> (node, GPU indexes)."""
    name, colon, indexes = (spec or "").rpartition(":")
    if not colon:
        name, indexes = "local", spec
    node = Node.objects.filter(name=name).first() if name != "local" else services.local_node()
    if node is None:
        known = ", ".join(Node.objects.values_list("name", flat=True)) or "none"
        raise ValidationError(f"'{spec}': there is no node '{name}'. Known: {known}.")
    try:
        gpus = services.parse_gpu_selection(indexes)
    except ValidationError as exc:
        raise ValidationError(f"'{spec}': {' '.join(exc.messages)}") from None
    if not gpus:
        raise ValidationError(f"'{spec}': give the GPU indexes of the new member, e.g. {name}:0.")
    return node, gpus


def sync_text(cluster: Cluster) -> str:
    if cluster.synced_at is None:
        return "never"
    return cli.local_time(cluster.synced_at) + (f" (failed: {cluster.sync_detail})" if cluster.sync_detail else "")


def cluster_data(cluster: Cluster, members: bool = False) -> dict:
    data = {"name": cluster.name, "description": cluster.description, "master": cluster.master.instance_id,
            "workers": [w.instance_id for w in clusters.workers_of(cluster)],
            "cors_origin": clusters.cors_origin_of(cluster), "synced_at": iso(cluster.synced_at),
            "sync_detail": cluster.sync_detail}
    if members:
        probe = clusters.last_probe(cluster)
        data["members"] = [{"instance": row["instance"].instance_id, "role": row["role"], "node": row["node"].name,
                            "status": row["instance"].status, "enabled": row["enabled"],
                            "url_from_master": row["url_from_master"]} for row in clusters.cluster_members(cluster)]
        data["last_probe"] = None if probe is None else {
            "operation": str(probe.pk), "status": probe.status, "at": iso(probe.created_at), "result": probe.result}
    return data
