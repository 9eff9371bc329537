"""Know the machine: CPU model and flags, usable cores, and the forward-pass dtype chosen by measurement.

bf16 matrix products are fast on some CPUs (AVX512-BF16, AMX) and very slow on others: on an
AVX2-only EPYC a bf16 GEMM runs ~47x slower than fp32, because the library emulates it. So the
dtype of the forward passes is chosen by a short timed GEMM at the model's shapes, not by
assumption, and the figures go into the report.

Layout: pure functions first (parse ``/proc/cpuinfo`` text, choose a dtype from probe figures
and flags, the cache key), then thin readers and timers, then the orchestration
(`resolve_auto_dtype`) that reads the cache, probes what is missing and writes it back.

Notation: a GEMM of shape ``(m, k, n)`` multiplies an (m, k) by a (k, n) matrix, ``2·m·k·n``
floating-point operations; a probe figure is GFLOPS (1e9 operations per second, best call).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]

#: SmolLM2-135M-like projection shapes (tokens, hidden, mlp): a probe of a few milliseconds.
DEFAULT_SHAPES: tuple[Shape, ...] = ((512, 576, 1536),)

#: A reduced precision is chosen on CPU only when measured at least this much faster than fp32.
#: Below it, the gain does not pay for the rounding error it adds to every activation.
SPEEDUP_THRESHOLD = 1.3

#: A dtype whose first call is this many times slower than an fp32 call is timed once, not
#: repeated (bf16 on AVX2-only CPUs, fp16 on most CPUs: a repeat would cost a second or more).
SLOW_FACTOR = 50.0

#: After the first timed call of every dtype, further rounds stop once the probe has run this long.
PROBE_BUDGET_S = 0.5

#: CPU flags worth reporting (x86 names as in /proc/cpuinfo "flags", arm as in "Features").
RELEVANT_FLAGS = frozenset({
    "fma", "f16c", "avx", "avx2", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "amx_fp16",
    "asimd", "asimdhp", "fphp", "sve", "sve2", "bf16", "svebf16", "i8mm",
})
#: Native bf16 arithmetic on x86: with one of these, bf16 GEMMs are not emulated.
X86_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

DTYPE_NAMES = ("float32", "bfloat16", "float16")

#: Steps that ask for a forward-pass dtype. fp16 tolerance: fp16 overflows above 65504, and the
#: residual stream of many LLMs holds "massive activations" of thousands that grow with depth;
#: for a model we have not seen, an overflow turns calibration statistics into inf/NaN (a
#: broken conversion, silently), evaluation logits into NaN, and healing needs loss scaling.
#: bf16 has fp32's range, so it is safe for all of them. Only generation (a demo whose output a
#: person reads) may use fp16.
STEPS = ("calibration", "evaluation", "healing", "generation")
FP16_TOLERANT_STEPS = frozenset({"generation"})

CACHE_VERSION = 1


# ---------------------------------------------------------------- /proc/cpuinfo parsing (pure)

def _blocks(cpuinfo: str) -> list[dict[str, str]]:
    """Split /proc/cpuinfo text into one ``{key: value}`` per logical processor."""
    blocks, current = [], {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        blocks.append(current)
    return [b for b in blocks if "processor" in b] or blocks


def parse_cpu_model(cpuinfo: str) -> str:
    """The CPU's name: x86 "model name", else arm's implementer/part ids, else "unknown"."""
    blocks = _blocks(cpuinfo)
    first = blocks[0] if blocks else {}
    for key in ("model name", "cpu model", "Hardware", "cpu"):
        if first.get(key):
            return first[key]
    if "CPU implementer" in first:
        return f"arm implementer {first['CPU implementer']} part {first.get('CPU part', '?')}"
    return "unknown"


def parse_cpu_flags(cpuinfo: str, relevant: Iterable[str] = RELEVANT_FLAGS) -> set[str]:
    """The `relevant` flags of the first processor ("flags" on x86, "Features" on arm)."""
    blocks = _blocks(cpuinfo)
    first = blocks[0] if blocks else {}
    flags = set((first.get("flags") or first.get("Features") or "").split())
    return flags & set(relevant)


def count_logical_cpus(cpuinfo: str, allowed: set[int] | None = None) -> int:
    """Logical processors listed, restricted to the ids in `allowed` (the affinity) if given."""
    ids = [int(b["processor"]) for b in _blocks(cpuinfo) if b.get("processor", "").isdigit()]
    if allowed is not None:
        ids = [i for i in ids if i in allowed]
    return len(ids)


def count_physical_cores(cpuinfo: str, allowed: set[int] | None = None) -> int:
    """Distinct ("physical id", "core id") pairs among the processors in `allowed`.

    Two SMT siblings share a core, so a 2-vCPU cloud VM with SMT has one physical core. Where the
    text names no cores (arm, some VMs) every processor counts as one. Returns 0 when the text
    lists no usable processor; the caller falls back to the affinity or ``os.cpu_count()``.
    """
    blocks = [b for b in _blocks(cpuinfo) if b.get("processor", "").isdigit()]
    if allowed is not None:
        blocks = [b for b in blocks if int(b["processor"]) in allowed]
    if blocks and all("core id" in b for b in blocks):
        return len({(b.get("physical id", "0"), b["core id"]) for b in blocks})
    return len(blocks)


def parse_cgroup_cpu_max(text: str) -> float | None:
    """CPUs granted by a cgroup v2 ``cpu.max`` ("quota period", e.g. "200000 100000" → 2.0); None if unlimited."""
    parts = text.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


# ---------------------------------------------------------------- readers (thin)

def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _allowed_cpus() -> set[int] | None:
    getaffinity = getattr(os, "sched_getaffinity", None)
    return set(getaffinity(0)) if getaffinity else None


def cpu_info() -> dict:
    """This machine's CPU: model, relevant flags, physical and logical cores this process may use.

    Counts never exceed the CPUs in the process's affinity mask, nor a cgroup ``cpu.max`` quota
    (a container started with ``--cpus 2`` on a 64-core host gets 2).
    """
    text = _read("/proc/cpuinfo")
    allowed = _allowed_cpus()
    logical = (len(allowed) if allowed else None) or count_logical_cpus(text) or os.cpu_count() or 1
    physical = count_physical_cores(text, allowed) or logical
    quota = parse_cgroup_cpu_max(_read("/sys/fs/cgroup/cpu.max"))
    if quota is not None:
        logical = min(logical, max(1, math.ceil(quota)))
        physical = min(physical, logical)
    model = parse_cpu_model(text)
    if model == "unknown":
        model = platform.processor() or platform.machine() or "unknown"
    return {
        "model": model,
        "arch": platform.machine(),
        "flags": sorted(parse_cpu_flags(text)),
        "physical_cores": physical,
        "logical_cores": logical,
    }


def physical_cores() -> int:
    """Physical cores this process may use (at least 1)."""
    return max(1, cpu_info()["physical_cores"])


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to `n` (default: physical cores, SMT siblings share a core's FPU); return it."""
    if n is not None and n < 1:
        raise ValueError(f"threads must be at least 1 (got {n}); leave it unset to use the physical cores")
    usable = usable_cpus()
    if n is not None and n > usable:  # far more threads than CPUs only slows down (100000 crashed OpenMP)
        log.warning("--threads %d is more than the %d CPUs this process may use: using %d", n, usable, usable)
        n = usable
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # set by torchrun / accelerate launch
    torch.set_num_threads(n or max(1, physical_cores() // max(1, processes)))
    threads = torch.get_num_threads()
    log.info("torch threads: %d (%s)", threads,
             "requested" if n else "physical cores" if processes <= 1 else f"physical cores / {processes} processes")
    return threads


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# ---------------------------------------------------------------- GEMM probe (timers)

def gemm_shapes(hidden: int, kv: int, mlp: int, tokens: int = 512) -> tuple[Shape, ...]:
    """The projection GEMMs of one decoder layer on `tokens` tokens: q/o, k/v, MLP up and down."""
    return ((tokens, hidden, hidden), (tokens, hidden, kv), (tokens, hidden, mlp), (tokens, mlp, hidden))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _operands(dtype: torch.dtype, shape: Shape, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    m, k, n = shape
    return torch.randn(m, k, device=device).to(dtype), torch.randn(k, n, device=device).to(dtype)


@torch.inference_mode()
def _timed_mm(a: torch.Tensor, b: torch.Tensor) -> float:
    """Wall time (s) of one ``a @ b``, synchronised around the call on CUDA."""
    _sync(a.device)
    start = time.perf_counter()
    torch.mm(a, b)
    _sync(a.device)
    return time.perf_counter() - start


def time_gemm(dtype: torch.dtype, shape: Shape, device: str | torch.device = "cpu",
              repeats: int = 3, slow_s: float | None = None) -> float:
    """Best wall time (s) of an (m, k) @ (k, n) product in `dtype`, after one warm-up call.

    If the warm-up call alone takes longer than `slow_s`, its time is returned without
    repeating: a dtype that slow loses anyway, and repeats would cost seconds.
    """
    a, b = _operands(dtype, shape, torch.device(device))
    first = _timed_mm(a, b)
    if slow_s is not None and first > slow_s:
        return first
    return min(_timed_mm(a, b) for _ in range(max(1, repeats)))


def probe_gemm(dtype: torch.dtype | str, shape: Shape = DEFAULT_SHAPES[0], device: str | torch.device = "cpu",
               repeats: int = 3, slow_s: float | None = None) -> float:
    """GFLOPS of one GEMM shape in `dtype` (best of `repeats`; one call if slower than `slow_s`)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    m, k, n = shape
    return 2 * m * k * n / time_gemm(dtype, shape, device, repeats, slow_s) / 1e9


def probe_dtypes(dtype_names: Sequence[str], shapes: Sequence[Shape] = DEFAULT_SHAPES,
                 device: str | torch.device = "cpu", repeats: int = 3,
                 budget_s: float = PROBE_BUDGET_S) -> dict[str, float]:
    """GFLOPS per dtype over all `shapes` (total operations / sum of best times); fp32 always included.

    fp32 is warmed up and timed first. Each other dtype gets one call per shape; if one is
    `SLOW_FACTOR` x slower than fp32's, that call is its figure and it is not repeated (a 47x
    slower bf16 costs one call per shape). The rest are timed in `repeats` interleaved rounds
    (every dtype once per round, so background load hits all alike; best call kept); no
    further dtype is timed once `budget_s` has passed.
    """
    device = torch.device(device)
    names = sorted(set(dtype_names) | {"float32"}, key=DTYPE_NAMES.index)
    ops = {n: [_operands(getattr(torch, n), s, device) for s in shapes] for n in names}
    start = time.perf_counter()
    best = {"float32": [(_timed_mm(*ab), _timed_mm(*ab))[1] for ab in ops["float32"]]}
    active = ["float32"]
    for name in names[1:]:
        best[name] = [_timed_mm(*ab) for ab in ops[name]]
        if all(t <= SLOW_FACTOR * f for t, f in zip(best[name], best["float32"])):
            active.append(name)
        else:
            log.info("%s GEMM over %gx slower than float32: timed once", name, SLOW_FACTOR)
    for _ in range(repeats):
        for name in active:
            if time.perf_counter() - start > budget_s:
                break
            best[name] = [min(t, _timed_mm(*ab)) for t, ab in zip(best[name], ops[name])]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    return {n: flops / sum(best[n]) / 1e9 for n in names}


# ---------------------------------------------------------------- the choice (pure)

def dtypes_to_probe(*, device_type: str, cpu_flags: set[str], step: str,
                    cuda_bf16_supported: bool = False) -> tuple[str, ...]:
    """Which dtypes are worth timing: fp32, bf16 unless ruled out, fp16 where the step tolerates it.

    On x86 without native bf16 (AVX2-only, AVX512 before Cooper Lake) bf16 is emulated and not
    timed; on CUDA bf16 is timed where the GPU supports it. With native bf16 flags it is still
    timed (a few ms, cached) for the report, though on x86 the flags decide (`choose_dtype`).
    """
    _check_step(step)
    names = ["float32"]
    if device_type == "cuda":
        bf16 = cuda_bf16_supported
    else:
        bf16 = not _is_x86(cpu_flags) or bool(cpu_flags & X86_BF16_FLAGS)
    if bf16:
        names.append("bfloat16")
    if step in FP16_TOLERANT_STEPS:
        names.append("float16")
    return tuple(names)


def choose_dtype(probe: dict[str, float], *, device_type: str, cpu_flags: set[str], step: str,
                 cuda_bf16_supported: bool = False) -> tuple[str, str]:
    """The forward-pass dtype for `step`, and the reason to log.

    `probe` maps dtype names to GFLOPS (any subset, possibly empty). Rules:

    * CUDA: bfloat16 where supported (`cuda_bf16_supported`, from ``torch.cuda.is_bf16_supported()``);
      else float16 for fp16-tolerant steps, float32 otherwise (see `FP16_TOLERANT_STEPS`).
    * x86 CPU: the flags are unambiguous and decide — bfloat16 with native bf16 (avx512_bf16,
      amx_bf16), float32 without (bf16 is emulated there: 47x slower on an AVX2-only EPYC). A timing
      taken on a busy machine can swing 10x, and a choice that flips between runs would change the
      statistics and so the converted model; the probe's figures are reported alongside.
    * other CPUs, measured: the fastest of bf16 (and fp16, for tolerant steps) if at least
      `SPEEDUP_THRESHOLD` x fp32, else float32; not measured: float32.
    """
    _check_step(step)
    fp16_ok = step in FP16_TOLERANT_STEPS
    if device_type == "cuda":
        if cuda_bf16_supported:
            return "bfloat16", "cuda: bf16 supported"
        if fp16_ok:
            return "float16", "cuda: no bf16 support; fp16 for this step"
        return "float32", f"cuda: no bf16 support, and fp16 may overflow in {step} (unknown model)"
    if device_type != "cpu":
        return "float32", f"{device_type}: no rule, float32"
    fp32 = probe.get("float32")
    native = sorted(cpu_flags & X86_BF16_FLAGS)
    timed = ", ".join(f"{n} {v:.1f}" for n, v in probe.items() if _finite(v))
    timed = f"; probe: {timed} GFLOPS" if timed else ""
    if native:
        return "bfloat16", f"from flags: native bf16 ({', '.join(native)}){timed}"
    if _is_x86(cpu_flags):
        return "float32", f"from flags: no native bf16 (avx512_bf16/amx_bf16 absent), bf16 would be emulated{timed}"
    candidates = ["bfloat16"] + (["float16"] if fp16_ok else [])
    measured = {n: probe[n] for n in candidates if n in probe and _finite(probe[n])}
    if fp32 and _finite(fp32) and measured:
        best = max(measured, key=measured.get)
        ratio = measured[best] / fp32
        figures = ", ".join(f"{n} {probe[n]:.1f}" for n in ("float32", *measured))
        if ratio >= SPEEDUP_THRESHOLD:
            return best, f"measured: {best} {ratio:.2f}x fp32 ({figures} GFLOPS)"
        return "float32", (f"measured: {best} only {ratio:.2f}x fp32 (< {SPEEDUP_THRESHOLD}x; "
                           f"{figures} GFLOPS)")
    return "float32", "not measured, flags unknown: float32"


def _is_x86(cpu_flags: set[str]) -> bool:
    return bool(cpu_flags & {"avx", "avx2", "fma", "f16c", "avx512f"})


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _check_step(step: str) -> None:
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; choose one of {', '.join(STEPS)}")


def cache_key(fields: dict) -> str:
    """A short stable hash of the fields that change a probe's result (machine, torch, threads, shapes)."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- orchestration

def hardware_report(device: str | torch.device = "cpu") -> dict:
    """What the machine is (no timing): device, CPU model/flags/cores or GPU name, torch version, threads."""
    device = torch.device(device)
    cpu = cpu_info()
    report = {
        "device": str(device),
        "device_type": device.type,
        "cpu_model": cpu["model"],
        "cpu_arch": cpu["arch"],
        "cpu_flags": cpu["flags"],
        "physical_cores": cpu["physical_cores"],
        "logical_cores": cpu["logical_cores"],
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        report["device_name"] = torch.cuda.get_device_name(index)
        report["cuda_bf16_supported"] = bool(torch.cuda.is_bf16_supported())
    else:
        report["device_name"] = cpu["model"]
    return report


#: Below this a GEMM probe measured nothing sensible: every CPU this runs on does ≥ 1 GFLOP/s in any dtype, even
#: bf16 emulated on AVX2 (~2 GFLOP/s on 2 cores); a probe preempted by other work reads ~0.
MIN_PLAUSIBLE_GFLOPS = 0.1


def _plausible(gflops: float) -> bool:
    return _finite(gflops) and gflops >= MIN_PLAUSIBLE_GFLOPS


def _load_cache(path: Path) -> dict[str, float] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        probe = data["probe"]
        if data.get("version") != CACHE_VERSION or not all(
                n in DTYPE_NAMES and _finite(v) and _plausible(float(v)) for n, v in probe.items()):
            raise ValueError("unexpected content")
        return {n: float(v) for n, v in probe.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("hardware cache %s is unreadable (%s); probing again and rewriting it", path, err)
        return None


def _write_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_auto_dtype(device: str | torch.device = "cpu", *, shapes: Sequence[Shape] = DEFAULT_SHAPES,
                       cache_dir: str | Path | None = None, step: str = "calibration",
                       probe: Callable[[Sequence[str], Sequence[Shape], torch.device], dict[str, float]] | None = None,
                       ) -> tuple[torch.dtype, dict]:
    """The dtype for `step`'s forward passes on `device`, and the facts behind it (for report.json).

    Probes the dtypes `dtypes_to_probe` names at `shapes` (with `probe`, default `probe_dtypes`),
    reusing figures cached in ``<cache_dir>/hardware/<key>.json``, where the key hashes the CPU
    model and flags, torch version, threads, device name and shapes; missing figures are
    measured and the file rewritten (atomically). `cache_dir=None` probes every time.
    """
    device = torch.device(device)
    probe = probe or probe_dtypes
    shapes = tuple(tuple(int(x) for x in s) for s in shapes)
    info = hardware_report(device)
    flags = set(info["cpu_flags"])
    bf16_cuda = info.get("cuda_bf16_supported", False)
    wanted = dtypes_to_probe(device_type=device.type, cpu_flags=flags, step=step, cuda_bf16_supported=bf16_cuda)
    key_fields = {
        "cpu_model": info["cpu_model"], "cpu_flags": info["cpu_flags"], "torch": info["torch_version"],
        "threads": info["threads"], "device_name": info["device_name"], "shapes": shapes,
    }
    path = Path(cache_dir) / "hardware" / f"{cache_key(key_fields)}.json" if cache_dir is not None else None
    figures = (_load_cache(path) if path else None) or {}
    missing = [n for n in wanted if n not in figures]
    cached = not missing
    if missing:
        start = time.perf_counter()
        figures.update(probe(missing, shapes, device))
        log.info("probed %s GEMMs in %.0f ms", ", ".join(missing), 1e3 * (time.perf_counter() - start))
        implausible = {n: v for n, v in figures.items() if not _plausible(v)}
        if implausible:  # a probe that measured nothing sensible (a busy machine) must not decide later runs
            log.warning("the GEMM probe measured %s: implausible (the machine may be busy); not cached, probing "
                        "again next run", ", ".join(f"{n} {v:.3g} GFLOP/s" for n, v in implausible.items()))
        elif path:
            _write_atomic(path, {"version": CACHE_VERSION, "key": key_fields, "probe": figures})
    name, reason = choose_dtype(figures, device_type=device.type, cpu_flags=flags, step=step,
                                cuda_bf16_supported=bf16_cuda)
    log.info("%s dtype: %s (%s)", step, name, reason)
    info.update({
        "shapes": [list(s) for s in shapes], "probe_gflops": {n: round(v, 2) for n, v in figures.items()},
        "step": step, "dtype": name, "reason": reason, "from_cache": cached,
        "cache_file": str(path) if path else None,
    })
    return getattr(torch, name), info
