"""Attention sites: for every decoder layer, the modules whose outputs are its pre-RoPE
query and key, how to read them, and the layers that have none."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, NamedTuple

from torch import Tensor, nn

from anomaly.model_surgery.config import config_of, has_rope
from anomaly.model_surgery.modules import attention_module, decoder_layers
from anomaly.model_surgery.refusals import Unsupported
from anomaly.model_surgery.splits import _codegen_split, _concat_split, _falcon_split, _neox_split, _separate

_NORM_NAMES = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"))
# Modules of multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, ...): the query and
# key are rebuilt from low-rank latents, and RoPE acts on a separate decoupled part.
_MLA_NAMES = ("kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj")


@dataclass
class AttentionSite:
    """Where one layer's pre-RoPE query and key are read."""

    index: int
    """Decoder layer index."""
    attention: nn.Module
    """The attention module; its ``position_embeddings`` argument is the rotation applied."""
    sources: tuple[nn.Module, ...]
    """Modules whose outputs hold the pre-RoPE query and key (one when fused)."""
    split: Callable[[tuple[Tensor, ...], int], list[tuple[Tensor, Tensor]]]
    """Maps the sources' outputs and the sequence length to the candidate readings
    ``(q [batch, seq, heads, head_dim], k [batch, seq, kv_heads, head_dim])``: one, or two
    where the shape alone cannot tell ``[b, s, h, d]`` from ``[b, h, s, d]`` (``s = h``);
    the capture keeps the one the attention's own q/k confirm."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (fewer than ``n_heads`` under grouped-query attention)."""
    head_dim: int
    """Size of one head, rotated and unrotated dims together."""
    softmax_scale: float
    """The factor the layer multiplies ``q·k`` by before the softmax (``1/√d`` usually);
    the capture replaces it by the ``scaling`` the layer passes its attention function."""
    projections: tuple[nn.Module, ...] = ()
    """Where the sources are q/k norms: the q/k projections that feed them, so the capture
    can tell a norm before the rotation from one after it (its input is then rotated)."""
    rotary: nn.Module | None = None
    """Where the attention module computes its rotation itself (RecurrentGemma, Moshi) rather
    than receiving it as ``position_embeddings``: the child module whose ``(cos, sin)``
    output it applies."""
    picks: tuple[int, ...] = ()
    """Per source, which element of its output to read where it returns a tuple (default:
    the first): ZAYA's q/k norm is one module returning ``(q, k)``, read as two sources."""


@dataclass
class Sites:
    """The attention sites of a model, and the decoder layers that have none."""

    sites: list[AttentionSite]
    """One per decoder layer with self-attention, in order."""
    skipped: dict[int, str]
    """Decoder layer index → why it is not probed (no self-attention in that layer)."""


