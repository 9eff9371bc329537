"""Healing in several processes (``accelerate launch`` or ``torchrun``): what differs from one process.

Two layouts, chosen by the launcher (``care-mla heal`` has no flag for them):

- **Data parallel (DDP)**, the default of a multi-process launch: every process holds the whole
  student and the whole teacher (replicated), reads its own ``batch_size`` windows of each
  global batch and DDP averages the gradients. P processes with ``--batch-size b`` follow the
  run of one process with ``--batch-size P·b`` (the same windows, in the same order, the same
  steps); the curves differ by float rounding only (measured in docs/healing.md).
- **FSDP, version 2** (``--use_fsdp --fsdp_version 2``): the student's parameters, gradients
  and Adam state are sharded over the processes (each holds 1/P of them between layers), and
  the teacher, which only runs forward, is sharded the same way, one unit per decoder layer.
  Only the main process reads the weights; the others build both models on the meta device and
  receive their shards. The data split and the curve are DDP's. FSDP version 1 is refused: its
  wrapper hides the model from the callbacks.
- **DeepSpeed ZeRO stage 1 or 2** (``--use_deepspeed --zero_stage 2``; DeepSpeed is not a
  dependency): the optimizer state (and with stage 2 the gradients) partitioned, the weights
  and the teacher whole in each process. Tried once on the CPU with DeepSpeed 0.19.8 installed
  beside the environment. ZeRO-3 is refused: transformers loads the models partitioned, and
  heal evaluates them outside DeepSpeed's engine.

accelerate 1.15 turns FSDP on only for accelerators: under ``--use_fsdp`` on the CPU it runs
DDP, silently (every process held every parameter whole when tried). `enable_cpu_fsdp` switches
its state to FSDP there, which is what accelerate does itself on a GPU, so the CPU runs the
same accelerate and transformers code as a GPU cluster, on gloo.

Only the main process writes the output, its report and the work folder's settings, and saves
the model, optimizer and trainer state of each checkpoint; the Trainer has every process write
its own RNG state into a checkpoint (``rng_state_<rank>.pth``), and FSDP's sharded checkpoints
(and DeepSpeed's optimizer partitions) have each process write its shard. Every process measures the held-out perplexity on all the
evaluation windows (the same number on each; FSDP's forward needs them all to run it).
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from care_mla.settings import SettingsError

PROCESSES_FILE = "heal_processes.json"  # in the work folder: the layout a --resume must launch again
TRAINER_STATE = "trainer_state.json"  # the last file the Trainer writes into a checkpoint


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def sum_across_processes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every process (in place); itself with one process."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_objects(obj) -> list:
    """`obj` of every process, in rank order (every process must call it)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


# ----------------------------------------------------------------------------- layout


FSDP1_REFUSED = ("care-mla heal shards with FSDP version 2 only; launch with --fsdp_version 2 (or fsdp_version: 2 in "
                 "the accelerate config)")
ZERO3_REFUSED = ("care-mla heal does not run under DeepSpeed ZeRO-3 (transformers loads the models partitioned, and "
                 "heal evaluates them outside DeepSpeed's engine); shard with FSDP (--use_fsdp --fsdp_version 2), or "
                 "use ZeRO stage 1 or 2")


def check_launcher() -> None:
    """Refuse, before any model is loaded, the launches heal cannot run (from the launcher's environment)."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and os.environ.get("FSDP_VERSION") == "1":
        raise SettingsError(FSDP1_REFUSED)
    if (os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"):
        raise SettingsError(ZERO3_REFUSED)


def layout(accelerator) -> str:
    """'single', 'ddp', 'fsdp2' or 'deepspeed-zero1|2' (FSDP version 1 and ZeRO-3 are refused)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        if not accelerator.is_fsdp2:
            raise SettingsError(FSDP1_REFUSED)
        return "fsdp2"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3:
            raise SettingsError(ZERO3_REFUSED)
        return f"deepspeed-zero{stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def enable_cpu_fsdp(accelerator) -> bool:
    """Turn on the FSDP that ``--use_fsdp`` asked for when accelerate left it off on the CPU; True if it did.

    accelerate enables FSDP only for accelerator backends (``AcceleratorState``): on the CPU it
    keeps ``MULTI_CPU`` (DDP) and drops the plugin. This does what it does on a GPU: the plugin
    from the launcher's environment and the FSDP type, in both shared states.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads FSDP_* as the launcher set them
    if plugin.fsdp_version != 2:
        raise SettingsError(FSDP1_REFUSED)
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState() re-reads it
    return True


def decoder_layer_classes(model: nn.Module) -> list[str]:
    """The class names of `model`'s decoder layers: those of its ``_no_split_modules`` it holds."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return sorted({type(m).__name__ for m in model.modules()} & names)


