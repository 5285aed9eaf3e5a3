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


@pytest.mark.parametrize("levels, kept", [(1, True), (2, True), (12, False)])
def test_a_rerendered_png_within_two_levels_keeps_the_existing_bytes(tmp_path, levels, kept):
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
    (ws / "ro").mkdir()
    read_only = make_read_only(ws / "ro")
    yield ws, read_only
    undo_read_only(ws / "ro")


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
    # probe: numbers
    ("probe", ["--model", "llama", "--train-length", "-1"], ["--train-length", "-1"], ""),
    ("probe", ["--model", "llama", "--tokens", "1"], ["--tokens", "at least 2"], ""),
    ("probe", ["--model", "llama", "--tokens", "100000000"], ["--tokens 100000000", "512 positions"], ""),
    ("probe", ["--model", "llama", "--tokens", "64", "--text", "short.txt"], ["--tokens 64", "text"], ""),
    ("probe", ["--model", "llama", "--bins", "1"], ["--bins"], ""),
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
    # probe: outputs
    ("probe", ["--model", "llama", "--out", "."], ["--out", "current folder"], ""),
    ("probe", ["--model", "llama", "--out", ""], ["--out", "current folder"], ""),
    ("probe", ["--model", "llama", "--out", "taken.txt"], ["taken.txt", "is a file"], ""),
    ("probe", ["--model", "llama", "--out", "taken.txt/sub"], ["taken.txt", "is a file"], ""),
    ("probe", ["--model", "llama", "--out", "foreign"], ["summary.json", "already exists"], ""),
    ("probe", ["--model", "llama", "--out", "other"], ["summary.json", "written by anomaly.figures"], ""),
    ("probe", ["--model", "llama", "--out", "badmanifest"], [MANIFEST, "not a manifest"], ""),
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
