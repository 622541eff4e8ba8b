from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.template.defaultfilters import filesizeformat

from comfyhub.forms import ServiceForm
from instances.forms import AnyChoiceField
from instances.models import GPU, Instance

from .models import ModelAsset, Snapshot


class ModelFilterForm(forms.Form):
    q = forms.CharField(required=False, label="Search", widget=forms.TextInput(attrs={"placeholder": "name or hash"}))
    folder = forms.ChoiceField(required=False)
    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *ModelAsset.Status.choices])

    def __init__(self, *args, folders=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["folder"].choices = [("", "All folders"), *[(f, f) for f in folders]]

    def filter(self, queryset):
        if not self.is_valid():
            return queryset
        data = self.cleaned_data
        if data["folder"]:
            queryset = queryset.filter(folder=data["folder"])
        if data["status"]:
            queryset = queryset.filter(status=data["status"])
        if data["q"]:
            term = data["q"].strip()
            queryset = queryset.filter(path__icontains=term) | queryset.filter(sha256__startswith=term.lower())
        return queryset


class ImportHashesForm(forms.Form):
    file = forms.FileField(help_text="sha256sum format: '<sha256>  <path relative to shared/models>' per line.")


# --- Snapshots, legacy migration ---------------------------------------------------------------------------------

MANAGER_SNAPSHOT_MAX_BYTES = 2 << 20  # a ComfyUI-Manager snapshot lists nodes and pips: a few kilobytes


class SnapshotCreateForm(ServiceForm):
    kind = forms.ChoiceField(choices=Snapshot.Kind.choices, initial=Snapshot.Kind.CONFIG, widget=forms.RadioSelect)
    include_output = forms.BooleanField(label="Include output/ (generated images) and input/ (its uploads)",
                                        required=False)
    note = forms.CharField(required=False, max_length=Snapshot._meta.get_field("note").max_length,
                           widget=forms.TextInput(attrs={"placeholder": "e.g. before upgrading the nodes"}))


class ManagerImportForm(ServiceForm):
    file = forms.FileField(
        label="ComfyUI-Manager snapshot",
        help_text="The .json file ComfyUI-Manager saves under user/default/ComfyUI-Manager/snapshots/.")

    def clean_file(self):
        from comfyhub import jsonlimits

        upload = self.cleaned_data["file"]
        if upload.size > MANAGER_SNAPSHOT_MAX_BYTES:
            raise ValidationError(f"That file is {filesizeformat(upload.size)}; a ComfyUI-Manager snapshot is a few "
                                  "kilobytes. Check you picked the right file.")
        try:
            self.cleaned_data["data"] = jsonlimits.loads(jsonlimits.read_upload(upload),
                                                         what=f"The snapshot file {upload.name}")
        except jsonlimits.JSONInputError as exc:
            raise ValidationError(f"{exc} Pick the .json file ComfyUI-Manager saved.") from exc
        return upload


class SnapshotDeleteForm(forms.Form):
    """Deleting a snapshot asks for its number typed out: a bare POST deletes nothing."""

    confirm = forms.CharField(label="Type the snapshot number to confirm", required=False, strip=False)

    def __init__(self, *args, snapshot: Snapshot, **kwargs):
        self.snapshot = snapshot
        super().__init__(*args, **kwargs)

    def clean_confirm(self):
        if self.cleaned_data["confirm"] != str(self.snapshot.pk):
            raise ValidationError(f"Type the snapshot number {self.snapshot.pk} exactly to delete it.")
        return self.cleaned_data["confirm"]


class SnapshotScheduleForm(forms.ModelForm):
    """The two schedule fields of an instance, with their bounds (the model only says "not negative")."""

    snapshot_every_hours = forms.IntegerField(
        label="Snapshot every (hours)", min_value=0, max_value=720,
        help_text="A config snapshot this often; 0 turns the schedule off. At most 720 (30 days).")
    snapshot_keep = forms.IntegerField(
        label="Keep the last", min_value=1, max_value=1000,
        help_text="Scheduled snapshots to keep (1 to 1000); older scheduled ones are deleted. Snapshots taken by "
                  "hand are never deleted automatically.")

    class Meta:
        model = Instance
        fields = ["snapshot_every_hours", "snapshot_keep"]


class SnapshotCloneForm(ServiceForm):
    new_instance_id = forms.CharField(  # not stripped: "abc\n" is refused, never quietly made into "abc"
        label="New instance id", strip=False,
        help_text="Names its folder and container: lowercase letters, digits and '-'.")
    node = AnyChoiceField(label="Node", required=False,
                          help_text="The GPU host the clone is made on and runs on; the GPUs below are this node's. "
                                    "Another node reads the snapshot through the shared COMFY_BACKUPS_PATH.")
    gpus = forms.MultipleChoiceField(label="GPUs", required=False, widget=forms.CheckboxSelectMultiple,
                                     help_text="Free GPUs of this node; none checked: the clone runs on the CPU.")

    def __init__(self, *args, node: str = "", **kwargs):
        """`node`: the name of the node whose GPUs an unbound form lists (a bound one lists the node it was sent
        with). The Node choice is shown only when there is more than one approved node."""
        super().__init__(*args, **kwargs)
        from instances import placement

        choices = placement.candidates(approved=True)
        self.node_shown = _node_shown(self.data.get("node") if self.is_bound else node)
        if len(choices) > 1:
            self.fields["node"].choices = [
                (c.node.name, f"{c.node} ({'served by the hub' if c.is_local else (c.why_not or 'online')}; "
                              f"{len(c.free)} of {c.total} GPUs free)") for c in choices]
            self.fields["node"].initial = self.node_shown.name
        else:
            del self.fields["node"]
        self.free_gpus = free_gpus(self.node_shown)
        self.fields["gpus"].choices = [(str(gpu.index), str(gpu)) for gpu in self.free_gpus]

    def clean_node(self):
        from instances import placement

        try:
            return placement.node_for_new_instance(self.cleaned_data["node"])
        except ValidationError as exc:  # the service's {"node": [...]}, shown on this field
            raise ValidationError(exc.messages) from exc

    def clean_gpus(self):
        return [int(index) for index in self.cleaned_data["gpus"]]


def _node_shown(name):
    """The approved node named, whose GPUs the form lists; `local` for none or one that cannot be had (the service
    says why when the form is sent)."""
    from instances.models import Node
    from instances.services import local_node

    if isinstance(name, str) and name and "\x00" not in name:
        node = Node.objects.filter(name=name, approved=True).first()
        if node is not None:
            return node
    return local_node()


def free_gpus(node=None):
    """`node`'s (default the local node's) present GPUs that no instance holds, or that may be shared: what a clone
    may be given. Only which checkboxes to offer; creating the clone checks the GPUs again."""
    from django.db.models import Count, Q

    from instances.services import local_node

    return list(GPU.objects.filter(node=node or local_node(), present=True).annotate(holders=Count("assignments"))
                .filter(Q(shareable=True) | Q(holders=0)).order_by("index"))  # aggregated: no default order


class LegacyPlanForm(ServiceForm):
    source = forms.CharField(label="Source folder", help_text="The old install: a ComfyUI folder, or the ./data "
                                                              "folder of the single-instance setup.",
                             widget=forms.TextInput(attrs={"placeholder": "/srv/ComfyUI"}))
    instance_id = forms.CharField(label="Instance id", required=False, strip=False,
                                  help_text="The instance that receives custom_nodes, user and output.")
    mode = forms.ChoiceField(choices=[("move", "Move (rename; the source is emptied)"),
                                      ("copy", "Copy (the source is kept)")], initial="move",
                             widget=forms.RadioSelect)

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("initial", {"instance_id": settings.COMFY_INSTANCE_ID, "mode": "move"})
        super().__init__(*args, **kwargs)

    def clean_source(self):
        return self.cleaned_data["source"].strip()

    def clean_instance_id(self):
        return self.cleaned_data["instance_id"] or settings.COMFY_INSTANCE_ID
