"""Config snapshot: storage_app.snapshots.create(kind="config") of an instance whose user/ folder holds 20,000 small
files, against `tar -czf` of the same folder.

The instance is made by services.instance_create and its tree built; user/ gets 20,000 files of 0.5-4 KiB (JSON-like
text, as ComfyUI's user data is: workflows, settings, node configs) in 600 sub-folders. Each timed snapshot is
removed (row and archive) outside the timed part. Baseline, in the same run: `tar -czf OUT -C <instance> user`
(a subprocess). Both read the files from the page cache (the tree is read once before timing). Runs alternate
between the two; medians.

Target: median(snapshots.create) / median(tar -czf) <= 1.3.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

from .environment import BenchError, PrivateEnvironment, median, ms, run, save_result, verdict

NAME = "snapshot"
TARGET = 1.3
FILES = int(os.environ.get("BENCH_SNAPSHOT_FILES", "20000"))
RUNS = int(os.environ.get("BENCH_SNAPSHOT_RUNS", "5"))
WORDS = ("sampler", "euler", "karras", "seed", "steps", "cfg", "denoise", "model", "lora", "prompt", "negative",
         "portrait", "landscape", "detailed", "upscale", "latent", "vae", "clip", "width", "height")


def main() -> int:
    with PrivateEnvironment(NAME, extra_env={"COMFY_DEFAULT_INSTANCE": "false"}) as env:
        env.setup_django()

        from instances import services
        from storage_app import layout, snapshots
        from storage_app.models import Snapshot

        rng = random.Random(20250105)
        instance = services.instance_create(instance_id="bench-snap", image="ghcr.io/comfyhub/comfyui:latest")
        layout.build_instance_tree(instance.instance_id, instance.node)
        root = layout.instance_dir(instance.instance_id, instance.node)
        user = root / "user"
        total = 0
        begin = time.perf_counter()
        for number in range(FILES):
            kind = ("workflows", "node-configs", "history")[number % 3]
            folder = user / "default" / kind / f"group-{number % 200:03d}"
            if number < 600:  # the (kind, group) pair repeats every 600 files
                folder.mkdir(parents=True, exist_ok=True)
            size = rng.randint(512, 4096)
            text = json.dumps({"name": f"item {number}", "values": [rng.choice(WORDS) for _ in range(size // 9)],
                               "seed": rng.randint(0, 2**32)})[:size]
            (folder / f"item-{number:05d}.json").write_text(text)
            total += len(text)
        written = time.perf_counter() - begin
        subprocess.run(["tar", "-cf", "/dev/null", "-C", str(root), "user"], check=True)  # into the page cache
        out = env.root / "baseline.tar.gz"

        def ours():
            start = time.perf_counter()
            snapshot = snapshots.create(instance, kind=Snapshot.Kind.CONFIG)
            seconds = time.perf_counter() - start
            size = snapshot.size
            snapshots.delete_archive(snapshot)
            return seconds, size

        def baseline():
            start = time.perf_counter()
            done = subprocess.run(["tar", "-czf", str(out), "-C", str(root), "user"], capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise BenchError(f"tar -czf failed: {done.stderr.strip()[:300]}")
            size = out.stat().st_size
            out.unlink()
            return seconds, size

        samples = {"ours": [], "baseline": []}
        sizes = {}
        for number in range(RUNS):
            for side in ("ours", "baseline") if number % 2 == 0 else ("baseline", "ours"):
                seconds, sizes[side] = ours() if side == "ours" else baseline()
                samples[side].append(seconds)

    ratio = median(samples["ours"]) / median(samples["baseline"])
    ok = ratio <= TARGET
    print(f"{NAME}: user/ with {FILES:,} files ({total / 2**20:.1f} MiB) written in {written:.1f}s; archives "
          f"{sizes['ours'] / 2**20:.2f} MiB (snapshot) vs {sizes['baseline'] / 2**20:.2f} MiB (tar); {RUNS} runs each",
          flush=True)
    print(f"  snapshots.create runs {', '.join(ms(s) for s in samples['ours'])}; tar -czf runs "
          f"{', '.join(ms(s) for s in samples['baseline'])}")
    print(f"{NAME}: snapshots.create median {ms(median(samples['ours']))} | baseline tar -czf median "
          f"{ms(median(samples['baseline']))} | ratio {ratio:.2f} (target <= {TARGET}) {verdict(ok)}", flush=True)
    save_result(NAME, {"target_ratio": TARGET, "ratio": ratio, "pass": ok, "samples": samples, "sizes": sizes})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
