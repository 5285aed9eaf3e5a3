"""Build and train the ablation models, with resumable safetensors checkpoints.

For one seed, all variants start from the *same* random initialisation: the model is built
as a plain HF ``LlamaForCausalLM`` (:func:`build_llama`, the one builder of the toolkit's
from-scratch models) and then converted as its variant's registry entry says
(:mod:`anomaly.variants`: :func:`anomaly.coca.to_coca` for a CoCA form, ``k_proj`` becoming
the T projection), keeping every parameter. They then see the same batches in the same order
for the same number of steps.

Under ``torchrun`` (:mod:`anomaly.ablation.distributed`) each process takes an equal share
of every global batch and PyTorch DDP averages the gradients, so a step sees the same
sequences as in one process.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from anomaly import variants
from anomaly.ablation.config import AblationConfig
from anomaly.ablation.data import EOS
from anomaly.ablation.distributed import World
from anomaly.coca import to_coca
from anomaly.errors import UserError
from anomaly.model_surgery import attention_module, decoder_layers
from anomaly.io import atomic_dir

def seed_dir(out: Path, variant: str, seed: int) -> Path:
    """Folder of one trained model in a run folder: ``out/<variant>/seed<seed>``."""
    return out / variant / f"seed{seed}"


CHECKPOINT = "checkpoint"
"""Name of a variant's checkpoint directory (``model.safetensors``, ``optimizer.safetensors``,
``state.json``)."""


def rope_parameters(config: AblationConfig, scaling: str = "none") -> dict:
    """HF ``rope_parameters`` for an evaluation scaling: ``none`` or ``ntk-<factor>``.

    Dynamic NTK takes its original length from ``max_position_embeddings``, which the
    ablation models set to the training length.
    """
    base = config.model.rope_theta
    if scaling == "none":
        return {"rope_type": "default", "rope_theta": base}
    if scaling.startswith("ntk-"):
        return {"rope_type": "dynamic", "factor": float(scaling[4:]), "rope_theta": base}
    raise ValueError(f"unknown scaling {scaling!r}; use 'none' or 'ntk-<factor>'")


def build_llama(
    variant: str,
    seed: int,
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    max_position_embeddings: int,
    head_dim: int | None = None,
    rope_theta: float = 10000.0,
    tie_word_embeddings: bool = True,
    eos_token_id: int | None = None,
) -> torch.nn.Module:
    """A randomly initialised from-scratch LLaMA (HF ``LlamaForCausalLM``, SDPA attention, no
    GQA) from ``seed``, converted to ``variant`` as its entry in
    :data:`anomaly.variants.REGISTRY` says: its own ``convert``, else :func:`anomaly.coca.to_coca`
    for a CoCA form, else unchanged (RoPE). The weights are drawn before the conversion, which
    keeps every parameter, so all variants of one seed start from the same weights.

    Args:
        head_dim: ``None``: ``hidden_size / num_heads``.
        eos_token_id: also the BOS and padding id; ``None``: transformers' defaults.

    Returns:
        The model in train mode, float32, on the CPU.

    Raises:
        UserError: ``variant`` is not registered (before anything is built).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = variants.variant(variant)
    special = {} if eos_token_id is None else {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id,
                                                "pad_token_id": eos_token_id}
    hf_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation="sdpa",
        **special,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config)
    if spec.convert is not None:
        model = spec.convert(model)
    elif spec.coca is not None:
        model = to_coca(model, spec.coca)
    return model.train()


