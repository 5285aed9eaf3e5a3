"""anomaly.probe.capture against the models themselves.

* Rebuild: the captured pre-RoPE q/k, rotated by ``anomaly.rope``, give the model's own
  eager attention probabilities (every tiny family, RoPE scalings, interleaved layouts,
  and the real SmolLM2).
* Half precision: bf16/fp16 models pass the capture's checks and measure as float32 does;
  rotary tables off by a kernel glitch are accepted, off by more refused.
* The capture's own machinery: non-finite activations refused, every hook removed and every
  attention implementation restored however the capture ends.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import reference as ref
from anomaly import rope
from anomaly.probe import attention_probabilities, capture, probe
from probe_helpers import INIT, ids_for, nan_llama

TOL = 1e-5  # float32 probabilities


def rebuild_errors(model, ids) -> tuple:
    """Capture, rebuild every layer's probabilities and compare with eager attention."""
    cap = capture(model, ids)
    with torch.no_grad():
        out = model(ids, output_attentions=True, use_cache=False)
    assert len(out.attentions) == len(cap.layers) == model.config.num_hidden_layers
    errs, wrong, spread = [], [], []
    other = {"half": "interleaved", "interleaved": "half"}[cap.layout]
    for l, layer in enumerate(cap.layers):
        hf = out.attentions[l][0].float()  # [heads, seq, seq]
        mine = attention_probabilities(layer)
        assert mine.shape == hf.shape
        errs.append((mine - hf).abs().max().item())
        # Controls: the comparison must be able to fail.
        wrong.append((attention_probabilities(replace(layer, layout=other)) - hf).abs().max().item())
        t = hf.shape[-1]
        uniform = torch.ones(t, t).tril() / torch.arange(1, t + 1)[:, None]
        spread.append((hf - uniform).abs().max().item())
    return cap, errs, wrong, spread


def assert_rebuilds(model, ids):
    cap, errs, wrong, spread = rebuild_errors(model, ids)
    assert max(errs) < TOL, errs
    assert min(spread) > 0.05, "attention is nearly uniform; the test could not see a wrong rotation"
    assert min(wrong) > 1e-3, "the other layout rebuilds too; the test cannot tell layouts apart"
    return cap


# --------------------------------------------------------------------------------------
# 1. Rebuild on the tiny families
# --------------------------------------------------------------------------------------


