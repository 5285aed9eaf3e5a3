"""``benchmarks/probe_speed.py``'s verdict and its ``capture`` call (timings are not tested:
they are the benchmark's to print, measured side by side)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import probe_speed


def test_the_verdict_splits_the_goals_budget_between_capturing_and_the_statistics():
    line = probe_speed.verdict(2048, {"forward": 2.0, "forward+head": 2.5, "capture": 2.1, "probe": 3.0})
    assert line == ("2048 tokens: probe / forward = 1.50  (goal ≤ 1.2: not met); budget (goal − 1) × forward = "
                    "0.40 s: capturing adds 0.10 s, the statistics 0.90 s")
    # from 8192 tokens on the goal is 1.1
    assert "(goal ≤ 1.1: met)" in probe_speed.verdict(8192, {"forward": 20.0, "capture": 20.5, "probe": 21.9})
    assert "(goal ≤ 1.1: not met)" in probe_speed.verdict(8192, {"forward": 20.0, "capture": 20.5, "probe": 22.1})


def test_the_capture_call_is_the_probes_forward_without_its_statistics(make_tiny_model):
    """It takes every layer the probe takes, and keeps none (like the probe, one layer's q/k
    at a time), so ``probe − capture`` is the statistics alone."""
    model = make_tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, 128, (24,), generator=torch.Generator().manual_seed(0))
    calls = probe_speed.calls_of(model, ids)
    assert set(calls) == set(probe_speed.CALLS)
    captured = calls["capture"]()
    assert captured.layers == [] and captured.skipped == {}
    assert calls["probe"]().layers == 3


@pytest.mark.parametrize("tokens, goal", [(512, 1.2), (8191, 1.2), (8192, 1.1), (32768, 1.1)])
def test_goal_for_each_length(tokens, goal):
    assert probe_speed.goal_for(tokens) == goal
