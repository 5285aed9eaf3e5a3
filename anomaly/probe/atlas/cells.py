"""The atlas's saved cells: each probe's readings on disk as soon as it is measured, so an
atlas that was stopped (a full one takes hours on a few cores) resumes where it stopped.

A *cell* is one probe: a model on the first ``T`` tokens of one text. Its file in
:data:`CELLS` (a folder of the output folder, claimed like the atlas's other names through
:mod:`anomaly.outputs`) holds its :class:`~anomaly.probe.atlas.readings.Readings` (floats
exact, so a reused cell gives the same ``atlas.json`` as a fresh one) and the
:class:`CellKey` they were measured under. A rerun reuses a cell only when the whole key
matches; otherwise it measures it again and replaces the file, which is the command's own.

The key names everything the readings depend on:

* the model's identity (:func:`model_identity`): what the name resolves to and the bytes
  of its weights (a bundled file's recorded digest, else a SHA-256 of the files);
* the text's SHA-256, the number of tokens and the SHA-256 of the token ids themselves
  (so a changed tokenizer or windowing shows even when the text did not change);
* the dtype and the device type;
* the code (:func:`code_key`): :func:`anomaly.io.code_version` of the loading and of
  :func:`~anomaly.probe.atlas.readings.measure`, i.e. every toolkit file the probe runs, and
  the versions of torch, transformers and numpy. A hash rather than a hand-bumped version
  number: ``atlas.json``'s provenance names that same code, so a reused cell was measured
  by exactly the code the provenance claims, and nobody has to remember to bump anything.
  The price: any edit to those files (a docstring included) measures every cell again, so
  a long atlas runs from a worktree at a fixed commit (as the committed one did); the
  command says which part of a stale key differs (:meth:`CellStore.stale`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from anomaly.errors import UserError
from anomaly.io import code_version, write_json
from anomaly.probe.atlas.readings import Readings

CELLS = "atlas_cells"
"""The folder of saved cells inside the atlas's output folder."""
WRITER = "anomaly.probe.atlas"
"""Recorded in every cell file: a file without it is not a cell and is never replaced."""
FORMAT = 2
"""The cell file's layout (part of the key): bump it when :class:`CellKey` or the file changes."""
CODE_MODULES = ("anomaly.models", "anomaly.probe.atlas.readings")
"""The modules whose source files (with everything they import) make a cell's code key."""
LIBRARIES = ("torch", "transformers", "numpy")


@dataclass(frozen=True)
class CellKey:
    """Everything one cell's readings depend on; equal keys, equal readings."""

    model: str
    """The model as the user named it (``--models``)."""
    identity: dict
    """:func:`model_identity` of that name."""
    text: str
    """The text's corpus name."""
    text_sha256: str
    tokens: int
    """``T``."""
    ids_sha256: str
    """Of the ``[T]`` int64 token ids probed."""
    dtype: str
    device: str
    """Device type: ``"cpu"`` or ``"cuda"``."""
    code: dict[str, str]
    """:func:`code_key`."""
    format: int = FORMAT

    def to_json(self) -> dict:
        return asdict(self)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(name: str) -> dict:
    """What ``name`` loads (the resolution of :func:`anomaly.models.load_model`) and the
    bytes of its weights: a bundled model by its package and the SHA-256 recorded for it (a
    chunked file is checked against it when assembled), or of its file; a ``.gguf`` file or
    an HF folder by the SHA-256 of each file; a hub model by the revision in the local
    cache (``None`` where it is not cached)."""
    from anomaly.bundled import BUNDLED_MODELS, bundled_file
    from anomaly.models import MODELS

    if name in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[name]
        folder, file = bundled_file(name)
        return {"bundled": bundled.source, "size": (folder / file).stat().st_size,
                "sha256": bundled.sha256 or _sha256(folder / file)}
    path = Path(name).expanduser()
    if path.is_file():
        return {"file": path.name, "size": path.stat().st_size, "sha256": _sha256(path)}
    if path.is_dir():
        return {"folder": {p.name: _sha256(p) for p in sorted(path.iterdir()) if p.is_file()}}
    hub = MODELS.get(name, name)
    return {"hub": hub, "revision": _cached_revision(hub)}


