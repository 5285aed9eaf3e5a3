"""Which documents the atlas probes: prose (Shakespeare's plays) and code (the Python
standard library) from the bundled corpora (:mod:`anomaly.corpus`).

Each document gives one window, its first ``T`` tokens, so the texts are independent
draws from their corpus and no two windows share text. The documents are taken in an order
fixed by a seed (a hash of seed and name: the same on every machine with the same corpus),
and a document is kept when it is long enough for every model at the longest length that
model probes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Sequence

from anomaly.corpus import Document, shakespeare_plays, stdlib_sources
from anomaly.errors import UserError

KINDS = {"prose": shakespeare_plays, "code": stdlib_sources}
"""Text kind → the corpus it is drawn from."""


@dataclass(frozen=True)
class Text:
    """One document the atlas probes, as drawn."""

    document: Document
    """The corpus document (its name, e.g. ``plays/tragedies/hamlet.md``, and file)."""
    kind: str
    """``"prose"`` or ``"code"``."""
    sha256: str
    """Of the document's bytes: a rerun on another machine can check it read the same text."""

    @property
    def name(self) -> str:
        return self.document.name

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "sha256": self.sha256}

    @classmethod
    def from_json(cls, data: dict) -> "Text":
        """The text an ``atlas.json`` records, found again in this machine's corpus; refused
        (one line) where the corpus lacks it or holds other bytes under its name."""
        doc = next((d for d in KINDS[data["kind"]]() if d.name == data["name"]), None)
        if doc is None:
            raise UserError(f"{data['name']} is not in the bundled {data['kind']} corpus here; "
                            "reinstall the corpora (python3 dev.py test sets them up)")
        text = cls(doc, data["kind"], _sha256(doc))
        if text.sha256 != data["sha256"]:
            raise UserError(f"{data['name']} here differs from the one the atlas probed (SHA-256); "
                            "its readings belong to another version of the corpus")
        return text


def _sha256(doc: Document) -> str:
    """Of the document's bytes (:attr:`Text.sha256`)."""
    return hashlib.sha256(doc.path.read_bytes()).hexdigest()


def _order(seed: int, name: str) -> str:
    return hashlib.sha256(f"{seed}:{name}".encode()).hexdigest()


def choose_texts(per_kind: int, long_enough: Callable[[str], bool], seed: int = 0,
                 kinds: Sequence[str] = tuple(KINDS)) -> list[Text]:
    """``per_kind`` documents of each kind for which ``long_enough(text)`` holds, in the
    seed's order. Refuses (one line) when a corpus has too few long documents."""
    chosen = []
    for kind in kinds:
        docs = sorted(KINDS[kind](), key=lambda d: _order(seed, d.name))
        found = []
        for doc in docs:
            text = doc.read()
            if long_enough(text):
                found.append(Text(doc, kind, _sha256(doc)))
                if len(found) == per_kind:
                    break
        if len(found) < per_kind:
            raise UserError(f"only {len(found)} {kind} documents are long enough for the longest --tokens; "
                            f"ask for fewer --texts or shorter --tokens")
        chosen += found
    return chosen
