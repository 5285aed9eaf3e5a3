"""Read the exact pre-RoPE queries and keys of every layer of an HF causal LM.

:func:`capture` runs one forward pass with hooks (registered in a context manager whose
``finally`` removes them) on the modules :mod:`anomaly.model_surgery` names, and returns a
:class:`Capture`: per layer the vectors the layer rotates, the frequencies it rotates them
with (taken from the model's own rotary module and checked against the rotation the layer
actually receives), the layout, the positions and the scaling factors.

Nothing is taken on trust. For the capture's duration the model's attention is routed,
through transformers' documented extension point (``AttentionInterface``), via a function
that notes the query and key each layer hands its attention and then calls the model's own
attention function unchanged. Every layer's capture, rotated as :func:`rotated_heads` does,
must reproduce those (at a few positions per layer): that proves the layout, the
frequencies, the rotary factor and the pre-RoPE vectors at once. Where it does not, the
capture refuses with the reason (a norm after the rotation, ...); a layer that applies no
rotation at all (a NoPE layer) is not probed and is listed in :attr:`Capture.skipped`.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from anomaly import model_surgery as surgery
from anomaly.errors import UserError
from anomaly.rope import apply_rope


@dataclass
class LayerCapture:
    """One layer's captured attention inputs (float32, or float64 for float64 models;
    on the model's device)."""

    index: int
    """Decoder layer index (in hybrid models, not every decoder layer is probed)."""
    positions: Tensor
    """``[seq]`` the position ids the layer rotated with."""
    layout: str
    """``"half"`` or ``"interleaved"``: the layout the layer *applies* its rotation in
    (docs/conventions.md §1)."""
    q: Tensor
    """``[n_heads, seq, d_rot]`` pre-RoPE queries, rotated dimensions only."""
    k: Tensor
    """``[n_kv_heads, seq, d_rot]`` pre-RoPE keys, rotated dimensions only."""
    q_pass: Tensor
    """``[n_heads, seq, head_dim − d_rot]`` the query dims the layer does not rotate."""
    k_pass: Tensor
    """``[n_kv_heads, seq, head_dim − d_rot]`` the key dims the layer does not rotate."""
    inv_freq: Tensor
    """``[d_rot/2]`` the layer's slice frequencies θ_j, as the model holds them (float32)."""
    rope_scale: float
    """Factor the rotary embedding multiplies into cos and sin (YaRN's; 1 otherwise)."""
    softmax_scale: float
    """Factor the layer multiplies ``q·k`` by before the softmax (the ``scaling`` it hands
    its attention function)."""
    sliding_window: int | None = None
    """The layer's local attention window ``W`` (a key ``n`` is seen by query ``m`` while
    ``m − n < W``), ``None`` for global attention: read off the mask the layer hands its
    attention function where it hands one; only :func:`attention_probabilities` uses it."""
    softcap: float | None = None
    """Logit soft-capping ``c·tanh(logit/c)`` (Gemma 2), ``None`` where the layer has none;
    only :func:`attention_probabilities` uses it."""
    sinks: Tensor | None = None
    """``[n_heads]`` attention-sink logits that join each softmax and are then dropped
    (gpt-oss), ``None`` where the layer has none; only :func:`attention_probabilities`
    uses it."""
    coca_variant: str | None = None
    """``None``: ``q``/``k`` are what the layer rotates. ``"strict"``/``"slack"``: a CoCA
    layer (:func:`anomaly.coca.to_coca`); ``q``/``k`` are its raw query and T projections,
    which CoCA *transforms* into what its attention multiplies, and
    :func:`anomaly.probe.coca.effective_layer` gives the contents whose rotation that is."""

    def to(self, dtype: torch.dtype) -> "LayerCapture":
        """A copy with every tensor in ``dtype`` (e.g. float64 for reference computations)."""
        return replace(
            self, q=self.q.to(dtype), k=self.k.to(dtype), q_pass=self.q_pass.to(dtype),
            k_pass=self.k_pass.to(dtype), inv_freq=self.inv_freq.to(dtype),
        )


