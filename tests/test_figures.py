"""The analytic figure builders and the ``python -m anomaly.figures`` command."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import pytest
import torch

from anomaly import analytic as an
from anomaly.figures import FIGURES, anomaly_map, decay_study, fig3_cases, main, make_all, scaling_study
from anomaly.io import FLOAT_DIGITS, REPO_ROOT, Provenance, code_version, write_json
from anomaly.plotting.style import figure_files

PI = math.pi


def test_fig3_cases_cover_a_to_d_with_spec_tau():
    cases = fig3_cases(freq=0.1, acute=0.6 * PI)
    assert [c.case for c in cases] == ["a", "b", "c", "d"]
    taus = {c.case: c.tau for c in cases}
    assert math.isclose(taus["a"], 0.6 * PI / 0.1) and math.isclose(taus["d"], 0.6 * PI / 0.1)
    assert taus["b"] == taus["c"] == 0
    for c in cases:
        # Within the abnormal area the score rises monotonically with |distance|; outside it
        # (cases b, c) it falls until the first border.
        near = c.distances.abs() < min(c.tau if c.tau else c.first_border, 60)
        diffs = c.scores[near].diff()
        assert (diffs > 0).all() if c.tau else (diffs < 0).all()


def test_anomaly_map_abnormal_area_is_rising_and_bounded_by_tau():
    m = anomaly_map(freq=0.2, max_distance=40, n_angles=73)
    assert m.scores.shape == m.abnormal.shape == (72, 81)
    assert not (m.abnormal & ~m.rising).any()
    # Brute force: an abnormal cell is on the anomalous side and nearer than τ.
    for i, theta in enumerate(m.theta0.tolist()):
        for j, s in enumerate(m.distances.tolist()):
            side = (s > 0 and theta > PI) or (s < 0 and theta <= PI)
            tau = (2 * PI - theta) / 0.2 if theta > PI else theta / 0.2
            assert bool(m.abnormal[i, j]) == (side and 0 < abs(s) < tau)


def test_scaling_study_ratios():
    st = scaling_study(head_dim=64, factor=4.0)
    torch.testing.assert_close(st.effects["PI (k=4)"].ratio, torch.full((32,), 4.0, dtype=torch.float64))
    assert torch.equal(st.effects["none"].scaled_tau, st.effects["none"].tau)
    assert torch.allclose(st.effects["none"].tau, an.causal_tau(torch.full((32,), 1.5 * PI), st.effects["none"].inv_freq))


def test_cli_writes_pdf_png_and_provenance(tmp_path):
    assert main(["--out", str(tmp_path), "--only", "fig3_cases", "decay_bounds"]) == 0
    for name in ("fig3_cases", "decay_bounds"):
        for ext in ("pdf", "png", "json"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 0
        prov = json.loads((tmp_path / f"{name}.json").read_text())
        assert prov["command"].startswith("python")
        assert {"anomaly/figures.py", "anomaly/analytic.py", "anomaly/plotting/analytic.py"} <= set(prov["code"])
    assert (tmp_path / "fig3_cases.pdf").read_bytes()[:4] == b"%PDF"
    assert not list(tmp_path.glob(".*tmp"))  # nothing half-written left behind


def test_cli_bad_figure_name_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "anomaly.figures", "--out", str(tmp_path), "--only", "fig9"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "invalid choice" in r.stderr


def test_registries_name_distinct_files():
    """Analytic, probe and ablation figures are written side by side (figures/, with the
    prefixes their commands use): no two registered figures may claim the same file, and
    every entry of each registry is a drawing function."""
    from anomaly.ablation import plots as ablation
    from anomaly.probe import plots as probe

    names = figure_files(FIGURES) + figure_files(probe.FIGURES, "probe_") + figure_files(ablation.FIGURES, "ablation_")
    assert len(names) == len(set(names)) == 3 * (len(FIGURES) + len(probe.FIGURES) + len(ablation.FIGURES))
    for registry in (FIGURES, probe.FIGURES, ablation.FIGURES):
        assert registry and all(callable(draw) and name.isidentifier() for name, draw in registry.items())


def test_save_figures_closes_every_figure_even_when_saving_fails(tmp_path, monkeypatch):
    """The one saving loop (analytic, probe and ablation figures) leaves no figure open: a
    failed save still closes the figure it drew (a long run draws hundreds)."""
    import matplotlib.pyplot as plt
    from anomaly.plotting import style

    plt.close("all")
    registry = {"a": lambda x: plt.subplots()[0], "b": lambda x: plt.subplots()[0]}
    assert [p.name for p in style.save_figures(registry, tmp_path, Provenance(command="test"), 1, prefix="t_")] == \
        figure_files(registry, "t_")
    assert not plt.get_fignums()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(style, "save_figure", fail)
    with pytest.raises(OSError, match="disk full"):
        style.save_figures(registry, tmp_path, Provenance(command="test"), 1)
    assert not plt.get_fignums()


def test_drawing_leaves_global_style_alone_and_draws_into_a_given_axes():
    """Figures are drawn and saved under the style context (anomaly.plotting.style.style):
    the caller's rcParams are the same afterwards; a one-panel figure draws into ``ax``."""
    import matplotlib.pyplot as plt
    from anomaly.plotting import analytic as plots
    from anomaly.plotting.style import style

    before = dict(plt.rcParams)
    fig = plots.plot_decay(decay_study(max_distance=64))
    assert fig.axes[0].xaxis.label.get_fontsize() == 9  # the toolkit's style was applied
    assert dict(plt.rcParams) == before
    # A setting the block did not bring stays as it was set inside: IPython switches
    # interactive mode on when a notebook's first figure resolves the inline backend, and
    # undoing that would hide every later figure of the notebook.
    interactive = plt.rcParams["interactive"]
    try:
        with style():
            plt.rcParams["interactive"] = not interactive
        assert plt.rcParams["interactive"] is (not interactive)
    finally:
        plt.rcParams["interactive"] = interactive
    outer, (left, right) = plt.subplots(1, 2)
    try:
        assert plots.plot_decay(decay_study(max_distance=64), ax=right) is outer
        assert len(right.lines) == 2 and not left.lines and len(outer.axes) == 2
    finally:
        plt.close(fig)
        plt.close(outer)


