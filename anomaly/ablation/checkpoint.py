"""An ablation model's checkpoint as a model other commands can load (``python -m anomaly.probe``).

A run directory holds ``DIR/config.json`` (the :class:`AblationConfig`) and, per variant,
``DIR/<variant>/checkpoint/`` (``model.safetensors``, ``state.json``; see
:mod:`anomaly.ablation.run`). The model is rebuilt from the config
(:func:`anomaly.ablation.train.build_model`: a LLaMA, converted to CoCA for the CoCA
variants) and its weights read from safetensors; the text is tokenised with the run's
trimmed vocabulary (``results.json``'s ``vocab_hf_ids``, or rebuilt from the run's token
cache while the run is unfinished).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from anomaly.ablation.config import VARIANTS, AblationConfig, config_from_dict
from anomaly.ablation.train import CHECKPOINT, build_model, load_checkpoint
from anomaly.errors import UserError
from anomaly.models import LoadedModel


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


@dataclass(frozen=True)
class AblationCheckpoint:
    """One trained variant of an ablation run."""

    run: Path
    """The run directory (``config.json`` inside)."""
    variant: str
    """``"rope"``, ``"coca_slack"`` or ``"coca_strict"``."""
    config: AblationConfig
    """The run's configuration."""

    @property
    def path(self) -> Path:
        """The checkpoint directory."""
        return self.run / self.variant / CHECKPOINT

    def hf_config(self):
        """The model's HF config (the model is small: built, not loaded)."""
        return build_model(self.config, self.variant).config

    def tokenizer(self) -> VocabTokenizer:
        """The run's trimmed vocabulary (from ``results.json``, else rebuilt from its cache)."""
        from anomaly.ablation.data import Vocab, build_data

        results = self.run / "results.json"
        if results.exists():
            return VocabTokenizer(Vocab(hf_ids=tuple(json.loads(results.read_text())["vocab_hf_ids"])))
        return VocabTokenizer(build_data(self.config, self.run / "cache").vocab)

    def load(self, device: torch.device, dtype: torch.dtype, tokenizer=None) -> LoadedModel:
        """The trained model in eval mode on ``device`` in ``dtype``."""
        model = build_model(self.config, self.variant)
        load_checkpoint(self.path, model)
        return LoadedModel(
            model=model.to(device=device, dtype=dtype).eval(), tokenizer=tokenizer or self.tokenizer(),
            name=str(self.path), source=str(self.path),
            note=f"ablation model {self.variant} ({self.config.preset} preset)",
        )


def find_checkpoint(name_or_path: str) -> AblationCheckpoint | None:
    """The ablation checkpoint at ``name_or_path`` (``DIR/<variant>/checkpoint`` or
    ``DIR/<variant>``), or ``None`` when it is not one.

    Raises:
        UserError: it looks like one but its run's ``config.json`` is missing or unreadable.
    """
    path = Path(name_or_path).expanduser()
    if path.name != CHECKPOINT:
        path = path / CHECKPOINT
    if not (path / "model.safetensors").is_file() or not (path / "state.json").is_file():
        return None
    variant, run = path.parent.name, path.parent.parent
    if variant not in VARIANTS:
        raise UserError(f"{path} looks like an ablation checkpoint but sits in {path.parent.name!r}, "
                        f"not in a variant folder ({', '.join(VARIANTS)})")
    try:
        config = config_from_dict(json.loads((run / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is an ablation checkpoint, but its run's {run / 'config.json'} "
                        f"cannot be read ({type(exc).__name__}); point at a complete run directory") from None
    return AblationCheckpoint(run=run, variant=variant, config=config)
