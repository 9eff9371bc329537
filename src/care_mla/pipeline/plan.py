"""Stage 4, plan and factorize: per-layer ranks at the asked KV budget and each layer's factors (joint or separate
latents, or a decoupled-RoPE layout), with the per-layer table of ranks and relative activation errors. Calls the
maths of `care_mla.method`; holds none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from care_mla.formats import deepseek, engines
from care_mla.formats.families import head_dim
from care_mla.formats.mapping import LayerLatent, decoupled_config
from care_mla.io.outputs import OutputExistsError, OutputFolder, write_text_atomic  # noqa: F401  (OutputExistsError: API)
from care_mla.method import allocation, baselines, decoupled, factorization
from care_mla.method.statistics import CalibrationStats
from care_mla.pipeline.load import resolve_device
from care_mla.settings import ConvertSettings, SettingsError


def _factorize(method: str, W, C, abs_mean, rank: int, s: ConvertSettings,
               weighting: factorization.Weighting | None = None, cross: torch.Tensor | None = None) -> factorization.Factors:
    if method == "care":
        return factorization.care_factorize(W, C, rank, method=s.whitening, damping=s.damping, weighting=weighting,
                                            cross=cross)
    if method == "svd":
        return baselines.svd_factorize(W, rank)
    if method == "asvd":
        return baselines.asvd_factorize(W, abs_mean, rank)
    if method == "svd-llm":
        return baselines.svd_llm_factorize(W, C, rank)
    if method == "transmla":
        return baselines.transmla_factorize(W, C, rank)
    raise SettingsError(f"--method {method} builds no separate K and V latents")


def _joint_factorize(W_k, W_v, C, rank: int, s: ConvertSettings, weights: dict | None = None,
                     gram: factorization.StackGram | None = None) -> factorization.Factors:
    """One K/V latent of rank `rank` (K columns of `up` first) by the joint-capable `s.method`; `weights`: the
    attention-aware weightings of care (`attention_weights`); `gram`: the layer's stack moments, for care
    (`factorization.joint_factorize_gram`, the same latent at m³ cost)."""
    if s.method == "care":
        if gram is not None:
            return factorization.joint_factorize_gram(W_k, W_v, gram, rank, balance=s.balance_kv,
                                                      key_emphasis=s.key_emphasis, **(weights or {}))[0]
        return factorization.joint_factorize(
            W_k, W_v, C, rank, balance=s.balance_kv, method=s.whitening, damping=s.damping,
            key_emphasis=s.key_emphasis, **(weights or {}),
        )[0]
    if s.method == "mha2mla":
        return baselines.mha2mla_factorize(W_k, W_v, rank)[0]
    if s.method == "transmla":
        return baselines.transmla_joint_factorize(W_k, W_v, C, rank, balance=s.balance_kv)[0]
    raise SettingsError(f"--method {s.method} builds no joint latent")


def layer_kv_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    attn = layer.self_attn
    return attn.k_proj.weight.detach().T.float().cpu(), attn.v_proj.weight.detach().T.float().cpu()


def layer_qo_weights(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_q (D, n·d), W_o (n·d, D)) of a decoder layer, float32 on the CPU: what the attention objective reads."""
    attn = layer.self_attn
    return attn.q_proj.weight.detach().T.float().cpu(), attn.o_proj.weight.detach().T.float().cpu()


class SharedWeightings:
    """What the candidates of a choice share for the layer asked for last, on the calibration statistics: they
    build layer i one after the other, and every objective but "activation", whatever its key emphasis, weighs by
    the same two matrices (`objectives.attention_weightings`), and every care joint latent is made from the same
    `factorization.StackGram` — each computed once per layer, not once per candidate. Holds one layer's."""

    def __init__(self) -> None:
        self._layer: int | None = None
        self._values: dict[str, object] = {}

    def layer(self, i: int) -> dict[str, object]:
        """Layer i's shared values by name (empty when layer i is new: the previous layer's are dropped)."""
        if self._layer != i:
            self._layer, self._values = i, {}
        return self._values

    def get(self, i: int, make: Callable[[], tuple], what: str = "weightings"):
        values = self.layer(i)
        if what not in values:
            values[what] = make()
        return values[what]


