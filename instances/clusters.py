"""ComfyUI-Distributed clusters made of ComfyHub instances: the rules for making and changing one, where its members
reach each other, and the gpu_config.json each member's ComfyUI-Distributed reads (docs/distribution.md).

The services here validate and queue; the jobs (instances/jobs_clusters.py) start, stop, sync and probe. A member's
gpu_config.json lives in a folder its container writes: it is read and written only through storage_app.safefs."""
from __future__ import annotations

import ipaddress
import json
import re

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from comfyhub import jsonlimits, operations
from storage_app import layout, safefs

from . import docker_engine, runtime, services
from .comfyui_api import base_url
from .models import (GPU, Cluster, ClusterWorker, GPUAssignment, Instance, InstanceTemplate, Node,
                     cluster_deletion_problem, cluster_membership)

# The folder ComfyUI-Distributed is installed as, and the configuration it reads (re-read when it changes).
DISTRIBUTED_FOLDER = "ComfyUI-Distributed"
CONFIG_NAME = "gpu_config.json"
CONFIG_RELPATH = f"custom_nodes/{DISTRIBUTED_FOLDER}/{CONFIG_NAME}"
# A gpu_config.json bigger than this is not read (the container writes it): ComfyHub writes a fresh one instead.
CONFIG_MAX_BYTES = 1024 * 1024
NAME_MAX = 40  # so that "<name>-master" and "<name>-w99" stay valid instance ids
NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
HOST_RE = re.compile(r"[A-Za-z0-9_.-]{1,253}|\[?[0-9A-Fa-f:.]{2,45}\]?")
ORIGIN_RE = re.compile(r"https?://([A-Za-z0-9.-]+|\[[0-9a-fA-F:.]+\])(:\d{1,5})?")
# What ComfyHub sets in every member's settings: it runs the workers itself, and a written list must not be
# replaced by the node's one-worker-per-GPU guess.
FORCED_SETTINGS = {"has_auto_populated_workers": True, "auto_launch_workers": False}
# The rest of ComfyUI-Distributed's defaults, written only where the file has no value yet.
DEFAULT_SETTINGS = {"debug": False, "stop_workers_on_master_exit": False, "master_delegate_only": False,
                    "websocket_orchestration": True}
CONTAINER_PORT = runtime.CONTAINER_PORT

KIND_START, KIND_STOP, KIND_SYNC, KIND_PROBE = "cluster_start", "cluster_stop", "cluster_sync", "cluster_probe"


# --- Who is in which cluster ---------------------------------------------------------------------------------

# Asked by services (deleting an instance) too, which cannot import this module: the answers live with the models.
membership = cluster_membership


def workers_of(cluster: Cluster) -> list[Instance]:
    return [w.instance for w in cluster.workers.select_related("instance__node").order_by("instance__instance_id")]


def members_of(cluster: Cluster) -> list[Instance]:
    return [cluster.master, *workers_of(cluster)]


deletion_problem = cluster_deletion_problem


# --- Addresses -----------------------------------------------------------------------------------------------

def node_address_problem(node: Node) -> str | None:
    """Why other nodes cannot reach `node`'s instances at its address (loopback, unspecified), or None."""
    address = (node.bind_address or "").strip()
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    if ip is None or ip.is_loopback or ip.is_unspecified:
        shown = address or "empty"
        fix = ("set NODE_ADDRESS on its agent" if node.name != "local" else
               "set its address to one the other nodes reach (the Nodes page, or the admin)")
        return (f"node {node.name} has no address other nodes can reach (NODE_ADDRESS is {shown}): {fix}, and "
                "publish its instances' ports there.")
    return None


def reach(target: Instance, source: Instance) -> tuple[str, int]:
    """(host, port) at which `source`'s container reaches `target`'s ComfyUI: on one node over the cluster's network
    (the container name, ComfyUI's own port), across nodes at the target node's address and published port."""
    if target.node_id == source.node_id:
        return target.container_name, CONTAINER_PORT
    return target.node.bind_address, target.host_port


