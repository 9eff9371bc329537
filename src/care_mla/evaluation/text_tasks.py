"""Two zero-shot tasks built offline from held-out text, as lm-eval task files.

So that accuracy can be measured on any text, two tasks are generated deterministically from
the evaluation text (the Austen evaluation novels by default, never the calibration ones):

* ``<prefix>_lastword`` — LAMBADA-style: predict the last word of a passage of ≥ 40 words.
  Only passages whose target word already occurs earlier in the passage are kept (as in most
  LAMBADA items), so the task rewards attending across the passage — what a compressed KV
  cache can lose. Metric ``acc``: the greedy continuation equals the word exactly
  (``output_type: loglikelihood``, ``is_greedy``).
* ``<prefix>_nextsent`` — the true next sentence of a short passage among 4 choices; the 3
  distractors are sentences of similar length from far away in the text (fixed seed).
  ``output_type: multiple_choice``; metrics ``acc``, ``acc_norm`` and ``acc_mutual_info``
  (chance 0.25; see `care_mla.evaluation.zeroshot.score_metric` for the one that enters averages).

``<prefix>`` is ``austen`` for the embedded text and ``text`` for any other file; the Austen
evaluation novels give 294 lastword and 1000 nextsent items. The builders are pure functions
of the text; :func:`prepare_tasks` writes their JSONL and the task YAML (``dataset_path: json``
on the local file) into the care-mla cache, in a folder named by the hash of its content.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from care_mla.io import assets

__all__ = [
    "OFFLINE_KINDS",
    "OfflineTasks",
    "ZeroShotError",
    "lastword_docs",
    "nextsent_docs",
    "offline_task_names",
    "prepare_tasks",
    "sentences_by_paragraph",
]

#: The offline task kinds; the lm-eval task name is ``<prefix>_<kind>``.
OFFLINE_KINDS = ("lastword", "nextsent")
#: Documents written per offline task (evaluation takes the first ``limit`` of them).
MAX_DOCS = 1000
#: Abbreviations after which a period does not end a sentence (Austen: "Mr. Elliot").
_ABBREVIATIONS = frozenset({"mr.", "mrs.", "dr.", "st.", "esq.", "col.", "capt.", "no.", "messrs.", "rev."})
# A sentence ends at . ! or ? (with closing quotes/brackets) followed by space and an opening
# quote or a capital letter.
_SENTENCE_END = re.compile(r"[.!?]+[\"'’”)\]]*(?=\s+[\"'‘“(\[]?[A-Z])")
#: Words too common to make a last-word target: the task is about recalling content words.
_FUNCTION_WORDS = frozenset(
    "the and was her she his had with for not you but all said that this which what were him they them their "
    "have has been would could should will shall must might may can did does are from into than then there "
    "when who whom whose very much more most such some any one own out too our your its it's".split()
)
_EDGE_PUNCTUATION = "\"'‘’“”()[]{}.,;:!?-_*"


class ZeroShotError(RuntimeError):
    """Zero-shot evaluation cannot run; the message names the fix."""


# ----------------------------------------------------------------------------- text → sentences


def sentences_by_paragraph(text: str) -> list[list[str]]:
    """Sentences of every paragraph (paragraphs are separated by blank lines; lines are unwrapped).

    Headings and other fragments without a lower-case letter are dropped.
    """
    out = []
    for block in re.split(r"\n\s*\n", text):
        para = " ".join(block.split())
        if not para:
            continue
        sentences, start = [], 0
        for m in _SENTENCE_END.finditer(para):
            if para[start : m.end()].split()[-1].lower() in _ABBREVIATIONS:
                continue
            sentences.append(para[start : m.end()].strip())
            start = m.end()
        sentences.append(para[start:].strip())
        sentences = [s for s in sentences if re.search(r"[a-z]", s)]
        if sentences:
            out.append(sentences)
    return out


def _words(sentence: str) -> int:
    return len(sentence.split())


def _bare(word: str) -> str:
    return word.strip(_EDGE_PUNCTUATION)


# ----------------------------------------------------------------------------- builders (pure)


def lastword_docs(
    text: str, *, seed: int = 1234, max_docs: int = MAX_DOCS, min_words: int = 40, max_words: int = 100
) -> list[dict]:
    """LAMBADA-style documents ``{"context", "target"}`` from `text`, deterministically.

    Passages are runs of whole consecutive sentences (across paragraphs, as in LAMBADA),
    ``min_words`` … ``max_words`` long, that do not overlap. The target is the passage's last
    word: letters only, at least 3 of them, not a function word, and already used earlier in
    the passage (case-insensitively). The context is everything before it, so the final
    punctuation is dropped. Documents come in a seeded random order, so the first ``limit``
    of them sample the whole text.
    """
    sentences = [s for p in sentences_by_paragraph(text) for s in p]
    docs, start = [], 0
    for end in range(len(sentences)):
        # the shortest run of ≥ min_words ending at `end` and starting at or after `start`
        first, count = end, _words(sentences[end])
        while count < min_words and first > start:
            first -= 1
            count += _words(sentences[first])
        if not min_words <= count <= max_words:
            continue
        words = " ".join(sentences[first : end + 1]).split()
        target, context = _bare(words[-1]), words[:-1]
        if not (target.isalpha() and len(target) >= 3 and target.lower() not in _FUNCTION_WORDS):
            continue
        if target.lower() not in {_bare(w).lower() for w in context}:
            continue
        docs.append({"context": " ".join(context), "target": target})
        start = end + 1
    return _shuffled(docs, seed, max_docs)


def nextsent_docs(
    text: str,
    *,
    seed: int = 1234,
    max_docs: int = MAX_DOCS,
    num_choices: int = 4,
    min_context_words: int = 20,
    max_context_words: int = 60,
    min_sentence_words: int = 5,
    max_sentence_words: int = 30,
) -> list[dict]:
    """Next-sentence documents ``{"context", "choices", "label"}`` from `text`, deterministically.

    The context is a run of whole sentences of one paragraph (``min_context_words`` …
    ``max_context_words``), the answer the sentence that follows it in the same paragraph.
    Distractors are other sentences within ±25 % of the answer's length in characters, so
    that length does not give the answer away (``acc`` and ``acc_norm`` then agree), drawn
    (seeded) from at least 200 sentences away, so that they do not continue the story by
    accident. Contexts do not overlap.
    """
    if num_choices < 2:
        raise ValueError(f"num_choices must be ≥ 2, got {num_choices}")
    paragraphs = sentences_by_paragraph(text)
    flat = [s for p in paragraphs for s in p]
    ok = [min_sentence_words <= _words(s) <= max_sentence_words for s in flat]
    # distractor candidates sorted by length, so those of about the answer's length are one slice
    by_length = sorted((i for i in range(len(flat)) if ok[i]), key=lambda i: (len(flat[i]), i))
    lengths = [len(flat[i]) for i in by_length]
    rng = random.Random(seed)
    docs, offset = [], 0
    for sentences in paragraphs:
        start = 0
        for answer in range(1, len(sentences)):
            if answer <= start or not ok[offset + answer]:
                continue
            first, count = answer - 1, _words(sentences[answer - 1])
            while count < min_context_words and first > start:
                first -= 1
                count += _words(sentences[first])
            if not min_context_words <= count <= max_context_words:
                continue
            position, true = offset + answer, sentences[answer]
            n = len(true)
            lo, hi = bisect.bisect_left(lengths, math.ceil(0.75 * n)), bisect.bisect_right(lengths, 1.25 * n)
            picked: list[str] = []
            for _ in range(50 * num_choices):  # rejection sampling; gives up on texts without enough candidates
                if len(picked) == num_choices - 1 or hi <= lo:
                    break
                i = by_length[rng.randrange(lo, hi)]
                if abs(i - position) >= 200 and flat[i] != true and flat[i] not in picked:
                    picked.append(flat[i])
            if len(picked) < num_choices - 1:
                continue
            choices = [true, *picked]
            rng.shuffle(choices)
            docs.append({"context": " ".join(sentences[first:answer]), "choices": choices, "label": choices.index(true)})
            start = answer + 1
        offset += len(sentences)
    return _shuffled(docs, seed, max_docs)


def _shuffled(docs: list[dict], seed: int, max_docs: int) -> list[dict]:
    random.Random(seed).shuffle(docs)
    return docs[:max_docs]


# ----------------------------------------------------------------------------- task files

_TASK_YAML = {
    "lastword": {
        "output_type": "loglikelihood",
        "doc_to_text": "{{context}}",
        "doc_to_target": "{{' ' + target}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    },
    "nextsent": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_mutual_info", "aggregation": "mean", "higher_is_better": True},
        ],
    },
}
_BUILDERS = {"lastword": lastword_docs, "nextsent": nextsent_docs}


def _text_path(text: str | Path) -> Path:
    from care_mla.io.text import resolve_text

    return resolve_text(str(text), "evaluation")


def _prefix(text: str | Path) -> str:
    return "austen" if str(text) == assets.DEFAULT_TEXT else "text"


def offline_task_names(text: str | Path = assets.DEFAULT_TEXT) -> list[str]:
    """lm-eval names of the offline tasks built from `text` (``austen_*`` for the embedded text)."""
    return [f"{_prefix(text)}_{kind}" for kind in OFFLINE_KINDS]




def _yaml(task: dict) -> str:
    # JSON scalars are valid YAML; one key per line keeps the file readable
    return "".join(f"{k}: {json.dumps(v, ensure_ascii=False)}\n" for k, v in task.items())


@dataclass(frozen=True)
class OfflineTasks:
    """The folder to give lm-eval's TaskManager as ``include_path``, and what it holds."""

    directory: Path
    names: tuple[str, ...]
    docs: dict  # task name → number of documents


