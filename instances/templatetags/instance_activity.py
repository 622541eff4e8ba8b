"""How an instance's activity reads on the dashboard and its page: last activity, when idle stop will stop it, the
memory of its GPUs (the health pass records them in Instance.health; instances/idle.py decides)."""
from datetime import datetime

from django import template
from django.utils import timezone
from django.utils.html import format_html
from django.utils.timesince import timesince

from instances import idle

register = template.Library()

GIB = 1024 ** 3


@register.filter
def last_activity(instance):
    return idle.last_activity(instance)


@register.filter
def ago(moment: datetime | None) -> str:
    """'just now', '42 seconds ago', '3 minutes ago', '2 hours ago': the largest unit only."""
    if moment is None:
        return ""
    seconds = (timezone.now() - moment).total_seconds()
    if seconds < 10:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)} seconds ago"
    return f"{timesince(moment, depth=1)} ago"


@register.filter
def idle_stop_note(instance) -> str:
    """When idle stop will stop a running instance if nothing happens ("" when it will not)."""
    at = idle.idle_stop_expected(instance)
    if at is None:
        return ""
    node = instance.node
    if node.refusal():
        # Its node's agent runs the stop (instances/idle.py): none is queued for a node that takes no jobs.
        why = "is offline" if node.approved else "is not approved"
        return format_html("idle stop waits: its node {} {}; the check after its agent takes jobs again stops it if "
                           "it is still idle", node.name, why)
    if at <= timezone.now():
        return "idle past its time: stops at the next check if its queue is empty"
    local = timezone.localtime(at)
    return format_html('will stop at about <span title="{}">{}</span> if still idle', local.isoformat(),
                       local.strftime("%H:%M"))


def _gib(value) -> str:
    text = f"{value / GIB:.1f}"
    return text[:-2] if text.endswith(".0") else text


@register.filter
def vram_usage(device: dict) -> str:
    """A device of Instance.health["vram"] as '6.2/24 GB' (GiB, as ComfyUI and nvidia-smi count)."""
    try:
        return f"{_gib(device['used'])}/{_gib(device['total'])} GB"
    except (KeyError, TypeError):
        return "?"


@register.filter
def vram_device(device: dict) -> str:
    """'GPU 1' (the host's index) when known, else the name ComfyUI gives it."""
    gpu = device.get("gpu") if isinstance(device, dict) else None
    if gpu is not None:
        return f"GPU {gpu}"
    return (device.get("name") if isinstance(device, dict) else "") or "GPU"
