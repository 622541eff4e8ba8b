"""Incremental verification: library.verify() when nothing changed, against a full library.verify(full=True).

10,000 files of 64 KiB (random bytes, different in each file) under a models folder, in 100 sub-folders across four
model folders; library.scan records them (timed, for information). Then a full verify hashes every file and records
the outcome (timed once: the baseline), and an incremental verify, which must find every file unchanged since it
was hashed and hash none, is timed ROUNDS times (median).

Target: median(incremental) / full <= 0.02.
"""
from __future__ import annotations

import os
import sys
import time

from .environment import BenchError, PrivateEnvironment, median, ms, run, save_result, verdict

NAME = "incremental_verify"
TARGET = 0.02
FILES = int(os.environ.get("BENCH_VERIFY_FILES", "10000"))
SIZE = 64 << 10
ROUNDS = 3
FOLDERS = ("loras", "checkpoints", "embeddings", "upscale_models")
SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


def main() -> int:
    with PrivateEnvironment(NAME, extra_env={"COMFY_DEFAULT_INSTANCE": "false", "MODEL_HASH_BLAKE3": "false"}) as env:
        env.setup_django()

        from django.db import connection

        from storage_app import library, layout
        from storage_app.models import ModelAsset

        models = layout.shared_models_dir()
        pool = os.urandom(8 << 20)
        begin = time.perf_counter()
        for number in range(FILES):
            folder = models / FOLDERS[number % len(FOLDERS)] / f"set-{number % 100:02d}"
            if number < 100:  # the folder/set pair repeats every 100 files
                folder.mkdir(parents=True)
            offset = (number * 4099) % (len(pool) - SIZE)
            (folder / f"file-{number:05d}{SUFFIXES[number % len(SUFFIXES)]}").write_bytes(pool[offset:offset + SIZE])
        written = time.perf_counter() - begin

        begin = time.perf_counter()
        scanned = library.scan(root=models)
        scan_seconds = time.perf_counter() - begin
        if scanned.new != FILES:
            raise BenchError(f"the scan found {scanned.new} new files, expected {FILES}")

        begin = time.perf_counter()
        full = library.verify(full=True, root=models)
        full_seconds = time.perf_counter() - begin
        if full.hashed != FILES:
            raise BenchError(f"the full verify hashed {full.hashed} files, expected {FILES}")

        incremental = []
        for _ in range(ROUNDS):
            begin = time.perf_counter()
            outcome = library.verify(root=models)
            incremental.append(time.perf_counter() - begin)
            if outcome.hashed or outcome.skipped != FILES:
                raise BenchError(f"the incremental verify hashed {outcome.hashed} and skipped {outcome.skipped} "
                                 f"files; expected 0 and {FILES}")

        # The models_verify job scans before it verifies: a scan that finds nothing changed (information).
        begin = time.perf_counter()
        rescanned = library.scan(root=models)
        rescan_seconds = time.perf_counter() - begin
        if rescanned.unchanged != FILES:
            raise BenchError(f"the second scan found {rescanned.unchanged} unchanged files, expected {FILES}")

        connection.close()

    ratio = median(incremental) / full_seconds
    ok = ratio <= TARGET
    print(f"{NAME}: {FILES:,} files of {SIZE >> 10} KiB written in {written:.1f}s; library.scan {scan_seconds:.1f}s",
          flush=True)
    print(f"  library.scan() again with nothing changed (the models_verify job runs it before verify): "
          f"{ms(rescan_seconds)}")
    print(f"{NAME}: incremental verify median {ms(median(incremental))} (runs: "
          f"{', '.join(ms(s) for s in incremental)}) | baseline full verify {ms(full_seconds)} | ratio {ratio:.4f} "
          f"(target <= {TARGET}) {verdict(ok)}", flush=True)
    save_result(NAME, {"target_ratio": TARGET, "ratio": ratio, "pass": ok, "files": FILES,
                       "scan_s": scan_seconds, "rescan_s": rescan_seconds, "full_s": full_seconds, "incremental_s": incremental})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
