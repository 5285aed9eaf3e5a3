"""The probe's memory above the forward pass it runs: one layer's worth, whatever the depth.

:func:`anomaly.probe.probe` measures each layer as the forward pass reaches it and frees its
q/k (``capture(on_layer=...)``); what it keeps per layer is its results (per-head mean logit
by distance ``[H, T]``, Θ histograms ``[H, J, bins]``, per-slice arrays). So on models of the
same width, adding layers may add only those results to the peak, never the layers' q/k;
and the peak grows linearly in the tokens (nothing ``[T, T]``, with SDPA attention).

Memory is torch's own accounting: on the CPU every allocation and free of torch's CPU
allocator as its profiler records them (``profile_memory``; numpy buffers, such as the
compiled sweep's per-group scratch, are not seen), on CUDA the device allocator's peak.
Both count bytes exactly, so the bounds below are not at the mercy of a noisy machine.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from anomaly.probe import capture, probe

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 64
BINS = 16

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    ),
]


def peak_allocated(fn: Callable[[], object], device: str) -> int:
    """Peak bytes torch allocated while ``fn()`` ran, above what was allocated before
    (transient and returned buffers alike; the result is dropped inside)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    live = peak = 0
    for _, size in cpu_allocations(fn)[0]:
        live += size
        peak = max(peak, live)
    return peak


MARK = "anomaly_test_mark"
"""Name of the profiler range :func:`cpu_allocations` reports the start times of."""


def cpu_allocations(fn: Callable[[], object]) -> tuple[list[tuple[int, int]], list[int]]:
    """Every allocation (+bytes) and free (−bytes) of torch's CPU allocator while ``fn()``
    ran, as ``(time_ns, bytes)`` in time order (events at the same time netted first, so
    their order does not matter), and the start times of the ``record_function(MARK)``
    ranges it entered."""
    from torch._C._profiler import _ExtraFields_Allocation
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    by_time: dict[int, int] = {}
    marks = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if isinstance(node.extra_fields, _ExtraFields_Allocation):
            by_time[node.start_time_ns] = by_time.get(node.start_time_ns, 0) + node.extra_fields.alloc_size
        elif node.name == MARK:
            marks.append(node.start_time_ns)
    assert by_time, "the profiler recorded no allocation: the accounting is broken"
    return sorted(by_time.items()), sorted(marks)


def tiny_llama(layers: int, device: str) -> torch.nn.Module:
    """A random LLaMA of ``layers`` layers; the width is fixed, so models differ only in depth.
    Heads of the usual size on a narrow residual stream and MLP: q/k as large as a real
    layer's per token, at a fraction of the compute."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        max_position_embeddings=4096, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval().to(device)


def layer_qk_bytes(tokens: int) -> int:
    """One layer's captured q and k in float32."""
    return (HEADS + KV_HEADS) * tokens * HEAD_DIM * 4


def probe_above_forward(model: torch.nn.Module, ids: torch.Tensor, device: str) -> int:
    """Peak bytes of ``probe`` minus those of the bare forward (no LM head) on the same ids."""

    def forward() -> None:
        with torch.inference_mode():
            model(ids[None], use_cache=False, logits_to_keep=1)

    return peak_allocated(lambda: probe(model, ids, bins=BINS), device) - peak_allocated(forward, device)


