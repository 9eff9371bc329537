"""Safetensors checkpoints read one tensor at a time and written one shard at a time.

`CheckpointReader` opens a Hugging Face model folder (``model.safetensors`` or a sharded
``model.safetensors.index.json``) memory-mapped: a tensor costs memory only while the caller
holds it. `ShardWriter` takes tensors in order and flushes a shard to disk as soon as it
reaches ``max_shard_bytes``, so writing a model never holds more than one shard; the file
names and the index follow `save_pretrained` (``model.safetensors`` when one shard is enough,
else ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Default largest shard: small enough to keep writing memory modest, large enough for few files.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


class CheckpointFormatError(ValueError):
    """The folder holds no safetensors weights that can be read tensor by tensor; the message names the fix."""


class CheckpointReader:
    """Tensors of a safetensors model folder by name, each read from a memory-mapped file when asked for."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (folder / SINGLE_FILE).is_file():
            with safe_open(str(folder / SINGLE_FILE), "pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise CheckpointFormatError(
                f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}: layer-by-layer conversion reads safetensors "
                "(re-save the model with save_pretrained(safe_serialization=True), or pass --no-layerwise to load it whole)"
            )
        self.folder = folder
        self.weight_map: dict[str, str] = dict(weight_map)
        self._files = {name: safe_open(str(folder / name), "pt") for name in sorted(set(self.weight_map.values()))}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor `name` (cast to `dtype` when given), a fresh copy the caller owns."""
        if name not in self.weight_map:
            raise KeyError(f"{name} is not in the checkpoint at {self.folder}")
        t = self._files[self.weight_map[name]].get_tensor(name)
        return t if dtype is None or t.dtype == dtype else t.to(dtype)

    def state(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix` (e.g. ``model.layers.3.``), keyed by the rest of its name."""
        return {k[len(prefix):]: self.get(k, dtype) for k in self.weight_map if k.startswith(prefix)}


class ShardWriter:
    """Write tensors in the order given into safetensors shards of at most `max_shard_bytes` (one tensor may exceed it).

    Call `add` for every tensor, then `close` once: it names the shards and writes the index.
    Identical tensors in identical order give byte-identical files.
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        tmp = f"shard-{len(self._shards):05d}.tmp"
        save_file(self._pending, str(self.folder / tmp), metadata={"format": "pt"})
        self._shards.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Flush the last shard, give the shards their final names, write the index; returns the file names."""
        if self._pending or not self._shards:
            self._flush()
        n = len(self._shards)
        if n == 1:
            (self.folder / self._shards[0][0]).rename(self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        names, weight_map = [], {}
        for i, (tmp, keys) in enumerate(self._shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.folder / tmp).rename(self.folder / name)
            names.append(name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return names
