"""Every architecture-specific attribute path of the toolkit lives here.

The rest of the code asks this module *where* a loaded HF causal LM keeps its decoder
layers, attention modules, the modules whose outputs are the pre-RoPE queries and keys,
and its rotary embedding; it never spells ``model.model.layers[i].self_attn.q_proj``
itself (the same design as tuned-lens's ``model_surgery``).

What is read where (docs/conventions.md §1–2):

* The **pre-RoPE query/key** of a layer is the output of the last module that runs before
  the rotation: the q/k normalisation where a model has one (Qwen3, Gemma3, OLMo2, Cohere
  with ``use_qk_norm``), else the q/k projection (bias included), else a fused projection
  that is split the way the model splits it (GPT-NeoX: per head ``[q | k | v]``; Phi-3:
  ``[all q | all k | all v]``; CodeGen: per model-parallel shard ``[q | v | k]``). Whether
  a captured tensor is ``[b, s, h·d]``, ``[b, s, h, d]`` or ``[b, h, s, d]`` is read off its
  shape (:func:`seq_major_candidates`), not off a list of families.
* The **rotation actually applied** is the ``(cos, sin)`` pair the decoder hands each
  attention module as ``position_embeddings`` (:func:`rotation_table`). Its width gives the
  rotated dimension ``d_rot`` (partial rotary rotates the first ``d_rot`` dims of each head,
  as in HF), its magnitude is the rotary attention factor (YaRN), and it identifies which
  of the rotary module's frequency buffers the layer uses (per-layer bases, Gemma3's
  local/global rotary).
* None of this is trusted on its own: :mod:`anomaly.probe.activations` checks, on every
  capture, that the captured q/k rotated this way *are* the q/k the layer hands its
  attention function, and refuses (:class:`Unsupported`) where they are not.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from anomaly.errors import UserError

# Where decoder stacks live, tried in order: LLaMA-likes (model.model.layers), GPT-NeoX
# (model.gpt_neox.layers), multimodal wrappers (model.model.language_model.layers), GPT-J
# and CodeGen (model.transformer.h).
_LAYER_PATHS = (
    "model.layers",
    "gpt_neox.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "transformer.h",
    "transformer.layers",
    "transformer.blocks",  # DBRX
    "gpt_neox_japanese.layers",
)
# RecurrentGemma names each layer's mixer (attention or recurrence) "temporal_block"; DBRX
# nests its attention between two norms; Zamba2's hybrid layers call a shared transformer block.
_ATTENTION_NAMES = (
    "self_attn", "attention", "attn", "self_attention", "temporal_block", "norm_attn_norm.attn",
    "shared_transformer.self_attn",
)
_NORM_NAMES = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"))
# Modules of multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, ...): the query and
# key are rebuilt from low-rank latents, and RoPE acts on a separate decoupled part.
_MLA_NAMES = ("kv_a_proj_with_mqa", "kv_b_proj", "q_a_proj")
_ROTARY_PATHS = ("model.rotary_emb", "gpt_neox.rotary_emb", "transformer.rotary_emb", "model.language_model.rotary_emb")
_SIN_COS_HALF_WIDTH = {"GPTJAttention", "CodeGenAttention"}
"""Attention classes called with ``(sin, cos)``, each ``[..., seq, d_rot/2]``."""
ROTATES_INSIDE = frozenset(_SIN_COS_HALF_WIDTH | {"FalconAttention", "GPTNeoXJapaneseAttention"})
"""Attention classes that compute their scores themselves instead of calling transformers'
attention interface, so the capture cannot watch the q/k they score with; their capture is
proven by the rebuild tests (tests/test_probe_capture.py, tests/test_families.py)."""

ROTARY_FIELDS = ("rope_parameters", "rope_theta", "rotary_pct", "rotary_dim", "partial_rotary_factor", "rotary_emb_base")
"""Config fields that declare a rotary position embedding."""

_NO_ROPE_TYPES = {"gpt2", "gptj_no_rope", "opt", "bloom", "mpt", "bert", "t5", "falcon_mamba", "mamba"}


# --------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------

REFUSALS = {
    "no_rope": "has no rotary position embedding (RoPE) in its text decoder, so there is no initial angle to probe",
    "mla": "uses multi-head latent attention with a decoupled RoPE part: its scores add a rotated "
    "low-rank part to an unrotated one, which is not the RoPE geometry the probe measures",
    "norm_after_rotation": "normalises q/k after the rotary rotation, so no pre-rotation angle "
    "exists to probe",
    "not_text_only": "is not a text-only decoder (its forward needs inputs other than token ids)",
    "routed_queries": "routes each token's queries through attention experts chosen per token (a "
    "mixture of attention heads), so a query head is a different projection from one token to the "
    "next and has no fixed per-head geometry to probe",
    "reused_layers": "runs the same attention layer more than once per forward pass (weights shared "
    "across depth, or a looped stack), so a layer has no single query/key to probe",
    "unread_layout": "computes its query and key in a way the probe does not read (a fused "
    "projection of an unknown layout)",
    "sparse_rounded_keys": "lets each query attend to a top-k selection of keys chosen by an indexer "
    "and rounds the rotated keys to a 4-bit format (NVFP4) before scoring, so the key a query meets "
    "is not the rotation of a pre-RoPE key and most causal pairs are never scored",
    "unverified": "hands its attention q/k that the captured pre-RoPE q/k, rotated, do not reproduce",
}
"""Why the probe refuses a model: category → the reason, as a user reads it."""


class Unsupported(UserError):
    """A model the probe refuses, for one of the reasons in :data:`REFUSALS`."""

    def __init__(self, family: str, category: str, detail: str = ""):
        self.family = family
        """The model type (``config.model_type``)."""
        self.category = category
        """A key of :data:`REFUSALS`."""
        hint = "; the probe supports the families listed in docs/families.md"
        super().__init__(f"{family} {REFUSALS[category]}{' (' + detail + ')' if detail else ''}{hint}")


# --------------------------------------------------------------------------------------
# Config readers
# --------------------------------------------------------------------------------------


def _get(obj: object, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


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


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of an HF causal LM."""
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise Unsupported(model.config.model_type, "unread_layout", f"no decoder layer list found in {type(model).__name__}")