def _cached_revision(hub_id: str) -> str | None:
    """The snapshot (commit) of ``hub_id`` in the local HF cache, read offline."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id, "config.json")
    return Path(found).parent.name if isinstance(found, str) else None


def code_key() -> dict[str, str]:
    """Source file → hash of the code that loads a model and measures a cell, and
    ``"version:<library>"`` → the version of each library in :data:`LIBRARIES`."""
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__}
    return {**code_version(*CODE_MODULES), **{f"version:{k}": versions[k] for k in LIBRARIES}}


def ids_sha256(ids: torch.Tensor) -> str:
    """SHA-256 of ``[T]`` token ids as little-endian int64."""
    return hashlib.sha256(np.asarray(ids.cpu(), dtype="<i8").tobytes()).hexdigest()


def _slug(text: str, limit: int) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_.")[-limit:] or "x"


def file_name(model: str, text: str, tokens: int) -> str:
    """The cell's file in :data:`CELLS`: readable parts, made unique by a hash of the whole
    (model names may be paths, text names hold slashes)."""
    digest = hashlib.sha256(f"{model}\0{text}\0{tokens}".encode()).hexdigest()[:10]
    return f"{_slug(model, 40)}--{_slug(text, 60)}--{tokens}-{digest}.json"


@dataclass(frozen=True)
class CellStore:
    """The saved cells in ``folder`` (``OUT/atlas_cells``)."""

    folder: Path

    def path(self, key: CellKey) -> Path:
        return self.folder / file_name(key.model, key.text, key.tokens)

    def check(self, keys: list[CellKey]) -> None:
        """Refuse, before any work, a run that would replace a file it did not write: the
        folder must be a folder, and each cell's path a cell file of this command or absent."""
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"--out {self.folder.parent}: {CELLS} is not a folder; move it away or "
                            "choose another --out")
        for key in keys:
            path = self.path(key)
            if (path.exists() or path.is_symlink()) and self._read(path) is None:
                raise UserError(f"--out {self.folder.parent}: {CELLS}/{path.name} is not a cell this command "
                                f"wrote; it is left alone: move it away or choose another --out")

    def load(self, key: CellKey) -> Readings | None:
        """The readings saved under exactly ``key``, else ``None`` (none saved, or another key)."""
        data = self._read(self.path(key))
        if data is None or data["key"] != key.to_json():
            return None
        return Readings.from_json(data["readings"])

    def stale(self, key: CellKey) -> str | None:
        """Why the cell saved for ``key``'s model, text and length is not reused: the parts of
        its key that differ (``"code (anomaly/probe/sweep.py)"``); ``None`` if none is saved
        or it matches."""
        data = self._read(self.path(key))
        if data is None:
            return None
        old, new = data["key"], key.to_json()
        parts = [name for name in new if old.get(name) != new[name]]
        if "code" in parts and isinstance(old.get("code"), dict):
            files = sorted(f for f in {*old["code"], *new["code"]} if old["code"].get(f) != new["code"].get(f))
            parts[parts.index("code")] = f"code ({', '.join(files)})"
        return ", ".join(parts) or None

    def save(self, key: CellKey, readings: Readings) -> Path:
        """Write the cell atomically (floats exact), replacing this command's previous one."""
        record = {"written_by": WRITER, "key": key.to_json(), "readings": readings.to_json()}
        return write_json(self.path(key), record, digits=None)

    @staticmethod
    def _read(path: Path) -> dict | None:
        """The cell file at ``path`` if it is one this command wrote, else ``None``."""
        if path.is_symlink() or not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        ok = isinstance(data, dict) and data.get("written_by") == WRITER and {"key", "readings"} <= data.keys()
        return data if ok else None