def _ids(tokens: int, device: str) -> torch.Tensor:
    return torch.randint(0, 256, (tokens,), generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.slow  # ~30-40 s on a busy 2-core CPU: profiles two probes of an 8-layer model
@pytest.mark.parametrize("device", DEVICES)
def test_probe_memory_above_forward_does_not_grow_with_layers(device):
    tokens, shallow, deep = 512, 2, 8
    ids = _ids(tokens, device)
    per_layer = layer_qk_bytes(tokens)  # 768 KiB
    above, kept = {}, {}
    for layers in (shallow, deep):
        model = tiny_llama(layers, device)
        probe(model, ids[:64], bins=BINS)  # warm-up: lazy initialisation, compiled sweep
        above[layers] = probe_above_forward(model, ids, device)
        kept[layers] = peak_allocated(lambda: capture(model, ids), device)
    # The meter sees layers that are held: a capture that keeps every layer grows by at
    # least one layer's q/k per layer added.
    assert kept[deep] - kept[shallow] >= 0.9 * per_layer * (deep - shallow), kept
    # The probe adds only its per-layer results (here ~34 KiB a layer: [H, T] float64 mean
    # logits and [H, J, 16] int64 histograms, ~4 % of one layer's q/k).
    growth = (above[deep] - above[shallow]) / (deep - shallow)
    assert growth < 0.25 * per_layer, (above, per_layer)


@pytest.mark.parametrize("device", DEVICES)
def test_probe_memory_above_forward_is_one_layers_worth_and_linear_in_tokens(device):
    short, long = 256, 2048  # 8 × the tokens: linear memory 8 ×, anything [T, T] 64 ×
    model = tiny_llama(2, device)
    probe(model, _ids(64, device), bins=BINS)
    above = {t: probe_above_forward(model, _ids(t, device), device) for t in (short, long)}
    assert above[short] > 0, above
    assert above[long] / above[short] < 12, above
    # A few copies of one layer's q/k (rotated copies, FFT spectra of the mean logit); a
    # float32 [T, T] matrix alone would be 5 × one layer's q/k here.
    assert above[long] < 6 * layer_qk_bytes(long), (above, layer_qk_bytes(long))


# --------------------------------------------------------------------------------------
# What the capture itself holds and allocates (CPU: the profiler's exact accounting)
# --------------------------------------------------------------------------------------


def _live_at_marks(fn: Callable[[], object]) -> list[int]:
    """Bytes allocated and not yet freed at each ``MARK`` that ``fn()`` entered, counted from
    the start of ``fn``."""
    allocations, marks = cpu_allocations(fn)
    return [sum(size for t, size in allocations if t < mark) for mark in marks]


def _marked(layer=None) -> None:
    with torch.profiler.record_function(MARK):
        pass


def test_capture_tensors_own_their_storage():
    """Every tensor of a kept capture is a copy of its own size: a view (the zero-width
    unrotated part of a fully rotated head, say) would keep the layer's whole projection
    output alive with it, doubling what a kept capture holds."""
    cap = capture(tiny_llama(2, "cpu"), _ids(64, "cpu"))
    for layer in cap.layers:
        for name in ("q", "k", "q_pass", "k_pass"):
            x = getattr(layer, name)
            assert x.untyped_storage().nbytes() == x.numel() * x.element_size(), (layer.index, name)


def test_capture_holds_one_copy_of_a_layer_while_on_layer_runs():
    """While ``on_layer`` runs (the probe computes its statistics then), the capture holds
    the layer's q/k once, in the record it hands over, beyond what the forward pass itself
    holds at that point: not the projection outputs, the q/k the attention received, or the
    readings it checked."""
    tokens = 1024
    model = tiny_llama(3, "cpu")
    ids = _ids(tokens, "cpu")
    capture(model, ids[:64], on_layer=_marked)  # warm-up
    with_capture = _live_at_marks(lambda: capture(model, ids, on_layer=_marked))
    hooks = [layer.self_attn.register_forward_hook(lambda *a: _marked()) for layer in model.model.layers]
    try:
        def forward() -> None:
            with torch.inference_mode():
                model(ids[None], use_cache=False, logits_to_keep=1)

        bare = _live_at_marks(forward)
    finally:
        for h in hooks:
            h.remove()
    assert len(with_capture) == 3 and len(bare) == 3
    held = max(c - b for c, b in zip(with_capture, bare))
    assert held >= layer_qk_bytes(tokens), (with_capture, bare)  # the meter sees the record
    assert held < 1.5 * layer_qk_bytes(tokens), (with_capture, bare)


def test_capture_allocates_one_copy_of_each_layer():
    """The capture's check reads its guesses (candidate readings × layouts) at a few rows,
    and the whole layer once, for the guess that holds: beyond the forward pass, it
    allocates about one copy of each layer's q/k (here measured ~2 with the rotary tables it
    reads; a full copy per guess made it ~9)."""
    tokens, layers = 1024, 4
    model = tiny_llama(layers, "cpu")
    ids = _ids(tokens, "cpu")
    capture(model, ids[:64], on_layer=lambda layer: None)

    def allocated(fn: Callable[[], object]) -> int:
        return sum(size for _, size in cpu_allocations(fn)[0] if size > 0)

    def forward() -> None:
        with torch.inference_mode():
            model(ids[None], use_cache=False, logits_to_keep=1)

    extra = allocated(lambda: capture(model, ids, on_layer=lambda layer: None)) - allocated(forward)
    assert extra < 3 * layers * layer_qk_bytes(tokens), extra / (layers * layer_qk_bytes(tokens))


# --------------------------------------------------------------------------------------
# Sliding-window models: the mask is read a block at a time
# --------------------------------------------------------------------------------------


def tiny_gemma3(device: str) -> torch.nn.Module:
    """A random Gemma 3 with one sliding (window 64) and one global layer, SDPA attention:
    HF hands both layers an explicit ``[T, T]`` mask, which the capture reads."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=4096,
        attn_implementation="sdpa")
    return Gemma3ForCausalLM(config).eval().to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_probe_memory_of_a_sliding_window_model_is_linear_in_tokens(device):
    """Reading a layer's window off its ``[T, T]`` mask once built a ``[T, T]`` int64 distance
    matrix (8 × the bool mask the forward itself holds; 8.6 GB at 32K tokens): the probe's
    memory above the forward must stay linear here too."""
    short, long = 256, 2048
    model = tiny_gemma3(device)
    probe(model, _ids(80, device), bins=BINS)
    above = {t: probe_above_forward(model, _ids(t, device), device) for t in (short, long)}
    assert above[short] > 0, above
    assert above[long] / above[short] < 12, above
    assert above[long] < 6 * layer_qk_bytes(long), (above, layer_qk_bytes(long))  # int64 [T, T]: 6.4 ×