def attention_weights(config, qo_weights: QoWeights | None, i: int, C: torch.Tensor,
                      settings: ConvertSettings, shared: SharedWeightings | None = None) -> dict:
    """The weightings of `settings.objective` for one layer (`objectives`): ``{"key_weight", "value_weight"}``
    for "attention", ``{"value_weight"}`` for "value", {} for "activation". `shared`: reuse what another
    candidate computed for layer i (only for the calibration's C, never a compensated one)."""
    if settings.objective == "activation":
        return {}
    if settings.objective == "auto" or settings.key_emphasis == "auto":
        raise ValueError("resolve the 'auto' objective first (choose_settings)")
    if qo_weights is None:
        raise ValueError("the attention objective needs the layer's q_proj and o_proj weights")
    from care_mla.method.objectives import attention_weightings

    def make() -> tuple:
        W_q, W_o = (w.to(C.device) for w in qo_weights(i))
        return attention_weightings(W_q, W_o, C, num_heads=config.num_attention_heads,
                                    num_kv_heads=config.num_key_value_heads, head_dim=head_dim(config))

    k, v = make() if shared is None else shared.get(i, make)
    return {"key_weight": k, "value_weight": v} if settings.objective == "attention" else {"value_weight": v}


def rank_budget(config, settings: ConvertSettings) -> dict:
    """Per-branch mean rank, total, bounds, for the asked KV fraction."""
    kv_width = config.num_key_value_heads * head_dim(config)
    branch_width = 2 * kv_width if settings.latent == "joint" else kv_width
    cap = min(branch_width, config.hidden_size)
    layers = config.num_hidden_layers
    mean = settings.kv_fraction * branch_width
    total = round(mean * layers)
    if total < layers:
        raise SettingsError(
            f"kv_fraction {settings.kv_fraction} leaves less than one latent dim per layer; the smallest that works is "
            f"{1 / branch_width:.6g}"
        )
    if total > cap * layers:
        raise SettingsError(
            f"kv_fraction {settings.kv_fraction} needs rank {mean:g} per layer but the attention input has only "
            f"{config.hidden_size} dims; the largest kv_fraction that works is {cap / branch_width:.6g}"
        )
    r_min = max(1, math.floor(settings.rank_min_ratio * mean))
    r_max = min(cap, math.ceil(settings.rank_max_ratio * mean))
    return {"mean": mean, "total": total, "r_min": r_min, "r_max": r_max, "cap": cap, "layers": layers}


def choose_ranks(spectra: list[torch.Tensor], budget: dict, settings: ConvertSettings) -> list[int]:
    if settings.allocation == "uniform":
        return allocation.uniform_ranks(budget["layers"], budget["total"], r_max=budget["cap"])
    return allocation.adjusted_ranks(
        spectra, budget["total"], r_min=budget["r_min"], r_max=budget["r_max"], score=settings.allocation_score
    )


def relative_error(W, W_hat, C) -> float:
    energy = factorization.activation_error(W, torch.zeros_like(W), C)
    return factorization.activation_error(W, W_hat, C) / max(energy, 1e-30)


KvWeights = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer index → (W_k, W_v), (D, m) float32


QoWeights = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer index → (W_q (D, n·d), W_o (n·d, D))


def plan_ranks(config, kv_weights: KvWeights, stats: CalibrationStats, settings: ConvertSettings,
               qo_weights: QoWeights | None = None) -> list[list[int]]:
    """Per-layer latent ranks at the asked budget: ``[k, v]`` per layer for separate latents, ``[kv]`` for joint.

    Uniform needs no weights; adjusted reads each layer's K/V weights once for its spectrum.
    """
    layers = config.num_hidden_layers
    budget = rank_budget(config, settings)
    if settings.allocation == "uniform":
        ranks = choose_ranks([], budget, settings)
        return [[r] if settings.latent == "joint" else [r, r] for r in ranks]
    bar = tqdm(range(layers), desc="spectra for the rank plan", unit="layer", disable=not settings.progress)
    if settings.latent == "joint":
        spectra = []
        for i in bar:
            W_k, W_v, C, _ = _layer_inputs(i, kv_weights, stats, settings)
            weights = attention_weights(config, qo_weights, i, C, settings)
            spectra.append(_joint_factorize(W_k, W_v, C, 0, settings, weights).spectrum.cpu())
        return [[r] for r in choose_ranks(spectra, budget, settings)]
    spectra: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    for i in bar:
        W_k, W_v, C, abs_mean = _layer_inputs(i, kv_weights, stats, settings)
        weights = attention_weights(config, qo_weights, i, C, settings)
        for name, W in zip(("k", "v"), (W_k, W_v)):
            f = _factorize(settings.method, W, C, abs_mean, 0, settings, weights.get(f"{_BRANCH[name]}_weight"))
            spectra[name].append(f.spectrum.cpu())
    k, v = (choose_ranks(spectra[name], budget, settings) for name in ("k", "v"))
    return [list(pair) for pair in zip(k, v)]


