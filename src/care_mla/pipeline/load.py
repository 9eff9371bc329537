"""Stage 1, load: the model's files resolved and opened (a checkpoint reader, or the whole model in memory), the
device and the dtypes chosen ("auto": measured on this machine, `care_mla.io.hardware`). The files are only read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from care_mla.formats.families import get_family, head_dim
from care_mla.io import assets
from care_mla.io.checkpoint import CheckpointFormatError, CheckpointReader, check_finite
from care_mla.settings import ConvertSettings, SettingsError

logger = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message names the fix."""


def resolve_model_path(spec: str) -> str:
    """The embedded default model's folder, a local folder, or a hub id (left to transformers)."""
    if spec == assets.DEFAULT_MODEL:
        return str(assets.default_model_dir())
    path = Path(spec).expanduser()
    looks_like_path = spec.startswith(("/", ".", "~")) or spec.count("/") != 1
    if path.exists() or looks_like_path:
        if not path.is_dir():
            raise ModelLoadError(f"model folder not found: {spec} (give a Hugging Face model folder or a hub id)")
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{spec} is not a Hugging Face model folder (no config.json)")
        return str(path)
    return spec


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """A dtype name as torch's; "auto" is the fastest numerically safe dtype of `device` for evaluation (measured
    on CPUs, `hardware.resolve_auto_dtype`; bf16 on CUDA where supported, else fp16)."""
    if name == "auto":
        return auto_dtype(device, "evaluation")[0]
    return getattr(torch, name)


def auto_dtype(device: torch.device, step: str, config=None, *, tokens: int = 512,
               cache_dir: str | None = None) -> tuple[torch.dtype, dict]:
    """(dtype, what it was chosen from) for the forward passes of `step` on `device`: a GEMM probe at the shapes
    of `config`'s decoder layer (default shapes without one), cached per machine and torch version."""
    from care_mla.io import hardware

    shapes = hardware.DEFAULT_SHAPES
    if config is not None:
        kv = config.num_key_value_heads * head_dim(config)
        shapes = hardware.gemm_shapes(config.hidden_size, kv, config.intermediate_size, tokens=min(512, tokens))
    return hardware.resolve_auto_dtype(device, shapes=shapes, cache_dir=assets.resolve_cache_dir(cache_dir),
                                       step=step)


def calib_dtype(settings: ConvertSettings, config, device: torch.device,
                model_dtype: torch.dtype) -> tuple[torch.dtype, dict | None]:
    """The dtype of the calibration forward passes, and the hardware facts behind an "auto" choice."""
    if settings.calib_dtype == "same":
        return model_dtype, None
    if settings.calib_dtype == "auto":
        return auto_dtype(device, "calibration", config, tokens=settings.batch_size * settings.calib_seq_len,
                          cache_dir=settings.cache_dir)
    return getattr(torch, settings.calib_dtype), None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SettingsError("--device cuda was asked for but torch sees no CUDA device (use --device cpu)")
    return torch.device(name)


def load_model(spec: str, dtype: torch.dtype, device: torch.device,
               max_memory: dict[int | str, int] | None = None):
    """(model, tokenizer, resolved path) on `device`, or spread by accelerate (``device_map="auto"``) over the
    devices of `max_memory`. The files on disk are only read."""
    path = resolve_model_path(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_pretrained(path, dtype, device, max_memory)
    except OSError as err:
        raise ModelLoadError(
            f"could not load model {spec!r}: {str(err).splitlines()[0]} — pass a local model folder "
            f"(or {assets.DEFAULT_MODEL!r}); hub ids need network access or a populated HF cache"
        ) from err
    return model, tokenizer, path


def load_pretrained(path, dtype: torch.dtype, device: torch.device, max_memory: dict | None):
    if max_memory:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def check_finite_weights(named_tensors) -> None:
    """Refuse a loaded model holding NaN/Inf weights, naming the first such tensor."""
    for name, tensor in named_tensors:
        check_finite(name, tensor.detach())


def checkpoint_reader(spec: str) -> CheckpointReader | None:
    """A reader of the model's safetensors folder, or None (logged) when it must be loaded whole."""
    path = Path(resolve_model_path(spec))
    if not path.is_dir():
        logger.info("%s is not a local folder: loading it whole (layer by layer needs its safetensors files)", spec)
        return None
    try:
        return CheckpointReader(path)
    except CheckpointFormatError as err:
        logger.warning("loading the whole model: %s", err)
        return None


def read_generation_config(model_path: str) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(model_path)
    except OSError:
        return None


class ModuleReader:
    """The tensors of a model already in memory, read as `CheckpointReader` reads a checkpoint: by name or one
    decoder layer at a time, as copies on the CPU in the asked dtype (the model itself is never modified)."""

    def __init__(self, model: torch.nn.Module):
        self._tensors = dict(model.state_dict())

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        tensor = self._tensors[name].detach()
        return tensor.to("cpu", dtype or tensor.dtype, copy=True)

    def state(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: self.get(k, dtype) for k in self._tensors if k.startswith(prefix)}


@dataclass
class ModelSource:
    """The model to convert, as the later stages read it: its folder, config and tokenizer, and its tensors through
    `reader` — the checkpoint itself (``checkpoint``, one decoder layer in memory at a time) or the whole model
    loaded in memory (``model``, for `.bin` checkpoints, hub ids and ``--no-layerwise``)."""

    path: str
    config: object
    tokenizer: object
    reader: CheckpointReader | ModuleReader
    generation_config: GenerationConfig | None = None
    checkpoint: CheckpointReader | None = None
    model: torch.nn.Module | None = None

    @property
    def loading(self) -> str:
        return "whole" if self.model is not None else "layerwise"


def open_source(settings: ConvertSettings, device: torch.device, dtype: torch.dtype) -> ModelSource:
    """Stage 1: the model of `settings` opened for conversion. A safetensors folder is read layer by layer unless
    ``settings.layerwise`` is False; anything else is loaded whole on `device` in `dtype` (checked finite)."""
    checkpoint = checkpoint_reader(settings.model) if settings.layerwise else None
    if checkpoint is None:
        model, tokenizer, path = load_model(settings.model, dtype, device, settings.max_memory_map)
        get_family(model.config)
        check_finite_weights(model.named_parameters())
        return ModelSource(path, model.config, tokenizer, ModuleReader(model), model.generation_config, model=model)
    path = str(checkpoint.folder)
    try:
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"could not load model {settings.model!r}: {str(err).splitlines()[0]}") from err
    get_family(config)
    return ModelSource(path, config, tokenizer, checkpoint, read_generation_config(path), checkpoint=checkpoint)