def attention_module(layer: nn.Module) -> nn.Module | None:
    """The self-attention module of one decoder layer, or ``None`` where the layer has none
    (the linear-attention or state-space layers of hybrid models)."""
    for name in _ATTENTION_NAMES:
        attn = _get(layer, name)
        if isinstance(attn, nn.Module):
            return attn
    return None


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The model-level rotary embedding module(s) that produce ``(cos, sin)``."""
    found = [m for p in _ROTARY_PATHS if (m := _get(model, p)) is not None]
    if not found:  # older or unusual layouts: any module that owns an inv_freq buffer
        found = [m for _, m in model.named_modules() if any(n.endswith("inv_freq") for n, _ in m.named_buffers(recurse=False))]
    return found


def frequency_buffers(model: nn.Module) -> list[tuple[Tensor, float]]:
    """Every ``(inv_freq, attention_scaling)`` pair the model's rotary modules hold.

    Gemma3-style modules hold one pair per layer type (``sliding_attention_inv_freq``,
    ``sliding_attention_attention_scaling``); LLaMA-style ones a single ``inv_freq``.
    ``original_inv_freq`` copies (kept by HF for dynamic scaling) are skipped. GPT-J and
    CodeGen hold a table instead, ``embed_positions [positions, d_rot] = cat(sin pθ, cos pθ)``:
    its row 1 gives ``θ = atan2(sin θ, cos θ)`` (every ``θ_j ≤ 1``, so no wrap).
    """
    out = []
    for module in rotary_modules(model):
        table = getattr(module, "embed_positions", None)
        if isinstance(table, Tensor) and table.ndim == 2 and table.shape[0] > 1:
            sin, cos = table[1].double().chunk(2)
            out.append((torch.atan2(sin, cos).float(), 1.0))
        for name, buf in module.named_buffers(recurse=False):
            if not name.endswith("inv_freq") or "original" in name:
                continue
            prefix = name[: -len("inv_freq")]
            scale = getattr(module, f"{prefix}attention_scaling", getattr(module, "attention_scaling", 1.0))
            out.append((buf, float(scale if scale is not None else 1.0)))
    return out


# --------------------------------------------------------------------------------------
# Attention sites
# --------------------------------------------------------------------------------------


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


def seq_major_candidates(x: Tensor, heads: int, head_dim: int, seq: int) -> list[Tensor]:
    """The readings of ``x`` as ``[b, s, h, d]``, from its shape.

    ``[b, s, h·d]`` is reshaped; a 4-d tensor is ``[b, s, h, d]`` or ``[b, h, s, d]``
    depending on which of its dims is the sequence. Where ``s = h`` both readings fit
    and both are returned (the capture keeps the one the attention confirms).
    """
    b = x.shape[0]
    if x.ndim == 3 and x.shape[1] == seq and x.shape[2] == heads * head_dim:
        return [x.reshape(b, seq, heads, head_dim)]
    out = []
    if x.ndim == 4 and tuple(x.shape[1:]) == (seq, heads, head_dim):
        out.append(x)
    if x.ndim == 4 and tuple(x.shape[1:]) == (heads, seq, head_dim):
        out.append(x.transpose(1, 2))
    return out


def attention_sites(model: nn.Module) -> Sites:
    """The :class:`AttentionSite` of every decoder layer of ``model`` that has self-attention.

    Raises:
        Unsupported: the model has no RoPE, uses multi-head latent attention, or no layer
            has a self-attention module whose query and key this module can locate.
    """
    config = config_of(model)
    family = model.config.model_type
    if not has_rope(model.config):
        raise Unsupported(family, "no_rope")
    if getattr(config, "H_cycles", None) and getattr(config, "L_cycles", None):  # HRM
        raise Unsupported(family, "reused_layers", "its two layer stacks are run in nested high- and "
                          "low-level cycles, each layer several times per forward pass")
    sites, skipped = [], {}
    kinds = getattr(config, "layer_types", None) or []
    if any(isinstance(k, str) and "indexed" in k for k in kinds):  # Kolibri 1.1 (transformers 5.25)
        raise Unsupported(family, "sparse_rounded_keys", "its indexed-attention layers")
    seen: dict[int, int] = {}  # id(attention module) -> first layer using it
    for i, layer in enumerate(decoder_layers(model)):
        attn = attention_module(layer)
        # Hybrid models: a layer the config calls linear attention or a state-space block may
        # still name its mixer "self_attn" (MiniMax's lightning attention).
        kind = kinds[i] if i < len(kinds) and isinstance(kinds[i], str) else ""
        if attn is None or any(w in kind for w in ("linear", "mamba", "conv", "recurrent")):
            skipped[i] = "no self-attention in this layer (linear attention or a state-space block)"
            continue
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
        if getattr(attn, "is_kv_shared_layer", False):  # Gemma 3n / Gemma 4 (E2B, E4B)
            skipped[i] = "reuses the keys of an earlier layer (KV sharing) and computes none of its own"
            continue
        n_heads, n_kv, head_dim = _heads(config, attn)
        norms = next(
            (tuple(getattr(attn, n) for n in pair) for pair in _NORM_NAMES
             if all(isinstance(getattr(attn, n, None), nn.Module) for n in pair)),
            None,
        )
        projections: tuple[nn.Module, ...] = ()
        picks: tuple[int, ...] = ()
        pair_norm = getattr(attn, "qk_norm", None)
        if norms is None and isinstance(pair_norm, nn.Module) and len(inspect.signature(pair_norm.forward).parameters) == 2:
            # ZAYA: one module takes q and k, normalises both, returns (q [b, s, h, d], k [b, s, kv, d]).
            # (Llama 4's one-argument qk_norm is applied to each, after the rotation.)
            sources, split, picks = (pair_norm, pair_norm), _separate(n_heads, n_kv, head_dim), (0, 1)
        elif norms is not None:
            sources, split = norms, _separate(n_heads, n_kv, head_dim)
            if all(isinstance(getattr(attn, n, None), nn.Module) for n in ("q_proj", "k_proj")):
                projections = (attn.q_proj, attn.k_proj)
        elif isinstance(getattr(attn, "q_proj", None), nn.Module) and isinstance(getattr(attn, "k_proj", None), nn.Module):
            sources, split = (attn.q_proj, attn.k_proj), _separate(n_heads, n_kv, head_dim)
        elif isinstance(getattr(attn, "query_key_value", None), nn.Module) and family.startswith("gpt_neox"):
            sources, split = (attn.query_key_value,), _neox_split(n_heads, head_dim)
        elif isinstance(getattr(attn, "query_key_value", None), nn.Module) and type(attn).__name__ == "FalconAttention":
            n_kv = n_heads if not (attn.new_decoder_architecture or attn.multi_query) else attn.num_kv_heads
            sources, split = (attn.query_key_value,), _falcon_split(n_heads, n_kv, head_dim, attn.new_decoder_architecture)
        elif isinstance(getattr(attn, "qkv_proj", None), nn.Module) and family == "codegen":
            sources, split = (attn.qkv_proj,), _codegen_split(n_heads, head_dim, attn.mp_num)
        elif isinstance(getattr(attn, "qkv_proj", None), nn.Module):
            sources, split = (attn.qkv_proj,), _concat_split(n_heads, n_kv, head_dim)
        elif isinstance(getattr(attn, "Wqkv", None), nn.Module):  # DBRX, which may clip q/k/v
            sources, split = (attn.Wqkv,), _concat_split(n_heads, n_kv, head_dim, getattr(attn, "clip_qkv", None))
        else:
            raise Unsupported(family, "unread_layout", type(attn).__name__)
        scale = getattr(attn, "scaling", None) or head_dim**-0.5
        rotary = getattr(attn, "rotary_emb", None)
        sites.append(AttentionSite(
            i, attn, sources, split, n_heads, n_kv, head_dim, float(scale), projections,
            rotary if isinstance(rotary, nn.Module) else None, picks,
        ))
    if not sites:
        raise Unsupported(family, "no_rope", "no decoder layer has self-attention")
    return Sites(sites, skipped)


def _pairs(qs: list[Tensor], ks: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    return [(q, k) for q in qs for k in ks]


def _separate(n_heads: int, n_kv: int, head_dim: int):
    def split(outs: tuple[Tensor, ...], seq: int) -> list[tuple[Tensor, Tensor]]:
        q, k = outs
        return _pairs(seq_major_candidates(q, n_heads, head_dim, seq), seq_major_candidates(k, n_kv, head_dim, seq))

    return split


def _neox_split(n_heads: int, head_dim: int):
    # GPT-NeoX views its fused output as [b, s, heads, 3·d] and chunks each head into q|k|v.
    def split(outs: tuple[Tensor, ...], seq: int) -> list[tuple[Tensor, Tensor]]:
        (qkv,) = outs
        per_head = qkv.reshape(qkv.shape[0], seq, n_heads, 3 * head_dim)  # [b, s, h, 3d]
        return [(per_head[..., :head_dim], per_head[..., head_dim : 2 * head_dim])]

    return split


def _falcon_split(n_heads: int, n_kv: int, head_dim: int, grouped: bool):
    # Falcon's fused projection, as FalconAttention._split_heads reads it: grouped
    # (new_decoder_architecture) per key head [its queries | k | v]; multi-query
    # [all queries | k | v]; otherwise per head [q | k | v].
    def split(outs: tuple[Tensor, ...], seq: int) -> list[tuple[Tensor, Tensor]]:
        (qkv,) = outs
        b = qkv.shape[0]
        if grouped:
            per_kv = qkv.reshape(b, seq, n_kv, n_heads // n_kv + 2, head_dim)  # [b, s, kv, group+2, d]
            return [(per_kv[..., :-2, :].reshape(b, seq, n_heads, head_dim), per_kv[..., -2, :])]
        if n_kv == 1:
            heads = qkv.reshape(b, seq, n_heads + 2, head_dim)  # [b, s, h+2, d]
            return [(heads[:, :, :-2], heads[:, :, -2:-1])]
        per_head = qkv.reshape(b, seq, n_heads, 3, head_dim)  # [b, s, h, 3, d]
        return [(per_head[..., 0, :], per_head[..., 1, :])]

    return split


def _concat_split(n_heads: int, n_kv: int, head_dim: int, clip: float | None = None):
    # Phi-3 and DBRX concatenate all queries, then all keys, then all values; DBRX clamps the
    # whole projection to [-clip, clip] first.
    def split(outs: tuple[Tensor, ...], seq: int) -> list[tuple[Tensor, Tensor]]:
        (qkv,) = outs
        if clip is not None:
            qkv = qkv.clamp(-clip, clip)
        nq = n_heads * head_dim
        q = qkv[..., :nq]
        k = qkv[..., nq : nq + n_kv * head_dim]
        return _pairs(seq_major_candidates(q, n_heads, head_dim, seq), seq_major_candidates(k, n_kv, head_dim, seq))

    return split


def _codegen_split(n_heads: int, head_dim: int, shards: int):
    # CodeGen's fused projection is laid out per model-parallel shard: [b, s, shards, 3·E/shards],
    # each shard holding its heads' queries, then values, then keys.
    def split(outs: tuple[Tensor, ...], seq: int) -> list[tuple[Tensor, Tensor]]:
        (qkv,) = outs
        local = qkv.shape[-1] // (3 * shards)
        per_shard = qkv.reshape(qkv.shape[0], seq, shards, 3 * local)  # [b, s, shards, 3·local]
        q, k = per_shard[..., :local], per_shard[..., 2 * local :]
        shape = (qkv.shape[0], seq, n_heads, head_dim)
        return [(q.reshape(shape), k.reshape(shape))]

    return split


# --------------------------------------------------------------------------------------
# The rotation a layer receives
# --------------------------------------------------------------------------------------


def position_embeddings_of(attn: nn.Module, args: tuple, kwargs: dict):
    """The rotation argument of a call of ``attn`` (keyword or positional), or ``None``.

    Usually the ``(cos, sin)`` pair HF's decoders hand every attention layer; GPT-J and
    CodeGen pass ``(sin, cos)`` at half width and repeat each frequency twice when they
    apply it (``rotate_every_two``), which is returned written out as the interleaved
    ``(cos, sin)`` table; Llama 4 passes complex ``e^{i pθ}`` ``[..., seq, d_rot/2]``,
    which is returned as is (:func:`rotation_table` reads both).
    """
    if "position_embeddings" in kwargs:
        pair = kwargs["position_embeddings"]
    else:
        params = inspect.signature(attn.forward).parameters
        names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if "position_embeddings" not in names or names.index("position_embeddings") >= len(args):
            return None
        pair = args[names.index("position_embeddings")]
    if pair is not None and type(attn).__name__ in _SIN_COS_HALF_WIDTH:
        sin, cos = pair
        return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    return pair


@dataclass
class RotationTable:
    """The rotation a layer receives, per slice frequency: ``cos(pθ_j)·s``, ``sin(pθ_j)·s``."""

    cos: Tensor
    """``[positions, J]``."""
    sin: Tensor
    """``[positions, J]``."""
    d_rot: int
    """Rotated dims per head, ``2J``."""
    layout: str
    """The layout the table is written in (``"half"`` for a half-width table): the first
    guess of the layout the layer applies it in, which the capture then checks."""
    dtype: torch.dtype
    """The (real) dtype the layer received the table in: ``cos``/``sin`` here are float32,
    but a bfloat16/float16 model rounds its table to its own dtype, which bounds how
    exactly :func:`match_frequencies` can match it."""


def rotation_table(rotation, n_freqs: set[int]) -> RotationTable:
    """:class:`RotationTable` of the rotation argument an attention layer received.

    A full-width table ``[..., seq, d_rot]`` repeats each frequency twice, as ``cat(f, f)``
    (half layout) or ``repeat_interleave(f, 2)`` (interleaved); gpt-oss hands over a
    half-width table ``[..., seq, d_rot/2]`` (one column per frequency, recognised by its
    width among ``n_freqs``, the lengths of the model's frequency buffers); Llama 4 a
    complex one. Positions 0 (all ones) carry no information; a table whose frequencies are
    all equal matches both patterns and reads as ``half``.

    Raises:
        UserError: a table of none of these forms.
    """
    if isinstance(rotation, Tensor) and rotation.is_complex():
        z = rotation.reshape(-1, rotation.shape[-1])
        return RotationTable(z.real.float(), z.imag.float(), 2 * z.shape[-1], "interleaved", z.real.dtype)
    cos, sin = rotation
    c, s = cos.reshape(-1, cos.shape[-1]).float(), sin.reshape(-1, sin.shape[-1]).float()  # [positions, width]
    w = c.shape[-1]
    # Repeated columns are copies of one value, so they are equal bit for bit in any dtype.
    if w % 2 == 0 and torch.allclose(c[:, : w // 2], c[:, w // 2 :], atol=1e-6):
        return RotationTable(c[:, : w // 2], s[:, : w // 2], w, "half", cos.dtype)
    if w % 2 == 0 and torch.allclose(c[:, 0::2], c[:, 1::2], atol=1e-6):
        return RotationTable(c[:, 0::2], s[:, 0::2], w, "interleaved", cos.dtype)
    if w in n_freqs:
        return RotationTable(c, s, 2 * w, "half", cos.dtype)
    raise UserError(
        f"the rotary table the model hands its attention layers ({w} columns) repeats no "
        "frequency the way RoPE's half or interleaved layouts do; the probe cannot read it"
    )


KERNEL_DEVIATION = 1e-3
"""Largest deviation of a layer's rotary table from its frequencies that :func:`match_frequencies`
accepts beyond rounding. torch 2.13's CPU kernels occasionally compute the very first rotary table
of a process with errors of ~1.5e-4 at some positions (seen on 2 threads, never on 1: a race on
first use); a wrong buffer or rotary factor is off by order one, far above this."""


@dataclass(frozen=True)
class FrequencyMatch:
    """The frequencies that rotate a layer, read from the model and checked against its table."""

    inv_freq: Tensor
    """``[d_rot/2]`` slice frequencies θ_j (float32, CPU), as the model's buffer holds them."""
    scale: float
    """Rotary attention factor multiplied into cos and sin (YaRN's; 1 otherwise)."""
    deviation: float
    """Largest |cos|/|sin| difference between the layer's table and these frequencies."""


def match_frequencies(model: nn.Module, table: RotationTable, positions: Tensor) -> FrequencyMatch:
    """The model's frequencies and rotary factor that produced ``table``.

    Each of the rotary module's frequency buffers is tried; the one whose table equals the
    layer's (to float32 rounding at these positions, plus the rounding of the table to the
    dtype the layer received it in: bfloat16/float16 models) is returned. This both reads the
    frequencies "from the model's own rotary module" and proves they are the ones used. A table
    off by more than rounding but at most :data:`KERNEL_DEVIATION` is accepted with its
    deviation recorded, which the capture's own check then allows for.

    Raises:
        UserError: no buffer reproduces the table.
    """
    c, s = table.cos.double(), table.sin.double()
    pos = positions.reshape(-1).double().to(c.device)
    best, err_best = None, math.inf
    for freqs, scale in frequency_buffers(model):
        if freqs.shape[-1] != c.shape[-1]:
            continue
        ang = pos[:, None] * freqs.detach().to(c.device, torch.float32).double()[None, :]
        err = max((ang.cos() * scale - c).abs().max().item(), (ang.sin() * scale - s).abs().max().item())
        if err < err_best:
            best, err_best = (freqs.detach().float().cpu(), scale), err
    # float32 angles at position p carry ~p·6e-8 absolute error. A bfloat16/float16 model
    # computes its table in float32 and rounds each entry once to its own dtype: at most half
    # an ulp, eps/2·|entry|, where |entry| ≤ the rotary factor (1 without YaRN). One eps times
    # the table's largest entry is twice that bound (room for the float32 error beneath it):
    # ~1e-7 for float32 tables, 2⁻⁷ for bfloat16 ones, still far below what a wrong buffer or
    # rotary factor gives (differences of order one at most positions).
    rounding = torch.finfo(table.dtype).eps * max(1.0, float(c.abs().max()), float(s.abs().max())) if c.numel() else 0.0
    tol = (1e-5 + 2e-7 * float(pos.max()) if len(pos) else 1e-5) + rounding
    if best is None or err_best > tol + KERNEL_DEVIATION:
        raise UserError(
            f"none of {model.config.model_type}'s rotary frequency buffers reproduces the rotation "
            "its attention layers receive, so the probe cannot tell which frequencies rotate "
            "them; the supported families are listed in docs/families.md"
        )
    return FrequencyMatch(best[0], best[1], 0.0 if err_best <= tol else err_best)
