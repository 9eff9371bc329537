"""hardware.py: /proc/cpuinfo parsing on fixture texts, the dtype choice, the probe cache, the real probe."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import pytest
import torch

from care_mla.io import hardware

MILAN_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
    "syscall nx mmxext fxsr_opt pdpe1gb rdtscp lm constant_tsc rep_good nopl nonstop_tsc cpuid extd_apicid "
    "tsc_known_freq pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c "
    "rdrand hypervisor lahf_lm cmp_legacy cr8_legacy abm sse4a misalignsse 3dnowprefetch osvw topoext "
    "ssbd ibrs ibpb stibp vmmcall fsgsbase tsc_adjust bmi1 avx2 smep bmi2 erms invpcid rdseed adx smap "
    "clflushopt clwb sha_ni xsaveopt xsavec xgetbv1 clzero xsaveerptr arat npt nrip_save umip vaes "
    "vpclmulqdq rdpid fsrm"
)
SPR_FLAGS = (
    "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ss "
    "ht syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid tsc_known_freq "
    "pni pclmulqdq ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand "
    "hypervisor lahf_lm abm 3dnowprefetch invpcid_single ssbd ibrs ibpb stibp ibrs_enhanced fsgsbase "
    "tsc_adjust bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma "
    "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx_vnni avx512_bf16 "
    "arat avx512vbmi umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg "
    "avx512_vpopcntdq la57 rdpid cldemote movdiri movdir64b fsrm md_clear serialize tsxldtrk amx_bf16 "
    "avx512_fp16 amx_tile amx_int8 arch_capabilities"
)


def _x86_block(proc: int, model: str, core: int, siblings: int, cores: int, flags: str) -> str:
    return (
        f"processor\t: {proc}\nvendor_id\t: x\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: {model}\n"
        f"stepping\t: 1\ncpu MHz\t\t: 2450.000\ncache size\t: 512 KB\nphysical id\t: 0\nsiblings\t: {siblings}\n"
        f"core id\t\t: {core}\ncpu cores\t: {cores}\napicid\t\t: {proc}\nfpu\t\t: yes\nflags\t\t: {flags}\n"
        "bogomips\t: 4900.00\n\n"
    )


# GCP n2d-standard-2: one Milan core, two SMT threads.
EPYC_7B13 = "".join(_x86_block(p, "AMD EPYC 7B13", 0, 2, 1, MILAN_FLAGS) for p in range(2))
# GCP c3-standard-4: two Sapphire Rapids cores, threads numbered 0,1 then siblings 2,3.
SPR_8481C = "".join(
    _x86_block(p, "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", p % 2, 4, 2, SPR_FLAGS) for p in range(4))
# AWS Graviton3 (c7g.xlarge): no "core id", no "model name".
GRAVITON3 = "".join(
    f"processor\t: {p}\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics "
    "fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat "
    "ilrcpc flagm ssbs paca pacg dcpodp svei8mm svebf16 i8mm bf16 dgh rng\nCPU implementer\t: 0x41\n"
    "CPU architecture: 8\nCPU variant\t: 0x1\nCPU part\t: 0xd40\nCPU revision\t: 1\n\n" for p in range(4))


# ---------------------------------------------------------------- parsing

def test_parse_avx2_only_epyc():
    assert hardware.parse_cpu_model(EPYC_7B13) == "AMD EPYC 7B13"
    assert hardware.parse_cpu_flags(EPYC_7B13) == {"avx", "avx2", "fma", "f16c"}
    assert hardware.count_logical_cpus(EPYC_7B13) == 2
    assert hardware.count_physical_cores(EPYC_7B13) == 1  # two SMT threads of one core


def test_parse_sapphire_rapids_and_affinity():
    flags = hardware.parse_cpu_flags(SPR_8481C)
    assert {"amx_bf16", "amx_tile", "amx_int8", "avx512_bf16", "avx512_fp16", "avx512f"} <= flags
    assert "sse2" not in flags  # only the relevant ones
    assert hardware.count_physical_cores(SPR_8481C) == 2
    assert hardware.count_logical_cpus(SPR_8481C) == 4
    assert hardware.count_physical_cores(SPR_8481C, allowed={0, 2}) == 1  # siblings of core 0
    assert hardware.count_physical_cores(SPR_8481C, allowed={0, 1}) == 2
    assert hardware.count_logical_cpus(SPR_8481C, allowed={3}) == 1


def test_parse_arm_without_core_ids():
    assert hardware.parse_cpu_model(GRAVITON3) == "arm implementer 0x41 part 0xd40"
    assert hardware.parse_cpu_flags(GRAVITON3) >= {"asimd", "sve", "bf16", "i8mm"}
    assert hardware.count_physical_cores(GRAVITON3) == 4
    assert hardware.count_physical_cores("") == 0


def test_cgroup_cpu_max():
    assert hardware.parse_cgroup_cpu_max("200000 100000\n") == 2.0
    assert hardware.parse_cgroup_cpu_max("150000 100000") == 1.5
    assert hardware.parse_cgroup_cpu_max("max 100000") is None
    assert hardware.parse_cgroup_cpu_max("") is None


def test_cpu_info_of_this_machine_stays_within_affinity():
    info = hardware.cpu_info()
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count())
    assert 1 <= info["physical_cores"] <= info["logical_cores"] <= len(allowed)
    assert isinstance(info["model"], str) and info["model"]
    assert set(info["flags"]) <= hardware.RELEVANT_FLAGS


def test_configure_threads():
    before = torch.get_num_threads()
    try:
        assert hardware.configure_threads(1) == 1 == torch.get_num_threads()
        assert hardware.configure_threads(None) == hardware.physical_cores()
        with pytest.raises(ValueError, match="at least 1"):
            hardware.configure_threads(0)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- the choice

SPR = hardware.parse_cpu_flags(SPR_8481C)
MILAN = hardware.parse_cpu_flags(EPYC_7B13)


def test_choose_slow_bf16_keeps_float32():
    """Where the flags do not tell (not x86), a bf16 measured 47x slower keeps float32; on x86 the flags decide,
    so a timing taken on a busy machine cannot flip the choice (and the converted model) between runs."""
    name, reason = hardware.choose_dtype({"float32": 100.0, "bfloat16": 100 / 47}, device_type="cpu",
                                         cpu_flags=set(), step="calibration")
    assert name == "float32" and reason.startswith("measured") and "0.02x" in reason
    noisy = {"float32": 100.0, "bfloat16": 100 / 47}  # a probe disturbed by another job
    assert hardware.choose_dtype(noisy, device_type="cpu", cpu_flags=SPR, step="calibration")[0] == "bfloat16"
    assert hardware.choose_dtype({"float32": 44.0, "bfloat16": 500.0}, device_type="cpu", cpu_flags=MILAN,
                                 step="calibration")[0] == "float32"


def test_choose_fast_bf16_and_threshold():
    choose = lambda probe: hardware.choose_dtype(probe, device_type="cpu", cpu_flags=set(), step="calibration")
    assert choose({"float32": 100.0, "bfloat16": 290.0})[0] == "bfloat16"
    assert choose({"float32": 100.0, "bfloat16": 100 * hardware.SPEEDUP_THRESHOLD})[0] == "bfloat16"
    assert choose({"float32": 100.0, "bfloat16": 125.0})[0] == "float32"  # 1.25x: not worth it


def test_choose_from_flags_without_measurement():
    assert hardware.choose_dtype({}, device_type="cpu", cpu_flags=SPR, step="calibration") == (
        "bfloat16", "from flags: native bf16 (amx_bf16, avx512_bf16)")
    name, reason = hardware.choose_dtype({"float32": 50.0}, device_type="cpu", cpu_flags=MILAN, step="calibration")
    assert name == "float32" and reason.startswith("from flags: no native bf16")
    assert hardware.choose_dtype({}, device_type="cpu", cpu_flags=set(), step="evaluation")[0] == "float32"


def test_fp16_never_chosen_for_calibration_on_cpu():
    probe = {"float32": 100.0, "bfloat16": 50.0, "float16": 1000.0}
    for step in ("calibration", "evaluation", "healing"):
        assert hardware.choose_dtype(probe, device_type="cpu", cpu_flags=set(), step=step)[0] == "float32"
    assert hardware.choose_dtype(probe, device_type="cpu", cpu_flags=set(), step="generation")[0] == "float16"
    with pytest.raises(ValueError, match="calibration, evaluation"):
        hardware.choose_dtype(probe, device_type="cpu", cpu_flags=SPR, step="calib")


def test_choose_on_cuda():
    kw = dict(device_type="cuda", cpu_flags=MILAN)
    assert hardware.choose_dtype({}, step="calibration", cuda_bf16_supported=True, **kw) == (
        "bfloat16", "cuda: bf16 supported")
    assert hardware.choose_dtype({}, step="generation", cuda_bf16_supported=False, **kw)[0] == "float16"
    assert hardware.choose_dtype({}, step="calibration", cuda_bf16_supported=False, **kw)[0] == "float32"


def test_dtypes_to_probe_skips_emulated_bf16_and_unsafe_fp16():
    assert hardware.dtypes_to_probe(device_type="cpu", cpu_flags=MILAN, step="calibration") == ("float32",)
    assert hardware.dtypes_to_probe(device_type="cpu", cpu_flags=SPR, step="calibration") == ("float32", "bfloat16")
    assert hardware.dtypes_to_probe(device_type="cpu", cpu_flags=SPR, step="generation") == (
        "float32", "bfloat16", "float16")
    arm = hardware.parse_cpu_flags(GRAVITON3)
    assert hardware.dtypes_to_probe(device_type="cpu", cpu_flags=arm, step="evaluation") == ("float32", "bfloat16")


# ---------------------------------------------------------------- probe and cache

def test_real_probe_float32_is_fast_and_finite():
    start = time.perf_counter()
    gflops = hardware.probe_gemm(torch.float32, (512, 576, 1536))
    figures = hardware.probe_dtypes(["float32"], hardware.gemm_shapes(576, 192, 1536, tokens=256))
    assert time.perf_counter() - start < 2.0
    assert math.isfinite(gflops) and gflops > 0.1
    assert set(figures) == {"float32"} and math.isfinite(figures["float32"]) and figures["float32"] > 0.1


def test_probe_times_a_very_slow_dtype_once(monkeypatch):
    calls = {"float32": 0, "bfloat16": 0}

    def fake_mm(a, b):  # a fake clock: fp32 10 ms, bf16 1 s (100x slower)
        name = str(a.dtype).removeprefix("torch.")
        calls[name] += 1
        return 0.01 if name == "float32" else 1.0

    monkeypatch.setattr(hardware, "_timed_mm", fake_mm)
    shape = (64, 32, 16)
    figures = hardware.probe_dtypes(["bfloat16"], [shape], repeats=3)
    assert calls == {"float32": 2 + 3, "bfloat16": 1}  # fp32: warm-up, first, 3 rounds; bf16: once
    flops = 2 * 64 * 32 * 16
    assert figures == pytest.approx({"float32": flops / 0.01 / 1e9, "bfloat16": flops / 1.0 / 1e9})


def _fake_cpu(model: str, flags: set[str], arch: str = "x86_64"):
    return lambda: {"model": model, "arch": arch, "flags": sorted(flags), "physical_cores": 1,
                    "logical_cores": 2}


def test_monkeypatched_probe_47x_slower_bf16_gives_float32(monkeypatch, tmp_path):
    seen = []

    def probe(names, shapes, device):
        seen.append(tuple(names))
        return {"float32": 94.0, "bfloat16": 2.0}

    monkeypatch.setattr(hardware, "cpu_info", _fake_cpu("Neoverse-V1", {"asimd", "sve"}, arch="aarch64"))
    monkeypatch.setattr(hardware, "probe_dtypes", probe)  # the default probe, looked up at call time
    dtype, info = hardware.resolve_auto_dtype("cpu", cache_dir=tmp_path, step="calibration")
    assert dtype is torch.float32 and seen == [("float32", "bfloat16")]
    assert info["reason"].startswith("measured: bfloat16 only 0.02x fp32")
    assert info["probe_gflops"] == {"float32": 94.0, "bfloat16": 2.0} and info["from_cache"] is False
    assert info["cpu_model"] == "Neoverse-V1" and info["torch_version"] == torch.__version__


def test_avx2_only_epyc_never_probes_bf16(monkeypatch):
    seen = []
    monkeypatch.setattr(hardware, "cpu_info", _fake_cpu("AMD EPYC 7B13", MILAN))
    dtype, info = hardware.resolve_auto_dtype(
        "cpu", step="calibration", probe=lambda names, shapes, device: seen.append(names) or {"float32": 40.0})
    assert dtype is torch.float32 and seen == [["float32"]]
    assert info["reason"].startswith("from flags: no native bf16") and info["cache_file"] is None


def test_cache_keyed_by_machine_and_reused(monkeypatch, tmp_path):
    calls = []

    def probe(names, shapes, device):
        calls.append(list(names))
        return {n: {"float32": 100.0, "bfloat16": 300.0, "float16": 5.0}[n] for n in names}

    for model in ("AMD EPYC 9R14", "Intel Xeon 8481C"):
        monkeypatch.setattr(hardware, "cpu_info", _fake_cpu(model, SPR))
        dtype, info = hardware.resolve_auto_dtype("cpu", cache_dir=tmp_path, step="calibration", probe=probe)
        assert dtype is torch.bfloat16 and info["from_cache"] is False
    files = sorted((tmp_path / "hardware").glob("*.json"))
    assert len(files) == 2 and len(calls) == 2
    assert not list((tmp_path / "hardware").glob("*.tmp"))  # no temporary left behind

    dtype, info = hardware.resolve_auto_dtype("cpu", cache_dir=tmp_path, step="calibration", probe=probe)
    assert dtype is torch.bfloat16 and info["from_cache"] is True and len(calls) == 2
    # another step needing fp16 measures only what the cache lacks
    dtype, info = hardware.resolve_auto_dtype("cpu", cache_dir=tmp_path, step="generation", probe=probe)
    assert calls[-1] == ["float16"] and info["from_cache"] is False and dtype is torch.bfloat16
    stored = json.loads(open(info["cache_file"]).read())
    assert stored["probe"] == {"float32": 100.0, "bfloat16": 300.0, "float16": 5.0}
    assert stored["key"]["cpu_model"] == "Intel Xeon 8481C"


def test_corrupt_cache_is_recomputed_with_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(hardware, "cpu_info", _fake_cpu("Intel Xeon 8481C", SPR))
    probe = lambda names, shapes, device: {"float32": 100.0, "bfloat16": 250.0}
    _, info = hardware.resolve_auto_dtype("cpu", cache_dir=tmp_path, step="calibration", probe=probe)
    path = info["cache_file"]
    with open(path, "w") as f:
        f.write('{"version": 1, "probe": {"float32": ')  # a write cut short
    with caplog.at_level(logging.WARNING, logger="care_mla.io.hardware"):
        dtype, info = hardware.resolve_auto_dtype("cpu", cache_dir=tmp_path, step="calibration", probe=probe)
    assert dtype is torch.bfloat16 and info["from_cache"] is False
    assert any("unreadable" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert json.loads(open(path).read())["probe"] == {"float32": 100.0, "bfloat16": 250.0}


def test_hardware_report_on_cpu():
    report = hardware.hardware_report("cpu")
    assert report["device_type"] == "cpu" and report["threads"] == torch.get_num_threads()
    assert report["device_name"] == report["cpu_model"] and "cuda_bf16_supported" not in report


def test_a_probe_that_measured_nothing_sensible_is_not_cached(monkeypatch, tmp_path, caplog):
    """A probe preempted by other work reads ~0 GFLOP/s: it may decide this run, never a later one."""
    monkeypatch.setattr(hardware, "cpu_info", _fake_cpu("Intel Xeon 8481C", SPR))
    calls = []

    def busy_then_idle(names, shapes, device):
        calls.append(list(names))
        if len(calls) == 1:
            return {"float32": 0.004, "bfloat16": 250.0}
        return {"float32": 100.0, "bfloat16": 250.0}

    with caplog.at_level(logging.WARNING, logger="care_mla.io.hardware"):
        _, info = hardware.resolve_auto_dtype("cpu", cache_dir=tmp_path, step="calibration", probe=busy_then_idle)
    assert any("implausible" in r.getMessage() for r in caplog.records)
    assert not list((tmp_path / "hardware").glob("*.json"))  # nothing cached
    _, info = hardware.resolve_auto_dtype("cpu", cache_dir=tmp_path, step="calibration", probe=busy_then_idle)
    assert len(calls) == 2 and info["from_cache"] is False
    assert json.loads(open(info["cache_file"]).read())["probe"] == {"float32": 100.0, "bfloat16": 250.0}
    # a cache file written before this rule, holding an implausible figure, is measured again
    with open(info["cache_file"], "w") as f:
        json.dump({"version": hardware.CACHE_VERSION, "probe": {"float32": 0.0, "bfloat16": 250.0}}, f)
    _, info = hardware.resolve_auto_dtype("cpu", cache_dir=tmp_path, step="calibration", probe=busy_then_idle)
    assert len(calls) == 3 and info["from_cache"] is False


def test_threads_above_the_usable_cpus_are_capped(caplog):
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.WARNING, logger="care_mla.io.hardware"):
            threads = hardware.configure_threads(100000)
        assert threads == hardware.usable_cpus() <= (os.cpu_count() or 1)
        assert any("--threads 100000 is more than" in r.getMessage() for r in caplog.records)
        assert hardware.configure_threads(1) == 1
    finally:
        torch.set_num_threads(before)
