"""See what each layer hands its attention function: the capture's routing of attention calls.

This is the capture's only contact with transformers' attention machinery, and it goes
through the documented extension point (https://huggingface.co/docs/transformers/attention_interface):
an attention function registered with ``AttentionInterface.register`` (its masks with
``AttentionMaskInterface.register``) under a name of its own, and selected through the
``config._attn_implementation`` property the model's attention layers read at every call.
The registered function reports the layer's query and key ``[batch, heads, seq, head_dim]``
to whoever watches that layer and then runs the model's own implementation unchanged.

``model.set_attn_implementation`` is not used: it validates names against kernels on the
hub and decides by reading the modeling file's source whether a model "can" switch, which
is beside the point for a function that only watches.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

from torch import Tensor, nn

from anomaly.errors import UserError

Report = Callable[[Tensor, Tensor, dict], None]
"""Called with the query and key ``[batch, heads, seq, head_dim]`` a layer hands its
attention function and the keyword arguments of that call (``attention_mask`` included)."""

_ROUTE_PREFIX = "anomaly_capture:"
"""Attention implementations registered by the capture are named this + the original's."""
_WATCHED: dict[int, Report] = {}
"""``id(attention module)`` → where its call is reported, while a capture runs."""


def _eager_of(module: nn.Module) -> Callable:
    # HF calls get_interface(impl, eager_attention_forward) with the function of the module's
    # own modeling file (or of the class it derives from, for subclasses such as CoCA's).
    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise UserError(
        f"{type(module).__name__} has no eager attention function to call; load the model with "
        "attn_implementation='sdpa'"
    )


def _routed(original: str) -> Callable:
    """The attention function that reports a watched module's call, then runs ``original``."""
    from transformers import AttentionInterface

    def attention(module: nn.Module, query: Tensor, key: Tensor, *args, **kwargs):
        report = _WATCHED.get(id(module))
        if report is not None:
            # HF's signature: (module, query, key, value, attention_mask, ...).
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            report(query, key, {**kwargs, "attention_mask": mask})
        fn = _eager_of(module) if original == "eager" else AttentionInterface()[original]
        return fn(module, query, key, *args, **kwargs)

    return attention


def _route_name(original: str) -> str:
    """The registered implementation that watches calls and then runs ``original``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _ROUTE_PREFIX + original
    # Registered anew by every capture: a registration left by another copy of this module
    # (importlib.reload, a notebook's autoreload) would report to that copy's watch list.
    AttentionInterface.register(name, _routed(original))
    # The same masks as the original implementation, so the forward is unchanged.
    if original in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _implementations(config) -> dict:
    """The attention implementation of ``config`` (key ``""``) and, recursively, of each of
    its sub-configs (by key): the nested form the ``_attn_implementation`` setter takes, so
    that every config gets back exactly its own (a plain string would be copied down into
    every sub-config)."""
    out = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out[key] = _implementations(sub)
    return out


def _routes(implementations: dict) -> dict:
    """``implementations`` with each name replaced by its watching route (none means eager)."""
    return {
        key: _routes(impl) if isinstance(impl, dict) else _route_name(impl or "eager")
        for key, impl in implementations.items()
    }


@contextlib.contextmanager
def watch_attention(model: nn.Module, report: dict[int, Report]) -> Iterator[None]:
    """Route every attention call of ``model`` through :func:`_routed` while the context
    lasts; ``report`` maps ``id(attention module)`` to the callback it calls. Nothing is
    rerouted where ``report`` is empty. The model's implementations, and the watch list, are
    restored however the context ends."""
    if not report:
        yield
        return
    before = _implementations(model.config)
    try:
        model.config._attn_implementation = _routes(before)
        _WATCHED.update(report)
        yield
    finally:
        for key in report:
            _WATCHED.pop(key, None)
        model.config._attn_implementation = before


def watching() -> bool:
    """Whether any attention module is being watched (a capture is running, or one failed
    to clean up)."""
    return bool(_WATCHED)
