"""An ablation model's checkpoint as a model other commands can load (``python -m anomaly.probe``).

A run directory holds ``DIR/config.json`` (the :class:`AblationConfig`) and, per variant
and seed, ``DIR/<variant>/seed<s>/checkpoint/`` (``model.safetensors``, ``state.json``; see
:mod:`anomaly.ablation.run`). The model is rebuilt from the config
(:func:`anomaly.ablation.train.build_model` with its seed: a LLaMA, converted to CoCA for
the CoCA variants) and its weights read from safetensors; the text is tokenised with the
run's trimmed vocabulary (``results.json``'s ``vocab_hf_ids``, or rebuilt from the run's
token cache while the run is unfinished).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from anomaly import variants
from anomaly.ablation.config import AblationConfig, config_from_dict
from anomaly.ablation.train import CHECKPOINT, build_model, load_checkpoint, seed_dir
from anomaly.errors import UserError
from anomaly.models import LoadedModel, check_safetensors


class VocabTokenizer:
    """The run's trimmed vocabulary behind the tokenizer call the probe makes."""

    def __init__(self, vocab) -> None:
        self.vocab = vocab
        """The :class:`anomaly.ablation.data.Vocab` of the run."""

    def __call__(self, text: str, return_tensors: str | None = None, add_special_tokens: bool = False) -> dict:
        ids = self.vocab.encode(text)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else [ids]}

    def decode(self, ids) -> str:
        return self.vocab.decode([int(i) for i in ids])


SEED_DIR = re.compile(r"seed(\d+)")
"""Name of a seed's folder inside a variant's (:func:`anomaly.ablation.train.seed_dir`)."""


@dataclass(frozen=True)
class AblationCheckpoint:
    """One trained model (variant and seed) of an ablation run."""

    run: Path
    """The run directory (``config.json`` inside)."""
    variant: str
    """``"rope"``, ``"coca_slack"`` or ``"coca_strict"``."""
    seed: int
    """The training seed."""
    config: AblationConfig
    """The run's configuration."""
    lowest_of: tuple[int, ...] = ()
    """When the user named the variant's folder: the seeds found there (this is the lowest)."""

    @property
    def path(self) -> Path:
        """The checkpoint directory."""
        return seed_dir(self.run, self.variant, self.seed) / CHECKPOINT

    @property
    def note(self) -> str:
        """What was loaded, in one line (the probe records it)."""
        note = f"ablation model {self.variant}, seed {self.seed} ({self.config.preset} preset)"
        if self.lowest_of:
            note += (f"; {self.run / self.variant} holds seeds {', '.join(map(str, self.lowest_of))}, "
                     "the lowest was taken")
        return note

    def hf_config(self):
        """The model's HF config (the model is small: built, not loaded)."""
        return build_model(self.config, self.variant, self.seed).config

    def tokenizer(self) -> VocabTokenizer:
        """The run's trimmed vocabulary (from ``results.json``, else rebuilt from its cache)."""
        from anomaly.ablation.data import Vocab, build_data

        results = self.run / "results.json"
        if results.exists():
            return VocabTokenizer(Vocab(hf_ids=tuple(json.loads(results.read_text())["vocab_hf_ids"])))
        return VocabTokenizer(build_data(self.config, self.run / "cache").vocab)

    def load(self, device: torch.device, dtype: torch.dtype, tokenizer=None) -> LoadedModel:
        """The trained model in eval mode on ``device`` in ``dtype``."""
        model = build_model(self.config, self.variant, self.seed)
        load_checkpoint(self.path, model)
        return LoadedModel(
            model=model.to(device=device, dtype=dtype).eval(), tokenizer=tokenizer or self.tokenizer(),
            name=str(self.path), source=str(self.path), note=self.note,
        )


def _is_checkpoint(path: Path) -> bool:
    return (path / "model.safetensors").is_file() and (path / "state.json").is_file()


def _seeds_in(variant_dir: Path) -> list[int]:
    """Seeds with a checkpoint in a variant's folder, ascending."""
    if not variant_dir.is_dir():
        return []
    found = (SEED_DIR.fullmatch(d.name) for d in variant_dir.iterdir())
    return sorted(int(m[1]) for m in found if m and _is_checkpoint(variant_dir / m[0] / CHECKPOINT))


def find_checkpoint(name_or_path: str) -> AblationCheckpoint | None:
    """The ablation checkpoint at ``name_or_path``, or ``None`` when it is not one.

    Accepts ``DIR/<variant>/seed<s>/checkpoint``, ``DIR/<variant>/seed<s>``, and
    ``DIR/<variant>`` (the lowest seed there; the checkpoint's :attr:`~AblationCheckpoint.note`
    says so).

    Raises:
        UserError: it looks like one but does not sit in ``DIR/<variant>/seed<s>/``, or its
            run's ``config.json`` is missing or unreadable.
    """
    path = Path(name_or_path).expanduser()
    lowest_of: tuple[int, ...] = ()
    if path.name in variants.REGISTRY and not _is_checkpoint(path / CHECKPOINT) and _seeds_in(path):
        lowest_of = tuple(_seeds_in(path))
        path = seed_dir(path.parent, path.name, lowest_of[0])
    if path.name != CHECKPOINT:
        path = path / CHECKPOINT
    if not _is_checkpoint(path):
        return None
    seed, variant, run = SEED_DIR.fullmatch(path.parent.name), path.parent.parent.name, path.parent.parent.parent
    if seed is None or variant not in variants.REGISTRY:
        raise UserError(f"{path} looks like an ablation checkpoint but does not sit in <run>/<variant>/seed<s>/ "
                        f"(variants: {', '.join(variants.REGISTRY)}); point at a checkpoint of a complete run directory")
    try:
        config = config_from_dict(json.loads((run / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is an ablation checkpoint, but its run's {run / 'config.json'} "
                        f"cannot be read ({type(exc).__name__}); point at a complete run directory") from None
    # Before any work: a checkpoint cut short (a copy interrupted, a full disk) is one line.
    check_safetensors(path / "model.safetensors")
    try:
        json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path / 'state.json'} ({type(exc).__name__}); the checkpoint is "
                        "incomplete: point at another seed, or rerun the ablation to rewrite it") from None
    return AblationCheckpoint(run=run, variant=variant, seed=int(seed[1]), config=config, lowest_of=lowest_of)
