"""Mixture-of-experts blocks: their names on disk and in the module, and their DeepSeek-V2 counterpart.

CARE converts attention only; a MoE model's sparse MLP blocks pass through every format unchanged.
Two facts of transformers ≥ 5 shape this module:

- **Names.** The modules hold each block's experts fused (``mlp.experts.gate_up_proj`` (E, 2·I, D),
  ``mlp.experts.down_proj`` (E, D, I)); checkpoints — the hub's, and what ``save_pretrained``
  writes — hold one tensor per expert (``mlp.experts.{e}.gate_proj.weight``, …; Mixtral:
  ``block_sparse_moe.experts.{e}.w1.weight``, …). A layer read from a checkpoint is turned into
  module names when a module loads it (`accept_checkpoint_names`, a load hook), and a converted
  layer is written back with per-expert names (`checkpoint_layer_state`), so every output keeps
  the upstream checkpoint names that engines and converters (vLLM, llama.cpp) read.
- **The DeepSeek export.** DeepSeek-V2's router (softmax over all experts, greedy top-k,
  ``routed_scaling_factor``) is the function Qwen3-MoE / Qwen2-MoE / Mixtral route with; DeepSeek-V3's
  (sigmoid scores, group-limited top-k) is not, for any weights. So a MoE source exports as
  ``DeepseekV2ForCausalLM`` (`deepseek_moe_fields`). transformers' DeepSeek-V2 never renormalises the
  top-k weights (its port drops ``norm_topk_prob``; vLLM's passes it to its router): a source that
  renormalises (``norm_topk_prob=True``, Mixtral) is written with ``norm_topk_prob: true`` — exact
  where the field is honoured, not in plain transformers (`RENORM_CAVEAT`).

Shapes: E experts, I ``moe_intermediate_size``, D hidden size.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import Tensor, nn

from care_mla.formats.families import FAMILIES, MoeLayout
from care_mla.method.rope_split import DeepseekExportError

#: DeepSeek-V2's sparse block on disk: Qwen's per-expert names, plus ``mlp.shared_experts.*``.
DEEPSEEK_V2_MOE = MoeLayout(num_experts_field="n_routed_experts")

#: Why a renormalising source's export is not reproduced by plain transformers.
RENORM_CAVEAT = ("transformers' DeepseekV2ForCausalLM ignores norm_topk_prob (it never renormalises the top-k "
                 "weights); vLLM's DeepSeek model passes it to its router (read in vLLM's source, not run here)")

FUSED = ("experts.gate_up_proj", "experts.down_proj")


def checkpoint_layout(config) -> MoeLayout | None:
    """The MoE block layout of a model with `config` (a source family, the latent-cache model of one, or a
    DeepSeek-V2 export), or None for a dense model."""
    model_type = getattr(config, "model_type", None)
    if model_type == "care_mla":
        model_type = config.base_model_type
    if model_type == "deepseek_v2":
        return DEEPSEEK_V2_MOE
    family = FAMILIES.get(model_type)
    return family.moe if family is not None else None


# ------------------------------------------------------------------------ names: disk ↔ module


def _expert_key(layout: MoeLayout) -> re.Pattern:
    g, u, d = (re.escape(n) for n in layout.expert_names)
    return re.compile(rf"^{re.escape(layout.disk_block)}\.experts\.(\d+)\.({g}|{u}|{d})\.weight$")


def module_layer_state(layout: MoeLayout | None, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """One decoder layer's tensors (names relative to the layer) with its experts fused as the module holds
    them; a layer already in module names, or a dense one, is returned as it is."""
    if layout is None:
        return state
    pattern = _expert_key(layout)
    gate_name, up_name, down_name = layout.expert_names
    experts: dict[int, dict[str, Tensor]] = {}
    out = {}
    for name, tensor in state.items():
        match = pattern.match(name)
        if match:
            experts.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
        elif name == f"{layout.disk_block}.gate.weight":
            out["mlp.gate.weight"] = tensor
        else:
            out[name] = tensor
    if not experts:
        return out
    if sorted(experts) != list(range(len(experts))) or any(len(e) != 3 for e in experts.values()):
        raise ValueError(f"the checkpoint's experts are incomplete: indices {sorted(experts)}, each needs "
                         f"{', '.join(layout.expert_names)}")
    ordered = [experts[e] for e in range(len(experts))]
    out["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e[gate_name], e[up_name]]) for e in ordered])
    out["mlp.experts.down_proj"] = torch.stack([e[down_name] for e in ordered])
    return out


def checkpoint_layer_state(layout: MoeLayout | None, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `module_layer_state`: one layer's tensors with per-expert names, as ``save_pretrained``
    writes them (works on the meta device too, for the names and shapes of a write plan)."""
    if layout is None or "mlp.experts.gate_up_proj" not in state:
        return state
    gate_name, up_name, down_name = layout.expert_names
    out = {}
    for name, tensor in state.items():
        if name == "mlp.experts.gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                prefix = f"{layout.disk_block}.experts.{e}."
                out[prefix + f"{gate_name}.weight"] = gate[e]
                out[prefix + f"{up_name}.weight"] = up[e]
                out[prefix + f"{down_name}.weight"] = state["mlp.experts.down_proj"][e]
        elif name == "mlp.experts.down_proj":
            continue
        elif name == "mlp.gate.weight":
            out[f"{layout.disk_block}.gate.weight"] = tensor
        else:
            out[name] = tensor
    return out


