"""Every architecture-specific attribute path of the toolkit lives here.

The rest of the code asks this module *where* a loaded HF causal LM keeps its decoder
layers, attention modules, the modules whose outputs are the pre-RoPE queries and keys,
and its rotary embedding; it never spells ``model.model.layers[i].self_attn.q_proj``
itself (the same design as tuned-lens's ``model_surgery``).

What is read where (``SPEC.md`` §1–2):

* The **pre-RoPE query/key** of a layer is the output of the last module that runs before
  the rotation: the q/k normalisation where a model has one (Qwen3, Gemma3, OLMo2, Cohere
  with ``use_qk_norm``), else the q/k projection (bias included), else a fused projection
  that is split the way the model splits it (GPT-NeoX: per head ``[q | k | v]``; Phi-3:
  ``[all q | all k | all v]``; CodeGen: per model-parallel shard ``[q | v | k]``).
* The **rotation actually applied** is the ``(cos, sin)`` pair the decoder hands each
  attention module as ``position_embeddings``. Its width is the rotated dimension
  ``d_rot`` (partial rotary rotates the first ``d_rot`` dims of each head, as in HF), its
  pattern tells the layout, its magnitude is the rotary attention factor (YaRN), and it
  identifies which of the rotary module's frequency buffers the layer uses (per-layer
  bases, Gemma3's local/global rotary). GPT-J and CodeGen hand over ``(sin, cos)`` at half
  width; :func:`position_embeddings_of` writes them out as the standard pair.
"""

from __future__ import annotations

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
)
_ATTENTION_NAMES = ("self_attn", "attention", "attn")
_NORM_NAMES = (("q_norm", "k_norm"), ("q_layernorm", "k_layernorm"))
# Families whose per-head q/k norm runs after the [batch, heads, seq, d] transpose.
_HEAD_MAJOR_NORM = {"stablelm", "persimmon", "phi"}
_ROTARY_PATHS = ("model.rotary_emb", "gpt_neox.rotary_emb", "transformer.rotary_emb", "model.language_model.rotary_emb")
_SIN_COS_HALF_WIDTH = {"GPTJAttention", "CodeGenAttention"}
"""Attention classes called with ``(sin, cos)``, each ``[..., seq, d_rot/2]``."""

_NO_ROPE_TYPES = {"gpt2", "gptj_no_rope", "opt", "bloom", "mpt", "bert", "t5", "falcon_mamba", "mamba"}


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


def has_rope(config) -> bool:
    """Whether a config describes a RoPE model (checked before loading any weights)."""
    if config.model_type in _NO_ROPE_TYPES:
        return False
    text = text_config(config)
    params = getattr(text, "rope_parameters", None)
    return bool(params) or any(hasattr(text, a) for a in ("rope_theta", "rotary_pct", "rotary_dim"))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of an HF causal LM."""
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise UserError(
        f"cannot find the decoder layers of {type(model).__name__}; the probe supports HF "
        "decoders with RoPE (LLaMA, Mistral, Qwen, Gemma, OLMo, Phi-3, GPT-NeoX, GPT-J, ...)"
    )


def attention_module(layer: nn.Module) -> nn.Module:
    """The self-attention module of one decoder layer."""
    for name in _ATTENTION_NAMES:
        attn = getattr(layer, name, None)
        if isinstance(attn, nn.Module):
            return attn
    raise UserError(f"cannot find the attention module of {type(layer).__name__}")


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


@dataclass
class AttentionSite:
    """Where one layer's pre-RoPE query and key are read."""

    index: int
    """Layer index."""
    attention: nn.Module
    """The attention module; its ``position_embeddings`` argument is the rotation applied."""
    sources: tuple[nn.Module, ...]
    """Modules whose outputs hold the pre-RoPE query and key (one when fused)."""
    split: Callable[[tuple[Tensor, ...]], tuple[Tensor, Tensor]]
    """Maps the sources' outputs to ``q [batch, seq, heads, head_dim]`` and
    ``k [batch, seq, kv_heads, head_dim]``."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (fewer than ``n_heads`` under grouped-query attention)."""
    head_dim: int
    """Size of one head, rotated and unrotated dims together."""
    softmax_scale: float
    """The factor the layer multiplies ``q·k`` by before the softmax (``1/√d`` usually)."""


def _heads(config) -> tuple[int, int, int]:
    n_heads = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def _seq_major(x: Tensor, heads: int, head_dim: int, head_major: bool = False) -> Tensor:
    """Any of ``[b, s, h·d]``, ``[b, s, h, d]`` or ``[b, h, s, d]`` to ``[b, s, h, d]``."""
    if head_major:
        return x.transpose(1, 2)  # [b, h, s, d] -> [b, s, h, d]
    return x.reshape(x.shape[0], x.shape[1], heads, head_dim)  # [b, s, h·d] -> [b, s, h, d]


