"""anomaly.coca's HF drop-in on tiny random LLaMA-like models.

Each converted attention layer is checked against an independent reference built from the
layer's own projections and :func:`anomaly.coca.einsum_attention` (materialised scores,
frequencies from :mod:`anomaly.rope`, not from the model's rotary module).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from anomaly import analytic, rope
from anomaly.coca import (
    coca_qk,
    einsum_attention,
    finetune_stage,
    load_coca,
    set_rope_parameters,
    to_coca,
)
from anomaly.coca.hf import CONFIG_KEY, coca_layers
from conftest import tiny_model

ARCHS = ["llama", "mistral", "qwen2"]
VARIANTS = ["strict", "slack"]


@contextlib.contextmanager
def capture_attention(model):
    """Record (hidden_states input, attention output) of every CoCA layer."""
    records: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []

    def hook(module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        records.append((hidden.detach(), output[0].detach()))

    try:
        for layer in coca_layers(model):
            handles.append(layer.register_forward_hook(hook, with_kwargs=True))
        yield records
    finally:
        for h in handles:
            h.remove()


def heads_view(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    b, s, _ = x.shape
    return x.view(b, s, -1, head_dim).transpose(1, 2)  # [b, s, h·d] -> [b, h, s, d]


def reference_layer(attn, hidden, variant, theta, attention_factor=1.0):
    """A CoCA attention layer from its projections and the einsum formulation."""
    d = attn.head_dim
    q = heads_view(attn.q_proj(hidden), d)
    t = heads_view(attn.k_proj(hidden), d)
    v = heads_view(attn.v_proj(hidden), d)
    # The attention factor multiplies both transformed vectors: scores grow by its square.
    out = einsum_attention(
        q, t, v, variant=variant, inv_freq=theta, scale=attn.scaling * attention_factor**2
    )
    b, _, s, _ = out.shape
    return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def assert_layers_match(model, ids, variant, theta, attention_factor=1.0, tol=1e-5):
    with torch.no_grad(), capture_attention(model) as records:
        model(ids)
        assert len(records) == model.config.num_hidden_layers
        for attn, (hidden, output) in zip(coca_layers(model), records):
            expected = reference_layer(attn, hidden, variant, theta, attention_factor)
            torch.testing.assert_close(output, expected, rtol=tol, atol=tol)


def ids_for(model, length, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


def default_theta(model):
    cfg = model.config
    return rope.inv_freq(cfg.head_dim, cfg.rope_parameters["rope_theta"])


# --------------------------------------------------------------------------------------
# Conversion and equivalence
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_converted_layers_match_reference(arch, variant):
    model = to_coca(tiny_model(arch).double(), variant)
    assert getattr(model.config, CONFIG_KEY) == variant
    assert_layers_match(model, ids_for(model, 17), variant, default_theta(model))


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdpa_and_eager_backends_agree(variant):
    eager = to_coca(tiny_model("llama"), variant)
    sdpa = to_coca(tiny_model("llama", attn_implementation="sdpa"), variant)
    sdpa.config._attn_implementation = "sdpa"
    ids = ids_for(eager, 20)
    with torch.no_grad():
        torch.testing.assert_close(sdpa(ids).logits, eager(ids).logits, rtol=1e-4, atol=1e-5)


def test_conversion_changes_the_model_and_keeps_k_proj():
    vanilla = tiny_model("llama")
    names = [n for n, _ in vanilla.named_parameters()]
    ids = ids_for(vanilla, 12)
    with torch.no_grad():
        before = vanilla(ids).logits
        coca = to_coca(vanilla, "slack")
        after = coca(ids).logits
    assert coca is vanilla
    assert [n for n, _ in coca.named_parameters()] == names
    assert any("self_attn.k_proj.weight" in n for n in names)
    assert not torch.allclose(before, after)


def test_reconverting_switches_variant():
    model = tiny_model("llama")
    ids = ids_for(model, 10)
    with torch.no_grad():
        strict = to_coca(model, "slack") and to_coca(model, "strict")(ids).logits
        fresh = to_coca(tiny_model("llama"), "strict")(ids).logits
    torch.testing.assert_close(strict, fresh)
    assert {layer.coca_variant for layer in coca_layers(model)} == {"strict"}


@pytest.mark.parametrize("arch", ["gpt_neox", "qwen3"])
def test_unsupported_families_raise(arch):
    with pytest.raises(ValueError, match="no attention layer that CoCA can convert"):
        to_coca(tiny_model(arch), "slack")


def test_bad_variant_raises():
    with pytest.raises(ValueError, match="unknown CoCA variant"):
        to_coca(tiny_model("llama"), "relaxed")


# --------------------------------------------------------------------------------------
# RoPE scaling from the config keeps working
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "params",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    ],
    ids=["linear", "dynamic", "yarn"],
)
def test_rope_scaling_from_config(variant, params):
    base, original, length = 10000.0, 32, 80  # evaluated beyond the training length
    params = {**params, "rope_theta": base}
    model = tiny_model("llama", max_position_embeddings=original, rope_parameters=params).double()
    to_coca(model, variant)
    scaling = rope.RopeScaling.from_hf(params, original)
    theta = rope.inv_freq(model.config.head_dim, base, scaling, seq_len=length)
    # The scaling must actually change the frequencies at this length.
    assert not torch.allclose(theta, rope.inv_freq(model.config.head_dim, base))
    assert_layers_match(
        model, ids_for(model, length, batch=1), variant, theta, rope.attention_factor(scaling),
        tol=1e-4,  # HF computes the angles in float32
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_set_rope_parameters_switches_to_dynamic_ntk(variant, tmp_path):
    model = to_coca(tiny_model("llama", max_position_embeddings=32).double(), variant)
    params = {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}
    set_rope_parameters(model, params)
    theta = rope.inv_freq(
        model.config.head_dim, 10000.0, rope.RopeScaling.from_hf(params, 32), seq_len=70
    )
    assert_layers_match(model, ids_for(model, 70, batch=1), variant, theta, tol=1e-4)
    # The loader path the ablation uses: config override at load time.
    model.save_pretrained(tmp_path)
    loaded = load_coca(tmp_path, rope_parameters=params, dtype=torch.float64)
    ids = ids_for(model, 70, batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


# --------------------------------------------------------------------------------------
# Save / load, generation with the cache, training
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip(variant, tmp_path):
    model = to_coca(tiny_model("llama"), variant)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = load_coca(tmp_path)
    assert loaded.config.coca_variant == variant
    assert all(layer.coca_variant == variant for layer in coca_layers(loaded))
    ids = ids_for(model, 15)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_load_coca_refuses_a_vanilla_checkpoint(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a CoCA checkpoint"):
        load_coca(tmp_path)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_with_cache_equals_without(arch, variant):
    model = to_coca(tiny_model(arch), variant)
    ids = ids_for(model, 9)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kw)
        uncached = model.generate(ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("variant", VARIANTS)
def test_incremental_logits_equal_full_pass(variant):
    from transformers import DynamicCache

    model = to_coca(tiny_model("llama").double(), variant)
    ids = ids_for(model, 14, batch=1)
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :8], cache=cache, use_cache=True).logits]
        for i in range(8, 14):
            steps.append(model(ids[:, i : i + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-10, atol=1e-10)
    # The cache holds one transformed key per token: the same size as a vanilla cache.
    layer0 = cache.layers[0]
    assert layer0.keys.shape == (1, model.config.num_key_value_heads, 14, model.config.head_dim)


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_flow_through_t(variant):
    model = to_coca(tiny_model("llama"), variant).train()
    ids = ids_for(model, 16)
    loss = model(ids, labels=ids).loss
    loss.backward()
    for layer in coca_layers(model):
        grad = layer.k_proj.weight.grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_one_training_step_lowers_the_loss():
    torch.manual_seed(0)
    model = to_coca(tiny_model("llama"), "slack").train()
    ids = ids_for(model, 24, batch=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_finetune_stages():
    model = to_coca(tiny_model("llama"), "slack")
    all_names = [n for n, _ in model.named_parameters()]
    stage1 = finetune_stage(model, 1)
    assert stage1 and all(".self_attn.k_proj." in n for n in stage1)
    assert len(stage1) == model.config.num_hidden_layers
    stage2 = finetune_stage(model, 2)
    assert {n.split(".self_attn.")[1].split(".")[0] for n in stage2} == {"q_proj", "k_proj", "v_proj"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(stage2)
    assert finetune_stage(model, 3) == all_names
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="stage"):
        finetune_stage(model, 4)
    with pytest.raises(ValueError, match="to_coca"):
        finetune_stage(tiny_model("llama"), 1)


def test_stage_one_trains_only_t():
    model = to_coca(tiny_model("llama"), "strict").train()
    finetune_stage(model, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = ids_for(model, 16)
    model(ids, labels=ids).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".k_proj." in n for n in changed)


# --------------------------------------------------------------------------------------
# Geometry of a converted model
# --------------------------------------------------------------------------------------


def test_strict_model_effective_initial_angles_are_zero():
    model = to_coca(tiny_model("llama").double(), "strict")
    ids = ids_for(model, 20, batch=1)
    theta = default_theta(model)
    with torch.no_grad(), capture_attention(model) as records:
        model(ids)
        for attn, (hidden, _) in zip(coca_layers(model), records):
            q = heads_view(attn.q_proj(hidden), attn.head_dim)
            t = heads_view(attn.k_proj(hidden), attn.head_dim)
            qc, kc = coca_qk(q, t, variant="strict", inv_freq=theta, rotated=False)
            kc = kc.repeat_interleave(q.shape[1] // t.shape[1], dim=1)  # [1, heads, s, d]
            # Every (query, key) pair: Θ is 0 wherever both slices are non-zero.
            angles = analytic.initial_angle(qc[..., :, None, :], kc[..., None, :, :])
            dist = torch.minimum(angles, 2 * math.pi - angles)
            assert dist.max() < 1e-9
