"""The slack-vs-strict ablation end to end (smoke preset) and its building blocks.

The smoke run is done once per test session (:func:`smoke_run`) and shared; the tests
that need a run of their own use a few training steps, a reduced evaluation and a copy of
the smoke run's token cache, so the whole module stays well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anomaly.ablation import plots
from anomaly.ablation.__main__ import main as ablation_main
from anomaly.ablation.config import SCALINGS, VARIANTS, get_preset
from anomaly.ablation.data import UNK, Vocab, build_data
from anomaly.ablation.evaluate import perplexity, segment_ends, set_scaling
from anomaly.ablation.passkey import QUESTION, PasskeyTask
from anomaly.ablation.run import run
from anomaly.ablation.train import CHECKPOINT, build_model
from anomaly.cli import run_main

pytestmark = pytest.mark.slow

SMOKE = get_preset("smoke")
FIGURE_NAMES = ("ppl", "passkey", "training", "anomalous_fraction")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a few cores shared with other work, two threads that wait for
    each other are about twice as slow as one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """``python -m anomaly.ablation --preset smoke --out DIR``, once; returns DIR."""
    out = tmp_path_factory.mktemp("ablation") / "smoke"
    assert run_main(ablation_main, ["--preset", "smoke", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def results(smoke_run) -> dict:
    return json.loads((smoke_run / "results.json").read_text())


def _fresh_dir(tmp_path: Path, name: str, smoke_run: Path) -> Path:
    """An empty run directory holding a copy of the smoke run's token cache."""
    out = tmp_path / name
    shutil.copytree(smoke_run / "cache", out / "cache")
    return out


# ---------------------------------------------------------------------------- results


def test_results_keys_and_shapes(results):
    T, lengths = results["train_length"], results["eval_lengths"]
    assert T == SMOKE.data.train_length
    assert lengths == sorted(lengths) and len(set(lengths)) == len(lengths)
    assert lengths[0] == T and max(lengths) >= 8 * T
    assert results["variants"] == list(VARIANTS) and results["scalings"] == list(SCALINGS)
    for key in ("ppl", "nll", "passkey"):
        assert set(results[key]) == set(VARIANTS)
        for v in VARIANTS:
            assert set(results[key][v]) == set(SCALINGS)
            for s in SCALINGS:
                vals = results[key][v][s]
                assert len(vals) == len(lengths), (key, v, s)
                assert all(isinstance(x, (int, float)) for x in vals)
    for v in VARIANTS:
        for s in SCALINGS:
            assert all(0.0 <= a <= 1.0 for a in results["passkey"][v][s])
            assert all(p > 1.0 for p in results["ppl"][v][s])
            # ppl is exp of the mean NLL. Both are written at 6 significant digits
            # (anomaly.io.FLOAT_DIGITS): p carries a relative rounding error ≤ 5e-6 and n an
            # absolute one ≤ |n|·5e-6, which exp turns into the same relative error.
            for p, n in zip(results["ppl"][v][s], results["nll"][v][s]):
                assert p == pytest.approx(math.exp(n), rel=5e-6 * (1 + abs(n)) * 1.01)
        assert results["training"][v]["steps"] == SMOKE.train.steps
        curve = results["training"][v]["curve"]
        assert curve["step"][-1] == SMOKE.train.steps
        assert len(curve["step"]) == len(curve["loss"]) == len(curve["lr"])
        assert results["tokens_per_s"][v] > 0
    assert set(results["wall_s"]) >= {"train", "eval", "probe", "this_command"}
    assert results["seeds"] == {"model": SMOKE.model_seed, "data": SMOKE.data_seed, "eval": SMOKE.eval_seed}
    assert results["config"] == SMOKE.to_dict() | {"eval": results["config"]["eval"]}
    assert results["config"]["preset"] == "smoke"


def test_strict_anomalous_fraction_is_exactly_zero(results):
    geo = results["anomalous_fraction"]
    assert set(geo) == set(VARIANTS)
    shape = (SMOKE.model.num_layers, SMOKE.model.num_heads)
    for v in VARIANTS:
        assert np.asarray(geo[v]["anomalous_fraction"]).shape == shape
    strict = np.asarray(geo["coca_strict"]["anomalous_fraction"])
    assert (strict == 0).all() and geo["coca_strict"]["mean"] == 0 and geo["coca_strict"]["weighted_mean"] == 0
    assert geo["rope"]["mean"] > 0.05
    assert geo["coca_slack"]["mean"] > 0
    # Slack's score moves with absolute position; RoPE and strict carry no such record.
    spread = geo["coca_slack"]["slack_spread"]["overall_median_spread"]
    assert spread and all(v > 0 for v in spread.values())
    assert "slack_spread" not in geo["rope"] and "slack_spread" not in geo["coca_strict"]


