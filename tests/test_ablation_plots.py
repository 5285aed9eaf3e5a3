"""Figures, tables and the plots command of the ablation, drawn from the smoke run's results.

Figures are checked by what they draw, not by pixels: each band's vertices are the 95 %
t-interval over seeds (recomputed here from the per-seed values), each heatmap's cells the
passkey grid with each seed's value, each point the seed it stands for. The
smoke run reaches no criterion, so a copy with a synthetic "to criterion" reading (one of
two RoPE seeds reached it) covers that panel.
"""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from anomaly.ablation import analysis, plots
from anomaly.ablation.run import SMOKE_NOTE
from anomaly.cli import run_main

pytestmark = pytest.mark.slow  # the smoke run


@pytest.fixture(scope="module")
def results(smoke_run: Path) -> dict:
    return json.loads((smoke_run / "results.json").read_text())


def with_criterion(results: dict) -> dict:
    """A copy of ``results`` in which RoPE's first seed (of two) reached the criterion at its
    second validation, with a to-criterion reading unlike any equal-budget one, and slack
    both seeds (so that a to-criterion panel has a band too)."""
    r = copy.deepcopy(results)
    n, d = len(r["eval_lengths"]), len(r["depths"])
    passkey = np.linspace(0.9, 0.1, n)
    digit = np.linspace(0.5, 2.0, n)
    ppl = np.linspace(20.0, 80.0, n)
    first = r["training"]["rope"][0]
    step = first["val"]["step"][1]
    first["criterion_step"] = step
    r["criterion"]["per_variant"]["rope"] = {
        "steps": [step] + [None] * (len(r["seeds"]) - 1),
        "seeds_reached": 1,
        "passkey": passkey.tolist(),
        "passkey_per_seed": [passkey.tolist()],
        "passkey_grid": (np.arange(n * d).reshape(n, d) / (n * d)).tolist(),
        "passkey_grid_per_seed": [(np.arange(n * d).reshape(n, d) / (n * d)).tolist()],
        "digit_nll": digit.tolist(),
        "digit_nll_per_seed": [digit.tolist()],
        "ppl": ppl.tolist(),
        "ppl_per_seed": [ppl.tolist()],
    }
    steps = [s["val"]["step"][1] for s in r["training"]["coca_slack"]]
    for s, run in zip(steps, r["training"]["coca_slack"]):
        run["criterion_step"] = s
    two = np.stack([passkey, passkey * 0.5])
    r["criterion"]["per_variant"]["coca_slack"] = {
        "steps": steps, "seeds_reached": len(steps),
        "passkey": two.mean(0).tolist(), "passkey_per_seed": two.tolist(),
        "passkey_grid": r["passkey_grid"]["coca_slack"]["none"],
        "digit_nll": digit.tolist(), "digit_nll_per_seed": [digit.tolist(), (digit + 0.3).tolist()],
        "ppl": (ppl * 1.1).tolist(), "ppl_per_seed": [ppl.tolist(), (ppl * 1.2).tolist()],
    }
    return r


@pytest.fixture(scope="module")
def reached(results) -> dict:
    return with_criterion(results)


@pytest.fixture
def draw():
    """``draw(make, results)``: the figure, closed after the test."""
    figs = []

    def make(fn, results):
        figs.append(fn(results))
        return figs[-1]

    yield make
    for fig in figs:
        plt.close(fig)


def _by_gid(fig, gid: str, kind=None) -> list:
    found = fig.findobj(lambda a: a.get_gid() == gid and (kind is None or isinstance(a, kind)))
    assert found, f"nothing drawn with gid {gid!r}"
    return found


def _words(text: str) -> str:
    return " ".join(text.split())


# ------------------------------------------------------------------------- figures


@pytest.mark.parametrize("criterion", [False, True], ids=["equal-budget", "with-criterion"])
def test_every_figure_renders_and_carries_the_smoke_note(results, reached, criterion, draw):
    assert results["note"] == SMOKE_NOTE
    for name, make in plots.FIGURES.items():
        fig = draw(make, reached if criterion else results)
        assert SMOKE_NOTE in _words(fig.get_suptitle()), name
    clean = copy.deepcopy(results)
    clean["note"] = None
    fig = draw(plots.perplexity_vs_length, clean)
    assert "NOTE" not in fig.get_suptitle()


