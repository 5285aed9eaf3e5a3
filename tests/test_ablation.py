"""The slack-vs-strict ablation end to end (smoke preset) and its building blocks.

The smoke run is done once per test session (the ``smoke_run`` fixture of conftest.py) and
shared; the tests that need a run of their own train a few steps of one variant and seed
with a reduced evaluation, from a copy of the smoke run's token cache. The figures and
their command are tested in test_ablation_plots.py, training under ``torchrun`` in
test_ablation_ddp.py.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anomaly.ablation.__main__ import main as ablation_main
from anomaly.ablation.config import SCALINGS, VARIANTS, config_from_dict, get_preset
from anomaly.ablation.data import EOS, UNK, AblationData, build_data
from anomaly.ablation.evaluate import passkey_prompts, passkey_scores, perplexity, segment_ends, set_scaling
from anomaly.ablation.passkey import ANSWER, KEY_SENTENCE, QUESTION, PasskeyPrompt
from anomaly.ablation.run import SMOKE_NOTE, run, seed_dir
from anomaly.ablation.train import CHECKPOINT, build_model, load_checkpoint
from anomaly.cli import run_main
from conftest import one_torch_thread

pytestmark = pytest.mark.slow

SMOKE = get_preset("smoke")
PER_SEED = ("ppl_per_seed", "passkey_per_seed", "digit_nll_per_seed")
"""``[variant][scaling] → [seed][length]`` tables of results.json."""
MEANS = ("ppl", "nll", "passkey", "digit_nll")
"""``[variant][scaling] → [length]`` tables (means over seeds)."""
ITEMS = ("passkey_grid_per_seed", "segment_nll_per_seed")
"""``[variant][scaling] → [seed][length][depth | segment]``: each seed's within-seed items
(intervals and tests are computed from the per-seed values by anomaly.ablation.analysis)."""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def results(smoke_run) -> dict:
    return json.loads((smoke_run / "results.json").read_text())


@pytest.fixture(scope="module")
def data(smoke_run) -> AblationData:
    """The smoke run's data, rebuilt from its token cache (as a resumed run does)."""
    return build_data(SMOKE, smoke_run / "cache")


def _eval(smoke_run: Path, variant: str, seed: int, scaling: str) -> dict:
    """One trained model's evaluation file (``ScalingResult`` dict)."""
    return json.loads((seed_dir(smoke_run, variant, seed) / f"eval_{scaling}.json").read_text())


def _trained(smoke_run: Path, variant: str, seed: int) -> torch.nn.Module:
    """A trained smoke model in eval mode."""
    model = build_model(SMOKE, variant, seed)
    load_checkpoint(seed_dir(smoke_run, variant, seed) / CHECKPOINT, model)
    return model.eval()


def _fresh_dir(tmp_path: Path, name: str, smoke_run: Path) -> Path:
    """An empty run directory holding a copy of the smoke run's token cache."""
    out = tmp_path / name
    shutil.copytree(smoke_run / "cache", out / "cache")
    return out


# ---------------------------------------------------------------------------- results