def url_of(target: Instance, source: Instance) -> str:
    host, port = reach(target, source)
    return base_url(host, port)


def master_host_for_workers(cluster: Cluster) -> tuple[str, int]:
    """The one master address written into the master's own file: the container name when every worker is on its
    node, else its node's address (which the workers on its node reach too, at its published port)."""
    master = cluster.master
    if all(w.node_id == master.node_id for w in workers_of(cluster)):
        return master.container_name, CONTAINER_PORT
    return master.node.bind_address, master.host_port


def network_name(cluster: Cluster) -> str:
    return runtime.cluster_network_name(cluster.name)


# --- Validation ----------------------------------------------------------------------------------------------

def is_operator(user) -> bool:
    """Operators (the `operators` group's permission to change instances) and superusers."""
    return bool(user is not None and user.is_authenticated and user.is_active and
                (user.is_superuser or user.has_perm("instances.change_instance")))


# Names that are pages under /clusters/.
RESERVED_NAMES = frozenset({"new"})


def name_problem(name) -> str | None:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or len(name) > NAME_MAX:
        return (f"A cluster name is 1-{NAME_MAX} lowercase letters, digits and '-', starting and ending with a letter "
                "or digit (its members are named after it, e.g. '<name>-master').")
    if name in RESERVED_NAMES:
        return f"'{name}' is reserved (/clusters/{name}/ is a page of its own); pick another name."
    if Cluster.objects.filter(name=name).exists():
        return f"A cluster '{name}' already exists; pick another name."
    return None


def cors_origin_problem(origin, user=None, *, as_operator: bool = False) -> str | None:
    """Why `origin` cannot be what the members' --enable-cors-header allows, or None. Empty: the hub's origin.
    `as_operator`: the caller is the host's administrator (the command line)."""
    if origin == "":
        return None
    if not isinstance(origin, str) or len(origin) > 300:
        return "Give an origin such as https://comfyhub.example.org, or leave it empty for the hub's own origin."
    if origin != "*" and not ORIGIN_RE.fullmatch(origin):
        return (f"'{origin}' is not an origin: give scheme://host[:port] without a path, e.g. "
                f"https://comfyhub.example.org, or leave it empty for the hub's own ({settings.HUB_ORIGIN}).")
    if not as_operator and not is_operator(user):
        return ("Only an operator may set the members' CORS origin to anything but the hub's own; leave it empty "
                f"({settings.HUB_ORIGIN}).")
    return None


def cors_origin_of(cluster: Cluster) -> str:
    return cluster.cors_origin or settings.HUB_ORIGIN


def _role_problems(instance: Instance, *, as_role: str, cluster: Cluster | None = None) -> list[str]:
    """Why `instance` cannot be `as_role` ("master"/"worker") of `cluster` (None: a new cluster)."""
    problems = []
    found = membership(instance)
    if found is not None and found[0] != cluster:
        other, role = found
        problems.append(f"'{instance}' is already the {role} of cluster '{other}'; an instance is in one cluster at "
                        "most. Remove it there first, or pick another instance.")
    elif found is not None and as_role == "worker":
        problems.append(f"'{instance}' is already the {found[1]} of this cluster.")
    for arg in instance.extra_args or []:
        if "--enable-cors-header" in runtime.comfyui_reads_as(str(arg)):
            problems.append(f"'{instance}' sets --enable-cors-header itself; ComfyHub sets it on a cluster's members "
                            "(the hub's origin, or the cluster's CORS origin). Remove it from its extra arguments.")
    problems.extend(_gpu_sharing_problems(instance))
    return problems


def _gpu_sharing_problems(instance: Instance) -> list[str]:
    """A member's GPU held by another instance too (a shareable GPU): the two would compete for its memory."""
    problems = []
    held = GPUAssignment.objects.filter(gpu__in=GPU.objects.filter(assignments__instance=instance)) \
        .exclude(instance=instance).select_related("gpu", "instance")
    for other in held:
        problems.append(f"'{instance}' is on GPU {other.gpu.index} of node {instance.node}, which instance "
                        f"'{other.instance}' holds too; a cluster member needs its GPUs to itself. Free it there.")
    return problems


