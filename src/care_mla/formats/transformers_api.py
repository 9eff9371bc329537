"""The parts of transformers' API that differ between the versions care-mla supports (pyproject's range).

The KV cache: transformers renamed the cache argument of every model, decoder layer and attention forward,
and the field of their outputs, from ``past_key_values`` to ``cache`` (in 5.24; the old name is a
deprecated alias until 5.40/6.0). A custom attention module that reads only one of the two
names silently runs *without a cache* under the other: decode then recomputes nothing and
the cache stays empty. Everything in care-mla that passes, receives or reads a cache goes
through these helpers, which look at the installed version's own signatures (no version
parsing), so both conventions work.

Attention kernels: `attention_interface` looks a kernel up in `ALL_ATTENTION_FUNCTIONS`, whose
`get_interface` method exists only in newer 5.x releases.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Mapping

from transformers.cache_utils import Cache

#: Names a cache may arrive under, newest first.
CACHE_NAMES = ("cache", "past_key_values")


def attention_interface(implementation: str | None, eager: Callable) -> Callable:
    """The attention kernel registered for `implementation` (``config._attn_implementation``), `eager` for "eager"."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)
    if implementation in (None, "eager"):
        return eager
    return ALL_ATTENTION_FUNCTIONS[implementation]


@functools.cache
def model_cache_kwarg() -> str:
    """The keyword under which the installed transformers' decoder models take the cache."""
    from transformers.models.llama.modeling_llama import LlamaModel

    params = inspect.signature(LlamaModel.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@functools.cache
def output_cache_field() -> str:
    """The field of `CausalLMOutputWithPast` (and friends) that holds the returned cache."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


def pick_cache(cache: Cache | None, kwargs: dict) -> Cache | None:
    """The cache handed to a forward under either name (removed from `kwargs`, so it is not passed on twice)."""
    for name in CACHE_NAMES:
        value = kwargs.pop(name, None)
        if cache is None:
            cache = value
    return cache


def cache_kwargs(cache: Cache | None) -> dict:
    """``{name: cache}`` for calling the installed transformers' decoder model."""
    return {model_cache_kwarg(): cache}


def output_kwargs(cache: Cache | None) -> dict:
    """``{field: cache}`` for building the installed transformers' model outputs."""
    return {output_cache_field(): cache}


def returned_cache(output) -> Cache | None:
    """The cache of a model or `generate` output, read from the field that output class has (reading the other,
    deprecated name would log a deprecation warning)."""
    fields = getattr(output, "__dataclass_fields__", None)
    for name in CACHE_NAMES:
        if fields is None or name in fields:
            value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
            if value is not None or fields is not None:
                return value
    return None


def model_class_for(config, asked: type | None) -> type | None:
    """`asked`, unless it is built from another config class than `config`'s: then transformers' causal-LM class
    of `config` (a stage that names the dense export's ``DeepseekV3ForCausalLM`` gets ``DeepseekV2ForCausalLM``
    for a mixture-of-experts export's config). None stays None (the caller's Auto class)."""
    if asked is None or isinstance(config, asked.config_class):
        return asked
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM._model_mapping[type(config)]
