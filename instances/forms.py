"""Forms for instances: they turn what a person typed into the services' arguments and put the services' errors
next to the fields they concern. Every rule itself lives in services.py."""
from __future__ import annotations

import shlex

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import Prefetch
from django.urls import reverse

from comfyhub.forms import ServiceForm

from . import placement, runtime, services
from .models import GPU, LOCAL_NODE, GPUAssignment, Instance, Node

EXTRA_ARGS_HELP = ("One argument per line, with its value if it takes one (e.g. <code>--preview-method auto</code>). "
                   "Directories, address, port and GPUs come from ComfyHub.")
EXTRA_ENV_HELP = "One <code>KEY=VALUE</code> per line."
ARGUMENTS_CHOICES = [("command", "As the container's command (ComfyHub's image, most images)"),
                     ("env", "In an environment variable")]
ARGUMENTS_VARIABLE_HELP = ("With \"In an environment variable\": the variable the image's entrypoint reads "
                           "ComfyUI's arguments from (it splits them at spaces, so no argument may hold one), e.g. "
                           "<code>CLI_ARGS</code>.")


def args_to_text(args) -> str:
    """['--preview-method', 'auto', '--lowvram'] -> one line per option with its values."""
    lines: list[list[str]] = []
    for arg in args or []:
        if not lines or str(arg).startswith("-"):
            lines.append([])
        lines[-1].append(str(arg))
    return "\n".join(shlex.join(line) for line in lines)


def env_to_text(env) -> str:
    return "\n".join(f"{key}={value}" for key, value in (env or {}).items())


# ComfyUI's arguments fit in a few lines; far more is a paste gone wrong.
EXTRA_ARGS_MAX_CHARS = 16384


class GPUCheckboxField(forms.MultipleChoiceField):
    """Checkboxes of the node's GPUs. Any index submitted goes on to the service, which says whether it exists and
    who holds it, so the form never decides that itself."""

    widget = forms.CheckboxSelectMultiple

    def valid_value(self, value):
        return True


class AnyChoiceField(forms.ChoiceField):
    """A choice the service checks, so its message (naming what was wrong) is the one shown."""

    def valid_value(self, value):
        return True


