"""Presets of the slack-versus-strict ablation: ``smoke``, ``cpu`` and ``gpu``.

One :class:`AblationConfig` fixes everything a run depends on (model shape, data, training,
evaluation, seeds). All three variants (``rope``, ``coca_slack``, ``coca_strict``) are
trained with the same config: same initial weights, same batches in the same order, same
number of steps. The config is written into ``results.json`` and into the output
directory, and a resumed run refuses to continue under a different one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from anomaly.errors import UserError

VARIANTS = ("rope", "coca_slack", "coca_strict")
"""The three models of the ablation, in the order they are trained and reported."""

SCALINGS = ("none", "ntk-2", "ntk-4", "ntk-8")
"""Evaluation-time RoPE scalings: none, and dynamic NTK with factor 2, 4 and 8."""

# Which CoCA variant of :func:`anomaly.coca.to_coca` each model uses (None: plain RoPE).
COCA_VARIANT = {"rope": None, "coca_slack": "slack", "coca_strict": "strict"}


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the from-scratch LLaMA-architecture model (an HF ``LlamaConfig``)."""

    hidden_size: int
    """Residual width."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Query heads per layer (also the key/value heads: no GQA, as in the paper's models)."""
    head_dim: int
    """Size of one head; ``head_dim / 2`` RoPE slices."""
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    vocab_size: int
    """Trimmed vocabulary: the most frequent SmolLM2 tokens of the training split, plus
    ``<unk>`` and ``<eos>`` (see :mod:`anomaly.ablation.data`)."""
    rope_theta: float = 10000.0
    """RoPE base; the paper's 10000."""


@dataclass(frozen=True)
class DataConfig:
    """What the models are trained on."""

    train_length: int
    """Training sequence length ``T`` in tokens (the paper: 512)."""
    code_share: float = 0.25
    """Share of language-model sequences cut from stdlib code; the rest is Shakespeare
    (the paper trained on 75% text, 25% code)."""
    passkey_share: float = 0.25
    """Share of training sequences that are passkey-retrieval prompts with their answer, at
    the training length (docs/conventions.md §6 format). A small model learns retrieval only if it has seen
    the format; the share is the same for all variants."""
    held_out_fraction: float = 0.15
    """Fraction of files (plays, stdlib modules) held out for evaluation, split by file
    with :func:`anomaly.corpus.split_by_file`, never by position within a file."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation; identical for every variant."""

    steps: int
    """Optimiser steps."""
    batch_size: int
    """Sequences per step (each ``train_length`` tokens)."""
    lr: float = 2e-3
    """Peak learning rate of AdamW."""
    warmup_steps: int = 50
    """Linear warm-up steps; then cosine decay to ``min_lr_ratio · lr``."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices only; norms and embeddings are not decayed)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    log_every: int = 10
    """Steps between two points of the recorded training curve."""
    checkpoint_every: int = 200
    """Steps between two checkpoints (a checkpoint is also written at the end and when a
    time limit stops the run)."""


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation: sliding-window perplexity and passkey retrieval at multiples of ``T``."""

    length_multipliers: tuple[int, ...] = (1, 2, 4, 8, 16)
    """Evaluation lengths as multiples of the training length."""
    scalings: tuple[str, ...] = SCALINGS
    """RoPE scalings applied at evaluation (dynamic NTK with original length ``T``)."""
    ppl_segments: int = 16
    """Scored segments per length. Each is ``stride`` tokens long and is scored with the
    window of the evaluation length that ends at it; the same segments are scored at every
    length, so lengths differ only in the context the model sees."""
    stride: int | None = None
    """Sliding-window stride; ``None``: the training length (the paper: stride 512 at
    training length 512)."""
    passkey_samples: int = 100
    """Passkey prompts per length (the paper: 100)."""
    batch_tokens: int = 16384
    """Tokens per forward pass at evaluation (memory bound)."""
    probe_tokens: int | None = None
    """Held-out tokens fed to :func:`anomaly.probe.probe` per trained model; ``None``: ``T``."""


