"""CoCA as a drop-in for HF LLaMA-like decoders (``to_coca``), save/load, fine-tuning stages.

The conversion swaps each attention module's class for a subclass whose ``forward``
replaces "rotate q and k" by CoCA's per-token transforms (:mod:`anomaly.coca.attention`)
and otherwise does exactly what HF's does: the model's own rotary module supplies cos and
sin (so linear, dynamic-NTK and YaRN scaling keep working), the KV cache stores the
transformed keys, and the attention itself goes through HF's attention-function registry
(eager, SDPA, FlashAttention, …) as configured. ``k_proj`` keeps its name and becomes the
T projection, so checkpoints save and load with HF's own methods; ``config.coca_variant``
records the variant and :func:`load_coca` re-applies it.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.qwen2 import modeling_qwen2

from anomaly.coca.attention import Variant, check_variant, transform_key, transform_query

CONFIG_KEY = "coca_variant"
"""Config attribute recording the CoCA variant of a converted model."""

# The layout of HF's cos/sin (``cat(freqs, freqs)``, ``rotate_half``) in these families.
_HF_LAYOUT = "half"


class CocaAttentionMixin:
    """``forward`` of a CoCA attention layer, on top of an HF LLaMA-like attention class.

    Uses the base class's ``q_proj``, ``k_proj`` (now T), ``v_proj``, ``o_proj``,
    ``head_dim``, ``scaling``, ``layer_idx``, ``config`` and ``attention_dropout``.
    """

    coca_variant: Variant

    def _coca_attention_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments this family passes to its attention function."""
        return {}

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        attention_mask: Tensor | None = None,
        cache: Any = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        # Older call sites name the cache past_key_values / past_key_value.
        for alias in ("past_key_values", "past_key_value"):
            legacy = kwargs.pop(alias, None)
            cache = cache if cache is not None else legacy
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)  # [batch, seq, heads, d]

        q = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, heads, s, d]
        t = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, kv, s, d]
        v = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [b, kv, s, d]

        cos, sin = position_embeddings  # [b, s, d] each, cat(freqs, freqs) · attention factor
        if cos.shape[-1] != self.head_dim:
            raise ValueError(
                f"CoCA needs RoPE over the whole head ({self.head_dim} dims), but the model "
                f"rotates {cos.shape[-1]}"
            )
        half = self.head_dim // 2
        cos, sin = cos[..., None, :, :half], sin[..., None, :, :half]  # [b, 1, s, d/2]
        q = transform_query(q, cos, sin, self.coca_variant, _HF_LAYOUT)
        k = transform_key(t, cos, sin, self.coca_variant, _HF_LAYOUT)

        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx, kwargs=kwargs)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_llama.eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **self._coca_attention_kwargs(),
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # [b, s, heads·d]
        return self.o_proj(attn_output), attn_weights


# --------------------------------------------------------------------------------------
# Architecture-specific part: which HF attention classes convert, and how.
# (LLaMA-like families whose attention is q/k/v/o projections + full-head RoPE in the
# half layout, with no q/k normalisation.) Keep every family-specific detail here.
# --------------------------------------------------------------------------------------


class CocaLlamaAttention(CocaAttentionMixin, modeling_llama.LlamaAttention):
    """CoCA attention for ``LlamaForCausalLM`` (also SmolLM2, TinyLlama, …)."""


class CocaMistralAttention(CocaAttentionMixin, modeling_mistral.MistralAttention):
    """CoCA attention for ``MistralForCausalLM``."""

    def _coca_attention_kwargs(self) -> dict[str, Any]:
        return {"sliding_window": getattr(self.config, "sliding_window", None)}


class CocaQwen2Attention(CocaAttentionMixin, modeling_qwen2.Qwen2Attention):
    """CoCA attention for ``Qwen2ForCausalLM``."""

    def _coca_attention_kwargs(self) -> dict[str, Any]:
        return {"sliding_window": self.sliding_window}


_COCA_CLASSES: dict[type, type] = {
    modeling_llama.LlamaAttention: CocaLlamaAttention,
    modeling_mistral.MistralAttention: CocaMistralAttention,
    modeling_qwen2.Qwen2Attention: CocaQwen2Attention,
}

# --------------------------------------------------------------------------------------


def _coca_class(module: nn.Module) -> type | None:
    cls = type(module)
    if cls in _COCA_CLASSES.values():
        return cls
    return _COCA_CLASSES.get(cls)


