"""Forms for instances: they turn what a person typed into the services' arguments and put the services' errors
next to the fields they concern. Every rule itself lives in services.py."""
from __future__ import annotations

import shlex

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db.models import Prefetch

from . import services
from .models import GPU, GPUAssignment, Instance

EXTRA_ARGS_HELP = ("One argument per line, with its value if it takes one (e.g. <code>--preview-method auto</code>). "
                   "Directories, address, port and GPUs come from ComfyHub.")
EXTRA_ENV_HELP = "One <code>KEY=VALUE</code> per line."


def add_service_error(form: forms.Form, exc: ValidationError):
    """Put a service's ValidationError({field: [message]}) next to the fields it names; the rest above the form."""
    errors = exc.error_dict if hasattr(exc, "error_dict") else {None: exc.error_list}
    for field, messages in errors.items():
        form.add_error(field if field in form.fields else None, messages)


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


class GPUCheckboxField(forms.MultipleChoiceField):
    """Checkboxes of the node's GPUs. Any index submitted goes on to the service, which says whether it exists and
    who holds it, so the form never decides that itself."""

    widget = forms.CheckboxSelectMultiple

    def valid_value(self, value):
        return True


class InstanceForm(forms.Form):
    """Create (with `instance=None`) or edit an instance; `arguments()` gives the service's keyword arguments."""

    instance_id = forms.CharField(
        label="Instance id", required=False,
        help_text="Names its folder and container: lowercase letters, digits and '-'. It cannot be changed later.",
    )
    display_name = forms.CharField(
        required=False, max_length=Instance._meta.get_field("display_name").max_length,
    )
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    image = forms.CharField(required=False, help_text="Docker image; empty means the default image.")
    extra_args = forms.CharField(
        label="Extra ComfyUI arguments", required=False, help_text=EXTRA_ARGS_HELP,
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

    def __init__(self, *args, node=None, instance: Instance | None = None, **kwargs):
        self.instance = instance
        self.node = instance.node if instance is not None else (node or services.local_node())
        if instance is not None:
            kwargs.setdefault("initial", {
                "display_name": instance.display_name,
                "description": instance.description,
                "image": instance.image,
                "extra_args": args_to_text(instance.extra_args),
                "extra_env": env_to_text(instance.extra_env),
                "host_port": instance.host_port,
                "gpus": [str(gpu.index) for gpu in instance.assigned_gpus()],
            })
        else:
            kwargs.setdefault("initial", {"image": settings.COMFY_IMAGE})
        super().__init__(*args, **kwargs)
        if instance is not None:
            del self.fields["instance_id"]  # the id names its folder and container: it never changes
        self.gpu_list = self._gpus_to_show()
        self.fields["gpus"].choices = [(str(gpu.index), str(gpu)) for gpu in self.gpu_list]

    def _gpus_to_show(self) -> list[GPU]:
        """The node's present GPUs, plus any absent one this instance still holds (so it can be unchecked)."""
        held = [gpu.pk for gpu in self.instance.assigned_gpus()] if self.instance is not None else []
        holders = Prefetch("assignments", queryset=GPUAssignment.objects.select_related("instance"))
        gpus = GPU.objects.filter(node=self.node).prefetch_related(holders)
        return [gpu for gpu in gpus if gpu.present or gpu.pk in held]

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

    def clean_instance_id(self):
        return self.cleaned_data["instance_id"].strip()

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

    # --- Talking to the services -----------------------------------------------------------------------------

    def arguments(self) -> dict:
        """Keyword arguments for services.instance_create / instance_update."""
        data = self.cleaned_data
        arguments = {
            "display_name": data["display_name"], "description": data["description"], "image": data["image"],
            "extra_args": data["extra_args"], "extra_env": data["extra_env"], "host_port": data["host_port"],
            "gpu_indexes": data["gpus"],
        }
        if self.instance is None:
            arguments.update(instance_id=data["instance_id"], node=self.node)
        else:
            arguments.update(instance=self.instance)
        return arguments

    def add_service_error(self, exc: ValidationError):
        add_service_error(self, exc)


class InstanceDeleteForm(forms.Form):
    purge_data = forms.BooleanField(
        label="Also delete its data", required=False,
        help_text="Its folder: workflows, outputs, custom nodes and settings. Shared models are never touched.",
    )
    confirm = forms.CharField(label="Type the instance id to delete its data", required=False)

    def add_service_error(self, exc: ValidationError):
        add_service_error(self, exc)