def _node_problems(nodes) -> list[str]:
    nodes = {node.pk: node for node in nodes}
    if len(nodes) < 2:
        return []
    problems = [p for node in nodes.values() if (p := node_address_problem(node))]
    return [f"The cluster spans nodes {', '.join(sorted(n.name for n in nodes.values()))}, but {p}"
            for p in problems]


def _new_member_problems(template, new_members) -> tuple[list[str], list[str]]:
    """(problems with `new_members`, problems with `template`)."""
    problems, template_problems = [], []
    if not new_members:
        return problems, template_problems
    if template is None:
        template_problems.append("Choose the template the new members are made from.")
    elif not isinstance(template, InstanceTemplate):
        template_problems.append("That is not a template.")
    seen = {}
    for entry in new_members:
        try:
            node, indexes = entry
            indexes = list(indexes)
        except (TypeError, ValueError):
            problems.append("Each new member is a node and the GPU indexes it gets.")
            continue
        if not isinstance(node, Node):
            problems.append(f"{node!r} is not a node.")
            continue
        if (refusal := node.refusal()) or not node.approved:
            problems.append(refusal or f"Node {node} is not approved; approve it first.")
        if isinstance(template, InstanceTemplate) and template.min_gpus and len(indexes) < template.min_gpus:
            problems.append(f"The template '{template}' needs at least {template.min_gpus} GPUs per instance; "
                            f"the member on node {node} has {len(indexes)}.")
        for index in indexes:
            key = (node.pk, index)
            if key in seen:
                problems.append(f"GPU {index} of node {node} is given to two new members; give each its own GPUs.")
            seen[key] = True
        try:
            services.check_gpu_selection(indexes=indexes, node=node)
        except ValidationError as exc:
            for message in exc.message_dict.get("gpus", exc.messages):
                problems.append(f"Node {node}: {message}")
    return problems, template_problems


def _new_ids(name: str, count: int, with_master: bool) -> list[str]:
    ids = []
    for position in range(count):
        ids.append(f"{name}-master" if with_master and position == 0 else
                   f"{name}-w{position + (0 if with_master else 1)}")
    return ids


def cluster_check(*, name, user=None, description="", cors_origin="", template=None, new_members=(), master=None,
                  workers=(), as_operator: bool = False) -> list[str]:
    """Every rule cluster_create applies, without making anything; raises ValidationError keyed by field. Returns the
    ids the new members will get."""
    errors: dict[str, list[str]] = {}
    new_members = list(new_members or [])
    workers = list(workers or [])
    if problem := name_problem(name):
        errors["name"] = [problem]
    if problem := cors_origin_problem(cors_origin, user, as_operator=as_operator):
        errors["cors_origin"] = [problem]
    if len(description or "") > 2000:
        errors.setdefault("name", []).append("A description has at most 2000 characters.")
    if master is None and not new_members:
        errors["master"] = ["Choose the master: an existing instance, or new members made from a template (the "
                            "first new one becomes the master)."]
    problems, template_problems = _new_member_problems(template, new_members)
    if problems:
        errors["new_members"] = problems
    if template_problems:
        errors["template"] = template_problems
    if master is not None:
        if not isinstance(master, Instance):
            errors.setdefault("master", []).append("The master must be an instance.")
        else:
            master_problems = _role_problems(master, as_role="master")
            if any(w.pk == master.pk for w in workers if isinstance(w, Instance)):
                master_problems.append(f"'{master}' cannot be the master and a worker of the same cluster; pick "
                                       "another master or drop it from the workers.")
            if master_problems:
                errors.setdefault("master", []).extend(master_problems)
    seen = set()
    for worker in workers:
        if not isinstance(worker, Instance):
            errors.setdefault("workers", []).append(f"{worker!r} is not an instance.")
            continue
        if worker.pk in seen:
            errors.setdefault("workers", []).append(f"'{worker}' is listed twice among the workers.")
            continue
        seen.add(worker.pk)
        if master is not None and worker.pk == getattr(master, "pk", None):
            continue  # said under "master"
        if problems := _role_problems(worker, as_role="worker"):
            errors.setdefault("workers", []).extend(problems)
    if isinstance(name, str) and NAME_RE.fullmatch(name) and len(name) <= NAME_MAX:
        ids = _new_ids(name, len(new_members), master is None)
        taken = sorted(Instance.objects.filter(instance_id__in=ids).values_list("instance_id", flat=True))
        if taken:
            errors.setdefault("name", []).append(f"Instance(s) {', '.join(taken)} exist already; the new members "
                                                 "would be named so. Pick another cluster name.")
    else:
        ids = []
    nodes = [n for n, _ in new_members if isinstance(n, Node)] if not errors.get("new_members") else []
    nodes += [i.node for i in [master, *workers] if isinstance(i, Instance)]
    if node_problems := _node_problems(nodes):
        errors.setdefault("new_members" if new_members else "workers", []).extend(node_problems)
    if errors:
        raise ValidationError(errors)
    return ids