class InstanceForm(ServiceForm):
    """Create (with `instance=None`) or edit an instance; `arguments()` gives the service's keyword arguments."""

    # Not stripped: an id is taken exactly as typed, so "abc\n" is refused rather than becoming "abc".
    instance_id = forms.CharField(
        label="Instance id", required=False, strip=False,
        help_text="Names its folder and container: lowercase letters, digits and '-'. It cannot be changed later.",
    )
    display_name = forms.CharField(
        required=False, max_length=Instance._meta.get_field("display_name").max_length,
    )
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    node = AnyChoiceField(
        label="Node", required=False,
        help_text="The GPU host it runs on (approved nodes); the GPUs below are this node's. It cannot be changed "
                  "later.")
    image = forms.CharField(required=False, help_text="Docker image; empty means the default image.")
    image_arguments = forms.ChoiceField(label="How the image takes ComfyUI's arguments", choices=ARGUMENTS_CHOICES,
                                        initial="command", required=False)
    arguments_variable = forms.CharField(label="Variable name", required=False, max_length=runtime.ARGUMENTS_MAX_LENGTH,
                                         initial=runtime.ARGUMENTS_ENV_DEFAULT, help_text=ARGUMENTS_VARIABLE_HELP)
    extra_args = forms.CharField(
        # Bounded before shlex reads it: shlex takes time quadratic in a token's length (1 MB: minutes).
        label="Extra ComfyUI arguments", required=False, help_text=EXTRA_ARGS_HELP, max_length=EXTRA_ARGS_MAX_CHARS,
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
    )
    extra_env = forms.CharField(
        label="Extra environment", required=False, help_text=EXTRA_ENV_HELP,
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
    )
    host_port = forms.IntegerField(
        label="Host port", required=False, help_text="Empty: choose a free one automatically.",
    )
    gpus = GPUCheckboxField(label="GPUs", required=False, help_text="None checked: the instance runs on the CPU.")
    owner = forms.CharField(
        label="Owner", required=False, max_length=150,
        help_text="The user name of who may open it through the hub and share it (with 'create own instances', "
                  "start and stop it too).",
    )
    idle_stop_after = forms.IntegerField(
        label="Idle stop after (minutes)", required=False, min_value=0, max_value=services.IDLE_STOP_MAX_MINUTES,
        help_text="Stop it after this many minutes with no traffic through the hub and an empty ComfyUI queue, "
                  "freeing its GPUs; 0 or empty: never.",
    )
    adopt = forms.BooleanField(
        label="Adopt the kept folder", required=False,
        help_text="The folder of a deleted instance with this id was kept: take it as it is (its workflows, outputs, "
                  "custom nodes and settings stay; nothing in it is overwritten or deleted, building only adds what is "
                  "missing). Custom nodes in it show up as installed by hand.",
    )

    def __init__(self, *args, node: str = "", instance: Instance | None = None, **kwargs):
        """`node`: the name of the node whose GPUs an empty create form shows (a bound one shows the node it was
        sent with)."""
        self.instance = instance
        if instance is None:
            kwargs.setdefault("initial", {})
        if instance is not None:
            kwargs.setdefault("initial", {
                "display_name": instance.display_name,
                "description": instance.description,
                "image": instance.image,
                "extra_args": args_to_text(instance.extra_args),
                "extra_env": env_to_text(instance.extra_env),
                "host_port": instance.host_port,
                "gpus": [str(index) for index in instance.gpu_choice()],
                "owner": instance.owner.get_username() if instance.owner_id else "",
                "idle_stop_after": instance.idle_stop_after,
                **arguments_initial(instance.image_arguments),
            })
        else:
            kwargs["initial"] = {"image": settings.COMFY_IMAGE, "idle_stop_after": 0, **kwargs["initial"]}
        super().__init__(*args, **kwargs)
        if instance is not None:
            del self.fields["instance_id"]  # the id names its folder and container: it never changes
            del self.fields["adopt"]
            del self.fields["node"]  # moving an instance to another host is not a form field's job
            self.fields["owner"].help_text += " Empty: no owner (operators only)."
            self.node = instance.node
        else:
            self.fields["owner"].help_text += " Empty: you."
            self.node = self._node_shown(self.data.get("node") if self.is_bound else node)
            self.fields["node"].choices = self._node_choices()
            self.fields["node"].initial = self.node.name
            # Choosing another node shows its GPUs: the GPU fieldset is fetched again for it.
            self.fields["node"].widget.attrs.update({
                "hx-get": reverse("instance-create"), "hx-trigger": "change", "hx-select": "#field-gpus",
                "hx-target": "#field-gpus", "hx-swap": "outerHTML"})
        self.fields["idle_stop_after"].help_text += (f" {settings.IDLE_STOP_AFTER_DEFAULT} is a good start "
                                                     "(IDLE_STOP_AFTER_DEFAULT).")
        self.gpu_list = self._gpus_to_show()
        self.fields["gpus"].choices = [(str(gpu.index), str(gpu)) for gpu in self.gpu_list]

    @staticmethod
    def _node_shown(name) -> Node:
        """The approved node named, whose GPUs the form lists; `local` for none or one that cannot be had (the
        service says why when the form is sent)."""
        if isinstance(name, str) and name and "\x00" not in name:
            node = Node.objects.filter(name=name, approved=True).first()
            if node is not None:
                return node
        return services.local_node()

    def _node_choices(self) -> list[tuple[str, str]]:
        """Approved nodes, each with whether it is online and its free GPUs."""
        choices = []
        for candidate in placement.candidates(approved=True):
            state = "served by the hub" if candidate.is_local else (candidate.why_not or "online")
            choices.append((candidate.node.name, f"{candidate.node} ({state}; {len(candidate.free)} of "
                                                 f"{candidate.total} GPUs free)"))
        return choices

    @property
    def gpus_node(self) -> Node:
        """The node whose GPUs the form lists (in a template `form.node` is the field)."""
        return self.node

    def shows_nodes(self) -> bool:
        """The node field shows once there is more than one node to choose from (one host: as before nodes), and
        with its error."""
        if "node" not in self.fields:
            return False
        return len(self.fields["node"].choices) > 1 or self.node.name != LOCAL_NODE or bool(self["node"].errors)

    def _gpus_to_show(self) -> list[GPU]:
        """The node's present GPUs, plus any absent one this instance still holds (so it can be unchecked)."""
        held = [gpu.pk for gpu in self.instance.assigned_gpus()] if self.instance is not None else []
        holders = Prefetch("assignments", queryset=GPUAssignment.objects.select_related("instance"))
        gpus = GPU.objects.filter(node=self.node).prefetch_related(holders)
        return [gpu for gpu in gpus if gpu.present or gpu.pk in held]

    def kept_folders(self) -> list[str]:
        """Ids whose folder was kept when their instance was deleted (the adopt checkbox shows only then)."""
        if self.instance is not None:
            return []
        if not hasattr(self, "_kept_folders"):
            self._kept_folders = services.kept_instance_folders(self.node)
        return self._kept_folders

    def gpu_options(self):
        """(checkbox, GPU, the other instances holding it) for the template."""
        by_value = {str(gpu.index): gpu for gpu in self.gpu_list}
        options = []
        for checkbox in self["gpus"]:
            gpu = by_value[str(checkbox.data["value"])]
            others = [a.instance for a in gpu.assignments.all() if a.instance_id != getattr(self.instance, "pk", None)]
            options.append({"checkbox": checkbox, "gpu": gpu, "holders": others})
        return options

    # --- Converting input ------------------------------------------------------------------------------------

    def clean_extra_args(self):
        args = []
        for number, line in enumerate(self.cleaned_data["extra_args"].splitlines(), start=1):
            try:
                args.extend(shlex.split(line))
            except ValueError as exc:
                raise ValidationError(f"Line {number} ({line.strip()}): {exc}; close the quote or remove it.") from exc
        return args

    def clean_extra_env(self):
        try:
            return services.parse_env(self.cleaned_data["extra_env"])
        except ValidationError as exc:
            raise ValidationError(exc.messages) from exc

    def clean_gpus(self):
        try:
            return services.parse_gpu_selection(self.cleaned_data["gpus"])
        except ValidationError as exc:
            raise ValidationError(exc.messages) from exc

    def clean_owner(self):
        from . import access

        name = self.cleaned_data["owner"].strip()
        if not name:
            return None
        try:
            return access.user_named(name)
        except ValidationError as exc:
            raise ValidationError(exc.messages) from exc

    def clean_node(self):
        try:
            return placement.node_for_new_instance(self.cleaned_data["node"])
        except ValidationError as exc:
            raise ValidationError(exc.messages) from exc

    def clean_idle_stop_after(self):
        return self.cleaned_data["idle_stop_after"] or 0

    # --- Talking to the services -----------------------------------------------------------------------------

    def arguments(self) -> dict:
        """Keyword arguments for services.instance_create / instance_update."""
        data = self.cleaned_data
        arguments = {
            "display_name": data["display_name"], "description": data["description"], "image": data["image"],
            "extra_args": data["extra_args"], "extra_env": data["extra_env"], "host_port": data["host_port"],
            "gpu_indexes": data["gpus"], "image_arguments": image_arguments_value(data),
            "idle_stop_after": data["idle_stop_after"], "owner": data["owner"],
        }
        if self.instance is None:
            arguments.update(instance_id=data["instance_id"], node=data["node"] or services.local_node(),
                             adopt=data["adopt"])
        else:
            arguments.update(instance=self.instance)
        return arguments


