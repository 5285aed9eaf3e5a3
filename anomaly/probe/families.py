"""Which model families the probe reads, proven on tiny random models of each.

Every model type of the installed transformers that is a causal LM and whose config
declares rotary parameters (:func:`rope_families`, read from transformers' own mappings)
is built tiny and random (:func:`tiny_model`) and checked (:func:`check_family`): the
captured q/k must rebuild the model's own eager attention probabilities, or the probe
must refuse the family with one of the understood reasons
(:data:`anomaly.model_surgery.REFUSALS`). ``tests/test_families.py`` asserts it;

    python -m anomaly.probe.families --write docs/families.md

regenerates the table in the docs.
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from anomaly import model_surgery as surgery

TOKENS = 24
"""Tokens per check: longer than the tiny sliding window, so local layers differ from global ones."""
WINDOW = 8
"""Sliding window (and attention chunk) of the tiny models."""
INIT = 0.1
"""Initializer range: large enough that attention is far from uniform (a wrong rotation shows)."""
TOLERANCE = 1e-5
"""Largest difference allowed between rebuilt and eager attention probabilities (float32)."""

SIZES: dict[str, object] = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "initializer_range": INIT,
    "sliding_window": WINDOW,
    "attention_chunk_size": WINDOW,
    # Mixtures of experts.
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "n_shared_experts": 1,
    "expert_hidden_size": 32,
    "moe_k": 2,
    "moe_num_experts": 4,
    # Linear-attention and latent-attention parts of hybrid / MLA models.
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "kv_lora_rank": 16,
    "q_lora_rank": 32,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""Config sizes every tiny model gets, where its config has the field."""

OVERRIDES: dict[str, dict] = {
    "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8},
    # Hybrids whose default layer pattern starts with more state-space layers than two: one
    # of each kind (attention and state space), RoPE switched on where it is optional.
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 8, "mamba_d_state": 16},
    "granitemoehybrid": {
        "layer_types": ["linear_attention", "full_attention"], "position_embedding_type": "rope",
        "mamba_n_heads": 8, "mamba_d_state": 16,
    },
    "recurrent_gemma": {"num_hidden_layers": 3},  # (recurrent, recurrent, attention)
    # Its image and audio encoders are built with the model: shrunk, else 870M parameters.
    "phi4_multimodal": {
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 28, "crop_size": 28,
        },
        "audio_config": {
            "hidden_size": 32, "intermediate_size": 32, "num_blocks": 1, "num_attention_heads": 2,
            "ext_pw_out_channel": 32, "depthwise_separable_out_channel": 32, "nemo_conv_channels": 32,
        },
    },
    # Kolibri 1.1 (transformers 5.25): its indexer scores keys with at most the query heads of
    # key head 0, and its pool must be a multiple of the compression.
    "kolibri1_1": {
        "index_num_heads": 1, "index_topk": 4, "index_pool_size": 16, "index_compression": 4,
        "index_num_local_tokens": 4, "index_num_sink_tokens": 2, "head_dim": 16,
    },
    "zaya": {"num_experts_per_tok": 1},  # the only value ZAYA accepts
    "dots3_note_text": {"num_key_value_heads": 4},  # must equal the query heads
    # Its vision and audio encoders are built with the model: shrunk, adapters to the text width.
    "dots3_note": {
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "moe_intermediate_size": 16, "num_local_experts": 2, "adapter_in_dim": 32, "adapter_out_dim": 64,
            "per_layer_config": {},
        },
        "audio_config": {
            "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "downsample_hidden_size": 16, "adapter_input_size": 32, "adapter_out_dim": 64,
        },
    },
    # DBRX keeps its attention sizes in a sub-config; its checkpoints' attn_config carries the
    # rope_theta the model reads (the config class itself declares none). QKV clipping on, as
    # in DBRX's checkpoints (clip_qkv=8): small enough here that some entries are clipped.
    "dbrx": {
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 0.2, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
    },
    # Its rotary module reads RoPE parameters per layer type; the default config holds one flat set.
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # The default leaves layer_types to be filled in by the checkpoint: one conv, one attention.
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    # Two hybrid layers (a state-space block plus the shared attention block, called at both), RoPE on.
    "zamba2": {
        "layers_block_type": ["hybrid", "hybrid"], "n_mamba_heads": 8, "mamba_d_state": 16,
        "adapter_rank": 8, "use_mem_rope": True,
    },
    # Qwen4-Exp's attention layers are "indexed": a QSA indexer picks which key blocks each query
    # sees. A budget covering all the test's tokens keeps the mask causal, so the rebuild (which
    # does not rerun the indexer) compares like with like; the q/k read are the same either way.
    "qwen4_exp_text": {
        "layer_types": ["linear_attention", "indexed_attention"], "hc_count": 2, "hc_lowrank": 8,
        "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 32,
        "indexer_compress_ratio": 4,
    },
    # Gemma 3n: KV sharing in the second half (as in E2B/E4B), AltUp and LAuReL shrunk.
    "gemma3n_text": {
        "layer_types": ["sliding_attention", "full_attention"] * 2, "num_hidden_layers": 4,
        "num_kv_shared_layers": 2, "activation_sparsity_pattern": [0.0] * 4, "laurel_rank": 8,
        "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 128, "altup_num_inputs": 2,
    },
    # Gemma 4 E2B/E4B-style KV sharing: the last two layers reuse the first two's keys.
    "gemma4_text": {
        "layer_types": ["sliding_attention", "full_attention"] * 2, "num_hidden_layers": 4,
        "num_kv_shared_layers": 2,
    },
}
"""Per family: config sizes where :data:`SIZES` alone does not give a small valid config."""


