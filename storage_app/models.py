"""The shared model library's inventory: one row per model file under shared/models."""
from django.db import models
from django.utils import timezone


class ModelAsset(models.Model):
    class Status(models.TextChoices):
        NEW = "new", "New"  # found by a scan, never hashed
        UNVERIFIED = "unverified", "Unverified"  # hashed, no expected hash to compare with
        VERIFIED = "verified", "Verified"  # hashed and equal to its expected hash
        MISMATCH = "mismatch", "Mismatch"  # differs from its expected hash, or changed with no visible change
        CHANGED = "changed", "Changed"  # size or mtime differ from the last hash: needs hashing again
        MISSING = "missing", "Missing"  # gone from the library
        UNREADABLE = "unreadable", "Unreadable"  # could not be read (permissions, grew while read, loop...)

    PROBLEM_STATUSES = (Status.MISMATCH, Status.MISSING, Status.UNREADABLE)

    class ExpectedSource(models.TextChoices):
        NONE = "", "—"
        TYPED = "typed", "Typed in"
        MANIFEST = "manifest", "Imported from a manifest"
        FIRST_HASH = "first-hash", "First hash (trusted on first use)"

    path = models.CharField(max_length=1000, unique=True, help_text="Relative to shared/models.")
    folder = models.CharField(max_length=64, db_index=True, help_text="ComfyUI model folder.")
    size = models.BigIntegerField(default=0)
    mtime_ns = models.BigIntegerField(default=0)
    inode = models.BigIntegerField(default=0)

    sha256 = models.CharField(max_length=64, blank=True, default="", db_index=True)
    blake3 = models.CharField(max_length=64, blank=True, default="")
    expected_sha256 = models.CharField(max_length=64, blank=True, default="")
    expected_source = models.CharField(max_length=16, blank=True, default="", choices=ExpectedSource.choices)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.NEW, db_index=True)
    status_reason = models.CharField(max_length=500, blank=True, default="")
    # What the file looked like when it was last hashed: an incremental verify skips files that still match.
    hashed_size = models.BigIntegerField(null=True, blank=True)
    hashed_mtime_ns = models.BigIntegerField(null=True, blank=True)
    hashed_inode = models.BigIntegerField(null=True, blank=True)
    last_verified_at = models.DateTimeField(null=True, blank=True)
    evidence = models.JSONField(default=list, blank=True, help_text="Hash changes and mismatches, newest last.")

    architecture = models.CharField(max_length=32, blank=True, default="")
    metadata = models.JSONField(default=dict, blank=True, help_text="The safetensors __metadata__.")

    first_seen_at = models.DateTimeField(default=timezone.now)
    last_seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["folder", "path"]
        permissions = [("verify_modelasset", "Can scan and verify the model library, promote inbox files")]

    def __str__(self):
        return self.path

    @property
    def short_hash(self):
        """AutoV2: the first 10 hex digits of the SHA-256 (what CivitAI and A1111 show)."""
        return self.sha256[:10].upper()

    @property
    def name(self):
        return self.path.rsplit("/", 1)[-1]

    @property
    def is_problem(self):
        return self.status in self.PROBLEM_STATUSES


class ModelNodeCheck(models.Model):
    """What one node's copy of the shared library holds of one library file, as that node's agent last found it
    (`models verify --node NAME`): the same bytes as the library's SHA-256, different bytes, or none."""

    class Status(models.TextChoices):
        OK = "ok", "OK"  # the node's file has the library's SHA-256
        MISSING = "missing", "Missing"  # no such file in the node's shared library
        DIFFERS = "differs", "Differs"  # another size or another SHA-256 than the library's
        UNREADABLE = "unreadable", "Unreadable"  # there, but not a file that could be read (a link out, permissions)

    PROBLEM_STATUSES = (Status.MISSING, Status.DIFFERS, Status.UNREADABLE)

    asset = models.ForeignKey(ModelAsset, on_delete=models.CASCADE, related_name="node_checks")
    node = models.ForeignKey("instances.Node", on_delete=models.CASCADE, related_name="model_checks")
    status = models.CharField(max_length=16, choices=Status.choices, db_index=True)
    detail = models.CharField(max_length=500, blank=True, default="")
    sha256 = models.CharField(max_length=64, blank=True, default="", help_text="The node's file, when it was hashed.")
    library_sha256 = models.CharField(max_length=64, blank=True, default="",
                                      help_text="The library's SHA-256 it was compared with.")
    # What the node's file looked like when it was checked: the next check skips it while these and the library's
    # SHA-256 stay the same (unless --full).
    size = models.BigIntegerField(null=True, blank=True)
    mtime_ns = models.BigIntegerField(null=True, blank=True)
    inode = models.BigIntegerField(null=True, blank=True)
    checked_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["node", "asset"]
        constraints = [models.UniqueConstraint(fields=["asset", "node"], name="one_check_per_file_and_node")]

    def __str__(self):
        return f"{self.asset_id} on {self.node_id}: {self.status}"

    @property
    def is_problem(self):
        return self.status in self.PROBLEM_STATUSES


class ModelCacheReport(models.Model):
    """A node's model cache as its agent last recorded it (after a warm or a check there): the hub shows another
    node's cache from this, never reading that node's disk."""

    node = models.OneToOneField("instances.Node", on_delete=models.CASCADE, related_name="model_cache_report")
    status = models.JSONField(default=dict, blank=True, help_text="storage_app.modelcache.status(), trimmed.")
    reported_at = models.DateTimeField(default=timezone.now)

    def __str__(self):
        return f"model cache of {self.node_id}"


class Snapshot(models.Model):
    class Kind(models.TextChoices):
        CONFIG = "config", "Config (user data and registry settings)"
        FULL = "full", "Full (config, custom nodes, own models)"

    instance = models.ForeignKey("instances.Instance", null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="snapshots")
    instance_label = models.CharField(max_length=63, help_text="The instance id, kept after the instance is gone.")
    kind = models.CharField(max_length=10, choices=Kind.choices)
    include_output = models.BooleanField(default=False)
    automatic = models.CharField(max_length=20, blank=True, default="",
                                 help_text="Why it was taken without being asked: 'schedule' or 'before-restore'.")
    note = models.CharField(max_length=300, blank=True, default="")
    archive = models.CharField(max_length=500, help_text="Relative to COMFY_BACKUPS_PATH.")
    size = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64)
    manifest = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey("auth.User", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        permissions = [("restore_snapshot", "Can restore and clone snapshots")]

    def __str__(self):
        return f"{self.instance_label} {self.kind} {self.created_at:%Y-%m-%d %H:%M}"