def _check_band(fig, gid: str, per_seed, key: str, scale: float = 1.0) -> None:
    """The line ``gid/mean`` draws the mean over seeds of ``per_seed`` ``[seed][length]``
    (perplexity: the geometric mean), the band ``gid/ci`` spans its t-interval over seeds,
    computed here by hand, and the points ``gid/seed`` are the seeds' values."""
    v = np.asarray(per_seed, dtype=float)
    k = v.shape[0]
    work = np.log(v) if key == "ppl" else v
    mean = work.mean(0)
    (line,) = _by_gid(fig, f"{gid}/mean")
    x = line.get_xdata()
    back = np.exp if key == "ppl" else (lambda a: a)
    np.testing.assert_allclose(line.get_ydata(), scale * back(mean), rtol=1e-12)
    seeds = [m.get_ydata() for m in _by_gid(fig, f"{gid}/seed")]
    np.testing.assert_allclose(seeds, scale * v, rtol=1e-12)
    if k < 2:
        assert not fig.findobj(lambda a: a.get_gid() == f"{gid}/ci")
        return
    from scipy import stats  # the t quantile only; the interval itself is written out here

    half = stats.t.ppf(0.975, k - 1) * work.std(0, ddof=1) / np.sqrt(k)
    (band,) = _by_gid(fig, f"{gid}/ci", PolyCollection)
    vertices = band.get_paths()[0].vertices
    for xi, low, high in zip(x, scale * back(mean - half), scale * back(mean + half)):
        ys = vertices[np.isclose(vertices[:, 0], xi, rtol=1e-12), 1]
        assert np.isclose(ys, low).any() and np.isclose(ys, high).any(), (gid, xi, low, high, ys)


@pytest.mark.parametrize("key, make, scale", [
    ("ppl", plots.perplexity_vs_length, 1.0),
    ("passkey", plots.passkey_vs_length, 100.0),
    ("digit_nll", plots.digit_loss_vs_length, 1.0),
])
def test_lines_bands_and_seeds_are_the_results(reached, key, make, scale, draw):
    fig = draw(make, reached)
    for v in reached["variants"]:
        for s in reached["scalings"]:
            _check_band(fig, f"{v}/{s}", reached[f"{key}_per_seed"][v][s], key, scale)
    for v in ("rope", "coca_slack"):  # one seed (no band) and two seeds reached the criterion
        crit = reached["criterion"]["per_variant"][v]
        _check_band(fig, f"{v}/{plots.TO_CRITERION}", crit[f"{key}_per_seed"], key, scale)


def test_criterion_panel_only_where_a_seed_reached_it(results, reached, draw):
    titles = [ax.get_title() for ax in draw(plots.passkey_vs_length, results).axes]
    assert len(titles) == len(results["scalings"]) and not any("criterion" in t for t in titles)
    titles = [ax.get_title() for ax in draw(plots.passkey_vs_length, reached).axes]
    assert len(titles) == len(results["scalings"]) + 1
    assert "to criterion" in titles[-1]
    assert "RoPE 1/2" in titles[-1] and "slack 2/2" in titles[-1] and "strict 0/2" in titles[-1]
    # Strict has no to-criterion reading to draw.
    fig = draw(plots.passkey_vs_length, reached)
    assert not fig.findobj(lambda a: a.get_gid() == f"coca_strict/{plots.TO_CRITERION}/mean")



def with_matched_stage(reached: dict) -> dict:
    """A copy of ``reached`` with a matched-stage reading (criterion + 500 steps): RoPE's first
    seed and both slack seeds, with values unlike the to-criterion ones."""
    r = copy.deepcopy(reached)
    per_variant = {}
    for v in ("rope", "coca_slack"):
        crit = r["criterion"]["per_variant"][v]
        entry = {"steps": [None if s is None else s + 500 for s in crit["steps"]],
                 "seeds_reached": crit["seeds_reached"]}
        for key in ("passkey", "digit_nll", "ppl"):
            rows = np.asarray(crit[f"{key}_per_seed"]) * (0.5 if key == "passkey" else 1.5)
            entry[f"{key}_per_seed"], entry[key] = rows.tolist(), rows.mean(0).tolist()
        entry["passkey_grid"] = crit["passkey_grid"]
        per_variant[v] = entry
    r["matched_stage"] = {"extra_steps": 500, "threshold": 0.9, "scaling": "none", "per_variant": per_variant}
    return r