# --- Services ------------------------------------------------------------------------------------------------

def cluster_create(*, name, user=None, description="", cors_origin="", template=None, new_members=(), master=None,
                   workers=(), as_operator: bool = False) -> Cluster:
    """Make a cluster: new members from `template` (one per (node, [GPU indexes]) of `new_members`, named
    "<name>-master", "<name>-w1", ...; the first is the master unless `master` is given) and existing instances
    adopted as `master` and `workers`. Each member then gets ComfyUI-Distributed at DISTRIBUTED_NODE_REF and its
    gpu_config.json, by an operation on its node. `as_operator`: the caller is the host's administrator (the command
    line), who may set any CORS origin."""
    new_members = [(node, list(indexes)) for node, indexes in (new_members or [])] \
        if all(isinstance(e, (list, tuple)) and len(e) == 2 for e in (new_members or [])) else list(new_members)
    workers = list(workers or [])
    ids = cluster_check(name=name, user=user, description=description, cors_origin=cors_origin, template=template,
                        new_members=new_members, master=master, workers=workers, as_operator=as_operator)
    with transaction.atomic():
        made = []
        for instance_id, (node, indexes) in zip(ids, new_members):
            try:
                instance = services.instance_create(
                    instance_id=instance_id, image=template.image, extra_args=template.extra_args,
                    extra_env=template.extra_env, node=node, gpu_indexes=indexes, user=user, template=template)
            except ValidationError as exc:
                raise ValidationError({"new_members": [f"{instance_id} on node {node}: {m}" for m in exc.messages]}) \
                    from None
            Instance.objects.filter(pk=instance.pk).update(template=template)
            instance.refresh_from_db()
            made.append(instance)
        if master is None:
            master, made_workers = made[0], made[1:]
        else:
            made_workers = made
        try:
            with transaction.atomic():
                cluster = Cluster.objects.create(name=name, description=description or "", master=master,
                                                 cors_origin=cors_origin or "", created_by=services._person(user))
                for worker in [*workers, *made_workers]:
                    ClusterWorker.objects.create(cluster=cluster, instance=worker)
        except IntegrityError:
            raise ValidationError({"name": _lost_race()["name"]}) from None
        for instance in [master, *workers, *made_workers]:
            member_prepare(instance=instance, template=template if instance in made else None, user=user)
    return cluster


def _lost_race() -> dict:
    """Two requests at once: the database kept one cluster per name and per instance; say so like the checks do."""
    return {"name": ["A cluster with this name, or one holding one of these instances, was just made; look at the "
                     "clusters and try again."],
            "workers": ["One of these instances was just put into a cluster by another request; pick again."]}