def arguments_initial(image_arguments: str) -> dict:
    """The form's two fields for an instance's image_arguments ("command" or "env:NAME")."""
    variable = runtime.arguments_variable(image_arguments)
    return {"image_arguments": "command" if variable is None else "env",
            "arguments_variable": variable or runtime.ARGUMENTS_ENV_DEFAULT}


def image_arguments_value(data) -> str:
    """The service's image_arguments from the form's two fields (the service judges the variable's name)."""
    if data.get("image_arguments") == "env":
        return runtime.ARGUMENTS_ENV_PREFIX + (data.get("arguments_variable") or "")
    return runtime.ARGUMENTS_COMMAND


class InstanceDeleteForm(ServiceForm):
    """Deleting asks for the instance id typed out: a bare POST (a stray click, a forged form) deletes nothing."""

    purge_data = forms.BooleanField(
        label="Also delete its data", required=False,
        help_text="Its folder: workflows, outputs, custom nodes and settings. Shared models are never touched.",
    )
    confirm = forms.CharField(label="Type the instance id to confirm", required=False, strip=False)

    def __init__(self, *args, instance: Instance, **kwargs):
        self.instance = instance
        super().__init__(*args, **kwargs)

    def clean_confirm(self):
        if self.cleaned_data["confirm"] != self.instance.instance_id:
            raise ValidationError(f"Type the instance id '{self.instance.instance_id}' exactly to delete it.")
        return self.cleaned_data["confirm"]