def wrap_decoder_layers(plugin, model: nn.Module) -> bool:
    """Have FSDP2 shard the student in one unit per decoder layer unless the launch chose a wrapping; True if set.

    accelerate's default (``--fsdp_auto_wrap_policy NO_WRAP``) puts every decoder layer in the root
    unit: each step then gathers the whole student and its whole gradient in every process, and
    the peak memory is not lower than one process's (measured: 3.9 GB per process against 3.9 GB
    for one process, docs/healing.md). ``TRANSFORMER_BASED_WRAP`` without class names would take
    every name in ``_no_split_modules``, and care-mla's latent-cache model lists the layers of
    every family it converts: accelerate refuses the ones the model does not hold. Both get the
    classes the model holds; a size-based policy or explicit class names are left as launched.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    policy = plugin.auto_wrap_policy
    if policy is not None and not (policy is transformer_auto_wrap_policy and plugin.transformer_cls_names_to_wrap is None):
        return False
    plugin.auto_wrap_policy = transformer_auto_wrap_policy
    plugin.transformer_cls_names_to_wrap = decoder_layer_classes(model)
    return True


def fsdp_launch(processes: int) -> bool:
    """True when the launcher asked for FSDP version 2 over several processes (read before any model loads)."""
    return (processes > 1 and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and os.environ.get("FSDP_VERSION", "1") == "2")


def load_on_main(spec: str, dtype: torch.dtype):
    """(model, tokenizer, path) for sharding: the main process reads the weights on its CPU; the others build
    the same model with its parameters on the meta device (its buffers real, computed from the config), and
    receive their shards from the main process when it is sharded (`shard_teacher`, `shard_student`). So one
    process, not every one, holds a whole model, and no device ever holds one."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from care_mla.pipeline.load import load_model, resolve_model_path

    if dist.get_rank() == 0:
        return load_model(spec, dtype, torch.device("cpu"))
    path = resolve_model_path(spec)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(path), path


