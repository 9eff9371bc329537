"""What one candidate of a choice costs to factorize, per layer: the whitened SVD against the stack's Gram.

The objective choice (`care_mla.pipeline.selection`) factorizes every layer once per candidate (seven objectives
and key emphases, then the finalists again). Per candidate `factorization.joint_factorize` whitens C (Cholesky,
D³/3), forms S·A (D²·m) and takes the SVD of that D × m matrix; `factorization.joint_factorize_gram` reads the
layer's `StackGram` (WᵀCW, made once per layer: D²·m) and takes the eigendecomposition of an m × m matrix. This
script times both, side by side in one run, on random anisotropic statistics of a given attention geometry, for
the candidates of an "auto" choice (activation; attention and value objectives at K×1/2/4), and checks that they
give the same latent.

    python benchmarks/choice_factorize.py                       # Llama-3-8B's attention: D 4096, 8 KV heads of 128
    python benchmarks/choice_factorize.py --hidden 576 --heads 9 --kv-heads 3 --head-dim 64   # SmolLM2-135M
"""

from __future__ import annotations

import argparse
import time

import torch

from care_mla.method.factorization import joint_factorize, joint_factorize_gram, stack_gram
from care_mla.method.objectives import attention_weightings

CANDIDATES = [("activation", 1.0)] + [(o, e) for o in ("attention", "value") for e in (1.0, 2.0, 4.0)]


def statistics(hidden: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0):
    """C with a few loud channels over a decaying spectrum, and random projections of the geometry."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(0, -3, hidden, dtype=torch.float64)
    spectrum[:4] = 100.0
    C = (basis * spectrum) @ basis.T
    std = hidden ** -0.5
    W_k, W_v = (std * torch.randn(hidden, kv_heads * head_dim, generator=g) for _ in range(2))
    W_q = std * torch.randn(hidden, heads * head_dim, generator=g)
    W_o = std * torch.randn(heads * head_dim, hidden, generator=g)
    return C.float(), W_k, W_v, W_q, W_o


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-fraction", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    C, W_k, W_v, W_q, W_o = statistics(a.hidden, a.heads, a.kv_heads, a.head_dim)
    rank = round(a.kv_fraction * 2 * a.kv_heads * a.head_dim)
    t = time.perf_counter()
    key_weight, value_weight = attention_weightings(W_q, W_o, C, num_heads=a.heads, num_kv_heads=a.kv_heads,
                                                    head_dim=a.head_dim)
    shared_weightings = time.perf_counter() - t
    t = time.perf_counter()
    gram = stack_gram(W_k, W_v, C)
    shared_gram = time.perf_counter() - t
    print(f"D {a.hidden}, K/V stack {W_k.shape[1]} + {W_v.shape[1]}, rank {rank}, {torch.get_num_threads()} threads; "
          f"per layer, once: attention weightings {shared_weightings:.2f} s, stack Gram {shared_gram:.2f} s")
    print("| candidate | whitened SVD s | Gram s | ratio | relative difference of down·up |")
    print("|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for objective, emphasis in CANDIDATES:
        weights = {}
        if objective != "activation":
            weights = {"value_weight": value_weight}
            if objective == "attention":
                weights["key_weight"] = key_weight
        t = time.perf_counter()
        svd, _ = joint_factorize(W_k, W_v, C, rank, key_emphasis=emphasis, **weights)
        t_svd = time.perf_counter() - t
        t = time.perf_counter()
        eig, _ = joint_factorize_gram(W_k, W_v, gram, rank, key_emphasis=emphasis, **weights)
        t_gram = time.perf_counter() - t
        w_svd, w_gram = svd.weight().double(), eig.weight().double()
        diff = float((w_svd - w_gram).norm() / w_svd.norm())
        totals[0] += t_svd
        totals[1] += t_gram
        print(f"| {objective}, K×{emphasis:g} | {t_svd:.2f} | {t_gram:.2f} | {t_svd / t_gram:.1f} | {diff:.1e} |")
    n = len(CANDIDATES)
    print(f"| all {n} candidates of one layer | {totals[0]:.1f} | {totals[1] + shared_gram:.1f} (Gram included) | "
          f"{totals[0] / (totals[1] + shared_gram):.1f} | |")


if __name__ == "__main__":
    main()