def test_matched_stage_is_a_panel_and_a_paired_reading(reached, draw):
    r = with_matched_stage(reached)
    assert analysis.panels_of(r)[-2:] == [analysis.MATCHED_STAGE, analysis.TO_CRITERION]
    fig = draw(plots.passkey_vs_length, r)
    titles = [ax.get_title() for ax in fig.axes]
    assert any("matched stage (criterion + 500 steps)" in t and "RoPE 1/2" in t and "slack 2/2" in t for t in titles)
    for v in ("rope", "coca_slack"):
        _check_band(fig, f"{v}/{analysis.MATCHED_STAGE}",
                    r["matched_stage"]["per_variant"][v]["passkey_per_seed"], "passkey", 100.0)
    # Paired by seed: only RoPE's seed 0 reached the stage, so slack − RoPE has that one seed.
    c = analysis.contrast(r, "passkey", r["eval_lengths"][0], ("coca_slack", analysis.MATCHED_STAGE),
                          ("rope", analysis.MATCHED_STAGE))
    slack = r["matched_stage"]["per_variant"]["coca_slack"]["passkey_per_seed"][0][0]
    rope = r["matched_stage"]["per_variant"]["rope"]["passkey_per_seed"][0][0]
    assert c.stat.seeds == (r["seeds"][0],) and c.stat.estimate == pytest.approx(slack - rope)
    text = analysis.report(r)
    assert "none, matched stage (criterion + 500 steps) (seeds " in text
    assert analysis.check_results(r) is r
    broken = copy.deepcopy(r)
    broken["matched_stage"]["per_variant"]["rope"]["passkey_per_seed"].append([0.0] * len(r["eval_lengths"]))
    with pytest.raises(analysis.UserError, match="matched_stage passkey_per_seed"):
        analysis.check_results(broken)


def test_heatmap_cells_are_the_passkey_grid(results, reached, draw):
    r = copy.deepcopy(reached)
    n, d = len(r["eval_lengths"]), len(r["depths"])
    seeds = len(r["seeds"])
    for i, v in enumerate(r["variants"]):  # distinct values, so a transposed map would show
        per_seed = [(np.arange(n * d).reshape(n, d) + i + 2 * k) / (n * d + 2 * seeds + 2) for k in range(seeds)]
        r["passkey_grid_per_seed"][v]["none"] = [g.tolist() for g in per_seed]
        r["passkey_grid"][v]["none"] = np.mean(per_seed, 0).tolist()
    fig = draw(plots.passkey_heatmap, r)
    for v in r["variants"]:
        for panel, grid, per_seed in [("none", r["passkey_grid"][v]["none"], r["passkey_grid_per_seed"][v]["none"])] + (
                [(plots.TO_CRITERION, r["criterion"]["per_variant"][v]["passkey_grid"],
                  r["criterion"]["per_variant"][v]["passkey_grid_per_seed"])] if v == "rope" else []):
            (image,) = _by_gid(fig, f"{v}/{panel}/grid")
            np.testing.assert_array_equal(image.get_array(), np.asarray(grid))  # [length, depth]
            ax = image.axes
            # Depth on x (0 = start of context), length on y, the shortest at the bottom; each
            # cell says its value. Cells are found by the mesh's corners, whatever their spacing.
            corners = image.get_coordinates()  # [length + 1, depth + 1, (x, y)]
            xs, ys = corners[0, :, 0], corners[:, 0, 1]
            ticks = ax.get_xticks()
            labels = [ax.xaxis.get_major_formatter()(t, i) for i, t in enumerate(ticks)]
            assert labels == [f"{x:g}" for x in r["depths"]]
            np.testing.assert_allclose(ticks, (xs[:-1] + xs[1:]) / 2)  # one tick at the centre of each depth
            bottom, top = ax.get_ylim()
            assert bottom < top and np.isclose(bottom, ys[0])  # the first length (row 0) is at the bottom
            cells = {(int(np.searchsorted(ys, t.get_position()[1])) - 1, int(np.searchsorted(xs, t.get_position()[0])) - 1):
                     t.get_text() for t in ax.texts}
            for (li, di), val in np.ndenumerate(np.asarray(grid)):
                # the mean over seeds, and below it each seed's value in seed order
                assert cells[li, di] == f"{100 * val:.0f}\n" + "·".join(f"{100 * g[li][di]:.0f}" for g in per_seed)
            assert image.get_cmap().name == "viridis"
    # Without any criterion reading: one row of panels.
    one_row = draw(plots.passkey_heatmap, results)
    assert len([ax for ax in one_row.axes if ax.get_label() != "<colorbar>"]) == len(results["variants"])
    # A cell without a value (null in the JSON) says so, and only that cell.
    holed = copy.deepcopy(r)
    holed["passkey_grid"]["rope"]["none"][0][d - 1] = None
    (image,) = _by_gid(draw(plots.passkey_heatmap, holed), "rope/none/grid")
    na = [t.get_position() for t in image.axes.texts if t.get_text() == "n/a"]
    assert len(na) == 1 and na[0][0] > image.get_coordinates()[0, d - 1, 0] and na[0][1] < image.get_coordinates()[1, 0, 1]


