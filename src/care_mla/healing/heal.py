"""Healing (CARE.md §4): a short fine-tune of a converted model back towards the original.

``heal(settings)`` trains a `care-mla convert` output (latent-cache ``care_mla`` or stock
``DeepseekV3ForCausalLM``) on ``CE + β·τ²·KL(teacher ‖ student)`` with the original model as
teacher (`distillation.kd_loss`), and saves it in the format it came in. The loop is
transformers' `Trainer` (only `compute_loss` is ours): mixed precision on CUDA, gradient
accumulation, checkpoints for ``--resume``, and several processes under ``accelerate launch``
or ``torchrun``, data parallel or FSDP-sharded (`care_mla.healing.distributed`).

Folders: checkpoints go to ``OUT.work`` (beside OUT, so they survive a kill); on success the
healed model, ``heal_settings.json``, ``heal_report.json`` and ``heal_curve.png`` are moved
into OUT in one rename and the work folder is removed. The input folders are only read.

Cost: with distillation every step runs the teacher forward once more (no backward), about a
third more compute, and the teacher's weights stay in memory; ``kd_top_k`` cuts the loss's
own (batch × seq_len × vocab) tensors on the teacher side. ``kd_weight = 0`` trains on CE
alone and frees the teacher after measuring its perplexity.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from care_mla.evaluation.perplexity import perplexity
from care_mla.healing import distributed, linear_norms
from care_mla.healing.distillation import kd_loss
from care_mla.healing.settings import HealSettings
from care_mla.io.outputs import (
    OutputError,
    OutputExistsError,
    OutputFolder,
    check_no_overlap,
    mark,
    owner,
    remove_owned,
)
from care_mla.io.text import (
    TextError,
    check_text_file,
    load_windows,
    resolve_text,
    token_windows,
    tokenize_file,
    user_text,
)
from care_mla.pipeline.load import ModelLoadError, load_model, load_pretrained, resolve_device, resolve_model_path
from care_mla.pipeline.reporting import peak_rss_mb
from care_mla.settings import SettingsError

logger = logging.getLogger(__name__)

HEAL_SETTINGS_FILE = "heal_settings.json"
HEAL_REPORT_FILE = "heal_report.json"
HEAL_PLOT_FILE = "heal_curve.png"
# config.model_type → `convert --format` (DeepSeek-V2: the export of a MoE model)
FORMATS = {"care_mla": "care_mla", "deepseek_v3": "deepseek", "deepseek_v2": "deepseek"}
WARMUP = 0.05  # fraction of the steps with a linear learning-rate warm-up (then cosine decay)


# ----------------------------------------------------------------------------- data


def training_windows(ids: torch.Tensor, num_windows: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """(`num_windows` windows of `seq_len` tokens from `ids`, passes over the text they take).

    Distinct windows spread evenly over the text when it holds enough (`data.token_windows`);
    otherwise every window of the text, repeated (epochs) up to `num_windows`.
    """
    available = ids.numel() // seq_len
    if available < 1:
        raise TextError(f"the training text has {ids.numel()} tokens, less than one window of {seq_len}; "
                        "use a longer text or a shorter --seq-len")
    if num_windows <= available:
        return token_windows(None, ids, num_windows, seq_len), 1
    epochs = -(-num_windows // available)
    chunks = ids[: available * seq_len].view(available, seq_len)
    return chunks.repeat(epochs, 1)[:num_windows].clone(), epochs


class WindowDataset(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor):
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.windows[i]}


# ----------------------------------------------------------------------------- trainer


class HealTrainer(Trainer):
    """`Trainer` whose loss is `kd_loss` against a frozen teacher (None: CE only).

    Under FSDP both are sharded when the Trainer is built, from the main process's weights; otherwise
    each process holds the teacher whole.
    """

    loss_is_scaled_for_ga = False  # a per-micro-batch mean: the Trainer divides by the accumulation steps

    def __init__(self, *args, teacher=None, kd_weight: float = 1.0, kd_temperature: float = 1.0,
                 kd_top_k: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout = distributed.layout(self.accelerator)
        if self.layout == "fsdp2":  # both read by the main process only (`distributed.load_on_main`): shard them now
            distributed.wrap_decoder_layers(self.accelerator.state.fsdp_plugin, self.model)
            self.model = self.model_wrapped = distributed.shard_student(self.accelerator, self.model)
            if teacher is not None:
                teacher = distributed.shard_teacher(teacher, self.accelerator)
        elif teacher is not None:
            teacher = teacher.to(self.args.device).eval()
        self.teacher = teacher
        self.kd = {"beta": kd_weight, "tau": kd_temperature, "top_k": kd_top_k}
        self._parts = torch.zeros(3, device=self.args.device)  # CE sum, KL sum, micro-batches since the last log

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if distributed.enable_cpu_fsdp(self.accelerator):
            self.is_fsdp_enabled = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        outputs = model(input_ids=ids, use_cache=False)
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = kd_loss(outputs.logits[:, :-1], teacher_logits, ids[:, 1:], **self.kd)
        self._parts += torch.stack([loss.ce.detach(), loss.kl.detach(), torch.ones((), device=loss.ce.device)])
        return (loss.total, outputs) if return_outputs else loss.total

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # the two terms of the loss over every process's micro-batches (each process logs)
            ce, kl, n = distributed.sum_across_processes(self._parts).tolist()
            if n > 0:
                logs["ce"] = ce / n
                if self.teacher is not None:
                    logs["kl"] = kl / n
            self._parts.zero_()
        super().log(logs, start_time)


class HeldOutEval(TrainerCallback):
    """Held-out perplexity (and the mean accuracy of a fixed slice of the zero-shot tasks, when `accuracy` is given)
    every `every` steps, kept in the trainer state (so checkpoints carry it)."""

    def __init__(self, windows: torch.Tensor, every: int, batch_size: int,
                 accuracy: Callable[[torch.nn.Module], float | None] | None = None):
        self.windows, self.every, self.batch_size, self.accuracy = windows, every, batch_size, accuracy
        self.seconds = 0.0
        self.start_step = self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start_step, self.start_tokens = state.global_step, state.num_input_tokens_seen

    def on_step_end(self, args, state, control, model=None, **kwargs):
        # the last step's perplexity is measured on the saved form of the model, after training
        if not self.every or state.global_step % self.every or state.global_step >= state.max_steps:
            return
        t = time.perf_counter()
        model.eval()
        entry = {"eval_ppl": perplexity(model, self.windows, batch_size=self.batch_size),
                 "num_input_tokens_seen": state.num_input_tokens_seen, "step": state.global_step}
        if self.accuracy is not None:
            entry["eval_accuracy"] = self.accuracy(model)
        model.train()
        state.log_history.append(entry)
        logger.info("step %d, %d tokens: held-out ppl %.4g%s", state.global_step, state.num_input_tokens_seen,
                    entry["eval_ppl"], f", slice accuracy {100 * entry['eval_accuracy']:.1f} %"
                    if entry.get("eval_accuracy") is not None else "")
        self.seconds += time.perf_counter() - t


class TokenProgress(ProgressCallback):
    """The Trainer's step bar, showing loss, tokens/s and the last held-out ppl instead of printing logs."""

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.t0, self.tokens0 = time.perf_counter(), state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or self.training_bar is None or "loss" not in logs:
            return
        rate = (state.num_input_tokens_seen - self.tokens0) / max(time.perf_counter() - self.t0, 1e-9)
        postfix = {"loss": f"{logs['loss']:.4g}", "tok/s": f"{rate:,.0f}"}
        ppl = [e["eval_ppl"] for e in state.log_history if "eval_ppl" in e]
        if ppl:
            postfix["ppl"] = f"{ppl[-1]:.4g}"
        self.training_bar.set_postfix(postfix, refresh=False)