@dataclass
class Capture:
    """Per-layer pre-RoPE queries and keys of one sequence, with what rotates them.

    ``q[l]``, ``k[l]``, ``inv_freq[l]`` follow the names of the probe issue; the full
    per-layer records are in :attr:`layers`.
    """

    layers: list[LayerCapture]
    """One record per probed decoder layer, in order (the others are in :attr:`skipped`)."""
    layout: str
    """``"half"`` or ``"interleaved"`` (docs/conventions.md §1): the layout the layers apply
    their rotation in."""
    positions: Tensor
    """``[seq]`` the position ids the model used."""
    n_heads: int
    """Query heads per layer."""
    n_kv_heads: int
    """Key/value heads per layer."""
    head_dim: int
    """Head size, rotated and unrotated dims together."""
    skipped: dict[int, str] = field(default_factory=dict)
    """Decoder layers that are *not* in :attr:`layers`, each with the reason: layers
    without self-attention (hybrid linear-attention models) and layers that apply no
    rotation (NoPE layers)."""
    extra: dict = field(default_factory=dict)
    """Model type and anything else worth recording."""

    @property
    def q(self) -> list[Tensor]:
        """``q[l]``: ``[n_heads, seq, d_rot]``."""
        return [c.q for c in self.layers]

    @property
    def k(self) -> list[Tensor]:
        """``k[l]``: ``[n_kv_heads, seq, d_rot]``."""
        return [c.k for c in self.layers]

    @property
    def inv_freq(self) -> list[Tensor]:
        """``inv_freq[l]``: ``[d_rot/2]``."""
        return [c.inv_freq for c in self.layers]

    @property
    def rope_scale(self) -> list[float]:
        return [c.rope_scale for c in self.layers]

    @property
    def softmax_scale(self) -> list[float]:
        return [c.softmax_scale for c in self.layers]

    @property
    def rotary_dim(self) -> int:
        """``d_rot``: how many dims of each head are rotated."""
        return self.layers[0].q.shape[-1]


def rotated_heads(
    layer: LayerCapture,
    dtype: torch.dtype | None = None,
    *,
    q_rows: slice = slice(None),
    k_rows: slice = slice(None),
) -> tuple[Tensor, Tensor]:
    """The query and key heads as the layer's attention multiplies them.

    Rotates the captured q/k with :func:`anomaly.rope.apply_rope` (the layer's frequencies
    and rotary factor) and appends the unrotated dims: ``q [heads, seq, head_dim]``,
    ``k [kv_heads, seq, head_dim]``, in ``dtype`` (default: the capture's). ``q_rows`` and
    ``k_rows`` pick token ranges (rotated at their own positions); ``seq`` is then theirs.
    A CoCA layer's raw projections are refused (rotating them is not what CoCA does).
    """
    if layer.coca_variant is not None:
        raise ValueError(f"layer {layer.index} is a CoCA layer whose q/k are raw projections; "
                         "take anomaly.probe.coca.effective_layer(layer) first")
    dtype = dtype or layer.q.dtype
    positions, layout = layer.positions, layer.layout
    freqs = layer.inv_freq.to(torch.promote_types(dtype, layer.inv_freq.dtype))

    def heads(x: Tensor, x_pass: Tensor, rows: slice) -> Tensor:
        x = apply_rope(x[:, rows].to(dtype), positions[rows], freqs, layout, scale=layer.rope_scale)
        if x_pass.shape[-1] == 0:  # every dim rotated (most models): no copy
            return x
        return torch.cat([x, x_pass[:, rows].to(dtype)], dim=-1)  # [heads, rows, head_dim]

    return heads(layer.q, layer.q_pass, q_rows), heads(layer.k, layer.k_pass, k_rows)


def attention_logits(layer: LayerCapture) -> Tensor:
    """The layer's pre-softmax, pre-mask logits rebuilt from the capture, ``[heads, seq, seq]``.

    :func:`rotated_heads`, key heads repeated for grouped-query attention, scaled as the
    layer does. Quadratic in ``seq``: meant for checks and short sequences.
    """
    q, k = rotated_heads(layer)
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # [h, s, head_dim]
    return (q @ k.transpose(-1, -2)) * layer.softmax_scale


