"""The capture checks itself: its q/k, rotated as the layer rotates, are what the layer's attention gets.

:func:`check_layer` turns one layer's :class:`~anomaly.probe.records.LayerRecord` (what the
capture's hooks saw) into a :class:`~anomaly.probe.records.LayerCapture` only where the
captured pre-RoPE q/k, rotated with the captured frequencies, layout and rotary factor
(:func:`~anomaly.probe.records.rotated_heads`; CoCA's transform for a CoCA layer), reproduce
the query and key the layer handed its attention function
(:class:`~anomaly.probe.records.Received`) at :data:`CHECKED_POSITIONS` token rows. That
proves the layout, the frequencies, the rotary factor and the pre-RoPE vectors at once.
Where they do not, it says why: a layer that applies no rotation at all (a NoPE layer) is
:class:`NotProbed`; a norm after the rotation, or anything else, is refused
(:class:`anomaly.model_surgery.Unsupported`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from anomaly import model_surgery as surgery
from anomaly.probe.records import NOT_PASSED, LayerCapture, LayerRecord, Received, rotated_heads

CHECKED_POSITIONS = 8
"""Positions per layer at which the capture is checked against the attention's q/k."""

_OTHER_LAYOUT = {"half": "interleaved", "interleaved": "half"}


@dataclass
class CheckContext:
    """What the checks of every layer in one capture share."""

    model: nn.Module
    family: str
    """``model.config.model_type``, named in refusals."""
    config: object
    """The text config (:func:`anomaly.model_surgery.config_of`): layer types, sliding window."""
    positions: Tensor
    """``[seq]`` the position ids of the forward pass."""
    rows: Tensor
    """``[rows]`` (at most :data:`CHECKED_POSITIONS`) the token rows every guess is checked at."""
    n_freqs: set[int]
    """Lengths of the model's frequency buffers (read by :func:`surgery.rotation_table`)."""
    matched: dict[tuple, surgery.FrequencyMatch] = field(default_factory=dict)
    """The rotation tables matched to the model's frequencies so far (:func:`_matched`)."""

    @classmethod
    def of(cls, model: nn.Module, seq: int, device: torch.device) -> "CheckContext":
        return cls(
            model=model,
            family=model.config.model_type,
            config=surgery.config_of(model),
            positions=torch.arange(seq, device=device),
            rows=torch.linspace(0, seq - 1, min(CHECKED_POSITIONS, seq)).round().long().unique().to(device),
            n_freqs={f.shape[-1] for f, _ in surgery.frequency_buffers(model)},
        )

    @property
    def seq(self) -> int:
        return self.positions.shape[0]


@dataclass(frozen=True)
class NotProbed:
    """A layer the capture leaves out (it applies no rotation), and why."""

    reason: str


def received(context: CheckContext, layer: int, query: Tensor, key: Tensor, kwargs: dict) -> Received:
    """What layer ``layer`` handed its attention function (query and key
    ``[batch, heads, seq, head_dim]`` and the call's keyword arguments), kept at the checked
    rows only: indexing copies them, so the full q/k die with the call."""
    seq = context.seq
    # HF hands [batch, heads, seq, head_dim]; anything else cannot be this capture.
    if query.ndim != 4 or key.ndim != 4 or query.shape[-2] != seq or key.shape[-2] != seq:
        raise surgery.Unsupported(
            context.family, "unverified",
            f"layer {layer}'s attention receives q/k of shapes {tuple(query.shape)}, {tuple(key.shape)} "
            f"for {seq} tokens",
        )
    keep = {k: kwargs[k] for k in ("scaling", "sliding_window", "softcap", "s_aux") if k in kwargs}
    window = _window_of_mask(kwargs.get("attention_mask"), seq)
    if window is not _UNREAD:
        keep["sliding_window"] = window  # the window the mask applies, whatever the layer says
    return Received(query[0][:, context.rows], key[0][:, context.rows], keep,
                    layer_window=kwargs.get("sliding_window", NOT_PASSED))