def training_arguments(settings: HealSettings, work: Path) -> TrainingArguments:
    use_cpu = settings.device == "cpu" or not torch.cuda.is_available()
    autocast = not use_cpu and settings.dtype == "float32" and torch.cuda.is_bf16_supported()
    return TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        learning_rate=settings.lr,
        num_train_epochs=1,  # the windows already hold the asked tokens (and text epochs)
        lr_scheduler_type="cosine",
        warmup_steps=WARMUP,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=autocast,
        use_cpu=use_cpu,
        logging_steps=settings.log_every,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=settings.save_every,
        save_total_limit=1,
        include_num_input_tokens_seen="all",
        average_tokens_across_devices=False,
        ddp_find_unused_parameters=False,  # every trainable weight takes part in the forward
        remove_unused_columns=False,
        disable_tqdm=not settings.progress,
        report_to="none",
        seed=settings.seed,
        data_seed=settings.seed,
    )


# ----------------------------------------------------------------------------- inputs and outputs


def work_dir(out: Path) -> Path:
    """Where the checkpoints of a run writing `out` live until it succeeds."""
    return out.parent / f"{out.name}.work"


def output_folder(settings: HealSettings) -> OutputFolder:
    """The healed model's folder, checked against every input (and its work folder too)."""
    inputs = {"converted model": settings.converted, "teacher model": settings.teacher,
              "training text": user_text(settings.train_text), "evaluation text": user_text(settings.eval_text)}
    folder = OutputFolder(settings.out, overwrite=settings.overwrite, inputs=inputs, purpose="heal")
    folder.check()
    check_no_overlap(work_dir(Path(settings.out)), inputs, flag="--out's work folder")
    return folder