def attention_probabilities(layer: LayerCapture) -> Tensor:
    """The layer's attention probabilities rebuilt from the capture, ``[heads, seq, seq]``.

    Causal softmax of :func:`attention_logits`, with what the layer adds around the RoPE
    logits: soft-capping, its sliding window and its attention sinks (each only where the
    layer has one).
    """
    logits = attention_logits(layer)
    if layer.softcap is not None:
        logits = torch.tanh(logits / layer.softcap) * layer.softcap
    seq = logits.shape[-1]
    i = torch.arange(seq, device=logits.device)
    hidden = i[None, :] > i[:, None]  # [m, n]: keys after the query
    if layer.sliding_window is not None:
        hidden |= i[:, None] - i[None, :] >= layer.sliding_window
    logits = logits.masked_fill(hidden, float("-inf"))
    if layer.sinks is None:
        return logits.softmax(-1)
    sinks = layer.sinks.to(logits)[:, None, None].expand(-1, seq, 1)  # [heads, seq, 1]
    return torch.cat([logits, sinks], dim=-1).softmax(-1)[..., :-1]


def _as_batch(input_ids: Tensor) -> Tensor:
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"capture takes one sequence, [seq] or [1, seq]; got {tuple(input_ids.shape)}")
    return input_ids


class _Captured(Exception):
    """Raised from the last attention layer's hook to end the forward pass early."""


# --------------------------------------------------------------------------------------
# What each layer hands its attention function
# --------------------------------------------------------------------------------------

_ROUTE_PREFIX = "anomaly_capture:"
"""Attention implementations registered by the capture are named this + the original's."""
_WATCHED: dict[int, Callable[[Tensor, Tensor, dict], None]] = {}
"""``id(attention module)`` → where its call is reported, while a capture runs."""


def _eager_of(module: nn.Module) -> Callable:
    # HF calls get_interface(impl, eager_attention_forward) with the function of the module's
    # own modeling file (or of the class it derives from, for subclasses such as CoCA's).
    for cls in type(module).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise UserError(
        f"{type(module).__name__} has no eager attention function to call; load the model with "
        "attn_implementation='sdpa'"
    )


def _routed(original: str) -> Callable:
    from transformers import AttentionInterface

    def attention(module: nn.Module, query: Tensor, key: Tensor, *args, **kwargs):
        report = _WATCHED.get(id(module))
        if report is not None:
            # HF's signature: (module, query, key, value, attention_mask, ...).
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            report(query, key, {**kwargs, "attention_mask": mask})
        fn = _eager_of(module) if original == "eager" else AttentionInterface()[original]
        return fn(module, query, key, *args, **kwargs)

    return attention


def _route_name(original: str) -> str:
    """The registered implementation that watches calls and then runs ``original``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    name = _ROUTE_PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _routed(original))
        # The same masks as the original implementation, so the forward is unchanged.
        if original in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[original])
    return name


def _configs(config) -> list:
    """``config`` and its sub-configs, recursively (each holds its own attention setting)."""
    out = [config]
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            out.extend(_configs(sub))
    return out


@contextlib.contextmanager
def _watch_attention(model: nn.Module, report: dict[int, Callable[[Tensor, Tensor, dict], None]]) -> Iterator[None]:
    """Route every attention call of ``model`` through :func:`_routed` while the context
    lasts; ``report`` maps ``id(attention module)`` to the callback it calls. Nothing is
    rerouted where ``report`` is empty."""
    configs = _configs(model.config) if report else []
    before = [c._attn_implementation_internal for c in configs]
    try:
        for c, impl in zip(configs, before):
            # Set on each config alone: the setter would otherwise recurse into sub-configs.
            c._attn_implementation_internal = _route_name(impl or "eager")
        _WATCHED.update(report)
        yield
    finally:
        for key in report:
            _WATCHED.pop(key, None)
        for c, impl in zip(configs, before):
            c._attn_implementation_internal = impl


@contextlib.contextmanager
def _hooks(sites: list[surgery.AttentionSite], store: dict, on_done: Callable[[int], None]) -> Iterator[None]:
    handles = []

    def save_output(layer: int, slot: int, pick: int = 0):
        def hook(module, args, output):
            out = output[pick] if isinstance(output, tuple) else output
            store.setdefault(layer, {})[slot] = out.detach()

        return hook

    def save_input(layer: int, slot: str):
        def hook(module, args):
            store.setdefault(layer, {})[slot] = args[0].detach()

        return hook

    def save_rotation(layer: int):
        def hook(module, args, kwargs):
            rotation = surgery.position_embeddings_of(module, args, kwargs)
            if rotation is not None:
                store.setdefault(layer, {})["rotation"] = rotation

        return hook

    def save_own_rotation(layer: int):
        def hook(module, args, output):
            store.setdefault(layer, {})["rotation"] = output

        return hook

    def finish(layer: int):
        def hook(module, args, kwargs, output):
            on_done(layer)

        return hook

    try:
        for site in sites:
            for slot, module in enumerate(site.sources):
                pick = site.picks[slot] if site.picks else 0
                handles.append(module.register_forward_hook(save_output(site.index, slot, pick)))
            for slot, module in enumerate(site.projections):
                handles.append(module.register_forward_hook(save_output(site.index, f"projection{slot}")))
                handles.append(site.sources[slot].register_forward_pre_hook(save_input(site.index, f"norm_input{slot}")))
            attn = site.attention
            handles.append(attn.register_forward_pre_hook(save_rotation(site.index), with_kwargs=True))
            if site.rotary is not None:
                handles.append(site.rotary.register_forward_hook(save_own_rotation(site.index)))
            handles.append(attn.register_forward_hook(finish(site.index), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------------------
# The check: the capture, rotated, is what the attention receives
# --------------------------------------------------------------------------------------

_CHECKED_POSITIONS = 8
"""Positions per layer at which the capture is checked against the attention's q/k."""


