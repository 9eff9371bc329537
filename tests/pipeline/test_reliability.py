"""What happens when things go wrong: bad inputs, bad options, races, kills, full disks, damaged caches.

Every case runs the real CLI (in-process, or as a child process where a signal is involved) on a
tiny model and asserts four things: the exit status (2 for bad input or usage, 1 for a failure at
run time, 130 / 128+N for Ctrl-C / signal N), a one-line message on stderr that names the fix, the
inputs' bytes unchanged, and nothing left behind (no staging, lock or trash file anywhere).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import care_mla  # noqa: F401
from care_mla.cli import main
from care_mla.io.outputs import MARKER, OutputLock
from care_mla.pipeline import calibration, evaluate
from care_mla.pipeline import convert as api

SRC = Path(__file__).resolve().parents[2] / "src"
LEFTOVER_MARKS = (".partial-", ".lock", ".old-", ".tmp", MARKER)


def tree_digest(path: Path) -> str:
    """Names and bytes of every file under `path` (or of the file itself)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode() + f.read_bytes())
    return h.hexdigest()


def leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if any(m in p.name for m in LEFTOVER_MARKS))


@pytest.fixture
def work(tmp_path, tiny_model_dir, text_file):
    """A private copy of a tiny model and a text, and the CLI arguments of a fast conversion of them."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir("llama"), model)
    text = tmp_path / "text.txt"
    shutil.copy(text_file, text)
    cache = tmp_path / "cache"

    class Work:
        root, model_dir, text_path, cache_dir = tmp_path, model, text, cache

        def args(self, out, *extra, model=None):
            return ["convert", str(model or self.model_dir), "--out", str(out), "--calib-text", str(self.text_path),
                    "--eval-text", str(self.text_path), "--calib-samples", "4", "--calib-seq-len", "16",
                    "--eval-samples", "2", "--eval-seq-len", "16", "--cache-dir", str(self.cache_dir), "--quiet",
                    *extra]

        def digests(self):
            return {p: tree_digest(p) for p in (self.model_dir, self.text_path)}

    return Work()


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def one_line_error(err: str) -> str:
    """The one error line of stderr (log lines of the run before it are allowed, a traceback is not)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("care-mla:")]
    assert len(lines) == 1, err
    return lines[0]


def assert_refused(work, capsys, argv, code: int, *needles: str):
    before = work.digests()
    got, err = run(argv, capsys)
    line = one_line_error(err)
    assert got == code, err
    for needle in needles:
        assert needle in line, line
    assert work.digests() == before
    assert leftovers(work.root) == []
    return line


# ----------------------------------------------------------------------------- inputs are sacred


def test_out_equal_to_the_input_model_is_refused_even_with_overwrite(work, capsys):
    assert_refused(work, capsys, work.args(work.model_dir, "--overwrite"), 2, "is the input model itself")


def test_out_above_the_input_model_is_refused(work, capsys):
    assert_refused(work, capsys, work.args(work.root, "--overwrite"), 2, "contains the input model")


def test_out_inside_the_input_model_is_refused(work, capsys):
    assert_refused(work, capsys, work.args(work.model_dir / "converted"), 2, "lies inside the input model")


def test_out_reaching_the_input_through_a_symlink_is_refused(work, capsys):
    link = work.root / "link"
    link.symlink_to(work.model_dir)
    assert_refused(work, capsys, work.args(link, "--overwrite"), 2, "is the input model itself")


def test_input_given_through_a_symlink_is_protected_too(work, capsys):
    link = work.root / "model-link"
    link.symlink_to(work.model_dir)
    assert_refused(work, capsys, work.args(work.model_dir, "--overwrite", model=link), 2, "is the input model itself")


def test_out_equal_to_the_calibration_text_is_refused(work, capsys):
    assert_refused(work, capsys, work.args(work.text_path, "--overwrite"), 2, "is the calibration text itself")