def member_prepare(*, instance: Instance, template=None, user=None):
    """Queue the preparation of a member on its node: the template applied (a new member), ComfyUI-Distributed
    installed or moved to DISTRIBUTED_NODE_REF, its gpu_config.json written."""
    return operations.enqueue("instances.jobs_clusters.prepare_member", target=instance, user=user,
                              instance_pk=instance.pk, template_pk=getattr(template, "pk", None))


def cluster_add_worker(*, cluster: Cluster, instance: Instance, user=None) -> ClusterWorker:
    errors = _role_problems(instance, as_role="worker", cluster=cluster)
    if instance.pk == cluster.master_id:
        errors = [f"'{instance}' is the master of cluster '{cluster}'; a master is not also a worker."]
    if not errors:
        errors = _node_problems([m.node for m in members_of(cluster)] + [instance.node])
    if errors:
        raise ValidationError({"workers": errors})
    with transaction.atomic():
        try:
            with transaction.atomic():
                worker = ClusterWorker.objects.create(cluster=cluster, instance=instance)
        except IntegrityError:
            raise ValidationError({"workers": _lost_race()["workers"]}) from None
        member_prepare(instance=instance, user=user)
        cluster_sync(cluster=cluster, user=user)
    return worker


def cluster_remove_worker(*, cluster: Cluster, instance: Instance, user=None):
    """Take a worker out: it stays as a plain instance (its own file's worker list is emptied by the sync; it leaves
    the cluster's network), and the master's file no longer lists it."""
    row = ClusterWorker.objects.filter(cluster=cluster, instance=instance).first()
    if row is None:
        raise ValidationError({"workers": [f"'{instance}' is not a worker of cluster '{cluster}'."]})
    with transaction.atomic():
        row.delete()
        operation = cluster_sync(cluster=cluster, user=user, released=[instance.pk])
    return operation


def cluster_delete(*, cluster: Cluster, user=None):
    """Delete the cluster; its members stay as plain instances, their gpu_config.json worker lists emptied and
    their containers out of its network (an operation on the master's node)."""
    released = [m.pk for m in members_of(cluster)]
    with transaction.atomic():
        operation = operations.enqueue("instances.jobs_clusters.release_members", target=cluster.master,
                                       node=cluster.master.node, user=user, instance_pks=released,
                                       cluster_name=cluster.name)
        cluster.delete()
    return operation


def _refuse_offline(cluster: Cluster):
    for node in {m.node_id: m.node for m in members_of(cluster)}.values():
        if refusal := node.refusal():
            raise operations.NodeUnavailable(refusal)


def cluster_start(*, cluster: Cluster, user=None):
    """Start every member, workers first (each waited for until healthy), then the master."""
    _refuse_offline(cluster)
    with transaction.atomic():
        Instance.objects.filter(pk__in=[m.pk for m in members_of(cluster)]).update(
            desired_state=Instance.DesiredState.RUNNING)
        return operations.enqueue("instances.jobs_clusters.start_cluster", target=cluster, node=cluster.master.node,
                                  user=user, cluster_pk=cluster.pk)


def cluster_stop(*, cluster: Cluster, user=None):
    """Stop every member, workers first, then the master."""
    _refuse_offline(cluster)
    reason = f"Stopped with cluster {cluster} by {user.get_username()}." if services._person(user) \
        else f"Stopped with cluster {cluster}."
    with transaction.atomic():
        Instance.objects.filter(pk__in=[m.pk for m in members_of(cluster)]).update(
            desired_state=Instance.DesiredState.STOPPED, stopped_at=timezone.now(), stop_reason=reason[:300])
        return operations.enqueue("instances.jobs_clusters.stop_cluster", target=cluster, node=cluster.master.node,
                                  user=user, cluster_pk=cluster.pk)


def cluster_sync(*, cluster: Cluster, user=None, released=()):
    """Write every member's gpu_config.json (each on its node) and join each to the cluster's network."""
    _refuse_offline(cluster)
    return operations.enqueue("instances.jobs_clusters.sync_cluster", target=cluster, node=cluster.master.node,
                              user=user, cluster_pk=cluster.pk, released=list(released))


