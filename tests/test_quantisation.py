"""anomaly.probe.quantisation: the quantisers against brute force, the perturbations'
sizes, the measurement on a tiny random model (weights put back exactly), and one-line
refusals of the command. The real runs are results/quantisation/ (docs/quantisation.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly.probe import quantisation as qz
from probe_helpers import ids_for


def _brute_rtn(w: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Nearest level of each value, searched over every level of its block's grid."""
    top = 2 ** (bits - 1) - 1
    out = np.empty_like(w, dtype=np.float64)
    for r in range(w.shape[0]):
        for b in range(0, w.shape[1], block):
            x = w[r, b : b + block].astype(np.float64)
            d = np.abs(x).max() / top
            levels = d * np.arange(-top, top + 1)
            out[r, b : b + block] = levels[np.abs(x[:, None] - levels[None]).argmin(1)] if d > 0 else 0.0
    return out


@pytest.mark.parametrize("bits,block", [(4, 32), (6, 16), (3, 8)])
def test_round_to_nearest_is_brute_force(bits, block):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((5, 4 * block)).astype(np.float32)
    w[0, :block] = 0.0  # an all-zero block stays zero
    np.testing.assert_allclose(qz.round_to_nearest(w, bits, block), _brute_rtn(w, bits, block), rtol=0, atol=1e-6)


def test_gguf_quantisers_and_stand_ins():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    errors = {k: np.sqrt(((qz.quantise(w, k) - w) ** 2).mean()) for k in ("Q4_0", "Q4_1", "Q5_0", "Q8_0")}
    assert errors["Q8_0"] < errors["Q5_0"] < errors["Q4_1"] < errors["Q4_0"] < 0.2
    # A grid's values come back unchanged from its own quantiser (why ``file`` moves little).
    for k in ("Q4_1", "Q5_0", "Q8_0"):
        once = qz.quantise(w, k)
        np.testing.assert_allclose(qz.quantise(once, k), once, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(qz.quantise(w, "Q4_K"), qz.quantise(w, "Q4_1"))
    np.testing.assert_array_equal(qz.quantise(w, "Q6_K"), qz.round_to_nearest(w, 6, 16))
    with pytest.raises(qz.UserError, match="blocks of 32"):
        qz.quantise(w[:, :48], "Q4_0")
    with pytest.raises(qz.UserError, match="cannot re-quantise"):
        qz.quantise(w, "IQ2_XS")


def test_grid_noise_is_half_a_step_per_block():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    noise = qz.grid_noise(w, "Q4_1", np.random.default_rng(2))
    blocks = w.reshape(4, 2, 32)
    step = (blocks.max(-1) - blocks.min(-1)) / 15  # [4, 2]
    ratio = np.abs(noise.reshape(4, 2, 32)) / step[..., None]
    assert ratio.max() <= 0.5 and ratio.max() > 0.4  # fills ±½ step
    # Uniform noise of ±½ step has the RMS of a fresh rounding, step/√12, to within a few %.
    rms = np.sqrt((noise.reshape(4, 2, 32) ** 2).mean()) / np.sqrt((step**2).mean() / 12)
    assert 0.85 < rms < 1.15


def _tiny():
    from conftest import tiny_model

    return tiny_model("llama", seed=3)


def test_measure_puts_the_weights_back_and_orders_the_schemes():
    model = _tiny()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # Put the linear weights on the Q4_1 grid first, as a de-quantised GGUF's are.
    with torch.no_grad():
        for p in qz.scope_weights(model, "all").values():
            p.copy_(torch.from_numpy(qz.quantise(p.numpy(), "Q4_1")))
    on_grid = {n: p.detach().clone() for n, p in model.named_parameters()}
    types = dict.fromkeys(qz.scope_weights(model, "all"), "Q4_1")
    ids = ids_for(model, 48)
    with torch.no_grad():
        base, comps = qz.measure(model, ids, types, seeds=2)
    for n, p in model.named_parameters():
        assert torch.equal(p, on_grid[n]), n
    assert not all(torch.equal(on_grid[n], before[n]) for n in before)
    assert [(c.scheme, c.scope, c.seed) for c in comps] == list(qz.runs(qz.SCHEMES, qz.SCOPES, 2))
    assert len(qz.scope_weights(model, "qk")) == 2 * model.config.num_hidden_layers
    by = {(c.scheme, c.scope, c.seed): c for c in comps}
    file = by["file", "all", None]
    assert file.weights.relative == 0.0 and file.flips == 0.0 and file.readings == base
    assert base.tokens == 48 and 0.0 < base.share < 1.0
    q8, q4 = by["q8_0", "all", None].weights.relative, by["q4_0", "all", None].weights.relative
    assert 0 < q8 < q4 < 0.2
    noise = by["noise", "qk", 0]
    assert 0.03 < noise.weights.relative < 0.15 and noise.weights.tensors == 4
    assert by["noise", "qk", 0].readings != by["noise", "qk", 1].readings  # two draws
    dither = by["dither", "all", 0].weights.relative
    assert dither > by["noise", "all", 0].weights.relative  # noise plus a rounding
    for c in comps:
        assert 0.0 <= c.flips <= 1.0 and c.max_head_weighted >= c.max_layer_weighted - 1e-12


def test_markdown_and_json_of_a_result():
    model = _tiny()
    types = dict.fromkeys(qz.scope_weights(model, "all"), "Q8_0")
    with torch.no_grad():
        base, comps = qz.measure(model, ids_for(model, 32), types, schemes=["q4_0"], scopes=["qk"], seeds=1)
    result = qz.QuantisationResult("tiny", "random", "not quantised", "ids", 32, {"attn_q": {"Q8_0": 2}}, base, comps)
    md = qz.to_markdown(result)
    assert "| q4_0 | qk |" in md and "scope qk, seed 0" in md
    assert md.count("\n| 0 |") == 1 and md.count("\n| 1 |") == 1  # one row per layer
    data = result.to_json()
    assert data["comparisons"][0]["weights"]["tensors"] == 4 and "assumption" in data["definitions"]


def test_gguf_types_reads_the_tensor_table(tmp_path):
    import gguf

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    w = np.random.default_rng(0).standard_normal((4, 32)).astype(np.float32)
    for name, kind in (("blk.0.attn_q.weight", "Q4_1"), ("blk.0.ffn_down.weight", "Q8_0")):
        qtype = gguf.GGMLQuantizationType[kind]
        writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    assert qz.gguf_types(str(path), names) == dict(zip(names, ["Q4_1", "Q8_0"]))
    with pytest.raises(qz.UserError, match="cannot find the GGUF tensor"):
        qz.gguf_types(str(path), ["model.layers.1.self_attn.k_proj.weight"])


@pytest.mark.parametrize("argv,words", [
    (["--model", "llama2-7b"], "only a quantised model"),
    (["--tokens", "1"], "at least 2"),
    (["--seeds", "0"], "must be at least 1"),
    (["--schemes", "q2_k"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2(argv, words, tmp_path, capsys):
    from anomaly.cli import run_main

    rc = run_main(qz.main, [*argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