def test_out_containing_the_cache_is_refused(work, capsys):
    work.cache_dir.mkdir()
    out = work.root / "runs"
    args = work.args(out, "--overwrite")
    args[args.index("--cache-dir") + 1] = str(out / "cache")
    (out / "cache").mkdir(parents=True)
    assert_refused(work, capsys, args, 2, "contains the cache folder")


def test_out_inside_the_cache_is_refused(work, capsys):
    work.cache_dir.mkdir()
    assert_refused(work, capsys, work.args(work.cache_dir / "out"), 2, "lies inside the cache folder")


def test_sweep_out_equal_to_the_model_is_refused(work, capsys):
    argv = ["sweep", str(work.model_dir), "--out", str(work.model_dir), "--overwrite", "--quiet"]
    assert_refused(work, capsys, argv, 2, "is the input model itself")


# ----------------------------------------------------------------------------- output folder


def test_existing_out_is_refused_without_overwrite(work, capsys):
    out = work.root / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert_refused(work, capsys, work.args(out), 2, "exists; pass --overwrite")
    assert (out / "mine.txt").read_text() == "keep"


def test_out_that_is_a_file_is_refused(work, capsys):
    out = work.root / "out"
    out.write_text("a file")
    assert_refused(work, capsys, work.args(out, "--overwrite"), 2, "is a file")
    assert out.read_text() == "a file"


def test_out_below_a_file_is_refused_before_any_work(work, capsys):
    blocker = work.root / "blocker"
    blocker.write_text("x")
    assert_refused(work, capsys, work.args(blocker / "out"), 2, "cannot be created")
    assert not work.cache_dir.exists()  # nothing was calibrated


def test_out_locked_by_another_run_is_refused(work, capsys):
    out = work.root / "out"
    with OutputLock(out):
        before = work.digests()
        code, err = run(work.args(out), capsys)
        assert code == 2 and "another care-mla run" in one_line_error(err)
        assert work.digests() == before and not out.exists()
    assert leftovers(work.root) == []


def test_overwrite_replaces_the_output_and_leaves_no_trash(work, capsys):
    out = work.root / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    before = work.digests()
    code, err = run(work.args(out, "--overwrite", "--no-eval"), capsys)
    assert code == 0, err
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert work.digests() == before and leftovers(work.root) == []


def test_folder_that_appears_meanwhile_is_kept_and_the_result_too(work, capsys, monkeypatch):
    out = work.root / "out"
    real = calibration.calibrate

    def calibrate_then_someone_writes_out(*a, **kw):
        stats = real(*a, **kw)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return stats

    monkeypatch.setattr(api, "calibrate", calibrate_then_someone_writes_out)
    real_pass = api.calibrate_and_fit

    def pass_then_someone_writes_out(*a, **kw):  # the default layout's one pass stands for calibrate
        done = real_pass(*a, **kw)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
        return done

    monkeypatch.setattr(api, "calibrate_and_fit", pass_then_someone_writes_out)
    before = work.digests()
    code, err = run(work.args(out, "--no-eval"), capsys)
    line = one_line_error(err)
    assert code == 2 and "appeared while this run was writing" in line
    assert (out / "theirs.txt").read_text() == "theirs"
    kept = [p for p in work.root.iterdir() if p.name.startswith("out.care-mla-")]
    assert len(kept) == 1 and str(kept[0]) in line and (kept[0] / "model.safetensors").is_file()
    assert work.digests() == before and leftovers(work.root) == []


def test_stale_staging_of_a_dead_process_is_cleaned_but_foreign_folders_are_not(work, capsys):
    out = work.root / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = work.root / f".out.partial-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    foreign = work.root / ".out.partial-1"
    foreign.mkdir()
    (foreign / "data").write_text("not care-mla's")
    code, err = run(work.args(out, "--no-eval"), capsys)
    assert code == 0, err
    assert not stale.exists()
    assert (foreign / "data").read_text() == "not care-mla's"


# ----------------------------------------------------------------------------- bad models


