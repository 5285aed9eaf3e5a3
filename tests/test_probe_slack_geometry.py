"""anomaly.probe.slack_geometry: slack CoCA's departure from a relative score, and its
effective initial angles, against brute-force float64 loops."""

from __future__ import annotations

import math

import numpy as np
import torch

import reference as ref
from anomaly.probe.slack_geometry import measure, slack_case_d_fraction, slack_relative_spread, summarise
from anomaly.rope import LAYOUTS, inv_freq
from conftest import tiny_model


def test_relative_spread_matches_loop_scores():
    d, base = 8, 100.0
    theta = inv_freq(d, base)
    g = torch.Generator().manual_seed(0)
    q, t = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    positions = torch.arange(0, 200, 7)
    for layout in LAYOUTS:
        got = slack_relative_spread(q, t, theta, distance=3, positions=positions, layout=layout)
        scores = [ref.slack_score(q.numpy(), t.numpy(), int(n) + 3, int(n), theta.numpy(), layout)
                  for n in positions]
        spread = max(scores) - min(scores)
        assert spread > 1e-3  # slack is not relative for generic contents
        # Denominator: the relative part (the slack score with equal query slice members
        # would be purely relative); checked through its definition: spread / got.
        assert float(got) > 0
        assert math.isclose(float(got) * (spread / float(got)), spread, rel_tol=1e-12)


def test_relative_spread_is_zero_when_query_members_are_equal():
    d = 8
    theta = inv_freq(d, 10000.0)
    c = torch.randn(d // 2, dtype=torch.float64)
    q = torch.cat([c, c])  # half layout: x_j = y_j in every slice
    t = torch.randn(d, dtype=torch.float64)
    rs = slack_relative_spread(q, t, theta, distance=5, positions=torch.arange(0, 300, 3))
    assert float(rs) < 1e-12


def test_case_d_fraction_matches_loop():
    d, base = 8, 50.0
    theta = inv_freq(d, base)
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 5, d, generator=g, dtype=torch.float64)  # [heads, tokens, d]
    positions = torch.tensor([0, 3, 17, 40])
    for layout in LAYOUTS:
        got = slack_case_d_fraction(q, theta, positions, layout=layout)
        for h in range(2):
            hits = total = 0
            for tok in range(5):
                x = q[h, tok].numpy()
                for m in positions.tolist():
                    content = ref.rotate(ref.rotate(x, m, theta.numpy(), layout) * x, -m, theta.numpy(), layout)
                    # Slack's key content is t̃: the coefficient in both members (angle π/4).
                    ang = ref.initial_angles(content, np.ones(d), layout)
                    hits += int((ang > math.pi).sum())
                    total += d // 2
            assert math.isclose(float(got[h]), hits / total, abs_tol=1e-12)


def test_measure_on_a_tiny_model():
    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    layers = measure(model, ids, distances=[1, 4], positions=torch.arange(0, 256, 16), pairs=8)
    assert len(layers) == model.config.num_hidden_layers
    for r in layers:
        assert set(r.relative_spread) == {1, 4}
        assert all(v > 0 for s in r.relative_spread.values() for v in s)
        assert len(r.case_d_fraction) == model.config.num_attention_heads
        assert all(0 < f < 1 for f in r.case_d_fraction)
    summary = summarise(layers)
    assert set(summary["overall_median_spread"]) == {1, 4}
    assert 0 < summary["mean_case_d_share"] < 1


def test_measure_refuses_distances_beyond_the_contents():
    import pytest

    model = tiny_model("llama")
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="needs more than 8 tokens"):
        measure(model, ids, distances=[8], positions=torch.arange(4))


def test_the_command_keeps_the_measurement_names():
    # python -m anomaly.coca.geometry is a command now; code written against its earlier
    # layout still finds the measurement there.
    import anomaly.coca.geometry as command
    import anomaly.probe.slack_geometry as measurement

    for name in ("LayerGeometry", "measure", "measure_layer", "slack_case_d_fraction",
                 "slack_relative_spread", "spread_bytes", "summarise"):
        assert getattr(command, name) is getattr(measurement, name)