NOT_BUILT: dict[str, str] = {
    "blt": "byte latent transformer: four sub-models (patcher, local encoder and decoder, global "
    "transformer) whose default sizes take gigabytes; not shrunk here",
    "gemma3n": "its vision tower is a timm model and timm is not installed here (not a dependency of this "
    "project); its text decoder is checked as gemma3n_text",
}
"""Families :func:`check_built` does not build, with the reason."""

SINKS_AFTER_SOFTMAX = {"granite_swa", "granitemoe_swa"}
"""Families that apply their attention sinks by rescaling the attention output, so the
probabilities they report (``output_attentions``) are the softmax without the sink."""


def _fields(config_class: type) -> set[str]:
    if dataclasses.is_dataclass(config_class):
        return {f.name for f in dataclasses.fields(config_class)}
    import inspect

    return set(inspect.signature(config_class.__init__).parameters)


def _text_config_class(model_type: str) -> type:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    return (getattr(cls, "sub_configs", None) or {}).get("text_config", cls)


def rope_families() -> list[str]:
    """Every causal-LM model type of the installed transformers whose (text) config class
    declares rotary parameters, sorted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(
        t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        if t in CONFIG_MAPPING and surgery.declares_rotary(_text_config_class(t))
    )


def _sizes(config_class: type, model_type: str) -> dict:
    names = _fields(config_class)
    aliases = getattr(config_class, "attribute_map", None) or {}  # GPT-J: hidden_size -> n_embd, ...
    out = {aliases.get(k, k): v for k, v in SIZES.items() if aliases.get(k, k) in names}
    out.update(OVERRIDES.get(model_type, {}))
    if "layer_types" in names:
        # One layer of each kind the family's default config mixes (sliding and full, ...).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            default = config_class().layer_types or []
        kinds = list(dict.fromkeys(default))
        if len(kinds) > 1:
            out.setdefault("layer_types", kinds)
            out["num_hidden_layers"] = len(out["layer_types"])
    return out


def tiny_config(model_type: str):
    """A small config of family ``model_type`` (text part shrunk; eager attention)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    text_cls = _text_config_class(model_type)
    if text_cls is cls:
        return cls(**_sizes(cls, model_type))
    top = {k: v for k, v in _sizes(cls, model_type).items() if k not in ("num_hidden_layers",)}
    # The text part takes its own family's overrides (qwen4_exp's text part: qwen4_exp_text's).
    return cls(text_config=_sizes(text_cls, text_cls.model_type), **top)


def tiny_model(model_type: str, seed: int = 0) -> nn.Module:
    """A random ``AutoModelForCausalLM`` of family ``model_type`` from :func:`tiny_config`,
    float32, eager attention, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


@dataclass
class FamilyCheck:
    """The outcome of :func:`check_family` for one model type."""

    model_type: str
    """``config.model_type``."""
    supported: bool
    """The capture rebuilds the model's attention (``True``) or the probe refuses it."""
    category: str | None = None
    """For a refusal, its key in :data:`anomaly.model_surgery.REFUSALS`."""
    reason: str = ""
    """For a refusal, the one-line message the user sees."""
    layers: dict[int, str] = field(default_factory=dict)
    """Checked decoder layer → its kind (``full_attention``, ``sliding_attention``, ...)."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Decoder layers the probe does not read, with the reason."""
    layout: str | None = None
    """The layout the layers apply (docs/conventions.md §1)."""
    max_error: float | None = None
    """Largest difference between rebuilt and eager attention probabilities."""


