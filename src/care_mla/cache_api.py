"""The one place that knows how the installed transformers hands the KV cache around.

transformers renamed the cache argument of every model, decoder layer and attention forward,
and the field of their outputs, from ``past_key_values`` to ``cache`` (5.2x; the old name is a
deprecated alias until 5.40/6.0). A custom attention module that reads only one of the two
names silently runs *without a cache* under the other: decode then recomputes nothing and
the cache stays empty. Everything in care-mla that passes, receives or reads a cache goes
through these helpers, which look at the installed version's own signatures (no version
parsing), so both conventions work.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

from transformers.cache_utils import Cache

#: Names a cache may arrive under, newest first.
CACHE_NAMES = ("cache", "past_key_values")


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
    """The cache of a model or `generate` output (a `ModelOutput`, i.e. a dict of its set fields), under either
    field name and without the deprecation warning of the old attribute."""
    for name in CACHE_NAMES:
        if output.get(name) is not None:
            return output[name]
    return None