def test_digit_loss_marks_guessing(results, draw):
    fig = draw(plots.digit_loss_vs_length, results)
    lines = _by_gid(fig, "guessing")
    assert len(lines) == len(results["scalings"])
    for line in lines:  # first digit guessed among 1–9, the other four among 0–9
        assert line.get_linestyle() == "--" and np.allclose(line.get_ydata(), (math.log(9) + 4 * math.log(10)) / 5)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert any(label.startswith("guessing") for label in labels)


def test_training_shows_mean_loss_validation_and_criterion_steps(reached, draw):
    fig = draw(plots.training_curves, reached)
    for v in reached["variants"]:
        curves = [run["curve"] for run in reached["training"][v]]
        (line,) = _by_gid(fig, f"{v}/loss")
        np.testing.assert_allclose(line.get_ydata(), np.mean([c["loss"] for c in curves], axis=0), rtol=1e-12)
    first = reached["training"]["rope"][0]
    k = first["val"]["step"].index(first["criterion_step"])
    stars = _by_gid(fig, "rope/criterion")
    expected = [100 * first["val"]["exact"][k], first["val"]["digit_nll"][k]]
    assert sorted(float(s.get_ydata()[0]) for s in stars) == sorted(expected)
    assert all(s.get_xdata()[0] == first["criterion_step"] for s in stars)
    assert not fig.findobj(lambda a: a.get_gid() == "coca_strict/criterion")


def test_retrieval_shows_the_example_rows_and_matching_attention(results, draw):
    fig = draw(plots.retrieval_head, results)
    for v in results["variants"]:
        runs = results["retrieval"][v]
        (image,) = _by_gid(fig, f"{v}/example")
        np.testing.assert_allclose(image.get_array(), np.asarray(runs[0]["example"]["rows"]), rtol=1e-12)
        start, end = runs[0]["example"]["key_span"]
        edges = [line.get_xdata()[0] for line in image.axes.lines]
        assert start - 0.5 in edges and end - 0.5 in edges
        (line,) = _by_gid(fig, f"{v}/matching")
        np.testing.assert_allclose(line.get_ydata(), np.mean([run["matching"] for run in runs], axis=0), rtol=1e-12)
        assert len(_by_gid(fig, f"{v}/matching/seed")) == len(runs)


