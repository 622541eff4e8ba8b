"""Instance services: the rules for creating, changing, starting, stopping and deleting instances.

The browser, the admin, the CLI and the jobs all call these functions; validation problems are raised as
`ValidationError({field: [message]})` whose messages say what is wrong and what to do.
"""
from __future__ import annotations

import errno
import os
import socket
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import Prefetch
from django.utils import timezone

from comfyhub import operations
from storage_app import layout

from . import placement, runtime
from .gpus import gpus_discover
from .models import GPU, LOCAL_NODE, GPUAssignment, Instance, Node, cluster_deletion_problem, cluster_membership


# --- Nodes ---------------------------------------------------------------------------------------------------

def port_range_setting() -> tuple[int, int]:
    start, _, end = settings.INSTANCE_PORT_RANGE.partition("-")
    return int(start), int(end or start)


def local_node() -> Node:
    start, end = port_range_setting()
    node, _ = Node.objects.get_or_create(name=LOCAL_NODE, defaults={"port_range_start": start, "port_range_end": end})
    return node


def instances_with_relations():
    """Instances with everything list pages show, in a fixed number of queries."""
    return Instance.objects.select_related("node", "owner").prefetch_related(
        Prefetch("assignments", queryset=GPUAssignment.objects.select_related("gpu"))
    )


# --- Parsing user input (shared by forms and the CLI) ----------------------------------------------------------

def parse_gpu_selection(value) -> list[int]:
    """'0,1' / ['0', '1'] / 'none' / '' -> GPU indexes."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.strip().lower()
        if value in ("", "none", "cpu"):
            return []
        parts = [p.strip() for p in value.split(",") if p.strip()]
    else:
        parts = [str(p).strip() for p in value]
    if not all(p.isascii() and p.isdigit() and len(p) <= 9 for p in parts):
        raise ValidationError({"gpus": [f"GPUs are given by index, e.g. '0,1', or 'none' for CPU mode; got "
                                        f"{', '.join(parts)}."]})
    indexes = sorted({int(p) for p in parts})
    return indexes


def parse_env(pairs) -> dict[str, str]:
    """['K=V', ...] or 'K=V\\nK2=V2' -> dict; refuses malformed lines."""
    if isinstance(pairs, str):
        pairs = [line for line in pairs.splitlines() if line.strip()]
    env = {}
    for pair in pairs:
        key, sep, value = str(pair).strip().partition("=")
        if not sep or not runtime.ENV_KEY_RE.fullmatch(key):
            raise ValidationError({"extra_env": [f"'{str(pair).strip()}' is not KEY=VALUE with a KEY of letters "
                                                 "A-Z, digits and '_', not starting with a digit."]})
        env[key] = value
    return env


# --- Validation ----------------------------------------------------------------------------------------------

@dataclass
class InstanceFields:
    instance_id: str
    display_name: str = ""
    description: str = ""
    image: str = ""
    extra_args: list | None = None
    extra_env: dict | None = None
    host_port: int | None = None
    gpu_indexes: list | None = None
    adopt: bool = False
    image_arguments: str = runtime.ARGUMENTS_COMMAND


def _validate(fields: InstanceFields, node: Node, instance: Instance | None = None) -> list[GPU]:
    errors: dict[str, list[str]] = {}

    if instance is None:
        problem = layout.instance_id_problem(fields.instance_id)
        if problem:
            errors.setdefault("instance_id", []).append(problem)
        elif Instance.objects.filter(instance_id=fields.instance_id).exists():
            errors.setdefault("instance_id", []).append(
                f"An instance '{fields.instance_id}' already exists; pick another id.")
        elif problem := _kept_folder_problem(layout.instances_root(node) / fields.instance_id, fields.adopt):
            errors.setdefault("instance_id", []).append(problem)

    if len(fields.display_name or "") > 100:
        errors.setdefault("display_name", []).append("A display name has at most 100 characters.")

    if problem := runtime.image_problem(fields.image):
        errors.setdefault("image", []).append(problem)

    member = instance is not None and cluster_membership(instance) is not None
    for arg in fields.extra_args or []:
        if problem := runtime.argument_problem(arg):
            errors.setdefault("extra_args", []).append(problem)
        elif member and "--enable-cors-header" in runtime.comfyui_reads_as(arg):
            errors.setdefault("extra_args", []).append(
                f"'{arg}': ComfyHub sets --enable-cors-header on a cluster's members (to the cluster's origin); "
                "remove it.")
    for key, value in (fields.extra_env or {}).items():
        if problem := runtime.environment_problem(key, value):
            errors.setdefault("extra_env", []).append(problem)
    for field, problems in runtime.image_arguments_problems(fields.image_arguments, fields.extra_args,
                                                            fields.extra_env).items():
        errors.setdefault(field, []).extend(problems)

    if fields.host_port is not None:
        problem = _port_problem(fields.host_port, node, instance)
        if problem:
            errors.setdefault("host_port", []).append(problem)

    gpus = _check_gpus(node, fields.gpu_indexes or [], instance, errors)

    if errors:
        raise ValidationError(errors)
    return gpus


def _kept_folder_problem(path, adopt: bool) -> str | None:
    """A new instance's folder must not exist, unless it adopts one kept from a deleted instance, which must."""
    if not adopt:
        if path.exists() or path.is_symlink():
            # Data of a deleted instance (or one made by hand): reusing it silently would mix two instances' data.
            return (f"{path} already exists (data kept from a deleted instance?). Pick another id, or adopt that "
                    "folder as it is (--adopt on the command line, 'Adopt the kept folder' on the form).")
        return None
    if path.is_symlink():
        return (f"{path} is a link; an instance's folder must be a real folder, since ComfyHub follows no link into "
                "it. Replace the link with the folder it points to, then adopt it.")
    if not path.exists():
        return f"Nothing to adopt: {path} does not exist. Leave adopting off to create a new, empty folder."
    if not path.is_dir():
        return f"Cannot adopt {path}: it is not a folder. Move it away, or pick another id."
    return None