def _heads(config, attn: nn.Module) -> tuple[int, int, int]:
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = int(getattr(attn, "head_dim", None) or getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    # A layer whose key projection says otherwise sets its own key heads (MiMo-V2-Flash's sliding
    # layers have twice the config's).
    k_width = getattr(getattr(attn, "k_proj", None), "out_features", None)
    if isinstance(k_width, int) and k_width != n_kv * head_dim and k_width % head_dim == 0:
        n_kv = k_width // head_dim
    return n_heads, n_kv, head_dim



def _is_mla(attn: nn.Module) -> bool:
    return any(isinstance(getattr(attn, n, None), nn.Module) for n in _MLA_NAMES)


def attention_sites(model: nn.Module) -> Sites:
    """The :class:`AttentionSite` of every decoder layer of ``model`` that has self-attention.

    Raises:
        Unsupported: the model has no RoPE, uses multi-head latent attention, or no layer
            has a self-attention module whose query and key this module can locate.
    """
    config = config_of(model)
    family = model.config.model_type
    _refuse_model(model.config, config, family)
    kinds = getattr(config, "layer_types", None) or []
    sites, skipped = [], {}
    seen: dict[int, int] = {}  # id(attention module) -> first layer using it
    for i, layer in enumerate(decoder_layers(model)):
        attn = attention_module(layer)
        # Hybrid models: a layer the config calls linear attention or a state-space block may
        # still name its mixer "self_attn" (MiniMax's lightning attention).
        kind = kinds[i] if i < len(kinds) and isinstance(kinds[i], str) else ""
        if attn is None or any(w in kind for w in ("linear", "mamba", "conv", "recurrent")):
            skipped[i] = "no self-attention in this layer (linear attention or a state-space block)"
            continue
        _refuse_attention(family, attn, i, seen)
        if getattr(attn, "is_kv_shared_layer", False):  # Gemma 3n / Gemma 4 (E2B, E4B)
            skipped[i] = "reuses the keys of an earlier layer (KV sharing) and computes none of its own"
            continue
        sites.append(_site(i, attn, config, family))
    if not sites:
        raise Unsupported(family, "no_rope", "no decoder layer has self-attention")
    return Sites(sites, skipped)


def _refuse_model(model_config, config, family: str) -> None:
    """Refuse, before looking at any layer, a model whose config alone rules it out."""
    if not has_rope(model_config):
        raise Unsupported(family, "no_rope")
    if getattr(config, "H_cycles", None) and getattr(config, "L_cycles", None):  # HRM
        raise Unsupported(family, "reused_layers", "its two layer stacks are run in nested high- and "
                          "low-level cycles, each layer several times per forward pass")
    kinds = getattr(config, "layer_types", None) or []
    if any(isinstance(k, str) and "indexed" in k for k in kinds):  # Kolibri 1.1 (transformers 5.25)
        raise Unsupported(family, "sparse_rounded_keys", "its indexed-attention layers")


def _refuse_attention(family: str, attn: nn.Module, i: int, seen: dict[int, int]) -> None:
    """Refuse the attention module ``attn`` of layer ``i`` where the probe cannot read it;
    ``seen`` (``id(attention module) -> first layer using it``) gains it."""
    if isinstance(attn, nn.ModuleList):  # several attention blocks in one layer (LongCat-Flash)
        if any(_is_mla(a) for a in attn):
            raise Unsupported(family, "mla")
        raise Unsupported(family, "unread_layout", f"each layer holds {len(attn)} attention modules")
    if _is_mla(attn):
        raise Unsupported(family, "mla")
    if id(attn) in seen:  # Zamba2's shared transformer blocks
        raise Unsupported(family, "reused_layers", f"layers {seen[id(attn)]} and {i} call one attention module")
    seen[id(attn)] = i
    experts = getattr(attn, "experts", None)
    if isinstance(experts, nn.Module) and not isinstance(getattr(attn, "q_proj", None), nn.Module):
        raise Unsupported(family, "routed_queries")  # JetMoE's mixture of attention heads


class _Reading(NamedTuple):
    """Where a layer's pre-RoPE q/k are read, and how (the slots of :class:`AttentionSite`)."""

    sources: tuple[nn.Module, ...]
    split: Callable[[tuple[Tensor, ...], int], list[tuple[Tensor, Tensor]]]
    n_kv: int
    projections: tuple[nn.Module, ...] = ()
    picks: tuple[int, ...] = ()


def _site(i: int, attn: nn.Module, config, family: str) -> AttentionSite:
    """The :class:`AttentionSite` of the readable attention module ``attn`` of layer ``i``."""
    n_heads, n_kv, head_dim = _heads(config, attn)
    reading = _reading(attn, family, n_heads, n_kv, head_dim)
    scale = getattr(attn, "scaling", None) or head_dim**-0.5
    rotary = getattr(attn, "rotary_emb", None)
    return AttentionSite(
        i, attn, reading.sources, reading.split, n_heads, reading.n_kv, head_dim, float(scale), reading.projections,
        rotary if isinstance(rotary, nn.Module) else None, reading.picks,
    )


def _reading(attn: nn.Module, family: str, n_heads: int, n_kv: int, head_dim: int) -> _Reading:
    """The modules that output ``attn``'s pre-RoPE q/k: its q/k norms, else its q/k
    projections, else a fused projection split the way the family splits it."""
    norms = next(
        (tuple(getattr(attn, n) for n in pair) for pair in _NORM_NAMES
         if all(isinstance(getattr(attn, n, None), nn.Module) for n in pair)),
        None,
    )
    pair_norm = getattr(attn, "qk_norm", None)
    if norms is None and isinstance(pair_norm, nn.Module) and len(inspect.signature(pair_norm.forward).parameters) == 2:
        # ZAYA: one module takes q and k, normalises both, returns (q [b, s, h, d], k [b, s, kv, d]).
        # (Llama 4's one-argument qk_norm is applied to each, after the rotation.)
        return _Reading((pair_norm, pair_norm), _separate(n_heads, n_kv, head_dim), n_kv, picks=(0, 1))
    if norms is not None:
        projections = ()
        if all(isinstance(getattr(attn, n, None), nn.Module) for n in ("q_proj", "k_proj")):
            projections = (attn.q_proj, attn.k_proj)
        return _Reading(norms, _separate(n_heads, n_kv, head_dim), n_kv, projections)
    if isinstance(getattr(attn, "q_proj", None), nn.Module) and isinstance(getattr(attn, "k_proj", None), nn.Module):
        return _Reading((attn.q_proj, attn.k_proj), _separate(n_heads, n_kv, head_dim), n_kv)
    return _fused_reading(attn, family, n_heads, n_kv, head_dim)


def _fused_reading(attn: nn.Module, family: str, n_heads: int, n_kv: int, head_dim: int) -> _Reading:
    """A fused q/k/v projection, split the way ``family`` lays it out."""
    if isinstance(getattr(attn, "query_key_value", None), nn.Module) and family.startswith("gpt_neox"):
        return _Reading((attn.query_key_value,), _neox_split(n_heads, head_dim), n_kv)
    if isinstance(getattr(attn, "query_key_value", None), nn.Module) and type(attn).__name__ == "FalconAttention":
        n_kv = n_heads if not (attn.new_decoder_architecture or attn.multi_query) else attn.num_kv_heads
        return _Reading((attn.query_key_value,), _falcon_split(n_heads, n_kv, head_dim, attn.new_decoder_architecture),
                        n_kv)
    if isinstance(getattr(attn, "qkv_proj", None), nn.Module) and family == "codegen":
        return _Reading((attn.qkv_proj,), _codegen_split(n_heads, head_dim, attn.mp_num), n_kv)
    if isinstance(getattr(attn, "qkv_proj", None), nn.Module):
        return _Reading((attn.qkv_proj,), _concat_split(n_heads, n_kv, head_dim), n_kv)
    if isinstance(getattr(attn, "Wqkv", None), nn.Module):  # DBRX, which may clip q/k/v
        return _Reading((attn.Wqkv,), _concat_split(n_heads, n_kv, head_dim, getattr(attn, "clip_qkv", None)), n_kv)
    raise Unsupported(family, "unread_layout", type(attn).__name__)