@dataclass(frozen=True)
class AblationConfig:
    """Everything one ablation run depends on."""

    preset: str
    """Name of the preset this config came from."""
    model: ModelConfig
    """Model shape."""
    data: DataConfig
    """Training data."""
    train: TrainConfig
    """Optimisation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""
    model_seed: int = 0
    """Seed of the random initialisation; the same for all variants."""
    data_seed: int = 1
    """Seed of the data order and the passkey training prompts; the same for all variants."""
    eval_seed: int = 2
    """Seed of the passkey evaluation prompts; the same for all variants."""

    @property
    def eval_lengths(self) -> list[int]:
        """Evaluation lengths in tokens, ascending."""
        return sorted(m * self.data.train_length for m in self.eval.length_multipliers)

    @property
    def stride(self) -> int:
        """Sliding-window stride in tokens."""
        return self.eval.stride or self.data.train_length

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-ready)."""
        return asdict(self)

    def with_steps(self, steps: int) -> "AblationConfig":
        """The same config with a different number of training steps."""
        return replace(self, train=replace(self.train, steps=steps))


PRESETS: dict[str, AblationConfig] = {
    # End to end in about a minute on a CPU; checks the plumbing, not the science.
    "smoke": AblationConfig(
        preset="smoke",
        model=ModelConfig(hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                          intermediate_size=64, vocab_size=512),
        data=DataConfig(train_length=64),
        train=TrainConfig(steps=12, batch_size=4, warmup_steps=2, log_every=2,
                          checkpoint_every=6),
        eval=EvalConfig(ppl_segments=2, passkey_samples=2, batch_tokens=4096),
    ),
    # The largest run that fits a 2-core CPU in about half an hour, all three variants.
    # 600 steps with a 30% passkey share taught the format but no copying (passkey 0.00
    # even at 1×), so retrieval needs more passkey examples: 2000 steps, half of them.
    "cpu": AblationConfig(
        preset="cpu",
        model=ModelConfig(hidden_size=128, num_layers=4, num_heads=4, head_dim=32,
                          intermediate_size=384, vocab_size=4096),
        data=DataConfig(train_length=128, passkey_share=0.5),
        train=TrainConfig(steps=2000, batch_size=16, lr=3e-3, warmup_steps=100,
                          log_every=20, checkpoint_every=250),
        eval=EvalConfig(ppl_segments=16, passkey_samples=40, batch_tokens=8192),
    ),
    # A GPU configuration at the paper's training length; resumable, so it runs as a
    # series of commands of at most 10 minutes (--max-minutes 9).
    "gpu": AblationConfig(
        preset="gpu",
        model=ModelConfig(hidden_size=512, num_layers=8, num_heads=8, head_dim=64,
                          intermediate_size=1536, vocab_size=16384),
        data=DataConfig(train_length=512),
        train=TrainConfig(steps=20000, batch_size=32, lr=1e-3, warmup_steps=500,
                          log_every=50, checkpoint_every=500),
        eval=EvalConfig(ppl_segments=64, passkey_samples=100, batch_tokens=65536),
    ),
}


def get_preset(name: str) -> AblationConfig:
    """The preset called ``name``; a :class:`UserError` naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def config_from_dict(d: dict[str, Any]) -> AblationConfig:
    """Inverse of :meth:`AblationConfig.to_dict` (tuples restored)."""
    ev = dict(d["eval"])
    ev["length_multipliers"] = tuple(ev["length_multipliers"])
    ev["scalings"] = tuple(ev["scalings"])
    return AblationConfig(
        preset=d["preset"],
        model=ModelConfig(**d["model"]),
        data=DataConfig(**d["data"]),
        train=TrainConfig(**d["train"]),
        eval=EvalConfig(**ev),
        model_seed=d["model_seed"],
        data_seed=d["data_seed"],
        eval_seed=d["eval_seed"],
    )