# --- Workflows, the library, templates and custom nodes (views_workflows.py) ------------------------------------

class AnyMultipleChoiceField(forms.MultipleChoiceField):
    def valid_value(self, value):
        return True


CONFLICT_CHOICES = [("skip", "Skip it"), ("overwrite", "Overwrite it"), ("rename", "Keep both (rename the copy)")]


class WorkflowCopyForm(ServiceForm):
    """Workflows of `source` to check against, or copy to, other instances."""

    paths = AnyMultipleChoiceField(label="Workflows", required=False, widget=forms.CheckboxSelectMultiple)
    targets = forms.ModelMultipleChoiceField(
        label="Copy to", queryset=Instance.objects.none(), to_field_name="instance_id", required=False,
        widget=forms.CheckboxSelectMultiple,
    )
    on_conflict = AnyChoiceField(label="When the file already exists there", choices=CONFLICT_CHOICES,
                                 initial="skip", required=False, widget=forms.RadioSelect)
    # The "Copy all" button: every workflow of the source, whichever are ticked.
    all_workflows = forms.BooleanField(required=False)

    def __init__(self, *args, source: Instance, workflows=(), **kwargs):
        self.source = source
        super().__init__(*args, **kwargs)
        self.fields["paths"].choices = [(w["path"], w["path"]) for w in workflows]
        self.fields["targets"].queryset = Instance.objects.select_related("node").exclude(pk=source.pk)

    def arguments(self) -> dict:
        """Keyword arguments for services.workflows_copy."""
        data = self.cleaned_data
        every = data["all_workflows"]
        return {"source": self.source, "targets": list(data["targets"]), "paths": [] if every else list(data["paths"]),
                "all_workflows": every, "on_conflict": data["on_conflict"]}


class WorkflowPublishForm(forms.Form):
    path = forms.CharField(widget=forms.HiddenInput)
    name = forms.CharField(label="Library name", required=False)


class WorkflowUploadForm(forms.Form):
    file = forms.FileField(label="Workflow file", help_text="A ComfyUI workflow (.json, UI or API format).",
                           widget=forms.ClearableFileInput(attrs={"accept": ".json,application/json"}))


class LibraryInstallForm(ServiceForm):
    """One library entry's version into instances; `spec()` is the service's NAME@VERSION."""

    name = forms.CharField(widget=forms.HiddenInput)
    version = AnyChoiceField(label="Version", required=False)
    instances = forms.ModelMultipleChoiceField(
        label="Into", queryset=Instance.objects.select_related("node"), to_field_name="instance_id", required=False,
        widget=forms.CheckboxSelectMultiple,
    )

    def __init__(self, *args, entry=None, **kwargs):
        if entry is not None:
            kwargs.setdefault("initial", {"name": entry.name})
        super().__init__(*args, **kwargs)
        if entry is not None:
            self.fields["version"].choices = [(str(v.number), f"version {v.number}") for v in entry.versions.all()]

    def spec(self) -> str:
        version = self.cleaned_data["version"]
        return f"{self.cleaned_data['name']}@{version}" if version else self.cleaned_data["name"]