def test_dynamic_ntk_is_identity_up_to_train_length(results):
    T = results["train_length"]
    for v in VARIANTS:
        for s in SCALINGS:
            for i, length in enumerate(results["eval_lengths"]):
                if length <= T:
                    assert results["ppl"][v][s][i] == results["ppl"][v]["none"][i], (v, s, length)
                    assert results["passkey"][v][s][i] == results["passkey"][v]["none"][i]


def test_split_is_by_file(results):
    from anomaly.corpus import shakespeare_plays, split_by_file, stdlib_sources

    data = results["data"]
    held = set(data["held_out_documents"])
    used = set(data["train_documents"]["text"]) | set(data["train_documents"]["code"])
    assert held and used and not held & used
    frac = SMOKE.data.held_out_fraction
    plays_train, plays_held = split_by_file(shakespeare_plays(), frac)
    code_train, code_held = split_by_file(stdlib_sources(), frac)
    assert held == {d.name for d in plays_held}
    assert set(data["train_documents"]["text"]) <= {d.name for d in plays_train}
    assert set(data["train_documents"]["code"]) <= {d.name for d in code_train}
    assert not {d.name for d in code_held} & set(data["train_documents"]["code"])


def test_figures_written(smoke_run):
    for name in FIGURE_NAMES:
        for ext in ("pdf", "png", "json"):
            path = smoke_run / "figures" / f"ablation_{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 0, path
    prov = json.loads((smoke_run / "figures" / "ablation_ppl.json").read_text())
    assert prov["model"] == "ablation/smoke" and "results" in prov["extra"]


# ----------------------------------------------------------------- same start, same data


def test_variants_start_from_identical_weights():
    states = {v: build_model(SMOKE, v).state_dict() for v in VARIANTS}
    ref = states["rope"]
    assert any(k.endswith("self_attn.k_proj.weight") for k in ref)  # CoCA keeps k_proj (as T)
    for v in VARIANTS[1:]:
        assert set(states[v]) == set(ref), v
        for k in ref:
            assert torch.equal(states[v][k], ref[k]), (v, k)


def test_training_batches_are_deterministic_and_shared(smoke_run, results, tmp_path):
    # run() builds the data once and hands the same tensor to every variant; building it
    # again (as a resumed or --variants run does) must give the very same batches.
    cache = smoke_run / "cache"
    a = build_data(SMOKE, cache)
    b = build_data(SMOKE, cache)
    assert torch.equal(a.train, b.train) and a.kinds == b.kinds
    assert a.train.shape == (SMOKE.train.steps * SMOKE.train.batch_size, SMOKE.data.train_length)
    assert list(a.vocab.hf_ids) == results["vocab_hf_ids"]
    assert a.kinds.count("passkey") == results["data"]["train_sequences"]["passkey"] > 0
    assert {v: results["training"][v]["curve"]["step"] for v in VARIANTS} == {
        v: results["training"]["rope"]["curve"]["step"] for v in VARIANTS
    }


# ------------------------------------------------------------------------- passkey


def test_passkey_prompts_exact_length_and_content(results):
    vocab = Vocab(hf_ids=tuple(results["vocab_hf_ids"]))
    task = PasskeyTask(vocab.encode, vocab.decode)
    rng = np.random.default_rng(0)
    question = QUESTION.strip()
    for length in results["eval_lengths"][:3] + [results["eval_lengths"][-1]]:
        for _ in range(3):
            p = task.sample(length, rng)
            assert len(p.prompt) + len(p.answer) == length
            assert UNK not in p.prompt and UNK not in p.answer
            text = vocab.decode(p.prompt)
            assert str(p.passkey) in text
            assert text.rstrip().endswith(question)
            assert task.is_correct(p.answer, p.passkey)
            assert not task.is_correct(p.answer, (p.passkey % 90000) + 10001)
        assert len(task.sequence(length, rng)) == length
    with pytest.raises(ValueError):
        task.build(task.fixed_tokens() - 5, 12345, 0.5)


