"""The synthetic previous-token diagnostic (anomaly.ablation.previous_token): its plumbing,
its attention read-out against the model's own attention, and its CLI."""

from __future__ import annotations

import json

import pytest
import torch

from anomaly.ablation.previous_token import PreviousTokenConfig, _model, main, train_previous_token
from anomaly.cli import run_main

TINY = PreviousTokenConfig(vocab_size=16, length=12, hidden_size=16, num_heads=2, steps=3, batch_size=4,
                           test_sequences=4)


@pytest.mark.parametrize("variant", ["rope", "coca_slack", "coca_strict"])
def test_result_is_consistent(variant):
    r = train_previous_token(TINY, variant)
    assert r["tokens"] == TINY.test_sequences * (TINY.length - 1)
    assert 0 <= r["ci"][0] <= r["accuracy"] <= r["ci"][1] <= 1
    # Attention rows sum to 1, so self + previous cannot exceed it.
    assert 0 <= r["attention_on_previous"] and 0 <= r["attention_on_self"]
    assert r["attention_on_previous"] + r["attention_on_self"] <= 1 + 1e-6


def test_variants_share_initial_weights():
    states = {v: _model(TINY, v).state_dict() for v in ("rope", "coca_slack", "coca_strict")}
    for name, w in states["rope"].items():
        for other in ("coca_slack", "coca_strict"):
            assert torch.equal(w, states[other][name]), name


def test_cli_writes_one_json_and_refuses_bad_input(tmp_path, capsys):
    out = tmp_path / "prev.json"
    assert run_main(main, ["--out", str(out), "--seeds", "1", "--steps", "2"]) == 0
    data = json.loads(out.read_text())
    assert [r["variant"] for r in data["runs"]] == ["rope", "coca_slack", "coca_strict"]
    assert data["config"]["steps"] == 2
    capsys.readouterr()
    assert run_main(main, ["--out", str(tmp_path / "x.json"), "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and not (tmp_path / "x.json").exists()