def kept_instance_folders(node: Node | None = None) -> list[str]:
    """Ids of folders under the instances root that no instance owns (kept when an instance was deleted)."""
    root = layout.instances_root(node or local_node())
    try:
        names = [entry.name for entry in os.scandir(root) if entry.is_dir(follow_symlinks=False)
                 and layout.instance_id_problem(entry.name) is None]
    except FileNotFoundError:
        return []
    taken = set(Instance.objects.filter(instance_id__in=names).values_list("instance_id", flat=True))
    return sorted(name for name in names if name not in taken)


def _check_gpus(node: Node, indexes, instance: Instance | None, errors: dict) -> list[GPU]:
    gpus = []
    for index in indexes:
        gpu = GPU.objects.filter(node=node, index=index).first()
        if gpu is None or not gpu.present:
            known = ", ".join(str(g.index) for g in GPU.objects.filter(node=node, present=True)) or "none"
            errors.setdefault("gpus", []).append(f"GPU {index} does not exist on node {node} (GPUs: {known}).")
            continue
        others = [a for a in gpu.assignments.select_related("instance") if a.instance != instance]
        if others and (not gpu.shareable or any(a.exclusive for a in others)):
            errors.setdefault("gpus", []).append(
                f"GPU {index} is held exclusively by instance '{others[0].instance}'; pick another GPU, free it "
                "there, or mark it shareable on the GPUs page.")
            continue
        gpus.append(gpu)
    return gpus


def check_gpu_selection(*, indexes, node: Node | None = None) -> list[GPU]:
    """The GPUs for a new instance, or ValidationError saying which cannot be had and why."""
    errors: dict[str, list[str]] = {}
    gpus = _check_gpus(node or local_node(), indexes, None, errors)
    if errors:
        raise ValidationError(errors)
    return gpus


def _port_problem(port: int, node: Node, instance: Instance | None) -> str | None:
    if not 1024 <= port <= 65535:
        return "Ports go from 1024 to 65535; leave it empty to choose one automatically."
    other = Instance.objects.filter(node=node, host_port=port).exclude(pk=getattr(instance, "pk", None)).first()
    if other:
        return f"Port {port} is used by instance '{other}'; pick another or leave it empty to choose one automatically."
    if instance is not None and instance.host_port == port:
        return None  # its own port, possibly bound by its own running container
    if port_bound_on_host(node.bind_address, port):
        return (f"Port {port} is already in use on this host (by another program); pick another or leave it empty "
                "to choose one automatically.")
    return None