def test_regeneration_writes_the_same_bytes(tmp_path):
    """Same inputs, same bytes: no dates, tool versions or machine paths in PDF, PNG or JSON.
    Every registered figure is written, as PDF, PNG and provenance, and nothing else."""
    make_all(tmp_path / "a", command="test")
    make_all(tmp_path / "b", command="test")
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").iterdir())
    assert sorted(map(str, files)) == sorted([*figure_files(FIGURES), ".anomaly-outputs.json"])
    for name in FIGURES:
        assert json.loads((tmp_path / "a" / f"{name}.json").read_text())["command"] == "test"
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    pdf = (tmp_path / "a" / "fig3_cases.pdf").read_bytes()
    assert b"CreationDate" not in pdf and b"Matplotlib" not in pdf
    assert str(tmp_path).encode() not in (tmp_path / "a" / "fig3_cases.json").read_bytes()


def test_code_version_follows_imports_and_content(tmp_path):
    code = code_version("anomaly.figures")
    # Direct, function-level (plotting) and parent-package imports are all followed.
    assert {"anomaly/__init__.py", "anomaly/figures.py", "anomaly/rope.py", "anomaly/plotting/style.py"} <= set(code)
    assert not any("probe" in path or "coca" in path for path in code)  # nothing it does not import
    digest = hashlib.sha256((REPO_ROOT / "anomaly/rope.py").read_bytes()).hexdigest()[:12]
    assert code["anomaly/rope.py"] == digest


def test_write_json_rounds_floats_to_stated_digits(tmp_path):
    obj = {"x": 0.45598655012824707, "noisy": [1 / 3, 1 / 3 + 4e-8], "n": 2048, "inf": math.inf,
           "nan": math.nan, "t": torch.tensor([2.0 / 3], dtype=torch.float64)}
    data = json.loads(write_json(tmp_path / "r.json", obj).read_text())
    assert data["x"] == 0.455987 and data["n"] == 2048 and data["nan"] is None and data["inf"] == math.inf
    assert data["noisy"][0] == data["noisy"][1] == 0.333333  # float32-sized noise disappears
    assert data["t"] == [0.666667]
    exact = json.loads(write_json(tmp_path / "e.json", obj, digits=None).read_text())
    assert exact["x"] == 0.45598655012824707 and FLOAT_DIGITS == 6



def test_seeded_repeats_the_jitter_and_leaves_the_callers_random_stream_alone():
    """seaborn jitters strips with numpy's global state: inside ``seeded`` it is the same
    every time, and the caller's stream goes on afterwards as if nothing had drawn from it."""
    import numpy as np
    from anomaly.plotting.style import seeded

    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    with seeded(0):
        first = np.random.random(4)
    with seeded(0):
        again = np.random.random(4)
    assert (first == again).all() and (np.random.random(3) == expected).all()


def test_tau_strips_are_each_slices_case_d_taus():
    """The probe's τ figure: per slice j, a strip of one point per (layer, head) in case (d)
    (τ > 0), jittered sideways within ±0.3 of j, the same on every drawing."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt
    import numpy as np
    from anomaly.probe.plots import tau_distribution

    tau = np.random.default_rng(1).lognormal(size=(2, 3, 4))  # [layer, head, slice]
    tau[0, 0] = 0.0  # a head outside case (d) in every slice
    tau[1, :, 3] = 0.0
    result = SimpleNamespace(tau=tau, tokens=64, critical_slice=2, train_length=128)
    figs = [tau_distribution(result) for _ in range(2)]
    try:
        points = [np.concatenate([c.get_offsets() for c in f.axes[0].collections]) for f in figs]  # [point, (x, y)]
        np.testing.assert_array_equal(points[0], points[1])
        x, y = points[0][:, 0], points[0][:, 1]
        j = np.rint(x)
        assert np.abs(x - j).max() <= 0.3 and np.ptp(x - j) > 0
        for s in range(4):
            np.testing.assert_allclose(np.sort(y[j == s]), np.sort(tau[..., s][tau[..., s] > 0]))
        labels = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
        assert labels.count("head × layer (case d)") == 1
    finally:
        for f in figs:
            plt.close(f)
