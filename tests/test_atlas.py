"""python -m anomaly.probe.atlas: its readings against a hand computation, the comparison
over texts against :mod:`anomaly.replication`, the command end to end on tiny random RoPE
models (with a character-level tokenizer, on the bundled corpora), its refusals, and
resuming from the saved cells."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from anomaly import replication
from anomaly.verdicts import direction
from anomaly.analytic import CHANCE_FRACTION
from anomaly.corpus import Document
from anomaly.errors import UserError
from anomaly.io import write_json
from anomaly.outputs import MANIFEST
from anomaly.probe.atlas.cells import CELLS, CellKey, CellStore
from anomaly.probe.atlas.readings import GroupReadings, Readings, readings
from anomaly.probe.atlas.tables import ALL, Cell, SliceSplit, compare, load_cells, markdown
from anomaly.probe.atlas.texts import Text

# --------------------------------------------------------------------------------------
# readings() against a hand computation
# --------------------------------------------------------------------------------------


def _gemma_model():
    """A tiny random Gemma 3: two sliding layers (base 1e4, window 16) and one global layer
    (base 1e6), trained length 512."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=16, rope_theta=1e6, rope_local_base_freq=1e4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=512,
        attn_implementation="eager")
    return Gemma3ForCausalLM(config).eval()


def _probe(model, ids):
    from anomaly.probe.core import probe

    with torch.no_grad():
        return probe(model, ids)


@pytest.fixture(scope="module")
def gemma_result():
    """:func:`_gemma_model` probed on 40 tokens, so the groups differ in base, window and fast slices."""
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1))
    return _probe(_gemma_model(), ids)


def _hand_band(result, rows: list[int], slices: list[int]) -> tuple[float, float]:
    """Mean over the (layer, head) of ``rows`` of the case-(d) share among ``slices``,
    unweighted (pairs per slice are equal) and weighted by Σ|q||k|, by loops."""
    share, weighted = [], []
    for l in rows:
        for h in range(result.heads):
            share.append(sum(result.fraction_slice[l, h, j] for j in slices) / len(slices))
            weighted.append(sum(result.weight_d[l, h, j] for j in slices)
                            / sum(result.weight_all[l, h, j] for j in slices))
    return float(np.mean(share)), float(np.mean(weighted))


