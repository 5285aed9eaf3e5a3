"""Every command keeps the user's files and refuses bad input in one line.

* :mod:`anomaly.outputs`: a command adds its files to an output folder, replaces only its
  own on a rerun, and refuses (before any work) a name that is someone else's;
* per command: a foreign file next to the output survives, and a rerun works;
* a table of bad inputs across all commands: exit 2, one line on stderr naming the
  problem, no traceback, and no file created or changed in the watched folder. The table
  runs in-process through each command's entry point; a few rows also run as
  ``python -m`` in a fresh interpreter.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from anomaly.cli import run_main
from anomaly.errors import UserError
from anomaly.outputs import MANIFEST, claim, claim_file

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}


# ----------------------------------------------------------------------------- helpers


def snapshot(folder: Path) -> dict[str, tuple[int, int] | str]:
    """Every path under ``folder``: files by (size, mtime), folders by kind."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
        for p in sorted(folder.rglob("*"))
    }


def manifest(folder: Path) -> dict[str, str]:
    return json.loads((folder / MANIFEST).read_text())["files"]


def tiny_llama_folder(folder: Path) -> Path:
    """A random 2-layer LLaMA with a word-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[UNK]"] + [f"w{i}" for i in range(127)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def gpt2_folder(folder: Path) -> Path:
    """A tiny GPT-2 (learned positions, no RoPE)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=1, n_head=2,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    return folder


def make_read_only(folder: Path) -> bool:
    """Make ``folder`` unwritable even for root (``chattr +i`` where allowed); whether it worked."""
    folder.chmod(0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
    try:
        (folder / ".probe").touch()
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


def undo_read_only(folder: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def _dev_main(argv):
    spec = importlib.util.spec_from_file_location("dev", ROOT / "dev.py")
    dev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev)
    return dev.main(list(argv))


def _entry(module: str, name: str = "main") -> Callable[[list[str]], int]:
    return lambda argv: run_main(getattr(importlib.import_module(module), name), argv)


CLIS: dict[str, Callable[[list[str]], int]] = {
    "probe": lambda argv: importlib.import_module("anomaly.probe.cli").entry(argv),
    "geometry": _entry("anomaly.coca.geometry"),
    "figures": _entry("anomaly.figures"),
    "ablation": _entry("anomaly.ablation.__main__"),
    "plots": _entry("anomaly.ablation.plots"),
    "dev": _dev_main,
}
MODULES = {"probe": "anomaly.probe", "geometry": "anomaly.coca.geometry", "figures": "anomaly.figures",
           "ablation": "anomaly.ablation", "plots": "anomaly.ablation.plots"}


# --------------------------------------------------------------------- anomaly.outputs


def test_new_folder_appears_whole_with_its_manifest(tmp_path):
    out = tmp_path / "a" / "b"
    target = claim(out, "cmd", ["x.txt"])
    assert not (tmp_path / "a").exists(), "claim checks, it creates nothing"
    with target.writing() as tmp:
        (tmp / "x.txt").write_text("1")
        assert not out.exists()
    assert (out / "x.txt").read_text() == "1"
    assert manifest(out) == {"x.txt": "cmd"}
    assert target.written == [out / "x.txt"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "x.txt"]


def test_foreign_files_survive_and_a_rerun_replaces_only_its_own(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {"other.txt": "other"}}))
    (tmp_path / "other.txt").write_text("theirs")
    for text in ("1", "2"):
        target = claim(tmp_path, "cmd", ["x.txt"])
        with target.writing() as tmp:
            (tmp / "x.txt").write_text(text)
        assert (tmp_path / "x.txt").read_text() == text
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "other.txt").read_text() == "theirs"
    assert manifest(tmp_path) == {"other.txt": "other", "x.txt": "cmd"}


