"""Forms of the cluster pages: a new cluster (new members on chosen GPUs, or existing instances adopted), adding and
removing a worker, deleting a cluster. They turn what was typed into rows; instances/clusters.py has the rules and
its refusals come back next to the fields they name."""
from django import forms
from django.core.exceptions import ValidationError
from django.db.models import Prefetch, Q

from comfyhub.forms import ServiceForm

from . import placement, services
from .forms import AnyChoiceField, AnyMultipleChoiceField
from .models import GPU, LOCAL_NODE, Cluster, GPUAssignment, Instance, InstanceTemplate, Node

# One line per new member: far more than a page is a paste gone wrong.
NEW_MEMBERS_MAX_CHARS = 4000
NEW_MEMBERS_MAX_LINES = 64

NEW_MEMBERS_HELP = (
    "One line per new member: the node, a colon, its GPU indexes, e.g. <code>local: 0</code> then "
    "<code>local: 1</code> then <code>gpu-b: 0,1</code>. Each line makes one instance from the template above "
    "(ids <code>&lt;name&gt;-master</code>, <code>&lt;name&gt;-w1</code>, …); the first is the master unless one is "
    "adopted below.")


def _text(value) -> str | None:
    """The value as a lookup may take it: None for one no row can have (a NUL byte: PostgreSQL refuses it)."""
    return value if isinstance(value, str) and "\x00" not in value and len(value) <= 200 else None


def instance_named(instance_id: str) -> Instance:
    instance = Instance.objects.select_related("node").filter(instance_id=_text(instance_id)).first()
    if instance is None:
        shown = instance_id if _text(instance_id) is not None else instance_id[:40].replace("\x00", "")
        raise ValidationError(f"There is no instance '{shown}'. Pick one from the list.")
    return instance


def free_instances():
    """Instances in no cluster: those a new cluster can adopt, and those a cluster can take as a worker."""
    return (Instance.objects.select_related("node").filter(cluster_as_master__isnull=True,
                                                           cluster_membership__isnull=True)
            .order_by("instance_id"))


def _instance_choices(instances) -> list[tuple[str, str]]:
    return [(i.instance_id, f"{i.instance_id} (node {i.node}, {i.get_status_display().lower()})") for i in instances]


