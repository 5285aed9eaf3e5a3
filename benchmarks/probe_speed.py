"""Time and peak memory of :func:`anomaly.probe.probe` beside a bare forward pass, per length.

    python benchmarks/probe_speed.py --tokens 2048 8192 16384   # CPU, bundled SmolLM2-135M
    python benchmarks/probe_speed.py --model gemma3-270m --tokens 8192 16384   # sliding-window layers
    python benchmarks/probe_speed.py --device cuda --random-llama-7b --tokens 4096

Four calls see the same token ids (the first ``--tokens`` tokens of the default document,
*Hamlet*, for a bundled model, ``--model``; random ids for ``--random-llama-7b``):

* ``forward``: ``model(ids, use_cache=False, logits_to_keep=1)``, every layer with the LM
  head applied to the last token only: the cost of the network without its head;
* ``forward+head``: ``model(ids, use_cache=False)``, logits for every token (``[T, vocab]``);
* ``capture``: ``capture(model, ids, on_layer=drop)``: the probe's forward with every layer's
  q/k captured and checked against the layer's own output, then dropped: the probe without
  its statistics;
* ``probe``: ``probe(model, ids)`` (it stops after the last attention layer).

Time: after one untimed warm-up round at a short length (compilation, lazy loads), each
length runs ``--repeats`` rounds of the calls, the order rotated from round to round,
so that load from other jobs on a shared machine falls on all four alike; medians. Each
length's verdict line also splits the goal's budget, ``(goal − 1) × forward``: what capturing
adds (``capture − forward``) and what the statistics add (``probe − capture``).

Memory: each call's peak extra memory, as :func:`benchmarks.memory.peak_extra_bytes`
describes. On the CPU that is the peak resident set above the one before the call, which
needs glibc to return freed blocks at once; that slows allocation-heavy code (the probe's
statistics ~3 × in one measurement), so the CPU figures come from a separate process per
length, with glibc set so (``MALLOC_MMAP_THRESHOLD_``), that runs each call once after its own
warm-up, while the timed process keeps glibc's defaults. On CUDA every timed call measures the
allocator's peak above the allocation before it (median over rounds). ``probe − forward`` is what the probe holds beyond the
forward pass it runs; it stays bounded by one layer's q/k and statistics, whatever the depth
(``tests/test_probe_memory.py``). ``process peak`` is the whole process at that moment,
weights included.

After the table, at the shortest length: the accuracy the probe's float32 mean-logit FFT
gives up against float64, and the time its statistics take on the captured layers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from anomaly.cli import ArgumentParser, check_memory, run_main  # noqa: E402
from anomaly.bundled import BUNDLED_MODELS  # noqa: E402
from anomaly.errors import UserError  # noqa: E402
from anomaly.models import BUNDLED  # noqa: E402
from benchmarks.memory import MMAP_THRESHOLD, can_measure_rss, peak_extra_bytes  # noqa: E402

GOALS = ((8192, 1.1), (0, 1.2))
"""Issue 18 item 5: probe ≤ 1.2 × the bare forward at 2K tokens, ≤ 1.1 × from 8K on
(CPU, SmolLM2-135M): ``(from this many tokens, goal)``, longest first."""
CALLS = ("forward", "forward+head", "capture", "probe")
WARMUP_TOKENS = 256


@dataclass
class Measured:
    """Timed calls of one (length, call)."""

    seconds: list[float] = field(default_factory=list)
    """Wall time of each timed call."""
    extra: list[int] = field(default_factory=list)
    """Peak extra memory of each timed call, bytes (empty where not measurable)."""
    process: list[int] = field(default_factory=list)
    """Peak of the whole process during each call, bytes."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python benchmarks/probe_speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048], help="sequence lengths (default 2048)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per length (default 3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--model", default=BUNDLED, choices=sorted(BUNDLED_MODELS),
                   help=f"bundled model (default {BUNDLED}); gemma3-270m has sliding-window layers")
    p.add_argument("--random-llama-7b", action="store_true",
                   help="random-weight LLaMA-7B-shaped model (bf16 on a GPU, float32 on the CPU) instead of --model")
    p.add_argument("--layers", type=int, default=32,
                   help="--random-llama-7b only: decoder layers (default 32, the real depth; fewer for a dry run)")
    p.add_argument("--no-details", action="store_true",
                   help="skip the mean-logit accuracy and statistics breakdown after the table")
    p.add_argument("--_memory-worker", type=int, help=argparse.SUPPRESS)  # internal: see memory_of
    args = p.parse_args(argv)
    if min(args.tokens) < 2:
        raise UserError(f"--tokens must be at least 2, got {min(args.tokens)}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    if args.layers < 1:
        raise UserError(f"--layers must be at least 1, got {args.layers}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
    if args.random_llama_7b and args.device == "cpu":
        # float32: 202M parameters a layer, 262M for the embedding and the head.
        check_memory((args.layers * 202_383_360 + 262_144_000) * 4, f"--random-llama-7b with --layers {args.layers}",
                     "lower --layers")
    return args


def bundled(name: str, device: str, tokens: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    from anomaly.corpus import default_document
    from anomaly.models import load_model

    loaded = load_model(name, device, "float32")  # SDPA attention, eval mode
    ids = loaded.tokenizer(default_document().read(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < tokens:
        raise UserError(f"--tokens {tokens} exceeds the document's {ids.numel()} tokens")
    return loaded.model, ids[:tokens], f"{name} (bundled GGUF)"


def random_llama_7b(device: str, tokens: int, layers: int) -> tuple[torch.nn.Module, torch.Tensor, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=32000, max_position_embeddings=max(4096, tokens),
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):  # initialised in place, in its dtype: no float32 7B copy on the GPU
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()
    ids = torch.randint(0, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
    return model, ids, f"random LLaMA-7B shape ({layers} of 32 layers)" if layers != 32 else "random LLaMA-7B shape"


def calls_of(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The measured calls on ``ids [T]`` (see the module docstring)."""
    from anomaly.probe import capture, probe

    batch = ids[None]

    def forward() -> object:
        with torch.inference_mode():
            return model(batch, use_cache=False, logits_to_keep=1)

    def forward_head() -> object:
        with torch.inference_mode():
            return model(batch, use_cache=False)

    def drop(layer: object) -> None:  # each layer's capture freed as soon as it is checked
        pass

    return {"forward": forward, "forward+head": forward_head,
            "capture": lambda: capture(model, ids, on_layer=drop), "probe": lambda: probe(model, ids)}


def measure(model: torch.nn.Module, ids: torch.Tensor, repeats: int, device: str, memory: bool) -> dict[str, Measured]:
    """``repeats`` rounds of the calls, order rotated each round; time, and memory
    where ``memory``."""
    calls = calls_of(model, ids)
    out = {name: Measured() for name in CALLS}
    for rnd in range(repeats):
        order = CALLS[rnd % len(CALLS):] + CALLS[: rnd % len(CALLS)]
        for name in order:
            start = time.perf_counter()
            result, extra, process = peak_extra_bytes(calls[name], device) if memory else (calls[name](), None, None)
            out[name].seconds.append(time.perf_counter() - start)
            del result  # full logits at 16K tokens are 3 GB: not into the next call's baseline
            if extra is not None:
                out[name].extra.append(extra)
                out[name].process.append(process)
    return out


def memory_of(argv: Sequence[str], tokens: int) -> dict[str, tuple[int, int]]:
    """CPU memory of the calls at ``tokens``, from a fresh process (see the module
    docstring): ``{call: (peak extra bytes, process peak bytes)}``."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    cmd = [sys.executable, __file__, *argv, "--_memory-worker", str(tokens)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory worker failed at {tokens} tokens:\n{done.stderr[-2000:]}")
    return {name: tuple(v) for name, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def memory_worker(model: torch.nn.Module, ids: torch.Tensor, device: str) -> None:
    """Print ``{call: [peak extra bytes, process peak bytes]}`` for one length as JSON."""
    measure(model, ids[:WARMUP_TOKENS], 1, device, memory=False)
    by_call = measure(model, ids, 1, device, memory=True)
    print(json.dumps({name: [m.extra[0], m.process[0]] for name, m in by_call.items() if m.extra}))


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def table(results: dict[int, dict[str, Measured]]) -> str:
    """Markdown table: per length and call, median time and memory, and ratios to the two forwards."""
    rows = [
        "| tokens | call | time (s) | × forward | × forward+head | peak extra (MiB) | × forward | probe − forward (MiB) | process peak (GiB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tokens, by_call in results.items():
        t = {name: _median(m.seconds) for name, m in by_call.items()}
        mem = {name: _median(m.extra) for name, m in by_call.items()}
        for name, m in by_call.items():
            proc = _median(m.process)
            mib = "—" if mem[name] is None else f"{mem[name] / 2**20:.0f}"
            mem_ratio = f"{mem[name] / mem['forward']:.2f}" if mem[name] is not None and mem["forward"] else "—"
            above = (
                f"{(mem['probe'] - mem['forward']) / 2**20:.0f}"
                if name == "probe" and mem["probe"] is not None else ""
            )
            rows.append(
                f"| {tokens} | {name} | {t[name]:.2f} | {t[name] / t['forward']:.2f} | "
                f"{t[name] / t['forward+head']:.2f} | {mib} | {mem_ratio} | {above} | "
                f"{'—' if proc is None else f'{proc / 2**30:.2f}'} |"
            )
    return "\n".join(rows)


def goal_for(tokens: int) -> float:
    """The probe / forward goal at ``tokens`` (:data:`GOALS`)."""
    return next(goal for start, goal in GOALS if tokens >= start)


def verdict(tokens: int, seconds: dict[str, float]) -> str:
    """One length's probe / forward ratio against its goal, and the goal's budget beside what
    capturing and the statistics add (median seconds per call)."""
    forward, captured, probed = seconds["forward"], seconds["capture"], seconds["probe"]
    ratio, goal = probed / forward, goal_for(tokens)
    return (f"{tokens} tokens: probe / forward = {ratio:.2f}  (goal ≤ {goal}: {'met' if ratio <= goal else 'not met'}); "
            f"budget (goal − 1) × forward = {(goal - 1) * forward:.2f} s: capturing adds {captured - forward:.2f} s, "
            f"the statistics {probed - captured:.2f} s")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    longest = args._memory_worker or max(args.tokens)
    if args.random_llama_7b:
        model, ids, described = random_llama_7b(args.device, longest, args.layers)
    else:
        model, ids, described = bundled(args.model, args.device, longest)
    ids = ids.to(args.device)
    if args._memory_worker:
        memory_worker(model, ids, args.device)
        return 0
    argv = list(sys.argv[1:] if argv is None else argv)
    measure(model, ids[: min(WARMUP_TOKENS, *args.tokens)], 1, args.device, memory=False)  # warm-up

    started = time.perf_counter()
    results: dict[int, dict[str, Measured]] = {}
    for tokens in args.tokens:
        results[tokens] = measure(model, ids[:tokens], args.repeats, args.device, memory=args.device == "cuda")
        if args.device == "cpu" and can_measure_rss():
            for name, (extra, process) in memory_of(argv, tokens).items():
                results[tokens][name].extra.append(extra)
                results[tokens][name].process.append(process)
        print(f"  measured {tokens} tokens", file=sys.stderr, flush=True)

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    cfg = model.config
    print(f"machine: {device}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        f"model: {described}, {cfg.num_hidden_layers} layers, {cfg.num_attention_heads}/{cfg.num_key_value_heads} "
        f"heads, {next(model.parameters()).dtype}, {cfg._attn_implementation} attention, {args.device}; "
        f"time: medians of {args.repeats} rounds; "
        + ("memory: medians of the timed calls" if args.device == "cuda" else "memory: one call each in a fresh process")
    )
    print(table(results))
    for tokens, by_call in results.items():
        print(verdict(tokens, {name: _median(m.seconds) for name, m in by_call.items()}))
    print(f"(timed part {time.perf_counter() - started:.0f} s; command: python benchmarks/probe_speed.py "
          f"{' '.join(argv)})")
    if not args.no_details:
        details(model, ids[: min(args.tokens)], args.device)
    return 0


def details(model: torch.nn.Module, ids: torch.Tensor, device: str) -> None:
    """The two checks on one full capture: mean-logit accuracy, statistics breakdown."""
    from anomaly.probe import capture

    cap = capture(model, ids)  # every layer kept
    print(f"{ids.numel()} tokens: mean_logit: max |probe's − float64 FFT| / max |mean logit| = "
          f"{mean_logit_error(cap.layers):.1e}")
    parts = stats_breakdown(cap.layers, device)
    print("the probe's statistics, timed on the captured layers: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()))


def stats_breakdown(layers: list, device: str) -> dict[str, float]:
    """Seconds the probe's per-layer statistics take, summed over layers (median of 3): the
    pair statistics, the mean logit by distance, and all of them (``layer_statistics``)."""
    from anomaly.probe.core import layer_statistics, mean_logit_by_distance
    from anomaly.probe.stats import pair_statistics

    def seconds(fn: Callable[[object], object]) -> float:
        runs = []
        for _ in range(3):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for layer in layers:
                fn(layer)
            if device == "cuda":
                torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        return statistics.median(runs)

    return {
        "pair statistics": seconds(lambda layer: pair_statistics(layer.q, layer.k, layer.layout, bins=64)),
        "mean logit": seconds(mean_logit_by_distance),
        "all statistics": seconds(lambda layer: layer_statistics(layer, 64)),
    }


def mean_logit_error(layers: list) -> float:
    """What the probe's float32 FFT (with its float64 tail) costs in accuracy: the largest
    deviation from the same statistic computed in float64 throughout, over all layers and
    heads, relative to that head's largest mean logit."""
    from anomaly.probe import mean_logit_by_distance

    worst = 0.0
    for layer in layers:
        fast = mean_logit_by_distance(layer)
        exact = mean_logit_by_distance(layer.to(torch.float64))
        rel = (fast - exact).abs().amax(-1) / exact.abs().amax(-1)
        worst = max(worst, float(rel.max()))
    return worst


if __name__ == "__main__":
    sys.exit(run_main(main))
