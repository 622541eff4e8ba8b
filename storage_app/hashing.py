"""Hashing model files at disk speed, and reading what safetensors headers say about them.

`hash_file` streams a file once through SHA-256 (OpenSSL's, via hashlib) and optionally BLAKE3 in the same pass,
with one fixed buffer (constant memory). Both release the GIL while hashing, so threads spread files over cores.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import time
from dataclasses import dataclass

import blake3

CHUNK_SIZE = 4 << 20
# ComfyUI accepts headers up to 100 MB; real ones are well under 1 MB. Anything bigger is treated as damage.
SAFETENSORS_HEADER_LIMIT = 32 << 20


class FileChangedWhileReading(Exception):
    """The file's size or modification time changed while it was hashed (still being written or copied)."""


class HashCancelled(Exception):
    pass


@dataclass(frozen=True)
class FileHash:
    sha256: str
    blake3: str
    size: int
    mtime_ns: int
    inode: int


# BLAKE3 reads a file through mmap on all cores, as b3sum does, when the file has not changed for this long: a file
# truncated while mapped would kill the process (SIGBUS), and a file at rest is not truncated.
MMAP_QUIET_SECONDS = 60


def hash_file(path, *, with_sha256: bool = True, with_blake3: bool = False, on_bytes=None,
              cancelled: threading.Event | None = None, chunk_size: int = CHUNK_SIZE) -> FileHash:
    """Hash `path`. Raises OSError (vanished, unreadable), FileChangedWhileReading, HashCancelled.

    SHA-256 streams the file through one fixed buffer. BLAKE3, when asked for, runs beside it on a file at rest
    (mmap, every core: it finishes first, and the SHA-256 pass then reads the pages it brought in), or in the
    same streaming pass otherwise."""
    sha = hashlib.sha256() if with_sha256 else None
    b3 = blake3.blake3(max_threads=blake3.blake3.AUTO) if with_blake3 else None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    mapped = None
    try:
        before = os.fstat(fd)
        if b3 is not None and before.st_size > 0 and time.time() - before.st_mtime > MMAP_QUIET_SECONDS:
            mapped = _Blake3Beside(b3, path)
            if sha is None:
                mapped.join()
                if on_bytes is not None:
                    on_bytes(before.st_size)
            b3 = None  # the streaming pass below is SHA-256 only
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        buffer = bytearray(chunk_size if (sha is not None or b3 is not None) else 1)
        view = memoryview(buffer)
        total = 0 if (sha is not None or b3 is not None) else before.st_size
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as handle:
            while sha is not None or b3 is not None:
                if cancelled is not None and cancelled.is_set():
                    raise HashCancelled()
                count = handle.readinto(view)
                if not count:
                    break
                piece = view[:count]
                if sha is not None:
                    sha.update(piece)
                if b3 is not None:
                    b3.update(piece)
                total += count
                if on_bytes is not None:
                    on_bytes(count)
        if mapped is not None:
            mapped.join()
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if total != before.st_size or after.st_size != before.st_size or after.st_mtime_ns != before.st_mtime_ns:
        raise FileChangedWhileReading(
            f"changed while being read ({before.st_size} bytes before, {after.st_size} after, {total} read); "
            "verify again once it is complete"
        )
    if mapped is not None:
        b3 = mapped.hasher
    return FileHash(
        sha256=sha.hexdigest() if sha is not None else "",
        blake3=b3.hexdigest() if b3 is not None else "",
        size=total,
        mtime_ns=before.st_mtime_ns,
        inode=before.st_ino,
    )


class _Blake3Beside(threading.Thread):
    def __init__(self, hasher, path):
        super().__init__(daemon=True, name="blake3")
        self.hasher, self.path, self.error = hasher, path, None
        self.start()

    def run(self):
        try:
            self.hasher.update_mmap(self.path)
        except OSError as exc:
            self.error = exc

    def join(self, timeout=None):
        super().join(timeout)
        if self.error is not None:
            raise self.error


# --- safetensors ---------------------------------------------------------------------------------------------

class HeaderError(Exception):
    pass


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict
    tensors: dict  # name -> {"dtype", "shape", "data_offsets"}


def read_safetensors_header(path, limit: int = SAFETENSORS_HEADER_LIMIT) -> SafetensorsHeader:
    """Read only the header of a safetensors file: 8 bytes of length, then that much JSON, never more than `limit`."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise HeaderError("too short to be a safetensors file (no header length)")
        (length,) = struct.unpack("<Q", prefix)
        if length > limit:
            raise HeaderError(f"header claims {length} bytes, more than the {limit} allowed: damaged or not "
                              "safetensors")
        raw = handle.read(length)
    if len(raw) < length:
        raise HeaderError(f"truncated: header of {length} bytes, file ends after {len(raw)}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise HeaderError(f"header is not valid JSON ({exc})") from exc
    except RecursionError:
        raise HeaderError("header nests too deeply to be safetensors") from None
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        metadata = {}
    metadata = {str(k): str(v)[:2000] for k, v in metadata.items()}
    return SafetensorsHeader(metadata=metadata, tensors={k: v for k, v in header.items() if isinstance(v, dict)})


ARCHITECTURES = ("SD1.x", "SD2.x", "SDXL", "SD3", "Flux", "unknown")


def guess_architecture(header: SafetensorsHeader) -> str:
    """SD1.x, SD2.x, SDXL, SD3, Flux or unknown: metadata first, then tell-tale tensor names and shapes."""
    meta = header.metadata
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = meta.get(key, "").lower()
        if not value:
            continue
        if "flux" in value:
            return "Flux"
        if "xl" in value:
            return "SDXL"
        if "v3" in value or "sd3" in value or "stable-diffusion-3" in value:
            return "SD3"
        if "v2" in value or "sd_2" in value or "sd2" in value:
            return "SD2.x"
        if "v1" in value or "sd_1" in value or "sd1" in value:
            return "SD1.x"
    names = header.tensors
    if any("double_blocks" in n or "single_transformer_blocks" in n for n in names):
        return "Flux"
    if any("joint_blocks" in n for n in names):
        return "SD3"
    if any(n.startswith(("conditioner.embedders.1", "lora_te2_")) for n in names):
        return "SDXL"
    for name, info in names.items():
        if name.endswith("label_emb.0.0.weight") and _dim(info, 1) == 2816:
            return "SDXL"
    for name, info in names.items():
        if "attn2.to_k.weight" in name or ("attn2_to_k" in name and name.endswith("lora_down.weight")):
            width = _dim(info, 1)
            if width == 768:
                return "SD1.x"
            if width == 1024:
                return "SD2.x"
            if width == 2048:
                return "SDXL"
    return "unknown"


def _dim(info, index):
    shape = info.get("shape") or []
    return shape[index] if len(shape) > index else None
