"""Read the exact pre-RoPE queries and keys of every layer of an HF causal LM.

:func:`capture` runs one forward pass with hooks on the modules :mod:`anomaly.model_surgery`
names (its capture points, registered in a context manager whose ``finally`` removes them)
and returns a :class:`Capture`: per layer the vectors the layer rotates, the frequencies it
rotates them with (taken from the model's own rotary module and checked against the
rotation the layer actually receives), the layout, the positions and the scaling factors.

Nothing is taken on trust. For the capture's duration the model's attention is routed,
through transformers' documented extension point (:mod:`anomaly.probe.routing`), via a
function that notes the query and key each layer hands its attention and then calls the
model's own attention function unchanged. Every layer's capture, rotated as
:func:`rotated_heads` does, must reproduce those (at a few positions per layer;
:func:`anomaly.probe.selfcheck.check_layer`): that proves the layout, the frequencies, the
rotary factor and the pre-RoPE vectors at once. Where it does not, the capture refuses with
the reason (a norm after the rotation, ...); a layer that applies no rotation at all (a NoPE
layer) is not probed and is listed in :attr:`Capture.skipped`.

The parts: :mod:`anomaly.probe.records` (what a capture is, and what the hooks note of a
layer), :mod:`anomaly.probe.routing` (the attention calls), :mod:`anomaly.probe.selfcheck`
(the check); this module holds the hooks and :func:`capture`, which runs them.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import defaultdict
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from anomaly import model_surgery as surgery
from anomaly.errors import UserError
from anomaly.probe import routing, selfcheck
from anomaly.probe.records import (
    Capture,
    LayerCapture,
    LayerRecord,
    attention_logits,
    attention_probabilities,
    rotated_heads,
)

__all__ = ["Capture", "LayerCapture", "attention_logits", "attention_probabilities", "capture", "rotated_heads"]

Records = defaultdict[int, LayerRecord]
"""Decoder layer index → what its hooks have noted of the layer so far (a record appears at
the layer's first note and is popped when its attention returns)."""


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
    ids = _as_batch(input_ids).to(next(model.parameters()).device)  # [1, seq]
    context = selfcheck.CheckContext.of(model, ids.shape[1], ids.device)
    records = Records(LayerRecord)
    taken = _Taken(skipped=dict(found.skipped), on_layer=on_layer)

    def layer_done(layer: int) -> None:
        # The record is popped into the check: once it returns, the layer's projection
        # outputs, rotation and candidate readings are freed, so while on_layer computes
        # statistics only the checked capture holds its q/k.
        taken.add(layer, selfcheck.check_layer(context, sites[layer], records.pop(layer)))
        if layer == found.sites[-1].index:
            raise _Captured  # the last MLP, final norm and head add nothing to a capture

    # Models whose attention never calls the interface are not rerouted: some (Falcon) compare
    # the implementation's name with fixed strings and would take another path if renamed.
    watched = {
        id(s.attention): partial(_note_received, context, records, s.index) for s in found.sites
        if type(s.attention).__name__ not in surgery.ROTATES_INSIDE
    }
    forward_kwargs = _forward_kwargs(model)
    with routing.watch_attention(model, watched), _capture_points(found.sites, records, layer_done), \
            torch.inference_mode():
        try:
            model(ids, **forward_kwargs)
        except _Captured:
            pass
    return taken.capture(context, found)


def _as_batch(input_ids: Tensor) -> Tensor:
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    if input_ids.ndim != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"capture takes one sequence, [seq] or [1, seq]; got {tuple(input_ids.shape)}")
    return input_ids


def _forward_kwargs(model: nn.Module) -> dict:
    kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the probe needs no vocabulary logits
    return kwargs


class _Captured(Exception):
    """Raised from the last attention layer's hook to end the forward pass early."""