def check_layer(context: CheckContext, site: surgery.AttentionSite, record: LayerRecord) -> LayerCapture | NotProbed:
    """The self-check: layer ``site.index``'s capture, kept only if, rotated with the captured
    frequencies, it reproduces the q/k the layer handed its attention function.

    Every guess (each candidate reading of ``site.split``, in both layouts) is checked at the
    rows ``context.rows`` only; the full capture is read once, for the guess that holds.

    Returns:
        the layer's :class:`LayerCapture`, or :class:`NotProbed` for a layer that applies no
        rotation (a NoPE layer, or linear attention named like an attention module).

    Raises:
        surgery.Unsupported: q/k of an unreadable shape, a norm after the rotation, or a
            capture that reproduces neither the rotated nor the unrotated q/k.
    """
    seq, received = context.seq, record.received
    candidates = site.split(tuple(record.sources[i] for i in range(len(site.sources))), seq)  # [1, s, h, d] each
    if not candidates:
        raise surgery.Unsupported(
            context.family, "unread_layout", f"{type(site.attention).__name__}'s q/k shapes do not match its head count"
        )
    read = _reader(context, site, record, candidates[0][0].dtype)
    if received is None and read.table is None:
        # Neither a rotation nor a call of the attention interface: a linear-attention
        # layer that shares the name of an attention module (MiniMax's lightning layers).
        return NotProbed("receives no rotary position embedding (linear attention)")
    if received is None:
        # Scores computed inside the attention class (GPT-J, CodeGen): nothing to compare
        # with here; tests/test_probe_capture.py rebuilds their attention from the capture instead.
        if type(site.attention).__name__ not in surgery.ROTATES_INSIDE:
            raise surgery.Unsupported(
                context.family, "unverified",
                f"{type(site.attention).__name__} does not call transformers' attention interface, "
                "so the capture cannot be checked against it",
            )
        return read(*candidates[0], read.table.layout)
    best, err = _closest_guess(read, candidates, received, context.rows)
    tol = _tolerance(received, seq, read.match)
    if err <= tol:
        return read(*best)
    return _why_not_reproduced(context, site, record, read, candidates[0], best, err, tol)


# --------------------------------------------------------------------------------------
# Reading a guess as a capture, and choosing the guess
# --------------------------------------------------------------------------------------


@dataclass
class _Reader:
    """Everything a reading of one layer needs besides its q/k: call it with a guess
    ``(q, k, layout)`` to get the :class:`LayerCapture` that guess means."""

    index: int
    positions: Tensor
    """``[seq]``."""
    dtype: torch.dtype
    """Of the capture: float64 for float64 models, float32 otherwise."""
    table: surgery.RotationTable | None
    """The rotation the layer was handed; ``None`` where it was handed none."""
    match: surgery.FrequencyMatch | None
    """The model's frequencies that produce :attr:`table` (``None`` with it)."""
    softmax_scale: float
    sliding_window: int | None
    configured_window: int | None
    softcap: float | None
    sinks: Tensor | None
    coca_variant: str | None

    def __call__(self, q: Tensor, k: Tensor, layout: str, at: Tensor | None = None) -> LayerCapture:
        """The capture if ``(q, k)`` ``[1, s, heads, head_dim]`` are the layer's pre-RoPE
        vectors, rotated in ``layout``: at token rows ``at`` only, or (``None``) whole."""
        d_rot = self.table.d_rot if self.table is not None else 0
        freqs, rope_scale = (self.match.inv_freq, self.match.scale) if self.match is not None else (torch.zeros(0), 1.0)
        rotated, unrotated = slice(None, d_rot), slice(d_rot, None)
        return LayerCapture(
            index=self.index, positions=self.positions if at is None else self.positions[at], layout=layout,
            q=self._part(q, rotated, at), k=self._part(k, rotated, at),
            q_pass=self._part(q, unrotated, at), k_pass=self._part(k, unrotated, at),
            inv_freq=freqs.to(q.device), rope_scale=rope_scale, softmax_scale=self.softmax_scale,
            sliding_window=self.sliding_window, configured_window=self.configured_window,
            softcap=self.softcap, sinks=self.sinks, coca_variant=self.coca_variant,
        )

    def _part(self, x: Tensor, dims: slice, at: Tensor | None) -> Tensor:
        """``x [1, s, heads, head_dim]`` → ``[heads, s, len(dims)]`` (``s``: the rows ``at``)."""
        x = x[0] if at is None else x[0, at]
        # Always a copy: a view (a zero-width pass-through, one head) would keep the
        # layer's whole projection output alive with the capture.
        return x[..., dims].transpose(0, 1).to(self.dtype, copy=True, memory_format=torch.contiguous_format)


