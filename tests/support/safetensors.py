"""Writes real safetensors files for tests: 8-byte little-endian header length, JSON header, tensor bytes."""
import json
import struct


def write_safetensors(path, tensors: dict, metadata: dict | None = None, data_size: int | None = None):
    """`tensors`: name -> shape (F16). Writes zero bytes of the right size (or `data_size` bytes)."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + 2 * count]}
        offset += 2 * count
    if metadata is not None:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        handle.write(b"\0" * (offset if data_size is None else data_size))
    return path


SD15_KEYS = {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768)}
SDXL_KEYS = {"conditioner.embedders.1.model.ln_final.weight": (4,),
             "model.diffusion_model.label_emb.0.0.weight": (1280, 2816)}
FLUX_KEYS = {"double_blocks.0.img_attn.norm.key_norm.scale": (128,)}
