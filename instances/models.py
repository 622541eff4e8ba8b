"""The registry: Docker hosts (nodes), their GPUs, and the ComfyUI instances that run on them."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from comfyhub import queues

LOCAL_NODE = "local"
# A node whose agent missed this many heartbeats in a row is offline.
NODE_OFFLINE_AFTER_MISSED = 3


def offline_after() -> timedelta:
    return timedelta(seconds=NODE_OFFLINE_AFTER_MISSED * settings.NODE_HEARTBEAT_SECONDS)


@dataclass(frozen=True)
class NodeState:
    kind: str  # "hub" (local), "online", "offline", "never" (no heartbeat yet)
    since: datetime | None
    approved: bool

    @property
    def online(self) -> bool:
        return self.kind in ("hub", "online")

    @property
    def label(self) -> str:
        if self.kind == "hub":
            return "served by the hub"
        if self.kind == "never":
            words = "no heartbeat yet"
        else:
            words = f"{self.kind} since {timezone.localtime(self.since):%Y-%m-%d %H:%M:%S}"
        return words if self.approved else f"waiting for approval ({words})"


def node_state(node: Node, now: datetime | None = None) -> NodeState:
    """Online while its heartbeats keep coming; offline since one interval after the last one, once three are
    missed. `local` is served by the hub's own workers."""
    if node.name == LOCAL_NODE and node.last_heartbeat_at is None:
        return NodeState("hub", None, node.approved)
    if node.last_heartbeat_at is None:
        return NodeState("never", None, node.approved)
    now = now or timezone.now()
    if now - node.last_heartbeat_at <= offline_after():
        return NodeState("online", node.online_since or node.last_heartbeat_at, node.approved)
    return NodeState("offline", node.last_heartbeat_at + timedelta(seconds=settings.NODE_HEARTBEAT_SECONDS),
                     node.approved)


class Node(models.Model):
    """A GPU host with its own Docker engine. `local`, served by the hub's own workers, exists from the start; others
    register themselves when their agent starts."""

    name = models.SlugField(max_length=63, unique=True)
    docker_host = models.CharField(
        max_length=300, blank=True, default="", help_text="Docker endpoint; empty means DOCKER_HOST or the local socket."
    )
    shared_path = models.CharField(max_length=500, blank=True, default="", help_text="Empty means COMFY_SHARED_PATH.")
    instances_path = models.CharField(
        max_length=500, blank=True, default="", help_text="Empty means COMFY_INSTANCES_PATH."
    )
    bind_address = models.GenericIPAddressField(
        default="127.0.0.1", help_text="Host address instance ports are published on (ComfyUI has no login)."
    )
    port_range_start = models.PositiveIntegerField(default=8188, validators=[MinValueValidator(1024)])
    port_range_end = models.PositiveIntegerField(default=8387, validators=[MaxValueValidator(65535)])
    gpus_discovered_at = models.DateTimeField(null=True, blank=True)
    gpu_source = models.CharField(max_length=20, blank=True, default="", help_text="nvml, settings or none")
    created_at = models.DateTimeField(default=timezone.now)
    # A node agent (instances/agent.py, `manage.py agent`) registers its node and reports a heartbeat; the hub's own
    # workers serve `local`. Nothing may be placed on a node until an operator approves it (instances/nodes.py).
    approved = models.BooleanField(
        default=True, help_text="An operator approved it: its agent takes jobs. Nodes their agent registered start "
                                "unapproved.")
    registered_at = models.DateTimeField(
        null=True, blank=True, help_text="When its agent registered it; empty for nodes an operator made.")
    last_heartbeat_at = models.DateTimeField(null=True, blank=True, help_text="Its agent's last heartbeat.")
    online_since = models.DateTimeField(
        null=True, blank=True, help_text="The first heartbeat after it was offline (or had never reported).")
    heartbeat = models.JSONField(
        default=dict, blank=True, help_text="What its agent reported last: GPUs, Docker and ComfyHub versions, free "
                                            "space on its storage roots, load.")

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    # --- Where its jobs run: comfyhub.operations.enqueue asks these of the node an operation is for ----------------

    def job_queue(self, base: str = "default") -> str:
        """The queue for its jobs of kind `base` ("default" or "long"): the hub's own for `local`, node.<name>[.long]
        (its agent's) for any other."""
        if self.name == LOCAL_NODE:
            return base
        return queues.node_queue(self.name, base)

    def state(self):
        """Online, offline since when, or never reported (instances.nodes.NodeState), from this row alone."""
        return node_state(self)

    def refusal(self) -> str:
        """Why no job may be sent to it now, or "" when one may: `local` always takes jobs (the hub's workers),
        another node once it is approved and its agent's heartbeats come."""
        if self.name == LOCAL_NODE:
            return ""
        start = f"start its agent on that host (`manage.py agent --node {self.name}`), then try again"
        if not self.approved:
            return (f"Node {self.name} is waiting for approval, so its agent takes no jobs and nothing was queued: "
                    f"approve it (`manage.py hosts approve {self.name}` or on the Nodes page), then try again.")
        state = self.state()
        if state.kind == "never":
            return f"Node {self.name} has no agent yet (it never sent a heartbeat); nothing was queued: {start}."
        if state.kind == "offline":
            return (f"Node {self.name} is offline since {timezone.localtime(state.since):%Y-%m-%d %H:%M:%S} (no "
                    f"heartbeat from its agent); nothing was queued: {start}.")
        return ""

    def offline_note(self) -> str:
        """What its instances' status is while its agent is away ("node offline since …"): their recorded status
        is from before, so they are shown unknown. "" while it is online, and for `local`."""
        if self.name == LOCAL_NODE:
            return ""
        state = self.state()
        if state.kind == "offline":
            return f"node offline since {timezone.localtime(state.since):%Y-%m-%d %H:%M:%S}"
        if state.kind == "never":
            return "node has no agent yet"
        return ""