def from_main(compute):
    """`compute()` run on the main process (the one holding the weights) and its result sent to every process."""
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard_student(accelerator, model: nn.Module) -> nn.Module:
    """The student sharded as accelerate's preparation for training shards it (the launch's FSDP2 plugin: units,
    mixed precision), its weights sent from the main process (``cpu_ram_efficient_loading``), before the Trainer
    prepares it (which then keeps it as it is): the converted model is measured sharded, as the healed one is."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = True
    return fsdp2_prepare_model(accelerator, model)


def shard_teacher(teacher: nn.Module, accelerator) -> nn.Module:
    """The frozen teacher sharded over the processes: a FSDP2 unit per decoder layer, the input embeddings one,
    the final norm and the output embeddings one (with the input embeddings if tied), the root what is left.

    Every unit is gathered for its forward and freed after it (``reshard_after_forward``), so a
    process holds its shards plus one unit whole. accelerate's preparation of a trained model
    keeps the root and output units gathered after the forward, for the backward that follows;
    the teacher has none, so they would stay whole. The embeddings are units of their own because
    gathering a unit takes about twice its size for a moment (the gathered buffer and the
    parameters copied out of it): at a large vocabulary they are the largest tensors of the model.

    The weights are the main process's (`load_on_main`): the others' are on the meta device until the
    main process sends each its shards (`accelerator`'s broadcast).
    """
    from torch.distributed.fsdp import fully_shard

    from accelerate.utils.fsdp_utils import fsdp2_load_full_state_dict
    from accelerate.utils.modeling import get_non_persistent_buffers

    teacher.requires_grad_(False)
    full = teacher.state_dict()  # the main process's weights (meta elsewhere, unused)
    kept = {fqn: buf.clone() for fqn, buf in teacher.named_buffers()
            if fqn in get_non_persistent_buffers(teacher, recurse=True, fqns=True)}
    teacher.to(torch.device("meta"))
    layers = set(decoder_layer_classes(teacher))
    for module in list(teacher.modules())[1:]:
        if type(module).__name__ in layers:
            fully_shard(module, reshard_after_forward=True)
    inputs, outputs = teacher.get_input_embeddings(), teacher.get_output_embeddings()
    norm = getattr(teacher.get_decoder(), "norm", None) if hasattr(teacher, "get_decoder") else None
    tied = inputs is not None and outputs is not None and inputs.weight is outputs.weight
    if inputs is not None and not tied:
        fully_shard(inputs, reshard_after_forward=True)
    # the final norm with the head: the decoder is also run without the head (perplexity's split), and the
    # root's hooks (which would gather what it holds) run only around the whole model's forward
    tail = [m for m in (norm, *((inputs,) if tied else ()), outputs) if m is not None]
    if tail:
        fully_shard(tail, reshard_after_forward=True)
    fully_shard(teacher, reshard_after_forward=True)
    fsdp2_load_full_state_dict(accelerator, teacher, full)
    del full
    for fqn, buf in kept.items():  # not in the state dict: each process keeps its own (computed from the config)
        parent, _, name = fqn.rpartition(".")
        teacher.get_submodule(parent).register_buffer(name, buf.to(accelerator.device), persistent=False)
    _tie(teacher)  # loading a state dict unties the embeddings
    return teacher.eval()


def _tie(model: nn.Module) -> None:
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def full_state_dict(accelerator, model: nn.Module) -> dict:
    """The whole state dict of a sharded `model` on the main process's CPU ({} elsewhere); every process calls it."""
    return accelerator.get_state_dict(model)


# ----------------------------------------------------------------------------- checkpoints


def launch_record(processes: int) -> dict:
    """What a resumed run must launch again: the number of processes and whether FSDP shards them."""
    return {"processes": processes, "fsdp": os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"}


def check_launch(work: Path, launch: dict) -> None:
    """Record `launch` in the work folder, or refuse a resumed run launched otherwise (main process)."""
    path = work / PROCESSES_FILE
    if path.is_file():
        before = json.loads(path.read_text())
        if before != launch:
            raise SettingsError(
                f"--resume continues a run of {_describe(before)} in {work}; this one has {_describe(launch)}: launch "
                "it as before, or drop --resume and pass --overwrite to start over"
            )
        return
    path.write_text(json.dumps(launch) + "\n")


def _describe(launch: dict) -> str:
    n = launch["processes"]
    return f"{n} process{'es' if n > 1 else ''}{' with FSDP' if launch['fsdp'] else ''}"


def last_checkpoint(work: Path) -> str | None:
    """The newest complete checkpoint in `work` (its trainer state written, the main process's last file).

    A process killed while the checkpoint was written leaves one without it; the Trainer's
    `get_last_checkpoint` would choose that one and fail to resume.
    """
    steps = []
    for path in Path(work).glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name.rsplit("-", 1)[1]
        if suffix.isdigit() and (path / TRAINER_STATE).is_file():
            steps.append((int(suffix), path))
    return str(max(steps)[1]) if steps else None


# ----------------------------------------------------------------------------- memory


def local_bytes(tensors) -> int:
    """Bytes of `tensors` this process holds (a sharded DTensor counts its local shard)."""
    total = 0
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def whole_bytes(tensors) -> int:
    """Bytes of `tensors` whole (a sharded DTensor counts its global shape)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def rss_mb() -> float | None:
    """This process's resident memory now (Linux), MiB."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def fsdp_units(model: nn.Module | None) -> list[str]:
    """The names of `model`'s modules that are FSDP2 units ('' for the root), [] when it is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    return [] if model is None else [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]


def anon_rss_mb() -> float | None:
    """This process's resident anonymous memory now (Linux), MiB: without the pages of mapped files (a model's
    safetensors file stays mapped, and resident until the kernel needs the memory, while any tensor of it lives)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def mark_memory(stages: dict, stage: str) -> None:
    """Record in `stages` this process's memory at the end of `stage`, MiB: [resident, peak resident so far,
    resident anonymous]."""
    stages[stage] = [_round(rss_mb()), _round(peak_rss_mb()), _round(anon_rss_mb())]


class ProcessMemory(TrainerCallback):
    """Each process's memory at the end of training, gathered on every process (`per_process`).

    Per process: the student's parameter bytes it holds (its shards under FSDP), its Adam state,
    the teacher's parameter bytes, its resident memory then and at its peak, both at the end of each
    stage (`mark_memory`: start, load, evaluate_before, prepare, train: where the peak was reached), and the
    student's FSDP units.
    """

    def __init__(self, teacher: nn.Module | None, stages: dict | None = None):
        self.teacher = teacher
        self.stages = stages if stages is not None else {}  # stage → [RSS, peak RSS] at its end, MiB
        self.per_process: list[dict] = []
        self.units: list[str] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        mark_memory(self.stages, "prepare")  # the Trainer has wrapped (under FSDP: sharded) the student
        self.units = fsdp_units(model)

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        mark_memory(self.stages, "train")
        params = [p for p in model.parameters()]
        opt_state = [] if optimizer is None else [
            v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0
        ]
        mine = {
            "rank": args.process_index,
            "student_param_bytes": local_bytes(params),
            "optimizer_state_bytes": local_bytes(opt_state),
            "teacher_param_bytes": local_bytes(self.teacher.parameters()) if self.teacher is not None else 0,
            "rss_mb": _round(rss_mb()),
            "peak_rss_mb": _round(peak_rss_mb()),
            "rss_mb_by_stage": dict(self.stages),  # [RSS, peak so far, anonymous RSS] at the end of each stage
            "student_fsdp_units": self.units,
        }
        self.per_process = gather_objects(mine)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)
