"""What a capture is: the records of one layer, and that layer's attention rebuilt from them.

* :class:`LayerCapture` and :class:`Capture` — the result of
  :func:`anomaly.probe.activations.capture`: per probed layer the pre-RoPE q/k, the
  frequencies, layout and factors that rotate them.
* :func:`rotated_heads`, :func:`attention_logits`, :func:`attention_probabilities` — what the
  layer's attention multiplies, scores and weighs, rebuilt from a :class:`LayerCapture`.
* :class:`LayerRecord` and :class:`Received` — what the capture's hooks note of one layer
  while the forward pass runs (its capture points), handed to
  :func:`anomaly.probe.selfcheck.check_layer`, which turns it into a :class:`LayerCapture`.

Shapes: HF modules hand ``[batch, heads, seq, head_dim]``; a capture keeps batch 0 as
``[heads, seq, d]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

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
    configured_window: int | None = None
    """The window the layer is built with, at any length: equal to :attr:`sliding_window`
    where that is set, and still ``W`` for a sliding layer probed on ``W`` tokens or fewer
    (whose mask then hides nothing). What the layer scored in training, not on this sequence."""
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


# --------------------------------------------------------------------------------------
# What the hooks note of one layer during the forward pass
# --------------------------------------------------------------------------------------


NOT_PASSED = object()
"""A keyword argument the layer did not hand its attention function."""


@dataclass
class Received:
    """The query and key one layer handed its attention function, at the checked token rows
    only (a copy: the layer's full q/k are not kept), and its settings."""

    q: Tensor
    """``[heads, rows, head_dim]`` (batch 0)."""
    k: Tensor
    """``[kv_heads or heads, rows, head_dim]``."""
    kwargs: dict
    """``scaling``, ``sliding_window``, ``softcap``, ``s_aux`` where the layer passed them
    (``sliding_window`` as its mask applies it, where the mask can be read)."""
    layer_window: object = NOT_PASSED
    """The ``sliding_window`` the layer itself passed (its configured window, whatever the
    mask does at this length); :data:`NOT_PASSED` where it passed none."""


@dataclass
class LayerRecord:
    """What one decoder layer showed the capture's hooks during the forward pass, keyed by
    the slots of its :class:`anomaly.model_surgery.AttentionSite` (the capture points).

    Filled in as the layer runs and consumed once its attention has returned; it holds the
    layer's whole projection outputs, so it lives no longer than that.
    """

    sources: dict[int, Tensor] = field(default_factory=dict)
    """Slot → output of ``site.sources[slot]``: the pre-RoPE query and key (two slots) or a
    fused q/k/v (one), ``[batch, seq, …]`` in the module's own shape, which ``site.split``
    reads as ``(q [batch, seq, heads, head_dim], k [batch, seq, kv_heads, head_dim])``."""
    projections: dict[int, Tensor] = field(default_factory=dict)
    """Slot → output of ``site.projections[slot]``, the q/k projection that feeds a q/k norm
    (layers whose sources are norms only)."""
    norm_inputs: dict[int, Tensor] = field(default_factory=dict)
    """Slot → what the q/k norm ``site.sources[slot]`` read (layers with projections only):
    the projection's output itself for a norm before the rotation."""
    rotation: object | None = None
    """The rotation the layer was handed (``position_embeddings``: ``(cos, sin)`` tables
    ``[batch, seq, d_rot]`` or a complex one) or that its own rotary module computed;
    ``None`` where it received none."""
    received: Received | None = None
    """What the layer handed its attention function; ``None`` where it does not call
    transformers' attention interface (or is not routed through it)."""