class GPU(models.Model):
    node = models.ForeignKey(Node, on_delete=models.CASCADE, related_name="gpus")
    index = models.PositiveSmallIntegerField()
    uuid = models.CharField(max_length=100, blank=True, default="")
    name = models.CharField(max_length=200, blank=True, default="")
    memory_total = models.BigIntegerField(null=True, blank=True, help_text="Bytes")
    shareable = models.BooleanField(
        default=False, help_text="Allow several instances on this GPU (they then compete for its memory)."
    )
    present = models.BooleanField(default=True, help_text="Seen in the last discovery.")

    class Meta:
        ordering = ["node", "index"]
        constraints = [models.UniqueConstraint(fields=["node", "index"], name="gpu_unique_index_per_node")]
        verbose_name = "GPU"

    def __str__(self):
        return f"GPU {self.index}" + (f" ({self.name})" if self.name else "")

    @property
    def device_id(self):
        """What Docker's device request names: the UUID when known (indexes can be renumbered), else the index."""
        return self.uuid or str(self.index)


class Instance(models.Model):
    class DesiredState(models.TextChoices):
        RUNNING = "running", "Running"
        STOPPED = "stopped", "Stopped"

    class Status(models.TextChoices):
        NEW = "new", "Not built"
        STOPPED = "stopped", "Stopped"
        STARTING = "starting", "Starting"
        HEALTHY = "healthy", "Healthy"
        UNHEALTHY = "unhealthy", "Unhealthy"
        CRASH_LOOPING = "crash-looping", "Crash-looping"
        ERROR = "error", "Error"
        UNKNOWN = "unknown", "Unknown"

    instance_id = models.CharField(
        "instance id", max_length=63, unique=True,
        help_text="Directory and container name: lowercase letters, digits and '-', starting and ending with a "
                  "letter or digit.",
    )
    display_name = models.CharField(max_length=100, blank=True, default="")
    description = models.TextField(blank=True, default="")
    node = models.ForeignKey(Node, on_delete=models.PROTECT, related_name="instances")
    image = models.CharField(max_length=300)
    extra_args = models.JSONField(default=list, blank=True, help_text="Extra ComfyUI arguments.")
    extra_env = models.JSONField(default=dict, blank=True, help_text="Extra environment variables.")
    image_arguments = models.CharField(
        max_length=80, default="command",
        help_text="How the image takes ComfyUI's arguments: 'command' (as the container's command: ComfyHub's image, "
                  "most images) or 'env:NAME' (in the environment variable NAME, e.g. env:CLI_ARGS).")
    host_port = models.PositiveIntegerField(validators=[MinValueValidator(1024), MaxValueValidator(65535)])
    gpus = models.ManyToManyField(GPU, through="GPUAssignment", related_name="instances", blank=True)
    template = models.ForeignKey("InstanceTemplate", null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="instances")
    snapshot_every_hours = models.PositiveIntegerField(
        default=0, help_text="Take a config snapshot this often (0 = never).")
    snapshot_keep = models.PositiveIntegerField(default=7, help_text="Scheduled snapshots to keep.")
    node_types = models.JSONField(default=list, blank=True,
                                  help_text="Node classes ComfyUI listed (/object_info) the last time it ran.")

    desired_state = models.CharField(max_length=10, choices=DesiredState.choices, default=DesiredState.STOPPED)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.NEW, db_index=True)
    status_detail = models.CharField(max_length=500, blank=True, default="")
    container_id = models.CharField(max_length=80, blank=True, default="")
    config_hash = models.CharField(max_length=64, blank=True, default="", help_text="Of the running container.")
    restart_count = models.PositiveIntegerField(default=0)
    health = models.JSONField(default=dict, blank=True, help_text="Last health and isolation check results.")
    library_check = models.JSONField(
        default=dict, blank=True, help_text="What the instance saw of the shared model library at the last check.")
    checked_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Who may use it (instances/access.py): its owner, those it is shared with, operators and superusers.
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="owned_instances",
        help_text="May open it through the hub and share it; with 'create own instances', start and stop it too.")
    # Idle stop (instances/idle.py): 0 = never.
    idle_stop_after = models.PositiveIntegerField(
        default=0, help_text="Stop it after this many minutes with no traffic through the hub and an empty ComfyUI "
                             "queue (0 = never).")
    last_activity_at = models.DateTimeField(
        null=True, blank=True, help_text="Last request through the hub or work in ComfyUI's queue.")
    # GPUs idle stop gave back (their indexes): free for other instances meanwhile; its next start takes them again,
    # the same ones when free (services.gpus_take_back).
    gpus_released = models.JSONField(
        default=list, blank=True, help_text="GPUs idle stop gave back; its next start takes as many again.")
    stopped_at = models.DateTimeField(null=True, blank=True)
    stop_reason = models.CharField(max_length=300, blank=True, default="", help_text="Why it was last stopped.")
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["instance_id"]
        constraints = [
            models.UniqueConstraint(fields=["node", "host_port"], name="instance_unique_port_per_node"),
        ]
        permissions = [
            ("start_instance", "Can start, stop and restart instances"),
            ("build_instance", "Can build instance directories"),
            ("manage_workflows", "Can copy, publish and install workflows"),
            ("manage_custom_nodes", "Can install, update, disable and remove custom nodes"),
            ("use_any_instance", "Can use every instance through the hub"),
            ("create_own_instance", "Can create own instances from self-service templates and start and stop them"),
        ]

    def __str__(self):
        return self.instance_id

    def get_absolute_url(self):
        return reverse("instance-detail", args=[self.instance_id])

    @property
    def name(self):
        return self.display_name or self.instance_id

    @property
    def container_name(self):
        return f"{settings.CONTAINER_NAME_PREFIX}{self.instance_id}"

    @property
    def arguments_variable(self) -> str:
        """The environment variable the image reads ComfyUI's arguments from; "" when they are its command."""
        from .runtime import arguments_variable

        return arguments_variable(self.image_arguments) or ""

    @property
    def cpu_only(self):
        return not self.assigned_gpus()

    def assigned_gpus(self):
        """GPUs in index order; uses prefetched assignments when present."""
        return sorted((a.gpu for a in self.assignments.all()), key=lambda gpu: gpu.index)

    def gpu_choice(self) -> list[int]:
        """The GPU indexes it is meant to run on: those it holds, or those idle stop gave back (its next start takes
        them again). What edits pass to keep its GPUs as they are."""
        return [gpu.index for gpu in self.assigned_gpus()] or list(self.gpus_released)

    @property
    def hub_path(self):
        """Where people open it: through the hub's proxy (docker/nginx), which checks who may use it."""
        return f"/i/{self.instance_id}/"

    @property
    def url(self):
        """Its published port on the node: for ComfyHub itself and the node's own administrators, not for people."""
        from .comfyui_api import base_url

        host = self.node.bind_address
        if host in ("0.0.0.0", "::"):
            host = "localhost"
        return base_url(host, self.host_port) + "/"


