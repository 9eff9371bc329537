"""Healing in several processes: two CPU processes (gloo) launched by accelerate, against one process.

Each launch runs `launch_heal.py`, which heals and prints every file write its process makes
under the run's folder. Two processes with ``batch_size`` 4 must follow one process with 8:
the same windows per step, so the same loss curve and weights up to float rounding (measured:
3e-7 relative on the curves, 1.2e-7 on the weights).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from care_mla.healing import distributed
from care_mla.healing import heal as healing
from care_mla.healing.settings import HealSettings
from care_mla.io.outputs import mark
from care_mla.pipeline import convert as api
from care_mla.settings import ConvertSettings, SettingsError

LAUNCHED = Path(__file__).with_name("launch_heal.py")
CURVE_RTOL = 1e-5  # relative, per point of the loss, cross-entropy and held-out curves
WEIGHT_ATOL = 1e-5
STEPS, SAVE_EVERY, KILL_STEP = 12, 4, 10

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def converted(tiny_model_dir, text_file, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("converted") / "model"
    api.convert(ConvertSettings(
        model=str(tiny_model_dir("llama")), out=str(folder), format="care_mla", kv_fraction=0.5,
        calib_text=str(text_file), calib_samples=8, calib_seq_len=32, evaluate=False,
        cache_dir=str(folder.parent / "cache"), progress=False,
    ))
    return folder


def settings(converted, teacher, text_file, run: Path, **kw) -> HealSettings:
    base = dict(
        converted=str(converted), teacher=str(teacher), out=str(run / "healed"), tokens=STEPS * 8 * 32, seq_len=32,
        batch_size=8, lr=3e-3, train_text=str(text_file), eval_text=str(text_file), eval_samples=8, eval_seq_len=32,
        eval_every=5, log_every=1, save_every=SAVE_EVERY, device="cpu", progress=False,
    )
    return HealSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def one_process(converted, tiny_model_dir, text_file, tmp_path_factory) -> tuple[dict, Path]:
    """(report, output) of the run in this process, with batch 8: what two processes of batch 4 must give."""
    run = tmp_path_factory.mktemp("one-process")
    report = healing.heal(settings(converted, tiny_model_dir("llama"), text_file, run))
    return report, run / "healed"


LAYOUTS = {"ddp": ["--multi_gpu"], "fsdp2": ["--use_fsdp", "--fsdp_version", "2"],
           "deepspeed-zero2": ["--use_deepspeed", "--zero_stage", "2"]}


def launch(s: HealSettings, watched: Path, *, layout: str = "ddp", kill: tuple[int, int] | None = None) -> dict:
    """Heal with `s` in two processes; {"returncode", "writes": {rank: [(what, path)]}, "reports": {rank: report}}."""
    config = watched.parent / f"{watched.name}-{len(list(watched.parent.glob('*.json')))}.json"
    config.write_text(json.dumps(s.to_dict()))
    command = [sys.executable, "-m", "accelerate.commands.launch", *LAYOUTS[layout], "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
               str(LAUNCHED), str(config), str(watched), *map(str, kill or ())]
    env = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, **env})
    result = {"returncode": done.returncode, "writes": {0: [], 1: []}, "reports": {}, "stderr": done.stderr}
    for line in done.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "WRITE":
            rank, what, path = rest.split(" ", 2)
            result["writes"][int(rank)].append((what, Path(path)))
        elif kind == "REPORT":
            rank, report = rest.split(" ", 1)
            result["reports"][int(rank)] = json.loads(report)
    return result


def assert_same_curves(got: dict, want: dict) -> None:
    for key in ("loss_curve", "ce_curve", "eval_curve"):
        assert [t for t, _ in got[key]] == [t for t, _ in want[key]], key  # the same tokens at every point
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in want[key]], rel=CURVE_RTOL), key
    assert got["ppl"]["after"] == pytest.approx(want["ppl"]["after"], rel=CURVE_RTOL)


def assert_same_weights(got: Path, want: Path) -> None:
    a, b = load_file(got / "model.safetensors"), load_file(want / "model.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= WEIGHT_ATOL, worst
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())


def writes_outside_checkpoints(writes: list, work: Path) -> list:
    return [(what, path) for what, path in writes if not path.is_relative_to(work) or
            not path.relative_to(work).parts[0].startswith("checkpoint-")]


def test_two_processes_follow_one_survive_a_kill_and_only_the_main_one_writes(
        converted, tiny_model_dir, text_file, tmp_path, one_process):
    reference, reference_out = one_process
    run = tmp_path / "run"
    s = settings(converted, tiny_model_dir("llama"), text_file, run, batch_size=4)  # x 2 processes = 8
    work = healing.work_dir(run / "healed")

    killed = launch(s, run, kill=(1, KILL_STEP))
    assert killed["returncode"] != 0 and not killed["reports"], killed["stderr"][-3000:]
    assert not (run / "healed").exists() and distributed.last_checkpoint(work) == str(work / "checkpoint-8")

    resumed = launch(HealSettings(**{**s.to_dict(), "resume": True}), run)
    assert resumed["returncode"] == 0, resumed["stderr"][-3000:]
    report = resumed["reports"][0]
    assert report["resumed_from_step"] == 8 and report["steps"] == STEPS
    assert_same_curves(report, reference)  # the killed run's points (from its checkpoint) and the resumed ones
    assert_same_weights(run / "healed", reference_out)
    assert report["processes"]["count"] == 2 and report["processes"]["layout"] == "ddp"
    assert report["processes"]["global_batch"] == 8 and report["processes"]["teacher"] == "whole in each process"
    whole = report["processes"]["student_param_bytes"]
    assert [p["student_param_bytes"] for p in report["processes"]["per_process"]] == [whole, whole]
    assert resumed["reports"][1]["processes"] == report["processes"]  # gathered on both
    assert not work.exists()

    for launched in (killed, resumed):
        rank1 = launched["writes"][1]
        # the other process writes only its RNG state into checkpoints (the Trainer's), and nothing else
        assert {(what, path.name) for what, path in rank1 if what == "save"} <= {
            ("save", "rng_state_1.pth")}
        assert any(path.name == "rng_state_1.pth" for _, path in rank1), rank1  # the watch saw that process
        assert writes_outside_checkpoints(rank1, work) == []
        assert all(what in ("os.mkdir", "save") for what, _ in rank1), rank1
    main_writes = killed["writes"][0] + resumed["writes"][0]
    for write in (("open", work / "heal_settings.json"), ("open", work / "checkpoint-8" / "trainer_state.json"),
                  ("os.rename", run / "healed")):  # the output, committed by renaming its staging folder
        assert write in main_writes, write


def test_fsdp_shards_student_and_teacher_over_two_processes(converted, tiny_model_dir, text_file, tmp_path,
                                                            one_process):
    reference, reference_out = one_process
    run = tmp_path / "run"
    s = settings(converted, tiny_model_dir("llama"), text_file, run, batch_size=4)
    done = launch(s, run, layout="fsdp2")
    assert done["returncode"] == 0, done["stderr"][-3000:]
    report = done["reports"][0]
    assert_same_curves(report, reference)
    assert_same_weights(run / "healed", reference_out)

    processes = report["processes"]
    assert (processes["count"], processes["layout"], processes["teacher"]) == (2, "fsdp2", "sharded")
    whole, ranks = processes["student_param_bytes"], processes["per_process"]
    teacher_whole = processes["teacher_param_bytes"]
    assert sum(p["student_param_bytes"] for p in ranks) == whole  # each parameter held once, over both
    assert sum(p["teacher_param_bytes"] for p in ranks) == teacher_whole
    layers = json.loads((converted / "config.json").read_text())["num_hidden_layers"]
    for p in ranks:
        assert p["student_param_bytes"] <= 0.55 * whole and p["teacher_param_bytes"] <= 0.55 * teacher_whole, p
        # one unit per decoder layer (accelerate's default NO_WRAP would gather the whole body at every step)
        assert {f"model.layers.{i}" for i in range(layers)} <= set(p["student_fsdp_units"]), p["student_fsdp_units"]
        assert list(p["rss_mb_by_stage"]) == ["start", "load", "evaluate_before", "prepare", "train"]
        assert p["optimizer_state_bytes"] == 2 * p["student_param_bytes"], p  # Adam's two moments, sharded too

    work = healing.work_dir(run / "healed")
    rank1 = done["writes"][1]
    assert any(path.name == "__1_0.distcp" for _, path in rank1)  # its shard of each sharded checkpoint
    assert writes_outside_checkpoints(rank1, work) == []
    assert not work.exists()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_zero2_partitions_the_optimizer_state(converted, tiny_model_dir, text_file, tmp_path, one_process):
    reference, reference_out = one_process
    run = tmp_path / "run"
    done = launch(settings(converted, tiny_model_dir("llama"), text_file, run, batch_size=4), run,
                  layout="deepspeed-zero2")
    assert done["returncode"] == 0, done["stderr"][-3000:]
    assert_same_curves(done["reports"][0], reference)
    assert_same_weights(run / "healed", reference_out)
    processes = done["reports"][0]["processes"]
    assert processes["layout"] == "deepspeed-zero2"
    for p in processes["per_process"]:  # whole weights, half of Adam's two moments each
        assert p["student_param_bytes"] == processes["student_param_bytes"] == p["optimizer_state_bytes"], p
    assert writes_outside_checkpoints(done["writes"][1], healing.work_dir(run / "healed")) == []


# ----------------------------------------------------------------------------- in this process


@pytest.mark.parametrize("env, message", [
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 2 only"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}, "ZeRO-3"),
])
def test_launches_heal_cannot_run_are_refused_before_loading(env, message, converted, tiny_model_dir, text_file,
                                                            tmp_path, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SettingsError, match=message):
        healing.heal(settings(converted, tiny_model_dir("llama"), text_file, tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing started


def test_fsdp_wraps_the_decoder_layers_the_model_holds_unless_the_launch_chose(converted):
    from types import SimpleNamespace

    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy, transformer_auto_wrap_policy
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted)
    assert len(model._no_split_modules) > 1  # the latent-cache model lists every family's layer class
    for policy, names in ((None, None), (transformer_auto_wrap_policy, None)):  # NO_WRAP; TRANSFORMER_BASED, no names
        plugin = SimpleNamespace(auto_wrap_policy=policy, transformer_cls_names_to_wrap=names)
        assert distributed.wrap_decoder_layers(plugin, model)
        assert plugin.auto_wrap_policy is transformer_auto_wrap_policy
        assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]  # only what the model holds
    for policy, names in ((size_based_auto_wrap_policy, None), (transformer_auto_wrap_policy, ["LlamaMLP"])):
        plugin = SimpleNamespace(auto_wrap_policy=policy, transformer_cls_names_to_wrap=names)
        assert not distributed.wrap_decoder_layers(plugin, model)
        assert (plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap) == (policy, names)


def test_last_checkpoint_skips_one_a_kill_left_half_written(tmp_path):
    assert distributed.last_checkpoint(tmp_path) is None
    for step, complete in ((4, True), (8, True), (12, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert distributed.last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-8")


def test_resume_refuses_another_launch(converted, tiny_model_dir, text_file, tmp_path):
    s = settings(converted, tiny_model_dir("llama"), text_file, tmp_path, resume=True)
    work = healing.work_dir(Path(s.out))
    work.mkdir()
    mark(work, "heal work folder")
    s.save(work / healing.HEAL_SETTINGS_FILE)
    (work / distributed.PROCESSES_FILE).write_text(json.dumps({"processes": 2, "fsdp": True}))
    with pytest.raises(SettingsError, match="continues a run of 2 processes with FSDP .* this one has 1 process: "):
        healing.heal(s)
    assert work.is_dir()  # its checkpoints are kept

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    distributed.check_launch(fresh, {"processes": 3, "fsdp": False})  # records
    distributed.check_launch(fresh, {"processes": 3, "fsdp": False})  # the same launch passes
    with pytest.raises(SettingsError, match="run of 3 processes in .*; this one has 2 processes with FSDP"):
        distributed.check_launch(fresh, {"processes": 2, "fsdp": True})