def checkpoint_entries(config, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A whole model's state dict (full names, e.g. of a meta-device model) with per-expert names, layer by layer
    in the order of `state`."""
    layout = checkpoint_layout(config)
    if layout is None:
        return state
    out, layer, current = {}, {}, None

    def flush():
        out.update({current + k: v for k, v in checkpoint_layer_state(layout, layer).items()})

    for name, tensor in state.items():
        parts = name.split(".")
        prefix = ".".join(parts[:3]) + "." if name.startswith("model.layers.") else None
        if prefix != current and layer:
            flush()
            layer = {}
        current = prefix
        if prefix is None:
            out[name] = tensor
        else:
            layer[name[len(prefix):]] = tensor
    if layer:
        flush()
    return out


def accept_checkpoint_names(model: nn.Module) -> nn.Module:
    """Let each decoder layer of `model` load a state dict in the checkpoint's per-expert names too (a load hook
    fuses them); what every stage that loads a layer read from a checkpoint into a module relies on. Idempotent."""
    layout = checkpoint_layout(model.config)
    if layout is None:
        return model
    for layer in model.model.layers:
        if getattr(layer, "_care_accepts_checkpoint_names", False):
            continue

        def fuse(module, state_dict, prefix, *args):
            mine = {k[len(prefix):]: k for k in state_dict if k.startswith(prefix)}
            fused = module_layer_state(layout, {rel: state_dict[full] for rel, full in mine.items()})
            if fused.keys() == mine.keys():
                return
            for full in mine.values():
                del state_dict[full]
            state_dict.update({prefix + k: v for k, v in fused.items()})

        layer.register_load_state_dict_pre_hook(fuse)
        layer._care_accepts_checkpoint_names = True
    return model


# ------------------------------------------------------------------------ the DeepSeek-V2 export


def deepseek_moe_fields(config) -> dict | None:
    """The DeepSeek-V2 config fields of `config`'s MLP blocks (None for a dense family), or an error naming what
    DeepSeek's MoE cannot hold and the fix.

    Dense layers become DeepSeek's dense prefix (``first_k_dense_replace``); no shared experts
    (``n_shared_experts = 0``); greedy top-k in one group; ``routed_scaling_factor = 1``.
    """
    layout = checkpoint_layout(config)
    if layout is None:
        return None
    fix = "convert it to the latent-cache format (--format care_mla), which keeps the MoE blocks as they are"
    if layout.shared_expert and int(getattr(config, "shared_expert_intermediate_size", 0) or 0) > 0:
        raise DeepseekExportError(
            f"{config.model_type}'s shared expert is scaled by a sigmoid gate of its input, which DeepSeek's shared "
            f"experts do not have: the DeepSeek export cannot reproduce it; {fix}")
    sparse = layout.sparse_layers(config)
    k = sparse.index(True) if any(sparse) else len(sparse)
    if sparse != [False] * k + [True] * (len(sparse) - k):
        dense = [i for i, s in enumerate(sparse) if not s]
        raise DeepseekExportError(
            f"dense MLP layers {dense} (mlp_only_layers / decoder_sparse_step) are not a prefix of the stack: "
            f"DeepSeek-V2 runs dense MLPs only in its first first_k_dense_replace layers; {fix}")
    return {
        "n_routed_experts": layout.num_experts(config),
        "num_experts_per_tok": int(config.num_experts_per_tok),
        "moe_intermediate_size": int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size),
        "n_shared_experts": 0,
        "first_k_dense_replace": k,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": layout.norm_topk_prob(config),
        "routed_scaling_factor": 1.0,
    }


def deepseek_mlp_state(source: dict[str, Tensor], source_config,
                       scale: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
    """The export's MLP tensors of one layer (module names relative to the layer) from the source layer's
    (either naming); `scale` multiplies what writes to the residual stream (the export's residual scale)."""
    source = module_layer_state(checkpoint_layout(source_config), source)
    if "mlp.experts.gate_up_proj" not in source:  # dense: Llama-style gate/up/down
        return {"mlp.gate_proj.weight": source["mlp.gate_proj.weight"],
                "mlp.up_proj.weight": source["mlp.up_proj.weight"],
                "mlp.down_proj.weight": scale(source["mlp.down_proj.weight"])}
    gate_up, down = source["mlp.experts.gate_up_proj"], source["mlp.experts.down_proj"]
    D = down.shape[1]
    empty = gate_up.new_zeros((0, D))
    return {
        "mlp.gate.weight": source["mlp.gate.weight"],
        "mlp.experts.gate_up_proj": gate_up,
        "mlp.experts.down_proj": torch.stack([scale(d) for d in down]),
        # n_shared_experts = 0: transformers still builds the shared MLP, of width 0
        "mlp.shared_experts.gate_proj.weight": empty,
        "mlp.shared_experts.up_proj.weight": empty,
        "mlp.shared_experts.down_proj.weight": empty.T,
    }