def test_rebuild_tiny_families(tiny_arch, make_tiny_model):
    model = make_tiny_model(tiny_arch, initializer_range=INIT)
    t = 40
    cap = assert_rebuilds(model, ids_for(model, t))
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    d_rot = head_dim // 2 if tiny_arch == "gpt_neox" else head_dim  # rotary_pct 0.5
    assert cap.layout == "half"
    assert (cap.n_heads, cap.n_kv_heads, cap.head_dim, cap.rotary_dim) == (heads, kv, head_dim, d_rot)
    for l in range(cfg.num_hidden_layers):
        assert cap.q[l].shape == (heads, t, d_rot)
        assert cap.k[l].shape == (kv, t, d_rot)
        assert cap.inv_freq[l].shape == (d_rot // 2,)
        assert cap.layers[l].q_pass.shape == (heads, t, head_dim - d_rot)
        # No scaling configured: θ_j = base^(-2j/d_rot), from the model's own base.
        expected = ref.freqs(d_rot, model.config.rope_parameters["rope_theta"])
        np.testing.assert_allclose(cap.inv_freq[l].double().numpy(), expected, rtol=1e-6)
        assert cap.rope_scale[l] == 1.0
    assert torch.equal(cap.positions, torch.arange(t))


SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_rebuild_rope_scaling(name, make_tiny_model):
    base, original, t = 10000.0, 32, 80  # probed beyond the training length (dynamic rescales)
    params = {**SCALINGS[name], "rope_theta": base}
    model = make_tiny_model("llama", initializer_range=INIT, max_position_embeddings=original, rope_parameters=params)
    cap = assert_rebuilds(model, ids_for(model, t))
    scaling = rope.RopeScaling.from_hf(params, original)
    head_dim = model.config.head_dim
    expected = rope.inv_freq(head_dim, base, scaling, seq_len=t).double()
    default = rope.inv_freq(head_dim, base).double()
    for l in range(len(cap.layers)):
        got = cap.inv_freq[l].double()
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        assert not torch.allclose(got, default), "the scaling did not change the frequencies"
        assert cap.rope_scale[l] == pytest.approx(rope.attention_factor(scaling), rel=1e-6)
    if name == "yarn":
        assert cap.rope_scale[0] == pytest.approx(1 + 0.1 * math.log(4.0), rel=1e-6)
    else:
        assert cap.rope_scale[0] == 1.0


GQA = {"num_key_value_heads": 2, "head_dim": 16}
INTERLEAVED = {
    # Cohere builds an interleaved table; GLM and Helium build a half table (cat(f, f)) and
    # re-interleave it inside their apply_rotary_pos_emb, so only the applied rotation tells.
    # GPT-J and CodeGen pass (sin, cos) at half width and rotate inside their attention;
    # CodeGen's fused projection is laid out per model-parallel shard.
    "cohere": GQA,
    "glm": {**GQA, "partial_rotary_factor": 0.5, "pad_token_id": 0},
    "helium": GQA,
    "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8},
}


@pytest.mark.parametrize("arch", sorted(INTERLEAVED))
def test_rebuild_interleaved_families(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    from anomaly.model_surgery import rope_base_of

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        arch, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256,
        initializer_range=INIT, bos_token_id=1, eos_token_id=2, **INTERLEAVED[arch],
    )
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    t = 40
    cap = assert_rebuilds(model, ids_for(model, t))
    assert cap.layout == "interleaved"
    d_rot = 16 if arch in ("cohere", "helium") else 8
    kv = INTERLEAVED[arch].get("num_key_value_heads", 4)
    assert cap.q[0].shape == (4, t, d_rot) and cap.k[0].shape == (kv, t, d_rot)
    np.testing.assert_allclose(cap.inv_freq[0].double().numpy(), ref.freqs(d_rot, rope_base_of(cfg)), rtol=1e-6)
    result = probe(model, ids_for(model, t)[0], bins=8)  # the statistics run on it too
    assert result.layout == "interleaved" and result.rotary_dim == d_rot


# --------------------------------------------------------------------------------------
# 2. Rebuild on the real SmolLM2
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rebuild_real_smollm2(smollm2):
    from anomaly.corpus import default_document

    ids = smollm2.tokenizer(default_document().read()[:2000], return_tensors="pt", add_special_tokens=False)["input_ids"][:, :64]
    assert ids.shape == (1, 64)
    before = smollm2.config._attn_implementation
    smollm2.set_attn_implementation("eager")
    try:
        cap, errs, wrong, spread = rebuild_errors(smollm2, ids)
    finally:
        smollm2.set_attn_implementation(before)
    assert smollm2.config._attn_implementation == before
    assert max(errs) < TOL, errs
    assert min(wrong) > 1e-3 and min(spread) > 0.05
    assert cap.layout == "half"
    assert len(cap.layers) == 30
    assert cap.q[0].shape == (9, 64, 64) and cap.k[0].shape == (3, 64, 64)
    np.testing.assert_allclose(cap.inv_freq[0].double().numpy(), ref.freqs(64, 1e5), rtol=1e-6)


# --------------------------------------------------------------------------------------
# 3. Models in bfloat16 and float16 (how a GPU probe runs by default)
# --------------------------------------------------------------------------------------

# Worst differences measured from float32 (512 tokens, these three families, bf16 and fp16):
# 3.7e-4 per head, 1.1e-3 per slice; a model in half precision rounds its own activations,
# so its shares cannot be float32's exactly. The heads' shares spread by ≥ 0.027, the
# slices' by ≥ 0.16: a capture off by anything more than rounding would show.
HALF_TOL_HEAD, HALF_TOL_SLICE = 1e-3, 3e-3


@pytest.mark.parametrize("arch, dtype", [
    ("llama", "bfloat16"), ("llama", "float16"), ("qwen3", "bfloat16"), ("gpt_neox", "bfloat16"),
])
def test_probe_half_precision_model_matches_float32(arch, dtype, make_tiny_model):
    """A bf16/fp16 model passes the capture's checks (its rotary table is rounded to its own
    dtype) and its case-(d) shares are float32's to within the model's own rounding."""
    model = make_tiny_model(arch, max_position_embeddings=1024, initializer_range=INIT)
    ids = torch.randint(0, 128, (512,), generator=torch.Generator().manual_seed(0))
    reference = probe(model, ids)
    half = probe(model.to(getattr(torch, dtype)), ids)
    assert np.ptp(reference.anomalous_fraction) > 10 * HALF_TOL_HEAD
    assert np.ptp(reference.fraction_slice) > 10 * HALF_TOL_SLICE
    np.testing.assert_allclose(half.anomalous_fraction, reference.anomalous_fraction, rtol=0, atol=HALF_TOL_HEAD)
    np.testing.assert_allclose(
        half.weighted_anomalous_fraction, reference.weighted_anomalous_fraction, rtol=0, atol=HALF_TOL_HEAD
    )
    np.testing.assert_allclose(half.fraction_slice, reference.fraction_slice, rtol=0, atol=HALF_TOL_SLICE)


def test_match_frequencies_bfloat16_table_still_tells_buffers_apart(make_tiny_model):
    """The bf16 allowance accepts a bf16-rounded table of the model's own frequencies and
    still refuses the same table at another RoPE base."""
    from anomaly import model_surgery as surgery
    from anomaly.errors import UserError

    positions = torch.arange(512)
    model = make_tiny_model("llama", max_position_embeddings=1024)
    other = make_tiny_model("llama", max_position_embeddings=1024, rope_parameters={"rope_type": "default",
                                                                                    "rope_theta": 20000.0})
    x = torch.zeros(1, 512, 16, dtype=torch.bfloat16)
    table = surgery.rotation_table(model.model.rotary_emb(x, positions[None]), set())
    assert table.dtype == torch.bfloat16
    match = surgery.match_frequencies(model, table, positions)
    freqs, scale = match.inv_freq, match.scale
    torch.testing.assert_close(freqs, model.model.rotary_emb.inv_freq.float())
    assert scale == 1.0
    with pytest.raises(UserError, match="frequency buffers"):
        surgery.match_frequencies(other, table, positions)


@pytest.mark.parametrize("offset, accepted", [(1.5e-4, True), (5e-3, False)])
def test_rotary_table_off_by_a_kernel_glitch_is_accepted_and_an_error_refused(make_tiny_model, offset, accepted):
    """torch's CPU kernels sometimes compute a process's first rotary table ~1.5e-4 off at some
    positions (a race on first use, 2 threads). A table that far off is still the model's own
    frequencies: captured, with the deviation measured and allowed for in the capture's check.
    One off by 5e-3 is no rounding or kernel error and is refused."""
    from anomaly import model_surgery as surgery
    from anomaly.errors import UserError

    model = make_tiny_model("llama")
    ids = torch.arange(64) % model.config.vocab_size

    def perturb(module, args, output):
        cos, sin = output
        cos = cos.clone()
        cos[:, 32:] += offset  # the second half of the positions, as the glitch does
        return cos, sin

    handle = model.model.rotary_emb.register_forward_hook(perturb)
    try:
        if accepted:
            cap = capture(model, ids)
            assert len(cap.layers) == model.config.num_hidden_layers
            table = surgery.rotation_table(model.model.rotary_emb(torch.zeros(1, 64, 8), torch.arange(64)[None]), set())
            match = surgery.match_frequencies(model, table, torch.arange(64))
            assert match.deviation == pytest.approx(offset, rel=0.05)
        else:
            with pytest.raises(UserError, match="frequency buffers"):
                capture(model, ids)
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------
# 4. The capture's machinery: refusals, hooks and attention routing undone
# --------------------------------------------------------------------------------------


def test_capture_refuses_nan_activations():
    from anomaly.errors import UserError

    model = nan_llama()
    with pytest.raises(UserError, match="layer 1 produced NaN"):
        capture(model, ids_for(model, 16))


def _hook_counts(model) -> list[tuple[int, int]]:
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


def test_capture_removes_its_hooks_and_routing_however_it_ends(make_tiny_model):
    """Every hook and the attention routing are undone after a capture, after one stopped
    early at the last attention layer, and after one refused mid-forward."""
    from anomaly.errors import UserError
    from anomaly.probe import routing

    for model, refused in ((make_tiny_model("llama"), False), (nan_llama(), True)):
        before, implementation = _hook_counts(model), model.config._attn_implementation
        if refused:
            with pytest.raises(UserError, match="NaN"):
                capture(model, ids_for(model, 16))
        else:
            capture(model, ids_for(model, 16))
        assert _hook_counts(model) == before
        assert model.config._attn_implementation == implementation and not routing.watching()


def test_capture_stops_after_the_last_attention_layer(make_tiny_model):
    """The final norm and the head never run: nothing after the last attention changes a capture."""
    model = make_tiny_model("llama")
    ran = []
    handles = [model.model.norm.register_forward_hook(lambda *a: ran.append("norm")),
               model.lm_head.register_forward_hook(lambda *a: ran.append("head"))]
    try:
        cap = capture(model, ids_for(model, 16))
    finally:
        for h in handles:
            h.remove()
    assert len(cap.layers) == model.config.num_hidden_layers and ran == []


def test_capture_routes_each_config_and_restores_its_own_implementation():
    """A model whose sub-configs use different attention implementations (Gemma 3: text and
    vision) is routed per config, each through a watcher of its own implementation, and gets
    exactly its own back (a plain string set on the top config would overwrite them all)."""
    from anomaly.probe import families

    model = families.tiny_model("gemma3")
    config = model.config
    config.vision_config._attn_implementation = "sdpa"
    during = []

    def on_layer(layer):
        during.append((config._attn_implementation, config.text_config._attn_implementation,
                       config.vision_config._attn_implementation))

    capture(model, torch.arange(3, 19), on_layer=on_layer)
    assert during and set(during) == {("anomaly_capture:eager", "anomaly_capture:eager", "anomaly_capture:sdpa")}
    assert (config._attn_implementation, config.text_config._attn_implementation,
            config.vision_config._attn_implementation) == ("eager", "eager", "sdpa")


@pytest.mark.parametrize("additive", [False, True])
def test_the_window_is_read_off_every_entry_of_the_mask(monkeypatch, additive):
    """:func:`selfcheck._window_of_mask` compares the mask block by block: a causal mask, a
    sliding one, and either with one entry wrong in the last block (read as unreadable)."""
    from anomaly.probe import selfcheck

    monkeypatch.setattr(selfcheck, "MASK_ROWS", 7)  # 3 blocks over 20 tokens
    seq, i = 20, torch.arange(20)
    behind = i[:, None] - i[None, :]

    def as_mask(seen: torch.Tensor) -> torch.Tensor:
        if not additive:
            return seen[None, None]
        return torch.zeros(seq, seq).masked_fill(~seen, torch.finfo(torch.float32).min)[None, None]

    for window in (None, 5):
        seen = (behind >= 0) & (behind < (window or seq))
        assert selfcheck._window_of_mask(as_mask(seen), seq) == window
        wrong = seen.clone()
        wrong[18, 2] = ~wrong[18, 2]  # row 18: the third block
        assert selfcheck._window_of_mask(as_mask(wrong), seq) is selfcheck._UNREAD
    assert selfcheck._window_of_mask(None, seq) is selfcheck._UNREAD
    assert selfcheck._window_of_mask(as_mask(torch.ones(seq, seq, dtype=torch.bool).tril()), seq + 1) is selfcheck._UNREAD
