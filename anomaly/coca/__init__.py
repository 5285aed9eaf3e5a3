"""Collinear Constrained Attention (CoCA, Zhu et al. 2024; docs/conventions.md §5).

* :mod:`anomaly.coca.attention` — the maths as fused attention: :func:`coca_attention`,
  the per-token transforms (:func:`coca_qk`, :func:`transform_query`,
  :func:`transform_key`), a KV cache (:class:`CocaCache`) and the quadratic reference
  forms (:func:`einsum_scores`, :func:`einsum_attention`).
* :mod:`anomaly.coca.hf` — the drop-in for HF LLaMA-like models: :func:`to_coca`,
  :func:`load_coca`, :func:`set_rope_parameters`, :func:`finetune_stage`. Imported lazily,
  so using the kernels does not import transformers.
"""

from __future__ import annotations

from typing import Any

from anomaly.coca.attention import (
    VARIANTS,
    CocaCache,
    Variant,
    check_variant,
    coca_attention,
    coca_qk,
    einsum_attention,
    einsum_scores,
    transform_key,
    transform_query,
)

_HF_NAMES = (
    "CONFIG_KEY",
    "FINETUNE_STAGES",
    "coca_layers",
    "finetune_stage",
    "load_coca",
    "set_rope_parameters",
    "to_coca",
)

__all__ = [
    "VARIANTS",
    "CocaCache",
    "Variant",
    "check_variant",
    "coca_attention",
    "coca_qk",
    "einsum_attention",
    "einsum_scores",
    "transform_key",
    "transform_query",
    *_HF_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _HF_NAMES:
        from anomaly.coca import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'anomaly.coca' has no attribute {name!r}")