def test_a_name_that_is_not_ours_is_refused_before_any_work(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    with pytest.raises(UserError, match="x.txt already exists and was not written by this command"):
        claim(tmp_path, "cmd", ["x.txt"])
    (tmp_path / MANIFEST).write_text(json.dumps({"files": {"x.txt": "other"}}))
    with pytest.raises(UserError, match="was written by other"):
        claim(tmp_path, "cmd", ["x.txt"])
    assert (tmp_path / "x.txt").read_text() == "mine"


def test_a_file_that_appears_during_the_work_is_not_overwritten(tmp_path):
    target = claim(tmp_path, "cmd", ["x.txt"])
    with pytest.raises(UserError, match="x.txt already exists"):
        with target.writing() as tmp:
            (tmp / "x.txt").write_text("ours")
            (tmp_path / "x.txt").write_text("theirs")  # e.g. another program, meanwhile
    assert (tmp_path / "x.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_a_failed_run_changes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    target = claim(tmp_path, "cmd", ["x.txt"])
    with pytest.raises(RuntimeError):
        with target.writing() as tmp:
            (tmp / "x.txt").write_text("half")
            raise RuntimeError("the work failed")
    assert snapshot(tmp_path) == before


def test_replace_own_removes_only_our_stale_files(tmp_path):
    for names in (["a.txt", "b.txt"], ["a.txt"]):
        (tmp_path / "notes.txt").write_text("mine")
        target = claim(tmp_path, "cmd", names, replace_own=True)
        with target.writing() as tmp:
            for n in names:
                (tmp / n).write_text(n)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST, "a.txt", "notes.txt"]
    assert manifest(tmp_path) == {"a.txt": "cmd"}


@pytest.mark.parametrize("levels, kept", [(1, True), (3, True), (4, True), (5, False), (12, False)])
def test_a_rerendered_png_within_four_levels_keeps_the_existing_bytes(tmp_path, levels, kept):
    """Rasterisation differs by 1/255 at a few pixels between CPUs (numpy's log10 on AVX-512
    or not); such a PNG is the same picture, so the committed bytes stay and regeneration is
    idempotent on every machine. A larger difference is a changed figure and replaces it."""
    import numpy as np
    from matplotlib import image

    rng = np.random.default_rng(0)
    picture = rng.integers(20, 200, size=(16, 24, 3)).astype(np.uint8)
    for round_, pixels in enumerate((picture, picture.copy())):
        if round_ == 1:
            pixels[3, 5, 0] += levels  # the re-render differs at one pixel
            pixels[7, 2, 1] -= min(levels, 1)
        target = claim(tmp_path, "cmd", ["fig.png"])
        with target.writing() as tmp:
            image.imsave(tmp / "fig.png", pixels, metadata={"Software": None})
        if round_ == 0:
            first = (tmp_path / "fig.png").read_bytes()
    assert ((tmp_path / "fig.png").read_bytes() == first) == kept
    assert manifest(tmp_path) == {"fig.png": "cmd"}


def test_manifest_is_deterministic(tmp_path):
    texts = []
    for _ in range(2):
        target = claim(tmp_path, "cmd", ["b", "a"])
        with target.writing() as tmp:
            (tmp / "b").write_text("")
            (tmp / "a").write_text("")
        texts.append((tmp_path / MANIFEST).read_bytes())
    assert texts[0] == texts[1]
    assert list(manifest(tmp_path)) == ["a", "b"]


@pytest.mark.parametrize("entry", ["../outside.txt", "sub/x.txt", ".."])
def test_a_manifest_cannot_reach_outside_its_folder(entry, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "outside.txt").write_text("mine")
    (out / MANIFEST).write_text(json.dumps({"files": {entry: "cmd"}}))
    with pytest.raises(UserError, match="not a manifest this toolkit wrote"):
        claim(out, "cmd", ["x.txt"], replace_own=True)
    assert (tmp_path / "outside.txt").read_text() == "mine"


def test_committed_figure_folders_belong_to_their_commands():
    """``dev.py run`` on a fresh clone writes into figures/ and results/: their manifests
    must give every committed figure to the command that regenerates it."""
    figures = manifest(ROOT / "figures")
    for path in (ROOT / "figures").iterdir():
        if path.is_file() and path.name != MANIFEST:
            owner = "anomaly.ablation.plots" if path.name.startswith("ablation_") else "anomaly.figures"
            assert figures[path.name] == owner, path.name
    probe = manifest(ROOT / "figures" / "probe_smollm2")
    for path in (ROOT / "figures" / "probe_smollm2").iterdir():
        if path.name != MANIFEST:
            assert probe[path.name] == "anomaly.probe", path.name
    assert manifest(ROOT / "results")["coca_geometry_smollm2.json"] == "anomaly.coca.geometry"


@pytest.mark.parametrize("bad, words", [
    (".", "current folder"), ("", "current folder"), ("..", "current folder"),
])
def test_the_current_folder_is_refused(bad, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=words):
        claim(bad, "cmd", ["x"])


def test_claim_file(tmp_path):
    with pytest.raises(UserError, match="is a folder"):
        claim_file(tmp_path, "cmd", flag="--json")
    target = claim_file(tmp_path / "r.json", "cmd", flag="--json")
    with target.writing() as tmp:
        (tmp / "r.json").write_text("{}")
    claim_file(tmp_path / "r.json", "cmd", flag="--json")  # a rerun may replace it
    with pytest.raises(UserError, match=r"--json .*r.json already exists and was written by cmd"):
        claim_file(tmp_path / "r.json", "other", flag="--json")


# ------------------------------------------------- per command: foreign files survive


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


def _with_notes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("the user's notes")
    return folder


def _notes_intact(folder: Path) -> None:
    assert (folder / "notes.txt").read_text() == "the user's notes"


def test_figures_keeps_foreign_files_and_reruns(tmp_path):
    out = _with_notes(tmp_path / "figs")
    for _ in range(2):
        assert CLIS["figures"](["--out", str(out), "--only", "decay_bounds"]) == 0
    _notes_intact(out)
    assert manifest(out) == {f"decay_bounds.{e}": "anomaly.figures" for e in ("json", "pdf", "png")}


def test_ablation_plots_keeps_foreign_files_and_reruns(tmp_path):
    out = _with_notes(tmp_path / "figs")
    (out / "decay_bounds.pdf").write_text("another figure")
    for _ in range(2):
        assert CLIS["plots"]([str(ROOT / "results" / "ablation_cpu.json"), "--out", str(out)]) == 0
    _notes_intact(out)
    assert (out / "decay_bounds.pdf").read_text() == "another figure"
    figures = importlib.import_module("anomaly.ablation.plots").FIGURES
    assert set(manifest(out).values()) == {"anomaly.ablation.plots"} and len(manifest(out)) == 3 * len(figures)


@pytest.mark.slow
def test_probe_keeps_foreign_files_and_reruns(tiny_llama, tmp_path, capsys):
    out = _with_notes(tmp_path / "probe")
    argv = ["--model", str(tiny_llama), "--tokens", "32", "--bins", "8", "--out", str(out), "--quiet", "--device", "cpu"]
    assert CLIS["probe"](argv) == 0
    printed = capsys.readouterr().out
    assert "of causal (query, key, slice) triples start in the anomalous case (d), where chance is 50 %" in printed
    assert "summary.json" in printed and "probe_fraction_heatmap.{json,pdf,png}" in printed
    figures = {p.name for p in out.glob("probe_*")}
    assert figures and all(manifest(out)[n] == "anomaly.probe" for n in figures)
    # The rerun without figures removes the previous run's figures (its own), nothing else.
    assert CLIS["probe"](argv + ["--no-figures"]) == 0
    _notes_intact(out)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "arrays.npz", "notes.txt", "summary.json"]


def test_coca_geometry_json_keeps_foreign_files_and_reruns(tiny_llama, tmp_path, capsys):
    out = _with_notes(tmp_path / "res")
    argv = ["--model", str(tiny_llama), "--tokens", "16", "--distances", "1", "4", "--positions", "32",
            "--pairs", "2", "--json", str(out / "g.json"), "--quiet"]
    for _ in range(2):
        assert CLIS["geometry"](argv) == 0
    _notes_intact(out)
    assert json.loads((out / "g.json").read_text())["tokens"] == 16
    assert manifest(out) == {"g.json": "anomaly.coca.geometry"}