def test_results_keys_and_shapes(results):
    T, lengths, seeds = results["train_length"], results["eval_lengths"], results["seeds"]
    n_len, n_seed, n_depth = len(lengths), len(SMOKE.seeds), len(SMOKE.eval.depths)
    assert T == SMOKE.data.train_length and lengths == SMOKE.eval_lengths and lengths[0] == T
    assert seeds == list(SMOKE.seeds) and n_seed >= 2
    assert results["depths"] == list(SMOKE.eval.depths)
    assert results["variants"] == list(VARIANTS) and results["scalings"] == list(SCALINGS)
    assert config_from_dict(results["config"]) == SMOKE
    assert results["note"] == SMOKE_NOTE
    assert not any(k.endswith("_ci") for k in results)  # no pooled intervals: the seed is the unit
    for key in (*MEANS, *PER_SEED, *ITEMS, "passkey_grid"):
        assert list(results[key]) == list(VARIANTS), key
        for v in VARIANTS:
            assert list(results[key][v]) == list(SCALINGS), (key, v)
    for v in VARIANTS:
        for s in SCALINGS:
            for key in MEANS:
                assert np.shape(results[key][v][s]) == (n_len,), (key, v, s)
            for key in PER_SEED:
                assert np.shape(results[key][v][s]) == (n_seed, n_len), (key, v, s)
            grid, grids = np.asarray(results["passkey_grid"][v][s]), np.asarray(results["passkey_grid_per_seed"][v][s])
            assert grid.shape == (n_len, n_depth) and grids.shape == (n_seed, n_len, n_depth)
            assert ((0 <= grid) & (grid <= 1)).all()
            np.testing.assert_allclose(grid, grids.mean(0), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(results["passkey_per_seed"][v][s], grids.mean(2), rtol=1e-5, atol=1e-6)
            segments = np.asarray(results["segment_nll_per_seed"][v][s])
            assert segments.shape == (n_seed, n_len, SMOKE.eval.ppl_segments)
            np.testing.assert_allclose(results["ppl_per_seed"][v][s], np.exp(segments.mean(2)), rtol=2e-5)

            # The means are over seeds: equal prompt and segment counts per seed make the
            # passkey and digit-loss means the means of the per-seed ones, and the pooled
            # perplexity the geometric mean of the per-seed ones (6 significant digits).
            for key in ("passkey", "digit_nll"):
                np.testing.assert_allclose(results[key][v][s], np.mean(results[f"{key}_per_seed"][v][s], 0), rtol=1e-5)
            np.testing.assert_allclose(results["ppl"][v][s], np.exp(results["nll"][v][s]), rtol=2e-5)
            np.testing.assert_allclose(results["ppl"][v][s], np.exp(np.log(results["ppl_per_seed"][v][s]).mean(0)),
                                       rtol=2e-5)
            # Passkey accuracy is the mean of the (length × depth) grid's cells.
            np.testing.assert_allclose(results["passkey"][v][s], grid.mean(1), rtol=1e-5, atol=1e-6)


def test_per_seed_tables_follow_each_seeds_own_evaluation(smoke_run, results):
    """The [seed][length] and [length][depth] axes are the right way round: each entry is
    what that seed's evaluation file says."""
    for v in VARIANTS:
        for s in SCALINGS:
            grid = 0
            for k, seed in enumerate(results["seeds"]):
                ev = _eval(smoke_run, v, seed, s)
                exact = np.asarray(ev["passkey_exact"], dtype=float)  # [length, depth, prompt]
                assert exact.shape == (len(results["eval_lengths"]), len(SMOKE.eval.depths), SMOKE.eval.passkey_samples)
                np.testing.assert_allclose(results["passkey_per_seed"][v][s][k], exact.mean((1, 2)), atol=1e-6)
                np.testing.assert_allclose(results["digit_nll_per_seed"][v][s][k],
                                           np.mean(ev["passkey_digit_nll"], axis=(1, 2)), rtol=1e-5)
                np.testing.assert_allclose(results["ppl_per_seed"][v][s][k],
                                           np.exp(np.mean(ev["segment_nll"], axis=1)), rtol=2e-5)
                np.testing.assert_allclose(results["passkey_grid_per_seed"][v][s][k], exact.mean(2), atol=1e-6)
                np.testing.assert_allclose(results["segment_nll_per_seed"][v][s][k], ev["segment_nll"], rtol=1e-5)
                grid = grid + exact.mean(2) / len(results["seeds"])
            np.testing.assert_allclose(results["passkey_grid"][v][s], grid, atol=1e-6)
    # Seeds train different models: their perplexities differ.
    per_seed = np.asarray(results["ppl_per_seed"]["rope"]["none"])
    assert not np.allclose(per_seed[0], per_seed[1], rtol=1e-3)


def test_training_criterion_and_retrieval_records(results):
    n_seed, n_len = len(SMOKE.seeds), len(results["eval_lengths"])
    layers, heads = SMOKE.model.num_layers, SMOKE.model.num_heads
    criterion = results["criterion"]
    assert criterion["threshold"] == SMOKE.train.criterion and criterion["scaling"] == "none"
    for v in VARIANTS:
        runs = results["training"][v]
        assert len(runs) == n_seed
        for run_ in runs:
            assert run_["steps"] == SMOKE.train.steps
            curve, val = run_["curve"], run_["val"]
            assert curve["step"] == list(range(SMOKE.train.log_every, SMOKE.train.steps + 1, SMOKE.train.log_every))
            assert len(curve["loss"]) == len(curve["lr"]) == len(curve["step"])
            assert run_["final_loss"] == curve["loss"][-1] and math.isfinite(run_["final_loss"])
            assert val["step"] == list(range(0, SMOKE.train.steps + 1, SMOKE.train.val_every))
            assert len(val["digit_nll"]) == len(val["exact"]) == len(val["step"])
            assert all(0 <= e <= 1 for e in val["exact"]) and all(d > 0 for d in val["digit_nll"])
            # The criterion step is the first validation at the threshold, if any.
            reached = [st for st, e in zip(val["step"], val["exact"]) if e >= SMOKE.train.criterion]
            assert run_["criterion_step"] == (reached[0] if reached else None)
            assert run_["tokens_per_s"] > 0 and run_["train_seconds"] > 0
        per_variant = criterion["per_variant"][v]
        assert per_variant["steps"] == [r["criterion_step"] for r in runs]
        assert per_variant["seeds_reached"] == sum(r["criterion_step"] is not None for r in runs)
        assert ("passkey" in per_variant) == (per_variant["seeds_reached"] > 0)

        retrieval = results["retrieval"][v]
        assert len(retrieval) == n_seed
        for r in retrieval:
            by_head = np.asarray(r["matching_by_head"])
            assert by_head.shape == (layers, heads)
            assert tuple(r["head"]) == np.unravel_index(np.argmax(by_head), by_head.shape)
            assert r["lengths"] == results["eval_lengths"] and len(r["matching"]) == len(r["on_key"]) == n_len
            assert r["matching"][0] == pytest.approx(by_head[tuple(r["head"])], rel=1e-5)
            # The matching digits lie inside the key sentence.
            assert all(0 <= m <= k + 1e-6 <= 1 + 2e-6 for m, k in zip(r["matching"], r["on_key"]))
            assert r["prompts_per_length"] == SMOKE.eval.retrieval_samples * len(SMOKE.eval.depths)
            ex = r["example"]
            rows = np.asarray(ex["rows"])
            assert ex["length"] == results["train_length"] and rows.shape == (5, ex["length"])  # 5 passkey digits
            np.testing.assert_allclose(rows.sum(1), 1, atol=1e-4)  # each row is one query's attention
            start, end = ex["key_span"]
            assert 0 <= start < end < ex["length"]


def test_strict_anomalous_fraction_is_exactly_zero(results):
    geo = results["anomalous_fraction"]
    assert list(geo) == list(VARIANTS)
    shape = (SMOKE.model.num_layers, SMOKE.model.num_heads)
    for v in VARIANTS:
        assert len(geo[v]) == len(SMOKE.seeds)
        for g in geo[v]:
            assert np.shape(g["anomalous_fraction"]) == np.shape(g["weighted_anomalous_fraction"]) == shape
            assert ("slack_spread" in g) == (v == "coca_slack")
    for g in geo["coca_strict"]:
        assert (np.asarray(g["anomalous_fraction"]) == 0).all()
        assert (np.asarray(g["weighted_anomalous_fraction"]) == 0).all()
        assert g["mean"] == 0 and g["weighted_mean"] == 0
    for g in geo["rope"]:
        assert g["mean"] > 0.05
    for g in geo["coca_slack"]:
        assert g["mean"] > 0
        # Slack's score moves with absolute position; RoPE and strict carry no such record.
        spread = g["slack_spread"]["overall_median_spread"]
        assert spread and all(x > 0 for x in spread.values())


def test_dynamic_ntk_is_identity_at_train_length(smoke_run, results):
    """At 1× (the only length ≤ T) every scaling scores exactly what no scaling does."""
    assert results["eval_lengths"][0] == results["train_length"]
    for v in VARIANTS:
        for s in SCALINGS[1:]:
            for key in PER_SEED:
                got = np.asarray(results[key][v][s])[:, 0]
                assert (got == np.asarray(results[key][v]["none"])[:, 0]).all(), (key, v, s)
            for seed in results["seeds"]:
                a, b = _eval(smoke_run, v, seed, s), _eval(smoke_run, v, seed, "none")
                for key in ("segment_nll", "passkey_exact", "passkey_digit_nll"):
                    assert a[key][0] == b[key][0], (key, v, s, seed)
    # ... and it does act past T.
    assert results["ppl_per_seed"]["rope"]["ntk-8"][0][-1] != results["ppl_per_seed"]["rope"]["none"][0][-1]


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


# ----------------------------------------------------------------- same start, same data


def test_variants_share_a_seeds_initial_weights_and_seeds_differ():
    by_seed = {seed: {v: build_model(SMOKE, v, seed).state_dict() for v in VARIANTS} for seed in (0, 1)}
    for seed, states in by_seed.items():
        ref = states["rope"]
        assert any(k.endswith("self_attn.k_proj.weight") for k in ref)  # CoCA keeps k_proj (as T)
        for v in VARIANTS[1:]:
            assert set(states[v]) == set(ref), v
            for k in ref:
                assert torch.equal(states[v][k], ref[k]), (seed, v, k)
    a, b = by_seed[0]["rope"], by_seed[1]["rope"]
    assert all(not torch.equal(a[k], b[k]) for k in a if not k.endswith("norm.weight"))  # norms start at 1


def test_training_sequences_are_deterministic_per_seed_and_differ_across_seeds(data, results):
    a, kinds_a = data.training_sequences(0)
    again, kinds_again = data.training_sequences(0)
    b, kinds_b = data.training_sequences(1)
    assert torch.equal(a, again) and kinds_a == kinds_again
    assert a.shape == b.shape == (SMOKE.train.steps * SMOKE.train.batch_size, SMOKE.data.train_length)
    assert list(data.vocab.hf_ids) == results["vocab_hf_ids"]
    assert kinds_a.count("passkey") == kinds_b.count("passkey") == results["data"]["train_sequences"]["passkey"] > 0
    assert not torch.equal(a, b) and kinds_a != kinds_b
    # Seeds differ in the order of the same text and code, and in their passkey prompts.
    def rows(x, kinds, kind):
        return sorted(tuple(r) for r, k in zip(x.tolist(), kinds) if k == kind)
    for kind in ("text", "code"):
        assert rows(a, kinds_a, kind) == rows(b, kinds_b, kind), kind
    assert rows(a, kinds_a, "passkey") != rows(b, kinds_b, "passkey")


# ------------------------------------------------------------------------- passkey


def test_passkey_prompts_exact_length_content_and_key_span(data, results):
    task, vocab = data.passkey, data.vocab
    question_len = len(vocab.encode(QUESTION))
    for length in results["eval_lengths"]:
        spans = []
        for depth in SMOKE.eval.depths:
            prompts = passkey_prompts(task, length, depth, 3, SMOKE.eval_seed)
            assert prompts == passkey_prompts(task, length, depth, 3, SMOKE.eval_seed)  # deterministic
            for p in prompts:
                assert len(p.prompt) + len(p.answer) == length and p.depth == depth
                assert UNK not in p.prompt + p.answer and EOS not in p.prompt + p.answer
                start, end = p.key_span
                assert vocab.decode(p.prompt[start:end]) == KEY_SENTENCE.format(passkey=p.passkey)
                assert vocab.decode(p.prompt[:start] + p.prompt[end:]).endswith(QUESTION)
                assert str(p.passkey) not in vocab.decode(p.prompt[:start] + p.prompt[end:])
                assert vocab.decode(p.answer) == ANSWER.format(passkey=p.passkey)
                assert int(task.digit_mask(torch.tensor(p.answer)).sum()) == 5
            spans.append(prompts[0].key_span)
        # Depth 0 puts the key sentence first, depth 1 right before the question.
        assert spans[0][0] == 0 and spans[-1][1] == length - len(prompts[0].answer) - question_len
        assert [s[0] for s in spans] == sorted(s[0] for s in spans)
    other = passkey_prompts(task, results["train_length"], 0.5, 3, SMOKE.eval_seed + 1)
    assert [p.passkey for p in other] != [p.passkey for p in passkey_prompts(task, results["train_length"], 0.5, 3,
                                                                              SMOKE.eval_seed)]
    assert len(task.sequence(results["train_length"], np.random.default_rng(0))) == results["train_length"]
    with pytest.raises(ValueError):
        task.build(task.fixed_tokens() - 5, 12345, 0.5)


def _bigram_model(vocab_size: int, successor: dict[int, int]):
    """A LLaMA whose greedy prediction after token ``a`` is ``successor[a]`` (``<unk>`` for
    the others): one-hot embeddings, attention and MLP outputs zeroed, and an output layer
    that maps each token to its successor. A forged model that answers a chosen passkey."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=vocab_size, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False,
                         max_position_embeddings=SMOKE.data.train_length, bos_token_id=EOS, eos_token_id=EOS,
                         pad_token_id=EOS)
    model = LlamaForCausalLM(config).eval()
    head = torch.zeros(vocab_size, vocab_size)
    for a, b in successor.items():
        head[b, a] = 1.0
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab_size))
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(head)
    return model


@torch.no_grad()
def _greedy_answers(model, prompts: list[PasskeyPrompt]) -> list[bool]:
    """Whether HF greedy ``generate`` reproduces each prompt's answer exactly."""
    out = []
    for p in prompts:
        x = torch.tensor([p.prompt])
        generated = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=len(p.answer),
                                   do_sample=False, pad_token_id=EOS)
        out.append(generated[0, x.shape[1]:].tolist() == p.answer)
    return out