def _reader(context: CheckContext, site: surgery.AttentionSite, record: LayerRecord, dtype: torch.dtype) -> _Reader:
    """The :class:`_Reader` of one layer, from its record; the rotation it was handed is
    matched to the model's frequencies here (:func:`_matched`)."""
    table = None if record.rotation is None else surgery.rotation_table(record.rotation, context.n_freqs)
    extra = record.received.kwargs if record.received is not None else {}
    sinks = extra.get("s_aux")
    passed = record.received.layer_window if record.received is not None else NOT_PASSED
    declared = passed if passed is not NOT_PASSED else _config_window(context.config, site.index)
    # The window that limits this capture's pairs (off the mask where it can be read: None when
    # no pair lies beyond it at this length); the layer's configured window is the declared one
    # wherever that reads None.
    window = extra.get("sliding_window", declared)
    configured = window if window is not None else declared
    return _Reader(
        index=site.index,
        positions=context.positions,
        dtype=torch.float64 if dtype == torch.float64 else torch.float32,
        table=table,
        match=None if table is None else _matched(context, table),
        softmax_scale=float(extra.get("scaling") or site.softmax_scale),
        sliding_window=window,
        configured_window=configured,
        softcap=extra.get("softcap"),
        sinks=sinks.detach().float() if isinstance(sinks, Tensor) else None,
        coca_variant=getattr(site.attention, "coca_variant", None),
    )


def _matched(context: CheckContext, table: surgery.RotationTable) -> surgery.FrequencyMatch:
    """The model's frequencies that produce ``table``, matched once per distinct table: HF
    hands every layer of a type the same tables. (Keyed by the table's values at its last
    position, not by address: a freed table's address may be reused by another.)"""
    key = (table.d_rot, tuple(torch.cat([table.cos[-1], table.sin[-1]]).double().tolist()))
    if key not in context.matched:
        context.matched[key] = surgery.match_frequencies(context.model, table, context.positions)
    return context.matched[key]


def _config_window(config, layer: int) -> int | None:
    """The window of a layer that does not hand its attention function one (its mask applies
    it): the config's, for sliding layers or where every layer slides."""
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and layer < len(kinds):
        return getattr(config, "sliding_window", None) if kinds[layer] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)


def _closest_guess(
    read: _Reader, candidates: list[tuple[Tensor, Tensor]], received: Received, rows: Tensor
) -> tuple[tuple[Tensor, Tensor, str] | None, float]:
    """The ``(q, k, layout)`` guess whose rotation at ``rows`` is closest to what the layer
    received, and its :func:`_mismatch`: every candidate in the table's layout, then the other."""
    best, err = None, float("inf")
    guesses = [] if read.table is None else [read.table.layout, _OTHER_LAYOUT[read.table.layout]]
    for q, k in candidates:
        for layout in guesses:
            e = _mismatch(_expected(read(q, k, layout, rows)), received)
            if e < err:
                best, err = (q, k, layout), e
    return best, err


def _tolerance(received: Received, seq: int, match: surgery.FrequencyMatch | None) -> float:
    """How far (relative to the largest entry) a correct capture may miss what was received."""
    eps = torch.finfo(received.q.dtype).eps if received.q.is_floating_point() else 1e-7
    # Rounding of the layer's own rotation (a few ulps) and of its angles (p·θ in float32),
    # and what its table measurably deviates from its frequencies beyond that (each of
    # cos and sin off by δ moves a rotated entry by at most 2δ of the largest entry).
    deviation = match.deviation if match is not None else 0.0
    return 8 * eps + 2e-7 * (seq - 1) + 2 * deviation