def cluster_probe(*, cluster: Cluster, user=None):
    """From inside the master's container, ask each worker's /system_stats at the address in the master's file.
    The operation's result: {worker instance id: {"url", "ok", "detail"}}."""
    if refusal := cluster.master.node.refusal():
        raise operations.NodeUnavailable(refusal)
    if operations.running_on(KIND_PROBE, cluster):
        raise ValidationError(f"A reachability check of cluster '{cluster}' is under way; wait for it to finish.")
    return operations.enqueue("instances.jobs_clusters.probe_cluster", target=cluster, node=cluster.master.node,
                              user=user, cluster_pk=cluster.pk)


def _last(cluster: Cluster, kind: str):
    from django.contrib.contenttypes.models import ContentType

    from comfyhub.models import Operation

    return Operation.objects.filter(kind=kind, target_type=ContentType.objects.get_for_model(Cluster),
                                    target_id=str(cluster.pk)).order_by("-created_at").first()


def last_probe(cluster: Cluster):
    """The cluster's latest probe operation (its result: {worker id: {"url", "ok", "detail"}}), or None."""
    return _last(cluster, KIND_PROBE)


def last_sync(cluster: Cluster):
    return _last(cluster, KIND_SYNC)


def worker_enabled(instance: Instance) -> bool:
    """Whether the master should send it work: meant to run, and healthy or starting."""
    return instance.desired_state == Instance.DesiredState.RUNNING and \
        instance.status in (Instance.Status.HEALTHY, Instance.Status.STARTING)


def cluster_members(cluster: Cluster) -> list[dict]:
    master = Instance.objects.select_related("node").get(pk=cluster.master_id)
    rows = [{"instance": master, "role": "master", "node": master.node, "url_from_master": None,
             "enabled": worker_enabled(master)}]
    for worker in workers_of(cluster):
        rows.append({"instance": worker, "role": "worker", "node": worker.node,
                     "url_from_master": url_of(worker, master), "enabled": worker_enabled(worker)})
    return rows


# --- gpu_config.json -----------------------------------------------------------------------------------------

def _cuda_device(instance: Instance):
    # Inside its container the first assigned GPU is cuda:0 (runtime orders them by host index).
    return 0 if instance.gpu_choice() else None


def desired_sections(cluster: Cluster, instance: Instance) -> dict:
    """What ComfyHub decides in `instance`'s file: the master section, the workers (the master's file lists every
    worker as remote; a worker's file lists none)."""
    master = cluster.master
    if instance.pk == master.pk:
        host, port = master_host_for_workers(cluster)
    else:
        host, port = reach(master, instance)
    sections = {
        # Names are instance ids: ComfyUI-Distributed puts them into its page unescaped (innerHTML), on the hub's
        # origin through /i/<id>/, so a display name (anyone's free text) would be script there.
        "master": {"name": master.instance_id, "host": host, "port": port, "cuda_device": _cuda_device(master),
                   "extra_args": ""},
        "workers": [],
    }
    if instance.pk == master.pk:
        for worker in workers_of(cluster):
            w_host, w_port = reach(worker, master)
            sections["workers"].append({
                "id": worker.instance_id, "name": worker.instance_id, "host": w_host, "port": w_port,
                "cuda_device": _cuda_device(worker), "enabled": worker_enabled(worker), "extra_args": "",
                "type": "remote"})
    return sections


def released_sections() -> dict:
    """A former member's file: no workers (its master section is left as it was)."""
    return {"workers": []}