# ------------------------------------------------------------------ the bad-input table


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llama):
    """The watched folder: every input the table needs; each row must leave it unchanged."""
    ws = tmp_path_factory.mktemp("workspace")
    shutil.copytree(tiny_llama, ws / "llama")
    gpt2_folder(ws / "gpt2")
    from anomaly.models import bundled_gguf

    folder, name = bundled_gguf()
    with open(folder / name, "rb") as f:
        (ws / "trunc.gguf").write_bytes(f.read(200_000))  # a download cut short
    (ws / "empty.gguf").write_bytes(b"")
    (ws / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (ws / "nul.txt").write_bytes(b"To be\x00or not\x00")
    (ws / "short.txt").write_text("w1 w2 w3 w4\n")
    (ws / "textdir").mkdir()
    (ws / "taken.txt").write_text("a user's file")
    _with_notes(ws / "foreign").joinpath("summary.json").write_text("{}")  # not the probe's
    _with_notes(ws / "userfigs").joinpath("fig3_cases.png").write_text("a user's figure")
    _with_notes(ws / "userabl").joinpath("ablation_ppl.pdf").write_text("a user's figure")
    _with_notes(ws / "userrun").joinpath("config.json").write_text("{}")
    (ws / "other").mkdir()
    (ws / "other" / "summary.json").write_text("{}")
    (ws / "other" / MANIFEST).write_text(json.dumps({"files": {"summary.json": "anomaly.figures"}}))
    (ws / "badmanifest").mkdir()
    (ws / "badmanifest" / MANIFEST).write_text("not json")
    shutil.copy(ROOT / "results" / "ablation_cpu.json", ws / "results.json")
    (ws / "bad.json").write_text("{")
    # A download cut short, a folder without tokenizer files, an ablation checkpoint cut short.
    shutil.copytree(tiny_llama, ws / "truncst")
    data = (tiny_llama / "model.safetensors").read_bytes()
    (ws / "truncst" / "model.safetensors").write_bytes(data[: len(data) // 2])
    (ws / "notok").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, ws / "notok" / name)
    _fake_ablation_run(ws / "abl", weights=data[: len(data) // 2])
    os.mkfifo(ws / "fifo")  # a --text that would block whoever opens it
    (ws / "dangling").symlink_to(ws / "nowhere")
    (ws / "ro").mkdir()
    read_only = make_read_only(ws / "ro")
    yield ws, read_only
    undo_read_only(ws / "ro")


def _fake_ablation_run(run: Path, weights: bytes | None = None) -> Path:
    """A run folder of the smoke preset with one checkpoint, ``rope`` seed 0: real weights
    of a freshly built model, or the bytes ``weights`` (a file cut short)."""
    from anomaly.ablation.config import PRESETS
    from anomaly.ablation.train import TrainState, build_model, save_checkpoint
    from anomaly.io import write_json

    config = PRESETS["smoke"]
    run.mkdir(parents=True)
    write_json(run / "config.json", config.to_dict(), digits=None)
    ckpt = run / "rope" / "seed0" / "checkpoint"
    save_checkpoint(ckpt, build_model(config, "rope", 0), None, TrainState(step=config.train.steps))
    if weights is not None:
        (ckpt / "model.safetensors").write_bytes(weights)
    # The trimmed vocabulary: SmolLM2's first ids (the probe only needs some real text ids).
    write_json(run / "results.json", {"vocab_hf_ids": [-1, -1, *range(config.model.vocab_size - 2)]})
    return run


NO_GPU = "no CUDA GPU"
READ_ONLY = "read-only"
SLOW = "slow"

# (command, argv, words the one-line message must contain, needs): argv paths are relative
# to the watched folder, which is the working directory while a row runs.
BAD_INPUTS: list[tuple[str, list[str], list[str], str]] = [
    # probe: models
    ("probe", ["--model", "trunc.gguf"], ["cannot read", "trunc.gguf", "GGUF"], ""),
    ("probe", ["--model", "empty.gguf"], ["empty.gguf", "GGUF"], ""),
    ("probe", ["--model", "missing.gguf"], ["missing.gguf", "not found"], ""),
    ("probe", ["--model", "./no-such-folder"], ["no-such-folder", "not found"], ""),
    ("probe", ["--model", "models/nested/missing"], ["models/nested/missing", "not found"], ""),
    ("probe", ["--model", "no-such-model"], ["unknown model", "no-such-model"], ""),
    ("probe", ["--model", "gpt2"], ["gpt2", "RoPE"], ""),
    ("probe", ["--model", "textdir"], ["textdir"], ""),
    ("probe", ["--model", "truncst"], ["cannot read", "truncst/model.safetensors", "truncated"], ""),
    ("probe", ["--model", "notok"], ["notok", "no tokenizer files", "tokenizer.json"], ""),
    ("probe", ["--model", "abl/rope/seed0"], ["cannot read", "checkpoint/model.safetensors", "truncated"], ""),
    ("probe", ["--model", "abl/rope/seed0/checkpoint"], ["checkpoint/model.safetensors", "truncated"], ""),
    # probe: numbers
    ("probe", ["--model", "llama", "--train-length", "-1"], ["--train-length", "-1"], ""),
    ("probe", ["--model", "llama", "--tokens", "1"], ["--tokens", "at least 2"], ""),
    ("probe", ["--model", "llama", "--tokens", "100000000"], ["--tokens 100000000", "512 positions"], ""),
    ("probe", ["--model", "llama", "--tokens", "64", "--text", "short.txt"], ["--tokens 64", "text"], ""),
    ("probe", ["--model", "llama", "--bins", "1"], ["--bins"], ""),
    ("probe", ["--model", "llama", "--bins", "100000000"], ["--bins 100000000", "memory", "fewer --bins"], ""),
    ("probe", ["--model", "llama", "--bins", str(10**30)], ["--bins", "memory"], ""),
    ("probe", ["--model", "llama", "--tokens", str(10**30)], ["--tokens", "512 positions"], ""),
    ("probe", ["--model", "llama", "--train-length", str(10**30)], ["--train-length", "at most"], ""),
    ("probe", ["--model", "llama", "--tokens", "1e400"], ["--tokens", "invalid int"], ""),
    ("probe", ["--model", "llama", "--tokens", "many"], ["--tokens", "invalid int"], ""),
    ("probe", ["--model", "llama", "--dtype", "float8"], ["dtype", "float8"], ""),
    ("probe", ["--model", "llama", "--device", "tpu"], ["device", "tpu"], ""),
    ("probe", ["--model", "llama", "--device", "cuda"], ["cuda"], NO_GPU),
    ("probe", ["--no-such-flag"], ["unrecognized arguments", "--no-such-flag"], ""),
    # probe: texts
    ("probe", ["--model", "llama", "--text", "binary.bin"], ["binary.bin", "not UTF-8"], ""),
    ("probe", ["--model", "llama", "--text", "nul.txt"], ["nul.txt", "binary"], ""),
    ("probe", ["--model", "llama", "--text", "textdir"], ["textdir", "is a folder"], ""),
    ("probe", ["--model", "llama", "--text", "missing.txt"], ["missing.txt", "does not exist"], ""),
    ("probe", ["--model", "llama", "--text", "fifo"], ["--text fifo", "not a regular file"], ""),
    ("probe", ["--model", "llama", "--text", "/dev/zero"], ["--text /dev/zero", "not a regular file"], ""),
    # probe: outputs
    ("probe", ["--model", "llama", "--out", "."], ["--out", "current folder"], ""),
    ("probe", ["--model", "llama", "--out", ""], ["--out", "current folder"], ""),
    ("probe", ["--model", "llama", "--out", "taken.txt"], ["taken.txt", "is a file"], ""),
    ("probe", ["--model", "llama", "--out", "taken.txt/sub"], ["taken.txt", "is a file"], ""),
    ("probe", ["--model", "llama", "--out", "foreign"], ["summary.json", "already exists"], ""),
    ("probe", ["--model", "llama", "--out", "other"], ["summary.json", "written by anomaly.figures"], ""),
    ("probe", ["--model", "llama", "--out", "badmanifest"], [MANIFEST, "not a manifest"], ""),
    ("probe", ["--model", "llama", "--out", "dangling"], ["--out dangling", "symlink", "does not exist"], ""),
    ("probe", ["--model", "llama", "--out", "dangling/sub"], ["dangling", "symlink", "does not exist"], ""),
    ("probe", ["--model", "llama", "--out", "o" * 300], ["300 bytes", "longer than", "shorter name"], ""),
    ("probe", ["--model", "llama", "--out", "ro"], ["--out ro", "cannot write"], READ_ONLY),
    ("probe", ["--model", "llama", "--out", "ro/deeper/out"], ["cannot write"], READ_ONLY),
    # coca.geometry
    ("geometry", ["--model", "trunc.gguf"], ["trunc.gguf", "GGUF"], ""),
    ("geometry", ["--model", "gpt2"], ["gpt2", "RoPE"], ""),
    ("geometry", ["--model", "./missing"], ["missing", "not found"], ""),
    ("geometry", ["--model", "llama", "--pairs", "0"], ["--pairs", "at least 1"], ""),
    ("geometry", ["--model", "llama", "--positions", "0"], ["--positions", "at least 1"], ""),
    ("geometry", ["--model", "llama", "--tokens", "0"], ["--tokens", "at least 2"], ""),
    ("geometry", ["--model", "llama", "--tokens", "100000000"], ["--tokens 100000000", "512 positions"], ""),
    ("geometry", ["--model", "llama", "--distances", "0"], ["--distances"], ""),
    ("geometry", ["--model", "truncst"], ["truncst/model.safetensors", "truncated"], ""),
    ("geometry", ["--model", "llama", "--positions", "1000000000"], ["--positions 1000000000", "memory"], ""),
    ("geometry", ["--model", "llama", "--pairs", str(10**12)], ["--pairs", "memory"], ""),
    ("geometry", ["--model", "llama", "--positions", str(10**30)], ["--positions", "memory"], ""),
    ("geometry", ["--model", "llama", "--json", "j" * 300 + ".json"], ["longer than"], ""),
    ("geometry", ["--model", "llama", "--json", "dangling/g.json"], ["dangling", "symlink"], ""),
    ("geometry", ["--model", "llama", "--json", "textdir"], ["--json textdir", "is a folder"], ""),
    ("geometry", ["--model", "llama", "--json", "taken.txt"], ["taken.txt", "already exists"], ""),
    ("geometry", ["--model", "llama", "--json", ""], ["--json", "not a file name"], ""),
    ("geometry", ["--model", "llama", "--json", "ro/g.json"], ["ro", "cannot write"], READ_ONLY),
    # figures
    ("figures", ["--out", "taken.txt"], ["taken.txt", "is a file"], ""),
    ("figures", ["--out", "userfigs"], ["fig3_cases.png", "already exists"], ""),
    ("figures", ["--out", "."], ["current folder"], ""),
    ("figures", ["--only", "fig9"], ["invalid choice", "fig9"], ""),
    ("figures", ["--out", "ro"], ["--out ro", "cannot write"], READ_ONLY),
    # ablation
    ("ablation", ["--preset", "smoke", "--out", "taken.txt"], ["taken.txt", "is a file"], ""),
    ("ablation", ["--preset", "smoke", "--out", "userrun"], ["config.json", "already exists"], ""),
    ("ablation", ["--preset", "nope", "--out", "run"], ["unknown preset", "nope"], ""),
    ("ablation", ["--preset", "smoke", "--steps", "0", "--out", "run"], ["--steps"], ""),
    ("ablation", ["--preset", "smoke", "--variants", "alibi", "--out", "run"], ["unknown variant", "alibi"], ""),
    ("ablation", ["--preset", "smoke", "--max-minutes", "0", "--out", "run"], ["--max-minutes"], ""),
    ("ablation", ["--preset", "smoke", "--max-minutes", "nan", "--out", "run"], ["--max-minutes", "not a finite"], ""),
    ("ablation", ["--preset", "smoke", "--max-minutes", "1e400", "--out", "run"], ["--max-minutes", "finite"], ""),
    ("ablation", ["--preset", "smoke", "--set", "model.head_dim=7", "--out", "run"], ["model.head_dim=7", "even"], ""),
    ("ablation", ["--preset", "smoke", "--set", "train.lr=nan", "--out", "run"], ["train.lr=nan", "finite"], ""),
    ("ablation", ["--preset", "smoke", "--set", "train.lr=1e400", "--out", "run"], ["train.lr=inf", "finite"], ""),
    ("ablation", ["--preset", "smoke", "--set", "model.rope_theta=-1", "--out", "run"], ["model.rope_theta", "above 1"], ""),
    ("ablation", ["--preset", "smoke", "--set", "data.passkey_share=2", "--out", "run"], ["data.passkey_share", "[0, 1]"], ""),
    ("ablation", ["--preset", "smoke", "--set", "eval.scalings=ntk-2", "--out", "run"], ["eval.scalings", "none"], ""),
    ("ablation", ["--preset", "smoke", "--set", "data.train_length=8", "--out", "run"], ["data.train_length=8"], ""),
    ("ablation", ["--preset", "smoke", "--set", "model.vocab_size=100000000000", "--out", "run"],
     ["memory", "model.vocab_size"], ""),
    ("ablation", ["--preset", "smoke", "--steps", str(10**14), "--out", "run"], ["memory", "--steps"], ""),
    ("ablation", ["--preset", "smoke", "--seeds", str(10**11), "--out", "run"], ["--seeds", "1000"], ""),
    ("ablation", ["--preset", "smoke", "--out", "dangling"], ["--out dangling", "symlink"], ""),
    ("ablation", ["--preset", "smoke", "--device", "cuda", "--out", "run"], ["cuda"], NO_GPU),
    ("ablation", ["--preset", "gpu", "--out", "run"], ["--preset gpu", "hours", "--device cpu"], NO_GPU),
    ("ablation", ["--preset", "smoke"], ["--out", "required"], ""),
    ("ablation", ["--preset", "smoke", "--out", "ro"], ["--out ro", "cannot write"], READ_ONLY),
    # ablation.plots
    ("plots", ["results.json", "--out", "taken.txt"], ["taken.txt", "is a file"], ""),
    ("plots", ["results.json", "--out", "userabl"], ["ablation_ppl.pdf", "already exists"], ""),
    ("plots", ["results.json", "--out", "figs", "--prefix", "../up"], ["--prefix"], ""),
    ("plots", ["missing.json", "--out", "figs"], ["no results file", "missing.json"], ""),
    ("plots", ["bad.json", "--out", "figs"], ["bad.json", "not valid JSON"], ""),
    ("plots", ["results.json", "--out", "ro"], ["--out ro", "cannot write"], READ_ONLY),
    # dev.py
    ("dev", [], ["no job"], ""),
    ("dev", ["deploy"], ["unknown job", "deploy"], ""),
]


def _row_id(row) -> str:
    cli, argv, _, _ = row
    return f"{cli}:{' '.join(argv) or '(none)'}"


def _skip_reason(needs: str, read_only: bool) -> str | None:
    if needs == NO_GPU and torch.cuda.is_available():
        return "a CUDA GPU is visible"
    if needs == READ_ONLY and not read_only:
        return "this system cannot make a folder read-only for the current user"
    return None


def assert_refused(rc: int, err: str, words: list[str]) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])


def test_table_is_large_and_covers_every_command():
    assert len(BAD_INPUTS) >= 40
    assert {row[0] for row in BAD_INPUTS} == set(CLIS)
    assert len({(r[0], tuple(r[1])) for r in BAD_INPUTS}) == len(BAD_INPUTS)
    chosen = {(r[0], tuple(r[1])) for r in BAD_INPUTS} & {(c, tuple(a)) for c, a in SUBPROCESS_ROWS}
    assert len(chosen) == len(SUBPROCESS_ROWS) and {c for c, _ in chosen} == set(CLIS)


@pytest.mark.parametrize("row", BAD_INPUTS, ids=_row_id)
def test_bad_input(row, workspace, monkeypatch, capsys):
    cli, argv, words, needs = row
    ws, read_only = workspace
    reason = _skip_reason(needs, read_only)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(ws)  # default outputs (runs/...) would land in the watched folder
    before = snapshot(ws)
    rc = CLIS[cli](argv)
    assert_refused(rc, capsys.readouterr().err, words)
    assert snapshot(ws) == before, "a refused command must not create or change any file"


# One row per command again through the real `python -m` (or `python3 dev.py`) path.
SUBPROCESS_ROWS = [
    ("probe", ["--model", "trunc.gguf"]),
    ("geometry", ["--model", "llama", "--pairs", "0"]),
    ("figures", ["--out", "taken.txt"]),
    ("ablation", ["--preset", "smoke", "--out", "taken.txt"]),
    ("plots", ["bad.json", "--out", "figs"]),
    ("dev", ["deploy"]),
]


@pytest.mark.parametrize("row", [r for r in BAD_INPUTS if (r[0], r[1]) in SUBPROCESS_ROWS], ids=_row_id)
def test_bad_input_in_a_fresh_interpreter(row, workspace):
    cli, argv, words, _ = row
    ws, _ = workspace
    head = [sys.executable, str(ROOT / "dev.py")] if cli == "dev" else [sys.executable, "-m", MODULES[cli]]
    before = snapshot(ws)
    proc = subprocess.run(head + argv, capture_output=True, text=True, timeout=120, cwd=ws,
                          env={**ENV, "PYTHONPATH": str(ROOT)})
    assert_refused(proc.returncode, proc.stderr, words)
    assert proc.stdout == ""
    assert snapshot(ws) == before


# ------------------------------------------------ failures while writing the final files


def _replace_failing(monkeypatch, fail_on: Callable[[str, str], bool], err: int = 28):
    """``os.replace`` that raises ``OSError(err)`` (28: ENOSPC) for the moves ``fail_on``
    picks, and works for every other."""
    real = os.replace

    def replace(src, dst, *a, **k):
        if fail_on(str(src), str(dst)):
            raise OSError(err, os.strerror(err), str(dst))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


def _previous_run(folder: Path) -> dict:
    """Two files of ``cmd`` in ``folder`` (with a user's note): the 'previous outputs'."""
    (folder / "notes.txt").write_text("mine")
    target = claim(folder, "cmd", ["a.txt", "b.txt"], replace_own=True)
    with target.writing() as tmp:
        (tmp / "a.txt").write_text("old a")
        (tmp / "b.txt").write_text("old b")
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def _contents(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("fail_at", ["a.txt", "b.txt", "c.txt", MANIFEST])
def test_a_failed_final_move_leaves_the_previous_files_complete(fail_at, tmp_path, monkeypatch):
    """Disk full (or a file that cannot be replaced) in the middle of the final move: the
    files moved in so far go back, the previous ones return, the manifest is the old one,
    and the error is one line naming the path and the reason."""
    before = _previous_run(tmp_path)
    target = claim(tmp_path, "cmd", ["a.txt", "b.txt", "c.txt"], replace_own=True)  # c.txt: a new name
    # The new file's move (or the manifest's) fails; moving the previous files aside and back works.
    _replace_failing(monkeypatch, lambda src, dst: Path(dst).name == fail_at and Path(dst).parent == tmp_path
                     and ".anomaly-previous" not in src)
    with pytest.raises(UserError) as info:
        with target.writing() as tmp:
            for name in ("a.txt", "b.txt", "c.txt"):
                (tmp / name).write_text(f"new {name}")
    message = str(info.value)
    assert "No space left on device" in message and "previous files there are unchanged" in message, message
    assert fail_at in message and len(message.splitlines()) == 1
    monkeypatch.undo()
    assert _contents(tmp_path) == before, "the previous outputs must be complete and unmixed"


def test_previous_files_that_cannot_be_put_back_are_kept_and_named(tmp_path, monkeypatch):
    """If even the way back fails, the previous files are never deleted: the message says
    where they are."""
    _previous_run(tmp_path)
    target = claim(tmp_path, "cmd", ["a.txt", "b.txt"])
    _replace_failing(monkeypatch, lambda src, dst: Path(dst).name == "b.txt" and Path(dst).parent == tmp_path)
    with pytest.raises(UserError) as info:
        with target.writing() as tmp:
            (tmp / "a.txt").write_text("new a")
            (tmp / "b.txt").write_text("new b")
    monkeypatch.undo()
    kept = str(info.value).rpartition(" kept in ")[2]
    assert "could not be put back" in str(info.value) and (Path(kept) / "b.txt").read_text() == "old b"
    assert (tmp_path / "a.txt").read_text() == "old a"


def test_a_stale_own_file_is_restored_when_the_manifest_cannot_be_written(tmp_path, monkeypatch):
    """replace_own sets the previous run's extra files aside; a failure puts them back too."""
    before = _previous_run(tmp_path)
    target = claim(tmp_path, "cmd", ["a.txt"], replace_own=True)  # b.txt is stale this time
    _replace_failing(monkeypatch, lambda src, dst: Path(dst).name == MANIFEST)
    with pytest.raises(UserError, match="cannot write"):
        with target.writing() as tmp:
            (tmp / "a.txt").write_text("new a")
    monkeypatch.undo()
    assert _contents(tmp_path) == before


def test_a_full_disk_while_staging_is_one_line_and_changes_nothing(tmp_path):
    before = _previous_run(tmp_path)
    target = claim(tmp_path, "cmd", ["a.txt", "b.txt"])
    with pytest.raises(UserError, match=r"cannot write .*a.txt \(No space left on device\)"):
        with target.writing() as tmp:
            raise OSError(28, os.strerror(28), str(tmp / "a.txt"))
    assert _contents(tmp_path) == before


def test_a_new_folder_that_cannot_be_moved_into_place_is_not_created(tmp_path, monkeypatch):
    out = tmp_path / "new"
    target = claim(out, "cmd", ["a.txt"])
    _replace_failing(monkeypatch, lambda src, dst: dst == str(out), err=13)
    with pytest.raises(UserError, match="Permission denied"):
        with target.writing() as tmp:
            (tmp / "a.txt").write_text("a")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_figures_rerun_on_a_full_disk_keeps_the_previous_figures(tmp_path, monkeypatch, capsys):
    """A whole command: the rerun fails at the final move with one line, exit 2, and the
    folder is byte for byte what the first run left."""
    out = _with_notes(tmp_path / "figs")
    argv = ["--out", str(out), "--only", "decay_bounds"]
    assert CLIS["figures"](argv) == 0
    before = snapshot(out)
    capsys.readouterr()
    _replace_failing(monkeypatch, lambda src, dst: ".anomaly-staging-" in src and dst.endswith(".png"))
    # The re-rendered PNG is the same picture; count it as changed, so that it is really moved.
    import anomaly.outputs as outputs_module

    monkeypatch.setattr(outputs_module, "same_result", lambda old, new: False)
    rc = CLIS["figures"](argv)
    assert_refused(rc, capsys.readouterr().err, ["--out", "decay_bounds.png", "No space left on device"])
    monkeypatch.undo()
    assert snapshot(out) == before


def test_run_main_turns_a_full_disk_anywhere_into_one_line(capsys):
    def main(argv):
        raise OSError(28, os.strerror(28), "/some/run/checkpoint")

    assert run_main(main, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot write /some/run/checkpoint (No space left")


def test_run_main_lets_other_os_errors_through():
    """Only write failures the user can fix are one line; anything else is a bug to see."""
    def main(argv):
        raise OSError(5 + 1000, "strange")

    with pytest.raises(OSError):
        run_main(main, [])


@pytest.mark.parametrize("name", ["x" * 256, "ok/" + "y" * 300])
def test_over_long_names_are_refused_by_claim(name, tmp_path):
    with pytest.raises(UserError, match="longer than the 255"):
        claim(tmp_path / name, "cmd", ["a.txt"])
    with pytest.raises(UserError, match="longer than"):
        claim(tmp_path, "cmd", ["z" * 300])
    with pytest.raises(UserError, match="longer than"):
        claim_file(tmp_path / ("r" * 300 + ".json"), "cmd", flag="--json")
    assert list(tmp_path.iterdir()) == []


def test_a_dangling_symlink_is_refused_by_claim(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "gone")
    for path in (tmp_path / "link", tmp_path / "link" / "deeper"):
        with pytest.raises(UserError, match=r"link is a symlink to .*gone, which does not exist"):
            claim(path, "cmd", ["a.txt"])
    with pytest.raises(UserError, match="symlink"):
        claim_file(tmp_path / "link" / "r.json", "cmd", flag="--json")
    assert not (tmp_path / "gone").exists()


# ------------------------------------------------------------------ pipes, hub, launcher


def test_a_closed_pipe_on_stdout_is_quiet_with_status_141(tmp_path):
    """``python -m anomaly.figures … | head -0``: no BrokenPipeError traceback, no
    "Exception ignored" at exit, status 141; the files are written all the same."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes a byte
    try:
        proc = subprocess.run([sys.executable, "-m", "anomaly.figures", "--out", str(tmp_path / "f"),
                               "--only", "decay_bounds"], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=300, cwd=ROOT, env=ENV)
    finally:
        os.close(write)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""
    assert (tmp_path / "f" / "decay_bounds.png").is_file()


def test_an_unreachable_hub_switches_to_offline_within_seconds(monkeypatch):
    """Without network the first hub call would retry for ~30 s; a 2-second check makes the
    process offline first, so the one-line error comes at once."""
    import time

    from huggingface_hub import constants

    from anomaly import models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_checked", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)

    def hang(*args, **kwargs):  # a DNS lookup or connect that does not answer in time
        time.sleep(models.HUB_CHECK_SECONDS + 3)
        raise OSError("timed out")

    monkeypatch.setattr(models.socket, "create_connection", hang)
    start = time.monotonic()
    assert models._source("llama-7b") == "huggyllama/llama-7b"
    assert time.monotonic() - start < models.HUB_CHECK_SECONDS + 1.5
    assert constants.HF_HUB_OFFLINE is True and os.environ["HF_HUB_OFFLINE"] == "1"


def test_a_reachable_hub_stays_online(monkeypatch):
    from huggingface_hub import constants

    from anomaly import models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(models, "_hub_checked", False)
    monkeypatch.setattr(models.socket, "create_connection", lambda *a, **k: type("S", (), {"close": lambda s: None})())
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    models._source("owner/model")
    assert constants.HF_HUB_OFFLINE is False


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2", "not started by torchrun", "unset WORLD_SIZE"]),
    ({"WORLD_SIZE": "2", "RANK": "1"}, ["WORLD_SIZE=2", "not started by torchrun"]),
    ({"RANK": "1"}, ["RANK=1", "WORLD_SIZE is not"]),
    ({"LOCAL_RANK": "3"}, ["LOCAL_RANK=3", "WORLD_SIZE is not"]),
    ({"WORLD_SIZE": "two"}, ["WORLD_SIZE='two'", "not a whole number"]),
    ({"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, ["RANK=5", "do not fit"]),
    ({"WORLD_SIZE": "0"}, ["WORLD_SIZE=0", "do not fit"]),
])
def test_leftover_launcher_variables_are_one_line(env, words, tmp_path, monkeypatch, capsys):
    """torchrun's variables left in the shell, without torchrun: one line before anything
    is written, not a wait for processes that never come."""
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    rc = CLIS["ablation"](["--preset", "smoke", "--out", str(out)])
    assert_refused(rc, capsys.readouterr().err, words)
    assert not out.exists()


def test_a_world_of_one_ignores_a_zero_rank(monkeypatch):
    from anomaly.ablation.distributed import World, world_from_env

    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert world_from_env() == World()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert world_from_env() == World()


# -------------------------------------------------------------- the ablation's run folder


def _stub_run(monkeypatch, seen: list):
    """Replace the ablation's work by a record of the lock file at the time it would run."""
    import anomaly.ablation.__main__ as ablation_main

    def run(config, out, **kwargs):
        seen.append((out / ablation_main.LOCK).read_text().split()[0])
        return {}

    monkeypatch.setattr(ablation_main, "run", run)
    return ablation_main


def test_a_run_folder_being_written_by_a_live_process_is_refused(tmp_path, monkeypatch, capsys):
    ablation_main = _stub_run(monkeypatch, seen := [])
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from anomaly.ablation.lock import LockOwner, _start_time

        (out / ablation_main.LOCK).write_text(LockOwner(holder.pid, _start_time(holder.pid)).text())
        before = snapshot(out)
        rc = CLIS["ablation"](["--preset", "smoke", "--out", str(out)])
        assert_refused(rc, capsys.readouterr().err, [f"--out {out} is being written by process {holder.pid}"])
        assert snapshot(out) == before and seen == []
    finally:
        holder.kill()
        holder.wait()



def test_shared_runs_take_no_run_lock_but_refuse_a_plain_writer(tmp_path, monkeypatch, capsys):
    ablation_main = _stub_run(monkeypatch, seen := [])
    out = tmp_path / "run"
    out.mkdir()
    monkeypatch.setattr(ablation_main, "run", lambda config, out, **kw: seen.append(out) or {})
    assert CLIS["ablation"](["--preset", "smoke", "--shared", "--out", str(out)]) == 0
    assert seen == [out] and not (out / ablation_main.LOCK).exists()  # models are locked one by one
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from anomaly.ablation.lock import LockOwner, _start_time

        (out / ablation_main.LOCK).write_text(LockOwner(holder.pid, _start_time(holder.pid)).text())
        rc = CLIS["ablation"](["--preset", "smoke", "--shared", "--out", str(out)])
        assert_refused(rc, capsys.readouterr().err,
                       [f"--out {out} is being written by process {holder.pid} without --shared"])
        assert seen == [out]
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path, monkeypatch):
    ablation_main = _stub_run(monkeypatch, seen := [])
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is gone: a run killed with kill -9 left this lock behind
    (out / ablation_main.LOCK).write_text(f"{dead.pid} -\n")
    assert CLIS["ablation"](["--preset", "smoke", "--out", str(out)]) == 0
    assert seen == [str(os.getpid())]  # the work ran under our lock
    assert not (out / ablation_main.LOCK).exists()


def test_every_ablation_setting_has_a_range_check():
    from anomaly.ablation import config as cfg

    for preset in cfg.PRESETS.values():
        assert cfg.validate(preset) is preset
        assert set(cfg.config_fields(preset)) == set(cfg._FIELD_CHECKS)


@pytest.mark.parametrize("assignment, words", [
    ("model.head_dim=7", ["even"]), ("model.head_dim=0", ["even"]), ("model.num_heads=0", ["at least 1"]),
    ("model.rope_theta=nan", ["finite"]), ("model.rope_theta=inf", ["finite"]), ("model.coca_init_gain=0", ["above 0"]),
    ("model.vocab_size=10", ["at least 64"]), ("data.train_length=47", ["at least 48"]),
    ("data.held_out_fraction=0", ["strictly between"]), ("data.code_share=-0.1", ["[0, 1]"]),
    ("train.lr=-1", ["above 0"]), ("train.lr=nan", ["finite"]), ("train.min_lr_ratio=1.5", ["[0, 1]"]),
    ("train.weight_decay=-1", ["at least 0"]), ("train.grad_clip=0", ["above 0"]), ("train.criterion=nan", ["[0, 1]"]),
    ("train.warmup_steps=-1", ["at least 0"]), ("train.checkpoint_every=0", ["at least 1"]),
    ("eval.length_multipliers=0,1", ["at least 1"]), ("eval.depths=0,1.5", ["[0, 1]"]),
    ("eval.scalings=none,ntk-3", ["distinct names"]), ("eval.stride=1", ["at least 2"]),
    ("eval.stride=1000", ["exceeds the shortest evaluation length"]),
    ("eval.probe_tokens=100000", ["exceeds the longest evaluation length"]),
    ("eval.batch_tokens=0", ["at least 1"]), ("seeds=0,0", ["distinct"]), ("seeds=-1", ["at least 0"]),
    ("data_seed=-1", ["at least 0"]), ("cpu_threads=0", ["at least 1"]),
    (f"eval_seed={2**64}", ["at least 0"]),
])
def test_a_bad_setting_is_refused_naming_it(assignment, words):
    from anomaly.ablation.config import PRESETS, override, validate

    with pytest.raises(UserError) as info:
        validate(override(PRESETS["smoke"], assignment))
    message = str(info.value)
    assert message.startswith(assignment.split("=")[0]) or "eval." in message, message
    for w in words:
        assert w in message, (w, message)


def test_the_committed_diagnostics_settings_stay_valid():
    """hidden_size need not be heads × head_dim: the committed head-64 diagnostic ran with
    hidden 128, 4 heads of 64 (results/ablation_cpu_slack_head64.json)."""
    from anomaly.ablation.config import PRESETS, override, validate

    config = PRESETS["cpu"]
    for a in ("model.head_dim=64", "eval.scalings=none", "model.coca_init_gain=2.0", "train.lr=3e-3"):
        config = override(config, a)
    validate(config)


# ------------------------------------------------------- the probe on an ablation checkpoint


def test_the_probe_default_tokens_follow_an_ablation_checkpoint(tmp_path, capsys):
    """Without --tokens the probe reads as many tokens as the checkpoint was trained on
    (smoke: 64), not the default 2048 it would refuse; an explicit larger value is still
    refused in one line."""
    run = _fake_ablation_run(tmp_path / "abl")
    out = tmp_path / "probe"
    argv = ["--model", str(run / "rope" / "seed0"), "--out", str(out), "--no-figures", "--quiet", "--device", "cpu"]
    assert CLIS["probe"](argv) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["tokens"] == 64
    capsys.readouterr()
    assert_refused(CLIS["probe"](argv + ["--tokens", "65"]), capsys.readouterr().err,
                   ["--tokens 65", "64 positions", "--tokens 64"])


# ----------------------------------------------------------------------- benchmark arguments


@pytest.mark.parametrize("argv, words", [
    (["--lengths", "0"], ["--lengths", "'0' must be at least 1"]),
    (["--lengths", "1024", "-5"], ["--lengths", "'-5' must be at least 1"]),
    (["--lengths", str(10**12)], ["--lengths", "memory"]),
    (["--base", "nan"], ["--base", "finite"]),
    (["--head-dim", "7"], ["--head-dim", "even"]),
    (["--heads", "6", "--kv-heads", "4"], ["multiple of --kv-heads"]),
])
def test_coca_speed_refuses_bad_sizes_in_one_line(argv, words, capsys):
    from benchmarks import coca_speed

    assert_refused(run_main(coca_speed.main, argv), capsys.readouterr().err, words)


def test_probe_speed_refuses_a_model_larger_than_memory(capsys):
    from anomaly.cli import machine_memory
    from benchmarks import probe_speed

    layers = machine_memory() // (202_383_360 * 4) + 1
    rc = run_main(probe_speed.main, ["--random-llama-7b", "--layers", str(layers)])
    assert_refused(rc, capsys.readouterr().err, ["--layers", "memory"])


def test_a_folder_in_place_of_an_own_file_is_left_alone(tmp_path):
    """The manifest gives ``b.txt`` to the command, but the user has put a folder there:
    the rerun stops in one line and removes nothing."""
    _previous_run(tmp_path)
    (tmp_path / "b.txt").unlink()
    (tmp_path / "b.txt").mkdir()
    (tmp_path / "b.txt" / "inside").write_text("the user's")
    before = snapshot(tmp_path)
    target = claim(tmp_path, "cmd", ["a.txt", "b.txt"])
    with pytest.raises(UserError, match=r"cannot write .*b.txt \(Is a directory\)"):
        with target.writing() as tmp:
            (tmp / "a.txt").write_text("new a")
            (tmp / "b.txt").write_text("new b")
    assert snapshot(tmp_path) == before


def test_a_failed_directory_swap_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """anomaly.io.atomic_dir (checkpoints): if the new directory cannot be moved in, the
    previous one is back under its name, complete."""
    from anomaly.io import atomic_dir

    ckpt = tmp_path / "checkpoint"
    with atomic_dir(ckpt) as tmp:
        (tmp / "state.json").write_text("old")
    _replace_failing(monkeypatch, lambda src, dst: src.endswith(".partial") and dst == str(ckpt))
    with pytest.raises(OSError):
        with atomic_dir(ckpt) as tmp:
            (tmp / "state.json").write_text("new")
    monkeypatch.undo()
    assert (ckpt / "state.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_probe_bins_on_a_gpu_are_checked_against_its_memory(monkeypatch):
    """The blocked statistics on a GPU hold ``[heads·slices, bins+1, bins+1]`` tables for
    all groups at once: checked against the GPU's memory (here a pretended 80 GiB one)."""
    from types import SimpleNamespace

    from anomaly.probe.cli import _check_stats_memory

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=80 * 2**30))
    config = SimpleNamespace(num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_size=4096,
                             num_hidden_layers=32)
    cuda = torch.device("cuda")
    _check_stats_memory(config, 2048, 64, cuda)  # the default: a few MiB
    # 32 heads × 64 slices × 1025² × 12 bytes ≈ 24 GiB: fits; 2048 bins ≈ 96 GiB: does not.
    _check_stats_memory(config, 2048, 1024, cuda)
    with pytest.raises(UserError, match=r"--bins 2048: .* GiB per layer on the GPU, more than its 80 GiB"):
        _check_stats_memory(config, 2048, 2048, cuda)
