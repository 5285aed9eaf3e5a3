"""The probe on CoCA models: effective contents, exact strict zeros, slack against the
reference loops, and the CLI on a ``to_coca`` + ``save_pretrained`` folder and on an
ablation checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

import reference as ref
from anomaly.coca import to_coca
from anomaly.errors import UserError
from anomaly.probe import attention_probabilities, capture, probe
from anomaly.probe.coca import ZERO_ANGLE_TOL, effective_layer, model_variant
from conftest import tiny_model

INIT = 0.1  # far from uniform attention, so a wrong content shows in the probabilities
VARIANTS = ("strict", "slack")


def coca_model(variant: str | None):
    model = tiny_model("llama", initializer_range=INIT)
    return to_coca(model, variant) if variant else model


def ids_for(model, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (t,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", VARIANTS)
def test_effective_contents_rebuild_eager_attention(variant):
    """Rotated as any RoPE layer's, the effective contents give the CoCA model's own eager
    attention probabilities; the raw projections do not (and are refused)."""
    model = coca_model(variant)
    ids = ids_for(model, 48)
    cap = capture(model, ids)
    with torch.no_grad():
        attentions = model(ids[None], output_attentions=True, use_cache=False).attentions
    for layer, hf in zip(cap.layers, attentions):
        assert layer.coca_variant == variant
        with pytest.raises(ValueError, match="CoCA layer"):
            attention_probabilities(layer)
        eff = effective_layer(layer)
        mine = attention_probabilities(eff)
        assert (mine - hf[0]).abs().max().item() < 1e-5
        # Control: the raw projections read as RoPE contents give other probabilities.
        wrong = attention_probabilities(replace(layer, coca_variant=None))
        assert (wrong - hf[0]).abs().max().item() > 1e-3


def test_model_variant():
    assert model_variant(coca_model(None)) == "rope"
    assert model_variant(coca_model("strict")) == "coca_strict"
    assert model_variant(coca_model("slack")) == "coca_slack"
    plain = coca_model(None)
    plain.config.coca_variant = "strict"  # a CoCA checkpoint loaded without its CoCA layers
    with pytest.raises(UserError, match="load_coca"):
        model_variant(plain)
    with pytest.raises(UserError, match="load_coca"):
        probe(plain, ids_for(plain, 8))


@pytest.fixture(scope="module")
def coca_probes():
    out = {}
    for variant in VARIANTS:
        model = coca_model(variant)
        ids = ids_for(model, 40, seed=4)
        out[variant] = (model, ids, probe(model, ids, bins=16))
    return out


def test_strict_effective_share_is_exactly_zero(coca_probes):
    model, ids, result = coca_probes["strict"]
    assert result.kind == "coca_strict" and result.zero_angle_tolerance == ZERO_ANGLE_TOL
    assert result.anomalous_fraction.shape == (model.config.num_hidden_layers, model.config.num_attention_heads)
    assert (result.anomalous_fraction == 0).all() and (result.weighted_anomalous_fraction == 0).all()
    assert (result.count_d == 0).all() and result.slack is None
    # Every pair sits at Θ = 0: the whole histogram in bin 0, the mean angle 0, fully concentrated.
    t = ids.numel()
    assert (result.theta_hist[..., 0] == t * (t - 1) // 2).all()
    np.testing.assert_allclose(result.concentration, 1.0, atol=1e-6)
    # Without the tolerance the rounding of those zeros would have been counted.
    cap = capture(model, ids)
    from anomaly.probe.stats import pair_statistics

    eff = effective_layer(cap.layers[0])
    assert pair_statistics(eff.q, eff.k, eff.layout).count_d.sum() > 0


def test_slack_effective_share_equals_reference(coca_probes):
    model, ids, result = coca_probes["slack"]
    assert result.kind == "coca_slack"
    cap = capture(model, ids)
    for l, layer in enumerate(cap.layers):
        eff = effective_layer(layer)
        frac, wfrac = ref.anomalous_fractions(eff.q.double().numpy(), eff.k.double().numpy(), eff.layout, ZERO_ANGLE_TOL)
        np.testing.assert_allclose(result.anomalous_fraction[l], frac, rtol=0, atol=1e-12)
        np.testing.assert_allclose(result.weighted_anomalous_fraction[l], wfrac, rtol=1e-9)
    assert 0 < result.anomalous_fraction.mean() < 1
    # Slack's key content is t̃ (angle π/4 in every slice), so the share is far from RoPE's.
    spread = result.slack.to_json()
    assert set(spread["overall_median_spread"]) == {1, 5, 20}
    assert all(v > 0 for v in spread["overall_median_spread"].values())
    json.dumps(result.to_json())


class _CharTokenizer:
    """A stand-in tokenizer (tiny random models have none): one id per character."""

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = [2 + ord(c) % (self.vocab - 2) for c in text[:4000]]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}


def _summary(out) -> dict:
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("variant", VARIANTS)
def test_cli_probes_a_saved_coca_model(variant, tmp_path, monkeypatch, capsys):
    """``to_coca`` + ``save_pretrained``: the CLI loads it as CoCA and measures its effective angles."""
    from anomaly import models
    from anomaly.probe.cli import entry

    model = coca_model(variant)
    folder = tmp_path / f"coca-{variant}"
    model.save_pretrained(folder)
    monkeypatch.setattr(models, "load_tokenizer", lambda name: _CharTokenizer(model.config.vocab_size))
    out = tmp_path / "out"
    rc = entry(["--model", str(folder), "--tokens", "48", "--out", str(out), "--quiet", "--no-figures",
                "--device", "cpu"])
    assert rc == 0, capsys.readouterr().err
    summary = _summary(out)
    assert summary["kind"] == f"coca_{variant}"
    frac = np.asarray(summary["anomalous_fraction"])
    if variant == "strict":
        assert (frac == 0).all() and summary["mean_weighted_anomalous_fraction"] == 0
    else:
        assert 0 < frac.mean() < 1 and "slack_spread" in summary
    assert f"CoCA {variant}" in capsys.readouterr().out


def _ablation_run(tmp_path, monkeypatch, seeds=(0, 1)):
    """A run directory of the ablation (config.json, results.json, <variant>/seed<s>/checkpoint)
    whose models are "trained" (weights moved off their initialisation, differently per seed).

    Returns the run directory and ``{(variant, seed): state dict}``.
    """
    from anomaly.ablation import data
    from anomaly.ablation.config import VARIANTS as ABLATION_VARIANTS, get_preset
    from anomaly.ablation.run import seed_dir
    from anomaly.ablation.train import CHECKPOINT, TrainState, build_model, save_checkpoint
    from anomaly.io import write_json

    config = get_preset("smoke")
    run = tmp_path / "run"
    write_json(run / "config.json", config.to_dict(), digits=None)
    vocab = config.model.vocab_size
    write_json(run / "results.json", {"vocab_hf_ids": [-1, -1, *range(2, vocab)]})
    # The run's vocabulary maps SmolLM2 ids; a character tokenizer stands in for SmolLM2's.
    monkeypatch.setattr(data, "load_tokenizer", lambda: _CharTokenizer(vocab))
    weights = {}
    for variant in ABLATION_VARIANTS:
        for seed in seeds:
            model = build_model(config, variant, seed)
            torch.manual_seed(7 + seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            save_checkpoint(seed_dir(run, variant, seed) / CHECKPOINT, model, None, TrainState(step=config.train.steps))
            weights[variant, seed] = {k: v.clone() for k, v in model.state_dict().items()}
    return run, weights


def test_find_checkpoint_accepts_a_seed_its_checkpoint_and_a_variant(tmp_path, monkeypatch):
    from anomaly.ablation.checkpoint import find_checkpoint

    run, weights = _ablation_run(tmp_path, monkeypatch)
    (run / "rope" / "seed9").mkdir()  # an unfinished seed: no checkpoint yet
    (run / "rope" / "notes").mkdir()
    for given, seed, lowest in [(run / "rope" / "seed1" / "checkpoint", 1, ()), (run / "rope" / "seed1", 1, ()),
                                (run / "rope", 0, (0, 1))]:
        found = find_checkpoint(str(given))
        assert (found.run, found.variant, found.seed, found.lowest_of) == (run, "rope", seed, lowest), given
        assert found.path == run / "rope" / f"seed{seed}" / "checkpoint"
        assert f"seed {seed}" in found.note and ("lowest" in found.note) == bool(lowest)
        model = found.load(torch.device("cpu"), torch.float32).model
        for k, v in model.state_dict().items():
            assert torch.equal(v, weights["rope", seed][k]), (given, k)
    assert find_checkpoint("smollm2-135m") is None
    assert find_checkpoint(str(run)) is None  # the run itself holds three variants: name one
    assert find_checkpoint(str(run / "rope" / "seed9")) is None
    (run / "coca_slack" / "seed0" / "checkpoint" / "state.json").unlink()
    (run / "coca_slack" / "seed1" / "checkpoint" / "state.json").unlink()
    assert find_checkpoint(str(run / "coca_slack")) is None


def test_cli_probes_ablation_checkpoints(tmp_path, monkeypatch, capsys):
    """Each variant of an ablation run, named in each accepted way, is recognised as what
    it is; strict's share is exactly 0."""
    from anomaly.ablation.config import get_preset
    from anomaly.probe.cli import entry

    config = get_preset("smoke")
    run, _ = _ablation_run(tmp_path, monkeypatch)
    named = {"rope": (run / "rope", 0), "coca_slack": (run / "coca_slack" / "seed1", 1),
             "coca_strict": (run / "coca_strict" / "seed1" / "checkpoint", 1)}
    shares = {}
    for variant, (given, seed) in named.items():
        out = tmp_path / f"probe-{variant}"
        rc = entry(["--model", str(given), "--tokens", "48", "--out", str(out), "--quiet", "--no-figures",
                    "--device", "cpu"])
        assert rc == 0, capsys.readouterr().err
        summary = _summary(out)
        assert summary["kind"] == variant
        assert summary["source"] == str(run / variant / f"seed{seed}" / "checkpoint")
        assert f"seed {seed}" in summary["note"] and ("lowest" in summary["note"]) == (variant == "rope")
        assert np.asarray(summary["anomalous_fraction"]).shape == (config.model.num_layers, config.model.num_heads)
        shares[variant] = summary["mean_anomalous_fraction"]
    assert shares["coca_strict"] == 0
    assert shares["rope"] > 0.05 and shares["coca_slack"] > 0


def test_cli_refuses_a_checkpoint_outside_a_run(tmp_path, capsys):
    from anomaly.ablation.config import get_preset
    from anomaly.ablation.train import CHECKPOINT, TrainState, build_model, save_checkpoint
    from anomaly.probe.cli import entry

    model = build_model(get_preset("smoke"), "rope")
    seeded = tmp_path / "a" / "rope" / "seed0" / CHECKPOINT  # no a/config.json
    old_layout = tmp_path / "b" / "rope" / CHECKPOINT  # before seeds: <run>/<variant>/checkpoint
    for ckpt, words in [(seeded, "config.json"), (old_layout, "seed<s>")]:
        save_checkpoint(ckpt, model, None, TrainState())
        rc = entry(["--model", str(ckpt), "--out", str(tmp_path / "out"), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("error:") and words in err and len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err and not (tmp_path / "out").exists()
