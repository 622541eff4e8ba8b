from django.apps import AppConfig


class StorageAppConfig(AppConfig):
    name = "storage_app"
    label = "storage_app"
    verbose_name = "Storage"
    default_auto_field = "django.db.models.BigAutoField"
    operator_permissions = ("storage_app.verify_modelasset", "storage_app.restore_snapshot")

    def ready(self):
        from . import jobs  # noqa: F401  (declares its operation kinds, so every process knows their labels)

    def periodic_jobs(self):
        """Run by comfyhub.cron: scheduled snapshots (hourly), the shared input links (every minute) and, when
        MODEL_FULL_VERIFY_CRON is set, a full re-verification of the model library."""
        from django.conf import settings

        from .jobs import refresh_shared_input, scheduled_full_verify, scheduled_snapshots

        periodic = [{"func": scheduled_snapshots, "queue_name": "default", "cron": "7 * * * *", "job_timeout": 120},
                    {"func": refresh_shared_input, "queue_name": "default", "interval": 60, "job_timeout": 120}]
        if settings.MODEL_FULL_VERIFY_CRON:
            periodic.append({"func": scheduled_full_verify, "queue_name": "default",
                             "cron": settings.MODEL_FULL_VERIFY_CRON, "job_timeout": 60})
        return periodic

    def diagnostics(self):
        """The parts of the diagnostics operation (comfyhub.jobs) this app knows: (name, check() -> (ok, detail))."""
        import os

        from django.conf import settings

        from .library import library_summary

        def model_library():
            library = library_summary()
            return not library["problems"], (
                f"{library['files']} file(s); {library['mismatch']} mismatch, {library['missing']} missing, "
                f"{library['unreadable']} unreadable (see the models page)")

        def writable(path):
            def check():
                existing = next((p for p in (path, *path.parents) if p.exists()), None)
                ok = existing is not None and os.access(existing, os.W_OK)
                return ok, f"{path} ({'writable' if ok else 'not writable'})"
            return check

        return [("model library", model_library), ("shared storage", writable(settings.COMFY_SHARED_PATH)),
                ("instance storage", writable(settings.COMFY_INSTANCES_PATH)),
                ("backup storage", writable(settings.COMFY_BACKUPS_PATH))]