def merged_config(existing: dict | None, sections: dict) -> dict:
    """`existing` (what the file holds: a person's settings, the tunnel, unknown keys) with ComfyHub's sections
    put in: its master fields replaced, its workers list replaced (each known worker keeps keys ComfyHub does not
    write), the two forced settings set and the defaults added where missing."""
    config = dict(existing) if isinstance(existing, dict) else {}
    if "master" in sections:
        old = config.get("master") if isinstance(config.get("master"), dict) else {}
        config["master"] = {**old, **sections["master"]}
    old_workers = {w["id"]: w for w in config.get("workers") or [] if isinstance(w, dict) and isinstance(w.get("id"), str)} \
        if isinstance(config.get("workers"), list) else {}
    config["workers"] = [{**old_workers.get(w["id"], {}), **w} for w in sections.get("workers", [])]
    current = config.get("settings") if isinstance(config.get("settings"), dict) else {}
    config["settings"] = {**DEFAULT_SETTINGS, **current, **FORCED_SETTINGS}
    # The tunnel (a public URL the node's page shows unescaped, settable by any peer through its unauthenticated
    # routes) is not ComfyHub's to keep: a member starts with none, and publishes itself only by a person's choice.
    config.pop("tunnel", None)
    return config


def member_root(instance: Instance):
    return layout.instance_dir(instance.instance_id, instance.node)


def read_config(instance: Instance) -> tuple[dict | None, str]:
    """(the member's gpu_config.json as an object, "") or (None, why it is not used): missing, a link, not a regular
    file, too big, or not a JSON object. Never read through a link, never blocks on a fifo."""
    try:
        raw = safefs.read_bytes(member_root(instance), CONFIG_RELPATH, CONFIG_MAX_BYTES)
    except FileNotFoundError:
        return None, "missing"
    except safefs.UnsafePathError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"{CONFIG_RELPATH} could not be read: {exc.strerror or exc}"
    try:
        data = jsonlimits.loads(raw, what=CONFIG_RELPATH)
    except jsonlimits.JSONInputError as exc:
        return None, str(exc)
    if not isinstance(data, dict):
        return None, f"{CONFIG_RELPATH} is {jsonlimits.kind_of(data)}, not an object"
    return data, ""


def write_config(instance: Instance, sections: dict) -> tuple[bool, str]:
    """Bring the member's gpu_config.json to `sections` (merged into what it holds). Returns (written, note): not
    written when it already says that, or when ComfyUI-Distributed's folder is not there yet; the note says why an
    existing file was not kept (a link, a fifo, too big). Raises safefs.UnsafePathError when the folder (or one above
    it) is a link (nothing is written then) and OSError when the name is taken by a folder."""
    root = member_root(instance)
    try:
        with safefs.opened_dir(root, CONFIG_RELPATH.rsplit("/", 1)[0]):
            pass
    except FileNotFoundError:
        # Never made here: the folder is the node's, cloned by its install (which a folder made first would block).
        return False, f"{DISTRIBUTED_FOLDER} is not installed in it (yet): nothing written"
    existing, why = read_config(instance)
    config = merged_config(existing, sections)
    if existing is not None and existing == config:
        return False, ""
    data = (json.dumps(config, indent=2) + "\n").encode()
    # A temporary file ComfyHub creates exclusively in the folder (opened without links), renamed over the name: a
    # link planted there is replaced, never written through.
    safefs.write_bytes(root, CONFIG_RELPATH, data)
    note = "" if existing is not None or why == "missing" else f"replaced it: {why}"
    return True, note


def sync_member(instance: Instance, report=None) -> dict:
    """Write one member's file (or empty a former member's worker list). Returns {"instance", "written", "note"}."""
    found = membership(instance)
    sections = desired_sections(found[0], instance) if found else released_sections()
    try:
        written, note = write_config(instance, sections)
    except (safefs.UnsafePathError, OSError, TypeError, ValueError) as exc:  # the file is the container's to shape
        note = f"{CONFIG_RELPATH} not written: {exc}"
        if report:
            report.log(f"{instance}: {note}", "ERROR")
        return {"instance": instance.instance_id, "written": False, "note": note, "failed": True}
    if report and (written or note):
        report.log(f"{instance}: {CONFIG_RELPATH} {'written' if written else 'unchanged'}"
                   + (f" ({note})" if note else ""), "WARNING" if note else "INFO")
    return {"instance": instance.instance_id, "written": written, "note": note, "failed": False}