# --------------------------------------------------------------------- perplexity


def _brute_force_nll(model, window: torch.Tensor, stride: int) -> tuple[float, int]:
    """Sum of -log p(token p | tokens < p) over the segment's scored tokens, one forward
    pass per token on exactly its prefix."""
    L = len(window)
    total = 0.0
    for pos in range(L - stride + 1, L):
        logits = model(input_ids=window[None, :pos]).logits[0, -1].double()
        total -= torch.log_softmax(logits, -1)[window[pos]].item()
    return total, stride - 1


@pytest.mark.parametrize("variant", ["rope", "coca_slack"])
@torch.no_grad()
def test_sliding_window_perplexity_matches_brute_force(variant):
    model = build_model(SMOKE, variant).eval()
    torch.manual_seed(1)
    held = {"a": torch.randint(2, SMOKE.model.vocab_size, (300,)), "b": torch.randint(2, SMOKE.model.vocab_size, (200,))}
    length, stride = 96, 32
    segments = segment_ends(held, 2, length, stride)
    assert {name for name, _ in segments} == {"a", "b"}
    ppl, mean = perplexity(model, held, segments, length, stride, batch_tokens=96)
    total, count = 0.0, 0
    for name, end in segments:
        t, c = _brute_force_nll(model, held[name][end - length : end], stride)
        total, count = total + t, count + c
    assert mean == pytest.approx(total / count, rel=1e-5)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)


