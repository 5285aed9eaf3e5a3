"""The per-head case-(d) share three ways: this probe, nnsight, TransformerLens; time, memory, equality.

    .venv-bench/bin/python benchmarks/compare_tools.py --models smollm2-135m gemma3-270m \\
        --tokens 512 2048 8192 --repeats 2

(``python3 dev.py bench`` sets up ``.venv-bench`` and runs this; nnsight and TransformerLens
are benchmark-only extras, ``pip install -e .[bench]``, never runtime dependencies.)

The quantity: per layer and query head, the share of causal triples (query ``m`` > key
``n``, slice ``j``) whose initial angle ``Θ_j(m, n) = arg q_{m,j} − arg k_{n,j} mod 2π``
lies in ``(π, 2π)`` (case (d)), with ``q``/``k`` the **pre-RoPE** queries and keys and the
model's own slice layout (HF Llama and Gemma: ``"half"``, slice ``j`` = dims ``j, j + d/2``):
``ProbeResult.anomalous_fraction``, ``[layers, heads]``. Three methods, on the same tokens
(the first ``--tokens`` tokens of *Hamlet*), each wrapping its own copy of the same loaded
model (float32, CPU):

* ``probe``: :func:`anomaly.probe.probe` (its exact O(T log T) statistics; it computes more
  than this share: histograms, mean angles, mean logits by distance);
* ``nnsight``: ``NNsight(model)``; one ``trace`` saves every layer's pre-RoPE q/k (the
  ``q_proj``/``k_proj`` outputs for Llama, the ``q_norm``/``k_norm`` outputs for Gemma 3,
  whose norms come before the rotation) and stops after the last layer
  (``tracer.stop()``, so no LM head); then :func:`case_d_counts` on each layer;
* ``transformerlens``: ``TransformerBridge.boot_transformers(hub id, hf_model=model)``
  (TransformerLens 4 removed ``HookedTransformer``; the bridge is its replacement and wraps an
  HF model offline); ``run_with_cache`` with ``names_filter`` on ``blocks.{l}.attn.hook_q`` /
  ``hook_k`` (Gemma 3: ``hook_q_normed`` / ``hook_k_normed``), pre-RoPE (the bridge's
  ``hook_rot_q``/``hook_rot_k`` are after the rotation) and ``stop_at_layer`` = the number of
  layers (no LM head); then :func:`case_d_counts`. The bridge computes attention itself,
  eagerly (it switches the model to ``attn_implementation="eager"`` so that its pattern hooks
  fire), so it materialises each layer's ``[heads, T, T]`` scores.

:func:`case_d_counts` is the straightforward vectorised computation a user would write: phases
by ``atan2`` per slice, ``Θ = (a_m − b_n) mod 2π`` by broadcasting one chunk of queries against
all earlier keys, a causal mask, a count of ``Θ > π``; O(T²) per slice and head. Chunks hold
at most ``--chunk-mib`` MiB of Θ (``[queries, keys, slices]`` float32; 256 MiB: 256 queries
a chunk for SmolLM2 at 8K tokens, 64 for Gemma 3).

Equality: each tool's shares against the probe's, max |difference| over layers and heads and
the number of (layer, head) cells whose counts differ (float32 ``atan2``/``remainder``
rounding can move a triple that sits within ~1e-7 rad of 0 or π across the boundary; the
probe decides on the exact phases). The two tools' q/k are also compared with each other.

Above ``--full-count-max`` tokens the O(T²) count runs on ``--partial-layers`` layers only (the
first and the last by default: for Gemma 3 one sliding and one global layer); the table then
gives the measured time and ``est. all layers`` = capture + count × layers / counted (every
layer has the same shape, so the same count cost), and equality is checked on those layers.
Above ``--count-max`` tokens the count does not run at all: only the tools' captures are
measured, and ``est. all layers`` adds the longest counted length's count per layer scaled by
``(T / T₀)²`` (the count is elementwise work over the T(T−1)/2 pairs); nothing is checked there.

Time: one untimed warm-up round at 64 tokens per model (numba compiles the probe's sweep,
nnsight and the bridge set up their hooks); then ``--repeats`` rounds per length with the
methods' order rotated from round to round, so that load from other jobs falls on all alike;
medians. Memory: each call's peak resident set above the one before it
(:func:`benchmarks.memory.peak_extra_bytes`): every buffer the call allocated, cached
activations and results included, weights excluded. That needs glibc to return freed
memory at once, so the script re-runs itself with ``MALLOC_MMAP_THRESHOLD_`` set
(:data:`benchmarks.memory.MMAP_THRESHOLD`); time and memory come from the same calls, in one
process. The setting slows allocation-heavy code, the probe's statistics most
(``benchmarks/probe_speed.py`` times the probe without it); ``--no-memory`` runs with glibc's
defaults and no memory figures.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from anomaly.cli import ArgumentParser, run_main  # noqa: E402
from anomaly.errors import UserError  # noqa: E402
from benchmarks.memory import MMAP_THRESHOLD, can_measure_rss, peak_extra_bytes  # noqa: E402
from benchmarks.probe_speed import _median  # noqa: E402

METHODS = ("probe", "nnsight", "transformerlens")
WARMUP_TOKENS = 64
TWO_PI = 2 * math.pi


# --------------------------------------------------------------------------------------
# What a user would write after capturing q/k
# --------------------------------------------------------------------------------------


def case_d_counts(q: Tensor, k: Tensor, *, chunk_mib: float = 256) -> Tensor:
    """Causal (query, key, slice) triples in case (d), per query head, by brute force.

    Args:
        q: ``[H, T, D]`` pre-RoPE queries of one layer, "half" layout (slice ``j`` is dims
            ``j`` and ``j + D/2``).
        k: ``[KV, T, D]`` pre-RoPE keys; query head ``h`` reads key head ``h // (H / KV)``.
        chunk_mib: largest Θ block (``[queries, keys, slices]`` float32) held at once.

    Returns:
        ``[H]`` int64 counts of ``m > n``, ``j < D/2`` with ``(arg q_{m,j} − arg k_{n,j}) mod 2π``
        in ``(π, 2π)``; the share is ``count / (J · T(T−1)/2)``.
    """
    h, t, d = q.shape
    j = d // 2
    a = torch.atan2(q[..., j:], q[..., :j])  # [H, T, J] query phases
    b = torch.atan2(k[..., j:], k[..., :j])  # [KV, T, J] key phases
    per_kv = h // k.shape[0]
    chunk = max(1, int(chunk_mib * 2**20) // (t * j * 4))
    counts = torch.zeros(h, dtype=torch.int64)
    for head in range(h):
        keys = b[head // per_kv]
        for m0 in range(1, t, chunk):  # query 0 has no earlier key
            m1 = min(m0 + chunk, t)
            theta = torch.remainder(a[head, m0:m1, None, :] - keys[None, : m1 - 1, :], TWO_PI)  # [C, m1-1, J]
            earlier = torch.arange(m1 - 1) < torch.arange(m0, m1)[:, None]  # [C, m1-1]: n < m
            counts[head] += torch.count_nonzero((theta > math.pi) & earlier[..., None])
    return counts


def shares(layers: Sequence[tuple[Tensor, Tensor]], counted: Sequence[int], chunk_mib: float) -> np.ndarray:
    """``[len(counted), H]`` case-(d) shares of the layers ``counted`` of ``layers`` (``(q, k)``
    pairs as :func:`case_d_counts` takes them)."""
    out = []
    for index in counted:
        q, k = layers[index]
        t, j = q.shape[1], q.shape[2] // 2
        out.append(case_d_counts(q, k, chunk_mib=chunk_mib).double().numpy() / (j * t * (t - 1) // 2))
    return np.stack(out)


# --------------------------------------------------------------------------------------
# The three methods
# --------------------------------------------------------------------------------------


@dataclass
class Model:
    """One model as each method sees it: its own copy of the weights per method."""

    name: str
    hub_id: str
    copies: dict[str, torch.nn.Module]
    """method → the HF model (``probe``, ``nnsight``) or the TransformerLens bridge."""
    ids: Tensor
    """``[T_max]`` token ids."""
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool
    """Gemma 3: q/k RMS norms before the rotation, so pre-RoPE = the norms' outputs."""
    tl_note: str = ""
    """What had to be done for TransformerLens to wrap it, or why it could not."""


