"""Warming a node's model cache: storage_app.modelcache.warm against `cp` of the same files plus hashing them at the
per-core SHA-256 limit.

Data (in the temp dir, never sparse): BENCH_CACHE_FILES files (default 4) making BENCH_CACHE_MIB MiB in all (default
4096) under shared/models/checkpoints, scanned and verified (the library records their SHA-256). Every file is read
once before timing, so both sides read from the page cache. ROUNDS runs per side, alternating; before each run the
previous copies are removed and the disk synced (not timed).

  ours      modelcache.warm(all files) into an empty cache: each file read once, hashed while it is written, fsynced,
            renamed into place (a thread per core over the files)
  baseline  `cp FILE... DIR` then `openssl dgst -sha256 FILE...` (one process: the per-core SHA-256 limit)

Target: throughput ratio (baseline time / ours, best of ROUNDS) >= 0.8. Printed for information: the baseline's parts,
the same with `sync` of the copies (warm makes each copy durable before it is used; cp does not), and the ratio to the
slower part alone (a perfect overlap of copy and hash on one core).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from .environment import (
    BenchError, PrivateEnvironment, at_rest, random_block, read_into_cache, run, save_result, timed_tool,
    usable_cores, verdict, write_models,
)

NAME = "model_cache"
TOTAL = int(os.environ.get("BENCH_CACHE_MIB", "4096")) << 20
FILES = int(os.environ.get("BENCH_CACHE_FILES", "4"))
ROUNDS = 3
TARGET = 0.8


def main() -> int:
    if FILES < 1 or TOTAL < FILES:
        raise BenchError("BENCH_CACHE_FILES must be at least 1 and BENCH_CACHE_MIB at least that many MiB")
    for tool in ("openssl", "cp", "sync"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is missing")
    cores = usable_cores()
    with PrivateEnvironment(NAME, extra_env={"COMFY_DEFAULT_INSTANCE": "false", "MODEL_HASH_BLAKE3": "false",
                                             "MODEL_HASH_WORKERS": "0", "MODEL_CACHE_MAX_GB": "1000"}) as env:
        cache = env.root / "cache"
        os.environ["MODEL_CACHE_PATH"] = str(cache)
        env.setup_django()

        from storage_app import layout, library, modelcache

        models = layout.shared_models_dir()
        folder = models / "checkpoints"
        folder.mkdir(parents=True)
        size = TOTAL // FILES
        block = random_block()
        begin = time.perf_counter()
        files = [folder / f"model-{number:02d}.safetensors" for number in range(FILES)]
        write_models(files, size, block)
        del block
        at_rest(files)
        written = time.perf_counter() - begin
        library.scan(root=models)
        verified = library.verify(root=models)
        if verified.hashed != FILES:
            raise BenchError(f"the library verified {verified.hashed} files, expected {FILES}")
        relpaths = [f"checkpoints/{path.name}" for path in files]
        read_into_cache(files)
        baseline_dir = env.root / "cp-target"

        def reset():
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(baseline_dir, ignore_errors=True)
            baseline_dir.mkdir()
            subprocess.run(["sync"], check=True)

        ours, cps, hashes, syncs = [], [], [], []
        digests = {}
        for number in range(ROUNDS):
            for side in ("ours", "theirs") if number % 2 == 0 else ("theirs", "ours"):
                reset()
                if side == "ours":
                    start = time.perf_counter()
                    result = modelcache.warm(relpaths)
                    ours.append(time.perf_counter() - start)
                    if sorted(result.copied) != sorted(relpaths) or result.refused:
                        raise BenchError(f"warm copied {result.copied}, refused {result.refused}")
                    digests["cache"] = sorted(entry["sha256"] for entry in modelcache.status()["entries"])
                else:
                    seconds, _ = timed_tool(["cp", *map(str, files), str(baseline_dir)])
                    cps.append(seconds)
                    seconds, out = timed_tool(["openssl", "dgst", "-sha256", *map(str, files)])
                    hashes.append(seconds)
                    digests["openssl"] = sorted(line.rsplit(" ", 1)[-1] for line in out.splitlines())
                    seconds, _ = timed_tool(["sync", *(str(baseline_dir / path.name) for path in files)])
                    syncs.append(seconds)
        if digests["cache"] != digests["openssl"]:
            raise BenchError("the cache's SHA-256s and openssl's disagree")
        reset()

    theirs = [c + h for c, h in zip(cps, hashes)]
    best_ours, best_theirs = min(ours), min(theirs)
    ratio = best_theirs / best_ours
    with_sync = min(c + h + s for c, h, s in zip(cps, hashes, syncs)) / best_ours
    overlap = max(min(cps), min(hashes)) / best_ours
    ok = ratio >= TARGET
    gib = TOTAL / (1 << 30)
    print(f"{NAME}: {cores} cores; {FILES} file(s), {gib:.2f} GiB in all, written in {written:.1f}s, read once into "
          f"the page cache; best of {ROUNDS} per side", flush=True)
    print(f"  baseline parts (best): cp {min(cps):.2f}s ({gib / min(cps):.2f} GiB/s), openssl dgst -sha256 "
          f"{min(hashes):.2f}s ({gib / min(hashes):.2f} GiB/s), sync of the copies {min(syncs):.2f}s")
    print(f"  for information: ratio to cp + sync + openssl {with_sync:.2f}; to the slower of cp and openssl alone (a "
          f"perfect overlap on one core) {overlap:.2f}")
    print(f"{NAME}: modelcache.warm, {gib:.2f} GiB: best {best_ours:.2f}s ({gib / best_ours:.2f} GiB/s) | baseline "
          f"cp + openssl dgst -sha256: best {best_theirs:.2f}s ({gib / best_theirs:.2f} GiB/s) | throughput ratio "
          f"{ratio:.2f} (target >= {TARGET}) {verdict(ok)}", flush=True)
    save_result(NAME, {"cores": cores, "files": FILES, "bytes": TOTAL, "target": TARGET, "pass": ok, "ours": ours,
                       "cp": cps, "openssl": hashes, "sync": syncs, "ratio": ratio, "ratio_with_sync": with_sync,
                       "ratio_to_overlap": overlap})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
