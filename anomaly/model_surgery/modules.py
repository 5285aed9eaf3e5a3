"""Where a loaded HF causal LM keeps its decoder layers, attention modules and rotary
embedding, and the frequency buffers that rotary embedding holds."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from anomaly.model_surgery.refusals import Unsupported

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
_ROTARY_PATHS = ("model.rotary_emb", "gpt_neox.rotary_emb", "transformer.rotary_emb", "model.language_model.rotary_emb")


def _get(obj: object, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


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