def _prepare_work(settings: HealSettings, work: Path, processes: int = 1) -> None:
    """Start, restart or continue the work folder of `settings.out` (main process only).

    A resumed run must have the settings and the launch (`processes`, FSDP or not) it began with.
    """
    launch = distributed.launch_record(processes)
    saved = work / HEAL_SETTINGS_FILE
    if work.exists() and owner(work) is None:
        raise OutputError(f"{work} exists and was not made by care-mla heal; care-mla keeps its checkpoints there: "
                          "move that folder away, or choose another --out")
    if work.exists() and settings.resume and saved.is_file():
        previous = HealSettings.from_dict(json.loads(saved.read_text()))
        changed = previous.differences(settings)
        if changed:
            raise SettingsError(
                f"--resume continues the run in {work}, which had other {', '.join(changed)}; "
                "rerun with its settings (see its heal_settings.json), or drop --resume and pass --overwrite to "
                "start over"
            )
        distributed.check_launch(work, launch)
        return
    if work.exists() and not settings.resume:
        if distributed.last_checkpoint(work) is not None and not settings.overwrite:
            raise OutputExistsError(
                f"{work} holds the checkpoints of an interrupted heal of {settings.out}; pass --resume to continue "
                "it, or --overwrite to start over"
            )
        remove_owned(work)  # nothing trained yet, or --overwrite
    if not work.exists() and settings.resume:
        logger.warning("nothing to resume in %s; starting from the converted model", work)
    work.mkdir(parents=True, exist_ok=True)
    mark(work, "heal work folder")
    settings.save(saved)
    distributed.check_launch(work, launch)


def converted_format(spec: str) -> tuple[str, str]:
    """(folder, `convert --format`) of a `care-mla convert` output; reads only its config."""
    path = resolve_model_path(spec)
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not read the config of {spec!r}: {str(err).splitlines()[0]}") from err
    if model_type not in FORMATS:
        raise ModelLoadError(
            f"{spec} holds a {model_type!r} model; heal takes a folder written by `care-mla convert` "
            f"(model_type {' or '.join(FORMATS)}); convert it first"
        )
    return path, FORMATS[model_type]