def load(name: str, tokens: int, methods: Sequence[str]) -> Model:
    from anomaly.corpus import default_document
    from anomaly.models import MODELS, load_model

    first = load_model(name, "cpu", "float32")  # SDPA attention, eval mode
    cfg = first.model.config
    ids = first.tokenizer(default_document().read(), return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if ids.numel() < tokens:
        raise UserError(f"--tokens {tokens} exceeds the document's {ids.numel()} tokens for {name}")
    hub_id = MODELS[name]
    copies: dict[str, torch.nn.Module] = {}
    tl_note = ""
    for method in methods:
        model = first.model if not copies else copy.deepcopy(first.model)  # same weights, own modules
        if method == "nnsight":
            from nnsight import NNsight

            copies[method] = NNsight(model)
        elif method == "transformerlens":
            copies[method], tl_note = _boot_bridge(model, hub_id, first.tokenizer)
            if copies[method] is None:
                del copies[method]
        else:
            copies[method] = model
    return Model(
        name=name, hub_id=hub_id, copies=copies, ids=ids[:tokens], layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        qk_norm=hasattr(first.model.model.layers[0].self_attn, "q_norm"), tl_note=tl_note,
    )


def _boot_bridge(model: torch.nn.Module, hub_id: str, tokenizer) -> tuple[object | None, str]:
    """TransformerLens's bridge around ``model`` offline, and a note of what it took."""
    from transformer_lens.model_bridge import TransformerBridge

    def boot():
        return TransformerBridge.boot_transformers(hub_id, hf_model=model, tokenizer=tokenizer,
                                                    device="cpu", dtype=torch.float32)

    try:
        return boot(), ""
    except ValueError as exc:
        first_line = str(exc).splitlines()[0]
        if "Could not determine supported architecture" not in first_line or model.config.architectures:
            return None, f"cannot wrap: {type(exc).__name__}: {first_line[:300]}"
    # transformers' GGUF loader leaves config.architectures empty, and TransformerLens maps
    # model_type "llama" to an architecture but not "gemma3_text": give the config the class
    # name the hub's config.json carries.
    model.config.architectures = [type(model).__name__]
    try:
        return boot(), (f"config.architectures set to {model.config.architectures} first (the GGUF "
                        "config has none, and TransformerLens does not map model_type "
                        f"{model.config.model_type!r})")
    except Exception as exc:  # noqa: BLE001 - reported, not hidden
        return None, f"cannot wrap: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def capture_nnsight(m: Model, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Every layer's pre-RoPE ``(q [H, T, D], k [KV, T, D])`` through one nnsight trace."""
    wrapped = m.copies["nnsight"]
    saved: list[tuple[object, object]] = []
    with wrapped.trace(ids[None], use_cache=False) as tracer:
        for layer in range(m.layers):
            attn = wrapped.model.layers[layer].self_attn
            if m.qk_norm:  # [1, H, T, D], after the norms, before the rotation
                saved.append((attn.q_norm.output.save(), attn.k_norm.output.save()))
            else:  # [1, T, H·D]
                saved.append((attn.q_proj.output.save(), attn.k_proj.output.save()))
        tracer.stop()  # nothing after the last layer is needed: no LM head
    if m.qk_norm:
        return [(q[0], k[0]) for q, k in saved]
    t, d = ids.numel(), m.head_dim
    return [(q[0].view(t, m.heads, d).transpose(0, 1), k[0].view(t, m.kv_heads, d).transpose(0, 1))
            for q, k in saved]


def _tl_hooks(m: Model) -> tuple[str, str]:
    return ("hook_q_normed", "hook_k_normed") if m.qk_norm else ("hook_q", "hook_k")


def capture_transformerlens(m: Model, ids: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Every layer's pre-RoPE ``(q [H, T, D], k [KV, T, D])`` through ``run_with_cache``."""
    bridge = m.copies["transformerlens"]
    hq, hk = _tl_hooks(m)
    names = [f"blocks.{layer}.attn.{hook}" for layer in range(m.layers) for hook in (hq, hk)]
    _, cache = bridge.run_with_cache(ids[None], names_filter=names, stop_at_layer=m.layers)

    def heads(x: Tensor) -> Tensor:  # hook_q/k: [1, T, H, D]; hook_*_normed: [1, H, T, D]
        return x[0] if m.qk_norm else x[0].transpose(0, 1)

    return [(heads(cache[f"blocks.{layer}.attn.{hq}"]), heads(cache[f"blocks.{layer}.attn.{hk}"]))
            for layer in range(m.layers)]


@dataclass
class Outcome:
    """One call of one method: its shares and its parts' times."""

    shares: np.ndarray
    """``[len(counted), H]``."""
    capture_s: float = 0.0
    count_s: float = 0.0
    qk: list[tuple[Tensor, Tensor]] | None = None
    """The captured q/k of the counted layers (to compare the tools with each other)."""


def run_method(method: str, m: Model, ids: Tensor, counted: Sequence[int], chunk_mib: float) -> Outcome:
    """One call of ``method`` on ``ids``: the probe, or a tool's capture followed by the count."""
    if method == "probe":
        from anomaly.probe import probe

        return Outcome(shares=probe(m.copies["probe"], ids).anomalous_fraction[list(counted)])
    start = time.perf_counter()
    layers = capture_nnsight(m, ids) if method == "nnsight" else capture_transformerlens(m, ids)
    captured = time.perf_counter()
    result = shares(layers, counted, chunk_mib) if counted else np.zeros((0, m.heads))
    return Outcome(shares=result, capture_s=captured - start, count_s=time.perf_counter() - captured,
                   qk=[layers[i] for i in counted])


# --------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------


@dataclass
class Measured:
    """Timed calls of one (model, length, method)."""

    seconds: list[float] = field(default_factory=list)
    capture_s: list[float] = field(default_factory=list)
    count_s: list[float] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    """Peak extra memory of each call, bytes."""
    outcome: Outcome | None = None
    """The last call's result (for the equality checks)."""


def counted_layers(m: Model, tokens: int, full_count_max: int, partial: Sequence[int],
                   count_max: int | None = None) -> list[int]:
    if count_max is not None and tokens > count_max:
        return []
    if tokens <= full_count_max:
        return list(range(m.layers))
    return sorted({p % m.layers for p in partial})


def measure(m: Model, tokens: int, repeats: int, counted: list[int], chunk_mib: float,
            memory: bool) -> dict[str, Measured]:
    """``repeats`` rounds of every method on the first ``tokens`` ids, order rotated per round."""
    ids = m.ids[:tokens]
    methods = [x for x in METHODS if x in m.copies]
    out = {x: Measured() for x in methods}
    for rnd in range(repeats):
        order = methods[rnd % len(methods):] + methods[: rnd % len(methods)]
        for method in order:
            def call() -> Outcome:
                return run_method(method, m, ids, counted, chunk_mib)

            start = time.perf_counter()
            result, extra, _ = peak_extra_bytes(call, "cpu") if memory else (call(), None, None)
            got = out[method]
            got.seconds.append(time.perf_counter() - start)
            got.capture_s.append(result.capture_s)
            got.count_s.append(result.count_s)
            if extra is not None:
                got.extra.append(extra)
            got.outcome = result
            del result
            print(f"  {m.name} {tokens} tokens round {rnd + 1}: {method} {got.seconds[-1]:.1f} s", file=sys.stderr,
                  flush=True)
    return out


def equality(by_method: dict[str, Measured], m: Model, tokens: int, counted: list[int], chunk_mib: float,
             recount: bool) -> list[str]:
    """Lines saying how far each tool's shares are from the probe's, and the tools' q/k apart;
    where ``recount``, whether the count in float64 of the first counted layer equals the probe's."""
    if not counted:
        return [f"{m.name} {tokens} tokens: not checked (the count was not run above --count-max)"]
    lines = []
    ref = by_method["probe"].outcome.shares
    pairs = tokens * (tokens - 1) // 2
    j = m.head_dim // 2
    for method in METHODS[1:]:
        if method not in by_method:
            continue
        got = by_method[method].outcome.shares
        diff = np.abs(got - ref)
        cells = int((np.rint(diff * j * pairs) > 0).sum())
        lines.append(f"{m.name} {tokens} tokens: {method} vs probe: max |Δ share| = {diff.max():.2e} "
                     f"(at most {int(np.rint(diff.max() * j * pairs))} of {j * pairs} triples); "
                     f"{cells} of {diff.size} (layer, head) cells differ")
    if recount and "nnsight" in by_method:
        # Are the differences float32 rounding? The same count in float64 on nnsight's q/k.
        q, k = by_method["nnsight"].outcome.qk[0]
        exact = case_d_counts(q.double(), k.double(), chunk_mib=chunk_mib).numpy()
        same = np.array_equal(exact, np.rint(ref[0] * j * pairs).astype(np.int64))
        lines.append(f"{m.name} {tokens} tokens: the count in float64 on nnsight's q/k of layer {counted[0]}: "
                     + ("equal to the probe's counts in every head" if same else "differs from the probe's"))
    if all(x in by_method for x in METHODS[1:]):
        a, b = by_method["nnsight"].outcome.qk, by_method["transformerlens"].outcome.qk
        worst = max(float((qa - qb).abs().max()) for (qa, ka), (qb, kb) in zip(a, b) for qa, qb in ((qa, qb), (ka, kb)))
        lines.append(f"{m.name} {tokens} tokens: nnsight vs transformerlens q/k: max |Δ| = {worst:.2e}")
    return lines


def table(rows: list[tuple[Model, int, list[int], dict[str, Measured]]]) -> str:
    head = [
        "| model | tokens | method | time (s) | capture (s) | count (s) | layers counted | est. all layers (s) "
        "| × probe | peak extra (MiB) | × probe |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    per_layer: dict[tuple[str, str], tuple[int, float]] = {}  # (model, method) → (tokens, count s a layer)
    for m, tokens, counted, by_method in rows:
        probe_t = _median(by_method["probe"].seconds)
        probe_mem = _median(by_method["probe"].extra)
        for method, got in by_method.items():
            t = _median(got.seconds)
            mark = "" if method == "probe" or len(counted) == m.layers else " (est.)"
            if method == "probe" or len(counted) == m.layers:
                full = t
            elif counted:
                full = _median(got.capture_s) + _median(got.count_s) * m.layers / len(counted)
            elif (m.name, method) in per_layer:  # not counted: the count is O(T²) elementwise work
                t0, s0 = per_layer[m.name, method]
                full = _median(got.capture_s) + s0 * m.layers * (tokens / t0) ** 2
                mark = f" (est. {t0}'s × {(tokens / t0) ** 2:g})"
            else:
                full, mark = float("nan"), ""
            if method != "probe" and counted:
                per_layer[m.name, method] = (tokens, _median(got.count_s) / len(counted))
            mem = _median(got.extra)
            parts = ("—", "—") if method == "probe" else (f"{_median(got.capture_s):.2f}", f"{_median(got.count_s):.2f}")
            head.append(
                f"| {m.name} | {tokens} | {method} | {t:.2f} | {parts[0]} | {parts[1]} | "
                f"{m.layers if method == 'probe' else len(counted)}/{m.layers} | "
                f"{full:.1f}{mark} | "
                f"{full / probe_t:.1f} | {'—' if mem is None else f'{mem / 2**20:.0f}'} | "
                f"{'—' if mem is None or not probe_mem else f'{mem / probe_mem:.1f}'} |"
            )
    return "\n".join(head)


def versions() -> str:
    names = ("torch", "transformers", "nnsight", "transformer-lens", "numba")
    found = []
    for n in names:
        try:
            found.append(f"{n} {importlib.metadata.version(n)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{n} (not installed)")
    return ", ".join(found)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python benchmarks/compare_tools.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"],
                   help="bundled short names (default smollm2-135m gemma3-270m)")
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048, 8192], help="lengths (default 512 2048 8192)")
    p.add_argument("--repeats", type=int, nargs="+", default=[2],
                   help="timed rounds per length: one number for all, or one per --tokens (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--chunk-mib", type=float, default=256, help="largest Θ block of the count, MiB (default 256)")
    p.add_argument("--full-count-max", type=int, default=512,
                   help="longest length whose count covers every layer (default 512)")
    p.add_argument("--partial-layers", type=int, nargs="+", default=[0, -1],
                   help="layers counted above --full-count-max (default 0 -1: the first and the last)")
    p.add_argument("--count-max", type=int, default=None,
                   help="longest length at which the tools' O(T²) count runs at all (default: every "
                        "length); above it only their capture is measured and the count estimated")
    p.add_argument("--no-memory", action="store_true", help="glibc's default allocator, no memory figures")
    args = p.parse_args(argv)
    if min(args.tokens) < 2 or min(args.repeats) < 1 or args.threads < 1 or args.chunk_mib <= 0:
        raise UserError("--tokens must be ≥ 2, --repeats and --threads ≥ 1, --chunk-mib > 0")
    if len(args.repeats) not in (1, len(args.tokens)):
        raise UserError(f"--repeats takes one number or one per --tokens ({len(args.tokens)}), "
                        f"got {len(args.repeats)}")
    args.repeats = dict(zip(args.tokens, args.repeats * len(args.tokens) if len(args.repeats) == 1 else args.repeats))
    if "probe" not in args.methods:
        raise UserError("--methods must include probe (the reference of the equality checks)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    memory = not args.no_memory and can_measure_rss()
    if memory and os.environ.get("MALLOC_MMAP_THRESHOLD_") != str(MMAP_THRESHOLD):
        # glibc reads the setting at start-up: run again with it (module docstring).
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD))
        argv = list(sys.argv[1:] if argv is None else argv)
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    rows = []
    notes, checks = [], []
    for name in args.models:
        m = load(name, max(args.tokens), args.methods)
        if "transformerlens" in args.methods:
            notes.append(f"{name}: TransformerLens " + (m.tl_note or "wrapped the loaded model as it is"))
        warm = min(WARMUP_TOKENS, *args.tokens)
        measure(m, warm, 1, counted_layers(m, warm, args.full_count_max, args.partial_layers), args.chunk_mib, False)
        for tokens in args.tokens:
            counted = counted_layers(m, tokens, args.full_count_max, args.partial_layers, args.count_max)
            by_method = measure(m, tokens, args.repeats[tokens], counted, args.chunk_mib, memory)
            rows.append((m, tokens, counted, by_method))
            found = equality(by_method, m, tokens, counted, args.chunk_mib, tokens <= args.full_count_max)
            checks.extend(found)
            print("\n".join(found), file=sys.stderr, flush=True)
        for method in list(m.copies):  # free the copies before the next model's
            del m.copies[method]

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads; {versions()}")
    rounds = ", ".join(f"{n} at {t} tokens" for t, n in args.repeats.items())
    print(f"float32, CPU; time: medians of the rounds ({rounds}), methods rotated per round; memory: "
          + ("peak extra resident set of the same calls (MALLOC_MMAP_THRESHOLD_ set)" if memory else "not measured")
          + f"; count: Θ blocks ≤ {args.chunk_mib:g} MiB, every layer up to {args.full_count_max} tokens, "
          f"layers {args.partial_layers} above")
    print(table(rows))
    print("\n".join(notes + checks))
    print(f"(timed part {time.perf_counter() - started:.0f} s; command: python benchmarks/compare_tools.py "
          f"{' '.join(sys.argv[1:] if argv is None else argv)})")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