def port_bound_on_host(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Connections that just closed linger in TIME_WAIT on the port; they do not stop Docker from publishing
        # it (nor should they make a port look taken), only a listener does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            return exc.errno in (errno.EADDRINUSE, errno.EACCES)
    return False


def _free_ports(node: Node):
    taken = set(Instance.objects.filter(node=node).values_list("host_port", flat=True))
    for port in range(node.port_range_start, node.port_range_end + 1):
        if port not in taken and not port_bound_on_host(node.bind_address, port):
            yield port


# --- Create, update, delete ----------------------------------------------------------------------------------

def instance_create(*, instance_id: str, display_name: str = "", description: str = "", image: str = "",
                    extra_args=None, extra_env=None, host_port: int | None = None, gpu_indexes=None,
                    node: Node | None = None, gpu_count: int | None = None, adopt: bool = False,
                    image_arguments: str = runtime.ARGUMENTS_COMMAND, idle_stop_after: int = 0, owner=None,
                    user=None, template=None) -> Instance:
    """Register an instance. Its GPUs are `gpu_indexes` on `node` (default `local`), or, with `gpu_count` instead,
    placement (instances/placement.py) picks `gpu_count` free GPUs on `node`, or a node too when none is given.
    `adopt`: take the folder kept from a deleted instance with this id as it is (the directory build only adds what
    is missing); without it, that folder existing is refused. The owner is `owner`, else the user who creates it.
    `template`, when it is made from one, only words a placement refusal."""
    if gpu_count is not None and gpu_indexes:
        raise ValidationError({"gpus": ["Give GPU indexes or a number of GPUs, not both."]})
    if node is not None:
        placement.check_node_takes_instances(node)
    if gpu_count is not None:
        if node is None:
            local_node()  # made when missing: placement counts it
        placed = placement.place(gpu_count=gpu_count, node=node, template=template)
        node, gpu_indexes = placed.node, placed.gpu_indexes
    node = node or local_node()
    if problem := idle_stop_problem(idle_stop_after):
        raise ValidationError({"idle_stop_after": [problem]})
    # The id is taken as given (never trimmed): "abc\n" is refused, not quietly made into "abc".
    extra_args, extra_env = runtime.checked_config(extra_args, extra_env)
    fields = InstanceFields(instance_id=instance_id or "", display_name=display_name,
                            description=description, image=image or settings.COMFY_IMAGE,
                            extra_args=extra_args, extra_env=extra_env,
                            host_port=host_port, gpu_indexes=list(gpu_indexes or []), adopt=adopt,
                            image_arguments=image_arguments)
    gpus = _validate(fields, node)
    ports = [host_port] if host_port is not None else _free_ports(node)
    for port in ports:
        try:
            with transaction.atomic():
                instance = Instance.objects.create(
                    instance_id=fields.instance_id, display_name=display_name, description=description, node=node,
                    image=fields.image, extra_args=fields.extra_args, extra_env=fields.extra_env, host_port=port,
                    image_arguments=fields.image_arguments, idle_stop_after=idle_stop_after,
                    created_by=_person(user), owner=_person(owner) or _person(user),
                )
                _assign(instance, gpus)
            return instance
        except IntegrityError as exc:
            _raise_for_integrity(exc, fields, port, explicit_port=host_port is not None)
    raise ValidationError({"host_port": [f"No free port left in {node.port_range_start}-{node.port_range_end} on "
                                         f"node {node}; give one explicitly or widen the range."]})


def _person(user):
    return user if user is not None and user.is_authenticated else None


IDLE_STOP_MAX_MINUTES = 60 * 24 * 365  # a year: more is a typo, not a wish


def idle_stop_problem(minutes) -> str | None:
    """Why `minutes` cannot be an instance's idle stop, or None (0 = never)."""
    if isinstance(minutes, bool) or not isinstance(minutes, int) or not 0 <= minutes <= IDLE_STOP_MAX_MINUTES:
        return (f"Give the idle stop in whole minutes from 0 (never) to {IDLE_STOP_MAX_MINUTES}, e.g. "
                f"{settings.IDLE_STOP_AFTER_DEFAULT}.")
    return None


def _raise_for_integrity(exc, fields, port, *, explicit_port, creating=True):
    """Translate a lost race into the same messages the checks give; return to try the next free port."""
    if creating and Instance.objects.filter(instance_id=fields.instance_id).exists():
        raise ValidationError({"instance_id": [f"An instance '{fields.instance_id}' already exists; pick another id."]})
    if "assignment" in str(exc).lower() or "gpu" in str(exc).lower():
        raise ValidationError({"gpus": ["One of these GPUs was just taken by another instance; pick again."]})
    if explicit_port:
        raise ValidationError({"host_port": [f"Port {port} was just taken by another instance; pick another or leave "
                                             "it empty to choose one automatically."]})


def _assign(instance: Instance, gpus: list[GPU]):
    GPUAssignment.objects.filter(instance=instance).exclude(gpu__in=gpus).delete()
    held = set(GPUAssignment.objects.filter(instance=instance).values_list("gpu_id", flat=True))
    # The GPUs' rows, locked and read again: a GPU made exclusive since the checks makes this holder exclusive too,
    # and the database then refuses a second one (gpu_set_shareable takes the same lock).
    locked = GPU.objects.select_for_update().in_bulk([gpu.pk for gpu in gpus if gpu.pk not in held])
    for gpu in locked.values():
        GPUAssignment.objects.create(instance=instance, gpu=gpu, exclusive=not gpu.shareable)


# --- GPUs idle stop gives back ----------------------------------------------------------------------------------

def gpus_give_back(instance: Instance) -> list[int]:
    """Free its GPUs for other instances (idle stop, once its container stopped), remembered in gpus_released for
    its next start. Returns their indexes."""
    with transaction.atomic():
        row = Instance.objects.select_for_update().get(pk=instance.pk)
        indexes = sorted(GPUAssignment.objects.filter(instance=row).values_list("gpu__index", flat=True))
        if indexes:
            Instance.objects.filter(pk=row.pk).update(gpus_released=sorted({*row.gpus_released, *indexes}))
            GPUAssignment.objects.filter(instance=row).delete()
    return indexes


def gpus_take_back(instance: Instance) -> list[int] | None:
    """Before a start: as many GPUs as idle stop gave back, the same ones where they are free, other free GPUs of
    its node where not. Returns the indexes it holds then, or None when nothing was given back (or GPUs were chosen
    for it since, which win). ValidationError, with nothing changed, when its node has too few free GPUs now."""
    try:
        with transaction.atomic():
            row = Instance.objects.select_for_update().select_related("node").get(pk=instance.pk)
            wanted = list(row.gpus_released)
            if not wanted:
                return None
            Instance.objects.filter(pk=row.pk).update(gpus_released=[])
            if GPUAssignment.objects.filter(instance=row).exists():
                return None
            gpus = list(GPU.objects.select_for_update().filter(node=row.node, present=True).order_by("index")
                        .prefetch_related("assignments"))
            free = [gpu for gpu in gpus if placement.gpu_is_free(gpu)]
            chosen = [gpu for gpu in free if gpu.index in wanted]
            chosen += [gpu for gpu in free if gpu not in chosen][:len(wanted) - len(chosen)]
            if len(chosen) < len(wanted):
                held = {a.gpu.index: a.instance for gpu in gpus for a in gpu.assignments.all()}
                taken = ", ".join(f"GPU {index} by '{held[index]}'" for index in wanted if index in held)
                raise ValidationError(
                    f"It needs {len(wanted)} GPU(s) again (idle stop gave back {', '.join(map(str, wanted))}), but "
                    f"node {row.node} has {len(free)} free now ({taken or 'the others are gone'} held). Stop an "
                    "instance holding one, or give this one other GPUs on its edit page.")
            for gpu in chosen:
                GPUAssignment.objects.create(instance=row, gpu=gpu, exclusive=not gpu.shareable)
    except IntegrityError as exc:
        raise ValidationError("One of the GPUs it would take was just taken by another instance; start it again.") \
            from exc
    return sorted(gpu.index for gpu in chosen)


KEEP = object()  # instance_update's `owner` when it stays as it is


def instance_update(*, instance: Instance, display_name: str, description: str, image: str, extra_args, extra_env,
                    host_port: int | None, gpu_indexes, image_arguments: str | None = None,
                    idle_stop_after: int | None = None, owner=KEEP, user=None) -> Instance:
    """Change an instance's configuration; a running container is recreated with it on the next start.
    `image_arguments` None keeps how its image takes ComfyUI's arguments; `idle_stop_after` None keeps its idle stop
    (minutes, 0 = never); `owner` KEEP keeps its owner, None leaves it without one (operators only)."""
    fields, gpus = instance_update_check(instance=instance, display_name=display_name, description=description,
                                         image=image, extra_args=extra_args, extra_env=extra_env,
                                         host_port=host_port, gpu_indexes=gpu_indexes,
                                         image_arguments=image_arguments, idle_stop_after=idle_stop_after,
                                         owner=owner)
    if host_port is None:
        host_port = instance.host_port
    access = {}
    if idle_stop_after is not None:
        access["idle_stop_after"] = idle_stop_after
    if owner is not KEEP:
        access["owner"] = owner
    # GPUs idle stop gave back, given again as they are: still given back. Any other choice is made now.
    released = instance.gpus_released if _keeps_given_back(instance, gpu_indexes) else []
    try:
        with transaction.atomic():
            Instance.objects.filter(pk=instance.pk).update(
                display_name=display_name, description=description, image=fields.image,
                extra_args=fields.extra_args, extra_env=fields.extra_env, host_port=host_port,
                image_arguments=fields.image_arguments, gpus_released=released, **access,
            )
            _assign(instance, gpus)
    except IntegrityError as exc:
        _raise_for_integrity(exc, fields, host_port, explicit_port=True, creating=False)
        raise
    instance.refresh_from_db()
    return instance


def instance_update_check(*, instance: Instance, display_name: str, description: str, image: str, extra_args,
                          extra_env, host_port: int | None, gpu_indexes, image_arguments: str | None = None,
                          idle_stop_after: int | None = None, owner=KEEP):
    """Every rule instance_update applies, without saving (the admin's form shows the refusals on its fields)."""
    errors = {}
    if idle_stop_after is not None and (problem := idle_stop_problem(idle_stop_after)):
        errors["idle_stop_after"] = [problem]
    if owner is not KEEP and owner is not None and not owner.is_active:
        errors["owner"] = [f"The user '{owner.get_username()}' is deactivated; pick an active owner or none."]
    if errors:
        raise ValidationError(errors)
    extra_args, extra_env = runtime.checked_config(extra_args, extra_env)
    if _keeps_given_back(instance, gpu_indexes):
        gpu_indexes = []  # nothing to check or assign now: its next start takes them again
    fields = InstanceFields(instance_id=instance.instance_id, display_name=display_name, description=description,
                            image=image or settings.COMFY_IMAGE, extra_args=extra_args, extra_env=extra_env,
                            host_port=host_port, gpu_indexes=list(gpu_indexes or []),
                            image_arguments=instance.image_arguments if image_arguments is None else image_arguments)
    return fields, _validate(fields, instance.node, instance)


def _keeps_given_back(instance: Instance, gpu_indexes) -> bool:
    """The GPUs asked for are exactly those idle stop gave back (gpu_choice), while it holds none."""
    return bool(instance.gpus_released) and sorted(gpu_indexes or []) == sorted(instance.gpus_released) and \
        not instance.assignments.exists()


def instance_pending_changes(instance: Instance) -> bool:
    """True when the container was made from another configuration or image (restart to apply)."""
    return bool(instance_pending_change_kinds(instance))


def instance_pending_change_kinds(instance: Instance) -> set[str]:
    """What a restart would change in the instance's container: "configuration" (its settings changed) and/or
    "image" (its image tag was rebuilt or re-pulled: it names another image id on the node now). Two inspects, of
    the container (the image id it was made from, its label) and of the image; with the engine unreachable nothing
    is known and the set is empty."""
    from . import docker_engine

    if not instance.config_hash:
        return set()
    try:
        engine = docker_engine.require_engine(instance.node.docker_host or None)
        try:
            state = docker_engine.container_state(engine, instance.container_name)
            now = docker_engine.image_id(engine, instance.image) or ""
        finally:
            engine.close()
    except docker_engine.EngineError:
        return set()
    # Made before image ids counted: no label, the hash without one. Gone: the next start makes it from `now`.
    made_from = state.labels.get(runtime.LABEL_IMAGE_ID, "") if state else now
    kinds = set()
    # GPUs idle stop gave back count as taken again, the same ones (its start takes those when free).
    given_back = (list(GPU.objects.filter(node=instance.node, index__in=instance.gpus_released).order_by("index"))
                  if instance.gpus_released else None)
    if instance.config_hash != runtime.container_spec(instance, image_id=made_from, gpus=given_back).config_hash:
        kinds.add("configuration")
    if made_from and now and made_from != now:
        kinds.add("image")
    return kinds


# --- Actions (each one an operation) -------------------------------------------------------------------------

def instance_build(*, instance: Instance, user=None):
    return operations.enqueue("instances.jobs.build_instance", target=instance, user=user, instance_pk=instance.pk)


def instance_start(*, instance: Instance, user=None):
    with transaction.atomic():  # no queue, no operation: then the desired state does not change either
        Instance.objects.filter(pk=instance.pk).update(desired_state=Instance.DesiredState.RUNNING)
        return operations.enqueue("instances.jobs.start_instance", target=instance, user=user, instance_pk=instance.pk)


def instance_stop(*, instance: Instance, user=None, reason: str = "", give_back_gpus: bool = False):
    """Stop it; `reason` is what its page says about why (default: who stopped it). `give_back_gpus`: once stopped,
    its GPUs are free for others until its next start (gpus_give_back)."""
    if not reason:
        reason = f"Stopped by {user.get_username()}." if _person(user) else "Stopped."
    with transaction.atomic():  # no queue, no operation: then the desired state does not change either
        Instance.objects.filter(pk=instance.pk).update(desired_state=Instance.DesiredState.STOPPED,
                                                       stopped_at=timezone.now(), stop_reason=reason[:300])
        return operations.enqueue("instances.jobs.stop_instance", target=instance, user=user, instance_pk=instance.pk,
                                  **({"give_back_gpus": True} if give_back_gpus else {}))


def instance_restart(*, instance: Instance, user=None):
    with transaction.atomic():  # no queue, no operation: then the desired state does not change either
        Instance.objects.filter(pk=instance.pk).update(desired_state=Instance.DesiredState.RUNNING)
        return operations.enqueue("instances.jobs.restart_instance", target=instance, user=user,
                                  instance_pk=instance.pk)


def instance_delete(*, instance: Instance, purge_data: bool = False, confirm: str = "", user=None):
    """Remove the container and the registry row; the data stays unless `purge_data` and `confirm` is the id."""
    if problem := cluster_deletion_problem(instance):
        raise ValidationError(problem)
    if purge_data and confirm != instance.instance_id:
        raise ValidationError({"confirm": [f"To delete the data too, type the instance id '{instance.instance_id}' "
                                           "exactly."]})
    return operations.enqueue("instances.jobs.delete_instance", target=instance, user=user, instance_pk=instance.pk,
                              purge_data=purge_data)


def instance_logs(*, instance: Instance, tail: int = 500) -> str:
    from . import docker_engine

    engine = docker_engine.require_engine(instance.node.docker_host or None)
    try:
        return docker_engine.container_logs(engine, instance.container_name, tail=tail)
    finally:
        engine.close()


def purge_instance_data(instance_id: str, node: Node):
    """Delete an instance's own tree (never anything shared)."""
    from storage_app import safefs

    path = layout.instance_dir(instance_id, node)
    root = layout.instances_root(node)
    if path.is_symlink() or path.resolve().parent != root.resolve():
        raise layout.LayoutError(f"Refusing to delete {path}: it does not resolve to a folder directly under {root}.")
    try:
        # Through descriptors from the instances root: links inside are removed, never followed.
        safefs.remove_tree(root, instance_id)
    except FileNotFoundError:
        pass
    except safefs.UnsafePathError as exc:
        raise layout.LayoutError(f"Refusing to delete {path}: {exc}") from None


def gpu_set_shareable(*, gpu: GPU, shareable: bool) -> GPU:
    """Allow or forbid several instances on one GPU; existing holders follow (exclusive unless shareable)."""
    with transaction.atomic():
        GPU.objects.select_for_update().get(pk=gpu.pk)  # a create adding a holder waits, then sees the new rule
        holders = list(GPUAssignment.objects.select_for_update().filter(gpu=gpu).select_related("instance"))
        if not shareable and len(holders) > 1:
            names = ", ".join(str(a.instance) for a in holders)
            raise ValidationError({"shareable": [f"GPU {gpu.index} is held by {names}; free it on all but one "
                                                 "before making it exclusive again."]})
        GPU.objects.filter(pk=gpu.pk).update(shareable=shareable)
        GPUAssignment.objects.filter(gpu=gpu).update(exclusive=not shareable)
    gpu.refresh_from_db()
    return gpu


def discover_gpus(node: Node | None = None):
    return gpus_discover(node or local_node())


# --- Workflows, templates and custom nodes (operations; the work is in workflows.py, templating.py,
# customnodes.py) ----------------------------------------------------------------------------------------------

def workflows_copy(*, source: Instance, targets: list[Instance], paths: list[str], on_conflict: str = "skip",
                   all_workflows: bool = False, user=None):
    """Copy `paths` (relative to the workflows folder) of `source`, or with `all_workflows` every workflow file it
    has now (links are never copied), to each of `targets`."""
    from . import workflows

    errors = {}
    if on_conflict not in workflows.CONFLICT_POLICIES:
        errors["on_conflict"] = [f"'{on_conflict}' is not one of skip, overwrite, rename."]
    if all_workflows and paths:
        errors["paths"] = ["Name the workflows to copy or copy them all, not both."]
    elif all_workflows:
        try:
            paths = [item["path"] for item in workflows.list_workflows(source) if not item["symlink"]]
        except workflows.WorkflowError as exc:
            errors["paths"] = [str(exc)]
        else:
            if not paths:
                errors["paths"] = [f"'{source}' has no workflows to copy."]
    elif not paths:
        errors["paths"] = ["Choose at least one workflow to copy."]
    for path in paths:
        try:
            workflows.clean_relpath(path)
        except workflows.WorkflowError as exc:
            errors.setdefault("paths", []).append(str(exc))
    targets = [t for t in targets if t.pk != source.pk]
    if not targets:
        errors["targets"] = ["Choose at least one other instance to copy to."]
    if errors:
        raise ValidationError(errors)
    from . import fanout

    target_nodes = fanout.nodes_taking_jobs(targets)
    # Targets on other nodes: the source's node reads the files and each target node's agent writes its own.
    job = "instances.jobs.copy_workflows" if [n.pk for n in target_nodes] == [source.node_id] \
        else "instances.jobs_nodes.copy_workflows_across_nodes"
    return operations.enqueue(job, target=source, user=user, source_pk=source.pk,
                              target_pks=[t.pk for t in targets], paths=list(paths), on_conflict=on_conflict)


def workflow_check(*, instance: Instance, raw: bytes) -> dict:
    """The dependency pre-flight of a workflow against `instance` (its /object_info when it runs)."""
    from . import workflows

    try:
        data = workflows.parse_workflow(raw)
        live = node_types_of(instance)
        return workflows.preflight(data, instance, live)
    except workflows.WorkflowError as exc:
        raise ValidationError({"file": [str(exc)]}) from exc


def node_types_of(instance: Instance) -> set | None:
    """The node classes the running instance offers (remembered for when it does not run)."""
    from .comfyui_api import ComfyUI, ComfyUIError

    try:
        types = sorted(ComfyUI.of(instance).object_info())
    except ComfyUIError:
        return set(instance.node_types) or None
    Instance.objects.filter(pk=instance.pk).update(node_types=types)
    return set(types)


def workflow_publish(*, instance: Instance, path: str, name: str, user=None):
    from . import workflows

    name = (name or "").strip()
    if not name or len(name) > 200 or any(c in name for c in "/@\\") or name.startswith("."):
        raise ValidationError({"name": ["A library name is 1-200 characters without '/', '\\' or '@' (the '@' "
                                        "separates a name from its version), not starting with '.'."]})
    try:
        return workflows.publish(instance, path, name, user)
    except workflows.WorkflowError as exc:
        raise ValidationError({"path": [str(exc)]}) from exc


def workflow_version_resolve(*, spec: str):
    """`NAME[@VERSION]` (no version: the latest) -> WorkflowVersion, or ValidationError saying what exists."""
    from .models import WorkflowEntry

    name, _, number = (spec or "").partition("@")
    entry = WorkflowEntry.objects.filter(name=name).first()
    if entry is None:
        raise ValidationError({"name": [f"No workflow '{name}' in the library."]})
    digits = number.isascii() and number.isdigit() and len(number) <= 9
    version = entry.versions.filter(number=int(number)).first() if digits else \
        (entry.latest() if not number else None)
    if version is None:
        have = ", ".join(str(v.number) for v in entry.versions.order_by("number"))
        raise ValidationError({"name": [f"'{spec}': no such version (have: {have})."]})
    return version


def workflow_install(*, spec: str, instances: list[Instance], user=None):
    """Install `NAME[@VERSION]` from the library into instances (an operation)."""
    version = workflow_version_resolve(spec=spec)
    if not instances:
        raise ValidationError({"instances": ["Choose at least one instance."]})
    from . import fanout

    nodes = fanout.nodes_taking_jobs(instances)
    # On one node: its queue (local's is the hub's). On several: the hub installs into local's and asks the others'
    # agents for theirs.
    job, node = ("instances.jobs.install_workflow", nodes[0]) if len(nodes) == 1 \
        else ("instances.jobs_nodes.install_workflow_on_nodes", None)
    return operations.enqueue(job, target=version.entry, node=node, user=user, version_pk=version.pk,
                              instance_pks=[i.pk for i in instances])


def template_name_problem(name) -> str | None:
    """Why `name` cannot name a template, or None (the same shape as an instance id, taken as given)."""
    if not isinstance(name, str) or not layout.INSTANCE_ID_RE.fullmatch(name) or name == "new":
        return ("Use lowercase letters, digits and '-' for a template name ('new' is taken by the page that creates "
                "one).")
    return None


TEMPLATE_MAX_GPUS = 32767


def template_gpus_problems(gpu_count, min_gpus) -> dict[str, list[str]]:
    """Why a template cannot give `gpu_count` GPUs with a minimum of `min_gpus`: {field: [message]}, empty when it
    can. The minimum is what instances made from it need (ComfyUI-MultiGPU: 2), so the count must reach it."""
    problems = {}
    for field, value in (("gpu_count", gpu_count), ("min_gpus", min_gpus)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= TEMPLATE_MAX_GPUS:
            problems[field] = [f"Give a whole number of GPUs from 0 to {TEMPLATE_MAX_GPUS}."]
    if not problems and min_gpus > gpu_count:
        problems["min_gpus"] = [f"Instances made from it get {gpu_count} GPU(s) (the GPU count) but need at least "
                                f"{min_gpus}: raise the GPU count to {min_gpus} or more, or lower the minimum."]
    return problems


def template_gpus_refusal(template, count: int) -> str | None:
    """Why an instance with `count` GPUs cannot be made from `template` (below its minimum), or None."""
    if count >= template.min_gpus:
        return None
    return (f"Template '{template}' needs at least {template.min_gpus} GPUs per instance; this one would get "
            f"{count}. Give it {template.min_gpus} or more GPUs, or pick another template.")


def template_create(*, name: str, description: str = "", image: str = "", extra_args=None, extra_env=None,
                    gpu_count: int = 0, custom_nodes=None, settings_values=None, starter_workflows=(),
                    self_service: bool = False, min_gpus: int = 0):
    """A new template; `min_gpus`: the fewest GPUs an instance made from it may have (at most `gpu_count`)."""
    from .models import InstanceTemplate
    from .templating import validate_template

    if problem := template_name_problem(name):
        raise ValidationError({"name": [problem]})
    if InstanceTemplate.objects.filter(name=name).exists():
        raise ValidationError({"name": [f"A template '{name}' already exists."]})
    validate_template(image=image, extra_args=extra_args, extra_env=extra_env, custom_nodes=custom_nodes,
                      settings=settings_values)
    if problems := template_gpus_problems(gpu_count, min_gpus):
        raise ValidationError(problems)
    extra_args, extra_env = runtime.checked_config(extra_args, extra_env)
    template = InstanceTemplate.objects.create(
        name=name, description=description, image=image, extra_args=extra_args,
        extra_env=extra_env, gpu_count=gpu_count, custom_nodes=list(custom_nodes or []),
        settings=dict(settings_values or {}), self_service=bool(self_service), min_gpus=min_gpus)
    template.starter_workflows.set(starter_workflows)
    return template


def template_update(*, template, description: str = "", image: str = "", extra_args=None, extra_env=None,
                    gpu_count: int = 0, custom_nodes=None, settings_values=None, starter_workflows=(),
                    self_service: bool | None = None, min_gpus: int | None = None):
    """Change a template (its name stays: instances and commands refer to it). Instances made from it keep their
    configuration; their drift shows what differs. `self_service` None keeps whether it is offered for
    self-service; `min_gpus` None keeps its minimum of GPUs."""
    from .models import InstanceTemplate
    from .templating import validate_template

    validate_template(image=image, extra_args=extra_args, extra_env=extra_env, custom_nodes=custom_nodes,
                      settings=settings_values)
    min_gpus = template.min_gpus if min_gpus is None else min_gpus
    if problems := template_gpus_problems(gpu_count, min_gpus):
        raise ValidationError(problems)
    extra_args, extra_env = runtime.checked_config(extra_args, extra_env)
    with transaction.atomic():
        InstanceTemplate.objects.filter(pk=template.pk).update(
            description=description, image=image, extra_args=extra_args, extra_env=extra_env, gpu_count=gpu_count,
            custom_nodes=list(custom_nodes or []), settings=dict(settings_values or {}), min_gpus=min_gpus,
            self_service=template.self_service if self_service is None else bool(self_service))
        template.starter_workflows.set(starter_workflows)
    template.refresh_from_db()
    return template


def instance_create_from_template(*, template, instance_id: str, host_port: int | None = None, node=None,
                                  user=None, owner=None, display_name: str = "", gpu_indexes=None):
    """Create an instance with the template's configuration, then apply the rest of it as an operation. It goes on
    `node` when one is given, else where placement finds the template's GPU count free; with `gpu_indexes`, on
    those GPUs of `node` (default `local`) instead of the template's count. Fewer GPUs than the template's minimum
    (min_gpus) are refused, naming the template and the minimum."""
    count = len(set(gpu_indexes)) if gpu_indexes is not None else template.gpu_count
    if refusal := template_gpus_refusal(template, count):
        raise ValidationError({"gpus": [refusal]})
    chosen = {"gpu_indexes": list(gpu_indexes)} if gpu_indexes is not None else {"gpu_count": template.gpu_count}
    with transaction.atomic():  # no queue to apply it: no half-made instance either
        instance = instance_create(instance_id=instance_id, display_name=display_name, image=template.image,
                                   extra_args=template.extra_args, extra_env=template.extra_env, host_port=host_port,
                                   node=node, user=user, owner=owner, template=template, **chosen)
        Instance.objects.filter(pk=instance.pk).update(template=template)
        instance.refresh_from_db()
        return instance, template_apply(template=template, instance=instance, user=user)


def template_apply(*, template, instance: Instance, user=None):
    return operations.enqueue("instances.jobs.apply_template", target=instance, user=user, template_pk=template.pk,
                              instance_pk=instance.pk)


def node_install(*, instance: Instance, url: str, ref: str = "", user=None):
    from . import customnodes

    try:
        customnodes.check_url(url)
        customnodes.check_name(customnodes.name_from_url(url.strip()))
    except customnodes.CustomNodeError as exc:
        raise ValidationError({"url": [str(exc)]}) from exc
    if ref.startswith("-"):
        raise ValidationError({"ref": [f"'{ref}' is not a branch, tag or commit."]})
    return operations.enqueue("instances.jobs.install_node", target=instance, user=user, instance_pk=instance.pk,
                              url=url.strip(), ref=ref.strip())


def node_action(*, instance: Instance, name: str, action: str, ref: str | None = None, user=None):
    """update, disable, enable or remove one custom node (an operation)."""
    from .models import CustomNode

    if action not in ("update", "disable", "enable", "remove"):
        raise ValidationError({"action": [f"Unknown action '{action}'."]})
    if not CustomNode.objects.filter(instance=instance, name=name).exists():
        raise ValidationError({"name": [f"{instance} has no custom node '{name}' installed by ComfyHub."]})
    return operations.enqueue("instances.jobs.custom_node_action", target=instance, user=user, instance_pk=instance.pk,
                              name=name, action=action, ref=ref)


# --- Moves (instances/moves.py) ------------------------------------------------------------------------------

def instance_free_port(node: Node, preferred: int | None = None) -> int | None:
    """A port no instance on `node` uses: `preferred` when it is in the node's range and free, else the first free
    one of the range; None when none is left."""
    if preferred is not None and node.port_range_start <= preferred <= node.port_range_end and \
            not Instance.objects.filter(node=node, host_port=preferred).exists() and \
            not port_bound_on_host(node.bind_address, preferred):
        return preferred
    return next(_free_ports(node), None)