@dataclass
class _Received:
    """The query and key one layer handed its attention function, at the checked token rows
    only (a copy: the layer's full q/k are not kept), and its settings."""

    q: Tensor
    """``[heads, rows, head_dim]`` (batch 0)."""
    k: Tensor
    """``[kv_heads or heads, rows, head_dim]``."""
    kwargs: dict
    """``scaling``, ``sliding_window``, ``softcap``, ``s_aux`` where the layer passed them."""


_UNREAD = object()
"""What :func:`_window_of_mask` returns for a mask it does not read."""


def _window_of_mask(mask: Tensor | None, seq: int) -> int | None | object:
    """The sliding window ``W`` that ``mask`` applies (``None`` for plain causal), or
    :data:`_UNREAD` where ``mask`` is absent or not a causal(-window) mask over ``seq`` tokens.

    ``mask`` is ``[b, 1 or heads, seq, seq]``: boolean (``True`` = seen) or additive
    (``0`` = seen, very negative = hidden), as HF's eager and SDPA masks are.
    """
    if not isinstance(mask, Tensor) or mask.ndim != 4 or tuple(mask.shape[-2:]) != (seq, seq):
        return _UNREAD
    seen = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] > torch.finfo(mask.dtype).min / 2
    i = torch.arange(seq, device=mask.device)
    behind = i[:, None] - i[None, :]  # [m, n]: how far key n lies behind query m
    span = int(seen[-1].sum())
    window = None if span == seq else span
    expected = (behind >= 0) & (behind < (window or seq))
    return window if torch.equal(seen.cpu(), expected.cpu()) else _UNREAD


def _expected(layer: LayerCapture) -> tuple[Tensor, Tensor]:
    """The q/k the layer's attention should receive at the tokens ``layer`` holds (the checked
    rows), float64, ``[heads, rows, head_dim]``, from the capture alone."""
    layer = layer.to(torch.float64)
    if layer.coca_variant is None:
        return rotated_heads(layer)
    from anomaly.coca.attention import coca_qk

    q, k = coca_qk(
        layer.q[None], layer.k[None], variant=layer.coca_variant, inv_freq=layer.inv_freq,
        positions=layer.positions, layout=layer.layout, attention_scale=layer.rope_scale, rotated=True,
    )
    return q[0], k[0]