class ClusterForm(ServiceForm):
    """A new cluster; `arguments()` gives clusters.cluster_create's keyword arguments (but `user`)."""

    # Not stripped: a name is taken exactly as typed, so "abc\n" is refused rather than becoming "abc".
    name = forms.CharField(
        required=False, strip=False, max_length=Cluster._meta.get_field("name").max_length,
        help_text="Lowercase letters, digits and '-'. It names the cluster's page, its Docker network and the ids of "
                  "the members made for it.")
    description = forms.CharField(required=False, max_length=2000, widget=forms.Textarea(attrs={"rows": 2}))
    template = AnyChoiceField(
        required=False,
        help_text="What the new members are made from (image, custom nodes, settings); not needed when every member "
                  "is adopted. ComfyUI-Distributed is installed into every member at its pinned version.")
    new_members = forms.CharField(
        label="New members", required=False, max_length=NEW_MEMBERS_MAX_CHARS, help_text=NEW_MEMBERS_HELP,
        widget=forms.Textarea(attrs={"rows": 4, "spellcheck": "false", "placeholder": "local: 0\nlocal: 1"}))
    master = AnyChoiceField(
        label="Adopt as master", required=False,
        help_text="An existing instance to be the master (it keeps its folder, port and GPUs).")
    workers = AnyMultipleChoiceField(
        label="Adopt as workers", required=False, widget=forms.SelectMultiple(attrs={"size": 6}),
        help_text="Existing instances to be workers (Ctrl-click to choose several). An instance is a worker of at "
                  "most one cluster, and never of its own.")
    cors_origin = forms.CharField(
        label="CORS origin", required=False, max_length=Cluster._meta.get_field("cors_origin").max_length,
        help_text="What the members' <code>--enable-cors-header</code> allows. Empty: the hub's own origin "
                  "(HUB_ORIGIN). Only operators may set it; <code>*</code> lets any web page call the members.")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["template"].choices = [("", "choose one (new members need one)"), *(
            (t.name, t.name + (f" ({t.description[:60]})" if t.description else ""))
            for t in InstanceTemplate.objects.order_by("name"))]
        choices = _instance_choices(free_instances())
        self.fields["master"].choices = [("", "none: the first new member"), *choices]
        self.fields["workers"].choices = choices

    def node_gpus(self):
        """The nodes new members may go on, with their GPUs and who holds each, to choose from."""
        holders = Prefetch("assignments", queryset=GPUAssignment.objects.select_related("instance"))
        gpus = Prefetch("gpus", queryset=GPU.objects.filter(present=True).prefetch_related(holders),
                        to_attr="present_gpus")
        nodes = Node.objects.filter(Q(approved=True) | Q(name=LOCAL_NODE)).prefetch_related(gpus)
        return [{"node": node, "gpus": [{"gpu": gpu, "holders": [a.instance for a in gpu.assignments.all()]}
                                        for gpu in node.present_gpus]}
                for node in sorted(nodes, key=lambda n: (n.name != LOCAL_NODE, n.name))]

    def clean_template(self):
        name = self.cleaned_data["template"]
        if not name:
            return None
        template = InstanceTemplate.objects.filter(name=_text(name)).first()
        if template is None:
            known = ", ".join(InstanceTemplate.objects.values_list("name", flat=True)) or "none"
            raise ValidationError(f"There is no template by that name. Known: {known}.")
        return template

    def clean_new_members(self):
        members = []
        lines = [line for line in self.cleaned_data["new_members"].splitlines() if line.strip()]
        if len(lines) > NEW_MEMBERS_MAX_LINES:
            raise ValidationError(f"{len(lines)} new members; a cluster takes at most {NEW_MEMBERS_MAX_LINES} here.")
        for number, line in enumerate(lines, start=1):
            node_name, colon, gpus = line.partition(":")
            where = f"Line {number} ({line.strip()[:60]})"
            if not colon or not node_name.strip():
                raise ValidationError(f"{where}: write the node, a colon and its GPU indexes, e.g. 'local: 0'.")
            try:
                node = placement.node_for_new_instance(node_name.strip())
                indexes = services.parse_gpu_selection(gpus)
            except ValidationError as exc:
                raise ValidationError(f"{where}: {' '.join(exc.messages)}") from exc
            members.append((node, indexes))
        return members

    def clean_master(self):
        instance_id = self.cleaned_data["master"]
        return instance_named(instance_id) if instance_id else None

    def clean_workers(self):
        workers, errors = [], []
        for instance_id in self.cleaned_data["workers"]:
            try:
                workers.append(instance_named(instance_id))
            except ValidationError as exc:
                errors.extend(exc.messages)
        if errors:
            raise ValidationError(errors)
        return workers

    def arguments(self) -> dict:
        data = self.cleaned_data
        return {"name": data["name"], "description": data["description"], "cors_origin": data["cors_origin"],
                "template": data["template"], "new_members": data["new_members"], "master": data["master"],
                "workers": data["workers"]}


class ClusterWorkerForm(ServiceForm):
    """Add a worker (an instance in no cluster)."""

    instance = AnyChoiceField(label="Instance", required=True)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["instance"].choices = [("", "choose an instance"), *_instance_choices(free_instances())]

    def clean_instance(self):
        return instance_named(self.cleaned_data["instance"])


class ClusterRemoveWorkerForm(ServiceForm):
    """Remove a worker: the instance, and `confirm=yes` from the confirming page's button."""

    instance = forms.CharField(required=True, strip=False)
    confirm = forms.CharField(required=False)

    def __init__(self, *args, cluster: Cluster, **kwargs):
        super().__init__(*args, **kwargs)
        self.cluster = cluster

    def clean_instance(self):
        instance = instance_named(self.cleaned_data["instance"])
        if not self.cluster.workers.filter(instance=instance).exists():
            raise ValidationError(f"'{instance}' is not a worker of cluster {self.cluster}.")
        return instance

    def confirmed(self) -> bool:
        return self.cleaned_data.get("confirm") == "yes"


class ClusterDeleteForm(ServiceForm):
    confirm = forms.CharField(label="Type the cluster's name to confirm", required=False, strip=False)

    def __init__(self, *args, cluster: Cluster, **kwargs):
        super().__init__(*args, **kwargs)
        self.cluster = cluster

    def clean_confirm(self):
        if self.cleaned_data["confirm"] != self.cluster.name:
            raise ValidationError(f"Type {self.cluster.name} to delete this cluster.")
        return True