def test_readings_match_a_hand_computation(gemma_result):
    r, got = gemma_result, readings(gemma_result)
    every = range(r.rotary_dim // 2)
    share, weighted = _hand_band(r, list(range(r.layers)), list(every))
    assert got.tokens == 40 and got.layers == [0, 1, 2]
    assert got.share == pytest.approx(share, rel=1e-6) and got.weighted == pytest.approx(weighted, rel=1e-5)
    for l in range(r.layers):
        ls, lw = _hand_band(r, [l], list(every))
        assert got.layer_share[l] == pytest.approx(ls, rel=1e-6)
        assert got.layer_weighted[l] == pytest.approx(lw, rel=1e-5)
    # The groups by rotary base, read off the table as base = (θ_0/θ_1)^(d/2).
    bases = [round(math.log10((r.inv_freq[l, 0] / r.inv_freq[l, 1]) ** (r.rotary_dim / 2))) for l in range(3)]
    assert bases == [4, 4, 6] and [g.label for g in got.groups] == ["base 1e4", "base 1e6"]
    # Fast slices turn at least once over the distances the layer scores in training: the
    # window (16) for the sliding layers, the training length (512) for the global one.
    for g, rows, window, span in zip(got.groups, ([0, 1], [2]), (16, None), (16, 512)):
        assert g.layers == rows and g.window == window and g.span == span
        fast = [j for j in every if r.inv_freq[rows[0], j] * span / (2 * math.pi) >= 1]
        slow = [j for j in every if r.inv_freq[rows[0], j] * span / (2 * math.pi) < 1]
        assert fast and slow and g.fast_slices == len(fast)
        for (s, w), (hs, hw) in (((g.share, g.weighted), _hand_band(r, rows, list(every))),
                                 ((g.fast_share, g.fast_weighted), _hand_band(r, rows, fast)),
                                 ((g.slow_share, g.slow_weighted), _hand_band(r, rows, slow))):
            assert s == pytest.approx(hs, rel=1e-6) and w == pytest.approx(hw, rel=1e-5)
        # Θ̄ in case (d): (π, 2π), from the mean angles themselves (not from τ > 0).
        in_d = [(l, h, j) for l in rows for h in range(r.heads) for j in every if math.pi < r.mean_angle[l, h, j]]
        assert g.mean_angle_d == pytest.approx(len(in_d) / (len(rows) * r.heads * len(every)))
        assert g.median_tau == pytest.approx(float(np.median([r.tau[i] for i in in_d])), rel=1e-6)


def test_a_sliding_layer_splits_by_its_window_even_where_it_does_not_limit_the_sequence(gemma_result):
    """Probed on fewer tokens than its window, a sliding layer's pairs are all scored (no
    ``sliding_window``), but it was still trained on keys at most W back: the split is the same."""
    r = gemma_result
    assert r.configured_window == [16, 16, None] and r.sliding_window == [16, 16, None]
    assert [r.scored_span(l) for l in range(3)] == [16, 16, 512]
    short_result = _probe(_gemma_model(), torch.from_numpy(r.input_ids[:12]))
    assert short_result.sliding_window == [None, None, None] and short_result.configured_window == [16, 16, None]
    long, short = readings(r).groups, readings(short_result).groups
    assert [g.fast_slices for g in short] == [g.fast_slices for g in long] and short[0].window is None


def _json_round_trip(obj: Readings, tmp_path: Path) -> Readings:
    write_json(tmp_path / "r.json", obj.to_json(), digits=None)
    return Readings.from_json(json.loads((tmp_path / "r.json").read_text()))


def test_readings_round_trip_through_json_exactly(gemma_result, tmp_path):
    got = readings(gemma_result)
    # A band without slices and a group without τ are NaN, which JSON holds as null.
    empty = replace(got.groups[1], fast_share=math.nan, fast_weighted=math.nan, median_tau=math.nan)
    for r in (got, replace(got, groups=[got.groups[0], empty])):
        back = _json_round_trip(r, tmp_path)
        assert json.dumps(back.to_json()) == json.dumps(r.to_json())  # NaN written as NaN on both sides
        assert back.groups[0].window == 16 and back.groups[1].window is None
    assert math.isnan(back.groups[1].median_tau)


# --------------------------------------------------------------------------------------
# tables.compare() on hand-built cells
# --------------------------------------------------------------------------------------

TEXTS = [Text(Document(f"{kind}/{i}", Path("/dev/null"), kind), kind, f"{i}" * 64)
         for kind in ("prose", "code") for i in range(3)]


def _readings(tokens: int, share: float, weighted: float) -> Readings:
    group = GroupReadings("base 1e4", [0, 1], None, 4096, share, weighted, 3, share + 0.1, weighted + 0.1,
                          share - 0.1, weighted - 0.1, 0.4, 100.0 + tokens)
    return Readings(tokens, share, weighted, [share, share], [weighted, weighted], [0, 1], [group])


def _synthetic_cells() -> list[Cell]:
    """m1 near 0.3; m2 higher by 0.1 + a little per text; the longer length higher by 0.02."""
    cells = []
    for model, shift in (("m1", 0.0), ("m2", 0.1)):
        for tokens, extra in ((64, 0.0), (128, 0.02)):
            for i, text in enumerate(TEXTS):
                share = 0.3 + shift * (1 + 0.1 * i) + extra + 0.01 * i
                cells.append(Cell(model, text, _readings(tokens, share, share + 0.05)))
    return cells


def _paired(a: dict[str, float], b: dict[str, float]) -> replication.Paired:
    names = sorted(a)
    return replication.paired({i: a[n] for i, n in enumerate(names)}, {i: b[n] for i, n in enumerate(names)})


def _by_text(cells, model, tokens, reading="share", group=ALL) -> dict[str, float]:
    return {c.text.name: c.value(group, reading) for c in cells if c.model == model and c.readings.tokens == tokens}


def test_compare_pairs_models_and_lengths_by_text():
    cells = _synthetic_cells()
    atlas = compare(cells)
    # Models, paired by text at each shared length.
    assert [(c.tokens, c.reading) for c in atlas.models] == [(64, "share"), (64, "weighted"),
                                                            (128, "share"), (128, "weighted")]
    for c in atlas.models:
        a, b = _by_text(cells, "m2", c.tokens, c.reading), _by_text(cells, "m1", c.tokens, c.reading)
        assert c.what == "m2 − m1" and c.values == pytest.approx({n: a[n] - b[n] for n in a})
        test = _paired(a, b)
        assert (c.estimate, c.low, c.high, c.p, c.mde) == pytest.approx((test.estimate, test.low, test.high,
                                                                         test.p, test.mde))
        assert c.verdict == direction(test, "lower in m2", "higher in m2", "texts", digits=3).text
        assert c.verdict.startswith("higher in m2 (n = 6 texts")
    # Lengths, longest against shortest, paired by text, for every group and reading.
    lengths = [c for c in atlas.lengths if c.model == "m1" and c.reading == "median_tau" and c.group == "base 1e4"]
    assert len(lengths) == 1 and lengths[0].values == pytest.approx({t.name: 64.0 for t in TEXTS})
    for c in atlas.lengths:
        a = _by_text(cells, c.model, 128, c.reading, c.group)
        b = _by_text(cells, c.model, 64, c.reading, c.group)
        test = _paired(a, b)
        assert c.what == "128 − 64 tokens" and c.estimate == pytest.approx(test.estimate)
        assert c.verdict == direction(test, "lower at the longer length", "higher at the longer length",
                                                  "texts", digits=3).text
    # Rows against chance, by kind too; τ has no chance level.
    row = atlas.row("m1", 64, ALL, "share")
    values = _by_text(cells, "m1", 64)
    test = _paired(values, {n: CHANCE_FRACTION for n in values})
    assert row.mean == pytest.approx(np.mean(list(values.values()))) and row.p == pytest.approx(test.p)
    assert row.verdict == direction(test, "below chance", "above chance", "texts", digits=3).text
    assert len(atlas.row("m1", 64, ALL, "share", "prose").values) == 3
    assert atlas.row("m1", 64, "base 1e4", "median_tau").p is None
    assert atlas.row("m1", 64, ALL, "median_tau") is None  # the whole model has share and weighted only
    assert [p.tokens for p in atlas.profiles] == [64, 128, 64, 128]
    assert atlas.splits == [SliceSplit("m1", "base 1e4", 4096, 3), SliceSplit("m2", "base 1e4", 4096, 3)]
    # Cells of one model that split a group in two ways cannot be one atlas.
    odd = cells[0]
    changed = replace(odd.readings, groups=[replace(odd.readings.groups[0], span=512, fast_slices=2)])
    with pytest.raises(ValueError, match="different ways"):
        compare([replace(odd, readings=changed), *cells[1:]])


def test_markdown_renders_every_table():
    atlas = compare(_synthetic_cells())
    text = markdown(atlas)
    shown = ("share", "weighted", "fast_weighted", "slow_weighted", "mean_angle_d", "median_tau")
    sections = text.split("\n## ")
    assert [s.splitlines()[0] for s in sections] == [
        "## Fast and slow slices",
        "Readings over texts (mean, 95 % t-interval over texts; chance = 0.5 for shares)",
        "By text kind (weighted share)",
        "Models compared on the same texts (paired over texts)",
        "Longest against shortest length, text by text (paired over texts)"]
    expected = (sum(r.texts == "all" and r.reading in shown for r in atlas.rows),
                sum(r.texts != "all" and r.reading == "weighted" for r in atlas.rows),
                sum(c.reading in shown for c in atlas.models), sum(c.reading in shown for c in atlas.lengths))
    assert "| m1 | base 1e4 | 4096 | 3 |" in sections[0] and "| m2 | base 1e4 | 4096 | 3 |" in sections[0]
    for section, n in zip(sections[1:], expected):
        body = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
        assert n > 0 and len(body) == n + 1  # the header, then one line per row
    assert "higher in m2" in text


# --------------------------------------------------------------------------------------
# The command on tiny models
# --------------------------------------------------------------------------------------


def _tiny_folder(folder: Path, seed: int) -> Path:
    """A random 2-layer LLaMA (512 positions) with a character-level tokenizer, saved as an HF
    folder: every character of the corpora's ASCII is its own token."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = ["[UNK]", "\n", *map(chr, range(32, 127))]
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         bos_token_id=0, eos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("atlas_models")
    return [str(_tiny_folder(root / name, seed)) for seed, name in enumerate(("tiny-a", "tiny-b"))]


@pytest.fixture
def counted(monkeypatch):
    """Calls of the probe and of model loading, counted (the real ones run); the code key
    fixed for the test."""
    from anomaly import models
    from anomaly.probe.atlas import cells as cells_module
    from anomaly.probe.atlas import readings as readings_module

    calls = {"probe": 0, "load": 0}
    real_probe, real_load = readings_module.probe, models.load_model

    def probe(*a, **k):
        calls["probe"] += 1
        return real_probe(*a, **k)

    def load(*a, **k):
        calls["load"] += 1
        return real_load(*a, **k)

    monkeypatch.setattr(readings_module, "probe", probe)
    monkeypatch.setattr(models, "load_model", load)
    # The code key hashes the working tree's sources: computed once here, so an edit made
    # to them while the test runs (another job in the same checkout) cannot look like a
    # change between its runs.
    code = cells_module.code_key()
    monkeypatch.setattr(cells_module, "code_key", lambda: code)
    return calls


def _atlas(models: list[str], out: Path, *extra: str) -> int:
    """The atlas of ``models`` at 24 and 48 tokens on one text of each kind (4 probes a model)."""
    from anomaly.probe.atlas.cli import entry

    return entry(["--models", *models, "--tokens", "24", "48", "--texts", "1", "--out", str(out),
                  "--device", "cpu", "--quiet", *extra])


def _reused(printed: str) -> int:
    """The count of reused cells in the closing line."""
    last = printed.strip().splitlines()[-1]
    return int(last.split(" reused from ")[0].rsplit("(", 1)[1])


def _owned(out: Path) -> dict[str, str]:
    return json.loads((out / MANIFEST).read_text())["files"]


def test_cli_writes_the_atlas_and_resumes(tiny_models, counted, tmp_path, capsys):
    out = tmp_path / "atlas"
    assert _atlas(tiny_models, out, "--no-figures") == 0
    assert counted == {"probe": 8, "load": 2}  # 2 models × 2 texts × 2 lengths
    assert _reused(capsys.readouterr().out) == 0
    record = json.loads((out / "atlas.json").read_text())
    assert record["models"] == {m: [24, 48] for m in tiny_models}
    assert [t["kind"] for t in record["texts"]] == ["prose", "code"]
    assert len(record["cells"]) == 8 and {c["tokens"] for c in record["cells"]} == {24, 48}
    assert len(record["atlas"]["models"]) == 4 and record["atlas"]["lengths"] and record["atlas"]["rows"]
    assert "## Models compared on the same texts" in (out / "atlas.md").read_text()
    assert _owned(out) == {n: "anomaly.probe.atlas" for n in ["atlas.json", "atlas.md", CELLS]}
    assert len(list((out / CELLS).glob("*.json"))) == 8
    # atlas.json alone gives the comparison back (to its stored digits), texts checked.
    again = compare(load_cells(record)).to_json()
    for got, want in zip(again["rows"], record["atlas"]["rows"], strict=True):
        assert got["verdict"] == want["verdict"] and got["mean"] == pytest.approx(want["mean"], rel=1e-5)
    record["texts"][0]["sha256"] = "0" * 64
    with pytest.raises(UserError, match="differs from the one the atlas probed"):
        load_cells(record)
    # The same command again: every cell reused, no model loaded, the same atlas.json.
    before = (out / "atlas.json").read_bytes()
    assert _atlas(tiny_models, out, "--no-figures") == 0
    assert counted == {"probe": 8, "load": 2}
    assert _reused(capsys.readouterr().out) == 8
    assert (out / "atlas.json").read_bytes() == before


@pytest.mark.slow  # drawing and saving three figures: ~25 s on 2 busy cores
def test_cli_draws_the_figures(tiny_models, tmp_path):
    from anomaly.plotting.style import figure_files
    from anomaly.probe.atlas.plots import FIGURES

    out = tmp_path / "atlas"
    (tmp_path / "atlas").mkdir()
    (out / "notes.txt").write_text("the user's notes")
    assert _atlas(tiny_models, out) == 0
    figures = figure_files(FIGURES, "atlas_")
    assert len(figures) == 3 * len(FIGURES) and all((out / f).stat().st_size > 0 for f in figures)
    assert _owned(out) == {n: "anomaly.probe.atlas" for n in ["atlas.json", "atlas.md", CELLS, *figures]}
    # Without figures, the rerun removes its own figures and keeps its cells and the user's notes.
    assert _atlas(tiny_models, out, "--no-figures") == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "atlas.json", "atlas.md", CELLS, "notes.txt"])
    assert len(list((out / CELLS).glob("*.json"))) == 8


def test_cli_recomputes_cells_whose_key_changed(tiny_models, counted, tmp_path, capsys):
    out = tmp_path / "atlas"
    models = tiny_models[:1]
    assert _atlas(models, out, "--no-figures") == 0
    # Another dtype: every cell measured again (and its file replaced).
    assert _atlas(models, out, "--no-figures", "--dtype", "float64") == 0
    assert counted["probe"] == 8 and _reused(capsys.readouterr().out) == 0
    assert {json.loads(c.read_text())["key"]["dtype"] for c in (out / CELLS).glob("*.json")} == {"float64"}
    cells = json.loads((out / "atlas.json").read_text())["cells"]
    # One cell's key tampered with: that cell alone is measured again, to the same readings.
    cell = sorted((out / CELLS).glob("*.json"))[2]
    data = json.loads(cell.read_text())
    data["key"]["text_sha256"] = "0" * 64
    cell.write_text(json.dumps(data))
    assert _atlas(models, out, "--no-figures", "--dtype", "float64") == 0
    assert counted["probe"] == 9 and _reused(capsys.readouterr().out) == 3
    assert json.loads(cell.read_text())["key"]["text_sha256"] != "0" * 64
    assert json.loads((out / "atlas.json").read_text())["cells"] == cells


def test_cell_store_keeps_what_is_not_its_own(tmp_path, gemma_result):
    store = CellStore(tmp_path / CELLS)
    key = CellKey("m", {"file": "m.gguf"}, "prose/0", "a" * 64, 40, "b" * 64, "float32", "cpu", {"x.py": "1"})
    assert store.load(key) is None
    store.check([key])  # nothing there yet
    r = readings(gemma_result)
    store.save(key, r)
    assert json.dumps(store.load(key).to_json()) == json.dumps(r.to_json())
    assert store.load(replace(key, dtype="float64")) is None and store.stale(key) is None
    assert store.stale(replace(key, dtype="float64")) == "dtype"
    assert store.stale(replace(key, tokens=40, code={"x.py": "2", "y.py": "3"})) == "code (x.py, y.py)"
    store.path(key).write_text("a user's notes")
    with pytest.raises(Exception, match="is not a cell this command wrote"):
        store.check([key])
    assert store.path(key).read_text() == "a user's notes"


def _snapshot(folder: Path) -> dict[str, tuple[int, int] | str]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def _foreign_out(ws: Path) -> list[str]:
    out = ws / "figs"
    out.mkdir()
    (out / "atlas.json").write_text("{}")
    (out / MANIFEST).write_text(json.dumps({"files": {"atlas.json": "anomaly.figures"}}))
    return ["--out", str(out)]


def _foreign_cells(ws: Path) -> list[str]:
    (ws / "mine" / CELLS).mkdir(parents=True)
    (ws / "mine" / CELLS / "notes.txt").write_text("a user's folder")
    return ["--out", str(ws / "mine")]


@pytest.mark.parametrize("argv, setup, words", [
    (["--models", "{a}", "{a}"], None, ["--models", "twice"]),
    (["--tokens", "1"], None, ["--tokens", "at least 2"]),
    (["--tokens", "1024"], None, ["512 positions", "fewer than every --tokens"]),
    (["--models", "no-such-model"], None, ["unknown model", "no-such-model"]),
    ([], _foreign_out, ["atlas.json", "written by anomaly.figures"]),
    ([], _foreign_cells, [CELLS, "not written by this command"]),
], ids=["duplicate-model", "tokens-1", "beyond-positions", "unknown-model", "foreign-out", "foreign-cells"])
def test_cli_refuses_bad_input_in_one_line(argv, setup, words, tiny_models, counted, tmp_path, capsys):
    from anomaly.probe.atlas.cli import entry

    ws = tmp_path / "ws"
    ws.mkdir()
    extra = setup(ws) if setup else ["--out", str(ws / "atlas")]
    argv = [a.format(a=tiny_models[0]) for a in argv]
    if "--models" not in argv:
        argv = ["--models", tiny_models[0], *argv]
    if "--tokens" not in argv:
        argv += ["--tokens", "24"]
    before = _snapshot(ws)
    rc = entry([*argv, "--texts", "1", "--device", "cpu", "--quiet", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    assert _snapshot(ws) == before and counted == {"probe": 0, "load": 0}