def _mismatch(expected: tuple[Tensor, Tensor], received: _Received) -> float:
    """Largest difference between expected and received q/k, relative to the largest entry."""
    worst = 0.0
    for exp, got in zip(expected, (received.q, received.k)):
        got = got.double()
        if exp.shape[0] != got.shape[0] and got.shape[0] % exp.shape[0] == 0:
            exp = exp.repeat_interleave(got.shape[0] // exp.shape[0], dim=0)  # keys repeated for GQA
        if exp.shape != got.shape:
            return float("inf")
        worst = max(worst, ((exp - got).abs().max() / got.abs().max().clamp_min(1e-30)).item())
    return worst


def _query_scaled_by_position(plain: tuple[Tensor, Tensor], received: _Received) -> float:
    """:func:`_mismatch` of ``plain`` with its query rescaled by the one factor per position
    that fits best: a layer without rotation that scales its queries by position (Beam's
    NoPE layers, ``(1 + p/2048)^0.1``) matches to rounding."""
    q, k = plain
    got = received.q.double()
    if q.shape != got.shape:
        return float("inf")
    factor = (q * got).sum((0, 2)) / (q * q).sum((0, 2)).clamp_min(1e-30)  # [rows], least squares
    return _mismatch((q * factor[None, :, None], k), received)


def _normalised_after(expected: tuple[Tensor, Tensor], received: _Received) -> bool:
    """Whether the received q/k are the expected ones normalised per head vector (RMS or L2
    norm) times a per-dimension weight: a norm applied after the rotation."""
    for exp, got in zip(expected, (received.q, received.k)):
        got = got.double()
        if exp.shape != got.shape:
            return False
        unit = exp / exp.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        flat_u, flat_g = unit.reshape(-1, unit.shape[-1]), got.reshape(-1, got.shape[-1])
        weight = (flat_u * flat_g).sum(0) / (flat_u * flat_u).sum(0).clamp_min(1e-30)  # least squares per dim
        if ((flat_u * weight - flat_g).abs().max() / flat_g.abs().max().clamp_min(1e-30)).item() > 1e-3:
            return False
    return True


def _norm_reads_projection(site: surgery.AttentionSite, rec: dict, seq: int) -> bool:
    """Whether a layer's q/k norms read the q/k projections' outputs unchanged (a norm before
    any rotation), as opposed to a rotated copy of them (a norm after the rotation)."""
    proj = site.split((rec["projection0"], rec["projection1"]), seq)
    normed = site.split((rec["norm_input0"], rec["norm_input1"]), seq)
    return any(
        torch.equal(pq, nq) and torch.equal(pk, nk) for pq, pk in proj for nq, nk in normed
    )


def _finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite: its extremes are (a NaN makes both NaN, an
    infinity is one of them), found in one pass without a copy of ``x``."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def capture(
    model: nn.Module,
    input_ids: Tensor,
    *,
    on_layer: Callable[[LayerCapture], None] | None = None,
) -> Capture:
    """Capture every layer's pre-RoPE q/k for one sequence, in one forward pass (ended as
    soon as the last attention layer has run: nothing after it changes a capture).

    Each layer's capture is checked against the q/k the layer hands its attention function
    (see the module docstring); layers that apply no rotation are skipped and listed in
    :attr:`Capture.skipped`.

    Args:
        model: a loaded HF causal LM with RoPE (docs/families.md lists the families), on
            any device and dtype.
        input_ids: ``[seq]`` or ``[1, seq]`` token ids.
        on_layer: if given, called with each :class:`LayerCapture` as soon as its layer has
            run, and the layer is *not* kept (the returned capture's ``layers`` is empty):
            lets a probe of a large model stream its statistics in bounded memory.

    Returns:
        :class:`Capture`; tensors are float32 on the model's device (float64 for float64
        models).

    Raises:
        UserError: no RoPE, an attention the capture cannot reproduce (the message says
            why, e.g. a norm after the rotation), or non-finite activations.
    """
    found = surgery.attention_sites(model)
    sites = {s.index: s for s in found.sites}
    last = found.sites[-1].index
    family = model.config.model_type
    config = surgery.config_of(model)
    ids = _as_batch(input_ids)
    device = next(model.parameters()).device
    ids = ids.to(device)
    seq = ids.shape[1]
    positions = torch.arange(seq, device=device)
    rows = torch.linspace(0, seq - 1, min(_CHECKED_POSITIONS, seq)).round().long().unique().to(device)
    store: dict = {}
    kept: list[LayerCapture] = []
    skipped = dict(found.skipped)
    probed: list[int] = []
    layouts: list[str] = []
    n_freqs = {f.shape[-1] for f, _ in surgery.frequency_buffers(model)}
    matched: dict[tuple, tuple[Tensor, float]] = {}

    def received_by(layer: int) -> Callable[[Tensor, Tensor, dict], None]:
        def report(query: Tensor, key: Tensor, kwargs: dict) -> None:
            # HF hands [batch, heads, seq, head_dim]; anything else cannot be this capture.
            if query.ndim != 4 or key.ndim != 4 or query.shape[-2] != seq or key.shape[-2] != seq:
                raise surgery.Unsupported(
                    family, "unverified",
                    f"layer {layer}'s attention receives q/k of shapes {tuple(query.shape)}, {tuple(key.shape)} "
                    f"for {seq} tokens",
                )
            keep = {k: kwargs[k] for k in ("scaling", "sliding_window", "softcap", "s_aux") if k in kwargs}
            window = _window_of_mask(kwargs.get("attention_mask"), seq)
            if window is not _UNREAD:
                keep["sliding_window"] = window  # the window the mask applies, whatever the layer says
            # Only the checked rows (indexing copies them): the full q/k die with the call.
            store.setdefault(layer, {})["received"] = _Received(query[0][:, rows], key[0][:, rows], keep)

        return report

    def window_of(layer: int) -> int | None:
        # Layers that do not hand their attention function the window (their mask applies
        # it): the config's, for sliding layers or where every layer slides.
        kinds = getattr(config, "layer_types", None)
        if kinds is not None and layer < len(kinds):
            return getattr(config, "sliding_window", None) if kinds[layer] == "sliding_attention" else None
        return getattr(config, "sliding_window", None)

    def verified(layer: int, rec: dict) -> LayerCapture | None:
        """The layer's capture, checked against what its attention received; ``None`` for a
        layer that applies no rotation (recorded in ``skipped``). Every guess is checked at
        the rows ``rows`` only; the full capture is read once, for the guess that holds."""
        site = sites[layer]
        received: _Received | None = rec.get("received")
        coca_variant = getattr(site.attention, "coca_variant", None)
        candidates = site.split(tuple(rec[i] for i in range(len(site.sources))), seq)  # [1, s, h, d] each
        if not candidates:
            raise surgery.Unsupported(
                family, "unread_layout", f"{type(site.attention).__name__}'s q/k shapes do not match its head count"
            )
        dtype = torch.float64 if candidates[0][0].dtype == torch.float64 else torch.float32
        rotation = rec.get("rotation")
        if rotation is None:
            table = None
        else:
            table = surgery.rotation_table(rotation, n_freqs)
            # HF hands every layer of a type the same tables: match each one once. (Keyed by
            # the table's values at its last position, not by address: a freed table's
            # address may be reused by another.)
            key = (table.d_rot, tuple(torch.cat([table.cos[-1], table.sin[-1]]).double().tolist()))
            if key not in matched:
                matched[key] = surgery.match_frequencies(model, table, positions)

        def reading(q: Tensor, k: Tensor, layout: str, at: Tensor | None = None) -> LayerCapture:
            """The capture if ``(q, k)`` ``[1, s, heads, head_dim]`` are the layer's pre-RoPE
            vectors, rotated in ``layout``: at token rows ``at`` only, or (``None``) whole."""
            d_rot = table.d_rot if table is not None else 0
            freqs, rope_scale = (matched[key].inv_freq, matched[key].scale) if table is not None else (torch.zeros(0), 1.0)
            extra = received.kwargs if received is not None else {}
            sinks = extra.get("s_aux")

            def part(x: Tensor, dims: slice) -> Tensor:  # [1, s, h, d] -> [h, s, len(dims)]
                x = x[0] if at is None else x[0, at]
                # Always a copy: a view (a zero-width pass-through, one head) would keep the
                # layer's whole projection output alive with the capture.
                return x[..., dims].transpose(0, 1).to(dtype, copy=True, memory_format=torch.contiguous_format)

            return LayerCapture(
                index=layer, positions=positions if at is None else positions[at], layout=layout,
                q=part(q, slice(None, d_rot)), k=part(k, slice(None, d_rot)),
                q_pass=part(q, slice(d_rot, None)), k_pass=part(k, slice(d_rot, None)),
                inv_freq=freqs.to(q.device), rope_scale=rope_scale,
                softmax_scale=float(extra.get("scaling") or site.softmax_scale),
                sliding_window=extra["sliding_window"] if "sliding_window" in extra else window_of(layer),
                softcap=extra.get("softcap"),
                sinks=sinks.detach().float() if isinstance(sinks, Tensor) else None,
                coca_variant=coca_variant,
            )

        if received is None and table is None:
            # Neither a rotation nor a call of the attention interface: a linear-attention
            # layer that shares the name of an attention module (MiniMax's lightning layers).
            skipped[layer] = "receives no rotary position embedding (linear attention)"
            return None
        if received is None:
            # Scores computed inside the attention class (GPT-J, CodeGen): nothing to compare
            # with here; tests/test_probe.py rebuilds their attention from the capture instead.
            if type(site.attention).__name__ not in surgery.ROTATES_INSIDE:
                raise surgery.Unsupported(
                    family, "unverified",
                    f"{type(site.attention).__name__} does not call transformers' attention interface, "
                    "so the capture cannot be checked against it",
                )
            return reading(*candidates[0], table.layout)
        best, err = None, float("inf")  # the (q, k, layout) guess closest to what was received
        guesses = [] if table is None else [table.layout, {"half": "interleaved", "interleaved": "half"}[table.layout]]
        for q, k in candidates:
            for layout in guesses:
                e = _mismatch(_expected(reading(q, k, layout, rows)), received)
                if e < err:
                    best, err = (q, k, layout), e
        eps = torch.finfo(received.q.dtype).eps if received.q.is_floating_point() else 1e-7
        # Rounding of the layer's own rotation (a few ulps) and of its angles (p·θ in float32),
        # and what its table measurably deviates from its frequencies beyond that (each of
        # cos and sin off by δ moves a rotated entry by at most 2δ of the largest entry).
        deviation = matched[key].deviation if table is not None else 0.0
        tol = 8 * eps + 2e-7 * (seq - 1) + 2 * deviation
        if err <= tol:
            return reading(*best)
        q, k = candidates[0]
        plain = (q[0, rows].transpose(0, 1).double(), k[0, rows].transpose(0, 1).double())
        if seq > 1 and _mismatch(plain, received) <= tol:
            if site.projections and not _norm_reads_projection(site, rec, seq):
                raise surgery.Unsupported(family, "norm_after_rotation")
            skipped[layer] = "applies no rotary rotation (a NoPE layer)"
            return None
        if seq > 1 and table is None and _query_scaled_by_position(plain, received) <= tol:
            skipped[layer] = "applies no rotary rotation (a NoPE layer; its queries are scaled by position)"
            return None
        if best is not None and _normalised_after(_expected(reading(*best, rows)), received):
            raise surgery.Unsupported(family, "norm_after_rotation")
        raise surgery.Unsupported(family, "unverified", f"layer {layer}: largest relative difference {err:.1e}")

    def on_done(layer: int) -> None:
        # verified() has returned: the layer's projection outputs, rotation and candidate
        # readings are freed, so while on_layer computes statistics only `out` holds its q/k.
        out = verified(layer, store.pop(layer))
        if out is not None:
            if not all(_finite(x) for x in (out.q, out.k, out.q_pass, out.k_pass)):
                raise UserError(
                    f"layer {layer} produced NaN or infinite queries/keys; run in float32 "
                    "(--dtype float32) or check the weights"
                )
            probed.append(layer)
            layouts.append(out.layout)
            if on_layer is not None:
                on_layer(out)
            else:
                kept.append(out)
        if layer == last:
            raise _Captured  # the last MLP, final norm and head add nothing to a capture

    kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the probe needs no vocabulary logits
    # Models whose attention never calls the interface are not rerouted: some (Falcon) compare
    # the implementation's name with fixed strings and would take another path if renamed.
    watched = {
        id(s.attention): received_by(s.index) for s in found.sites
        if type(s.attention).__name__ not in surgery.ROTATES_INSIDE
    }
    with _watch_attention(model, watched), _hooks(found.sites, store, on_done), torch.inference_mode():
        try:
            model(ids, **kwargs)
        except _Captured:
            pass
    if len(probed) + len(skipped) - len(found.skipped) != len(sites):
        raise UserError(f"not every attention layer of {family} ran; is this a decoder-only causal LM?")
    if not probed:
        raise surgery.Unsupported(family, "no_rope", "no layer applies a rotary rotation")
    if len(set(layouts)) > 1:
        raise UserError(f"{family}'s layers apply their rotation in different layouts; the probe needs one")
    first = sites[probed[0]]
    return Capture(
        layers=kept,
        layout=layouts[0],
        positions=positions,
        n_heads=first.n_heads,
        n_kv_heads=first.n_kv_heads,
        head_dim=first.head_dim,
        skipped=dict(sorted(skipped.items())),
        extra={"model_type": config.model_type},
    )