def attention_sites(model: nn.Module) -> list[AttentionSite]:
    """One :class:`AttentionSite` per decoder layer of ``model``.

    Raises:
        UserError: the model has no RoPE, or an attention layout this module does not know.
    """
    config = config_of(model)
    if not has_rope(model.config):
        raise UserError(
            f"{config.model_type} models have no rotary position embedding (RoPE), so there is "
            "no initial angle to probe; pick a RoPE model (LLaMA, Mistral, Qwen, GPT-NeoX, ...)"
        )
    n_heads, n_kv, head_dim = _heads(config)
    head_major = config.model_type in _HEAD_MAJOR_NORM
    sites = []
    for i, layer in enumerate(decoder_layers(model)):
        attn = attention_module(layer)
        norms = next(
            (tuple(getattr(attn, n) for n in pair) for pair in _NORM_NAMES
             if all(isinstance(getattr(attn, n, None), nn.Module) for n in pair)),
            None,
        )
        if norms is not None:
            sources = norms
            split = _separate(n_heads, n_kv, head_dim, head_major)
        elif isinstance(getattr(attn, "q_proj", None), nn.Module):
            sources = (attn.q_proj, attn.k_proj)
            split = _separate(n_heads, n_kv, head_dim, False)
        elif isinstance(getattr(attn, "query_key_value", None), nn.Module) and config.model_type.startswith("gpt_neox"):
            sources = (attn.query_key_value,)
            split = _neox_split(n_heads, head_dim)
        elif isinstance(getattr(attn, "qkv_proj", None), nn.Module) and config.model_type == "codegen":
            sources = (attn.qkv_proj,)
            split = _codegen_split(n_heads, head_dim, attn.mp_num)
        elif isinstance(getattr(attn, "qkv_proj", None), nn.Module):
            sources = (attn.qkv_proj,)
            split = _concat_split(n_heads, n_kv, head_dim)
        else:
            raise UserError(
                f"cannot locate the query and key of {type(attn).__name__}; "
                "add its layout to anomaly/model_surgery.py"
            )
        scale = getattr(attn, "scaling", None) or head_dim**-0.5
        sites.append(AttentionSite(i, attn, sources, split, n_heads, n_kv, head_dim, float(scale)))
    return sites