_BRANCH = {"k": "key", "v": "value"}


def layer_latent(i: int, ranks: list[int], kv_weights: KvWeights, stats: CalibrationStats,
                 settings: ConvertSettings, qo_weights: QoWeights | None = None,
                 config=None, moments: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                 shared: SharedWeightings | None = None, errors: bool = True) -> tuple[LayerLatent, dict]:
    """Layer i's factors at `ranks` (from `plan_ranks`) and its row of the per-layer table (ranks, and relative
    errors unless not `errors`: a candidate of a choice needs no table).

    The factorization runs on the conversion's device (`_layer_inputs`); the factors are returned on the CPU.
    The attention objective needs `qo_weights` and the model's `config` (`shared`: weightings other candidates
    computed). `moments` = (C̃, X̃ᵀX/N) of error compensation (`compensation`) replace the layer's calibration
    statistics (errors are then relative to C̃).
    """
    W_k, W_v, C, abs_mean = _layer_inputs(i, kv_weights, stats, settings)
    cross = None
    if moments is not None:
        C, cross = (m.to(C.device) for m in moments)
    weights = attention_weights(config, qo_weights, i, C, settings, shared if moments is None else None)
    if cross is not None:
        weights = {**weights, "cross": cross}
    if settings.latent == "joint":
        (r,) = ranks
        gram = None
        if shared is not None and moments is None and settings.method == "care":
            gram = shared.get(i, lambda: factorization.stack_gram(W_k, W_v, C, damping=settings.damping), "stack_gram")
        f = _joint_factorize(W_k, W_v, C, r, settings, weights, gram)
        row = {"layer": i, "kv_rank": r}
        if errors:
            W_hat, m_k = f.weight(), W_k.shape[1]
            row.update(k_rel_error=relative_error(W_k, W_hat[:, :m_k], C),
                       v_rel_error=relative_error(W_v, W_hat[:, m_k:], C))
        return LayerLatent((_to_cpu(f),)), row
    fk, fv = (_factorize(settings.method, W, C, abs_mean, r, settings, weights.get(f"{_BRANCH[b]}_weight"), cross)
              for b, W, r in zip("kv", (W_k, W_v), ranks))
    row = {"layer": i, "k_rank": fk.rank, "v_rank": fv.rank}
    if errors:
        row.update(k_rel_error=relative_error(W_k, fk.weight(), C), v_rel_error=relative_error(W_v, fv.weight(), C))
    return LayerLatent((_to_cpu(fk), _to_cpu(fv))), row


def _layer_inputs(i: int, kv_weights: KvWeights, stats: CalibrationStats, settings: ConvertSettings):
    """(W_k, W_v, C, mean |x|) of layer i on the conversion's device, so a GPU run factorizes there too instead
    of waiting on CPU SVDs (not timed: no GPU was available); on the CPU nothing moves."""
    device = resolve_device(settings.device)
    W_k, W_v = kv_weights(i)
    return (W_k.to(device), W_v.to(device), stats.second_moments[i].to(device), stats.abs_means[i].to(device))


def _to_cpu(f: factorization.Factors) -> factorization.Factors:
    return dataclasses.replace(f, down=f.down.cpu(), up=f.up.cpu(), spectrum=f.spectrum.cpu())