def plot_curves(report: dict, path: Path) -> None:
    """PNG of the training loss and the held-out perplexity against training tokens."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter

    curve = report.get("accuracy_curve")
    fig = Figure(figsize=(16 if curve else 11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, ppl_ax, *acc_ax = fig.subplots(1, 3 if curve else 2)
    for key, label in (("loss_curve", "training loss"), ("ce_curve", "its cross-entropy part")):
        if report[key] and (key == "loss_curve" or report["settings"]["kd_weight"] > 0):
            loss_ax.plot(*zip(*report[key]), label=label)
    loss_ax.set(xlabel="training tokens", ylabel="nats / token", title="training loss")
    loss_ax.legend()
    ppl = report["ppl"]
    ppl_ax.plot(*zip(*report["eval_curve"]), marker="o", label="converted, healing")
    ppl_ax.axhline(ppl["original"], linestyle="--", color="grey", label=f"original {ppl['original']:.4g}")
    ppl_ax.set(xlabel="training tokens", ylabel="perplexity", yscale="log",
               title=f"held-out perplexity: {ppl['before']:.4g} → {ppl['after']:.4g}")
    ppl_ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ppl_ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ppl_ax.legend()
    if curve:
        sliced = report["accuracy"]["slice"]
        tokens, scores = zip(*[(t, 100 * a) for t, a in curve if a is not None])
        acc_ax[0].plot(tokens, scores, marker="o", label="converted, healing")
        if sliced["original"] is not None:
            acc_ax[0].axhline(100 * sliced["original"], linestyle="--", color="grey",
                              label=f"original {100 * sliced['original']:.1f}")
            acc_ax[0].axhspan(100 * sliced["original"] - 1, 100 * sliced["original"], color="grey", alpha=0.15,
                              label="within 1 point")
        acc_ax[0].set(xlabel="training tokens", ylabel="mean accuracy, %",
                      title=f"zero-shot ({', '.join(report['accuracy']['tasks'])}; {sliced['limit']} documents/task)")
        acc_ax[0].legend()
    fig.savefig(path, dpi=110)


def accuracy_report(accuracy: dict, history: list[dict], tokens: int, settings: HealSettings) -> dict:
    """The report's zero-shot part: ``zero_shot`` (original, before, after, on `settings.zero_shot_limit` documents
    per task), ``accuracy`` (their mean accuracies, the gap closed, and on the slice scored during training the
    training tokens after which the mean came within 1 point of the original's) and ``accuracy_curve``
    ([tokens, the slice's mean accuracy]); empty without zero-shot tasks."""
    if "zero_shot" not in accuracy:
        return {}
    scores = {k: r["average_acc"] for k, r in accuracy["zero_shot"].items()}
    gap = None if None in scores.values() else scores["original"] - scores["before"]
    summary = {**scores, "tasks": list(settings.zero_shot_tasks), "limit": settings.zero_shot_limit,
               # rounded: the means are sums of fractions, equal ones differ by ~1e-16
               "gap_closed": round((scores["after"] - scores["before"]) / gap, 9) if gap is not None and gap > 1e-9 else None}
    from care_mla.evaluation.zeroshot import paired_difference

    runs = accuracy["zero_shot"]
    # on the same documents: healed − original, and what healing changed
    summary["paired"] = {"after_minus_original": paired_difference(runs["after"], runs["original"])["mean"],
                         "after_minus_before": paired_difference(runs["after"], runs["before"])["mean"]}
    out = {"zero_shot": accuracy["zero_shot"], "accuracy": summary}
    if "slice" in accuracy:
        sliced = accuracy["slice"]
        curve = [[0, sliced["before"]]] + [[e["num_input_tokens_seen"], e["eval_accuracy"]] for e in history
                                           if "eval_accuracy" in e] + [[tokens, sliced["after"]]]
        reached = [t for t, a in curve if a is not None and sliced["original"] is not None
                   and a >= sliced["original"] - 0.01]
        summary["slice"] = {"limit": settings.eval_zero_shot_limit, "original": sliced["original"],
                            "tokens_to_within_1_point": reached[0] if reached else None}
        out["accuracy_curve"] = curve
    return out


def _gap_closed(ppl: dict) -> float | None:
    gap = ppl["before"] - ppl["original"]
    return (ppl["before"] - ppl["after"]) / gap if gap > 0 else None


# ----------------------------------------------------------------------------- API


def heal(settings: HealSettings, *, callbacks: Sequence[TrainerCallback] = ()) -> dict:
    """Heal `settings.converted` towards `settings.teacher`; write it with its report to `settings.out`.

    Returns the report (also written as heal_report.json). `callbacks` are added to the
    `Trainer` (on top of the held-out evaluation and the progress bar).
    """
    t_start = time.perf_counter()
    out = Path(settings.out)
    folder = output_folder(settings)  # fail before any work
    check_text_file(settings.train_text, "training")
    check_text_file(settings.eval_text, "evaluation")
    resolve_device(settings.device)  # names the fix when CUDA is asked for and absent
    converted_path, fmt = converted_format(settings.converted)
    resolve_model_path(settings.teacher)
    distributed.check_launcher()
    work = work_dir(out)
    args = training_arguments(settings, work)
    main_process = args.process_index == 0
    if settings.zero_shot_tasks:  # a missing lm-eval or an unknown task is said before any model loads
        from care_mla.evaluation.zeroshot import check_tasks

        with args.main_process_first(desc="zero-shot tasks"):  # the first builds them, the others read them
            check_tasks(settings.zero_shot_tasks, settings.eval_text, cache_dir=settings.cache_dir)
    with folder if main_process else contextlib.nullcontext(), _quiet_unless(main_process):
        return _heal_locked(settings, args, folder, work, converted_path, fmt, callbacks, t_start)


@contextlib.contextmanager
def _quiet_unless(main_process: bool):
    """care-mla's progress messages from the main process only (warnings from every process)."""
    package = logging.getLogger("care_mla")
    level = package.level
    if not main_process:
        package.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        package.setLevel(level)


def _heal_locked(settings: HealSettings, args: TrainingArguments, folder: OutputFolder, work: Path,
                 converted_path: str, fmt: str, callbacks, t_start: float) -> dict:
    with args.main_process_first(desc="work folder"):
        if args.process_index == 0:
            _prepare_work(settings, work, args.world_size)
    try:
        healed, tokenizer, report, timings = _heal(settings, args, converted_path, fmt, callbacks)
    except BaseException:
        if args.process_index == 0:
            if not work.is_dir() or distributed.last_checkpoint(work) is None:
                remove_owned(work)  # nothing to resume
            else:
                logger.warning("healing stopped; its checkpoints are in %s: rerun with --resume to continue", work)
        raise
    report["wall_time_s"] = round(time.perf_counter() - t_start, 3)
    if args.process_index == 0:
        t = time.perf_counter()
        with folder.staging() as tmp:  # the whole model: under FSDP the main process gathered it
            healed.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            settings.save(tmp / HEAL_SETTINGS_FILE)
            plot_curves(report, tmp / HEAL_PLOT_FILE)
            timings["save"] = time.perf_counter() - t
            report["wall_time_s"] = round(time.perf_counter() - t_start, 3)
            report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
            report["peak_rss_mb"] = round(peak_rss_mb(), 1)
            (tmp / HEAL_REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
        remove_owned(work)
    return report


def _heal(settings: HealSettings, args: TrainingArguments, converted_path: str, fmt: str,
          callbacks: Sequence[TrainerCallback]):
    """(healed model, tokenizer, report, timings): load, measure, train, export, measure."""
    timings: dict[str, float] = {}
    device, dtype = args.device, getattr(torch, settings.dtype)
    checkpoint = distributed.last_checkpoint(Path(args.output_dir)) if settings.resume else None

    stages: dict = {}
    distributed.mark_memory(stages, "start")  # the interpreter and its libraries, before any model
    sharded = distributed.fsdp_launch(args.world_size)  # then only the main process reads the weights
    t = time.perf_counter()
    if sharded:
        student, tokenizer, converted_path = distributed.load_on_main(converted_path, dtype)
        teacher, _, teacher_path = distributed.load_on_main(settings.teacher, dtype)
    else:
        student, tokenizer, converted_path = load_model(converted_path, dtype, device)
        teacher, _, teacher_path = load_model(settings.teacher, dtype, device)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise SettingsError(
            f"the teacher's vocabulary ({teacher.config.vocab_size}) is not the converted model's "
            f"({student.config.vocab_size}); pass the model it was converted from as --teacher"
        )
    if settings.kd_top_k is not None and settings.kd_top_k > student.config.vocab_size:
        raise SettingsError(f"kd_top_k {settings.kd_top_k} exceeds the vocabulary ({student.config.vocab_size})")
    train_path = resolve_text(settings.train_text, "calibration")
    windows, epochs = training_windows(tokenize_file(tokenizer, train_path), settings.num_windows, settings.seq_len)
    eval_windows, eval_path = load_windows(tokenizer, settings.eval_text, "evaluation", settings.eval_samples,
                                           settings.eval_seq_len)
    if train_path.resolve() == eval_path.resolve():
        logger.warning("training on the evaluation text %s: its perplexity is not held out", eval_path)
    if epochs > 1:
        logger.info("the training text holds %d windows of %d tokens: %d passes over it",
                    windows.shape[0] // epochs, settings.seq_len, epochs)
    timings["load"] = time.perf_counter() - t
    distributed.mark_memory(stages, "load")

    def held_out_ppl(model) -> float:
        return perplexity(model, eval_windows, batch_size=settings.batch_size, progress=settings.progress)

    def zero_shot(model, limit: int | None) -> dict:
        from care_mla.evaluation.zeroshot import evaluate_zero_shot

        return evaluate_zero_shot(model, tokenizer, settings.zero_shot_tasks, text=settings.eval_text, limit=limit,
                                  batch_size=settings.batch_size, cache_dir=settings.cache_dir)

    def slice_accuracy(model) -> float | None:
        return zero_shot(model, settings.eval_zero_shot_limit)["average_acc"]

    scored = bool(settings.zero_shot_tasks)
    tracked = scored and settings.eval_zero_shot_limit > 0
    ppl: dict = {}
    accuracy: dict = {}

    def evaluate_before(original, converted) -> None:
        t = time.perf_counter()
        ppl.update(original=held_out_ppl(original), before=held_out_ppl(converted))
        logger.info("held-out ppl: original %.4g, converted %.4g", ppl["original"], ppl["before"])
        if scored:
            accuracy["zero_shot"] = {"original": zero_shot(original, settings.zero_shot_limit),
                                     "before": zero_shot(converted, settings.zero_shot_limit)}
        if tracked:
            accuracy["slice"] = {"original": slice_accuracy(original), "before": slice_accuracy(converted)}
        timings["evaluate_before"] = time.perf_counter() - t
        distributed.mark_memory(stages, "evaluate_before")

    if not sharded:  # sharded, they are measured once the Trainer has sharded them (the same functions)
        evaluate_before(teacher, student)
        if settings.kd_weight == 0:
            teacher = None

    # the main process finds the export's linear latent norms (the others hold no weights yet)
    norms = distributed.from_main(lambda: linear_norms.find_linear_norms(student)) if sharded else \
        linear_norms.find_linear_norms(student)
    linear_norms.fold(student, norms)
    frozen = set(linear_norms.frozen_norm_weights(student))
    for name, param in student.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    model = _with_lora(student, settings.lora_rank, settings.seed) if settings.lora else student
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    architecture, student_bytes = type(student).__name__, distributed.whole_bytes(model.parameters())
    teacher_bytes = distributed.whole_bytes(teacher.parameters()) if teacher is not None and settings.kd_weight else 0

    held_out = HeldOutEval(eval_windows, settings.eval_every, settings.batch_size,
                           slice_accuracy if tracked else None)
    trainer = HealTrainer(
        model=model, args=args, train_dataset=WindowDataset(windows), data_collator=default_data_collator,
        callbacks=[held_out, *callbacks], teacher=teacher, kd_weight=settings.kd_weight,
        kd_temperature=settings.kd_temperature, kd_top_k=settings.kd_top_k,
    )
    if sharded:
        evaluate_before(trainer.teacher, trainer.model)
        if settings.kd_weight == 0:
            trainer.teacher = teacher = None
    memory = distributed.ProcessMemory(trainer.teacher, stages)
    trainer.add_callback(memory)
    trainer.remove_callback(PrinterCallback)
    if settings.progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(TokenProgress())
    t = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    timings["train"] = time.perf_counter() - t
    state, layout = trainer.state, trainer.layout
    teacher_held = "none" if trainer.teacher is None else "sharded" if layout == "fsdp2" else "whole in each process"

    t = time.perf_counter()
    if layout == "fsdp2":  # every process measures the sharded model, then the main one gathers it whole
        measured = model.eval()
        ppl["after"] = held_out_ppl(measured)
    else:
        del trainer, teacher
        measured = healed = _export_form(model, norms, settings.lora)
        ppl["after"] = held_out_ppl(healed)
    if scored:
        accuracy["zero_shot"]["after"] = zero_shot(measured, settings.zero_shot_limit)
    if tracked:
        accuracy["slice"]["after"] = slice_accuracy(measured)
    if layout == "fsdp2":
        whole = distributed.full_state_dict(trainer.accelerator, model)
        del trainer, teacher, model, measured
        healed = _export_form(_reload(converted_path, dtype, norms, settings, whole), norms, settings.lora) \
            if args.process_index == 0 else None
    ppl["gap_closed"] = _gap_closed(ppl)
    timings["evaluate_after"] = time.perf_counter() - t
    logger.info("healed: held-out ppl %.4g → %.4g (original %.4g)", ppl["before"], ppl["after"], ppl["original"])

    history = state.log_history
    session_tokens = state.num_input_tokens_seen - held_out.start_tokens
    report = {
        "converted": converted_path,
        "teacher": teacher_path,
        "format": fmt,
        "architecture": architecture,
        "mode": "lora" if settings.lora else "full",
        "ppl": ppl,
        "tokens_seen": state.num_input_tokens_seen,
        "steps": state.global_step,
        "resumed_from_step": held_out.start_step if checkpoint else None,
        "wall_time_s": None,
        "tokens_per_s": session_tokens / max(timings["train"] - held_out.seconds, 1e-9),
        "loss_curve": [[e["num_input_tokens_seen"], e["loss"]] for e in history if "loss" in e],
        "ce_curve": [[e["num_input_tokens_seen"], e["ce"]] for e in history if "ce" in e],
        "eval_curve": [[0, ppl["before"]]]
        + [[e["num_input_tokens_seen"], e["eval_ppl"]] for e in history if "eval_ppl" in e]
        + [[state.num_input_tokens_seen, ppl["after"]]],
        **accuracy_report(accuracy, history, state.num_input_tokens_seen, settings),
        "training": {"text": str(train_path), "windows": windows.shape[0], "seq_len": settings.seq_len,
                     "text_epochs": epochs, "trainable_parameters": trainable, "linear_norms_folded": len(norms),
                     "bf16_autocast": args.bf16},
        "evaluation": {"text": str(eval_path), "samples": settings.eval_samples, "seq_len": settings.eval_seq_len},
        "settings": settings.to_dict(),
        "dtype": settings.dtype,
        "device": str(device),
        "processes": {
            "count": args.world_size,
            "layout": layout,
            "teacher": teacher_held,
            "global_batch": settings.batch_size * settings.grad_accum * args.world_size,
            "student_param_bytes": student_bytes,  # whole; per_process: what each process holds
            "teacher_param_bytes": teacher_bytes,
            "per_process": memory.per_process,
        },
    }
    return healed, tokenizer, report, timings


def _export_form(model, norms: list, lora: bool):
    """The trained model as it is saved: LoRA merged, the DeepSeek latent norms unfolded."""
    healed = model.merge_and_unload() if lora else model
    linear_norms.unfold(healed, norms)
    return healed.eval()


def _reload(converted_path: str, dtype: torch.dtype, norms: list, settings: HealSettings, state: dict):
    """A whole copy of the trained model on the CPU: the converted model in its training form, given `state`."""
    student = load_pretrained(converted_path, dtype, torch.device("cpu"), None)
    linear_norms.fold(student, norms)
    model = _with_lora(student, settings.lora_rank, settings.seed) if settings.lora else student
    model.load_state_dict(state)
    return model


def _with_lora(model, rank: int, seed: int):
    """`model` wrapped with LoRA adapters of `rank` on every linear layer but the LM head."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    set_seed(seed)  # the adapters' random initialisation, so a run is reproducible
    return get_peft_model(model, config)
