"""Legacy migration on one filesystem: a legacy ./data tree holding 1 GB of models against one holding 50 GB
(sparse files: real sizes, no disk), both moved with services.legacy_migrate_now.

Moving by rename costs the same whatever the files weigh; copying would cost 50 times more. Each tree has the same
number of files (model files of 250 MB vs 12.5 GB, plus small user files), built fresh for every run; the instance
and the shared library are emptied between runs. Runs alternate between the two sizes; medians.

Target: median(50 GB) / median(1 GB) <= 1.5.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

from .environment import PrivateEnvironment, median, ms, run, save_result, verdict

NAME = "migration"
TARGET = 1.5
RUNS = int(os.environ.get("BENCH_MIGRATION_RUNS", "5"))
MODELS = 4  # model files per tree
USER_FILES = 200
SIZES = {"1 GB": 10**9, "50 GB": 50 * 10**9}


def build_tree(root, total_bytes):
    data = root / "data"
    for number in range(MODELS):
        path = data / "comfy" / "models" / ("checkpoints", "loras", "vae", "unet")[number] / f"model-{number}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.truncate(total_bytes // MODELS)  # sparse: the size is real, the disk is not used
    for number in range(USER_FILES):
        path = data / "comfy" / "user" / "default" / "workflows" / f"w-{number:03d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"nodes": []}')
    return data


def main() -> int:
    with PrivateEnvironment(NAME, extra_env={"COMFY_DEFAULT_INSTANCE": "false"}) as env:
        env.setup_django()

        from django.conf import settings

        from instances.models import Instance
        from storage_app import services

        samples = {label: [] for label in SIZES}
        work = env.root / "legacy"
        for number in range(RUNS):
            order = list(SIZES) if number % 2 == 0 else list(reversed(SIZES))
            for label in order:
                shutil.rmtree(work, ignore_errors=True)
                source = build_tree(work, SIZES[label])
                begin = time.perf_counter()
                result = services.legacy_migrate_now(source=str(source), instance_id="comfy")
                samples[label].append(time.perf_counter() - begin)
                if result["moved"] != MODELS + USER_FILES:
                    raise SystemExit(f"{NAME}: expected {MODELS + USER_FILES} moves, got {result}")
                Instance.objects.all().delete()
                shutil.rmtree(settings.COMFY_INSTANCES_PATH, ignore_errors=True)
                shutil.rmtree(settings.COMFY_SHARED_PATH, ignore_errors=True)
                shutil.rmtree(settings.DATA_DIR / "migrations", ignore_errors=True)

    small, large = median(samples["1 GB"]), median(samples["50 GB"])
    ratio = large / small
    ok = ratio <= TARGET
    print(f"{NAME}: {MODELS} model files + {USER_FILES} user files per tree, {RUNS} runs each, one filesystem",
          flush=True)
    print(f"{NAME}: legacy migrate of 50 GB median {ms(large)} | baseline the same tree holding 1 GB median "
          f"{ms(small)} | ratio {ratio:.2f} (target <= {TARGET:g}) {verdict(ok)}", flush=True)
    save_result(NAME, {"target": TARGET, "ratio": ratio, "pass": ok, "samples_s": samples})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
