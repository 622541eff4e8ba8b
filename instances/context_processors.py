"""Puts the Docker engine's status on every page, so an unreachable engine shows as a banner."""
from .docker_engine import cached_engine_status


def engine_banner(request):
    if not getattr(request, "user", None) or not request.user.is_authenticated:
        return {}
    return {"engine_status": cached_engine_status()}
