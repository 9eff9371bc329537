"""Run llama.cpp's own `convert_hf_to_gguf.py` on a `care-mla convert --format deepseek --portable`
folder, with the two adaptations our exports need. No llama.cpp code is copied here: the converter
is imported from the folder given (e.g. the llama-cpp-python sdist's vendor/llama.cpp).

    python scripts/gguf_export.py VENDOR/llama.cpp/convert_hf_to_gguf.py EXPORT --outtype f16 --outfile X.gguf

1. `q_lora_rank: null` (no query LoRA, as our Llama/Qwen/Mistral exports write it): llama.cpp's
   `deepseek2` loader requires `deepseek2.attention.q_lora_rank` except for its 26/27/48-layer
   "lite" models, and the converter writes the key only when it is not null. The converter reads a
   copy of the folder (symlinks + a config.json with `q_lora_rank: 0`; llama.cpp: 0 = plain q_proj).
   Transformers must keep null: it would build a rank-0 `q_a_proj` from 0.
2. `attn_kv_a_mqa` stays F32 in every GGUF type: the export makes `kv_a_layernorm` numerically
   linear by scaling the latent rows of `kv_a_proj_with_mqa` by a tiny s (weights ~1e-8, see
   `care_mla.formats.deepseek`), which float16 flushes to zero (the f16 GGUF then gives wrong tokens from
   the first one). The tensor is (kv_lora_rank + rope) x D, small next to the rest.
3. A MoE export without a shared expert (Qwen3-MoE's: `n_shared_experts: 0`): llama.cpp's `deepseek2` creates the
   shared-expert tensors of every MoE layer with width `moe_intermediate_size x n_shared_experts` and asserts they
   exist (a width of 0 aborts the load: `GGML_ASSERT(!ggml_is_transposed(a))`). The converter reads a copy with
   `n_shared_experts: 1` and one extra file of zero shared-expert weights (gate, up, down; they replace the export's
   zero-width ones, which transformers writes for `n_shared_experts: 0`): silu(0)·0 through a zero
   down projection adds exactly 0, so the layer computes what the export does (3 x hidden x
   moe_intermediate_size more weights per MoE layer, and their multiply-adds).
Anything else (the original Llama folder, a DeepSeek model) goes through the converter unchanged
except for (2), which only touches `attn_kv_a_mqa`.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

F32_TENSORS = ("attn_kv_a_mqa.weight",)


def conversion_source(folder: Path, scratch: Path) -> tuple[Path, list[str]]:
    """The folder the converter should read, and the config changes made for llama.cpp."""
    cfg = json.loads((folder / "config.json").read_text())
    changes = []
    deepseek = cfg.get("model_type") in ("deepseek_v3", "deepseek_v2")
    if deepseek and cfg.get("q_lora_rank") is None:
        cfg["q_lora_rank"] = 0
        changes.append("q_lora_rank: null -> 0 (llama.cpp deepseek2 requires the key; 0 = plain q_proj)")
    zeros = zero_shared_experts(folder, cfg) if deepseek and cfg.get("n_routed_experts") else {}
    if zeros:
        changes.append(f"n_shared_experts: {cfg.get('n_shared_experts')} -> 1 with zero weights in "
                       f"{len(zeros) // 3} MoE layers (llama.cpp deepseek2 requires a shared expert; zeros add 0)")
        cfg["n_shared_experts"] = 1
    if not changes:
        return folder, changes
    scratch.mkdir(parents=True, exist_ok=True)
    index = folder / "model.safetensors.index.json"
    for f in folder.iterdir():
        link = scratch / f.name
        if f.name == "config.json" or (zeros and f == index) or link.exists() or link.is_symlink():
            continue
        link.symlink_to(f.resolve())
    (scratch / "config.json").write_text(json.dumps(cfg, indent=2))
    if zeros:
        from safetensors.torch import save_file

        save_file(zeros, str(scratch / ZERO_SHARED_FILE))
        if index.is_file():  # the converter reads the files the index names
            data = json.loads(index.read_text())
            data["weight_map"].update(dict.fromkeys(zeros, ZERO_SHARED_FILE))
            (scratch / index.name).write_text(json.dumps(data, indent=2))
    return scratch, changes


#: Sorts after every shard (the converter reads them in order and a later tensor of a name replaces an earlier one:
#: the export writes zero-width shared-expert tensors, which these replace).
ZERO_SHARED_FILE = "model.zz-llamacpp-shared-experts.safetensors"


def zero_shared_experts(folder: Path, cfg: dict) -> dict:
    """Zero shared-expert tensors (checkpoint names) for every MoE layer of a DeepSeek export that has none, or {}.
    MoE layers are those whose router (``mlp.gate.weight``) is in the checkpoint; the zeros take its dtype."""
    import re

    from safetensors import safe_open

    if cfg.get("n_shared_experts"):
        return {}
    routers = {}
    for part in sorted(folder.glob("*.safetensors")):
        with safe_open(str(part), framework="pt") as f:
            for name in f.keys():
                if m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.gate\.weight", name):
                    routers[int(m.group(1))] = f.get_slice(name).get_dtype()
    if not routers:
        return {}
    import torch

    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    hidden, width = cfg["hidden_size"], cfg["moe_intermediate_size"]
    out = {}
    for i, dtype in sorted(routers.items()):
        prefix, dt = f"model.layers.{i}.mlp.shared_experts.", dtypes.get(dtype, torch.float32)
        out[prefix + "gate_proj.weight"] = torch.zeros(width, hidden, dtype=dt)
        out[prefix + "up_proj.weight"] = torch.zeros(width, hidden, dtype=dt)
        out[prefix + "down_proj.weight"] = torch.zeros(hidden, width, dtype=dt)
    return out


def run_converter(convert_script: Path, argv: list[str]) -> None:
    """`convert_hf_to_gguf.py argv...` in this process, with F32_TENSORS kept in float32."""
    root = convert_script.resolve().parent
    sys.path[:0] = [str(root), str(root / "gguf-py")]  # the vendored gguf-py, as the script itself does
    import gguf
    from conversion import base

    original = base.ModelBase.tensor_force_quant

    def tensor_force_quant(self, name, new_name, bid, n_dims):
        if new_name.endswith(F32_TENSORS):
            return gguf.GGMLQuantizationType.F32
        return original(self, name, new_name, bid, n_dims)

    base.ModelBase.tensor_force_quant = tensor_force_quant
    sys.argv = [str(convert_script), *argv]
    runpy.run_path(str(convert_script), run_name="__main__")


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    convert_script, folder, rest = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    outfile = Path(rest[rest.index("--outfile") + 1]) if "--outfile" in rest else Path(folder.name)
    src, changes = conversion_source(folder, outfile.parent / f"{outfile.stem}-convert-src")
    for c in changes:
        print(f"gguf_export: {c}", file=sys.stderr)
    run_converter(convert_script, [str(src), *rest])


if __name__ == "__main__":
    main()
