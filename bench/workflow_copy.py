"""Copying workflows between instances: instances.workflows.copy_workflows of 1,000 workflow files (about 5 KiB each,
a third of them in sub-folders) from one instance to 10 others.

The 11 instances are made by services.instance_create; the source's user/default/workflows/ holds the files (JSON,
UI format). Each timed run starts with the targets' workflows folders absent (removed outside the timed part) and
copies every file with on_conflict="skip" (the default of services.workflows_copy), so every file is written.
Baseline, in the same run: `cp -r` of the source's workflows folder to each of the 10 targets' (10 subprocesses,
timed together). Runs alternate between the two; medians.

Target: median(copy_workflows) / median(cp -r) <= 3.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time

from .environment import BenchError, PrivateEnvironment, median, ms, run, save_result, verdict

NAME = "workflow_copy"
TARGET = 3.0
FILES = 1000
TARGETS = 10
# One run per side by default: 10,000 small-file creations take tens of seconds on a slow disk (see README).
RUNS = int(os.environ.get("BENCH_COPY_RUNS", "1"))


def _workflow_bytes(number, rng) -> bytes:
    nodes = []
    node = 0
    while True:
        node += 1
        nodes.append({"id": node, "type": rng.choice(("KSampler", "CLIPTextEncode", "VAEDecode", "SaveImage")),
                      "pos": [rng.randint(0, 3000), rng.randint(0, 3000)], "size": [315, 262], "flags": {},
                      "order": node, "mode": 0, "properties": {"Node name for S&R": "node"},
                      "widgets_values": [rng.randint(0, 2**32), "randomize", 20, 7.5, "euler", "normal", 1]})
        raw = json.dumps({"last_node_id": node, "nodes": nodes, "links": [], "groups": [], "config": {},
                          "extra": {"workflow": number}, "version": 0.4}, indent=1).encode()
        if len(raw) >= 5 * 1024:
            return raw


def main() -> int:
    with PrivateEnvironment(NAME, extra_env={"COMFY_DEFAULT_INSTANCE": "false"}) as env:
        env.setup_django()

        from instances import services, workflows
        from storage_app import layout

        rng = random.Random(20250104)
        source = services.instance_create(instance_id="wf-source", image="ghcr.io/comfyhub/comfyui:latest")
        targets = [services.instance_create(instance_id=f"wf-target-{n:02d}", image="ghcr.io/comfyhub/comfyui:latest")
                   for n in range(TARGETS)]
        for instance in [source, *targets]:
            layout.build_instance_tree(instance.instance_id, instance.node)
        root = workflows.workflows_dir(source)
        paths = []
        total_bytes = 0
        for number in range(FILES):
            folder = ("", "", "portraits/", "landscapes/upscaled/", "team-a/")[number % 5] if number % 3 == 0 else ""
            relpath = f"{folder}workflow-{number:04d}.json"
            target = root / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            raw = _workflow_bytes(number, rng)
            target.write_bytes(raw)
            total_bytes += len(raw)
            paths.append(relpath)
        target_dirs = [workflows.workflows_dir(target) for target in targets]
        os.sync()

        def reset():
            for folder in target_dirs:
                shutil.rmtree(folder, ignore_errors=True)
            os.sync()  # the previous run's writes reach the disk before the next one is timed

        def ours():
            reset()
            begin = time.perf_counter()
            result = workflows.copy_workflows(source, targets, paths, "skip")
            seconds = time.perf_counter() - begin
            written = result.count("written")
            if written != FILES * TARGETS:
                problems = [f for f in result.files if not f["result"].startswith("written")][:3]
                raise BenchError(f"copy_workflows wrote {written} of {FILES * TARGETS} files: {problems}")
            return seconds

        def baseline():
            reset()
            begin = time.perf_counter()
            for folder in target_dirs:
                done = subprocess.run(["cp", "-r", str(root), str(folder)], capture_output=True, text=True)
                if done.returncode != 0:
                    raise BenchError(f"cp -r failed: {done.stderr.strip()[:300]}")
            seconds = time.perf_counter() - begin
            copied = sum(len(files) for folder in target_dirs for _, _, files in os.walk(folder))
            if copied != FILES * TARGETS:
                raise BenchError(f"cp -r copied {copied} files, expected {FILES * TARGETS}")
            return seconds

        samples = {"ours": [], "baseline": []}
        for number in range(RUNS):
            for side in ("ours", "baseline") if number % 2 == 0 else ("baseline", "ours"):
                samples[side].append(ours() if side == "ours" else baseline())

        # Where the time goes (information): one target's worth of write_workflow calls, with and without the fsync.
        contents = {relpath: workflows.read_workflow(source, relpath) for relpath in paths}
        probe = targets[0]

        def one_target(fsync_enabled, sync_once=False):
            shutil.rmtree(target_dirs[0], ignore_errors=True)
            os.sync()
            real_fsync = os.fsync
            if not fsync_enabled:
                workflows.os.fsync = lambda fd: None
            try:
                begin = time.perf_counter()
                for relpath, raw in contents.items():
                    workflows.write_workflow(probe, relpath, raw, "skip")
                if sync_once:
                    os.sync()
                return time.perf_counter() - begin
            finally:
                workflows.os.fsync = real_fsync

        with_fsync = one_target(True)
        without_fsync = one_target(False)
        sync_once = one_target(False, sync_once=True)

    ratio = median(samples["ours"]) / median(samples["baseline"])
    ok = ratio <= TARGET
    print(f"{NAME}: {FILES:,} workflows ({total_bytes / FILES / 1024:.1f} KiB average, {total_bytes / 2**20:.1f} MiB) "
          f"to {TARGETS} instances = {FILES * TARGETS:,} files per run; {RUNS} runs each", flush=True)
    print(f"  copy_workflows runs {', '.join(ms(s) for s in samples['ours'])}; cp -r runs "
          f"{', '.join(ms(s) for s in samples['baseline'])}")
    print(f"  where the time goes: {FILES:,} write_workflow calls into one target {ms(with_fsync)}; the same with "
          f"os.fsync made a no-op {ms(without_fsync)}, and with no fsync but one os.sync() after the batch "
          f"{ms(sync_once)} (information; not the project as it is)")
    print(f"{NAME}: copy_workflows median {ms(median(samples['ours']))} | baseline cp -r x {TARGETS} median "
          f"{ms(median(samples['baseline']))} | ratio {ratio:.2f} (target <= {TARGET:g}) {verdict(ok)}", flush=True)
    save_result(NAME, {"target_ratio": TARGET, "ratio": ratio, "pass": ok, "samples": samples,
                       "one_target_fsync_s": with_fsync, "one_target_no_fsync_s": without_fsync,
                       "one_target_sync_once_s": sync_once})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