def _why_not_reproduced(
    context: CheckContext,
    site: surgery.AttentionSite,
    record: LayerRecord,
    read: _Reader,
    first: tuple[Tensor, Tensor],
    best: tuple[Tensor, Tensor, str] | None,
    err: float,
    tol: float,
) -> NotProbed:
    """No rotation of the capture reproduces what the layer received: a layer that applies
    no rotation (its unrotated q/k do) is not probed; anything else is refused with why."""
    seq, rows, received = context.seq, context.rows, record.received
    q, k = first
    plain = (q[0, rows].transpose(0, 1).double(), k[0, rows].transpose(0, 1).double())
    if seq > 1 and _mismatch(plain, received) <= tol:
        if site.projections and not _norm_reads_projection(site, record, seq):
            raise surgery.Unsupported(context.family, "norm_after_rotation")
        return NotProbed("applies no rotary rotation (a NoPE layer)")
    if seq > 1 and read.table is None and _query_scaled_by_position(plain, received) <= tol:
        return NotProbed("applies no rotary rotation (a NoPE layer; its queries are scaled by position)")
    if best is not None and _normalised_after(_expected(read(*best, rows)), received):
        raise surgery.Unsupported(context.family, "norm_after_rotation")
    raise surgery.Unsupported(context.family, "unverified", f"layer {site.index}: largest relative difference {err:.1e}")


# --------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------

_UNREAD = object()
"""What :func:`_window_of_mask` returns for a mask it does not read."""


MASK_ROWS = 64
"""Mask rows :func:`_window_of_mask` compares at a time: its memory is linear in the tokens
(16 MB at 32K), where a whole ``[T, T]`` int64 distance matrix would be 8.6 GB."""


def _window_of_mask(mask: Tensor | None, seq: int) -> int | None | object:
    """The sliding window ``W`` that ``mask`` applies (``None`` for plain causal), or
    :data:`_UNREAD` where ``mask`` is absent or not a causal(-window) mask over ``seq`` tokens.

    ``mask`` is ``[b, 1 or heads, seq, seq]``: boolean (``True`` = seen) or additive
    (``0`` = seen, very negative = hidden), as HF's eager and SDPA masks are. Every entry is
    compared, :data:`MASK_ROWS` rows at a time.
    """
    if not isinstance(mask, Tensor) or mask.ndim != 4 or tuple(mask.shape[-2:]) != (seq, seq):
        return _UNREAD
    plane = mask[0, 0]

    def seen(start: int, stop: int) -> Tensor:  # [rows, seq] bool: the keys rows start..stop-1 see
        block = plane[start:stop]
        return block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2

    span = int(seen(seq - 1, seq).sum())
    window = None if span == seq else span
    i = torch.arange(seq, device=mask.device)
    step = MASK_ROWS
    for start in range(0, seq, step):
        behind = i[start:start + step, None] - i[None, :]  # [rows, n]: how far key n lies behind query m
        expected = (behind >= 0) & (behind < (window or seq))
        if not torch.equal(seen(start, start + step).cpu(), expected.cpu()):
            return _UNREAD
    return window


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


def _mismatch(expected: tuple[Tensor, Tensor], received: Received) -> float:
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


def _query_scaled_by_position(plain: tuple[Tensor, Tensor], received: Received) -> float:
    """:func:`_mismatch` of ``plain`` with its query rescaled by the one factor per position
    that fits best: a layer without rotation that scales its queries by position (Beam's
    NoPE layers, ``(1 + p/2048)^0.1``) matches to rounding."""
    q, k = plain
    got = received.q.double()
    if q.shape != got.shape:
        return float("inf")
    factor = (q * got).sum((0, 2)) / (q * q).sum((0, 2)).clamp_min(1e-30)  # [rows], least squares
    return _mismatch((q * factor[None, :, None], k), received)


def _normalised_after(expected: tuple[Tensor, Tensor], received: Received) -> bool:
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


def _norm_reads_projection(site: surgery.AttentionSite, record: LayerRecord, seq: int) -> bool:
    """Whether a layer's q/k norms read the q/k projections' outputs unchanged (a norm before
    any rotation), as opposed to a rotated copy of them (a norm after the rotation)."""
    proj = site.split((record.projections[0], record.projections[1]), seq)
    normed = site.split((record.norm_inputs[0], record.norm_inputs[1]), seq)
    return any(
        torch.equal(pq, nq) and torch.equal(pk, nk) for pq, pk in proj for nq, nk in normed
    )
