"""Presets of the slack-versus-strict ablation: ``smoke``, ``cpu``, ``cpu-seeds`` and ``gpu``.

One :class:`AblationConfig` fixes everything a run depends on (model shape, data, training,
evaluation, seeds). All three variants (``rope``, ``coca_slack``, ``coca_strict``) are
trained with the same config, once per seed: for one seed every variant starts from the same
initial weights and sees the same batches in the same order for the same number of steps.
Only the peak learning rate may differ between variants (``train.lr_by_variant``).
The config is written into ``results.json`` and into the output directory, and a resumed
run refuses to continue under a different one.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from anomaly import variants
from anomaly.errors import UserError
from anomaly.io import write_json

VARIANTS = variants.names()
"""The models of the ablation, in the order they are trained and reported: the variants of
:data:`anomaly.variants.REGISTRY` when this module was imported (code reads
:func:`anomaly.variants.names`, which also sees a variant registered later)."""

SCALINGS = ("none", "ntk-2", "ntk-4", "ntk-8")
"""Evaluation-time RoPE scalings: none, and dynamic NTK with factor 2, 4 and 8."""


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
    coca_init_gain: float = 1.0
    """Factor on the initial weights of ``q_proj`` and ``k_proj`` (the T projection) of the
    CoCA variants only (1: the same initial weights as RoPE). CoCA's score is cubic in these
    weights (``t·|q|²``) where RoPE's is quadratic (``q·k``): at equal initial weights its
    scores start about 5× smaller. A diagnostic (docs/ablation.md), not a preset setting."""


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
    the training length (docs/conventions.md §6 format). A small model learns retrieval only
    if it has seen the format; the share is the same for all variants."""
    held_out_fraction: float = 0.15
    """Fraction of files (plays, stdlib modules) held out for evaluation, split by file
    with :func:`anomaly.corpus.split_by_file`, never by position within a file."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation; identical for every variant, except the peak learning rate where
    ``lr_by_variant`` gives each variant its own."""

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
    val_every: int = 100
    """Steps between two validations: digit loss and exact passkey match at ``T`` on the
    validation prompts (never the evaluation prompts), tracked through training."""
    val_prompts: int = 64
    """Validation prompts (random depth) at the training length."""
    criterion: float = 0.9
    """Exact-match rate on the validation prompts at which a model counts as retrieving.
    The weights at the first validation that reaches it are kept (``criterion/``) and
    evaluated as the "to criterion" reading; training itself always runs ``steps``."""
    lr_by_variant: tuple[tuple[str, float], ...] = ()
    """Each variant's own peak learning rate, ``((variant, lr), …)`` naming every variant
    once (``--lr-from`` reads them from the learning-rate sweep's summary); empty: ``lr``
    for every variant (the same-learning-rate-for-all reading)."""
    matched_steps: int | None = None
    """The matched-stage reading: the weights ``matched_steps`` steps after the criterion
    step are kept (``matched/``) and evaluated without scaling, when that step lies within
    ``steps``; ``None``: no such snapshot (docs/ablation.md, "The analysis run")."""


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
    """Passkey prompts per (length, depth) cell and seed (the paper: 100 per length)."""
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    """Depths of the key sentence in the filler, 0 (start) … 1 (just before the question)."""
    batch_tokens: int = 16384
    """Tokens per forward pass at evaluation (memory bound)."""
    retrieval_samples: int = 4
    """Prompts per (length, depth) whose attention maps find and follow the retrieval head
    (:mod:`anomaly.ablation.retrieval`)."""
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
    seeds: tuple[int, ...] = (0,)
    """Training seeds. Seed ``s`` fixes the initial weights (``torch.manual_seed(s)``) and the
    order of the training sequences and their passkey prompts; every variant is trained once
    per seed, and a seed's variants share both."""
    data_seed: int = 1
    """Seed of the text and code stream (hence of the vocabulary); the same for all seeds."""
    eval_seed: int = 2
    """Seed of the passkey evaluation prompts; the same for all variants and seeds."""
    val_seed: int = 3
    """Seed of the passkey validation prompts (recipe choice, criterion), never evaluated on."""
    cpu_threads: int | None = None
    """Torch threads on a CPU (``None``: torch's default, one per core). Pinning it makes the
    numbers independent of the machine's core count (a float sum split over more threads
    rounds differently), and on a small machine several one-thread runs in parallel
    (``--variants``) beat one run with many threads."""

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

    def with_seeds(self, n: int) -> "AblationConfig":
        """The same config trained from seeds ``0 … n−1``."""
        return replace(self, seeds=tuple(range(n)))

    def lr_of(self, variant: str) -> float:
        """The peak learning rate ``variant`` trains with: its ``lr_by_variant`` entry, or
        ``train.lr`` when there is none."""
        return dict(self.train.lr_by_variant).get(variant, self.train.lr)

    def for_variant(self, variant: str) -> "AblationConfig":
        """The config ``variant`` is trained with: ``train.lr`` set to :meth:`lr_of` and no
        ``lr_by_variant`` (what :func:`~anomaly.ablation.train.train` reads); ``self`` when
        there is no per-variant learning rate."""
        if not self.train.lr_by_variant:
            return self
        return replace(self, train=replace(self.train, lr=self.lr_of(variant), lr_by_variant=()))