class GPUAssignment(models.Model):
    """An instance holding a GPU. `exclusive` copies the GPU's shareability when assigned, so the database itself
    refuses a second holder of an exclusive GPU, even when two requests race."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="assignments")
    gpu = models.ForeignKey(GPU, on_delete=models.CASCADE, related_name="assignments")
    exclusive = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["instance", "gpu"], name="assignment_unique_pair"),
            models.UniqueConstraint(fields=["gpu"], condition=Q(exclusive=True), name="assignment_exclusive_gpu"),
        ]


class InstanceShare(models.Model):
    """An instance shared with one user or with one group: they may use it through the hub."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="shares")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="instance_shares")
    group = models.ForeignKey("auth.Group", null=True, blank=True, on_delete=models.CASCADE,
                              related_name="instance_shares")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["instance", "pk"]
        constraints = [
            models.CheckConstraint(
                condition=(Q(user__isnull=False, group__isnull=True) | Q(user__isnull=True, group__isnull=False)),
                name="share_user_xor_group"),
            models.UniqueConstraint(fields=["instance", "user"], condition=Q(user__isnull=False),
                                    name="share_unique_user"),
            models.UniqueConstraint(fields=["instance", "group"], condition=Q(group__isnull=False),
                                    name="share_unique_group"),
        ]

    def __str__(self):
        return f"{self.instance} → {self.user or f'group {self.group}'}"