def test_teacher_forced_passkey_equals_greedy_generation(smoke_run, data):
    task, T = data.passkey, SMOKE.data.train_length
    # A forged model that answers 12345 and nothing else: right, wrong at the first digit,
    # and wrong only at the fourth (greedy decoding departs there).
    right = task.build(T, 12345, 0.5)
    successor = dict(zip([right.prompt[-1], *right.answer[:-1]], right.answer))
    forged = _bigram_model(SMOKE.model.vocab_size, successor)
    prompts = [right, task.build(T, 54321, 0.25), task.build(T, 12354, 0.75), task.build(T, 12345, 0.0)]
    exact, _ = passkey_scores(forged, task, prompts, batch_tokens=2 * T)
    assert exact.tolist() == _greedy_answers(forged, prompts) == [True, False, False, True]
    # The trained smoke models (they do not retrieve).
    prompts = passkey_prompts(task, T, 0.5, 3, SMOKE.eval_seed)
    for variant in ("rope", "coca_slack"):
        model = _trained(smoke_run, variant, 0)
        exact, _ = passkey_scores(model, task, prompts, batch_tokens=T)
        assert exact.tolist() == _greedy_answers(model, prompts), variant


@torch.no_grad()
def test_digit_loss_equals_brute_force_nll(smoke_run, data):
    task, T = data.passkey, SMOKE.data.train_length
    prompts = passkey_prompts(task, T, 0.25, 3, SMOKE.eval_seed)
    for variant in ("rope", "coca_strict"):
        model = _trained(smoke_run, variant, 1)
        _, digit_nll = passkey_scores(model, task, prompts, batch_tokens=2 * T)  # two prompts per pass
        for p, got in zip(prompts, digit_nll):
            full, a = p.prompt + p.answer, len(p.answer)
            nll = []
            for j in range(a):  # each answer token scored on exactly its prefix
                if not bool(task.digit_mask(torch.tensor([full[T - a + j]]))):
                    continue
                logits = model(input_ids=torch.tensor([full[: T - a + j]])).logits[0, -1].double()
                nll.append(-torch.log_softmax(logits, -1)[full[T - a + j]].item())
            assert len(nll) == 5
            assert got == pytest.approx(np.mean(nll), rel=1e-5), variant