def _damage(work, how: str) -> None:
    f = work.model_dir / "model.safetensors"
    if how == "empty":
        f.write_bytes(b"")
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[:-1000])
    elif how == "garbage":
        f.write_bytes(os.urandom(4096))
    elif how in ("nan", "inf"):
        state = load_file(str(f))
        name = "model.layers.1.self_attn.k_proj.weight" if how == "nan" else "model.embed_tokens.weight"
        state[name][0, 0] = math.nan if how == "nan" else math.inf
        save_file(state, str(f), metadata={"format": "pt"})
    elif how == "bad-index":
        (work.model_dir / "model.safetensors.index.json").write_text("{ not json")
    elif how == "missing-shard":
        state = load_file(str(f))
        f.unlink()
        (work.model_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {k: "model-00001-of-00002.safetensors" for k in state}}))
    elif how == "no-config":
        (work.model_dir / "config.json").unlink()


@pytest.mark.parametrize("how, needle", [
    ("empty", "empty or shorter than a safetensors header"),
    ("truncated", "truncated or damaged"),
    ("garbage", "not a readable safetensors file"),
    ("nan", "model.layers.1.self_attn.k_proj.weight holds 1 NaN/Inf"),
    ("inf", "model.embed_tokens.weight holds 1 NaN/Inf"),
    ("bad-index", "not a valid safetensors index"),
    ("missing-shard", "lacks weight files its index names"),
    ("no-config", "no config.json"),
])
def test_damaged_model_is_one_line_and_exit_2(work, capsys, how, needle):
    _damage(work, how)
    assert_refused(work, capsys, work.args(work.root / "out"), 2, needle)
    assert not (work.root / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finite_check_sees_every_bad_entry_and_passes_sums_that_overflow(dtype):
    from care_mla.io.checkpoint import CheckpointCorruptError, check_finite

    big = torch.full((64, 64), torch.finfo(dtype).max / 2, dtype=dtype)  # finite entries whose sum overflows
    assert not math.isfinite(float(big.sum()))
    check_finite("big", big)
    check_finite("ids", torch.arange(10))  # not floating point: nothing to check
    for bad in (math.nan, math.inf, -math.inf):
        w = torch.randn(64, 64).to(dtype)
        w[17, 5] = bad
        with pytest.raises(CheckpointCorruptError, match="weight w holds 1 NaN/Inf"):
            check_finite("w", w)
    pair = torch.randn(64, 64).to(dtype)
    pair[0, 0], pair[1, 1] = math.inf, -math.inf  # a sum of Inf and -Inf is NaN, still refused
    with pytest.raises(CheckpointCorruptError, match="holds 2 NaN/Inf"):
        check_finite("pair", pair)


def test_missing_model_folder_is_refused(work, capsys):
    assert_refused(work, capsys, work.args(work.root / "out", model=work.root / "nope"), 2, "model folder not found")


def test_nan_weights_are_named_on_the_whole_model_path_too(work, capsys):
    _damage(work, "nan")
    assert_refused(work, capsys, work.args(work.root / "out", "--no-layerwise"), 2,
                   "model.layers.1.self_attn.k_proj.weight")


# ----------------------------------------------------------------------------- bad texts


@pytest.mark.parametrize("content, needle", [
    (b"caf\xe9 au lait " * 100, "is not UTF-8 text"),
    (b"", "is empty"),
])
def test_unusable_text_is_refused_before_any_work(work, capsys, content, needle):
    bad = work.root / "bad.txt"
    bad.write_bytes(content)
    args = work.args(work.root / "out")
    args[args.index("--calib-text") + 1] = str(bad)
    assert_refused(work, capsys, args, 2, needle)
    assert not work.cache_dir.exists()


def test_missing_text_is_refused(work, capsys):
    args = work.args(work.root / "out")
    args[args.index("--eval-text") + 1] = str(work.root / "missing.txt")
    assert_refused(work, capsys, args, 2, "text file not found")


def test_text_too_short_for_the_windows_is_refused(work, capsys):
    short = work.root / "short.txt"
    short.write_text("the a of and to in\n")
    args = work.args(work.root / "out")
    args[args.index("--calib-text") + 1] = str(short)
    assert_refused(work, capsys, args, 2, "use fewer samples, shorter windows or a longer text")


# ----------------------------------------------------------------------------- bad options


@pytest.mark.parametrize("option, value, needle", [
    ("--damping", "nan", "damping must be a finite number"),
    ("--damping", "-1", "damping must be ≥ 0"),
    ("--kv-fraction", "nan", "kv_fraction must be a finite number"),
    ("--kv-fraction", "0", "kv_fraction must be in (0, 1]"),
    ("--kv-fraction", "1.5", "kv_fraction must be in (0, 1]"),
    ("--rank-max-ratio", "inf", "rank_max_ratio must be a finite number"),
    ("--calib-samples", "0", "calib_samples must be a positive integer"),
    ("--max-memory", "gpu=lots", "--max-memory entries are DEVICE=SIZE"),
])
def test_invalid_numbers_are_refused(work, capsys, option, value, needle):
    assert_refused(work, capsys, work.args(work.root / "out", option, value), 2, needle)


@pytest.mark.parametrize("option, value, needle", [
    ("--lr", "nan", "lr must be a finite number"),
    ("--kd-temperature", "inf", "kd_temperature must be a finite number"),
])
def test_invalid_heal_numbers_are_refused(work, capsys, option, value, needle):
    argv = ["heal", str(work.model_dir), "--teacher", str(work.model_dir), "--out", str(work.root / "healed"),
            "--tokens", "64", option, value, "--quiet"]
    assert_refused(work, capsys, argv, 2, needle)


def test_unknown_zero_shot_task_is_refused_before_calibrating(work, capsys):
    assert_refused(work, capsys, work.args(work.root / "out", "--zero-shot-tasks", "lastword,no_such_task"), 2,
                   "unknown zero-shot task(s) no_such_task")
    assert not work.cache_dir.exists()


# ----------------------------------------------------------------------------- heal's folders


@pytest.fixture
def converted(work):
    out = work.root / "converted"
    assert main(work.args(out, "--no-eval")) == 0
    return out


def test_heal_out_equal_to_the_converted_model_is_refused(work, converted, capsys):
    argv = ["heal", str(converted), "--teacher", str(work.model_dir), "--out", str(converted), "--overwrite",
            "--tokens", "64", "--quiet"]
    before = tree_digest(converted)
    assert_refused(work, capsys, argv, 2, "is the converted model itself")
    assert tree_digest(converted) == before


def test_heal_out_above_the_teacher_is_refused(work, converted, capsys):
    argv = ["heal", str(converted), "--teacher", str(work.model_dir), "--out", str(work.root), "--overwrite",
            "--tokens", "64", "--quiet"]
    assert_refused(work, capsys, argv, 2, "contains the")


def test_heal_never_deletes_a_work_folder_it_did_not_make(work, converted, capsys):
    out = work.root / "healed"
    foreign = work.root / "healed.work"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("mine")
    argv = ["heal", str(converted), "--teacher", str(work.model_dir), "--out", str(out), "--tokens", "64",
            "--eval-text", str(work.text_path), "--train-text", str(work.text_path), "--seq-len", "16", "--quiet"]
    assert_refused(work, capsys, argv, 2, "was not made by care-mla heal")
    assert (foreign / "precious.txt").read_text() == "mine" and not out.exists()


# ----------------------------------------------------------------------------- late failures keep the work


def test_failed_evaluation_keeps_the_model_and_says_how_to_rerun_it(work, capsys, monkeypatch):
    out = work.root / "out"
    monkeypatch.setattr(evaluate, "evaluate_pair", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    line = assert_refused(work, capsys, work.args(out), 1, "evaluation failed", f"care-mla eval {out}")
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation_status"].startswith("failed: RuntimeError: boom")
    assert report["ranks"] and (out / "model.safetensors").is_file()
    assert "Traceback" not in line


def test_non_finite_perplexity_fails_the_run_but_keeps_valid_json(work, capsys, monkeypatch):
    out = work.root / "out"
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: math.nan)
    monkeypatch.setattr(evaluate, "original_perplexity", lambda *a, **k: math.nan)
    assert_refused(work, capsys, work.args(out), 1, "perplexity is nan")
    report = json.loads((out / "report.json").read_text())  # strict JSON: no NaN
    assert "ppl" not in report and report["evaluation_status"].startswith("failed")


def test_eval_of_a_model_with_non_finite_perplexity_exits_1_without_printing_nan(work, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "perplexity", lambda *a, **k: math.inf)
    argv = ["eval", str(work.model_dir), "--eval-text", str(work.text_path), "--eval-samples", "2",
            "--eval-seq-len", "16", "--quiet"]
    before = work.digests()
    code, err = run(argv, capsys)
    assert code == 1 and "perplexity is inf" in one_line_error(err)
    assert "NaN" not in capsys.readouterr().out and work.digests() == before


def test_disk_full_is_one_line_and_leaves_nothing(work, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device", str(work.root / "out"))

    monkeypatch.setattr(api, "write_model", full)
    assert_refused(work, capsys, work.args(work.root / "out"), 1, "disk full")
    assert not (work.root / "out").exists()


def _fail_first_stage(monkeypatch, error: BaseException) -> None:
    """The conversion's first stage after loading raises `error`: calibrate (two passes) or the one pass."""
    for stage in ("calibrate", "calibrate_and_fit"):
        monkeypatch.setattr(api, stage, lambda *a, **k: (_ for _ in ()).throw(error))


def test_ctrl_c_exits_130_with_one_line(work, capsys, monkeypatch):
    _fail_first_stage(monkeypatch, KeyboardInterrupt())
    assert_refused(work, capsys, work.args(work.root / "out"), 130, "interrupted")


def test_debug_shows_the_traceback(work, monkeypatch):
    _fail_first_stage(monkeypatch, RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        main(work.args(work.root / "out", "--debug"))
    assert leftovers(work.root) == []


def test_unexpected_errors_are_one_line_with_exit_1(work, capsys, monkeypatch):
    _fail_first_stage(monkeypatch, RuntimeError("boom"))
    assert_refused(work, capsys, work.args(work.root / "out"), 1, "RuntimeError: boom", "--debug")


_SIGNAL_CHILD = """
import os, signal, sys
sys.path.insert(0, {src!r})
import care_mla.pipeline.layerwise as layerwise
from care_mla.cli import main
real = layerwise.write_model
def write_then_signal(*a, **k):
    real(*a, **k)
    os.kill(os.getpid(), signal.{sig})
layerwise.write_model = write_then_signal
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("sig", ["SIGHUP", "SIGTERM"])
def test_hangup_and_kill_unwind_and_leave_nothing(work, sig):
    argv = work.args(work.root / "out", "--no-eval")
    before = work.digests()
    child = subprocess.run([sys.executable, "-c", _SIGNAL_CHILD.format(src=str(SRC), sig=sig, argv=argv)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 128 + getattr(signal, sig), child.stderr[-2000:]
    assert "Traceback" not in child.stderr
    assert not (work.root / "out").exists() and leftovers(work.root) == []
    assert work.digests() == before


# ----------------------------------------------------------------------------- caches that cannot lie


def _stats_files(work) -> list[Path]:
    return sorted((work.cache_dir / "calibration").glob("*.safetensors"))


def test_corrupt_statistics_cache_is_recomputed_with_a_warning(work, capsys, caplog):
    assert main(work.args(work.root / "a", "--no-eval")) == 0
    (stats,) = _stats_files(work)
    stats.write_bytes(stats.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert main(work.args(work.root / "b", "--no-eval")) == 0
    assert "ignoring the cached calibration statistics" in caplog.text
    a, b = (load_file(str(work.root / n / "model.safetensors")) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_replaced_model_with_same_size_and_mtime_is_calibrated_again(work, capsys, tmp_path_factory):
    assert main(work.args(work.root / "a", "--no-eval")) == 0
    f = work.model_dir / "model.safetensors"
    st = f.stat()
    state = load_file(str(f))
    name = "model.layers.0.input_layernorm.weight"
    state[name] = state[name] * 2  # same shapes, same file size, other statistics
    save_file(state, str(f), metadata={"format": "pt"})
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size == st.st_size
    assert main(work.args(work.root / "b", "--no-eval")) == 0
    fresh = tmp_path_factory.mktemp("fresh")
    args = work.args(work.root / "c", "--no-eval")
    args[args.index("--cache-dir") + 1] = str(fresh)
    assert main(args) == 0
    b, c = (load_file(str(work.root / n / "model.safetensors")) for n in ("b", "c"))
    assert all(torch.equal(b[k], c[k]) for k in b)  # the same as with no cache at all
    assert len(_stats_files(work)) == 2


def test_statistics_cache_of_other_inputs_is_not_used(work, tmp_path):
    assert main(work.args(work.root / "a", "--no-eval")) == 0
    (stats,) = _stats_files(work)
    loaded = calibration.CalibrationStats.load(stats)
    with pytest.raises(calibration.CalibrationCacheError, match="key does not match"):
        calibration.CalibrationStats.load(stats, key="something else")
    assert loaded.num_layers == 3


def test_corrupt_perplexity_memo_and_token_cache_are_recomputed(work, capsys):
    assert main(work.args(work.root / "a")) == 0
    for f in list((work.cache_dir / "ppl").glob("*.json")) + list((work.cache_dir / "tokens").glob("*")):
        f.write_text("{ damaged")
    assert main(work.args(work.root / "b")) == 0
    a, b = (json.loads((work.root / n / "report.json").read_text()) for n in ("a", "b"))
    assert a["ppl"] == b["ppl"]


def test_killed_calibration_resumes_from_the_layers_done(work, monkeypatch, caplog):
    """A conversion that dies in layer 2 leaves its progress; the next run starts at layer 2 and gives the
    statistics of an uninterrupted calibration, bit for bit (two passes; the one pass: test_single_pass)."""
    from care_mla.io.checkpoint import CheckpointReader

    monkeypatch.setattr(calibration, "RESUME_INTERVAL_S", 0.0)
    real_state = CheckpointReader.state
    reads: list[str] = []

    def dies_at_layer_2(self, prefix, dtype=None):
        reads.append(prefix)
        if prefix == "model.layers.2." and not any("resum" in r for r in reads):
            raise RuntimeError("killed")
        return real_state(self, prefix, dtype)

    monkeypatch.setattr(CheckpointReader, "state", dies_at_layer_2)
    assert main(work.args(work.root / "a", "--no-eval", "--two-pass")) == 1
    (partial,) = (work.cache_dir / "calibration").glob("*.partial.safetensors")
    reads.clear()
    reads.append("resumed")
    with caplog.at_level(logging.INFO):
        assert main(work.args(work.root / "a", "--no-eval", "--two-pass")) == 0
    assert "resuming the calibration after layer 2 of 3" in caplog.text
    assert "model.layers.0." not in reads[1:reads.index("model.layers.2.")]  # layers 0, 1 were not run again
    assert not partial.exists()
    (stats,) = _stats_files(work)
    resumed = calibration.CalibrationStats.load(stats)
    monkeypatch.setattr(CheckpointReader, "state", real_state)
    fresh = work.root / "fresh-cache"
    args = work.args(work.root / "b", "--no-eval", "--two-pass")
    args[args.index("--cache-dir") + 1] = str(fresh)
    assert main(args) == 0
    (other,) = sorted((fresh / "calibration").glob("*.safetensors"))
    full = calibration.CalibrationStats.load(other)
    assert all(torch.equal(x, y) for x, y in zip(resumed.second_moments, full.second_moments))


# ----------------------------------------------------------------------------- report


@pytest.mark.parametrize("content, needle", [
    ("{ not json", "is not valid JSON"),
    ('["a", "list"]', "is not a care-mla report"),
    ('{"layers": [1, 2]}', "is not a complete care-mla report"),
])
def test_malformed_report_files_are_one_line(work, capsys, content, needle):
    folder = work.root / "run"
    folder.mkdir()
    (folder / "report.json").write_text(content)
    assert_refused(work, capsys, ["report", str(folder), "--quiet"], 2, needle)
