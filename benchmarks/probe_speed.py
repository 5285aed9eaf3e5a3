"""Cost of :func:`anomaly.probe.probe` beside a bare forward pass of the same model.

    python benchmarks/probe_speed.py                       # CPU, bundled SmolLM2-135M, 2048 tokens
    python benchmarks/probe_speed.py --tokens 512 --repeats 5
    python benchmarks/probe_speed.py --device cuda --random-llama-7b --tokens 4096

Both calls see the same token ids: the first ``--tokens`` tokens of the default document
(*Hamlet*) for the bundled model, random ids for ``--random-llama-7b``. They are timed
alternately (forward, probe, forward, probe, ...) in one process, after one untimed
warm-up of each, so that load on a shared machine slows both alike; the medians and their
ratio are printed. Goal (probe issue): probe ≤ 1.5 × forward. Last, the accuracy the
probe's float32 mean-logit FFT gives up, against float64 throughout.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from anomaly.cli import UserError, run_main  # noqa: E402
from anomaly.probe.activations import Capture  # noqa: E402

GOAL = 1.5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="sequence length (default 2048)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each (default 3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--random-llama-7b", action="store_true",
                   help="random-weight LLaMA-7B-shaped model (bf16; meant for a GPU) instead of SmolLM2")
    args = p.parse_args(argv)
    if args.tokens < 2:
        raise UserError(f"--tokens must be at least 2, got {args.tokens}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    return args


def smollm2(device: str, tokens: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from anomaly.corpus import default_document
    from anomaly.models import BUNDLED, load_model

    loaded = load_model(BUNDLED, device, "float32")  # SDPA attention, eval mode
    ids = loaded.tokenizer(default_document().read(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < tokens:
        raise UserError(f"--tokens {tokens} exceeds the document's {ids.numel()} tokens")
    return loaded.model, ids[:tokens]


def random_llama_7b(device: str, tokens: int) -> tuple[torch.nn.Module, torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=32000, max_position_embeddings=max(4096, tokens),
        attn_implementation="sdpa",
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype).eval()
    ids = torch.randint(0, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    return model, ids


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    from anomaly.probe import probe

    build = random_llama_7b if args.random_llama_7b else smollm2
    model, ids = build(args.device, args.tokens)
    ids = ids.to(args.device)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    def forward() -> None:
        with torch.inference_mode():
            model(ids[None], use_cache=False, logits_to_keep=1)

    def run_probe() -> None:
        probe(model, ids)

    calls = {"forward": forward, "probe": run_probe}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(args.repeats + 1):  # round 0: warm-up, untimed
        for name, call in calls.items():
            sync()
            start = time.perf_counter()
            call()
            sync()
            if rep:
                times[name].append(time.perf_counter() - start)

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(
        f"machine: {device}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    cfg = model.config
    print(
        f"model: {'random LLaMA-7B shape' if args.random_llama_7b else 'SmolLM2-135M (bundled GGUF)'}, "
        f"{cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads, "
        f"{next(model.parameters()).dtype}, {args.device}, {args.tokens} tokens, {args.repeats} repeats"
    )
    fwd, prb = statistics.median(times["forward"]), statistics.median(times["probe"])
    for name in calls:
        print(f"{name:8s} median {statistics.median(times[name]):8.2f} s   ({', '.join(f'{x:.2f}' for x in times[name])})")
    ratio = prb / fwd
    print(f"probe / forward = {ratio:.2f}  (goal ≤ {GOAL}: {'met' if ratio <= GOAL else 'not met'})")
    from anomaly.probe import capture

    cap = capture(model, ids)  # every layer kept, for the two checks below
    print(f"mean_logit: max |probe's − float64 FFT| / max |mean logit| = {mean_logit_error(cap):.1e}")
    parts = stats_breakdown(cap, sync)
    print("the probe's statistics, timed on the captured layers: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))
    return 0


def stats_breakdown(cap: Capture, sync) -> dict[str, float]:
    """Seconds the probe's per-layer statistics take, summed over layers (median of 3): the
    pair-statistics sweep, the mean logit by distance, and all of ``_layer_stats``."""
    from anomaly.probe.core import _layer_stats, mean_logit_by_distance, slice_pair_stats_of

    def seconds(fn) -> float:
        runs = []
        for _ in range(3):
            sync()
            start = time.perf_counter()
            for layer in cap.layers:
                fn(layer)
            sync()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    return {
        "pair statistics": seconds(lambda layer: slice_pair_stats_of(layer, 64)),
        "mean logit": seconds(lambda layer: mean_logit_by_distance(layer)),
        "all statistics": seconds(lambda layer: _layer_stats(layer, 64)),
    }


def mean_logit_error(cap: Capture) -> float:
    """What the probe's float32 FFT (with its float64 tail) costs in accuracy: the largest
    deviation from the same statistic computed in float64 throughout, over all layers and
    heads, relative to that head's largest mean logit."""
    from anomaly.probe import mean_logit_by_distance

    worst = 0.0
    for layer in cap.layers:
        fast = mean_logit_by_distance(layer)
        exact = mean_logit_by_distance(layer.to(torch.float64))
        rel = (fast - exact).abs().amax(-1) / exact.abs().amax(-1)
        worst = max(worst, float(rel.max()))
    return worst


if __name__ == "__main__":
    sys.exit(run_main(main))