# --------------------------------------------------------------------------------------
# The capture points: hooks that fill one LayerRecord per layer as the layer runs
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _capture_points(
    sites: list[surgery.AttentionSite], records: Records, layer_done: Callable[[int], None]
) -> Iterator[None]:
    """Hooks on every site's capture points that fill ``records[layer]`` while the layer
    runs, and call ``layer_done(layer)`` once its attention module has returned. Removed
    however the forward pass ends (finished, stopped early, or failed)."""
    handles = []
    try:
        for site in sites:
            i = site.index
            for slot, module in enumerate(site.sources):
                pick = site.picks[slot] if site.picks else 0
                handles.append(module.register_forward_hook(partial(_note_source, records, i, slot, pick)))
            for slot, module in enumerate(site.projections):
                handles.append(module.register_forward_hook(partial(_note_projection, records, i, slot)))
                handles.append(site.sources[slot].register_forward_pre_hook(partial(_note_norm_input, records, i, slot)))
            handles.append(site.attention.register_forward_pre_hook(
                partial(_note_handed_rotation, records, i), with_kwargs=True))
            if site.rotary is not None:
                handles.append(site.rotary.register_forward_hook(partial(_note_own_rotation, records, i)))
            handles.append(site.attention.register_forward_hook(
                partial(_attention_returned, layer_done, i), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def _note_source(records: Records, layer: int, slot: int, pick: int, module, args, output) -> None:
    """The pre-RoPE q/k, or fused q/k/v, a source module outputs (element ``pick`` of a tuple)."""
    out = output[pick] if isinstance(output, tuple) else output
    records[layer].sources[slot] = out.detach()


def _note_projection(records: Records, layer: int, slot: int, module, args, output) -> None:
    """The output of the q/k projection that feeds a q/k norm."""
    out = output[0] if isinstance(output, tuple) else output
    records[layer].projections[slot] = out.detach()


def _note_norm_input(records: Records, layer: int, slot: int, module, args) -> None:
    """What a q/k norm reads (its projection's output, for a norm before the rotation)."""
    records[layer].norm_inputs[slot] = args[0].detach()


def _note_handed_rotation(records: Records, layer: int, module, args, kwargs) -> None:
    """The rotation the attention module is handed (``position_embeddings``), if any."""
    rotation = surgery.position_embeddings_of(module, args, kwargs)
    if rotation is not None:
        records[layer].rotation = rotation


def _note_own_rotation(records: Records, layer: int, module, args, output) -> None:
    """The ``(cos, sin)`` an attention module's own rotary child computes (RecurrentGemma)."""
    records[layer].rotation = output


def _note_received(context: selfcheck.CheckContext, records: Records, layer: int,
                   query: Tensor, key: Tensor, kwargs: dict) -> None:
    """The q/k ``[batch, heads, seq, head_dim]`` the layer hands its attention function
    (reported by :mod:`anomaly.probe.routing`), kept at the checked rows."""
    records[layer].received = selfcheck.received(context, layer, query, key, kwargs)


def _attention_returned(layer_done: Callable[[int], None], layer: int, module, args, kwargs, output) -> None:
    layer_done(layer)


# --------------------------------------------------------------------------------------
# The layers taken so far, and the capture they make
# --------------------------------------------------------------------------------------


@dataclass
class _Taken:
    """The layers a capture has taken so far: probed (kept, or handed to ``on_layer``) and
    skipped, each skipped one with why."""

    skipped: dict[int, str]
    on_layer: Callable[[LayerCapture], None] | None
    kept: list[LayerCapture] = field(default_factory=list)
    probed: list[int] = field(default_factory=list)
    layouts: list[str] = field(default_factory=list)

    def add(self, layer: int, result: LayerCapture | selfcheck.NotProbed) -> None:
        if isinstance(result, selfcheck.NotProbed):
            self.skipped[layer] = result.reason
            return
        if not all(_finite(x) for x in (result.q, result.k, result.q_pass, result.k_pass)):
            raise UserError(
                f"layer {layer} produced NaN or infinite queries/keys; run in float32 "
                "(--dtype float32) or check the weights"
            )
        self.probed.append(layer)
        self.layouts.append(result.layout)
        if self.on_layer is not None:
            self.on_layer(result)
        else:
            self.kept.append(result)

    def capture(self, context: selfcheck.CheckContext, found: surgery.Sites) -> Capture:
        """The :class:`Capture` of the finished pass; refused where a layer did not run, none
        is rotated, or the layers' layouts differ."""
        family = context.family
        attention_layers = {s.index for s in found.sites}
        if len(self.probed) + len(self.skipped) - len(found.skipped) != len(attention_layers):
            raise UserError(f"not every attention layer of {family} ran; is this a decoder-only causal LM?")
        if not self.probed:
            raise surgery.Unsupported(family, "no_rope", "no layer applies a rotary rotation")
        if len(set(self.layouts)) > 1:
            raise UserError(f"{family}'s layers apply their rotation in different layouts; the probe needs one")
        first = next(s for s in found.sites if s.index == self.probed[0])
        return Capture(
            layers=self.kept,
            layout=self.layouts[0],
            positions=context.positions,
            n_heads=first.n_heads,
            n_kv_heads=first.n_kv_heads,
            head_dim=first.head_dim,
            skipped=dict(sorted(self.skipped.items())),
            extra={"model_type": context.config.model_type},
        )


def _finite(x: Tensor) -> bool:
    """Whether every entry of ``x`` is finite: its extremes are (a NaN makes both NaN, an
    infinity is one of them), found in one pass without a copy of ``x``."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