def _separate(n_heads: int, n_kv: int, head_dim: int, head_major: bool):
    def split(outs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        q, k = outs
        return _seq_major(q, n_heads, head_dim, head_major), _seq_major(k, n_kv, head_dim, head_major)

    return split


def _neox_split(n_heads: int, head_dim: int):
    # GPT-NeoX views its fused output as [b, s, heads, 3·d] and chunks each head into q|k|v.
    def split(outs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        (qkv,) = outs
        per_head = qkv.reshape(qkv.shape[0], qkv.shape[1], n_heads, 3 * head_dim)  # [b, s, h, 3d]
        return per_head[..., :head_dim], per_head[..., head_dim : 2 * head_dim]

    return split


def _concat_split(n_heads: int, n_kv: int, head_dim: int):
    # Phi-3 concatenates all queries, then all keys, then all values.
    def split(outs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        (qkv,) = outs
        nq = n_heads * head_dim
        q = qkv[..., :nq]
        k = qkv[..., nq : nq + n_kv * head_dim]
        return _seq_major(q, n_heads, head_dim), _seq_major(k, n_kv, head_dim)

    return split


def _codegen_split(n_heads: int, head_dim: int, shards: int):
    # CodeGen's fused projection is laid out per model-parallel shard: [b, s, shards, 3·E/shards],
    # each shard holding its heads' queries, then values, then keys.
    def split(outs: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        (qkv,) = outs
        local = qkv.shape[-1] // (3 * shards)
        per_shard = qkv.reshape(qkv.shape[0], qkv.shape[1], shards, 3 * local)  # [b, s, shards, 3·local]
        q, k = per_shard[..., :local], per_shard[..., 2 * local :]
        return _seq_major(q.reshape(*q.shape[:2], -1), n_heads, head_dim), _seq_major(
            k.reshape(*k.shape[:2], -1), n_heads, head_dim
        )

    return split


def position_embeddings_of(attn: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor] | None:
    """The ``(cos, sin)`` pair in a call of ``attn`` (keyword or positional), or ``None``.

    Always full-width tables ``[..., seq, d_rot]`` in the order ``(cos, sin)``: GPT-J and
    CodeGen pass ``(sin, cos)`` at half width and repeat each frequency twice when they apply
    it (``rotate_every_two``), which is the interleaved table written out.
    """
    if "position_embeddings" in kwargs:
        pair = kwargs["position_embeddings"]
    else:
        try:
            bound = inspect.signature(attn.forward).bind_partial(*args, **kwargs)
        except TypeError:
            return None
        pair = bound.arguments.get("position_embeddings")
    if pair is not None and type(attn).__name__ in _SIN_COS_HALF_WIDTH:
        sin, cos = pair
        return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    return pair


def detect_layout(cos: Tensor) -> str:
    """``"half"`` or ``"interleaved"`` from the pattern of a ``cos [..., seq, d_rot]`` table.

    HF's half layout repeats the frequencies as ``cat(f, f)``; the interleaved layout as
    ``repeat_interleave(f, 2)``. Positions 0 (all ones) carry no information; a table
    whose frequencies are all equal would match both and is reported as ``half``.
    """
    c = cos.reshape(-1, cos.shape[-1]).float()  # [positions, d_rot]
    d = c.shape[-1]
    half = torch.allclose(c[:, : d // 2], c[:, d // 2 :], atol=1e-6)
    inter = torch.allclose(c[:, 0::2], c[:, 1::2], atol=1e-6)
    if half:
        return "half"
    if inter:
        return "interleaved"
    raise UserError("the model's rotary table matches neither the half nor the interleaved layout")


def applied_layout(attn: nn.Module, cos: Tensor, sin: Tensor, table_layout: str) -> str:
    """The layout in which ``attn`` *applies* its ``(cos, sin)`` table.

    Most families apply the table in the layout it is built in, but some (GLM, GLM-4,
    Helium, ERNIE-4.5, ...) build it as ``cat(f, f)`` and re-interleave it inside their
    ``apply_rotary_pos_emb``: the table reads ``half`` while the rotation pairs dims
    ``(2j, 2j+1)``. So the layout is read off the family's own ``apply_rotary_pos_emb``:
    a unit vector along dim 0 is rotated at the first non-zero position and the dim its
    slice partner lands on (1: interleaved, ``d/2``: half) tells the layout. Falls back to
    ``table_layout`` where the function is missing or has another signature.
    """
    import sys

    fn = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    d = cos.shape[-1]
    c, s = cos.reshape(-1, d), sin.reshape(-1, d)
    if fn is None or d < 4 or c.shape[0] < 2:
        return table_layout
    x = torch.zeros(1, 1, 1, d, dtype=c.dtype, device=c.device)  # [batch, heads, seq, d]
    x[..., 0] = 1
    try:
        out = fn(x, x, c[1:2][None], s[1:2][None])[0].reshape(d).float()  # position 1
    except Exception:  # another signature (multimodal rotary, ...): trust the table
        return table_layout
    inter, half = out[1].abs().item(), out[d // 2].abs().item()
    if inter > 0 and half == 0:
        return "interleaved"
    if half > 0 and inter == 0:
        return "half"
    return table_layout


def match_frequencies(
    model: nn.Module, cos: Tensor, sin: Tensor, positions: Tensor, layout: str
) -> tuple[Tensor, float]:
    """The model's ``(inv_freq, attention_scaling)`` that produced ``cos``/``sin``.

    Each of the rotary module's frequency buffers is tried; the one whose table equals the
    layer's (to float32 rounding at these positions) is returned. This both reads the
    frequencies "from the model's own rotary module" and proves they are the ones used.
    """
    from anomaly.rope import slice_members

    c, s = slice_members(cos.reshape(-1, cos.shape[-1]).double(), layout)[0], slice_members(sin.reshape(-1, sin.shape[-1]).double(), layout)[0]
    pos = positions.reshape(-1).double().to(c.device)
    best, err_best = None, math.inf
    for freqs, scale in frequency_buffers(model):
        if freqs.shape[-1] != c.shape[-1]:
            continue
        ang = pos[:, None] * freqs.detach().to(c.device, torch.float32).double()[None, :]
        err = max((ang.cos() * scale - c).abs().max().item(), (ang.sin() * scale - s).abs().max().item())
        if err < err_best:
            best, err_best = (freqs.detach().float().cpu(), scale), err
    # float32 angles at position p carry ~p·6e-8 absolute error.
    tol = 1e-5 + 2e-7 * float(pos.max()) if len(pos) else 1e-5
    if best is None or err_best > tol:
        raise UserError(
            "none of the model's rotary frequency buffers reproduces the rotation its attention "
            "layers receive; this architecture needs an entry in anomaly/model_surgery.py"
        )
    return best