PRESETS: dict[str, AblationConfig] = {
    # A plumbing check of every step (two seeds, intervals, criterion, retrieval head,
    # probe, figures) in about a minute on a CPU. Its numbers mean nothing: the model is
    # tiny, sees 48 sequences, and its 512-id vocabulary maps ~30% of the text to <unk>.
    "smoke": AblationConfig(
        preset="smoke",
        model=ModelConfig(hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
                          intermediate_size=64, vocab_size=512),
        data=DataConfig(train_length=64),
        train=TrainConfig(steps=12, batch_size=4, warmup_steps=2, log_every=2,
                          checkpoint_every=6, val_every=6, val_prompts=8),
        eval=EvalConfig(ppl_segments=2, passkey_samples=2, batch_tokens=4096, retrieval_samples=1),
        seeds=(0, 1),
    ),
    # The recipe was chosen on validation prompts (docs/ablation.md): two layers at lr 1e-3,
    # half the sequences passkey prompts; the earlier 4 layers at lr 3e-3 taught no model to
    # retrieve. One thread: about 2 h as one process, 84 min as three --variants runs on 2 cores.
    "cpu": AblationConfig(
        preset="cpu",
        model=ModelConfig(hidden_size=128, num_layers=2, num_heads=4, head_dim=32,
                          intermediate_size=384, vocab_size=4096),
        data=DataConfig(train_length=128, passkey_share=0.5),
        train=TrainConfig(steps=3000, batch_size=16, lr=1e-3, warmup_steps=100,
                          log_every=20, checkpoint_every=250, val_every=100),
        eval=EvalConfig(ppl_segments=16, passkey_samples=40, batch_tokens=8192),
        seeds=(0, 1, 2),
        cpu_threads=1,
    ),
    # The pre-registered 10-seed analysis run (docs/ablation.md, "The analysis run"): the cpu
    # preset's model, data and training (the learning-rate sweep tuned them; --lr-from gives
    # each variant its chosen lr), seeds 0-9, the matched-stage snapshot 500 steps after the
    # criterion, and the evaluation trimmed to what a per-seed value needs: 1x-8x (no 16x),
    # 20 prompts x 5 depths per length (a per-seed share's SE <= 0.05), 2 retrieval prompts.
    "cpu-seeds": AblationConfig(
        preset="cpu-seeds",
        model=ModelConfig(hidden_size=128, num_layers=2, num_heads=4, head_dim=32,
                          intermediate_size=384, vocab_size=4096),
        data=DataConfig(train_length=128, passkey_share=0.5),
        train=TrainConfig(steps=3000, batch_size=16, lr=1e-3, warmup_steps=100,
                          log_every=20, checkpoint_every=250, val_every=100, matched_steps=500),
        eval=EvalConfig(length_multipliers=(1, 2, 4, 8), ppl_segments=16, passkey_samples=20,
                        batch_tokens=8192, retrieval_samples=2),
        seeds=tuple(range(10)),
        cpu_threads=1,
    ),
    # Sized (by estimate, not yet measured) so that 3 variants × 3 seeds train and evaluate
    # in about 8 minutes on one H100/H200; resumable, so it also runs as a series of
    # shorter commands (--max-minutes).
    "gpu": AblationConfig(
        preset="gpu",
        model=ModelConfig(hidden_size=256, num_layers=4, num_heads=4, head_dim=64,
                          intermediate_size=768, vocab_size=8192),
        data=DataConfig(train_length=256, passkey_share=0.5),
        train=TrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=100,
                          log_every=50, checkpoint_every=500, val_every=100),
        eval=EvalConfig(ppl_segments=32, passkey_samples=40, batch_tokens=65536),
        seeds=(0, 1, 2),
    ),
}