def plan_decoupled(model, stats: CalibrationStats, settings: ConvertSettings, *,
                   layer_state: "decoupled.LayerState | None" = None, dtype: torch.dtype | None = None,
                   split: decoupled.RopeSplit | None = None) -> tuple[decoupled.RopeSplit, list[int]]:
    """(RopeSplit, per-layer latent ranks) of the decoupled-RoPE layout at the asked budget.

    The cache per token and layer is ``round(kv_fraction·2·g·d)``: ``qk_rope_head_dim`` RoPE
    numbers (``--rope-dim``, else `rope_split.default_rope_dim`) shared by all layers, the rest
    the latent, whose width is uniform or spread by the adjusted rule over the whitened spectra
    of each layer's [un-rotated K, V]. The parity budget with every key pair in RoPE is the
    exact layout (latent = V, no allocation to make). `model` may be a meta-device skeleton
    whose layers `layer_state` reads (in `dtype`) from the checkpoint.
    """
    config = model.config
    kv_lora_rank, rope, exact = deepseek.export_budget(config, qk_rope_head_dim=settings.rope_dim,
                                                       kv_fraction=settings.kv_fraction, portable=settings.portable)
    if settings.portable:
        decoupled.check_portable(config)
    if split is None:  # given: the candidates of an objective choice share one (it does not depend on the objective)
        split = decoupled.plan_rope_split(
            model, stats, qk_rope_head_dim=rope, exact=exact, rope_strategy=settings.rope_strategy,
            rope_context=settings.rope_context, portable=settings.portable, layer_state=layer_state, dtype=dtype,
        )
    layers = config.num_hidden_layers
    if exact or settings.allocation == "uniform":
        return split, [kv_lora_rank] * layers
    g, d = config.num_key_value_heads, head_dim(config)
    cap = min(2 * g * d, config.hidden_size)
    r_min = max(1, math.floor(settings.rank_min_ratio * kv_lora_rank))
    r_max = min(cap, math.ceil(settings.rank_max_ratio * kv_lora_rank))
    spectra = decoupled.latent_spectra(split, **decoupled_kwargs(settings), progress=settings.progress)
    ranks = allocation.adjusted_ranks(spectra, kv_lora_rank * layers, r_min=r_min, r_max=r_max,
                                      score=settings.allocation_score)
    return split, ranks


def decoupled_kwargs(settings: ConvertSettings) -> dict:
    return {"whitening": settings.whitening, "damping": settings.damping, "balance_kv": settings.balance_kv,
            "objective": settings.objective, "key_emphasis": settings.key_emphasis}


def decoupled_layer(split: decoupled.RopeSplit, i: int, rank: int, stats: CalibrationStats | None,
                    settings: ConvertSettings, moments: tuple[torch.Tensor, torch.Tensor] | None = None, *,
                    shared: SharedWeightings | None = None, errors: bool = True,
                    ) -> tuple[decoupled.LayerLayout, dict]:
    """Layer i's decoupled-RoPE tensors at `rank` and its row of the per-layer table (rank, kept RoPE energy, errors
    unless not `errors`); `moments` = (C̃, X̃ᵀX/N) of error compensation (errors are then relative to C̃).
    `shared`: what the candidates of a choice on this `split` reuse (`decoupled.layer_layout`)."""
    w = split.weights(i)
    e = decoupled.layer_layout(split, i, rank, weights=w, moments=moments, **decoupled_kwargs(settings),
                               shared=None if shared is None else shared.layer(i))
    row = {"layer": i, "kv_rank": e.rank, "rope_kept_energy": split.kept_rope_energy(i)}
    if stats is not None and errors:
        C = stats.second_moments[i] if moments is None else moments[0]
        k_nope = e.kv_latent @ e.up_k.reshape(e.rank, -1)
        row["k_nope_rel_error"] = relative_error(split.rest_key(i, w), k_nope, C) if split.nope else 0.0
        row["v_rel_error"] = relative_error(w[4], e.kv_latent @ e.up_v.reshape(e.rank, -1), C)
    return e, row


def decoupled_target(config, split: decoupled.RopeSplit, ranks: list[int], settings: ConvertSettings):
    """(config of the converted model, report fields that describe its layout) for the decoupled latent."""
    fields = {"ranks": [[r] for r in ranks], "mla": split.summary()}
    if settings.format != "deepseek":
        return decoupled_config(config, split, ranks), fields
    target = deepseek.deepseek_config(config, split, deepseek.check_one_rank(ranks), portable=settings.portable)
    fields["runtime_support"] = engines.runtime_support(target).as_dict()
    fields["mla"]["residual_scale"] = deepseek.residual_scale(config)
    return target, fields


def format_layer_table(table: list[dict]) -> str:
    """Plain-text table of the per-layer rows of `plan_latents`."""
    keys = [k for k in table[0] if k != "layer"]
    lines = ["layer " + " ".join(f"{k:>12s}" for k in keys)]
    for row in table:
        cells = (f"{row[k]:12d}" if isinstance(row[k], int) else f"{row[k]:12.4g}" for k in keys)
        lines.append(f"{row['layer']:5d} " + " ".join(cells))
    return "\n".join(lines)
