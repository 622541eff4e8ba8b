"""GPU discovery per node: NVML when a driver is present, otherwise the GPUs declared in COMFY_GPUS."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.utils import timezone

from .models import GPU

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoundGPU:
    index: int
    uuid: str = ""
    name: str = ""
    memory_total: int | None = None


def nvml_gpus() -> list[FoundGPU] | None:
    """The GPUs NVML reports, or None when there is no NVIDIA driver to ask."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        logger.info("NVML unavailable (%s); using COMFY_GPUS.", exc)
        return None
    try:
        found = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append(
                FoundGPU(
                    index=index,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
                    name=name.decode() if isinstance(name, bytes) else name,
                    memory_total=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total),
                )
            )
        return found
    finally:
        pynvml.nvmlShutdown()


def declared_gpus(value: str | None = None) -> list[FoundGPU]:
    """GPUs from COMFY_GPUS: '0,1' (indexes), 'none' or empty."""
    value = (settings.COMFY_GPUS if value is None else value).strip().lower()
    if value in ("", "none"):
        return []
    found = []
    for part in value.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ImproperlyConfigured(f"COMFY_GPUS={value!r}: use GPU indexes such as '0,1', or 'none'.")
        found.append(FoundGPU(index=int(part), name=f"GPU {part} (declared in COMFY_GPUS)"))
    return found


def gpus_discover(node) -> tuple[str, list[GPU]]:
    """Refresh `node`'s GPU rows from NVML or settings. GPUs no longer found are kept (instances may hold them) but
    marked absent. Returns the source used and the present GPUs."""
    mode = settings.COMFY_GPU_DISCOVERY
    found = nvml_gpus() if mode in ("auto", "nvml") else None
    source = "nvml"
    if found is None and mode == "nvml":
        raise ImproperlyConfigured("COMFY_GPU_DISCOVERY=nvml, but NVML does not answer: is the NVIDIA driver "
                                   "installed and nvidia-ml-py able to load libnvidia-ml.so?")
    if found is None:
        found = declared_gpus()
        source = "settings" if found else "none"
    with transaction.atomic():
        seen = set()
        for gpu in found:
            row, _ = GPU.objects.update_or_create(
                node=node, index=gpu.index,
                defaults={"uuid": gpu.uuid, "name": gpu.name, "memory_total": gpu.memory_total, "present": True},
            )
            seen.add(row.pk)
        GPU.objects.filter(node=node).exclude(pk__in=seen).update(present=False)
        node.gpus_discovered_at = timezone.now()
        node.gpu_source = source
        node.save(update_fields=["gpus_discovered_at", "gpu_source"])
    return source, list(GPU.objects.filter(node=node, present=True))