def build_model(config: AblationConfig, variant: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised ablation model of ``variant`` from ``seed`` (:func:`build_llama`
    with the config's shape; same weights for every variant).

    Returns:
        ``LlamaForCausalLM`` in train mode, float32, on the CPU.
    """
    m = config.model
    model = build_llama(
        variant, seed, vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
        num_layers=m.num_layers, num_heads=m.num_heads, head_dim=m.head_dim,
        # Dynamic NTK's "original length" is max_position_embeddings: the training length.
        max_position_embeddings=config.data.train_length, rope_theta=m.rope_theta, eos_token_id=EOS,
    )
    if variants.variant(variant).coca is not None and m.coca_init_gain != 1.0:
        with torch.no_grad():
            for layer in decoder_layers(model):
                attn = attention_module(layer)
                attn.q_proj.weight.mul_(m.coca_init_gain)
                attn.k_proj.weight.mul_(m.coca_init_gain)
    return model


def learning_rate(config: AblationConfig, step: int) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr_ratio · lr`` at the last step."""
    t = config.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, config: AblationConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms and the (tied) embedding do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim == 2 and "embed" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": config.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.train.lr, betas=(0.9, 0.95))


@dataclass
class TrainState:
    """Progress of one variant's training, saved with each checkpoint."""

    step: int = 0
    """Optimiser steps done."""
    curve: dict[str, list[float]] = field(default_factory=lambda: {"step": [], "loss": [], "lr": []})
    """Training curve: mean loss over the last ``log_every`` steps, at each logged step."""
    val: dict[str, list[float]] = field(default_factory=lambda: {"step": [], "digit_nll": [], "exact": []})
    """Validation curve (every ``val_every`` steps, and at step 0): mean digit loss (nats)
    and exact-match rate on the validation prompts at the training length."""
    criterion_step: int | None = None
    """First validated step whose exact-match rate reached ``criterion``; ``None`` if none."""
    train_seconds: float = 0.0
    """Wall time spent in training steps (forward, backward, update), over all resumptions."""
    timed_tokens: int = 0
    """Tokens processed in the timed steps (the first steps of each session are warm-up and
    not timed)."""
    timed_seconds: float = 0.0
    """Wall time of the timed steps."""
    window: list[float] = field(default_factory=list)
    """Losses of the steps since the last curve point, so that a run resumed between two
    logged steps records the same curve as an uninterrupted one."""

    @property
    def tokens_per_s(self) -> float | None:
        """Training throughput (tokens per second) over the timed steps; ``None`` before any
        step was timed (the first steps of a session are not)."""
        return self.timed_tokens / self.timed_seconds if self.timed_seconds else None


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        i, name = key.split(".", 1)
        state.setdefault(int(i), {})[name] = value
    sd["state"] = state
    opt.load_state_dict(sd)


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None, state: TrainState) -> None:
    """Write ``path`` (a directory) atomically: weights, optimiser moments, progress."""
    with atomic_dir(path) as tmp:
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        # Tied embeddings: safetensors refuses shared storage; the head is re-tied on load.
        weights.pop("lm_head.weight", None)
        save_file(weights, str(tmp / "model.safetensors"))
        if opt is not None:
            save_file({k: v.cpu() for k, v in _optimizer_tensors(opt).items()}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state.__dict__, indent=1))


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None = None) -> TrainState:
    """Load weights (and optimiser moments when ``opt`` is given) from ``path``."""
    device = next(model.parameters()).device
    weights = _read_tensors(path / "model.safetensors", device)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise UserError(f"checkpoint {path} does not fit the model (missing {missing}, unexpected {unexpected}); "
                        "use a fresh --out directory")
    model.tie_weights()
    if opt is not None and (path / "optimizer.safetensors").exists():
        _load_optimizer(opt, _read_tensors(path / "optimizer.safetensors", device))
    try:
        return TrainState(**json.loads((path / "state.json").read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise _unreadable(path / "state.json", exc) from None


def _read_tensors(file: Path, device: torch.device) -> dict[str, Tensor]:
    try:
        return load_file(str(file), device=str(device))
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        if isinstance(exc, (KeyboardInterrupt, MemoryError)):
            raise
        raise _unreadable(file, exc) from None


def _unreadable(file: Path, exc: BaseException) -> UserError:
    # Checkpoints are swapped in whole (io.atomic_dir), so this is a damaged disk or a hand
    # edit, not an interrupted run; retraining that model from the start is always safe.
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UserError(f"cannot read {file} ({reason}); move the folder {file.parent} away and run the "
                     "same command again to train that model from the start")


Validate = Callable[[torch.nn.Module], dict]
"""Scores a model (eval mode, no grad) on the validation prompts: ``{"digit_nll", "exact"}``."""

CRITERION = "criterion"
"""Name of the directory, beside a variant's checkpoint, of the weights at the criterion."""

MATCHED = "matched"
"""Name of the directory, beside a variant's checkpoint, of the weights ``train.matched_steps``
steps after the criterion (the matched-stage reading)."""


def matched_step(config: AblationConfig, criterion_step: int | None) -> int | None:
    """The step of the matched-stage snapshot: ``criterion_step + train.matched_steps``;
    ``None`` when the config takes none, the criterion was not reached, or that step lies
    beyond the training cap (the model does not reach the stage)."""
    k = config.train.matched_steps
    if k is None or criterion_step is None or criterion_step + k > config.train.steps:
        return None
    return criterion_step + k


def train(
    model: torch.nn.Module,
    batches: Tensor,
    config: AblationConfig,
    checkpoint: Path,
    *,
    validate: Validate | None = None,
    world: World = World(),
    deadline: float | None = None,
    log: Callable[[str], None] = print,
) -> TrainState:
    """Train ``model`` on ``batches`` (``int64[steps · batch, T]``), resuming from ``checkpoint``.

    Every ``val_every`` steps ``validate`` scores the model (rank 0 only); the first time the
    exact-match rate reaches ``criterion`` the weights are also written to
    ``checkpoint.parent / "criterion"``, and ``train.matched_steps`` steps later (when set)
    to ``checkpoint.parent / "matched"``. Stops early, after writing a checkpoint, once
    ``time.monotonic()`` passes ``deadline``; calling again with the same arguments
    continues from there. Under ``torchrun`` every rank calls this with the same arguments
    and trains on its :meth:`World.shard` of each batch. Returns the progress
    (``state.step == config.train.steps`` when done).
    """
    t = config.train
    device = next(model.parameters()).device
    opt = make_optimizer(model, config)
    state = load_checkpoint(checkpoint, model, opt) if (checkpoint / "state.json").exists() else TrainState()
    if state.step >= t.steps:
        return state
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world.distributed else model
    rows = world.shard(t.batch_size)
    if state.step == 0:
        _validation(model, state, validate, world, config, checkpoint, log)
        _keep_matched(model, state, config, world, checkpoint)
    model.train()
    session_step = 0
    while state.step < t.steps:
        start = time.perf_counter()
        lr = learning_rate(config, state.step)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = batches[state.step * t.batch_size : (state.step + 1) * t.batch_size][rows].to(device)  # [B/N, T]
        value = _optimiser_step(model, ddp, opt, batch, autocast, t.grad_clip, world, state.step)
        session_step += 1
        _record_step(state, config, value, lr, time.perf_counter() - start, batch.numel() * world.size,
                     timed=session_step > 2, log=log)
        if state.step % t.val_every == 0 or state.step == t.steps:
            _validation(model, state, validate, world, config, checkpoint, log)
        # Before this step's checkpoint: a resume never skips past it.
        _keep_matched(model, state, config, world, checkpoint)
        out_of_time = world.any(deadline is not None and time.monotonic() > deadline, device)
        if world.main and (state.step % t.checkpoint_every == 0 or state.step == t.steps or out_of_time):
            save_checkpoint(checkpoint, model, opt, state)
        if out_of_time:
            break
    world.barrier()  # rank 0's checkpoint is on disk before any rank goes on
    model.eval()
    return state


def _optimiser_step(model: torch.nn.Module, ddp: torch.nn.Module, opt: torch.optim.Optimizer, batch: Tensor,
                    autocast, grad_clip: float, world: World, step: int) -> float:
    """One optimiser step on ``batch`` (``int64[B/N, T]``, this rank's share): the training
    loss, averaged over ranks."""
    with autocast:
        loss = ddp(input_ids=batch, labels=batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    value = world.mean(loss.item(), batch.device)  # .item() synchronises: honest GPU timing
    if not math.isfinite(value):
        raise RuntimeError(f"training loss became {value} at step {step}")
    return value


def _record_step(state: TrainState, config: AblationConfig, value: float, lr: float, elapsed: float, tokens: int,
                 *, timed: bool, log: Callable[[str], None]) -> None:
    """Count one finished step in ``state`` (its loss ``value``, its ``elapsed`` seconds and,
    when ``timed``, its ``tokens`` over all ranks), and every ``log_every`` steps add the
    window's mean loss to the curve and log it."""
    t = config.train
    state.step += 1
    state.train_seconds += elapsed
    if timed:  # the first steps of a session warm up kernels and caches
        state.timed_seconds += elapsed
        state.timed_tokens += tokens
    state.window.append(value)
    if state.step % t.log_every == 0 or state.step == t.steps:
        state.curve["step"].append(state.step)
        state.curve["loss"].append(sum(state.window) / len(state.window))
        state.curve["lr"].append(lr)
        speed = f"{state.tokens_per_s:.0f} tok/s" if state.tokens_per_s else "timing from step 3"
        log(f"step {state.step}/{t.steps} loss {state.curve['loss'][-1]:.3f} ({speed})")
        state.window.clear()


def _validation(model: torch.nn.Module, state: TrainState, validate: Validate | None, world: World,
                config: AblationConfig, checkpoint: Path, log: Callable[[str], None]) -> None:
    """Score the model at ``state.step`` (rank 0, once per step) and, the first time it
    reaches the criterion, keep its weights in ``checkpoint.parent / "criterion"``."""
    if validate is None or not world.main or (state.val["step"] and state.val["step"][-1] == state.step):
        return
    scores = validate(model)
    model.train()
    for key in ("digit_nll", "exact"):
        state.val[key].append(scores[key])
    state.val["step"].append(state.step)
    log(f"step {state.step}: validation digit loss {scores['digit_nll']:.3f}, exact {scores['exact']:.2f}")
    if state.criterion_step is None and scores["exact"] >= config.train.criterion:
        state.criterion_step = state.step
        save_checkpoint(checkpoint.parent / CRITERION, model, None, state)


def _keep_matched(model: torch.nn.Module, state: TrainState, config: AblationConfig, world: World,
                  checkpoint: Path) -> None:
    """At the matched-stage step, keep the weights in ``checkpoint.parent / "matched"`` (rank 0)."""
    if world.main and state.criterion_step is not None and matched_step(config, state.criterion_step) == state.step:
        save_checkpoint(checkpoint.parent / MATCHED, model, None, state)