def members_on_node(node: Node) -> list[Instance]:
    """Every cluster member on `node`, with what its file needs loaded."""
    masters = Instance.objects.filter(node=node, cluster_as_master__isnull=False)
    workers = Instance.objects.filter(node=node, cluster_membership__isnull=False)
    return list((masters | workers).select_related("node").distinct())


def sync_node(node: Node, report=None, *, cluster: Cluster | None = None) -> list[dict]:
    """Write the files of the members on `node` (of `cluster` only, when given) where they differ: the periodic
    reconcile, and each start and stop, call this."""
    results = []
    for instance in members_on_node(node):
        found = membership(instance)
        if cluster is not None and (found is None or found[0].pk != cluster.pk):
            continue
        try:
            results.append(sync_member(instance, report))
        except Exception as exc:  # noqa: BLE001 - one member's file never stops the others' sync
            note = f"{CONFIG_RELPATH} not written: {type(exc).__name__}: {exc}"[:300]
            if report:
                report.log(f"{instance}: {note}", "ERROR")
            results.append({"instance": instance.instance_id, "written": False, "note": note, "failed": True})
    return results


# --- The cluster's Docker network on a node ------------------------------------------------------------------

def join_network(engine, instance: Instance, report=None) -> str | None:
    """Put `instance`'s container (created or running) on its cluster's network when it has one on this node
    (runtime.cluster_network); returns the network's name, or None."""
    joined = runtime.cluster_network(instance)
    if joined is None:
        return None
    name, labels, aliases = joined
    docker_engine.ensure_network(engine, name, labels)
    if docker_engine.container_state(engine, instance.container_name) is not None:
        docker_engine.connect_network(engine, name, instance.container_name, aliases=aliases)
        if report:
            report.log(f"{instance} is on network {name} (as {', '.join(aliases)})")
    return name


def leave_network(engine, instance: Instance, cluster_name: str, report=None):
    """Take a former member's container off the cluster's network; the network goes when no container is left."""
    name = runtime.cluster_network_name(cluster_name)
    docker_engine.disconnect_network(engine, name, instance.container_name)
    members = docker_engine.network_members(engine, name)
    if members is not None and not members:
        docker_engine.remove_network(engine, name)
    if report:
        report.log(f"{instance} left network {name}")


def sync_networks(node: Node, cluster: Cluster | None, released=(), report=None):
    """On `node`: every member of `cluster` there on its network (where it has one), `released` former members off
    it."""
    members = [m for m in members_of(cluster) if m.node_id == node.pk] if cluster is not None else []
    if not members and not released:
        return
    engine = docker_engine.require_engine(node.docker_host or None)
    try:
        for instance in released:
            if cluster is not None:
                leave_network(engine, instance, cluster.name, report)
        for member in members:
            join_network(engine, member, report)
    finally:
        engine.close()


def probe_urls(cluster: Cluster) -> dict[str, str]:
    """{worker id: its /system_stats URL} at the address the master's gpu_config.json gives it (what ComfyHub
    computes, where the file does not say or cannot be read)."""
    master = cluster.master
    written, _ = read_config(master)
    listed = {}
    if written and isinstance(written.get("workers"), list):
        for entry in written["workers"]:
            # The file is the container's to write: only a plain host name or address and a port are taken from it.
            if isinstance(entry, dict) and isinstance(entry.get("id"), str) and isinstance(entry.get("host"), str) \
                    and HOST_RE.fullmatch(entry["host"]) and isinstance(entry.get("port"), int) \
                    and not isinstance(entry.get("port"), bool) and 0 < entry["port"] < 65536:
                listed[entry["id"]] = (entry["host"], entry["port"])
    urls = {}
    for worker in workers_of(cluster):
        host, port = listed.get(worker.instance_id) or reach(worker, master)
        urls[worker.instance_id] = base_url(host, port) + "/system_stats"
    return urls
