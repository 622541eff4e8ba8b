"""Workflow pre-flight: instances.workflows.preflight of a 500-node UI-format workflow against a stopped instance
whose shared library holds 2,000 model files (the pre-flight of a stopped instance walks the files on disk).

The workflow (built here, ComfyUI's UI format with links, positions, widgets): 40 CheckpointLoaderSimple, 120
LoraLoader, 10 VAELoader, 10 ControlNetLoader, 5 UpscaleModelLoader and 15 custom loaders naming a model file among
their widgets (200 model references, 20 of them to files the library lacks, typically a neighbouring version), 80
KSampler, 100 CLIPTextEncode, 100 nodes of custom types, 20 Note/Reroute. The instance knows 300 node types
(Instance.node_types, as remembered from /object_info), six of the workflow's types not among them. The
library: 2,000 empty files across six model folders (and their subfolders) under shared/models. The workflow is parsed once; preflight(data,
instance) is timed RUNS times (median).
Baseline, in the same run: json.loads of the same workflow bytes (median of RUNS).

Target: median preflight <= 50 ms; the ratio to json.loads is printed for information.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time

from .environment import BenchError, PrivateEnvironment, median, ms, percentile, run, save_result, verdict

NAME = "preflight"
TARGET_SECONDS = 0.050
RUNS = int(os.environ.get("BENCH_PREFLIGHT_RUNS", "30"))
LIBRARY = {"checkpoints": 300, "loras": 1200, "vae": 50, "controlnet": 150, "upscale_models": 50, "embeddings": 250}
SUBFOLDERS = ("", "sdxl/", "sd15/", "flux/", "style/", "character/")
CUSTOM_TYPES = [f"Custom{name}Node" for name in ("Wildcard", "TextConcat", "ImageResize", "FaceDetailer", "Upscale",
                                                 "Segment", "Mask", "Latent", "Prompt", "Switch", "ColorMatch",
                                                 "Tile", "Blend", "Crop", "Save", "Preview", "Math")]
CUSTOM_LOADERS = ("IPAdapterModelLoader", "InstantIDModelLoader", "PulidModelLoader")


def _library_names(rng):
    names = {}
    for folder, count in LIBRARY.items():
        suffix = ".pt" if folder == "embeddings" else ".safetensors"
        names[folder] = [f"{SUBFOLDERS[n % len(SUBFOLDERS)]}{folder[:-1]}-{n:04d}-v{1 + n % 3}{suffix}"
                         for n in range(count)]
    return names


def _workflow(names, rng):
    """A UI-format workflow with 500 nodes and 200 model references (20 missing from the library)."""
    plan = ([("CheckpointLoaderSimple", "checkpoints")] * 40 + [("LoraLoader", "loras")] * 120
            + [("VAELoader", "vae")] * 10 + [("ControlNetLoader", "controlnet")] * 10
            + [("UpscaleModelLoader", "upscale_models")] * 5
            + [(CUSTOM_LOADERS[n % 3], "controlnet") for n in range(15)]
            + [("KSampler", None)] * 80 + [("CLIPTextEncode", None)] * 100
            + [(CUSTOM_TYPES[n % len(CUSTOM_TYPES)], None) for n in range(100)]
            + [("Note", None)] * 10 + [("Reroute", None)] * 10)
    if len(plan) != 500:
        raise BenchError(f"the workflow plan has {len(plan)} nodes, not 500")
    missing_slots = set(rng.sample(range(200), 20))
    nodes, links, reference = [], [], 0
    for number, (kind, folder) in enumerate(plan, 1):
        widgets = []
        if folder is not None:
            name = rng.choice(names[folder])
            if reference in missing_slots:
                name = name.replace("-v1.", "-v4.").replace("-v2.", "-v5.").replace("-v3.", "-v6.")
            reference += 1
            widgets = {"LoraLoader": [name, round(rng.uniform(0.2, 1.2), 2), 1.0]}.get(kind, [name])
            if kind in CUSTOM_LOADERS:
                widgets = ["auto", name, 0.8]
        elif kind == "KSampler":
            widgets = [rng.randint(0, 2**48), "randomize", 25, 7.0, "dpmpp_2m", "karras", 1.0]
        elif kind == "CLIPTextEncode":
            widgets = [" ".join(rng.choice(("a", "photo", "of", "cat", "sunset", "detailed", "portrait", "4k"))
                                for _ in range(40))]
        elif kind == "Note":
            widgets = ["Remember to set the seed. " * 5]
        elif kind.startswith("Custom"):
            widgets = [rng.randint(0, 100), "enabled", round(rng.random(), 3), "some text value"]
        node = {
            "id": number, "type": kind, "pos": [rng.randint(0, 8000), rng.randint(0, 8000)], "size": [315, 262],
            "flags": {}, "order": number, "mode": 0,
            "inputs": [{"name": "model", "type": "MODEL", "link": number * 2}],
            "outputs": [{"name": "MODEL", "type": "MODEL", "links": [number * 2 + 1], "slot_index": 0}],
            "properties": {"Node name for S&R": kind, "cnr_id": "comfy-core", "ver": "0.3.40"},
            "widgets_values": widgets,
        }
        nodes.append(node)
        if number > 1:
            links.append([number * 2, number - 1, 0, number, 0, "MODEL"])
    return {"id": "5f0e4c1e-0000-4000-8000-000000000000", "revision": 0, "last_node_id": 500, "last_link_id": 1000,
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.5, "offset": [0, 0]}, "frontendVersion": "1.23.4"}, "version": 0.4}


def main() -> int:
    with PrivateEnvironment(NAME, extra_env={"COMFY_DEFAULT_INSTANCE": "false"}) as env:
        env.setup_django()

        from django.conf import settings

        from instances import services, workflows
        from instances.models import Instance

        rng = random.Random(20250103)
        names = _library_names(rng)
        models_root = settings.COMFY_SHARED_PATH / "models"
        for folder, listed in names.items():
            for name in listed:
                path = models_root / folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
        if sum(1 for p in models_root.rglob("*") if p.is_file()) != sum(LIBRARY.values()):
            raise BenchError("the library files were not all made")
        instance = services.instance_create(instance_id="bench-preflight", image="ghcr.io/comfyhub/comfyui:latest")
        builtin = ["CheckpointLoaderSimple", "LoraLoader", "VAELoader", "ControlNetLoader", "UpscaleModelLoader",
                   "KSampler", "CLIPTextEncode", *CUSTOM_LOADERS[:2], *CUSTOM_TYPES[:-5]]
        known = builtin + [f"SomeOtherNode{n:03d}" for n in range(300 - len(builtin))]
        Instance.objects.filter(pk=instance.pk).update(node_types=known)
        instance = services.instances_with_relations().get(pk=instance.pk)

        raw = json.dumps(_workflow(names, rng)).encode()
        data = workflows.parse_workflow(raw)

        result = workflows.preflight(data, instance)  # warm-up, and the checks below
        if len(result["models"]) < 150 or not result["missing_models"] or not result["missing_node_types"]:
            raise BenchError(f"unexpected preflight result: {len(result['models'])} models, "
                             f"{len(result['missing_models'])} missing, {result['missing_node_types']}")
        ours, baseline = [], []
        for number in range(RUNS):
            for side in ("ours", "json") if number % 2 == 0 else ("json", "ours"):
                begin = time.perf_counter()
                if side == "ours":
                    workflows.preflight(data, instance)
                    ours.append(time.perf_counter() - begin)
                else:
                    json.loads(raw)
                    baseline.append(time.perf_counter() - begin)

        # Where the time goes (information): its three parts, each timed alone.
        parts = {}
        for label, function in (
            ("workflow_needs(data)", lambda: workflows.workflow_needs(data)),
            ("available_models(instance) (a walk of 2,000 shared files + the instance's models/)",
             lambda: workflows.available_models(instance)),
        ):
            samples = []
            for _ in range(10):
                begin = time.perf_counter()
                function()
                samples.append(time.perf_counter() - begin)
            parts[label] = median(samples)
        parts.update(_near_match_parts(workflows, data, instance))

    ratio = median(ours) / median(baseline)
    ok = median(ours) <= TARGET_SECONDS
    print(f"{NAME}: workflow of {len(data['nodes'])} nodes, {len(raw) / 1024:.0f} KiB, {len(result['models'])} "
          f"distinct "
          f"model references ({len(result['missing_models'])} missing), {len(result['missing_node_types'])} missing "
          f"node types; library of {sum(LIBRARY.values()):,} files; {RUNS} runs each", flush=True)
    print("  where the time goes (each part timed alone; difflib is per missing model, summed):")
    for label, seconds in parts.items():
        print(f"    {label:88s} {ms(seconds):>9s}")
    print(f"{NAME}: preflight median {ms(median(ours))} p90 {ms(percentile(ours, 0.9))} | baseline json.loads median "
          f"{ms(median(baseline))} | ratio {ratio:.1f} (information) | target <= {ms(TARGET_SECONDS)} {verdict(ok)}",
          flush=True)
    save_result(NAME, {"target_s": TARGET_SECONDS, "pass": ok, "preflight_s": ours, "json_loads_s": baseline,
                       "ratio": ratio, "parts_s": parts})
    return 0 if ok else 1


def _near_match_parts(workflows, data, instance):
    """preflight's near-match loop, split into its steps and summed over the missing models."""
    import difflib

    needs = workflows.workflow_needs(data)
    models = workflows.available_models(instance)
    everything = set().union(*models.values())
    sums = {"per missing model: sorted(pool) + basename list": 0.0,
            "per missing model: difflib.get_close_matches(n=3, cutoff=0.6)": 0.0,
            "per missing model: near_paths scan of the pool": 0.0}
    labels = list(sums)
    for folder, name in sorted(needs.models):
        pool = models.get(folder, set()) if folder else everything
        normalized = name.replace("\\", "/")
        if normalized in pool:
            continue
        base = normalized.rsplit("/", 1)[-1]
        begin = time.perf_counter()
        candidates = sorted(pool if folder else everything)
        bases = [c.rsplit("/", 1)[-1] for c in candidates]
        middle = time.perf_counter()
        near = difflib.get_close_matches(base, bases, n=3, cutoff=0.6)
        after = time.perf_counter()
        [c for c in candidates if c.rsplit("/", 1)[-1] in near][:3]
        end = time.perf_counter()
        sums[labels[0]] += middle - begin
        sums[labels[1]] += after - middle
        sums[labels[2]] += end - after
    return sums


if __name__ == "__main__":
    sys.exit(run(main))
