"""Layer-sequential statistics equal the ones computed from a full forward pass."""

from __future__ import annotations

import torch
from conftest import tiny_model

from care_mla.method.statistics import CalibrationStats, SecondMoment, gram, product_dtype
from care_mla.pipeline.calibration import collect_statistics


def reference_stats(model, ids):
    """Attention inputs of every layer from one full forward, kept in memory (test only)."""
    inputs = []
    hooks = [l.input_layernorm.register_forward_hook(lambda m, a, o: inputs.append(o.detach())) for l in model.model.layers]
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in hooks:
        h.remove()
    xs = [x.reshape(-1, x.shape[-1]).double() for x in inputs]
    return [x.T @ x / x.shape[0] for x in xs], [x.abs().mean(0) for x in xs]


def test_layer_sequential_statistics_match_full_forward():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    stats = collect_statistics(model, ids, batch_size=4, progress=False)  # batches of 4 and 2
    C_ref, a_ref = reference_stats(model, ids)
    assert stats.num_tokens == 6 * 24
    assert stats.num_layers == model.config.num_hidden_layers
    for C, Cr, a, ar in zip(stats.second_moments, C_ref, stats.abs_means, a_ref):
        assert C.dtype == a.dtype == torch.float32  # stored in fp32 (accumulated in fp64)
        assert torch.allclose(C.double(), Cr, rtol=1e-5, atol=1e-6)
        assert torch.allclose(a.double(), ar, rtol=1e-5, atol=1e-6)
    # the hooks were removed: no hook left on any module
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_second_moment_streams_batches():
    x = torch.randn(1000, 8, dtype=torch.float64)
    acc = SecondMoment(8)
    for chunk in x.split(128):
        acc.add_batch(chunk)
    assert acc.count == 1000
    assert torch.allclose(acc.second_moment, x.T @ x / 1000, rtol=1e-6, atol=1e-7)


def test_bfloat16_stream_products_round_each_batch_once():
    """A bfloat16 stream's second moment takes its products in bfloat16 (`product_dtype`): each batch's sum is rounded
    to 2⁻⁹ relative and the batches' roundings average out in the float64 total — well within 1e-3 of the exact
    moment (Frobenius), yet not the float32 products' 1e-6; the mean |x| is summed in float32 either way."""
    assert product_dtype(torch.bfloat16) == torch.bfloat16
    assert product_dtype(torch.float32) == product_dtype(torch.float16) == torch.float32  # float16 would overflow
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(96, generator=g) * 4  # uneven channels, as attention inputs have
    x = (torch.randn(32 * 256, 96, generator=g) * scale).to(torch.bfloat16)
    exact = x.double().T @ x.double() / x.shape[0]
    errors = {}
    for dtype in (torch.bfloat16, torch.float32):
        acc = SecondMoment(96, dtype=dtype)
        for batch in x.split(256):
            acc.add_batch(batch)
        C = acc.second_moment
        assert torch.equal(C, C.T)
        errors[dtype] = float((C - exact).norm() / exact.norm())
        assert torch.allclose(acc.abs_mean, x.double().abs().mean(0), rtol=1e-6)
    assert errors[torch.float32] < 1e-6 < errors[torch.bfloat16] < 1e-3, errors


def test_gram_is_the_symmetric_product_block_by_block():
    """`gram` computes xᵀx as its upper block triangle and mirrors it: the same numbers as one GEMM to float32
    rounding, exactly symmetric, for widths below one block, of whole blocks and of a ragged last block."""
    g = torch.Generator().manual_seed(0)
    for d in (5, 64, 96, 100, 576, 600):
        x, y = torch.randn(257, d, generator=g), torch.randn(257, 7, generator=g)
        both = gram(x, right=y)
        xtx, reference = both[:, :d], x.double().T @ x.double()
        assert both.shape == (d, d + 7) and both.dtype == torch.float32
        assert torch.equal(xtx, xtx.T), d
        assert (xtx.double() - reference).abs().max() <= 1e-5 * reference.abs().max(), d
        assert torch.allclose(both[:, d:].double(), x.double().T @ y.double(), rtol=1e-5, atol=1e-4), d
        assert torch.equal(gram(x), xtx)  # `right` only appends columns


def test_statistics_round_trip(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(3, 256, (2, 16))
    stats = collect_statistics(model, ids, progress=False, meta={"text": "x"})
    stats.save(tmp_path / "s.safetensors")
    back = CalibrationStats.load(tmp_path / "s.safetensors")
    assert back.num_tokens == 32 and back.meta == {"text": "x"}
    assert all(torch.equal(a, b) for a, b in zip(stats.second_moments, back.second_moments))
    assert not list(tmp_path.glob("*.tmp"))
