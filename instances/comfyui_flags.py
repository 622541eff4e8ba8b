"""The option strings of ComfyUI's command line (comfy/cli_args.py), as data: ComfyHub judges an instance's extra
arguments against them the way ComfyUI's argparse parser reads them (runtime.resolved_options).

Taken from Comfy-Org/ComfyUI (formerly comfyanonymous/ComfyUI) 0.3.64 at commit a125cd84b054.
To regenerate from a newer checkout, list every string that starts with '-' among the positional arguments of the
parser's add_argument calls (the module itself cannot be imported without ComfyUI), then replace the tuple below:

    python - <<'PY'
    import ast
    tree = ast.parse(open("ComfyUI/comfy/cli_args.py").read())
    print([arg.value for node in ast.walk(tree)
           if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument"
           for arg in node.args if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")])
    PY

argparse adds -h/--help itself; they are listed too because abbreviations are judged against every option string.
"""

COMFYUI_VERSION = "0.3.64"
COMFYUI_COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"

# argparse.ArgumentParser() defaults: prefix_chars "-", allow_abbrev True.
PREFIX_CHARS = "-"
ALLOW_ABBREV = True

OPTION_STRINGS: tuple[str, ...] = (
    "-h", "--help",
    "--listen", "--port", "--tls-keyfile", "--tls-certfile", "--enable-cors-header", "--max-upload-size",
    "--base-directory", "--extra-model-paths-config", "--output-directory", "--temp-directory", "--input-directory",
    "--auto-launch", "--disable-auto-launch", "--cuda-device", "--default-device", "--cuda-malloc",
    "--disable-cuda-malloc", "--force-fp32", "--force-fp16", "--fp32-unet", "--fp64-unet", "--bf16-unet",
    "--fp16-unet", "--fp8_e4m3fn-unet", "--fp8_e5m2-unet", "--fp8_e8m0fnu-unet", "--fp16-vae", "--fp32-vae",
    "--bf16-vae", "--cpu-vae", "--fp8_e4m3fn-text-enc", "--fp8_e5m2-text-enc", "--fp16-text-enc", "--fp32-text-enc",
    "--bf16-text-enc", "--force-channels-last", "--directml", "--oneapi-device-selector", "--disable-ipex-optimize",
    "--supports-fp8-compute", "--preview-method", "--preview-size", "--cache-classic", "--cache-lru", "--cache-none",
    "--use-split-cross-attention", "--use-quad-cross-attention", "--use-pytorch-cross-attention",
    "--use-sage-attention", "--use-flash-attention", "--disable-xformers", "--force-upcast-attention",
    "--dont-upcast-attention", "--gpu-only", "--highvram", "--normalvram", "--lowvram", "--novram", "--cpu",
    "--reserve-vram", "--async-offload", "--force-non-blocking", "--default-hashing-function",
    "--disable-smart-memory", "--deterministic", "--fast", "--mmap-torch-files", "--disable-mmap",
    "--dont-print-server", "--quick-test-for-ci", "--windows-standalone-build", "--disable-metadata",
    "--disable-all-custom-nodes", "--whitelist-custom-nodes", "--disable-api-nodes", "--multi-user", "--verbose",
    "--log-stdout", "--front-end-version", "--front-end-root", "--user-directory", "--enable-compress-response-body",
    "--comfy-api-base", "--database-url",
    # Added after 0.3.64 (comfyanonymous/ComfyUI at 005d79c828d8): listed so that a newer image is judged too.
    "--models-directory",
)
