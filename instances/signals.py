"""A fresh install gets the local node, its GPUs, the single-instance user's instance (COMFY_INSTANCE_ID) and the
built-in "multi-gpu" template; each start of ComfyHub (`manage.py serve`) looks for the GPUs again."""
from django.conf import settings
from django.core.exceptions import FieldDoesNotExist
from django.db.models.signals import post_migrate
from django.dispatch import receiver

from comfyhub.signals import serve_starting


@receiver(post_migrate)
def ensure_local_node(sender, **kwargs):
    if sender.label != "instances":
        return
    from .models import LOCAL_NODE, Node

    if Node.objects.filter(name=LOCAL_NODE).exists():
        return
    from . import services

    node = services.local_node()
    _, gpus = services.discover_gpus(node)
    if settings.COMFY_DEFAULT_INSTANCE and not node.instances.exists():
        start, _ = services.port_range_setting()
        services.instance_create(
            instance_id=settings.COMFY_INSTANCE_ID, display_name="ComfyUI", node=node,
            host_port=None if services.port_bound_on_host(node.bind_address, start) else start,
            gpu_indexes=[gpu.index for gpu in gpus if not gpu.shareable],
        )


@receiver(post_migrate)
def ensure_multigpu_template(sender, apps=None, **kwargs):
    """The built-in "multi-gpu" template exists after every migrate (made when missing, an operator's edits kept)."""
    if sender.label != "instances":
        return
    if apps is not None:
        try:  # migrated back to before templates had a minimum of GPUs: the template cannot be made as it is
            apps.get_model("instances", "InstanceTemplate")._meta.get_field("min_gpus")
        except (LookupError, FieldDoesNotExist):
            return
    from .distribution import multigpu_template_ensure

    multigpu_template_ensure()


@receiver(serve_starting)
def discover_gpus_at_start(sender, **kwargs):
    """ComfyHub starts: look for the host's GPUs again (one may have been added or removed) and say what is there."""
    from . import services

    source, gpus = services.discover_gpus()
    listed = ", ".join(f"{gpu.index}: {gpu.name or gpu.uuid}" for gpu in gpus) or "none (instances run on the CPU)"
    return f"GPUs ({source}): {listed}"


@receiver(serve_starting)
def warn_of_session_cookie_exposure(sender, **kwargs):
    """ComfyHub starts over plain HTTP where a node publishes instance ports: say so (docs/access.md)."""
    from .access import session_cookie_exposure

    return "\n".join(f"Warning: {problem}" for problem in session_cookie_exposure())
