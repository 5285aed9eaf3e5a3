"""Read the exact pre-RoPE queries and keys of every layer of an HF causal LM.

:func:`capture` runs one forward pass with hooks (registered in a context manager whose
``finally`` removes them) on the modules :mod:`anomaly.model_surgery` names, and returns a
:class:`Capture`: per layer the vectors the layer rotates, the frequencies it rotates them
with (taken from the model's own rotary module and checked against the rotation the layer
actually receives), the layout, the positions and the scaling factors. Nothing is
monkeypatched: hooks only read module outputs and arguments.
"""

from __future__ import annotations

import contextlib
import inspect
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
    """Layer index."""
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
    """Factor the layer multiplies ``q·k`` by before the softmax."""

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
    """One record per decoder layer, in order."""
    layout: str
    """``"half"`` or ``"interleaved"`` (SPEC §1), read off the model's rotary table."""
    positions: Tensor
    """``[seq]`` the position ids the model used."""
    n_heads: int
    """Query heads per layer."""
    n_kv_heads: int
    """Key/value heads per layer."""
    head_dim: int
    """Head size, rotated and unrotated dims together."""
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
    """
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
    """Causal softmax of :func:`attention_logits`, ``[heads, seq, seq]``."""
    logits = attention_logits(layer)
    seq = logits.shape[-1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=logits.device).triu(1)
    return logits.masked_fill(future, float("-inf")).softmax(-1)


def _as_batch(input_ids: Tensor) -> Tensor:
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"capture takes one sequence, [seq] or [1, seq]; got {tuple(input_ids.shape)}")
    return input_ids


class _Captured(Exception):
    """Raised from the last attention layer's hook to end the forward pass early."""


@contextlib.contextmanager
def _hooks(sites: list[surgery.AttentionSite], store: dict, on_done: Callable[[int], None]) -> Iterator[None]:
    handles = []

    def save_output(layer: int, slot: int):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            store.setdefault(layer, {})[slot] = out.detach()

        return hook

    def save_rotation(layer: int):
        def hook(module, args, kwargs):
            store.setdefault(layer, {})["rotation"] = surgery.position_embeddings_of(module, args, kwargs)

        return hook

    def finish(layer: int):
        def hook(module, args, kwargs, output):
            on_done(layer)

        return hook

    try:
        for site in sites:
            for slot, module in enumerate(site.sources):
                handles.append(module.register_forward_hook(save_output(site.index, slot)))
            attn = site.attention
            handles.append(attn.register_forward_pre_hook(save_rotation(site.index), with_kwargs=True))
            handles.append(attn.register_forward_hook(finish(site.index), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def capture(
    model: nn.Module,
    input_ids: Tensor,
    *,
    on_layer: Callable[[LayerCapture], None] | None = None,
) -> Capture:
    """Capture every layer's pre-RoPE q/k for one sequence, in one forward pass (ended as
    soon as the last attention layer has run: nothing after it changes a capture).

    Args:
        model: a loaded HF causal LM with RoPE (any family :mod:`anomaly.model_surgery`
            knows), on any device and dtype.
        input_ids: ``[seq]`` or ``[1, seq]`` token ids.
        on_layer: if given, called with each :class:`LayerCapture` as soon as its layer has
            run, and the layer is *not* kept (the returned capture's ``layers`` is empty):
            lets a probe of a large model stream its statistics in bounded memory.

    Returns:
        :class:`Capture`; tensors are float32 on the model's device.

    Raises:
        UserError: no RoPE, an unknown attention layout, or non-finite activations.
    """
    sites = surgery.attention_sites(model)
    config = surgery.config_of(model)
    ids = _as_batch(input_ids)
    device = next(model.parameters()).device
    ids = ids.to(device)
    positions = torch.arange(ids.shape[1], device=device)
    store: dict = {}
    kept: list[LayerCapture] = []
    layouts: dict[str, str] = {}  # "table" and "applied", read off the first layer
    matched: dict[tuple, tuple[Tensor, float]] = {}

    def on_done(layer: int) -> None:
        rec = store.pop(layer)
        site = sites[layer]
        rotation = rec.get("rotation")
        if rotation is None:
            raise UserError(
                f"layer {layer} of {config.model_type} receives no rotary position embedding; "
                "the probe needs a RoPE model"
            )
        cos, sin = rotation
        q, k = site.split(tuple(rec[i] for i in range(len(site.sources))))  # [1, s, h, d]
        if not layouts:
            # The table's own pattern gives its frequencies; the layer may apply it in
            # the other layout (GLM, Helium, ERNIE-4.5 re-interleave a cat(f, f) table).
            layouts["table"] = surgery.detect_layout(cos)
            layouts["applied"] = surgery.applied_layout(site.attention, cos, sin, layouts["table"])
        # HF hands every layer of a type the same (cos, sin) tensors: match them once.
        # (Keyed by address and the last position's row, so a freed table's address reused
        # by another table is not mistaken for it.)
        last = torch.stack([cos.reshape(-1, cos.shape[-1])[-1], sin.reshape(-1, sin.shape[-1])[-1]])
        key = (cos.data_ptr(), sin.data_ptr(), tuple(cos.shape), tuple(last.double().flatten().tolist()))
        if key not in matched:
            matched[key] = surgery.match_frequencies(model, cos, sin, positions, layouts["table"])
        freqs, rope_scale = matched[key]
        d_rot = cos.shape[-1]
        # float32 statistics for half-precision models; float64 models stay float64.
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        q = q[0].transpose(0, 1).to(dtype)  # [1, s, h, d] -> [h, s, d]
        k = k[0].transpose(0, 1).to(dtype)  # [1, s, kv, d] -> [kv, s, d]
        # One reduction each: a NaN or ±inf anywhere makes the sum non-finite.
        if not (torch.isfinite(q.sum(dtype=torch.float64)) and torch.isfinite(k.sum(dtype=torch.float64))):
            raise UserError(
                f"layer {layer} produced NaN or infinite queries/keys; run in float32 "
                "(--dtype float32) or check the weights"
            )
        rec_out = LayerCapture(
            index=layer,
            positions=positions,
            layout=layouts["applied"],
            q=q[..., :d_rot].contiguous(),
            k=k[..., :d_rot].contiguous(),
            q_pass=q[..., d_rot:].contiguous(),
            k_pass=k[..., d_rot:].contiguous(),
            inv_freq=freqs.to(q.device),
            rope_scale=rope_scale,
            softmax_scale=site.softmax_scale,
        )
        if on_layer is not None:
            on_layer(rec_out)
        else:
            kept.append(rec_out)
        if layer == sites[-1].index:
            raise _Captured  # the last MLP, final norm and head add nothing to a capture

    kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the probe needs no vocabulary logits
    with _hooks(sites, store, on_done), torch.inference_mode():
        try:
            model(ids, **kwargs)
        except _Captured:
            pass
    if len(kept) + (len(sites) if on_layer is not None else 0) != len(sites):
        raise UserError("not every attention layer ran; is this a decoder-only causal LM?")
    return Capture(
        layers=kept,
        layout=layouts["applied"],
        positions=positions,
        n_heads=sites[0].n_heads,
        n_kv_heads=sites[0].n_kv_heads,
        head_dim=sites[0].head_dim,
        extra={"model_type": config.model_type},
    )

