"""The conversion, top-down: load → calibrate → choose → plan and factorize → write → evaluate → report.

`convert(settings)` is the Python API the CLI calls. Each stage is a function of its own module in this package,
called with what it needs and returning what the next stage needs; the maths lives in `care_mla.method`, the
formats in `care_mla.formats`. One path serves every model: a safetensors checkpoint is read one decoder layer at
a time, anything else is loaded whole and read through the same interface (`load.ModelSource`), and both write the
same bytes.
"""

from __future__ import annotations

import dataclasses
import logging

from transformers import AutoConfig

from care_mla.formats import engines
from care_mla.formats.families import gqa_kv_width
from care_mla.io import assets
from care_mla.io.outputs import OutputExistsError, OutputFolder  # noqa: F401  (OutputExistsError: API)
from care_mla.io.text import check_text_file, user_text
from care_mla.pipeline.build import stream_converted
from care_mla.pipeline.calibration import calibrate
from care_mla.pipeline.evaluate import EvaluationError, evaluate_saved  # noqa: F401  (EvaluationError: API)
from care_mla.pipeline.layerwise import write_model
from care_mla.pipeline.load import ModelLoadError, open_source, resolve_device, resolve_model_path, torch_dtype  # noqa: F401
from care_mla.pipeline.plan import format_layer_table
from care_mla.pipeline.reporting import StageTimer, peak_rss_mb, report_head, write_report
from care_mla.pipeline.selection import choose_settings_streamed
from care_mla.pipeline.single_pass import calibrate_and_fit, single_pass_applies, single_pass_stream
from care_mla.settings import ConvertSettings

logger = logging.getLogger(__name__)

SETTINGS_FILE = "care_mla_settings.json"


def convert(settings: ConvertSettings) -> dict:
    """Convert `settings.model` and write the converted model with its report to `settings.out`.

    Returns the report (also written as report.json). The input model is never modified; the output is checked
    against every input and for writability before any work, locked for the run, and written atomically
    (`io.outputs.OutputFolder`). The model is written before it is evaluated: an evaluation that fails keeps it,
    records the error in report.json and raises `EvaluationError`.
    """
    folder = output_folder(settings)
    folder.check()  # fail before any work
    check_inputs(settings)
    settings = resolve_engine(settings)
    device = resolve_device(settings.device)
    dtype = torch_dtype(settings.dtype, device)
    stage = StageTimer()
    with folder:
        with stage("load"):
            source = open_source(settings, device, dtype)
        converted = None
        if single_pass_applies(settings):  # statistics, choice per layer, factors and refit, layer by layer
            with stage("calibrate_choose_refit"):
                done = calibrate_and_fit(source, settings, dtype, device)
            stats, choice = done.stats, done.choice
            converted = single_pass_stream(source.config, source.reader, done, dtype)
        else:
            with stage("calibrate"):
                stats = calibrate(source.model, source.tokenizer, source.path, settings, reader=source.checkpoint)
            with stage("choose_settings"):  # what is "auto" in `settings`, by calibration loss
                settings, choice = choose_settings_streamed(source.config, source.reader, source.tokenizer, stats,
                                                            settings, dtype, device)
        with folder.staging() as tmp:
            with stage("factorize_and_save" if converted is None else "save"):
                if converted is None:  # two passes: factorized (and refitted) as it is written
                    converted = stream_converted(source, stats, settings, dtype, device)
                write_model(tmp, converted.model_class, converted.config, tensor=converted.tensor,
                            layer=converted.layer, dtype=dtype, generation_config=source.generation_config,
                            progress=settings.progress)
                source.tokenizer.save_pretrained(tmp)
                settings.save(tmp / SETTINGS_FILE)
            logger.info("per-layer ranks and relative activation errors:\n%s",
                        format_layer_table(converted.fields["layers"]))
            report = report_head(source.path, source.config, converted.config, converted.model_class.__name__,
                                 {**converted.fields, **choice}, stats, settings, dtype, device,
                                 loading=source.loading)
            report["peak_rss_mb_conversion"] = round(peak_rss_mb(), 1)
            write_report(report, stage, tmp, pending=settings.evaluate)
        if settings.evaluate:
            evaluate_saved(report, stage, folder, source, settings, dtype, device)
    return report


def output_folder(settings: ConvertSettings) -> OutputFolder:
    """The output of a conversion, checked against every input it reads (model, texts, cache)."""
    inputs = input_paths(settings.model, settings.calib_text, settings.eval_text, settings.cache_dir)
    return OutputFolder(settings.out, overwrite=settings.overwrite, inputs=inputs)


def input_paths(model: str, calib_text: str, eval_text: str, cache_dir: str | None) -> dict[str, str | None]:
    """What a conversion or sweep reads, by name, as paths (None: nothing on disk the user gave)."""
    model_path = str(assets.default_model_location()) if model == assets.DEFAULT_MODEL else model
    return {"input model": model_path, "calibration text": user_text(calib_text),
            "evaluation text": user_text(eval_text), "cache folder": cache_dir}


def check_inputs(settings: ConvertSettings) -> None:
    """What can be checked of the inputs before any work: texts readable, zero-shot tasks known, model present."""
    check_text_file(settings.calib_text, "calibration")
    if settings.evaluate:
        check_text_file(settings.eval_text, "evaluation")
    if settings.evaluate and settings.zero_shot_tasks:
        from care_mla.evaluation.zeroshot import check_tasks

        check_tasks(settings.zero_shot_tasks, settings.eval_text)  # a missing lm-eval or an unknown task: now
    if settings.model != assets.DEFAULT_MODEL:
        resolve_model_path(settings.model)


def resolve_engine(settings: ConvertSettings) -> ConvertSettings:
    """`settings` with an engine's geometry filled in (`kv_fraction`, `rope_dim`), or unchanged without one."""
    if settings.engine is None:
        return settings
    config = AutoConfig.from_pretrained(resolve_model_path(settings.model))
    kv_lora_rank, rope = engines.engine_geometry(config, settings.engine, settings.kv_fraction)
    parity = gqa_kv_width(config)
    resolved = dataclasses.replace(settings, kv_fraction=(kv_lora_rank + rope) / parity, rope_dim=rope)
    logger.info("engine %s: MLA cache %d + %d = %d numbers per token and layer, %.1f %% of the GQA cache (%d); "
                "nearest to the asked kv_fraction %g among %s", settings.engine, kv_lora_rank, rope,
                kv_lora_rank + rope, 100 * resolved.kv_fraction, parity, settings.kv_fraction,
                [r + p for r, p in engines.ENGINE_GEOMETRIES[settings.engine]])
    return resolved
