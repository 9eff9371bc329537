"""Safetensors checkpoints read and written one tensor at a time.

`CheckpointReader` opens a Hugging Face model folder (``model.safetensors`` or a sharded
``model.safetensors.index.json``) memory-mapped: a tensor costs memory only while the caller
holds it. `ShardWriter` cuts the shards from a plan of names, shapes and dtypes, then appends each
tensor to its shard file as it comes, so writing a model holds one tensor at a time; the file
names and the index follow `save_pretrained` (``model.safetensors`` when one shard is enough,
else ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from safetensors import safe_open

from care_mla.io.memory import trim_heap

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Default largest shard: small enough to keep writing memory modest, large enough for few files.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
#: Least seconds between two heap trims of a reader (`memory.trim_heap`, at a change of layer). A trim costs 10–25
#: ms; a layer of a calibration pass takes seconds, but the rank plan and the writing of the factors read a layer
#: every few tens of ms, where a trim per layer was a quarter of the sweep (the paper's CARE, SmolLM2: 93 trims,
#: 1.0 s) and there was little to give back.
TRIM_INTERVAL_S = 1.0


class CheckpointFormatError(ValueError):
    """The folder holds no safetensors weights that can be read tensor by tensor; the message names the fix."""


class CheckpointCorruptError(ValueError):
    """A weight file that is truncated, empty or not safetensors, or a tensor holding NaN/Inf; names the file."""


def check_safetensors_file(path: Path) -> None:
    """Refuse an empty, truncated or malformed safetensors file from its header alone (no tensor is read).

    The format is an 8-byte little-endian header length, a JSON header whose entries give each
    tensor's byte range, then the data: the file must be exactly as long as the last range ends.
    """
    fix = "re-download or re-save the model (save_pretrained)"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("the file is empty or shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                raise ValueError(f"its header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise CheckpointCorruptError(f"{path} is not a readable safetensors file ({err}); {fix}") from None
    if 8 + n + end != size:
        raise CheckpointCorruptError(f"{path} is truncated or damaged: its header needs {8 + n + end} bytes, the file "
                                     f"has {size}; {fix}")


def check_finite(name: str, tensor: torch.Tensor, where: str = "") -> None:
    """Refuse a floating-point weight holding NaN or Inf, naming it.

    A finite sum proves every entry finite (an Inf or NaN entry makes any sum Inf or NaN): one reduction, 8× faster
    than ``isfinite(t).all()`` (0.37 s for SmolLM2's 538 MB); a sum that overflowed is checked entry by entry."""
    if not tensor.is_floating_point() or math.isfinite(float(tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointCorruptError(f"weight {name} holds {bad} NaN/Inf value(s){where}; the model is damaged — "
                                     "re-download or re-export it")


_NOTHING_READ = object()


def _layer_of(name: str) -> str | None:
    """``"3"`` for ``model.layers.3.…``; None for a tensor outside the decoder layers."""
    parts = name.split(".")
    return parts[2] if name.startswith("model.layers.") and len(parts) > 2 else None


class CheckpointReader:
    """Tensors of a safetensors model folder by name, each read from its memory-mapped file when asked for.

    A file is mapped only for the duration of one `get` / `state` call, so the pages it touched
    leave this process's resident set with it (they stay in the page cache, which the kernel
    reclaims): reading a whole model layer by layer keeps the RSS at one layer.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise CheckpointCorruptError(f"{index} is not a valid safetensors index ({err}); re-save the model "
                                             "(save_pretrained)") from None
        elif (folder / SINGLE_FILE).is_file():
            check_safetensors_file(folder / SINGLE_FILE)
            with safe_open(str(folder / SINGLE_FILE), "pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise CheckpointFormatError(
                f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: layer-by-layer conversion reads safetensors "
                "(re-save the model with save_pretrained, or pass --no-layerwise to load it whole)"
            )
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            raise CheckpointCorruptError(f"{folder} lacks weight files its index names: {', '.join(missing)}; "
                                         "re-download or re-save the model")
        for file in sorted(set(weight_map.values())):
            check_safetensors_file(folder / file)
        self.folder = folder
        self.weight_map: dict[str, str] = dict(weight_map)
        self._last_layer: object = _NOTHING_READ
        self._trimmed = -math.inf  # time.monotonic() of the last trim
        self._finite: set[str] = set()  # names already checked: a conversion reads each tensor several times

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def _read(self, names: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        layer = _layer_of(names[0]) if names else None
        if layer != self._last_layer:  # what the last layer freed goes back to the system before the next is read
            if time.monotonic() - self._trimmed >= TRIM_INTERVAL_S:  # at most once a second (a layer is read ~5 times)
                trim_heap()
                self._trimmed = time.monotonic()
            self._last_layer = layer
        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"{name} is not in the checkpoint at {self.folder}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, keys in by_file.items():
            with safe_open(str(self.folder / file), "pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    if k not in self._finite:
                        check_finite(k, t, f" (in {self.folder / file})")
                        self._finite.add(k)
                    out[k] = t if dtype is None or t.dtype == dtype else t.to(dtype)
        return {n: out[n] for n in names}

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` (cast to `dtype` when given), a fresh copy the caller owns."""
        return self._read([name], dtype)[name]

    def state(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix` (e.g. ``model.layers.3.``), keyed by the rest of its name."""
        names = [k for k in self.weight_map if k.startswith(prefix)]
        return {k[len(prefix):]: v for k, v in self._read(names, dtype).items()}


#: safetensors dtype names.
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


class ShardWriter:
    """Write the tensors of `plan` (``(name, shape, dtype)`` in writing order) into safetensors shards.

    The shards are cut from the plan before anything is written (at most `max_shard_bytes` each;
    one tensor may exceed it), so every shard's header is known up front and each tensor goes to
    disk as soon as `add` receives it: writing holds one tensor, not a shard. Tensors must come
    in plan order. `close` gives the shards `save_pretrained`'s names and writes the index. The
    same plan and tensors give byte-identical files.
    """

    def __init__(self, folder: str | Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]],
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: dict[str, str] | None = None):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        names = [name for name, _, _ in plan]
        if len(set(names)) != len(names):
            raise ValueError("the plan names a tensor twice")
        self.folder = Path(folder)
        self._metadata = {"format": "pt", **(metadata or {})}
        self._shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            n = _nbytes(shape, dtype)
            if self._shards[-1] and size + n > max_shard_bytes:
                self._shards.append([])
                size = 0
            self._shards[-1].append((name, tuple(int(d) for d in shape), dtype))
            size += n
        self.total_bytes = sum(_nbytes(s, d) for _, s, d in plan)
        self._queue = [entry for shard in self._shards for entry in shard]
        self._shard_of = {entry[0]: i for i, shard in enumerate(self._shards) for entry in shard}
        self._next = 0
        self._file = None
        self._shard = -1

    def _tmp(self, i: int) -> Path:
        return self.folder / f"shard-{i:05d}.tmp"

    def _open_shard(self, i: int) -> None:
        header: dict = {"__metadata__": self._metadata}
        offset = 0
        for name, shape, dtype in self._shards[i]:
            if dtype not in _ST_DTYPES:
                raise TypeError(f"{name}: dtype {dtype} has no safetensors name")
            if offset % dtype.itemsize:
                raise ValueError(f"{name} would start unaligned in its shard (mixed dtypes); cast every tensor alike")
            n = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._file = open(self._tmp(i), "wb")
        self._file.write(len(blob).to_bytes(8, "little"))
        self._file.write(blob)
        self._shard = i

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"tensor {name} is not in the plan (or written twice)")
        want, shape, dtype = self._queue[self._next]
        if name != want:
            raise ValueError(f"expected tensor {want} next, got {name}")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, the plan says {shape} {dtype}")
        shard = self._shard_of[name]
        if shard != self._shard:
            if self._file is not None:
                self._file.close()
            self._open_shard(shard)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._file.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        self._next += 1

    def close(self) -> list[str]:
        """Check every planned tensor came, name the shards, write the index; returns the weight files."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._next != len(self._queue):
            raise ValueError(f"{len(self._queue) - self._next} planned tensors were never written, "
                             f"starting with {self._queue[self._next][0]}")
        if self._shard < 0:  # an empty plan: one empty shard
            self._open_shard(0)
            self._file.close()
        n = len(self._shards)
        if n == 1:
            self._tmp(0).rename(self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        names, weight_map = [], {}
        for i, entries in enumerate(self._shards):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            self._tmp(i).rename(self.folder / name)
            names.append(name)
            weight_map.update({e[0]: name for e in entries})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names