def get_preset(name: str) -> AblationConfig:
    """The preset called ``name``; a :class:`UserError` naming the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


def override(config: AblationConfig, assignment: str) -> AblationConfig:
    """``config`` with one field replaced: ``"model.head_dim=64"``, ``"train.lr=3e-3"``,
    ``"eval.depths=0,0.5,1"``; top-level fields without a section (``"data_seed=5"``).

    Raises:
        UserError: malformed, unknown field, or a value of the wrong type.
    """
    key, sep, text = assignment.partition("=")
    section, _, name = key.strip().rpartition(".")
    if not sep or not name:
        raise UserError(f"--set {assignment!r}: write SECTION.FIELD=VALUE, e.g. --set train.lr=3e-3")
    holder = getattr(config, section) if section in ("model", "data", "train", "eval") else config
    if section not in ("", "model", "data", "train", "eval") or name not in holder.__dataclass_fields__ or name == "preset":
        raise UserError(f"--set {assignment!r}: no field {key!r}; fields are "
                        + ", ".join(f"{sec}.{f}" for sec in ("model", "data", "train", "eval")
                                    for f in getattr(config, sec).__dataclass_fields__))
    current = getattr(holder, name)
    try:
        if key.strip() == "train.lr_by_variant":  # rope:5e-4,coca_slack:1e-3,coca_strict:2e-3
            value: Any = tuple((v.strip(), float(lr)) for v, lr in (pair.split(":") for pair in text.split(","))) \
                if text.strip() else ()
        elif isinstance(current, tuple):
            value = tuple(type(current[0])(v) for v in text.split(","))
        elif current is None or isinstance(current, bool):
            value = None if text.lower() == "none" else int(text)
        else:
            value = type(current)(text)
    except ValueError:
        raise UserError(f"--set {assignment!r}: {text!r} is not a valid {type(current).__name__}") from None
    if holder is config:
        return replace(config, **{name: value})
    return replace(config, **{section: replace(holder, **{name: value})})


def config_from_dict(d: dict[str, Any]) -> AblationConfig:
    """Inverse of :meth:`AblationConfig.to_dict` (tuples restored)."""
    ev = dict(d["eval"])
    ev["length_multipliers"] = tuple(ev["length_multipliers"])
    ev["scalings"] = tuple(ev["scalings"])
    ev["depths"] = tuple(ev["depths"])
    tr = dict(d["train"])
    tr["lr_by_variant"] = tuple((v, lr) for v, lr in tr.get("lr_by_variant", ()))
    return AblationConfig(
        preset=d["preset"],
        model=ModelConfig(**d["model"]),
        data=DataConfig(**d["data"]),
        train=TrainConfig(**tr),
        eval=EvalConfig(**ev),
        seeds=tuple(d["seeds"]),
        data_seed=d["data_seed"],
        eval_seed=d["eval_seed"],
        val_seed=d["val_seed"],
        cpu_threads=d.get("cpu_threads"),
    )


MIN_TRAIN_LENGTH = 48
"""Shortest training length: a passkey prompt with its answer holds 41 tokens besides its
filler (key sentence, question, answer; SmolLM2's tokenizer), and every training length
holds passkey prompts."""

MIN_VOCAB = 64
"""Smallest trimmed vocabulary: the passkey task's 34 SmolLM2 ids, ``<unk>`` and ``<eos>``,
and room for some text."""

_Check = tuple[Callable[[Any], bool], str]
_INT1: _Check = (lambda v: _is_int(v) and v >= 1, "must be a whole number of at least 1")
_INT0: _Check = (lambda v: _is_int(v) and v >= 0, "must be a whole number of at least 0")
_POS: _Check = (lambda v: _is_num(v) and v > 0, "must be a finite number above 0")
_NONNEG: _Check = (lambda v: _is_num(v) and v >= 0, "must be a finite number of at least 0")
_SHARE: _Check = (lambda v: _is_num(v) and 0 <= v <= 1, "must lie in [0, 1]")

_FIELD_CHECKS: dict[str, _Check] = {
    "model.hidden_size": _INT1, "model.num_layers": _INT1, "model.num_heads": _INT1,
    "model.head_dim": (lambda v: _is_int(v) and v >= 2 and v % 2 == 0,
                       "must be an even whole number of at least 2 (RoPE rotates pairs of dimensions)"),
    "model.intermediate_size": _INT1,
    "model.vocab_size": (lambda v: _is_int(v) and v >= MIN_VOCAB,
                         f"must be a whole number of at least {MIN_VOCAB} (the passkey task's tokens, <unk> and <eos>)"),
    "model.rope_theta": (lambda v: _is_num(v) and v > 1, "must be a finite number above 1 (the RoPE base)"),
    "model.coca_init_gain": _POS,
    "data.train_length": (lambda v: _is_int(v) and v >= MIN_TRAIN_LENGTH,
                          f"must be a whole number of at least {MIN_TRAIN_LENGTH} (a passkey prompt and its answer)"),
    "data.code_share": _SHARE, "data.passkey_share": _SHARE,
    "data.held_out_fraction": (lambda v: _is_num(v) and 0 < v < 1, "must lie strictly between 0 and 1"),
    "train.steps": _INT1, "train.batch_size": _INT1, "train.lr": _POS, "train.warmup_steps": _INT0,
    "train.min_lr_ratio": _SHARE, "train.weight_decay": _NONNEG, "train.grad_clip": _POS,
    "train.log_every": _INT1, "train.checkpoint_every": _INT1, "train.val_every": _INT1,
    "train.val_prompts": _INT1, "train.criterion": _SHARE,
    "train.lr_by_variant": (lambda v: v == () or (sorted(name for name, _ in v) == sorted(variants.names())
                                                  and all(_is_num(lr) and lr > 0 for _, lr in v)),
                            f"must be empty or give each of {', '.join(VARIANTS)} once a finite learning rate above 0"),
    "train.matched_steps": (lambda v: v is None or (_is_int(v) and v >= 0), "must be None or a whole number of at least 0"),
    "eval.length_multipliers": (lambda v: len(v) > 0 and all(_is_int(x) and x >= 1 for x in v),
                                "must be one or more whole numbers of at least 1"),
    "eval.scalings": (lambda v: "none" in v and set(v) <= set(SCALINGS) and len(set(v)) == len(v),
                      f"must be distinct names from {', '.join(SCALINGS)}, including none"),
    "eval.ppl_segments": _INT1,
    "eval.stride": (lambda v: v is None or (_is_int(v) and v >= 2), "must be None or a whole number of at least 2"),
    "eval.passkey_samples": _INT1,
    "eval.depths": (lambda v: len(v) > 0 and all(_is_num(x) and 0 <= x <= 1 for x in v),
                    "must be one or more numbers in [0, 1]"),
    "eval.batch_tokens": _INT1, "eval.retrieval_samples": _INT1,
    "eval.probe_tokens": (lambda v: v is None or (_is_int(v) and v >= 2), "must be None or a whole number of at least 2"),
    "seeds": (lambda v: len(v) > 0 and all(_is_int(x) and x >= 0 for x in v) and len(set(v)) == len(v),
              "must be one or more distinct whole numbers of at least 0"),
    "data_seed": _INT0, "eval_seed": _INT0, "val_seed": _INT0,
    "cpu_threads": (lambda v: v is None or (_is_int(v) and v >= 1), "must be None or a whole number of at least 1"),
}
"""Every numeric field of :class:`AblationConfig` and its range (a test checks none is missed)."""

_SEED_MAX = 2**63 - 1  # torch.manual_seed and numpy's generators take at most 64 bits


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and abs(v) <= _SEED_MAX


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def config_fields(config: AblationConfig) -> dict[str, Any]:
    """Every setting of ``config`` by its ``--set`` name (``"model.head_dim"``, ``"seeds"``)."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name in ("model", "data", "train", "eval"):
            out.update({f"{f.name}.{g.name}": getattr(value, g.name) for g in fields(value)})
        elif f.name != "preset":
            out[f.name] = value
    return out


def validate(config: AblationConfig) -> AblationConfig:
    """Refuse, in one line, a config no run could finish: every number finite and in range
    (:data:`_FIELD_CHECKS`), and the settings consistent with each other. Called before
    anything is written. ``hidden_size`` need not be ``num_heads × head_dim``: LLaMA's
    projections map between the two (the committed head-64 diagnostic relies on it).

    Returns:
        ``config`` itself.

    Raises:
        UserError: naming the setting, its value and what it must be.
    """
    for key, value in config_fields(config).items():
        ok, why = _FIELD_CHECKS[key]
        if not ok(value):
            raise UserError(f"{key}={_show(value)} {why}")
    ev = config.eval
    if config.stride > min(config.eval_lengths):
        raise UserError(f"eval.stride={ev.stride} exceeds the shortest evaluation length {min(config.eval_lengths)}; "
                        "a window scores at most its own length")
    if ev.probe_tokens is not None and ev.probe_tokens > max(config.eval_lengths):
        raise UserError(f"eval.probe_tokens={ev.probe_tokens} exceeds the longest evaluation length "
                        f"{max(config.eval_lengths)}; probe at most that many tokens")
    return config


def _show(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(":".join(map(str, x)) if isinstance(x, tuple) else str(x) for x in value)
    return str(value)


def memory_bytes(config: AblationConfig) -> int:
    """A rough upper estimate of the memory one process of a run needs, in bytes.

    Training: float32 weights, gradients and AdamW's two moments (16 bytes a parameter),
    the training stream kept as int64 token ids (``steps × batch × T`` of them, plus the
    shuffled copy of each seed), and activations of one batch (``batch × T × (12 ·
    hidden · layers + 2 · vocab)`` floats, the logits counted twice for the loss).
    Evaluation: logits of ``batch_tokens`` tokens and one layer's attention weights at the
    longest length (``heads × L²``), which the retrieval head's maps materialise; the
    validation and evaluation prompts as int64 ids.
    """
    m, d, t, ev = config.model, config.data, config.train, config.eval
    attn = m.hidden_size * m.num_heads * m.head_dim * 4
    params = m.vocab_size * m.hidden_size + m.num_layers * (attn + 3 * m.hidden_size * m.intermediate_size)
    stream = t.steps * t.batch_size * d.train_length * 8 * 2
    activations = t.batch_size * d.train_length * (12 * m.hidden_size * m.num_layers + 2 * m.vocab_size) * 4
    longest = max(config.eval_lengths)
    evaluation = ev.batch_tokens * m.vocab_size * 4 + m.num_heads * longest * longest * 4
    prompts = (t.val_prompts * d.train_length
               + ev.passkey_samples * len(ev.depths) * sum(config.eval_lengths)) * 8
    return 16 * params + stream + prompts + max(activations, evaluation)


def check_config(out: Path, config: AblationConfig) -> None:
    """Record ``config`` in ``out/config.json``, or check that a run already there used the
    same one (the run and the learning-rate sweep both refuse to mix configurations)."""
    path = out / "config.json"
    if path.exists():
        previous = config_from_dict(json.loads(path.read_text()))
        if previous != config:
            raise UserError(
                f"{out} holds a run of a different configuration (preset {previous.preset!r}); "
                "use another --out directory or delete this one"
            )
    else:
        write_json(path, config.to_dict(), digits=None)  # compared exactly on resume
