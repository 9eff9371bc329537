"""Serving engines' MLA geometries and what each runs of an exported DeepSeek-V3 (dense source) or DeepSeek-V2
(mixture-of-experts source) config, from the config alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import DeepseekV3Config

from care_mla.formats.families import head_dim
from care_mla.formats.moe import RENORM_CAVEAT
from care_mla.method.rope_split import DeepseekExportError

#: MLA cache geometries ``(kv_lora_rank, qk_rope_head_dim)`` each serving engine runs. vLLM 0.32 (installed and
#: run; mla_attention.py asserts it): every MLA backend takes ``kv_lora_rank + qk_rope_head_dim`` ∈ {320, 512,
#: 576}, its CPU decode kernel only 512 + 64. SGLang: assumed DeepSeek's kernels' 512 + 64 (not verified).
ENGINE_GEOMETRIES: dict[str, tuple[tuple[int, int], ...]] = {
    "vllm": ((512, 64), (448, 64), (256, 64)),
    "vllm-cpu": ((512, 64),),
    "sglang": ((512, 64),),
}


#: What was run for each engine (README, "Serving"); anything else about it is not verified.
ENGINE_VERIFIED = {
    "vllm": "GPU backends not verified (no GPU was lent); the 512 + 64 geometry ran on vLLM 0.32.0's CPU backend",
    "vllm-cpu": "vllm-cpu 0.32.0: greedy tokens equal to transformers on 6/6 prompts (fp32), 4,608 vs 16,384 KV "
                "bytes per token (scripts/serving_check.py)",
    "sglang": "not verified (not installable here)",
}


ENGINES = tuple(ENGINE_GEOMETRIES)


@dataclass(frozen=True)
class RuntimeSupport:
    """Which stock runtimes run an exported config (from the config alone), with the rule checked for each.

    ``engines[name]`` is ``{"ok": bool, "rule": str, "reasons": [...], "verified": str}``.
    """

    transformers: bool
    vllm_sglang: bool
    reasons: tuple[str, ...] = field(default_factory=tuple)
    engines: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"transformers": self.transformers, "vllm_sglang": self.vllm_sglang, "reasons": list(self.reasons),
                "engines": self.engines}


def _geometry_text(geometries) -> str:
    return ", ".join(f"{r} + {p} = {r + p}" for r, p in geometries)


#: What was run of the DeepSeek-V2 (MoE) exports in each engine.
MOE_VERIFIED = "the DeepSeek-V2 (MoE) export was not run in this engine"


def runtime_support(config: DeepseekV3Config) -> RuntimeSupport:
    """Per engine, whether it runs `config`: vLLM and SGLang build DeepSeek attention without biases, with
    interleaved default/yarn RoPE, an untied head, and only the MLA widths of `ENGINE_GEOMETRIES`. A DeepSeek-V2
    config (MoE source) always interleaves; transformers runs it as the source only without ``norm_topk_prob``
    (`moe.RENORM_CAVEAT`)."""
    moe = config.model_type == "deepseek_v2"
    layout = []
    if config.attention_bias:
        layout.append("attention biases (vLLM/SGLang DeepSeek layers have none)")
    if config.rope_parameters.get("rope_type") != "default":
        layout.append(f"rope_type {config.rope_parameters.get('rope_type')!r} (vLLM maps any non-default type to yarn)")
    if not getattr(config, "rope_interleave", True):
        layout.append("rope_interleave=False (vLLM always interleaves)")
    if config.qk_nope_head_dim == 0:
        layout.append("qk_nope_head_dim=0 (not exercised by vLLM/SGLang MLA kernels)")
    if config.tie_word_embeddings:
        layout.append("tied lm_head (vLLM's DeepSeek model never ties it)")
    geometry = (config.kv_lora_rank, config.qk_rope_head_dim)
    engines = {}
    for engine, allowed in ENGINE_GEOMETRIES.items():
        reasons = list(layout)
        if geometry not in allowed:
            reasons.append(f"MLA cache {geometry[0]} + {geometry[1]} = {sum(geometry)} (runs: {_geometry_text(allowed)})")
        verified = ENGINE_VERIFIED[engine] + (f"; {MOE_VERIFIED}" if moe else "")
        engines[engine] = {"ok": not reasons, "reasons": reasons, "verified": verified,
                           "rule": f"kv_lora_rank + qk_rope_head_dim in {{{_geometry_text(allowed)}}}; default "
                                   "interleaved RoPE; no attention biases; untied lm_head; qk_nope_head_dim > 0"}
    renorm = [RENORM_CAVEAT] if moe and config.norm_topk_prob else []
    engines["transformers"] = {"ok": not renorm, "reasons": renorm,
                               "verified": "transformers 5.15-5.24 (tests)" + ("; DeepSeek-V2: 5.24" if moe else ""),
                               "rule": "DeepseekV3ForCausalLM / DeepseekV2ForCausalLM: any widths, biases through the "
                                       "q-LoRA path; V2 never renormalises its top-k routing weights"}
    llama = [r for r in layout if "qk_nope" in r or "rope_type" in r or "biases" in r]
    engines["llamacpp"] = {
        "ok": not llama,
        "reasons": ["attention biases (not verified in llama.cpp)" if "biases" in r else r.replace("vLLM/SGLang", "llama.cpp")
                    .replace("vLLM maps any non-default type to yarn", "llama.cpp drops RoPE factors") for r in llama],
        "verified": "llama-cpp-python 0.3.36: greedy tokens equal to transformers (f32 GGUF) on 5/5 prompts at "
                    "F = 1.0 / 0.5 / 0.25 of portable exports (scripts/llamacpp_check.py, scripts/gguf_export.py)"
                    + (f"; {MOE_VERIFIED}" if moe else ""),
        "rule": "deepseek2: any widths; qk_nope_head_dim >= 1; plain RoPE (no longrope); biases not verified"}
    return RuntimeSupport(transformers=not renorm, vllm_sglang=engines["vllm"]["ok"] and engines["sglang"]["ok"],
                          reasons=tuple(dict.fromkeys(engines["vllm"]["reasons"] + engines["sglang"]["reasons"])),
                          engines=engines)


def engine_geometry(config, engine: str, kv_fraction: float) -> tuple[int, int]:
    """``(kv_lora_rank, qk_rope_head_dim)`` for `engine`: of the geometries it runs that cache less than the
    model's GQA cache, the one nearest to ``kv_fraction`` of it (ties: the smaller). Refuses, naming the
    geometries and their fractions, when every geometry the engine runs is as large as the GQA cache."""
    if engine not in ENGINE_GEOMETRIES:
        raise DeepseekExportError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    parity = 2 * config.num_key_value_heads * head_dim(config)
    allowed = ENGINE_GEOMETRIES[engine]
    below_parity = [(r, p) for r, p in allowed if r + p < parity]
    smaller = [(r, p) for r, p in below_parity if r <= config.hidden_size]
    if not smaller:
        options = "; ".join(f"{r} + {p} = {r + p} (F = {(r + p) / parity:.3g})" for r, p in allowed)
        if below_parity:  # the cache would be smaller, but the latent is wider than its input can fill
            raise DeepseekExportError(
                f"{engine} runs MLA caches of {options} numbers per token and layer; the ones below this model's GQA "
                f"cache ({parity}) need kv_lora_rank {', '.join(str(r) for r, _ in below_parity)}, more than the "
                f"hidden size {config.hidden_size} that the latent is projected from (its rank is at most "
                f"{config.hidden_size}). Export without --engine (transformers and llama.cpp run any width)"
            )
        raise DeepseekExportError(
            f"{engine} runs MLA caches of {options} numbers per token and layer, but this model's GQA cache is "
            f"already {parity}: an export for {engine} would cache more than the original. Export without --engine "
            "(transformers and llama.cpp run any width)"
        )
    target = kv_fraction * parity
    return min(smaller, key=lambda g: (abs(sum(g) - target), sum(g)))