class InstanceOpen(models.Model):
    """Someone opened an instance through the hub (one row per person and way in per ACCESS_OPEN_RECORD_MINUTES,
    not one per request)."""

    class Via(models.TextChoices):
        BROWSER = "browser", "Browser"
        TOKEN = "token", "Token"

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="opens")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    via = models.CharField(max_length=10, choices=Via.choices, default=Via.BROWSER)
    token = models.ForeignKey("comfyhub.AccessToken", null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="+")
    at = models.DateTimeField(default=timezone.now, db_index=True)

    class Meta:
        ordering = ["-at"]
        indexes = [models.Index(fields=["instance", "user", "via", "at"], name="open_lookup")]

    def __str__(self):
        return f"{self.user} opened {self.instance} at {self.at:%Y-%m-%d %H:%M}"


class InstanceTemplate(models.Model):
    """Shared configuration: what a new instance starts from, and what an instance's drift is measured against."""

    name = models.SlugField(max_length=63, unique=True)
    description = models.TextField(blank=True, default="")
    image = models.CharField(max_length=300, blank=True, default="", help_text="Empty means COMFY_IMAGE.")
    extra_args = models.JSONField(default=list, blank=True)
    extra_env = models.JSONField(default=dict, blank=True)
    gpu_count = models.PositiveSmallIntegerField(default=0, help_text="GPUs to assign (0 = CPU mode).")
    custom_nodes = models.JSONField(default=list, blank=True, help_text='[{"url": "...", "ref": "..."}]')
    settings = models.JSONField(default=dict, blank=True, help_text="comfy.settings.json values.")
    starter_workflows = models.ManyToManyField("WorkflowVersion", blank=True, related_name="templates")
    self_service = models.BooleanField(
        default=False, help_text="Users with 'create own instances' may create instances from it for themselves.")
    min_gpus = models.PositiveSmallIntegerField(
        default=0, help_text="Instances made from it need at least this many GPUs (2 for the multi-GPU template).")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class WorkflowEntry(models.Model):
    """A workflow in the shared library; each publish of different content is a new version."""

    name = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "workflow entries"

    def __str__(self):
        return self.name

    def latest(self):
        return self.versions.order_by("-number").first()


class WorkflowVersion(models.Model):
    entry = models.ForeignKey(WorkflowEntry, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    sha256 = models.CharField(max_length=64)
    content = models.TextField()
    published_from = models.CharField(max_length=300, blank=True, default="", help_text="instance:path")
    author = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                               related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["entry", "-number"]
        constraints = [
            models.UniqueConstraint(fields=["entry", "number"], name="workflow_version_number"),
            models.UniqueConstraint(fields=["entry", "sha256"], name="workflow_version_content"),
        ]

    def __str__(self):
        return f"{self.entry.name}@{self.number}"


class WorkflowInstall(models.Model):
    """A library version written into an instance's workflows folder."""

    version = models.ForeignKey(WorkflowVersion, on_delete=models.CASCADE, related_name="installs")
    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="workflow_installs")
    path = models.CharField(max_length=500, help_text="Relative to user/default/workflows.")
    installed_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["instance", "path"], name="workflow_install_path")]


