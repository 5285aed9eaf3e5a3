"""Can a variant's attention single out the previous token? A synthetic diagnostic.

Induction, and through it passkey copying, is built on *previous-token heads*: heads
that attend from each token to the one just before it. In RoPE the score of a fixed
query–key pair at distance ``s`` is ``Σ_j |q_j||k_j| cos(Θ_j + sθ_j)``, which a head can
peak at ``s = 1`` through its initial angles. In strict CoCA it is
``Σ_j t_j |q_j|² cos(sθ_j)`` with every weight ``t_j |q_j|² ≥ 0``, which is largest at
``s = 0``: for *equal contents*, a strict head cannot prefer the previous position over
its own. It can still prefer the previous token through content, by giving each token
a T vector that avoids the slices its own query uses; whether training finds that is
what this task measures (docs/ablation.md).

The task: sequences of uniformly random tokens; the target at every position is the
token *before* it. Each token's content says nothing about its position, so the
attention has to find the previous token. A one-layer model is trained per variant from
the same initial weights on the same batches; its accuracy on fresh sequences is
reported with a Wilson interval, and so is the attention its best head pays to the
previous token and to the token itself.

    python -m anomaly.ablation.previous_token --out results/previous_token.json
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from anomaly import variants
from anomaly.replication import proportion


@dataclass(frozen=True)
class PreviousTokenConfig:
    """The synthetic task and its one-layer models."""

    vocab_size: int = 64
    """Random tokens are drawn uniformly from this many ids."""
    length: int = 64
    """Sequence length."""
    hidden_size: int = 64
    """Residual width."""
    num_heads: int = 2
    """Attention heads."""
    steps: int = 600
    """AdamW steps (lr 3e-3, batch 32)."""
    batch_size: int = 32
    """Sequences per step."""
    lr: float = 3e-3
    """Learning rate (constant after 50 warm-up steps)."""
    test_sequences: int = 64
    """Fresh sequences the accuracy is measured on."""
    seed: int = 0
    """Seed of the weights (shared by the variants) and of the data."""


def _model(config: PreviousTokenConfig, variant: str) -> torch.nn.Module:
    """The one-layer model of ``variant`` (untied embeddings), from ``config.seed``."""
    from anomaly.ablation.train import build_llama

    return build_llama(variant, config.seed, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                       intermediate_size=4 * config.hidden_size, num_layers=1, num_heads=config.num_heads,
                       max_position_embeddings=config.length, tie_word_embeddings=False)


def train_previous_token(config: PreviousTokenConfig, variant: str) -> dict:
    """Train one variant on the task; returns its test accuracy with a 95 % interval."""
    start = time.perf_counter()
    model = _model(config, variant)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed + 1)  # same batches for every variant
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / 50)
        x = torch.randint(0, config.vocab_size, (config.batch_size, config.length), generator=gen)  # [B, N]
        logits = model(input_ids=x).logits[:, 1:]  # position i predicts token i − 1
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, config.vocab_size), x[:, :-1].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    model.set_attn_implementation("eager")  # to read the attention probabilities
    test = torch.randint(0, config.vocab_size, (config.test_sequences, config.length), generator=gen)
    with torch.no_grad():
        out = model(input_ids=test, output_attentions=True)
    correct = out.logits[:, 1:].argmax(-1) == test[:, :-1]  # [n, N-1]
    k, n = int(correct.sum()), correct.numel()
    # Attention mass by distance, queries 1 … N−1, for the head that puts most on distance 1.
    attn = out.attentions[0][:, :, 1:]  # [n, heads, N-1, N]: row i is query i + 1
    on_self = attn.diagonal(offset=1, dim1=-2, dim2=-1).mean((0, 2))  # [heads]
    on_prev = attn.diagonal(offset=0, dim1=-2, dim2=-1).mean((0, 2))  # [heads]
    head = int(on_prev.argmax())
    return {"variant": variant, "accuracy": k / n, "ci": list(proportion(k, n, method="wilson").interval), "tokens": n,
            "chance": 1 / config.vocab_size, "final_loss": float(loss.detach()),
            "head": head, "attention_on_previous": float(on_prev[head]), "attention_on_self": float(on_self[head]),
            "seconds": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> int:
    from anomaly.cli import ArgumentParser
    from anomaly.errors import UserError
    from anomaly.io import Provenance, write_json
    from anomaly.outputs import claim_file

    p = ArgumentParser(prog="python -m anomaly.ablation.previous_token", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    p.add_argument("--seeds", type=int, default=3, help="train each variant from seeds 0 … N-1")
    p.add_argument("--steps", type=int, default=PreviousTokenConfig.steps, help="training steps per model")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1:
        raise UserError(f"--seeds and --steps must be positive, got {args.seeds} and {args.steps}")
    target = claim_file(args.out, "anomaly.ablation.previous_token", flag="--out")
    runs = []
    for seed in range(args.seeds):
        config = PreviousTokenConfig(seed=seed, steps=args.steps)
        for variant in variants.names():
            runs.append({"seed": seed, **train_previous_token(config, variant)})
            print(f"seed {seed} {variant:>11}: previous-token accuracy {runs[-1]['accuracy']:.3f} "
                  f"[{runs[-1]['ci'][0]:.3f}, {runs[-1]['ci'][1]:.3f}] (chance {runs[-1]['chance']:.3f})", flush=True)
    with target.writing() as tmp:
        write_json(tmp / args.out.name, {"config": asdict(PreviousTokenConfig(steps=args.steps)), "runs": runs,
                         "provenance": Provenance.from_argv(model="synthetic previous-token task",
                                                            seed=list(range(args.seeds)))})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    from anomaly.cli import run_main

    raise SystemExit(run_main(main))
