"""The ablation under ``torchrun`` (PyTorch DDP, gloo on the CPU) against one process.

Two processes share every batch of the smoke preset (4 sequences, 2 each); their run must
train and score the same models as the one-process smoke run (the ``smoke_run`` fixture),
and only rank 0 may touch the output folder. The workers run this file as their script
(``__main__`` below): the ablation command under an audit hook that records every change
the process makes to the file system under ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

PRESET = ["--preset", "smoke", "--no-probe", "--no-figures"]
AUDIT = "ABLATION_AUDIT"
"""Environment variable: the folder where each worker writes ``rank<r>.json``, the list of
its file-system changes under ``--out``."""
MUTATING = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.truncate", "os.symlink", "os.link", "os.chmod",
            "os.utime", "shutil.copyfile", "shutil.copytree", "shutil.move", "shutil.rmtree", "tempfile.mkdtemp",
            "tempfile.mkstemp"}
"""Audit events (Python's audit events table, :func:`sys.audit`) that change the file
system; ``open`` counts when it opens for writing. ``os.replace`` raises ``os.rename``."""
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _under(out: Path, arg) -> bool:
    if not isinstance(arg, (str, bytes, os.PathLike)):
        return False
    path = Path(os.path.abspath(os.fsdecode(arg)))
    return path == out or out in path.parents


def _audited_main() -> int:
    """``python -m anomaly.ablation`` with every change under ``--out`` recorded."""
    out = Path(os.path.abspath(sys.argv[sys.argv.index("--out") + 1]))
    changes: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and bool(set(mode) & set("wax+"))) or bool((flags or 0) & WRITE_FLAGS)
            if writing and _under(out, path):
                changes.append(f"open {os.fsdecode(path)}")
        elif event in MUTATING and any(_under(out, a) for a in args):
            changes.append(f"{event} {args[0]}")

    sys.addaudithook(hook)
    from anomaly.ablation.__main__ import main
    from anomaly.cli import run_main

    try:
        return run_main(main, sys.argv[1:])
    finally:
        record = Path(os.environ[AUDIT]) / f"rank{os.environ['RANK']}.json"
        record.write_text(json.dumps(changes, indent=1))


def _torchrun(nproc: int, out: Path, audit: Path, *extra: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node nproc`` of the audited command (the venv's
    torchrun; ``--standalone`` picks a free port)."""
    audit.mkdir(exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", AUDIT: str(audit)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *extra,
           __file__, *PRESET, "--out", str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, Path]:
    """The smoke preset (no probe, no figures) trained by two processes: (DIR, process, audit folder)."""
    tmp = tmp_path_factory.mktemp("ddp")
    out, audit = tmp / "run", tmp / "audit"
    return out, _torchrun(2, out, audit), audit


def test_torchrun_exits_cleanly_and_only_rank_0_writes(ddp_run):
    out, proc, audit = ddp_run
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "Traceback" not in output and "error:" not in output
    assert (out / "results.json").is_file()
    assert output.count("[rope seed 0] training") == 1  # rank 1 logs nothing
    changes = {r: json.loads((audit / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert changes[1] == []
    # The control: the audit does see the run's writes (config, checkpoints, evaluations).
    for name in ("config.json", "checkpoint", "eval_none.json", "results.json"):
        assert any(name in c for c in changes[0]), name


def test_torchrun_trains_and_scores_as_one_process(ddp_run, smoke_run):
    out, proc, _ = ddp_run
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    two, one = _results(out), _results(smoke_run)
    assert two["config"] == one["config"] and two["seeds"] == one["seeds"]
    assert "anomalous_fraction" not in two or not two["anomalous_fraction"]  # --no-probe
    for v in one["variants"]:
        for s in one["scalings"]:
            np.testing.assert_allclose(two["ppl_per_seed"][v][s], one["ppl_per_seed"][v][s], rtol=1e-3)
            np.testing.assert_allclose(two["digit_nll_per_seed"][v][s], one["digit_nll_per_seed"][v][s], rtol=1e-3)
        for seed, a, b in zip(one["seeds"], two["training"][v], one["training"][v]):
            assert a["steps"] == b["steps"] and a["curve"]["step"] == b["curve"]["step"]
            np.testing.assert_allclose(a["curve"]["loss"], b["curve"]["loss"], rtol=1e-4)
            assert a["curve"]["lr"] == b["curve"]["lr"]
            assert a["val"]["step"] == b["val"]["step"] and a["val"]["exact"] == b["val"]["exact"]
            np.testing.assert_allclose(a["val"]["digit_nll"], b["val"]["digit_nll"], rtol=1e-3)
            assert a["criterion_step"] == b["criterion_step"]
            # Each prompt's retrieval: the models differ only by rounding, far below any
            # arg-max margin that decides an answer token (the digit losses show how close).
            for scaling in one["scalings"]:
                ea = json.loads((out / v / f"seed{seed}" / f"eval_{scaling}.json").read_text())
                eb = json.loads((smoke_run / v / f"seed{seed}" / f"eval_{scaling}.json").read_text())
                assert ea["passkey_exact"] == eb["passkey_exact"], (v, seed, scaling)
                np.testing.assert_allclose(ea["passkey_digit_nll"], eb["passkey_digit_nll"], rtol=1e-3)
        assert [r["head"] for r in two["retrieval"][v]] == [r["head"] for r in one["retrieval"][v]]


def test_uneven_split_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    """In process, as rank 0 of 3: one line, exit 2, no output folder."""
    from anomaly.ablation.__main__ import main
    from anomaly.cli import run_main

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    # What torchrun sets besides (without them, WORLD_SIZE=3 is refused as a leftover).
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    out = tmp_path / "run"
    assert run_main(main, [*PRESET, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "does not split over 3 processes" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_torchrun_with_an_uneven_split_fails_with_one_line(tmp_path):
    """Under torchrun the workers fail with the one-line error and exit 2 (torchrun itself
    then reports the failed workers and exits 1), before writing anything."""
    out, logs = tmp_path / "run", tmp_path / "logs"
    proc = _torchrun(3, out, tmp_path / "audit", "--log-dir", str(logs), "--redirects", "3")
    assert proc.returncode != 0
    assert "exitcode  : 2" in proc.stderr  # torchrun's report of the first failed worker
    # Rank 0 recorded the line in torchrun's error file: the report's root cause shows it
    # (instead of "To enable traceback see …").
    assert "traceback : error: the batch of" in proc.stderr and "does not split over 3" in proc.stderr
    errors = [p.read_text().strip() for p in logs.rglob("stderr.log")]
    failed = [e for e in errors if e]  # only rank 0 prints: the others wait and are stopped
    assert len(failed) == 1
    for e in failed:
        assert e.startswith("error:") and "does not split over 3 processes" in e and len(e.splitlines()) == 1, e
    assert not out.exists()


if __name__ == "__main__":
    raise SystemExit(_audited_main())
