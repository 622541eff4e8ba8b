"""Model-sized data files for the benchmarks that read them (hashing, model_cache): random bytes, never sparse, and
read once into the page cache (which cannot be dropped), so both sides of a comparison read from it."""
from __future__ import annotations

import os
import time

BLOCK = 64 << 20  # one os.urandom block, repeated: incompressible, and quick to write


def random_block() -> bytes:
    return os.urandom(BLOCK)


def write_random(path, size: int, block: bytes, rotate: int = 0):
    """`size` bytes of `block`, repeated, starting `rotate` bytes into it."""
    rotated = block[rotate:] + block[:rotate] if rotate else block
    with open(path, "wb") as handle:
        left = size
        while left:
            piece = rotated[: min(left, len(rotated))]
            handle.write(piece)
            left -= len(piece)


def write_models(paths, size: int, block: bytes):
    """Each of `paths` written with `size` bytes of `block`, rotated by the file's number so no two are alike."""
    for number, path in enumerate(paths):
        write_random(path, size, block, rotate=(number * 7919 * 4096) % len(block))


def at_rest(paths):
    """Dated a day back: a model library is at rest, its files written long ago (hashing.MMAP_QUIET_SECONDS matters
    for BLAKE3)."""
    old = time.time() - 24 * 3600
    for path in paths:
        os.utime(path, (old, old))


def read_into_cache(paths):
    buffer = bytearray(8 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
