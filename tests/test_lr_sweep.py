"""The learning-rate sweep (:mod:`anomaly.ablation.sweep`) and its lock files (:mod:`anomaly.ablation.lock`).

* the sweep writes one result file per (variant, lr, seed) and a rerun trains nothing;
* a model locked by a running process is skipped, a lock left by a dead one is taken over;
* the rule, on result files written by hand: lowest mean digit loss over the last five
  validations, ties to 3 decimals to the smaller learning rate, diverged models not eligible;
* bad input: one line, exit 2, nothing written.

Training runs the smoke preset (a plumbing check: its numbers mean nothing).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from anomaly.ablation.config import PRESETS, VARIANTS
from anomaly.ablation.lock import LockOwner, _start_time, lock_owner, locked, release, try_lock
from anomaly.ablation.sweep import OWNER, SweepModel, choose, main, model_config, plan, result_path, summarise
from anomaly.cli import run_main
from anomaly.io import write_json
from anomaly.outputs import claim

from conftest import one_torch_thread

SMOKE = PRESETS["smoke"]


def snapshot(folder: Path) -> dict[str, tuple[int, int] | str]:
    """Every path under ``folder``: files by (size, mtime), folders by kind."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory) -> Path:
    """The smoke preset's token cache, built once: tokenising the corpus dominates a smoke sweep."""
    from anomaly.ablation.data import build_data

    folder = tmp_path_factory.mktemp("cache")
    build_data(SMOKE, folder)
    return folder / "tokens.safetensors"


def with_cache(tmp: Path, token_cache: Path) -> Path:
    """``tmp/work`` claimed by the sweep (as its first run does) and holding the token cache."""
    claim(tmp / "work", OWNER, ["cache"]).adopt()
    (tmp / "work" / "cache").mkdir()
    shutil.copy(token_cache, tmp / "work" / "cache")
    return tmp / "work"


def sweep(tmp: Path, *extra: str) -> int:
    with one_torch_thread():
        return run_main(main, ["--preset", "smoke", "--work", str(tmp / "work"), "--results", str(tmp / "res"),
                               *extra])


