"""Config readers: what a (text) config says about RoPE, before any weights exist."""

from __future__ import annotations

import dataclasses
import inspect

from torch import nn

ROTARY_FIELDS = ("rope_parameters", "rope_theta", "rotary_pct", "rotary_dim", "partial_rotary_factor", "rotary_emb_base")
"""Config fields that declare a rotary position embedding."""

_NO_ROPE_TYPES = {"gpt2", "gptj_no_rope", "opt", "bloom", "mpt", "bert", "t5", "falcon_mamba", "mamba"}


def text_config(config):
    """The text part of a model config (multimodal configs keep it under ``text_config``)."""
    return getattr(config, "text_config", None) or config


def config_of(model: nn.Module):
    """The text config of a loaded ``model``."""
    return text_config(model.config)


def train_length_of(config) -> int:
    """The context length the model was trained at, as its (text) config records it."""
    config = text_config(config)
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and params.get("original_max_position_embeddings"):
        return int(params["original_max_position_embeddings"])
    return int(config.max_position_embeddings)


def rope_base_of(config) -> float:
    """The RoPE base (``rope_theta``) of a (text) config; 10000 where it records none."""
    config = text_config(config)
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(config, "rope_theta", 10000.0))


def max_positions_of(config) -> int | None:
    """``max_position_embeddings`` of a (text) config, or ``None`` where it has none."""
    return getattr(text_config(config), "max_position_embeddings", None)


def scaling_record(config) -> dict | None:
    """The config's RoPE scaling parameters (JSON scalars only), ``None`` for plain RoPE."""
    params = getattr(text_config(config), "rope_parameters", None)
    if not isinstance(params, dict) or params.get("rope_type", "default") == "default":
        return None
    return {k: v for k, v in params.items() if isinstance(v, (int, float, str))}


def declares_rotary(config_class: type) -> bool:
    """Whether a config class declares rotary parameters (one of :data:`ROTARY_FIELDS`
    among its fields); checked on the class, before any config or weights exist."""
    if dataclasses.is_dataclass(config_class):
        names = {f.name for f in dataclasses.fields(config_class)}
    else:
        names = set(inspect.signature(config_class.__init__).parameters)
    return bool(names & set(ROTARY_FIELDS))


def has_rope(config) -> bool:
    """Whether a config describes a RoPE model (checked before loading any weights)."""
    if config.model_type in _NO_ROPE_TYPES:
        return False
    text = text_config(config)
    if getattr(text, "alibi", False):  # Falcon-7B/40B-style configs may use ALiBi instead
        return False
    params = getattr(text, "rope_parameters", None)
    return bool(params) or any(getattr(text, a, None) is not None for a in ROTARY_FIELDS[1:])