def test_anomalous_fraction_bars_are_means_over_seeds(results, draw):
    fig = draw(plots.anomalous_fraction, results)
    geo = results["anomalous_fraction"]
    for key in ("mean", "weighted_mean"):
        heights = [bar.get_height() for bar in _by_gid(fig, key)]
        np.testing.assert_allclose(heights, [np.mean([g[key] for g in geo[v]]) for v in results["variants"]])
        seeds = [m.get_ydata() for m in _by_gid(fig, f"{key}/seeds")]
        np.testing.assert_allclose(seeds, [[g[key] for g in geo[v]] for v in results["variants"]])
        # Beside the bars, a strip of every head of every seed, jittered sideways only.
        per_head = "anomalous_fraction" if key == "mean" else "weighted_anomalous_fraction"
        for i, v in enumerate(results["variants"]):
            (strip,) = _by_gid(fig, f"{v}/{key}/heads")
            points = strip.get_offsets()  # [seed · layer · head, (x, y)]
            np.testing.assert_allclose(np.sort(points[:, 1]), np.sort(np.concatenate([np.ravel(g[per_head]) for g in geo[v]])))
            centre = i + (-0.2 if key == "mean" else 0.2)
            assert np.abs(points[:, 0] - centre).max() <= 0.08 and np.ptp(points[:, 0]) > 0
    dashed = [line for line in fig.axes[0].lines if line.get_linestyle() == "--"]
    assert any(np.allclose(line.get_ydata(), plots.CHANCE) for line in dashed)


def test_paired_differences_are_each_seeds_difference(results, draw):
    fig = draw(plots.paired_differences, results)
    for key in ("passkey", "ppl"):
        a = np.asarray(results[f"{key}_per_seed"]["coca_slack"]["none"], dtype=float)  # [seed, length]
        b = np.asarray(results[f"{key}_per_seed"]["rope"]["none"], dtype=float)
        d = np.log(a) - np.log(b) if key == "ppl" else a - b
        points = _by_gid(fig, f"{key}/coca_slack-rope/seeds")
        assert len(points) == len(results["eval_lengths"])
        for j, line in enumerate(points):  # one point per seed, in seed order
            np.testing.assert_allclose(line.get_ydata(), d[:, j], rtol=1e-12, atol=1e-15)
        (means,) = _by_gid(fig, f"{key}/coca_slack-rope/mean")
        np.testing.assert_allclose(means.get_ydata(), d.mean(0), rtol=1e-12, atol=1e-15)


def test_missing_parts_are_said_not_drawn(results, draw):
    r = copy.deepcopy(results)
    r.pop("anomalous_fraction"), r.pop("retrieval"), r.pop("training")
    for make, words in ((plots.anomalous_fraction, "no anomalous-fraction probe"),
                        (plots.retrieval_head, "no retrieval-head trace"),
                        (plots.training_curves, "no training record")):
        fig = draw(make, r)
        assert any(words in t.get_text() for ax in fig.axes for t in ax.texts)


def test_nonfinite_perplexity_is_shown_clipped(results, draw):
    r = copy.deepcopy(results)
    r["ppl"]["rope"]["none"][-1] = math.inf
    r["ppl_per_seed"]["rope"]["none"][0][-1] = math.inf  # one seed diverged at the longest length
    r["ppl_per_seed"]["rope"]["ntk-2"][0][-1] = None  # NaN in JSON
    fig = draw(plots.perplexity_vs_length, r)
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert "non-finite (clipped)" in labels
    top = fig.axes[0].get_ylim()[1]
    finite = max(x for row in r["ppl_per_seed"]["rope"]["none"] for x in row if x is not None and math.isfinite(x))
    assert math.isfinite(top) and top > finite
    (band,) = _by_gid(fig, "rope/none/ci", PolyCollection)
    assert np.isfinite(band.get_paths()[0].vertices).all()  # the diverged bound is pinned, not lost
    (line,) = _by_gid(fig, "rope/none/mean")
    assert len(line.get_xdata()) == len(r["eval_lengths"]) - 1


# -------------------------------------------------------------------------- tables