@pytest.fixture
def sleeper():
    """A running process other than this one (its pid holds a live lock)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid no longer exists
    return proc.pid


# ----------------------------------------------------------------------------- training


def test_one_file_per_model_in_seed_major_order_and_rerun_trains_nothing(tmp_path, token_cache, capsys):
    with_cache(tmp_path, token_cache)
    args = ["--variants", "rope", "coca_strict", "--lrs", "1e-3", "2e-3", "--tuning-seeds", "100"]
    assert sweep(tmp_path, *args) == 0
    out = capsys.readouterr().out
    trained = [line.split("] ")[0].split(" [")[1] for line in out.splitlines() if line.endswith("] training")]
    assert trained == ["rope lr 0.001 seed 100", "coca_strict lr 0.001 seed 100",
                       "rope lr 0.002 seed 100", "coca_strict lr 0.002 seed 100"]
    files = sorted(p.relative_to(tmp_path / "res").as_posix() for p in (tmp_path / "res").rglob("lr*.json"))
    assert files == ["coca_strict/lr0.001_seed100.json", "coca_strict/lr0.002_seed100.json",
                     "rope/lr0.001_seed100.json", "rope/lr0.002_seed100.json"]
    r = json.loads((tmp_path / "res" / "rope" / "lr0.002_seed100.json").read_text())
    assert (r["variant"], r["lr"], r["seed"]) == ("rope", 0.002, 100)
    assert r["validation"]["step"] == [0, 6, 12] and len(r["validation"]["digit_nll"]) == 3
    assert r["config"]["train"]["lr"] == 0.002 and r["config"]["seeds"] == [100]
    assert r["config"]["train"]["steps"] == SMOKE.train.steps and r["train_curve"]["step"][-1] == 12
    assert r["train_curve"]["lr"][0] == pytest.approx(0.002)  # warm-up ends at the peak of this lr
    assert r["provenance"]["seed"] == 100 and "anomaly/ablation/sweep.py" in r["provenance"]["code"]
    # Only the lr differs between the two rope models: same initial weights, same batches.
    other = json.loads((tmp_path / "res" / "rope" / "lr0.001_seed100.json").read_text())
    assert other["validation"]["digit_nll"][0] == r["validation"]["digit_nll"][0]
    assert other["validation"]["digit_nll"][-1] != r["validation"]["digit_nll"][-1]

    before = snapshot(tmp_path / "res")
    assert sweep(tmp_path, *args) == 0
    out = capsys.readouterr().out
    assert "training" not in out and "4 of 4 models finished (0 by this worker)" in out
    assert snapshot(tmp_path / "res") == before  # no result rewritten

    # A lost work folder (a new session) retrains only what has no result.
    (tmp_path / "res" / "coca_strict" / "lr0.001_seed100.json").unlink()
    assert sweep(tmp_path, *args) == 0
    out = capsys.readouterr().out
    assert [line.split(" [")[1] for line in out.splitlines() if line.endswith("] training")] == \
        ["coca_strict lr 0.001 seed 100] training"]
    assert "4 of 4 models finished (1 by this worker)" in out
    after = snapshot(tmp_path / "res")
    assert {k: v for k, v in after.items() if "coca_strict/lr0.001" not in k} == \
        {k: v for k, v in before.items() if "coca_strict/lr0.001" not in k}


def test_live_lock_is_skipped_and_stale_lock_is_taken_over(tmp_path, token_cache, sleeper, capsys):
    with_cache(tmp_path, token_cache)
    args = ["--variants", "rope", "coca_slack", "--lrs", "1e-3", "--tuning-seeds", "100"]
    claim(tmp_path / "work", OWNER, ["locks"]).adopt()  # as the worker holding the live lock did
    locks = tmp_path / "work" / "locks"
    locks.mkdir()
    live = locks / "rope_lr0.001_seed100.lock"
    live.write_text(LockOwner(sleeper.pid, _start_time(sleeper.pid)).text())
    stale = locks / "coca_slack_lr0.001_seed100.lock"
    stale.write_text(LockOwner(dead_pid(), None).text())

    assert sweep(tmp_path, *args) == 3  # not every model finished
    out = capsys.readouterr().out
    assert f"claimed by running pid {sleeper.pid}; skipped" in out
    assert "1 of 2 models finished (1 by this worker); 1 in training by other workers" in out
    assert not result_path(tmp_path / "res", SweepModel("rope", 1e-3, 100)).exists()
    assert result_path(tmp_path / "res", SweepModel("coca_slack", 1e-3, 100)).exists()
    assert live.exists() and not stale.exists()  # the live lock untouched; the taken one released

    sleeper.kill()
    sleeper.wait()  # its owner gone, the lock is stale
    assert sweep(tmp_path, *args) == 0
    assert result_path(tmp_path / "res", SweepModel("rope", 1e-3, 100)).exists()
    assert not any(locks.iterdir())


def test_a_diverged_model_is_recorded_and_the_sweep_goes_on(tmp_path, token_cache, monkeypatch, capsys):
    from anomaly.ablation import sweep as sweep_module

    real_train = sweep_module.train

    def train(model, batches, config, *args, **kwargs):
        if config.train.lr == 1e-3:
            raise RuntimeError("training loss became nan at step 3")  # what train raises on a non-finite loss
        return real_train(model, batches, config, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "train", train)
    with_cache(tmp_path, token_cache)
    assert sweep(tmp_path, "--variants", "rope", "--lrs", "1e-3", "2e-3", "--tuning-seeds", "100") == 0
    assert "diverged (training loss became nan at step 3)" in capsys.readouterr().out
    diverged = json.loads(result_path(tmp_path / "res", SweepModel("rope", 1e-3, 100)).read_text())
    assert diverged["diverged"] == "training loss became nan at step 3" and diverged["config"]["train"]["lr"] == 1e-3
    assert "validation" in json.loads(result_path(tmp_path / "res", SweepModel("rope", 2e-3, 100)).read_text())


def test_lock_file_rules(tmp_path, sleeper):
    path = tmp_path / "locks" / "a.lock"
    with locked(path) as mine:
        assert mine and lock_owner(path) == LockOwner.me()
    assert not path.exists()  # released at the end of the block

    path.write_text(LockOwner(sleeper.pid, _start_time(sleeper.pid)).text())
    assert not try_lock(path)
    release(path)  # never removes someone else's lock
    assert lock_owner(path).pid == sleeper.pid

    for stale in (LockOwner(dead_pid(), None).text(),
                  LockOwner(sleeper.pid, "1").text(),  # the pid now belongs to a process started later
                  "half a lock"):
        path.write_text(stale)
        assert try_lock(path) and lock_owner(path) == LockOwner.me()
        release(path)
        assert not path.exists()
    assert sorted(p.name for p in path.parent.iterdir()) == []  # no temporary left behind


def test_plan_order_and_config():
    models = plan(["coca_strict", "rope"], [5e-4, 1e-3], [100, 101])
    assert [(m.seed, m.lr, m.variant) for m in models] == [
        (100, 5e-4, "rope"), (100, 5e-4, "coca_strict"), (100, 1e-3, "rope"), (100, 1e-3, "coca_strict"),
        (101, 5e-4, "rope"), (101, 5e-4, "coca_strict"), (101, 1e-3, "rope"), (101, 1e-3, "coca_strict")]
    config = model_config(PRESETS["cpu"], 2e-3, 101)
    assert config.train.lr == 2e-3 and config.seeds == (101,)
    assert config.train.warmup_steps == 100 and config.train.steps == 3000 and config.cpu_threads == 1
    assert replace(config, train=replace(config.train, lr=1e-3), seeds=(0, 1, 2)) == PRESETS["cpu"]  # nothing else


# ----------------------------------------------------------------------------- the rule

STEPS = [0, 100, 200, 300, 400, 500, 600, 700]

# variant -> lr -> seed -> digit loss curve (8 validations; the rule reads the last five).
CURVES = {
    "rope": {
        # last five: 2.0 and 1.0 -> mean 1.5 (lowest over the whole curve: 1.2875 and 0.6625)
        5e-4: {100: [0.1, 0.1, 0.1, 2, 2, 2, 2, 2], 101: [0.1, 0.1, 0.1, 1, 1, 1, 1, 1]},
        # last five: (1.2+1.4+1.0+1.1+1.3)/5 = 1.2 and 1.4 -> mean 1.3: chosen
        1e-3: {100: [3, 3, 3, 1.2, 1.4, 1.0, 1.1, 1.3], 101: [3, 3, 3, 1.4, 1.4, 1.4, 1.4, 1.4]},
        # last five: (3·4+0.5)/5 = 2.5 and 0.6 -> mean 1.55 (lowest on the final validation alone)
        2e-3: {100: [3, 3, 3, 3, 3, 3, 3, 0.5], 101: [3, 3, 3, 0.6, 0.6, 0.6, 0.6, 0.6]},
    },
    "coca_slack": {
        5e-4: {100: [2] * 3 + [1.0008] * 5, 101: [2] * 3 + [1.0000] * 5},  # mean 1.0004 -> 1.000
        1e-3: {100: [2] * 3 + [1.0002] * 5, 101: [2] * 3 + [1.0000] * 5},  # mean 1.0001 -> 1.000: a tie
        2e-3: {100: [2] * 8, 101: [2] * 8},
    },
    "coca_strict": {
        5e-4: {100: [2] * 8, 101: [2] * 8},
        1e-3: {100: [2] * 3 + [1.5] * 5, 101: [2] * 3 + [1.7] * 5},  # mean 1.6: chosen
        2e-3: {100: [2] * 3 + [0.5] * 5, 101: None},  # seed 101 diverged: not eligible
    },
}
GRID = plan(VARIANTS, [5e-4, 1e-3, 2e-3], [100, 101])


def write_fake_results(results: Path, skip: SweepModel | None = None) -> None:
    for m in GRID:
        if m == skip:
            continue
        config = model_config(PRESETS["cpu"], m.lr, m.seed).to_dict()
        curve = CURVES[m.variant][m.lr][m.seed]
        if curve is None:
            record = {"variant": m.variant, "lr": m.lr, "seed": m.seed, "config": config,
                      "diverged": "training loss became nan at step 812"}
        else:
            exact = [0.0] * 7 + [0.25 if m.seed == 100 else 0.75]
            record = {"variant": m.variant, "lr": m.lr, "seed": m.seed, "config": config, "device": {"type": "cpu"},
                      "validation": {"step": STEPS, "digit_nll": curve, "exact": exact}}
        write_json(result_path(results, m), record)


def test_rule_lowest_mean_of_last_five_ties_and_divergence(tmp_path, capsys):
    results = tmp_path / "lr_sweep"
    write_fake_results(results)
    s = summarise(results, GRID, common_lr=1e-3)
    assert s["complete"] and s["finished"] == s["expected"] == 18 and s["missing"] == []
    rope = s["table"]["rope"]
    assert rope["0.0005"]["digit_nll_last"] == {"100": pytest.approx(2.0), "101": pytest.approx(1.0)}
    assert [rope[k]["mean"] for k in ("0.0005", "0.001", "0.002")] == pytest.approx([1.5, 1.3, 1.55])
    assert rope["0.001"]["mean_final_exact"] == pytest.approx(0.5)
    assert s["window_steps"] == [[300, 400, 500, 600, 700]]
    assert s["chosen"] == {"rope": 1e-3, "coca_slack": 5e-4, "coca_strict": 1e-3}
    assert s["table"]["coca_strict"]["0.002"]["diverged_seeds"] == [101]
    assert s["table"]["coca_strict"]["0.002"]["mean"] is None
    assert s["secondary"]["lr"] == 1e-3 and s["secondary"]["mean"]["rope"] == pytest.approx(1.3)

    # The tie rule on its own: equal to 3 decimals -> the smaller lr; otherwise the lowest.
    assert choose({1e-3: 1.0001, 5e-4: 1.0004}) == 5e-4
    assert choose({1e-3: 0.9994, 5e-4: 1.0004}) == 1e-3  # 0.999 < 1.000
    assert choose({2e-3: 0.5, 1e-3: 0.6}) == 2e-3
    assert choose({2e-3: float("inf"), 1e-3: float("inf")}) is None

    # Through the command: the table, the choice, the file.
    out = tmp_path / "summary.json"
    argv = ["--preset", "cpu", "--results", str(results), "--summarise", "--out", str(out)]
    assert run_main(main, argv) == 0
    printed = capsys.readouterr().out
    assert "chosen: rope 0.001, coca_slack 0.0005, coca_strict 0.001" in printed
    assert json.loads(out.read_text())["chosen"] == {"rope": 0.001, "coca_slack": 0.0005, "coca_strict": 0.001}


def test_incomplete_sweep_chooses_nothing_but_prints_the_table(tmp_path, capsys):
    results = tmp_path / "lr_sweep"
    write_fake_results(results, skip=SweepModel("coca_slack", 2e-3, 101))
    out = tmp_path / "summary.json"
    argv = ["--preset", "cpu", "--results", str(results), "--summarise", "--out", str(out)]
    assert run_main(main, argv) == 3
    printed = capsys.readouterr().out
    assert "sweep incomplete: 17 of 18 models" in printed and "rope            0.001" in printed
    s = json.loads(out.read_text())
    assert not s["complete"] and s["chosen"] == dict.fromkeys(VARIANTS)
    assert s["missing"] == ["coca_slack/lr0.002_seed101.json"]
    assert s["table"]["rope"]["0.001"]["mean"] == pytest.approx(1.3)  # the partial table is there
    assert s["table"]["coca_slack"]["0.002"]["digit_nll_last"] == {"100": pytest.approx(2.0), "101": None}


# ----------------------------------------------------------------------------- bad input

BAD = [
    (["--preset", "nope", "--work", "w", "--results", "r"], ["unknown preset"]),
    (["--preset", "smoke", "--lrs", "nan", "--work", "w", "--results", "r"], ["--lrs", "finite"]),
    (["--preset", "smoke", "--lrs", "inf", "--work", "w", "--results", "r"], ["--lrs", "finite"]),
    (["--preset", "smoke", "--lrs", "0", "--work", "w", "--results", "r"], ["--lrs", "> 0"]),
    (["--preset", "smoke", "--lrs", "-0.001", "--work", "w", "--results", "r"], ["--lrs", "> 0"]),
    (["--preset", "smoke", "--lrs", "abc", "--work", "w", "--results", "r"], ["--lrs", "invalid float"]),
    (["--preset", "smoke", "--lrs", "1e-3", "1e-3", "--work", "w", "--results", "r"], ["--lrs", "twice"]),
    (["--preset", "smoke", "--lrs", "1.2345678e-3", "--work", "w", "--results", "r"], ["6 significant"]),
    (["--preset", "smoke", "--tuning-seeds", "3", "--work", "w", "--results", "r"], ["analysis seeds", "100 101"]),
    (["--preset", "smoke", "--tuning-seeds", "100", "0", "--work", "w", "--results", "r"], ["seeds 0–9"]),
    (["--preset", "smoke", "--tuning-seeds", "-5", "--work", "w", "--results", "r"], ["non-negative"]),
    (["--preset", "smoke", "--tuning-seeds", "100", "100", "--work", "w", "--results", "r"], ["twice"]),
    (["--preset", "smoke", "--variants", "alibi", "--work", "w", "--results", "r"], ["unknown variant", "alibi"]),
    (["--preset", "smoke", "--max-minutes", "0", "--work", "w", "--results", "r"], ["--max-minutes"]),
    (["--preset", "smoke", "--results", "r"], ["--work is required"]),
    (["--preset", "smoke", "--work", "w"], ["--results", "required"]),
    (["--preset", "smoke", "--work", "w", "--results", "r", "--out", "s.json"], ["--out", "--summarise"]),
    (["--preset", "smoke", "--results", "r", "--summarise"], ["--summarise needs --out"]),
    (["--preset", "smoke", "--work", "w", "--results", "r", "--summarise", "--out", "s.json"], ["drop --work"]),
    (["--preset", "smoke", "--results", "r", "--summarise", "--out", "adir"], ["adir", "is a folder"]),
    (["--preset", "smoke", "--work", ".", "--results", "r"], ["--work", "current folder"]),
    (["--preset", "smoke", "--work", "w", "--results", "taken.txt"], ["taken.txt", "is a file"]),
    (["--preset", "smoke", "--work", "w", "--results", "other"], ["different configuration", "another --results"]),
]


@pytest.mark.parametrize("argv,words", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    (tmp_path / "taken.txt").write_text("a user's file")
    # A result of another preset where this sweep (smoke, the default grid) would write.
    m = SweepModel("rope", 5e-4, 100)
    write_json(result_path(tmp_path / "other", m), {"config": model_config(PRESETS["cpu"], m.lr, m.seed).to_dict()})
    before = snapshot(tmp_path)
    rc = run_main(main, argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    assert snapshot(tmp_path) == before