def prepare_tasks(
    text: str | Path = assets.DEFAULT_TEXT, *, directory: Path | str | None = None, cache_dir: str | Path | None = None
) -> OfflineTasks:
    """Write the offline tasks of `text` (YAML + JSONL) and return where they are.

    `text` is "austen" (its evaluation novels) or a UTF-8 file. Without `directory` the files
    go to ``<care-mla cache>/tasks/<prefix>-<hash of the text and builders>/`` and are reused
    by later calls; the folder is built beside its target and renamed into place, so a killed
    or concurrent run never leaves a half-written task.
    """
    path = _text_path(text)
    body = path.read_text(encoding="utf-8")
    prefix = _prefix(text)
    docs = {f"{prefix}_{kind}": _BUILDERS[kind](body) for kind in OFFLINE_KINDS}
    for name, items in docs.items():
        if not items:
            raise ZeroShotError(f"{path} is too short to build the {name} task (no passage qualified); use a longer text")
    # building takes a fraction of a second; keying the folder by what was built means a
    # changed builder can never be served stale files
    jsonl = {name: "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in items) for name, items in docs.items()}
    if directory is None:
        digest = hashlib.sha256(json.dumps([_TASK_YAML, jsonl], sort_keys=True).encode()).hexdigest()[:16]
        directory = assets.resolve_cache_dir(cache_dir) / "tasks" / f"{prefix}-{digest}"
    directory = Path(directory).absolute()
    meta_file = directory / "tasks.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        return OfflineTasks(directory, tuple(meta["docs"]), meta["docs"])

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        counts = {}
        for kind in OFFLINE_KINDS:
            name = f"{prefix}_{kind}"
            (tmp / f"{name}.jsonl").write_text(jsonl[name], encoding="utf-8")
            # the YAML names the JSONL by its final absolute path (lm-eval's json loader needs one)
            task = {"task": name, "dataset_path": "json",
                    "dataset_kwargs": {"data_files": {"test": str(directory / f"{name}.jsonl")}},
                    "test_split": "test", **_TASK_YAML[kind], "metadata": {"version": 1}}
            (tmp / f"{name}.yaml").write_text(_yaml(task), encoding="utf-8")
            counts[name] = len(docs[name])
        (tmp / "tasks.json").write_text(json.dumps({"text": str(path), "docs": counts}, indent=2) + "\n")
        try:
            os.replace(tmp, directory)
        except OSError:
            if not meta_file.is_file():  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return OfflineTasks(directory, tuple(counts), counts)

