"""CoCA attention speed and memory beside vanilla RoPE attention, measured in one run.

    python benchmarks/coca_speed.py                        # CPU, 1K..16K tokens
    python benchmarks/coca_speed.py --device cuda --lengths 1024 4096 16384 32768

Four methods, the same q/k(t)/v shapes, the same fused kernel where they use one:

* ``vanilla``: ``apply_rope`` on q and k, then ``scaled_dot_product_attention``;
* ``slack`` / ``strict``: :func:`anomaly.coca.coca_attention` (per-token transforms, then
  the same fused SDPA);
* ``einsum``: the released code's formulation (slack scores materialised by einsum, then
  softmax and a matmul; O(N²) memory), :func:`anomaly.coca.einsum_attention`.

Time: median wall time of repeated calls, methods interleaved round-robin in one process
so that a busy machine slows all of them alike. Forward, and forward + backward of
``out.sum()`` with respect to q, k/t and v.

Peak memory: each (length, method) runs in a fresh subprocess (glibc told by
``MALLOC_MMAP_THRESHOLD_`` to return every allocation above 64 KiB to the OS), and the
call's peak extra memory is measured as :func:`benchmarks.memory.peak_extra_bytes`
describes: on the CPU the peak resident set above the one before the call, on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from anomaly.cli import ArgumentParser, UserError, check_memory, finite_float, positive_int, run_main  # noqa: E402
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from anomaly.coca import coca_attention, einsum_attention  # noqa: E402
from anomaly.rope import apply_rope, inv_freq  # noqa: E402
from benchmarks.memory import MMAP_THRESHOLD, peak_extra_bytes  # noqa: E402

METHODS = ("vanilla", "slack", "strict", "einsum")
MODES = ("fwd", "fwd+bwd")


@dataclass
class Shape:
    """Attention problem size."""

    batch: int
    """Sequences per call."""
    heads: int
    """Query heads."""
    kv_heads: int
    """Key/value (T/value for CoCA) heads."""
    head_dim: int
    """Head size ``d``."""
    base: float
    """RoPE base."""
    dtype: str
    """``float32``, ``bfloat16`` or ``float16``."""
    device: str
    """``cpu`` or ``cuda``."""


def make_inputs(shape: Shape, length: int, grad: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator(device="cpu").manual_seed(length)
    dtype = getattr(torch, shape.dtype)

    def rand(heads: int) -> torch.Tensor:
        x = torch.randn(shape.batch, heads, length, shape.head_dim, generator=g)
        return x.to(shape.device, dtype).requires_grad_(grad)

    return rand(shape.heads), rand(shape.kv_heads), rand(shape.kv_heads)


def make_call(method: str, shape: Shape):
    freqs = inv_freq(shape.head_dim, shape.base, dtype=torch.float32).to(shape.device)
    gqa = shape.heads != shape.kv_heads

    def vanilla(q, k, v):
        pos = torch.arange(q.shape[-2], device=q.device)
        q_rot, k_rot = apply_rope(q, pos, freqs), apply_rope(k, pos, freqs)
        return F.scaled_dot_product_attention(q_rot, k_rot, v, is_causal=True, enable_gqa=gqa)

    def coca(variant):
        return lambda q, t, v: coca_attention(q, t, v, variant=variant, inv_freq=freqs)

    def einsum(q, t, v):
        return einsum_attention(q, t, v, variant="slack", inv_freq=freqs)

    return {"vanilla": vanilla, "slack": coca("slack"), "strict": coca("strict"), "einsum": einsum}[
        method
    ]


def run_once(call, inputs, mode: str) -> None:
    if mode == "fwd":
        with torch.no_grad():
            call(*inputs)
    else:
        for x in inputs:
            x.grad = None
        call(*inputs).sum().backward()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def einsum_bytes(shape: Shape, length: int, mode: str) -> int:
    """Rough peak of the einsum formulation: score-sized tensors alive at once."""
    scores = shape.batch * shape.heads * length * length * 4  # float32 softmax
    return scores * (3 if mode == "fwd" else 6)


# --------------------------------------------------------------------------------------
# Memory: one subprocess per (length, method)
# --------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """Print ``{mode: peak_extra_bytes}`` for one method and length as JSON."""
    shape = Shape(**json.loads(args.shape))
    call = make_call(args.method, shape)
    # Warm up kernels, thread pools and lazy library loads at a small size first.
    run_once(call, make_inputs(shape, 64, True), "fwd+bwd")
    out = {}
    for mode in args.modes:
        inputs = make_inputs(shape, args.length, grad=mode != "fwd")
        out[mode] = peak_extra_bytes(lambda: run_once(call, inputs, mode), shape.device)[1]
        del inputs
    print(json.dumps(out))


def measure_memory(shape: Shape, length: int, method: str, modes: list[str]) -> dict[str, int]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
    cmd = [
        sys.executable, __file__, "--_worker", "--method", method, "--length", str(length),
        "--shape", json.dumps(asdict(shape)), "--modes", *modes,
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"memory worker failed ({method}, {length}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------


@dataclass
class Row:
    """One (length, mode, method) measurement."""

    length: int
    """Tokens."""
    mode: str
    """``fwd`` or ``fwd+bwd``."""
    method: str
    """One of :data:`METHODS`."""
    seconds: float | None = None
    """Median wall time per call; ``None`` when skipped."""
    repeats: int = 0
    """Timed calls."""
    peak_bytes: int | None = None
    """Peak extra memory of one call (see the module docstring)."""
    skipped: str | None = None
    """Why it was not run."""
    times: list[float] = field(default_factory=list)
    """Every timed call, seconds."""


def default_repeats(length: int, device: str) -> int:
    if device == "cuda":
        return 10
    return 5 if length <= 2048 else 3 if length <= 4096 else 1


def benchmark(args: argparse.Namespace) -> list[Row]:
    shape = Shape(args.batch, args.heads, args.kv_heads, args.head_dim, args.base, args.dtype, args.device)
    rows: list[Row] = []
    for length in args.lengths:
        modes = [m for m in MODES if m == "fwd" or length <= args.backward_max]
        if length > args.backward_max:
            rows.append(Row(length, "fwd+bwd", "*", skipped=f"length > --backward-max {args.backward_max}"))
        for mode in modes:
            methods = []
            for method in METHODS:
                if method == "einsum":
                    need = einsum_bytes(shape, length, mode)
                    if need > args.einsum_max_gib * 2**30:
                        rows.append(Row(length, mode, method, skipped=(
                            f"needs ~{need / 2**30:.1f} GiB > --einsum-max-gib {args.einsum_max_gib}"
                        )))
                        continue
                methods.append(method)
            calls = {m: make_call(m, shape) for m in methods}
            inputs = make_inputs(shape, length, grad=mode != "fwd")
            for m in methods:  # warm-up, untimed
                run_once(calls[m], inputs, mode)
            times: dict[str, list[float]] = {m: [] for m in methods}
            repeats = args.repeats or default_repeats(length, args.device)
            for _ in range(repeats):
                for m in methods:  # round-robin: load changes hit every method alike
                    sync(args.device)
                    start = time.perf_counter()
                    run_once(calls[m], inputs, mode)
                    sync(args.device)
                    times[m].append(time.perf_counter() - start)
            del inputs
            for m in methods:
                rows.append(Row(length, mode, m, statistics.median(times[m]), repeats, times=times[m]))
            print(f"  timed {length} tokens, {mode}", file=sys.stderr, flush=True)
        if not args.no_memory:
            for method in METHODS:
                wanted = [
                    r.mode for r in rows
                    if r.length == length and r.method == method and r.skipped is None
                ]
                if wanted:
                    peaks = measure_memory(shape, length, method, wanted)
                    for r in rows:
                        if r.length == length and r.method == method and r.mode in peaks:
                            r.peak_bytes = peaks[r.mode]
            print(f"  measured memory at {length} tokens", file=sys.stderr, flush=True)
    return rows


def _fmt_time(s: float | None) -> str:
    return "—" if s is None else f"{s * 1000:9.1f}"


def _fmt_mib(b: int | None) -> str:
    return "—" if b is None else f"{b / 2**20:8.1f}"


def table(rows: list[Row]) -> str:
    """Markdown table: time and peak memory per method, and ratios to vanilla."""
    out = [
        "| tokens | pass | method | time (ms) | × vanilla | peak extra (MiB) | × vanilla |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    by_key = {(r.length, r.mode, r.method): r for r in rows}
    for r in rows:
        if r.skipped is not None:
            out.append(f"| {r.length} | {r.mode} | {r.method} | skipped: {r.skipped} | | | |")
            continue
        base = by_key.get((r.length, r.mode, "vanilla"))
        t_ratio = f"{r.seconds / base.seconds:.2f}" if base and base.seconds else "—"
        m_ratio = (
            f"{r.peak_bytes / base.peak_bytes:.2f}"
            if base and base.peak_bytes and r.peak_bytes is not None else "—"
        )
        out.append(
            f"| {r.length} | {r.mode} | {r.method} | {_fmt_time(r.seconds).strip()} | {t_ratio} "
            f"| {_fmt_mib(r.peak_bytes).strip()} | {m_ratio} |"
        )
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python benchmarks/coca_speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--heads", type=positive_int, default=8)
    p.add_argument("--kv-heads", type=positive_int, default=4)
    p.add_argument("--head-dim", type=positive_int, default=64)
    p.add_argument("--base", type=finite_float, default=10000.0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--repeats", type=int, default=0, help="timed calls per method (0: by length)")
    p.add_argument("--backward-max", type=int, default=8192,
                   help="longest length timed with a backward pass (keeps the CPU run short)")
    p.add_argument("--einsum-max-gib", type=finite_float, default=4.0,
                   help="skip the einsum formulation where its scores would need more")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--json", type=Path, help="also write the rows here")
    # Internal: the memory worker.
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--modes", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return args
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; run on a GPU machine or use --device cpu")
    if args.heads % args.kv_heads:
        raise UserError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.head_dim % 2:
        raise UserError(f"--head-dim must be even (RoPE rotates pairs of dimensions), got {args.head_dim}")
    if args.base <= 1:
        raise UserError(f"--base must be above 1 (the RoPE base), got {args.base}")
    if args.repeats < 0 or args.backward_max < 0 or args.einsum_max_gib < 0:
        raise UserError("--repeats, --backward-max and --einsum-max-gib must be at least 0")
    shape = Shape(args.batch, args.heads, args.kv_heads, args.head_dim, args.base, args.dtype, args.device)
    longest = max(args.lengths)
    need = linear_bytes(shape, longest, "fwd+bwd" if longest <= args.backward_max else "fwd")
    if args.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        if need > total:
            raise UserError(f"--lengths {longest}: the attention inputs and outputs would take "
                            f"{need / 2**30:.3g} GiB, more than the GPU's {total / 2**30:.3g} GiB; use shorter --lengths")
    else:
        check_memory(need, f"--lengths {longest}: the attention inputs and outputs",
                     "use shorter --lengths or a smaller --batch")
    return args


def linear_bytes(shape: Shape, length: int, mode: str) -> int:
    """Memory of one call's inputs, outputs and per-token transforms (everything but the
    einsum's scores, which :func:`einsum_bytes` bounds): q, k/t, v, their rotated copies and
    the output, and as much again for gradients in ``fwd+bwd``."""
    elem = torch.empty((), dtype=getattr(torch, shape.dtype)).element_size()
    per_token = shape.batch * (3 * shape.heads + 3 * shape.kv_heads) * shape.head_dim * elem
    return length * per_token * (2 if mode == "fwd+bwd" else 1)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return
    start = time.perf_counter()
    rows = benchmark(args)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"CoCA vs vanilla attention — {device}, torch {torch.__version__}, batch {args.batch}, "
        f"heads {args.heads}/{args.kv_heads} (q/kv), head_dim {args.head_dim}, {args.dtype}, causal"
    )
    print(table(rows))
    print(f"\n(total {time.perf_counter() - start:.0f} s; command: python benchmarks/coca_speed.py "
          f"{' '.join(sys.argv[1:])})")
    if args.json:
        from anomaly.io import write_json

        write_json(args.json, {"args": vars(args) | {"json": str(args.json)}, "rows": rows})


if __name__ == "__main__":
    sys.exit(run_main(main))