# --------------------------------------------------------------------- perplexity


def _brute_force_nll(model, window: torch.Tensor, stride: int) -> float:
    """Mean of -log p(token p | tokens < p) over the segment's scored tokens, one forward
    pass per token on exactly its prefix."""
    L = len(window)
    total = 0.0
    for pos in range(L - stride + 1, L):
        logits = model(input_ids=window[None, :pos]).logits[0, -1].double()
        total -= torch.log_softmax(logits, -1)[window[pos]].item()
    return total / (stride - 1)


@pytest.mark.parametrize("variant", ["rope", "coca_slack"])
@torch.no_grad()
def test_sliding_window_perplexity_matches_brute_force(variant):
    model = build_model(SMOKE, variant).eval()
    torch.manual_seed(1)
    V = SMOKE.model.vocab_size
    held = {"a": torch.randint(2, V, (300,)), "b": torch.randint(2, V, (200,))}
    length, stride = 96, 32
    segments = segment_ends(held, 2, length, stride)
    assert {name for name, _ in segments} == {"a", "b"}
    got = perplexity(model, held, segments, length, stride, batch_tokens=96)  # one window per pass
    want = [_brute_force_nll(model, held[name][end - length : end], stride) for name, end in segments]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@torch.no_grad()
def test_dynamic_ntk_leaves_short_windows_alone():
    model = build_model(SMOKE, "rope").eval()
    torch.manual_seed(2)
    held = {"a": torch.randint(2, SMOKE.model.vocab_size, (400,))}
    T = SMOKE.data.train_length

    def nll(length: int, stride: int, segments, scaling: str) -> np.ndarray:
        return perplexity(model, held, segments, length, stride, 4096, lambda: set_scaling(model, SMOKE, scaling))

    segments = segment_ends(held, 3, T, T // 2)
    for length in (T // 2, T):
        ref = nll(length, T // 2, segments, "none")
        for s in ("ntk-2", "ntk-8"):
            assert (nll(length, T // 2, segments, s) == ref).all(), (length, s)
    # ... and does change longer ones.
    segments = segment_ends(held, 1, 4 * T, T)
    assert (nll(4 * T, T, segments, "ntk-8") != nll(4 * T, T, segments, "none")).all()


# ------------------------------------------------------------------------- resume


def _snapshot(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*")
            if p.is_file() and "figures" not in p.parts and p.name != "results.json"}


SCIENCE_KEYS = ("train_length", "eval_lengths", "seeds", "depths", *MEANS, *PER_SEED, *ITEMS, "passkey_grid",
                "criterion", "retrieval", "anomalous_fraction", "config", "data", "vocab_hf_ids")


def test_rerun_is_a_noop_that_reproduces_results(smoke_run, results, capsys):
    before = _snapshot(smoke_run)
    assert run_main(ablation_main, ["--preset", "smoke", "--out", str(smoke_run)]) == 0
    out = capsys.readouterr().out
    assert " loss " not in out and "evaluating" not in out  # no training step, no evaluation
    assert _snapshot(smoke_run) == before  # no checkpoint, evaluation, retrieval or probe redone
    again = json.loads((smoke_run / "results.json").read_text())
    for key in SCIENCE_KEYS:
        assert again[key] == results[key], key
    for v in VARIANTS:
        for a, b in zip(again["training"][v], results["training"][v]):
            assert a["curve"] == b["curve"] and a["val"] == b["val"]


@pytest.mark.parametrize("change", [["--steps", "5"], ["--seeds", "3"]])
def test_different_config_in_same_out_is_refused(smoke_run, change, capsys):
    before = _snapshot(smoke_run)
    config = (smoke_run / "config.json").read_text()
    assert run_main(ablation_main, ["--preset", "smoke", *change, "--out", str(smoke_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "different configuration" in err and len(err.splitlines()) == 1
    assert (smoke_run / "config.json").read_text() == config and _snapshot(smoke_run) == before


def test_foreign_files_in_the_run_folder_survive_a_rerun(smoke_run):
    from anomaly.outputs import MANIFEST

    notes = smoke_run / "notes.txt"
    notes.write_text("the user's notes")
    (smoke_run / "figures" / "notes.txt").write_text("more notes")
    (smoke_run / "rope" / "notes.txt").write_text("notes beside the seeds")
    try:
        assert run_main(ablation_main, ["--preset", "smoke", "--out", str(smoke_run)]) == 0
        assert notes.read_text() == "the user's notes"
        assert (smoke_run / "figures" / "notes.txt").read_text() == "more notes"
        assert (smoke_run / "rope" / "notes.txt").read_text() == "notes beside the seeds"
        owners = json.loads((smoke_run / MANIFEST).read_text())["files"]
        assert owners["config.json"] == owners["results.json"] == "anomaly.ablation" and "notes.txt" not in owners
        assert "notes.txt" not in json.loads((smoke_run / "figures" / MANIFEST).read_text())["files"]
    finally:
        for path in (notes, smoke_run / "figures" / "notes.txt", smoke_run / "rope" / "notes.txt"):
            path.unlink()


def test_deadline_stop_resumes_to_the_same_final_weights(smoke_run, tmp_path):
    config = replace(SMOKE.with_steps(5).with_seeds(1),
                     eval=replace(SMOKE.eval, length_multipliers=(1, 2), scalings=("none",)))
    quiet = lambda s: None  # noqa: E731
    kw = dict(variants=["rope"], device="cpu", figures=False, log=quiet)
    straight = _fresh_dir(tmp_path, "straight", smoke_run)
    ref = run(config, straight, **kw)
    assert ref is not None

    stopped = _fresh_dir(tmp_path, "stopped", smoke_run)
    assert run(config, stopped, deadline=time.monotonic() - 1, **kw) is None  # stops after one step
    checkpoint = seed_dir(stopped, "rope", 0) / CHECKPOINT
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 1
    assert not (stopped / "results.json").exists() and not list(seed_dir(stopped, "rope", 0).glob("eval_*"))
    resumed = run(config, stopped, **kw)
    assert resumed is not None

    w_ref = load_file(str(seed_dir(straight, "rope", 0) / CHECKPOINT / "model.safetensors"))
    w_res = load_file(str(checkpoint / "model.safetensors"))
    assert set(w_ref) == set(w_res)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_res[k]), k
    for a, b in zip(resumed["training"]["rope"], ref["training"]["rope"]):
        assert a["curve"] == b["curve"] and a["val"] == b["val"]
    for key in (*MEANS, *PER_SEED, "passkey_grid", "retrieval"):
        assert resumed[key] == ref[key], key
    def geometry(r: dict) -> list[dict]:  # the probe's timing aside
        return [{k: v for k, v in g.items() if k != "seconds"} for g in r["anomalous_fraction"]["rope"]]
    assert geometry(resumed) == geometry(ref)



def test_a_model_held_by_another_process_is_left_to_it_and_the_run_completes_after(smoke_run, tmp_path):
    """--shared: a model whose lock a running process holds is skipped, the rest are done, no
    results.json is written; once the holder is gone the same run finishes with the very
    results of a run that never shared."""
    import subprocess
    import sys

    from anomaly.ablation.lock import LockOwner, _start_time
    from anomaly.ablation.run import MODEL_LOCK, TRAINING

    config = replace(SMOKE.with_steps(5).with_seeds(2),
                     eval=replace(SMOKE.eval, length_multipliers=(1, 2), scalings=("none",)))
    kw = dict(variants=["rope"], device="cpu", figures=False, log=lambda s: None)
    ref = run(config, _fresh_dir(tmp_path, "alone", smoke_run), **kw)
    assert ref is not None

    shared = _fresh_dir(tmp_path, "shared", smoke_run)
    lock = seed_dir(shared, "rope", 0) / MODEL_LOCK
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(LockOwner(holder.pid, _start_time(holder.pid)).text())
        assert run(config, shared, **kw) is None
        assert not (seed_dir(shared, "rope", 0) / TRAINING).exists()  # left to its holder
        assert (seed_dir(shared, "rope", 1) / TRAINING).exists()  # the next model was done meanwhile
        assert not (shared / "results.json").exists()
    finally:
        holder.kill()
        holder.wait()
    resumed = run(config, shared, **kw)  # the holder died: its stale lock is taken over
    assert resumed is not None and not lock.exists()
    for key in (*MEANS, *PER_SEED, "passkey_grid", "retrieval"):
        assert resumed[key] == ref[key], key


def test_models_from_reads_a_variant_of_the_same_recipe_and_trains_the_rest(smoke_run, tmp_path, capsys):
    """--models-from: a variant trained in the other run with this run's config for it is read
    from there (its folder untouched, recorded in results.json), a variant trained there
    with another learning rate is trained here; the read models give the other run's values."""
    config = replace(SMOKE.with_steps(5).with_seeds(2),
                     eval=replace(SMOKE.eval, length_multipliers=(1, 2), scalings=("none",)))
    kw = dict(variants=["rope", "coca_slack"], device="cpu", figures=False, probe=False, log=lambda s: None)
    first = _fresh_dir(tmp_path, "first", smoke_run)
    ref = run(config, first, **kw)
    before = _snapshot(first)
    slower = replace(config, train=replace(config.train, lr_by_variant=(("coca_slack", config.train.lr / 2),)))
    second = _fresh_dir(tmp_path, "second", smoke_run)
    got = run(slower, second, models_from=first, **kw)
    assert _snapshot(first) == before  # only read
    assert got["models_from"] == {"rope": {"folder": str(first), "seeds": [0, 1]}}
    assert not (second / "rope").exists() and (seed_dir(second, "coca_slack", 1) / "training.json").exists()
    for key in (*PER_SEED, "passkey_grid_per_seed"):
        assert got[key]["rope"] == ref[key]["rope"], key
    assert got["ppl_per_seed"]["coca_slack"] != ref["ppl_per_seed"]["coca_slack"]  # trained again, at half the rate
    # The command refuses a folder that is not a run, before writing anything.
    out = tmp_path / "third"
    assert run_main(ablation_main, ["--preset", "smoke", "--out", str(out), "--models-from", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --models-from") and len(err.splitlines()) == 1 and not out.exists()


def test_models_from_is_refused_under_torchrun_before_anything_is_read(tmp_path, monkeypatch, capsys):
    """Ranks train every model together: --models-from is refused up front, by the command
    (nothing written) and by run() (the other run not read: a missing folder is not noticed)."""
    from anomaly.ablation.distributed import World
    from anomaly.errors import UserError

    with pytest.raises(UserError, match="single processes"):
        run(SMOKE, tmp_path / "out", models_from=tmp_path / "absent", world=World(rank=0, size=2), device="cpu")
    assert not (tmp_path / "out").exists()
    first = tmp_path / "first"
    first.mkdir()
    (first / "config.json").write_text("{}")  # a run folder, as far as the command's own check goes
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                        ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    out = tmp_path / "second"
    assert run_main(ablation_main, ["--preset", "smoke", "--out", str(out), "--models-from", str(first)]) == 2
    err = capsys.readouterr().err.strip()
    assert "for single processes" in err and len(err.splitlines()) == 1 and not out.exists()


def _initial_logit_spread(config, variant: str) -> float:
    """Standard deviation of layer 0's initial attention logits on unit-RMS random inputs."""
    from anomaly.coca.attention import coca_qk

    m = config.model
    attn = build_model(config, variant, seed=0).model.layers[0].self_attn
    x = torch.randn(1, 128, m.hidden_size, generator=torch.Generator().manual_seed(0))  # [b, s, hidden]
    q = attn.q_proj(x).view(1, 128, m.num_heads, m.head_dim).transpose(1, 2)  # [b, h, s, d]
    k = attn.k_proj(x).view(1, 128, m.num_heads, m.head_dim).transpose(1, 2)  # [b, h, s, d]
    if variant != "rope":
        inv_freq = 1.0 / m.rope_theta ** (torch.arange(0, m.head_dim, 2) / m.head_dim)
        q, k = coca_qk(q, k, variant=variant.removeprefix("coca_"), inv_freq=inv_freq)
    return float((q @ k.transpose(-1, -2) / m.head_dim**0.5).std())


@torch.no_grad()
def test_coca_init_gain_scales_the_initial_logits_as_a_cube():
    """The diagnostic ``model.coca_init_gain`` (docs/ablation.md): CoCA's score is cubic in the
    q/T weights, so gain g multiplies its initial logits by g³, and 1.75 brings them to RoPE's
    scale (they start about 5× smaller at equal weights)."""
    cpu = get_preset("cpu")
    rope = _initial_logit_spread(cpu, "rope")
    for variant in ("coca_slack", "coca_strict"):
        plain = _initial_logit_spread(cpu, variant)
        gained = _initial_logit_spread(replace(cpu, model=replace(cpu.model, coca_init_gain=1.75)), variant)
        assert gained / plain == pytest.approx(1.75**3, rel=1e-4)
        assert 3 < rope / plain < 8
        assert 0.67 < rope / gained < 1.5


# ------------------------------------------------------- the analysis run's protocol (issue 17)


SWEEP_LRS = {"rope": 5e-4, "coca_slack": 2e-3, "coca_strict": 1e-3}
"""A hand-made sweep's chosen learning rates (different for every variant)."""


def _sweep_summary(path: Path, **change) -> Path:
    """A learning-rate sweep summary as ``anomaly.ablation.sweep --summarise`` writes it."""
    summary = {"rule": "hand-made", "complete": True, "finished": 18, "expected": 18, "missing": [],
               "variants": list(VARIANTS), "lrs": [5e-4, 1e-3, 2e-3], "tuning_seeds": [100, 101],
               "table": {}, "chosen": dict(SWEEP_LRS), **change}
    path.write_text(json.dumps(summary))
    return path


def test_matched_step_is_criterion_plus_k_within_the_cap():
    from anomaly.ablation.train import matched_step

    cpu_seeds = get_preset("cpu-seeds")
    assert cpu_seeds.train.matched_steps == 500 and cpu_seeds.train.steps == 3000
    assert matched_step(cpu_seeds, 1200) == 1700
    assert matched_step(cpu_seeds, 2500) == 3000  # the last step: the final model is the matched one
    assert matched_step(cpu_seeds, 2600) is None  # beyond the cap: the stage is not reached
    assert matched_step(cpu_seeds, None) is None
    assert matched_step(get_preset("cpu"), 1200) is None  # the other presets take no snapshot


def test_analysis_run_protocol_end_to_end(tmp_path, capsys):
    """The analysis run's protocol on the smoke model: each variant trains at the sweep's
    learning rate, the matched-stage snapshot is taken at criterion + K, and a run whose
    weights are gone resumes from its JSON files alone, without training."""
    from anomaly.ablation.train import MATCHED, learning_rate, train

    out = tmp_path / "seeds"  # its own token cache: the command claims the folder's entries
    K = 6
    argv = ["--preset", "smoke", "--out", str(out), "--seeds", "1", "--no-figures",
            "--lr-from", str(_sweep_summary(tmp_path / "sweep.json")),
            # criterion 0: reached at the step-0 validation, so the snapshot falls at step K
            "--set", "train.criterion=0", "--set", f"train.matched_steps={K}",
            "--set", "eval.length_multipliers=1,2", "--set", "eval.scalings=none,ntk-2"]
    assert run_main(ablation_main, argv) == 0
    first = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    config = config_from_dict(results["config"])

    # (a) each variant's learning rate is recorded and is the one its optimiser used
    assert results["lr"] == SWEEP_LRS and dict(config.train.lr_by_variant) == SWEEP_LRS
    for v in VARIANTS:
        assert f"[{v} seed 0] training at peak lr {SWEEP_LRS[v]:g}" in first
        run_ = results["training"][v][0]
        assert run_["lr"] == SWEEP_LRS[v]
        # the curve records the rate applied at the step before each logged step
        want = [learning_rate(config.for_variant(v), step - 1) for step in run_["curve"]["step"]]
        np.testing.assert_allclose(run_["curve"]["lr"], want, rtol=1e-5)
    peak = {v: max(results["training"][v][0]["curve"]["lr"]) for v in VARIANTS}
    assert peak["coca_slack"] / peak["rope"] == pytest.approx(4, rel=1e-5)

    # (c) the matched-stage snapshot: the weights at criterion + K, evaluated without scaling
    stage = results["matched_stage"]
    assert stage["extra_steps"] == K and stage["scaling"] == "none"
    for v in VARIANTS:
        vdir = seed_dir(out, v, 0)
        assert results["training"][v][0]["criterion_step"] == 0
        assert stage["per_variant"][v]["steps"] == [K] and stage["per_variant"][v]["seeds_reached"] == 1
        assert json.loads((vdir / MATCHED / "state.json").read_text())["step"] == K
        matched = json.loads((vdir / "matched_eval.json").read_text())
        final = json.loads((vdir / "eval_none.json").read_text())
        np.testing.assert_allclose(stage["per_variant"][v]["ppl_per_seed"], [matched["ppl"]], rtol=2e-5)
        assert matched["segment_nll"] != final["segment_nll"]  # step K's weights, not the final ones
        if v == "rope":  # the snapshot holds the weights of step K: train again and catch them there
            caught = {}

            def catch(model, caught=caught) -> dict:
                caught[len(caught) * SMOKE.train.val_every] = {k: t.clone() for k, t in model.state_dict().items()}
                return {"digit_nll": 1.0, "exact": 1.0}

            assert K % SMOKE.train.val_every == 0
            again = build_model(config, v, 0)
            data = build_data(config, out / "cache")
            train(again, data.training_sequences(0)[0], config.for_variant(v), tmp_path / "again" / CHECKPOINT,
                  validate=catch, log=lambda s: None)
            kept = load_file(str(vdir / MATCHED / "model.safetensors"))
            assert kept and all(torch.equal(kept[k], caught[K][k]) for k in kept)
            assert not all(torch.equal(kept[k], caught[SMOKE.train.steps][k]) for k in kept)

    # (b) the weights gone, the evaluation files kept: no training, the same results
    for v in VARIANTS:
        for name in (CHECKPOINT, "criterion", MATCHED):
            shutil.rmtree(seed_dir(out, v, 0) / name)
    assert run_main(ablation_main, argv) == 0
    second = capsys.readouterr().out
    assert " loss " not in second and "training at" not in second and "evaluating" not in second
    again = json.loads((out / "results.json").read_text())
    for key in (*SCIENCE_KEYS, "matched_stage", "lr", "lr_reading"):
        assert again[key] == results[key], key
    assert again["training"] == results["training"]


@pytest.mark.parametrize("change, words", [
    ({"complete": False, "finished": 7, "chosen": {v: None for v in VARIANTS}}, ["incomplete", "7 of 18"]),
    ({"chosen": {"rope": 5e-4, "coca_slack": 1e-3}}, ["coca_strict"]),
    ({"chosen": {**SWEEP_LRS, "rope": None}}, ["rope"]),
])
def test_lr_from_refuses_an_unusable_sweep_in_one_line(tmp_path, capsys, change, words):
    argv = ["--preset", "smoke", "--out", str(tmp_path / "run"), "--lr-from"]
    assert run_main(ablation_main, [*argv, str(_sweep_summary(tmp_path / "s.json", **change))]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --lr-from") and len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not (tmp_path / "run").exists()


def test_lr_from_refuses_a_file_that_is_not_a_sweep_summary(tmp_path, capsys):
    other = tmp_path / "results.json"
    other.write_text(json.dumps({"ppl": {}}))
    for path, words in ((other, ["not a learning-rate sweep summary"]), (tmp_path / "none.json", ["no such file"])):
        assert run_main(ablation_main, ["--preset", "smoke", "--out", str(tmp_path / "run"), "--lr-from", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --lr-from") and len(err.splitlines()) == 1 and all(w in err for w in words), err
    sweep = _sweep_summary(tmp_path / "sweep.json")
    assert run_main(ablation_main, ["--preset", "smoke", "--out", str(tmp_path / "run"), "--lr-from", str(sweep),
                                    "--set", "train.lr=1e-3"]) == 2
    assert "drop --set train.lr" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_with_other_learning_rates_is_refused(tmp_path):
    from anomaly.ablation.config import check_config
    from anomaly.errors import UserError

    config = replace(SMOKE, train=replace(SMOKE.train, lr_by_variant=tuple(SWEEP_LRS.items())))
    check_config(tmp_path, config)
    check_config(tmp_path, config)  # the same config: accepted (exact round trip through config.json)
    other = replace(SMOKE, train=replace(SMOKE.train, lr_by_variant=tuple({**SWEEP_LRS, "rope": 1e-3}.items())))
    for changed in (other, SMOKE):
        with pytest.raises(UserError, match="different configuration"):
            check_config(tmp_path, changed)


@pytest.mark.parametrize("text, ok", [
    ("rope:5e-4,coca_slack:2e-3,coca_strict:1e-3", True), ("", True),
    ("rope:5e-4,coca_slack:2e-3", False), ("rope:5e-4,coca_slack:2e-3,coca_strict:0", False),
    ("rope:5e-4,coca_slack:nan,coca_strict:1e-3", False), ("rope:5e-4,rope:2e-3,coca_strict:1e-3", False),
    ("rope:5e-4,alibi:2e-3,coca_strict:1e-3", False),
])
def test_lr_by_variant_is_range_checked(text, ok):
    from anomaly.ablation.config import override, validate
    from anomaly.errors import UserError

    config = override(SMOKE, f"train.lr_by_variant={text}")
    if ok:
        assert validate(config) is config
        assert [config.lr_of(v) for v in VARIANTS] == ([5e-4, 2e-3, 1e-3] if text else [SMOKE.train.lr] * 3)
        assert config.for_variant("rope").train.lr == config.lr_of("rope")
    else:
        with pytest.raises(UserError, match="train.lr_by_variant=.*finite learning rate above 0"):
            validate(config)


@pytest.mark.parametrize("name, content", [
    ("model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}"),  # a header cut short
    ("state.json", b"{\"step\": 3"),  # JSON cut short
])
def test_a_damaged_checkpoint_is_one_line_not_a_traceback(tmp_path, name, content):
    """Resuming from a checkpoint whose file is damaged names the file and says what to do."""
    from anomaly.ablation.config import get_preset
    from anomaly.ablation.train import TrainState, build_model, load_checkpoint, save_checkpoint
    from anomaly.errors import UserError

    config = get_preset("smoke")
    ckpt = tmp_path / "checkpoint"
    save_checkpoint(ckpt, build_model(config, "rope", 0), None, TrainState())
    load_checkpoint(ckpt, build_model(config, "rope", 0))  # intact: loads
    (ckpt / name).write_bytes(content)
    with pytest.raises(UserError, match=f"cannot read .*{name}.*move the folder .*checkpoint away"):
        load_checkpoint(ckpt, build_model(config, "rope", 0))