def check_family(model_type: str, tokens: int = TOKENS, model: nn.Module | None = None) -> FamilyCheck:
    """Build a tiny ``model_type`` model, capture it, and rebuild its eager attention.

    Returns:
        :class:`FamilyCheck`: supported with the rebuild error, or refused with the reason.
        Any other exception (the tiny model cannot be built, the capture crashes) propagates.
    """
    from anomaly.probe.activations import attention_probabilities, capture

    model = model if model is not None else tiny_model(model_type)
    config = surgery.config_of(model)
    ids = torch.randint(3, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(1))
    try:
        cap = capture(model, ids)
    except surgery.Unsupported as e:
        return FamilyCheck(model_type, False, e.category, str(e))
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=False)
    kinds = getattr(config, "layer_types", None) or []
    # Hybrid models report attentions for their attention layers only.
    order = [s.index for s in surgery.attention_sites(model).sites]
    position = {i: n for n, i in enumerate(order if len(out.attentions) == len(order) else range(len(out.attentions)))}
    layers, worst = {}, 0.0
    for layer in cap.layers:
        if model_type in SINKS_AFTER_SOFTMAX:
            layer = dataclasses.replace(layer, sinks=None)
        hf = out.attentions[position[layer.index]][0].float()  # [heads, seq, seq]
        worst = max(worst, (attention_probabilities(layer) - hf).abs().max().item())
        layers[layer.index] = kinds[layer.index] if layer.index < len(kinds) else "full_attention"
    return FamilyCheck(model_type, True, layers=layers, skipped=cap.skipped, layout=cap.layout, max_error=worst)


def check_built(model_type: str) -> FamilyCheck | Exception:
    """:func:`check_family`, or the exception raised while *building* the tiny model (a
    limit of :func:`tiny_config`, not of the probe: listed as not checked)."""
    if model_type in NOT_BUILT:
        return NotImplementedError(NOT_BUILT[model_type])
    try:
        model = tiny_model(model_type)
    except Exception as e:  # any failure of transformers to build this config
        return e
    return check_family(model_type, model=model)


def _row(result: FamilyCheck | Exception, model_type: str) -> str:
    if isinstance(result, Exception):
        first = str(result).strip().splitlines()[0][:120] if str(result).strip() else type(result).__name__
        return f"| `{model_type}` | not checked | | | tiny config not built: {first.replace('|', '/')} |"
    if result.supported:
        layers = ", ".join(f"{i} ({k.replace('_attention', '')})" for i, k in result.layers.items())
        notes = "; ".join(f"layer {i} not probed: {why}" for i, why in result.skipped.items())
        return f"| `{model_type}` | **supported** | {layers} | {result.layout} | {notes} |"
    # The message opens with the model's own type (llama4's text model says llama4_text).
    why = result.reason.split("; the probe supports")[0].split(" ", 1)[1]
    return f"| `{model_type}` | refused: {result.category} | | | {why} |"


def table(results: dict[str, FamilyCheck | Exception]) -> str:
    """docs/families.md: the headline count and one row per family."""
    import transformers

    supported = sum(isinstance(r, FamilyCheck) and r.supported for r in results.values())
    refused = sum(isinstance(r, FamilyCheck) and not r.supported for r in results.values())
    unbuilt = len(results) - supported - refused
    lines = [
        "# Model families the probe reads",
        "",
        "Generated by `python -m anomaly.probe.families --write docs/families.md`; do not edit by hand.",
        "",
        f"**{supported} of the {len(results)} causal-LM families of transformers {transformers.__version__} "
        f"that declare rotary parameters are supported**; {refused} are refused with a reason, "
        f"{unbuilt} could not be built as tiny models here and are not checked.",
        "",
        "Supported: a tiny random model's captured pre-RoPE q/k, rotated, rebuild its eager attention "
        f"probabilities to {TOLERANCE:g} on the layers listed (one of each kind the family mixes), and every "
        "capture checks itself against the q/k each layer hands its attention function "
        "(anomaly/probe/activations.py). Refused: `capture` raises a one-line error with the reason.",
        "",
        "| family | status | layers checked (kind) | layout | notes |",
        "|---|---|---|---|---|",
    ]
    lines += [_row(results[t], t) for t in sorted(results)]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m anomaly.probe.families [--write PATH] [FAMILY ...]``"""
    import os

    import transformers

    from anomaly.io import write_text

    parser = argparse.ArgumentParser(prog="python -m anomaly.probe.families", description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="model types to check (default: all)")
    parser.add_argument("--write", metavar="PATH", help="write the markdown table here (e.g. docs/families.md)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    results = {t: check_built(t) for t in (args.families or rope_families())}
    text = table(results)
    if args.write:
        write_text(Path(args.write), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