def test_markdown_table_gives_mean_interval_and_each_seed(reached):
    table = analysis.markdown_table(reached, "passkey")
    rows = table.splitlines()
    assert len(rows) == 2 + len(reached["variants"]) * len(reached["scalings"]) + 2  # + RoPE, slack to criterion
    first = rows[2].split(" | ")
    s = analysis.series(reached, "passkey", "rope", "none")
    assert first[2] == f"{s.mean[0]:.2f} [{s.low[0]:.2f}, {s.high[0]:.2f}] (" + " · ".join(
        f"{x:.3f}" for x in np.asarray(reached["passkey_per_seed"]["rope"]["none"])[:, 0]) + ")"
    crit = [row for row in rows if "to criterion" in row]
    assert len(crit) == 2 and crit[0].startswith("| RoPE | none, to criterion (seeds 0) | 0.90 (seed 0: 0.900) |")


def test_markdown_table_names_nonfinite_values(results):
    r = copy.deepcopy(results)
    r["ppl_per_seed"]["rope"]["none"][0][-1] = math.inf
    row = analysis.markdown_table(r, "ppl").splitlines()[2]
    assert row.endswith("| inf [n/a, n/a] (inf · " + f"{r['ppl_per_seed']['rope']['none'][1][-1]:.1f}) |")


# ----------------------------------------------------------------------------- CLI


def test_the_run_wrote_every_figure(smoke_run):
    for name in plots.FIGURES:
        for ext in ("pdf", "png", "json"):
            path = smoke_run / "figures" / f"ablation_{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 0, path
    prov = json.loads((smoke_run / "figures" / "ablation_ppl.json").read_text())
    assert prov["model"] == "ablation/smoke" and "results" in prov["extra"]


def test_plots_cli_writes_every_figure(smoke_run, tmp_path, capsys):
    out = tmp_path / "figs"
    assert run_main(plots.main, [str(smoke_run / "results.json"), "--out", str(out), "--prefix", "x"]) == 0
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} >= {
        f"x_{name}.{ext}" for name in plots.FIGURES for ext in ("pdf", "png", "json")}
    assert len(capsys.readouterr().out.splitlines()) == len(plots.FIGURES)  # the PDFs
    # A run directory works as well as its results.json.
    assert analysis.load_results(smoke_run) == analysis.load_results(smoke_run / "results.json")


def _one_line_exit_2(argv, capsys, *words) -> None:
    assert run_main(plots.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


def test_plots_cli_bad_input_is_one_line_exit_2(results, tmp_path, capsys):
    proc = subprocess.run([sys.executable, "-m", "anomaly.ablation.plots", str(tmp_path / "missing.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    bad, out = tmp_path / "bad.json", tmp_path / "figs"
    argv = [str(bad), "--out", str(out)]
    bad.write_text("{")
    _one_line_exit_2(argv, capsys, "not valid JSON")
    bad.write_text("[]")
    _one_line_exit_2(argv, capsys, "not an ablation results object")
    # The one-seed schema of before per-seed values and intervals.
    old = {"train_length": 4, "eval_lengths": [4, 8], "ppl": {"rope": {"none": [1.0, 2.0]}},
           "passkey": {"rope": {"none": [0.0, 0.0]}}}
    bad.write_text(json.dumps(old))
    _one_line_exit_2(argv, capsys, "one-seed", "python -m anomaly.ablation")
    r = copy.deepcopy(results)
    r["ppl_per_seed"]["coca_slack"]["ntk-4"] = r["ppl_per_seed"]["coca_slack"]["ntk-4"][:-1]
    bad.write_text(json.dumps(r))
    _one_line_exit_2(argv, capsys, "ppl_per_seed[coca_slack][ntk-4]", "shape")
    r = copy.deepcopy(results)
    del r["passkey_grid"]["coca_strict"]
    bad.write_text(json.dumps(r))
    _one_line_exit_2(argv, capsys, "coca_strict")
    r = copy.deepcopy(results)
    r["digit_nll"] = [1.0, 2.0]
    bad.write_text(json.dumps(r))
    _one_line_exit_2(argv, capsys, "variant -> scaling -> values")
    r = with_criterion(results)
    r["criterion"]["per_variant"]["rope"]["passkey_per_seed"] *= 2  # two rows for one seed that reached it
    bad.write_text(json.dumps(r))
    _one_line_exit_2(argv, capsys, "criterion passkey_per_seed[rope]")
    assert not out.exists()  # nothing half-written
