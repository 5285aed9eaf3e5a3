"""The variant registry (anomaly.variants): every consumer reads it, an unknown name is one
line, and a new variant is one entry plus its conversion.

The last tests register a throwaway NoPE variant in a temporary copy of the registry (pytest's
``monkeypatch`` restores it) and check that the config, the labels, the builders and a short
run take it without any other change to the toolkit.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from anomaly import variants
from anomaly.ablation.analysis import variant_label
from anomaly.ablation.config import get_preset, override, validate
from anomaly.ablation.train import build_llama, build_model
from anomaly.errors import UserError
from anomaly.plotting.style import PALETTE
from conftest import one_torch_thread

SMOKE = get_preset("smoke")


def test_registry_names_styles_and_readings():
    assert variants.names() == ("rope", "coca_slack", "coca_strict")  # results.json keys: never renamed
    for name, v in variants.REGISTRY.items():
        assert v.name == name and v.colour in PALETTE
    styles = [(v.colour, v.marker) for v in variants.REGISTRY.values()]
    assert len(set(styles)) == len(styles)
    # The probe reads a model back as the variant it was converted to.
    assert [variants.of_coca(v.coca).name for v in variants.REGISTRY.values()] == list(variants.names())
    assert variants.variant("rope").probe_title() == "" and variants.variant("rope").probe_report() == ""
    assert variants.variant("coca_slack").probe_title() == " (CoCA slack, effective angles)"
    assert variants.variant("coca_strict").probe_report() == " (CoCA strict: its effective initial angles)"


def test_an_unknown_variant_is_one_user_error_everywhere():
    from anomaly.ablation.plots import variant_style

    for call in (lambda: variants.variant("alibi"), lambda: variant_style("alibi"), lambda: variant_label("alibi"),
                 lambda: build_model(SMOKE, "alibi"), lambda: variants.check_names(["rope", "alibi"])):
        with pytest.raises(UserError, match="unknown variant.*alibi.*rope, coca_slack, coca_strict"):
            call()


class NoPERotaryEmbedding(torch.nn.Module):
    """No rotation at all: cos 1 and sin 0 at every position. A class of its own, so that an
    evaluation's scaling (anomaly.coca.set_rope_parameters rebuilds each ``*RotaryEmbedding``
    from the config) rebuilds it as NoPE again."""

    def __init__(self, config) -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.register_buffer("inv_freq", torch.zeros(head_dim // 2), persistent=False)

    def forward(self, x, position_ids):  # [batch, seq, d] → cos, sin [batch, seq, head_dim]
        shape = (*position_ids.shape, 2 * self.inv_freq.numel())
        return torch.ones(shape, dtype=x.dtype, device=x.device), torch.zeros(shape, dtype=x.dtype, device=x.device)


def to_nope(model):
    model.model.rotary_emb = NoPERotaryEmbedding(model.config)
    return model


NOPE = variants.Variant("nope", "NoPE", "NoPE", "purple", "^", convert=to_nope, probed=False)


@pytest.fixture
def with_nope(monkeypatch):
    monkeypatch.setitem(variants.REGISTRY, "nope", NOPE)
    return NOPE


def test_a_registered_variant_is_taken_by_config_labels_and_builders(with_nope):
    from anomaly.ablation.__main__ import parse_args
    from anomaly.ablation.plots import variant_style
    from anomaly.ablation.previous_token import PreviousTokenConfig, train_previous_token
    from anomaly.ablation.sweep import plan

    assert variants.names()[-1] == "nope"
    assert parse_args(["--preset", "smoke", "--out", "x"]).variants[-1] == "nope"
    assert [m.variant for m in plan(["nope", "rope"], [1e-3], [100])] == ["rope", "nope"]
    config = validate(override(SMOKE, "train.lr_by_variant=rope:1e-3,coca_slack:1e-3,coca_strict:2e-3,nope:5e-4"))
    assert config.lr_of("nope") == 5e-4
    with pytest.raises(UserError, match="lr_by_variant"):  # every registered variant needs its own
        validate(override(SMOKE, "train.lr_by_variant=rope:1e-3,coca_slack:1e-3,coca_strict:2e-3"))
    assert variant_label("nope") == "NoPE"
    assert variant_style("nope") == {"label": "NoPE", "short": "NoPE", "color": PALETTE["purple"], "marker": "^"}

    # Built from the same seed as RoPE, with the same weights.
    nope, rope = build_model(SMOKE, "nope", 0), build_model(SMOKE, "rope", 0)
    assert all(torch.equal(w, rope.state_dict()[k]) for k, w in nope.state_dict().items())
    # And without position information: in one layer, the last token attends to the *set* of
    # tokens, so reversing the earlier ones leaves its prediction unchanged (RoPE's changes).
    shape = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                 max_position_embeddings=16)
    nope, rope = (build_llama(v, 0, **shape).eval() for v in ("nope", "rope"))
    ids = torch.randint(0, 32, (1, 10), generator=torch.Generator().manual_seed(0))
    reversed_ = torch.cat([ids[:, :-1].flip(-1), ids[:, -1:]], dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(nope(input_ids=ids).logits[0, -1], nope(input_ids=reversed_).logits[0, -1])
        assert not torch.allclose(rope(input_ids=ids).logits[0, -1], rope(input_ids=reversed_).logits[0, -1])
    r = train_previous_token(PreviousTokenConfig(vocab_size=16, length=12, hidden_size=16, steps=2, batch_size=2,
                                                 test_sequences=2), "nope")
    assert r["variant"] == "nope"


@pytest.mark.slow
def test_a_registered_variant_runs_through_the_ablation(with_nope, tmp_path):
    """A short run of the new variant alone: trained, evaluated under every scaling, not
    probed (``probed=False``: no geometry.json), in results.json and its figures."""
    from anomaly.ablation.run import run, seed_dir

    config = replace(SMOKE.with_steps(3).with_seeds(1),
                     eval=replace(SMOKE.eval, length_multipliers=(1, 2), scalings=("none", "ntk-2")))
    with one_torch_thread():
        results = run(config, tmp_path / "run", variants=["nope"], device="cpu", log=lambda s: None)
    assert results is not None and results["variants"] == ["nope"] and list(results["passkey"]) == ["nope"]
    assert "nope" not in results["anomalous_fraction"]
    folder = seed_dir(tmp_path / "run", "nope", 0)
    assert (folder / "eval_ntk-2.json").exists() and not (folder / "geometry.json").exists()
    assert json.loads((tmp_path / "run" / "results.json").read_text())["variants"] == ["nope"]
    assert any((tmp_path / "run" / "figures").glob("ablation_*.png"))
    # Resumed: done from its files, without a probe it never had.
    assert run(config, tmp_path / "run", variants=["nope"], device="cpu", figures=False,
               log=lambda s: None)["variants"] == ["nope"]