class CustomNode(models.Model):
    """A custom node package installed into an instance's custom_nodes/ from git."""

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="custom_nodes")
    name = models.CharField(max_length=200, help_text="Folder under custom_nodes/.")
    url = models.CharField(max_length=500)
    ref = models.CharField(max_length=200, blank=True, default="")
    commit = models.CharField(max_length=64, blank=True, default="")
    requirements = models.TextField(blank=True, default="", help_text="requirements.txt at install time.")
    installed_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["instance", "name"]
        constraints = [models.UniqueConstraint(fields=["instance", "name"], name="custom_node_name")]

    def __str__(self):
        return f"{self.instance}/{self.name}"


class Cluster(models.Model):
    """A ComfyUI-Distributed cluster: a master instance and worker instances, whose gpu_config.json files ComfyHub
    writes and keeps in sync (instances.clusters)."""

    name = models.SlugField(max_length=63, unique=True)
    description = models.TextField(blank=True, default="")
    master = models.OneToOneField(Instance, on_delete=models.PROTECT, related_name="cluster_as_master")
    cors_origin = models.CharField(
        max_length=300, blank=True, default="",
        help_text="What the members' --enable-cors-header allows: empty means the hub's origin (HUB_ORIGIN); '*' only "
                  "when an operator sets it.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                                   related_name="+")
    created_at = models.DateTimeField(default=timezone.now)
    synced_at = models.DateTimeField(null=True, blank=True, help_text="When the members' configuration was last written.")
    sync_detail = models.CharField(max_length=500, blank=True, default="", help_text="Why the last sync failed.")

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def get_absolute_url(self):
        return reverse("cluster-detail", args=[self.name])


class ClusterWorker(models.Model):
    """One worker of a cluster. An instance is a worker of at most one cluster (and never its own master)."""

    cluster = models.ForeignKey(Cluster, on_delete=models.CASCADE, related_name="workers")
    instance = models.OneToOneField(Instance, on_delete=models.PROTECT, related_name="cluster_membership")
    added_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["cluster", "instance__instance_id"]

    def __str__(self):
        return f"{self.cluster}/{self.instance}"


def cluster_membership(instance: Instance) -> tuple[Cluster, str] | None:
    """(cluster, "master" | "worker") for a member, None for any other instance (asked of the database, never of
    relations cached on the object)."""
    cluster = Cluster.objects.select_related("master__node").filter(master_id=instance.pk).first()
    if cluster is not None:
        return cluster, "master"
    row = ClusterWorker.objects.select_related("cluster__master__node").filter(instance_id=instance.pk).first()
    return (row.cluster, "worker") if row is not None else None


def note_in_use(instance_pks, now) -> None:
    """Mark these instances used at `now` (traffic through the hub, work in their queue), and with each every member
    of its cluster: a worker gets its work from its master, never through the hub, so a cluster's members are busy or
    idle together (instances/idle.py). A later moment already recorded is kept."""
    pks = set(instance_pks)
    if not pks:
        return
    clusters = Cluster.objects.filter(Q(master_id__in=pks) | Q(workers__instance_id__in=pks)).values("pk")
    pks |= set(Cluster.objects.filter(pk__in=clusters).values_list("master_id", flat=True))
    pks |= set(ClusterWorker.objects.filter(cluster_id__in=clusters).values_list("instance_id", flat=True))
    Instance.objects.filter(pk__in=pks).filter(Q(last_activity_at__isnull=True) | Q(last_activity_at__lt=now)) \
        .update(last_activity_at=now)


def cluster_deletion_problem(instance: Instance) -> str | None:
    """Why `instance` may not be deleted now (it is a cluster's member), or None."""
    found = cluster_membership(instance)
    if found is None:
        return None
    cluster, role = found
    if role == "master":
        return (f"'{instance}' is the master of cluster '{cluster}'; delete the cluster first (its members stay as "
                f"plain instances): `manage.py clusters delete {cluster}`.")
    return (f"'{instance}' is a worker of cluster '{cluster}'; remove it from the cluster first: "
            f"`manage.py clusters remove-worker {cluster} {instance}`.")
