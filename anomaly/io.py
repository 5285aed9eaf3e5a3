"""Atomic outputs and provenance records.

Every file the toolkit writes goes through here: written under a temporary name in the
same directory, then renamed, so an interrupted run never leaves a file (or an output
directory) that looks complete.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():
            os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp's 0600 is for the temporary only
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    """The process's umask (read by setting it and setting it back), which a temporary file or
    folder renamed into place must be given explicitly (``mkstemp``/``mkdtemp`` make them
    private). Shared by the toolkit's writers (:mod:`anomaly.outputs`)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


FLOAT_DIGITS = 6
"""Significant digits of the floats :func:`write_json` writes by default: enough for every
number the toolkit reports, and few enough that float32 noise (~1e-7 relative, which
differs between CPUs and thread counts) does not show up as a change on regeneration."""


def _jsonable(obj: Any, digits: int | None) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj), digits)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, digits) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return _jsonable(obj.tolist(), digits)
    if isinstance(obj, float):
        if obj != obj:
            return None  # NaN is not JSON
        if digits is not None and math.isfinite(obj):
            return float(f"{obj:.{digits}g}")
    if isinstance(obj, Path):
        return obj.as_posix()
    return obj


def write_json(path: str | os.PathLike, obj: Any, digits: int | None = FLOAT_DIGITS) -> Path:
    """Write ``obj`` (dataclasses, arrays and tensors allowed) as indented JSON, atomically.

    Floats are rounded to ``digits`` significant digits (``None``: written exactly), so
    the same result always gives the same bytes.
    """
    text = json.dumps(_jsonable(obj, digits), indent=2, allow_nan=True)
    return write_text(path, text + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a whole directory under a temporary name; swap it in on success.

    An existing directory at ``path`` is replaced, with everything in it, once the new one
    is complete: only for directories the caller wholly owns (a checkpoint inside a run
    folder). Folders a user names go through :mod:`anomaly.outputs`, which never removes
    files it did not write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 is for the temporary only
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:  # a failed swap (or Ctrl-C) puts the previous one back
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Provenance:
    """What a result depends on: enough to regenerate it, and nothing that changes when it
    is merely regenerated (no dates, no git state, no machine paths), so rerunning a
    command on the same inputs rewrites the same bytes (docs/architecture.md, "Outputs").
    """

    command: str
    """The command line or notebook that produced the result."""
    model: str | None = None
    """Model name, hub id or path; ``None`` for analytic results."""
    seed: int | list[int] | None = None
    """Random seed (or seeds), when randomness was involved."""
    code: dict[str, str] = field(default_factory=dict)
    """Source file (relative to the repository) -> first 12 hex digits of its SHA-256, for
    every toolkit file the producer imports (:func:`code_version`)."""
    versions: dict[str, str] = field(default_factory=lambda: _versions())
    """Python, torch, transformers, numpy, matplotlib, seaborn and anomaly versions (those loaded)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything else the producer wants on record (settings, device, dtype)."""

    @classmethod
    def from_argv(cls, **kwargs: Any) -> "Provenance":
        """Provenance of this process: its command line and the code of its main module."""
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        module = spec.name.removesuffix(".__main__") if spec is not None else None
        head = ["python", "-m", module] if module else ["python", sys.argv[0]]
        kwargs.setdefault("command", " ".join(head + sys.argv[1:]))
        if module and module.split(".")[0] == "anomaly":
            kwargs.setdefault("code", code_version(spec.name))
        return cls(**kwargs)


def code_version(*modules: str) -> dict[str, str]:
    """Content hashes of the toolkit source files that ``modules`` import, directly or not.

    The imports are read from the source (``ast``), function-level ones included, so the
    answer depends only on the files, not on what happens to be imported in this process.
    Returns ``{"anomaly/figures.py": "<12 hex digits>", ...}`` sorted by path.
    """
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen or name.split(".")[0] != "anomaly":
            continue
        rel = Path(*name.split("."))
        path = next((p for p in (REPO_ROOT / rel.with_suffix(".py"), REPO_ROOT / rel / "__init__.py")
                     if p.is_file()), None)
        if path is None:
            continue  # ``from anomaly.x import some_function``: the candidate was not a module
        seen[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        package = parts if path.name == "__init__.py" else parts[:-1]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1] if node.level else [])
                mod = ".".join(x for x in (base, node.module or "") if x)
                todo += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return {
        p.relative_to(REPO_ROOT).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:12]
        for p in sorted(seen.values())
    }


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "numpy", "matplotlib", "seaborn"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    from anomaly import __version__

    out["anomaly"] = __version__
    return out