class TemplateForm(ServiceForm):
    """A new instance template; `arguments()` gives services.template_create's keyword arguments."""

    name = forms.CharField(required=False, strip=False, help_text="Lowercase letters, digits and '-'.")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    image = forms.CharField(required=False, help_text="Docker image; empty means the default image.")
    extra_args = InstanceForm.base_fields["extra_args"]
    extra_env = InstanceForm.base_fields["extra_env"]
    gpu_count = forms.IntegerField(label="GPU count", min_value=0, max_value=32767, initial=0,
                                   help_text="GPUs each new instance gets (0 = CPU mode).")
    min_gpus = forms.IntegerField(
        label="Minimum GPUs", required=False, min_value=0, max_value=services.TEMPLATE_MAX_GPUS, initial=0,
        help_text="Instances made from it need at least this many GPUs (no more than the GPU count); e.g. 2 for "
                  "ComfyUI-MultiGPU. 0 or empty: no minimum.")
    custom_nodes = forms.CharField(
        required=False, help_text="One <code>GIT-URL [REF]</code> per line (REF: a branch, tag or commit).",
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
    )
    settings = forms.CharField(
        required=False, help_text='comfy.settings.json values as a JSON object, e.g. <code>{"Comfy.LinkRenderMode": 2}'
                                  "</code>.",
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
    )
    starter_workflows = forms.ModelMultipleChoiceField(
        required=False, queryset=None, help_text="Library versions written into each new instance.",
        widget=forms.SelectMultiple(attrs={"size": 6}),
    )
    self_service = forms.BooleanField(
        label="Self-service", required=False,
        help_text="Users with 'create own instances' may create instances from it for themselves, within "
                  "SELF_SERVICE_MAX_INSTANCES and SELF_SERVICE_MAX_GPUS.",
    )

    # The same conversions as the instance form: one rule, two forms.
    clean_extra_args = InstanceForm.clean_extra_args
    clean_extra_env = InstanceForm.clean_extra_env

    def __init__(self, *args, **kwargs):
        from .models import WorkflowVersion

        super().__init__(*args, **kwargs)
        self.fields["starter_workflows"].queryset = WorkflowVersion.objects.select_related("entry").order_by(
            "entry__name", "-number")

    def clean_min_gpus(self):
        return self.cleaned_data["min_gpus"] or 0

    def clean(self):
        data = super().clean()
        # The service has the same rule (and the last word); said here too, next to the field, before anything else.
        if isinstance(data.get("gpu_count"), int) and isinstance(data.get("min_gpus"), int):
            for field, problems in services.template_gpus_problems(data["gpu_count"], data["min_gpus"]).items():
                self.add_error(field, problems)
        return data

    def clean_custom_nodes(self):
        nodes = []
        for number, line in enumerate(self.cleaned_data["custom_nodes"].splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2:
                raise ValidationError(f"Line {number} ({line.strip()}): give a git URL and at most one ref, "
                                      "separated by a space.")
            nodes.append({"url": parts[0], "ref": parts[1] if len(parts) == 2 else ""})
        return nodes

    def clean_settings(self):
        from comfyhub import jsonlimits

        text = self.cleaned_data["settings"].strip()
        if not text:
            return {}
        try:
            return jsonlimits.loads(text, what="The settings")
        except jsonlimits.JSONInputError as exc:
            raise ValidationError(str(exc)) from exc

    def arguments(self) -> dict:
        data = self.cleaned_data
        return {"name": data["name"], "description": data["description"], "image": data["image"],
                "extra_args": data["extra_args"], "extra_env": data["extra_env"], "gpu_count": data["gpu_count"],
                "custom_nodes": data["custom_nodes"], "settings_values": data["settings"],
                "starter_workflows": list(data["starter_workflows"]), "self_service": data["self_service"],
                "min_gpus": data["min_gpus"]}


class TemplateInstanceForm(ServiceForm):
    """A new instance from a template."""

    instance_id = InstanceForm.base_fields["instance_id"]
    display_name = InstanceForm.base_fields["display_name"]
    host_port = InstanceForm.base_fields["host_port"]


class SelfServiceForm(ServiceForm):
    """An instance of one's own from a self-service template (instances/selfservice.py)."""

    template = forms.ModelChoiceField(label="Template", queryset=None, to_field_name="name", required=False,
                                      empty_label="Choose a template")
    instance_id = InstanceForm.base_fields["instance_id"]
    display_name = InstanceForm.base_fields["display_name"]

    def __init__(self, *args, **kwargs):
        from .selfservice import self_service_templates

        super().__init__(*args, **kwargs)
        self.fields["template"].queryset = self_service_templates()
        self.fields["template"].error_messages["invalid_choice"] = (
            "That template is not offered for self-service; choose one of the list.")


class ShareForm(ServiceForm):
    """Share an instance with one user or one group, by name (instances/access.py judges it)."""

    username = forms.CharField(label="User", required=False, max_length=150)
    group = forms.CharField(label="or group", required=False, max_length=150)


class TemplateApplyForm(ServiceForm):
    instance = forms.ModelChoiceField(label="Instance", queryset=Instance.objects.select_related("node"),
                                      to_field_name="instance_id", empty_label="Choose an instance")


class NodeInstallForm(ServiceForm):
    url = forms.CharField(label="Git URL", required=False,
                          help_text="https://…, ssh://…, git@host:path or file://…")
    ref = forms.CharField(label="Ref", required=False, help_text="Branch, tag or commit; empty: the default branch.")


class NodeActionForm(forms.Form):
    name = forms.CharField()
    action = AnyChoiceField(choices=[(a, a) for a in ("update", "disable", "enable", "remove")])
