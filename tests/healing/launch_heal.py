"""`care_mla.healing.heal` as one process of a multi-process launch (test_heal_processes.py runs it).

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 launch_heal.py SETTINGS.json WATCHED [KILL_RANK KILL_STEP]

Runs `heal` on the settings of SETTINGS.json and prints, as lines on stdout (never a file):
``WRITE <rank> <what> <path>`` for every write under the WATCHED folder this process makes
(Python's audit events for open-for-writing, mkdir, rename, remove, rmtree, and the writers that
bypass Python's open: torch.save, safetensors and the save_pretrained of models and tokenizers),
``PROCESS <rank> <pid>`` first, then ``REPORT <rank> <json>`` with the report's curves and processes. With KILL_RANK and
KILL_STEP, that process kills itself (SIGKILL) when training reaches that step.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from pathlib import Path

import torch

RANK = int(os.environ.get("RANK", "0"))


def emit(line: str) -> None:
    """`line` on stdout in one write: two processes share the pipe, and a line under 4 KiB written at once is
    never cut by the other's (print writes the text and its newline separately)."""
    data = (line + "\n").encode()
    while data:
        data = data[os.write(1, data):]


def watch(root: Path) -> None:
    root = str(root.resolve())

    def report(what: str, path) -> None:
        try:
            path = os.path.realpath(os.fspath(path))
        except TypeError:  # a file object or descriptor
            return
        if path == root or path.startswith(root + os.sep):
            emit(f"WRITE {RANK} {what} {path}")

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args[0] is not None and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
                report("open", args[0])
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"):
            report(event, args[0])
        elif event == "os.rename":
            report(event, args[0])
            report(event, args[1])

    sys.addaudithook(hook)

    def recorded(owner, name: str):
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            for arg in (*args[1:], *kwargs.values()):  # the destination: a path among the arguments after the first
                if isinstance(arg, (str, os.PathLike)):
                    report(name, arg)
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    import safetensors.torch
    import transformers.modeling_utils
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    recorded(torch, "save")
    recorded(safetensors.torch, "save_file")
    recorded(transformers.modeling_utils, "safe_save_file")
    recorded(PreTrainedModel, "save_pretrained")
    recorded(PreTrainedTokenizerBase, "save_pretrained")


def main() -> None:
    settings_file, watched = Path(sys.argv[1]), Path(sys.argv[2])
    kill = (int(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 4 else None
    torch.set_num_threads(1)
    emit(f"PROCESS {RANK} {os.getpid()}")
    watch(watched)

    from transformers import TrainerCallback

    from care_mla.healing.heal import heal
    from care_mla.healing.settings import HealSettings

    class KillAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if kill and (args.process_index, state.global_step) == kill:
                emit(f"KILLED {RANK} at step {state.global_step}")
                os.kill(os.getpid(), signal.SIGKILL)

    report = heal(HealSettings.from_dict(json.loads(settings_file.read_text())), callbacks=[KillAt()])
    keys = ("loss_curve", "ce_curve", "eval_curve", "ppl", "steps", "resumed_from_step", "processes")
    import torch.distributed as dist

    for rank in range(dist.get_world_size()):  # one process at a time: a line over 4 KiB may be cut
        if rank == RANK:
            emit(f"REPORT {RANK} " + json.dumps({k: report[k] for k in keys}))
        dist.barrier()


if __name__ == "__main__":
    main()
