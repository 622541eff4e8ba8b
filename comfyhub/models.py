"""The Operation record: one row for every background job, read by the UI, the admin and the CLI."""
import uuid

from django.conf import settings
from django.contrib.contenttypes.fields import GenericForeignKey
from django.contrib.contenttypes.models import ContentType
from django.db import models
from django.urls import reverse
from django.utils import timezone


class Operation(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        CANCELLED = "cancelled", "Cancelled"

    ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)
    TERMINAL_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    # kind -> label, filled by every @operation_job as its module is imported (each app's ready() imports its jobs)
    KIND_LABELS: dict[str, str] = {}

    # The primary key is also the RQ job id.
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    kind = models.CharField(max_length=64, db_index=True)
    # default/long on the hub's workers, node.<name>/node.<name>.long on a node's agent (node names: 63 characters)
    queue_name = models.CharField(max_length=100, default="default")

    target_type = models.ForeignKey(ContentType, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    target_id = models.CharField(max_length=64, blank=True, default="")
    target = GenericForeignKey("target_type", "target_id")
    # Kept so the list still says what an operation was about after its target is deleted.
    target_label = models.CharField(max_length=200, blank=True, default="")

    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="operations"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True)
    progress = models.PositiveSmallIntegerField(default=0)
    progress_message = models.CharField(max_length=300, blank=True, default="")
    log = models.TextField(blank=True, default="")
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    traceback = models.TextField(blank=True, default="")

    worker_name = models.CharField(max_length=200, blank=True, default="")
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["target_type", "target_id", "-created_at"], name="operation_target_idx"),
            models.Index(fields=["status", "heartbeat_at"], name="operation_status_beat_idx"),
        ]
        permissions = [
            ("cancel_operation", "Can cancel operations"),
            ("run_diagnostics", "Can run the diagnostics operation"),
        ]

    def __str__(self):
        label = f" {self.target_label}" if self.target_label else ""
        return f"{self.get_kind_display()}{label} ({self.status})"

    def get_absolute_url(self):
        return reverse("operation-detail", args=[self.pk])

    def get_kind_display(self):
        return self.KIND_LABELS.get(self.kind, self.kind.replace("_", " ").capitalize())

    @property
    def is_terminal(self):
        return self.status in self.TERMINAL_STATUSES

    @property
    def is_active(self):
        return self.status in self.ACTIVE_STATUSES

    @property
    def duration(self):
        if not self.started_at:
            return None
        return (self.finished_at or timezone.now()) - self.started_at

    @property
    def log_lines(self):
        return self.log.splitlines()


class AccessToken(models.Model):
    """A personal access token: `Authorization: Bearer <token>` on /i/<id>/… uses instances with its user's rights.
    Only a hash is stored; the token is shown once, when it is made (comfyhub/tokens.py)."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="access_tokens")
    name = models.CharField(max_length=100, help_text="What it is for, e.g. 'render farm script'.")
    prefix = models.CharField(max_length=16, help_text="The token's first characters, to recognise it by.")
    digest = models.CharField(max_length=64, unique=True, help_text="SHA-256 of the token, hex.")
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField(null=True, blank=True, help_text="Empty: never expires.")
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    @property
    def active(self):
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > timezone.now())
