"""Every HF RoPE causal-LM family: the probe reads it exactly or refuses it with a reason.

The families come from transformers' own mappings (:func:`anomaly.probe.families.rope_families`);
each is built tiny and random, and its captured q/k must rebuild its eager attention
probabilities (sliding and full layers where it has both), or ``capture`` must raise
:class:`anomaly.model_surgery.Unsupported` with an understood reason. The capture's own
check (captured q/k, rotated, equal what each layer hands its attention) is tested on
LLaMA with the rotation tampered with.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

from anomaly import model_surgery as surgery
from anomaly.probe import families
from anomaly.probe.activations import capture

warnings.filterwarnings("ignore")

NOT_BUILT = set(families.NOT_BUILT)
"""Families whose tiny config (anomaly.probe.families.SIZES) transformers does not build here;
docs/families.md lists them as not checked. A family that starts building must leave this set."""

FAMILIES = families.rope_families()

DOCS = Path(__file__).resolve().parent.parent / "docs" / "families.md"


def _documented() -> set[str]:
    """The families of docs/families.md, which was made with the locked transformers."""
    return set(re.findall(r"^\| `([^`]+)` \|", DOCS.read_text(encoding="utf-8"), flags=re.M))


DOCUMENTED = _documented()


class NewFamilyWarning(UserWarning):
    """A RoPE family of the installed transformers that docs/families.md does not list yet."""


def test_enumeration_is_transformers_own():
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert set(FAMILIES) <= set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert len(FAMILIES) > 100
    assert {"llama", "gemma3_text", "gpt_oss", "qwen3_next", "llama4_text", "gptj", "gpt_neox"} <= set(FAMILIES)
    assert not {"gpt2", "opt", "bloom", "mamba"} & set(FAMILIES)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAMILIES)
def test_family_rebuilds_or_refuses(model_type):
    result = families.check_built(model_type)
    if model_type not in DOCUMENTED:
        # New in a transformers newer than the lock (requirements.lock): reported, never failed,
        # until someone supports or refuses it and regenerates docs/families.md.
        outcome = (f"not built: {str(result).splitlines()[0][:100] if str(result) else type(result).__name__}"
                   if isinstance(result, Exception) else
                   "supported" if result.supported else f"refused ({result.category})")
        with warnings.catch_warnings():
            warnings.simplefilter("always", NewFamilyWarning)
            warnings.warn(NewFamilyWarning(f"{model_type}: new family, not in docs/families.md; {outcome}"))
        return
    if isinstance(result, Exception):
        assert model_type in NOT_BUILT, f"{model_type}: tiny model not built: {result}"
        return
    assert model_type not in NOT_BUILT, f"{model_type} builds now: remove it from NOT_BUILT"
    if not result.supported:
        assert result.category in surgery.REFUSALS
        assert result.reason.startswith(model_type) and "\n" not in result.reason
        return
    assert result.layers, "supported but no layer checked"
    assert result.max_error < families.TOLERANCE, result
    kinds = set(getattr(surgery.text_config(families.tiny_config(model_type)), "layer_types", None) or [])
    rope_kinds = {k for i, k in result.layers.items()} | {
        k for k in kinds if any(w in k for w in ("linear", "mamba", "conv", "recurrent"))
    }
    # Sliding and full layers both checked where the family has both (and neither is NoPE).
    nope = {i for i, why in result.skipped.items() if "NoPE" in why}
    if {"sliding_attention", "full_attention"} <= kinds and not nope:
        assert {"sliding_attention", "full_attention"} <= rope_kinds, result.layers


def test_documented_families_are_the_installed_ones():
    """docs/families.md lists the families of the installed transformers (the locked one): a
    family it lists that transformers no longer has means the table is stale."""
    assert len(DOCUMENTED) > 100
    gone = DOCUMENTED - set(FAMILIES)
    assert not gone, f"docs/families.md lists families this transformers lacks: {sorted(gone)}"


def test_indexed_sparse_attention_refused():
    """Kolibri 1.1 (transformers 5.25) scores top-k selected keys rounded to NVFP4 after the
    rotation: refused by its indexed layer kind, whatever else the model looks like."""
    model = families.tiny_model("llama")
    model.config.layer_types = ["indexed_attention", "full_attention"]
    with pytest.raises(surgery.Unsupported) as err:
        capture(model, torch.arange(3, 19))
    assert err.value.category == "sparse_rounded_keys"
    assert str(err.value).startswith("llama lets each query attend to a top-k selection of keys")


def test_popular_families_supported():
    for model_type in ("gemma3_text", "gpt_oss", "qwen3_next", "exaone4", "apertus"):
        result = families.check_family(model_type)
        assert result.supported and result.max_error < families.TOLERANCE, result


@pytest.mark.parametrize("variant", [
    {"new_decoder_architecture": True, "num_kv_heads": 2},  # Falcon-40B/180B: grouped keys
    {"multi_query": False},  # one key per head
])
def test_falcon_fused_layouts(variant):
    """The tiny default is multi-query (Falcon-7B); the other two fused layouts rebuild too,
    and an ALiBi Falcon is refused as having no RoPE."""
    from transformers import AutoModelForCausalLM

    config = families.tiny_config("falcon")
    for key, value in variant.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    result = families.check_family("falcon", model=model)
    assert result.supported and result.max_error < families.TOLERANCE, result
    config.alibi = True
    assert families.check_family("falcon", model=model).category == "no_rope"


def test_norm_after_rotation_refused():
    """HunYuan normalises q/k after the rotation: refused, never a wrong capture."""
    result = families.check_family("hunyuan_v1_dense")
    assert not result.supported and result.category == "norm_after_rotation"
    assert result.reason.startswith("hunyuan_v1_dense normalises q/k after the rotary rotation")


def test_ambiguous_shape_resolved():
    """Qwen3's per-head q norm output is [b, s, h, d]; with seq = heads the shape alone could
    also be [b, h, s, d]: the capture keeps the reading the attention confirms."""
    result = families.check_family("qwen3", tokens=4)  # 4 query heads, 4 tokens
    assert result.supported and result.max_error < families.TOLERANCE


def _tampered(monkeypatch, after_rotation):
    from transformers.models.llama import modeling_llama

    original = modeling_llama.apply_rotary_pos_emb

    def apply(q, k, cos, sin, *args, **kwargs):
        q, k = original(q, k, cos, sin, *args, **kwargs)
        return after_rotation(q), after_rotation(k)

    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", apply)
    model = families.tiny_model("llama")
    ids = torch.randint(3, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(surgery.Unsupported) as err:
        capture(model, ids)
    assert model.config._attn_implementation == "eager"  # restored after the refusal
    return err.value


def test_capture_refuses_what_it_cannot_reproduce(monkeypatch):
    assert _tampered(monkeypatch, lambda x: x * 1.001).category == "unverified"


def test_capture_refuses_norm_after_rotation(monkeypatch):
    assert _tampered(monkeypatch, lambda x: x / x.norm(dim=-1, keepdim=True)).category == "norm_after_rotation"


def test_untampered_capture_restores_attention():
    from anomaly.probe import routing

    model = families.tiny_model("llama")
    cap = capture(model, torch.arange(3, 19))
    assert len(cap.layers) == 2 and not cap.skipped
    assert model.config._attn_implementation == "eager" and not routing.watching()


@pytest.mark.parametrize("model_type, category", [
    ("jetmoe", "routed_queries"),  # mixture of attention heads
    ("hrm_text", "reused_layers"),  # looped layer stacks
    ("longcat_flash", "mla"),  # two MLA blocks per layer
])
def test_refusals_name_the_architecture(model_type, category):
    assert families.check_family(model_type).category == category


def test_dbrx_clipped_qkv_rebuilds():
    """DBRX clamps its fused projection before the rotation; the tiny model's clip bites."""
    model = families.tiny_model("dbrx")
    site = surgery.attention_sites(model).sites[0]
    outs = []
    handle = site.sources[0].register_forward_hook(lambda m, a, out: outs.append(out))
    with torch.no_grad():
        model(torch.arange(3, 27)[None])
    handle.remove()
    assert outs[0].abs().max() > site.attention.clip_qkv  # entries were clipped
    result = families.check_family("dbrx", model=model)
    assert result.supported and result.max_error < families.TOLERANCE