@torch.no_grad()
def test_dynamic_ntk_leaves_short_windows_alone():
    model = build_model(SMOKE, "rope").eval()
    torch.manual_seed(2)
    held = {"a": torch.randint(2, SMOKE.model.vocab_size, (400,))}
    T = SMOKE.data.train_length
    segments = segment_ends(held, 3, T, T // 2)
    for length in (T // 2, T):
        ref = perplexity(model, held, segments, length, T // 2, 4096, lambda: set_scaling(model, SMOKE, "none"))
        for s in ("ntk-2", "ntk-8"):
            got = perplexity(model, held, segments, length, T // 2, 4096, lambda: set_scaling(model, SMOKE, s))
            assert got == ref, (length, s)
    # ... and does change longer ones.
    segments = segment_ends(held, 1, 4 * T, T)
    ref = perplexity(model, held, segments, 4 * T, T, 4096, lambda: set_scaling(model, SMOKE, "none"))
    got = perplexity(model, held, segments, 4 * T, T, 4096, lambda: set_scaling(model, SMOKE, "ntk-8"))
    assert got != ref


# ------------------------------------------------------------------------- resume


def _snapshot(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and "figures" not in p.parts and p.name != "results.json"}


SCIENCE_KEYS = ("train_length", "eval_lengths", "ppl", "nll", "passkey", "anomalous_fraction", "config",
                "seeds", "data", "vocab_hf_ids")


def test_rerun_is_a_noop_that_reproduces_results(smoke_run, results, capsys):
    before = _snapshot(smoke_run)
    assert run_main(ablation_main, ["--preset", "smoke", "--out", str(smoke_run)]) == 0
    assert " loss " not in capsys.readouterr().out  # no training step logged
    assert _snapshot(smoke_run) == before  # no checkpoint, evaluation or probe redone
    again = json.loads((smoke_run / "results.json").read_text())
    for key in SCIENCE_KEYS:
        assert again[key] == results[key], key
    for v in VARIANTS:
        assert again["training"][v]["curve"] == results["training"][v]["curve"]


def test_different_config_in_same_out_is_refused(smoke_run, capsys):
    before = (smoke_run / "config.json").read_text()
    assert run_main(ablation_main, ["--preset", "smoke", "--steps", "5", "--out", str(smoke_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "different configuration" in err and len(err.splitlines()) == 1
    assert (smoke_run / "config.json").read_text() == before
    assert run_main(ablation_main, ["--preset", "nope", "--out", str(smoke_run)]) == 2


def test_foreign_files_in_the_run_folder_survive_a_rerun(smoke_run):
    from anomaly.outputs import MANIFEST

    notes = smoke_run / "notes.txt"
    notes.write_text("the user's notes")
    (smoke_run / "figures" / "notes.txt").write_text("more notes")
    try:
        assert run_main(ablation_main, ["--preset", "smoke", "--out", str(smoke_run)]) == 0
        # The run's figures can be regenerated in place by the plots command.
        assert run_main(plots.main, [str(smoke_run), "--out", str(smoke_run / "figures")]) == 0
        assert notes.read_text() == "the user's notes"
        assert (smoke_run / "figures" / "notes.txt").read_text() == "more notes"
        owners = json.loads((smoke_run / MANIFEST).read_text())["files"]
        assert owners["config.json"] == owners["results.json"] == "anomaly.ablation"
        figures = json.loads((smoke_run / "figures" / MANIFEST).read_text())["files"]
        assert figures["ablation_ppl.pdf"] == "anomaly.ablation.plots" and "notes.txt" not in figures
    finally:
        notes.unlink()
        (smoke_run / "figures" / "notes.txt").unlink()


def test_deadline_stop_resumes_to_the_same_final_weights(smoke_run, tmp_path):
    config = replace(SMOKE.with_steps(5), eval=replace(SMOKE.eval, length_multipliers=(1, 2), scalings=("none",)))
    quiet = lambda s: None  # noqa: E731
    kw = dict(variants=["rope"], device="cpu", figures=False, log=quiet)
    straight = _fresh_dir(tmp_path, "straight", smoke_run)
    ref = run(config, straight, **kw)
    assert ref is not None

    stopped = _fresh_dir(tmp_path, "stopped", smoke_run)
    assert run(config, stopped, deadline=time.monotonic() - 1, **kw) is None  # stops after one step
    state = json.loads((stopped / "rope" / CHECKPOINT / "state.json").read_text())
    assert state["step"] == 1
    assert not (stopped / "results.json").exists()
    resumed = run(config, stopped, **kw)
    assert resumed is not None

    w_ref = load_file(str(straight / "rope" / CHECKPOINT / "model.safetensors"))
    w_res = load_file(str(stopped / "rope" / CHECKPOINT / "model.safetensors"))
    assert set(w_ref) == set(w_res)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k
    assert resumed["training"]["rope"]["curve"] == ref["training"]["rope"]["curve"]
    assert resumed["ppl"] == ref["ppl"] and resumed["passkey"] == ref["passkey"]
    drop = lambda g: {k: v for k, v in g.items() if k != "seconds"}  # noqa: E731
    assert drop(resumed["anomalous_fraction"]["rope"]) == drop(ref["anomalous_fraction"]["rope"])


# -------------------------------------------------------------------------- plots


def test_plots_cli_regenerates_figures(smoke_run, tmp_path):
    out = tmp_path / "figs"
    assert run_main(plots.main, [str(smoke_run / "results.json"), "--out", str(out), "--prefix", "x"]) == 0
    for name in FIGURE_NAMES:
        assert (out / f"x_{name}.pdf").is_file() and (out / f"x_{name}.png").is_file()
    # A run directory works as well as its results.json.
    assert plots.load_results(smoke_run) == plots.load_results(smoke_run / "results.json")


def test_plots_cli_bad_input_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "anomaly.ablation.plots", str(tmp_path / "missing.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert run_main(plots.main, [str(bad)]) == 2
    bad.write_text(json.dumps({"ppl": {}}))
    assert run_main(plots.main, [str(bad)]) == 2
    short = {"train_length": 4, "eval_lengths": [4, 8], "ppl": {"rope": {"none": [1.0]}}, "passkey": {}}
    bad.write_text(json.dumps(short))
    assert run_main(plots.main, [str(bad)]) == 2
    bad.write_text(json.dumps(short | {"ppl": [1.0, 2.0]}))
    assert run_main(plots.main, [str(bad)]) == 2


def test_nonfinite_perplexity_is_shown_clipped(results):
    import matplotlib.pyplot as plt

    r = json.loads(json.dumps(results))
    r["ppl"]["rope"]["none"][-1] = math.inf
    r["ppl"]["rope"]["ntk-2"][-1] = None  # NaN in JSON
    fig = plots.perplexity_vs_length(r)
    try:
        labels = [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]
        assert "non-finite (clipped)" in labels
        top = fig.axes[0].get_ylim()[1]
        assert math.isfinite(top) and top > max(x for x in r["ppl"]["rope"]["none"] if math.isfinite(x))
    finally:
        plt.close(fig)
    table = plots.markdown_table(r, "ppl")
    assert "inf" in table and "n/a" in table
    assert table.count("\n") == 1 + len(VARIANTS) * len(SCALINGS)
    assert "%" in plots.markdown_table(r, "passkey")