def coca_layers(model: nn.Module) -> list[nn.Module]:
    """The model's CoCA attention modules, in order (empty for an unconverted model)."""
    return [m for m in model.modules() if isinstance(m, CocaAttentionMixin)]


def to_coca(model: PreTrainedModel, variant: Variant) -> PreTrainedModel:
    """Convert a loaded HF LLaMA-like causal LM to CoCA, in place, and return it.

    Every attention layer's ``k_proj`` becomes the T projection (same parameter, same
    name), and its scores become CoCA's (docs/conventions.md §5). Weights are untouched: a pretrained
    model needs fine-tuning (:func:`finetune_stage`) to work well as CoCA. Converting an
    already converted model switches its variant.

    Args:
        model: ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` (or
            their base models).
        variant: ``"slack"`` (the released code) or ``"strict"`` (Eq. 9).

    Returns:
        ``model``, with ``model.config.coca_variant = variant``.
    """
    check_variant(variant)
    converted = 0
    for module in model.modules():
        cls = _coca_class(module)
        if cls is None:
            continue
        module.__class__ = cls
        module.coca_variant = variant
        converted += 1
    if not converted:
        supported = ", ".join(c.__name__ for c in _COCA_CLASSES)
        raise ValueError(
            f"{type(model).__name__} has no attention layer that CoCA can convert; supported "
            f"layers: {supported}"
        )
    setattr(model.config, CONFIG_KEY, variant)
    return model


def load_coca(path: str, **kwargs: Any) -> PreTrainedModel:
    """Load a CoCA model saved with ``save_pretrained`` and re-apply its variant.

    ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``,
    config overrides such as ``rope_parameters={"rope_type": "dynamic", ...}``).
    """
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    variant = getattr(model.config, CONFIG_KEY, None)
    if variant is None:
        raise ValueError(
            f"{path} has no {CONFIG_KEY!r} in its config, so it is not a CoCA checkpoint; "
            "load it with from_pretrained and convert it with to_coca(model, variant)"
        )
    return to_coca(model, variant)


def set_rope_parameters(model: PreTrainedModel, rope_parameters: dict[str, Any]) -> PreTrainedModel:
    """Switch a loaded model's RoPE scaling (e.g. dynamic NTK) in place and return it.

    HF builds each rotary module's frequencies from ``config.rope_parameters`` once, at
    construction, so changing the config alone has no effect; this sets the config and
    rebuilds the rotary modules from it. Works for vanilla and CoCA models alike.
    """
    model.config.rope_parameters = dict(rope_parameters)
    rebuilt = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "inv_freq"):
                fresh = type(child)(config=model.config).to(child.inv_freq.device)
                setattr(parent, name, fresh)
                rebuilt += 1
    if not rebuilt:
        raise ValueError(f"{type(model).__name__} has no rotary embedding module to rebuild")
    return model


# The paper's recipe for turning a pretrained LLaMA into CoCA (docs/conventions.md §6): K (now T) only,
# then Q/K/V, then everything.
FINETUNE_STAGES: dict[int, tuple[str, ...] | None] = {
    1: ("k_proj",),
    2: ("q_proj", "k_proj", "v_proj"),
    3: None,  # every parameter
}


def finetune_stage(model: nn.Module, stage: int) -> list[str]:
    """Set ``requires_grad`` for stage ``stage`` of the paper's three-stage fine-tuning.

    Stage 1 trains only the T projections (``k_proj``), stage 2 the Q, T and V
    projections, stage 3 every parameter; everything else is frozen.

    Returns:
        Names (as in ``model.named_parameters()``) of the parameters that now train.
    """
    if stage not in FINETUNE_STAGES:
        raise ValueError(f"unknown fine-tuning stage {stage!r}; use 1, 2 or 3")
    layers = coca_layers(model)
    if not layers:
        raise ValueError("the model has no CoCA attention layers; convert it with to_coca first")
    projections = FINETUNE_STAGES[stage]
    chosen: set[int] = set()
    if projections is not None:
        for layer in layers:
            for proj in projections:
                chosen.update(id(p) for p in getattr(layer, proj).parameters())
    names = []
    for name, param in model.named_parameters():
        train = projections is None or id(param) in chosen
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names


__all__ = [
    "CONFIG_KEY",
    "FINETUNE_STAGES",
    "CocaAttentionMixin",
    "CocaLlamaAttention",
    "CocaMistralAttention",
    "CocaQwen2Attention",
    "coca_layers",
    "finetune_stage",
    "load_coca",
    "set_rope_parameters",
    "to_coca",
]
