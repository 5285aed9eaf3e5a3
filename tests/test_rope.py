"""anomaly.rope against brute-force float64 rotations and against HF transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import reference as ref
from anomaly import rope
from anomaly.rope import RopeScaling

LAYOUTS = ["half", "interleaved"]
DIMS = [2, 8, 64, 128]
BASES = [10.0, 10000.0, 500000.0]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("base", BASES)
def test_apply_rope_matches_rotation_matrices(layout, d, base):
    g = np.random.default_rng(d + int(base))
    x = g.normal(size=(7, d))
    pos = np.array([0, 1, 2, 17, 511, 4096, 123457])
    theta = rope.inv_freq(d, base)
    out = rope.apply_rope(torch.tensor(x), torch.tensor(pos), theta, layout).numpy()
    want = np.stack([ref.rotate(x[i], pos[i], ref.freqs(d, base), layout) for i in range(7)])
    # Angles up to 1.2e5 rad carry ~1e5·eps of float64 rounding in θ_j; 1e-9 is that bound.
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_complex_view_reads_slices_per_spec(layout):
    d = 10
    x = torch.arange(d, dtype=torch.float64)
    z = rope.to_complex(x, layout)
    for j in range(d // 2):
        a, b = ref.slice_index(j, d, layout)
        assert z[j] == complex(a, b)
    assert torch.equal(rope.from_complex(z, layout), x)
    re, im = rope.slice_members(x, layout)
    assert torch.equal(torch.complex(re, im), z)
    c = torch.arange(d // 2, dtype=torch.float64)
    dup = rope.duplicate_slices(c, layout)
    assert torch.equal(rope.to_complex(dup, layout), torch.complex(c, c))


@settings(max_examples=40, deadline=None)
@given(
    d=st.sampled_from([2, 4, 16, 64]),
    layout=st.sampled_from(LAYOUTS),
    m=st.integers(0, 10**5),
    n=st.integers(0, 10**5),
    shift=st.integers(-10**4, 10**4),
    seed=st.integers(0, 2**31 - 1),
)
def test_rope_is_relative_and_norm_preserving(d, layout, m, n, shift, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, d, dtype=torch.float64, generator=g)
    f = rope.inv_freq(d, 10000.0)

    def dot(a, b):
        qa = rope.apply_rope(q[None], torch.tensor([a]), f, layout)[0]
        kb = rope.apply_rope(k[None], torch.tensor([b]), f, layout)[0]
        return float(qa @ kb)

    assert math.isclose(dot(m, n), dot(m + shift, n + shift), rel_tol=1e-9, abs_tol=1e-9)
    rq = rope.apply_rope(q[None], torch.tensor([m]), f, layout)[0]
    assert math.isclose(float(rq.norm()), float(q.norm()), rel_tol=1e-12)
    back = rope.apply_rope(rq[None], torch.tensor([-m]), f, layout)[0]
    torch.testing.assert_close(back, q, rtol=0, atol=1e-10)


def test_complex_rotation_equals_real_rotation():
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    pos = torch.arange(5)
    f = rope.inv_freq(32, 1e4)
    for layout in LAYOUTS:
        z = rope.rotate_complex(rope.to_complex(x, layout), pos, f)
        torch.testing.assert_close(rope.from_complex(z, layout), rope.apply_rope(x, pos, f, layout))


def test_bf16_keeps_dtype_and_is_close():
    x = torch.randn(2, 3, 9, 16)
    f = rope.inv_freq(16, 1e4, dtype=torch.float32)
    pos = torch.arange(9)
    out = rope.apply_rope(x.bfloat16(), pos, f, "half")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), rope.apply_rope(x, pos, f, "half"), atol=0.05, rtol=0.02)


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ValueError, match="layout"):
        rope.to_complex(torch.zeros(4), "split")
    with pytest.raises(ValueError, match="even"):
        rope.inv_freq(7)
    with pytest.raises(ValueError, match="slices"):
        rope.apply_rope(torch.zeros(3, 8), torch.arange(3), rope.inv_freq(16), "half")
    with pytest.raises(ValueError, match="scaling"):
        RopeScaling(type="xpos")
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeScaling(type="yarn", factor=4)


# ---------------------------------------------------------------------------------------
# Agreement with HF transformers
# ---------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def _hf_inv_freq(head_dim, base, params, max_pos=4096, seq_len=None, partial=1.0):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
        max_position_embeddings=max_pos,
        rope_parameters={"rope_theta": base, "partial_rotary_factor": partial, **params},
    )
    freqs, factor = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu", seq_len=seq_len)
    return freqs.double(), factor


HF_CASES = [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
     "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
     "mscale": 1.0, "mscale_all_dim": 0.707},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
]


@pytest.mark.parametrize("params", HF_CASES, ids=lambda p: p["rope_type"])
@pytest.mark.parametrize("head_dim,base", [(64, 10000.0), (128, 500000.0), (128, 1e6)])
def test_scalings_match_hf(params, head_dim, base):
    seq_len = 3 * 4096 if params["rope_type"] == "dynamic" else None
    want, want_factor = _hf_inv_freq(head_dim, base, params, seq_len=seq_len)
    scaling = RopeScaling.from_hf(params, max_position_embeddings=4096)
    got = rope.inv_freq(head_dim, base, scaling, seq_len=seq_len)
    # HF computes in float32; we compute in float64 and compare at float32 precision.
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)
    assert math.isclose(rope.attention_factor(scaling), want_factor, rel_tol=1e-6)


def test_dynamic_is_unscaled_within_training_length():
    s = RopeScaling(type="dynamic", factor=4.0, original_max_position_embeddings=512)
    torch.testing.assert_close(rope.inv_freq(64, 1e4, s, seq_len=300), rope.inv_freq(64, 1e4))


def test_static_ntk_equals_hf_dynamic_at_matching_length():
    # HF's dynamic base is base·(f·L/L0 − (f−1))^(d/(d−2)); with f = 2 and L = L0(λ+1)/2
    # the bracket is λ, which is static NTK-aware scaling with factor λ.
    lam, l0 = 3.0, 4096
    want, _ = _hf_inv_freq(64, 1e4, {"rope_type": "dynamic", "factor": 2.0}, max_pos=l0,
                           seq_len=int(l0 * (lam + 1) / 2))
    got = rope.inv_freq(64, 1e4, RopeScaling(type="ntk", factor=lam))
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


def test_partial_rotary_matches_hf():
    want, _ = _hf_inv_freq(64, 1e4, {"rope_type": "linear", "factor": 2.0}, partial=0.25)
    got = rope.inv_freq(64, 1e4, RopeScaling(type="linear", factor=2.0), partial_rotary_factor=0.25)
    assert got.shape == (8,)
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


def test_apply_rope_matches_hf_llama_rotary():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=128, num_attention_heads=2, head_dim=64, rope_theta=1e5)
    emb = LlamaRotaryEmbedding(cfg)
    q, k = torch.randn(2, 1, 2, 50, 64)
    pos = torch.arange(50)[None] + 1000
    cos, sin = emb(q, pos)
    hq, hk = apply_rotary_pos_emb(q, k, cos, sin)
    # With the module's own float32 frequencies the rotation is HF's to float32 rounding.
    # (Our float64-derived frequencies differ from HF's float32 ones by an ulp, which at
    # position 1000 moves angles by ~1e-4 rad: that is HF's rounding, not a convention gap.)
    f = emb.inv_freq
    torch.testing.assert_close(rope.inv_freq(64, 1e5), f.double(), rtol=2e-7, atol=0)
    torch.testing.assert_close(rope.apply_rope(q, pos[0], f, "half"), hq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rope.apply_rope(k, pos[0], f, "half"), hk, atol=1e-5, rtol=1e-5)
