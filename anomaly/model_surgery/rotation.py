"""The rotation a layer receives: the ``position_embeddings`` argument of its attention
call, read as a table per slice frequency and matched to the model's frequency buffers."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from anomaly.errors import UserError
from anomaly.model_surgery.modules import frequency_buffers

_SIN_COS_HALF_WIDTH = {"GPTJAttention", "CodeGenAttention"}
"""Attention classes called with ``(sin, cos)``, each ``[..., seq, d_rot/2]``."""
ROTATES_INSIDE = frozenset(_SIN_COS_HALF_WIDTH | {"FalconAttention", "GPTNeoXJapaneseAttention"})
"""Attention classes that compute their scores themselves instead of calling transformers'
attention interface, so the capture cannot watch the q/k they score with; their capture is
proven by the rebuild tests (tests/test_probe_capture.py, tests/test_families.py)."""


def position_embeddings_of(attn: nn.Module, args: tuple, kwargs: dict):
    """The rotation argument of a call of ``attn`` (keyword or positional), or ``None``.

    Usually the ``(cos, sin)`` pair HF's decoders hand every attention layer; GPT-J and
    CodeGen pass ``(sin, cos)`` at half width and repeat each frequency twice when they
    apply it (``rotate_every_two``), which is returned written out as the interleaved
    ``(cos, sin)`` table; Llama 4 passes complex ``e^{i pθ}`` ``[..., seq, d_rot/2]``,
    which is returned as is (:func:`rotation_table` reads both).
    """
    if "position_embeddings" in kwargs:
        pair = kwargs["position_embeddings"]
    else:
        params = inspect.signature(attn.forward).parameters
        names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if "position_embeddings" not in names or names.index("position_embeddings") >= len(args):
            return None
        pair = args[names.index("position_embeddings")]
    if pair is not None and type(attn).__name__ in _SIN_COS_HALF_WIDTH:
        sin, cos = pair
        return cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
    return pair


@dataclass
class RotationTable:
    """The rotation a layer receives, per slice frequency: ``cos(pθ_j)·s``, ``sin(pθ_j)·s``."""

    cos: Tensor
    """``[positions, J]``."""
    sin: Tensor
    """``[positions, J]``."""
    d_rot: int
    """Rotated dims per head, ``2J``."""
    layout: str
    """The layout the table is written in (``"half"`` for a half-width table): the first
    guess of the layout the layer applies it in, which the capture then checks."""
    dtype: torch.dtype
    """The (real) dtype the layer received the table in: ``cos``/``sin`` here are float32,
    but a bfloat16/float16 model rounds its table to its own dtype, which bounds how
    exactly :func:`match_frequencies` can match it."""


def rotation_table(rotation, n_freqs: set[int]) -> RotationTable:
    """:class:`RotationTable` of the rotation argument an attention layer received.

    A full-width table ``[..., seq, d_rot]`` repeats each frequency twice, as ``cat(f, f)``
    (half layout) or ``repeat_interleave(f, 2)`` (interleaved); gpt-oss hands over a
    half-width table ``[..., seq, d_rot/2]`` (one column per frequency, recognised by its
    width among ``n_freqs``, the lengths of the model's frequency buffers); Llama 4 a
    complex one. Positions 0 (all ones) carry no information; a table whose frequencies are
    all equal matches both patterns and reads as ``half``.

    Raises:
        UserError: a table of none of these forms.
    """
    if isinstance(rotation, Tensor) and rotation.is_complex():
        z = rotation.reshape(-1, rotation.shape[-1])
        return RotationTable(z.real.float(), z.imag.float(), 2 * z.shape[-1], "interleaved", z.real.dtype)
    cos, sin = rotation
    c, s = cos.reshape(-1, cos.shape[-1]).float(), sin.reshape(-1, sin.shape[-1]).float()  # [positions, width]
    w = c.shape[-1]
    # Repeated columns are copies of one value, so they are equal bit for bit in any dtype.
    if w % 2 == 0 and torch.allclose(c[:, : w // 2], c[:, w // 2 :], atol=1e-6):
        return RotationTable(c[:, : w // 2], s[:, : w // 2], w, "half", cos.dtype)
    if w % 2 == 0 and torch.allclose(c[:, 0::2], c[:, 1::2], atol=1e-6):
        return RotationTable(c[:, 0::2], s[:, 0::2], w, "interleaved", cos.dtype)
    if w in n_freqs:
        return RotationTable(c, s, 2 * w, "half", cos.dtype)
    raise UserError(
        f"the rotary table the model hands its attention layers ({w} columns) repeats no "
        "frequency the way RoPE's half or interleaved layouts do; the probe cannot read it"
    )


KERNEL_DEVIATION = 1e-3
"""Largest deviation of a layer's rotary table from its frequencies that :func:`match_frequencies`
accepts beyond rounding. torch 2.13's CPU kernels occasionally compute the very first rotary table
of a process with errors of ~1.5e-4 at some positions (seen on 2 threads, never on 1: a race on
first use); a wrong buffer or rotary factor is off by order one, far above this."""


@dataclass(frozen=True)
class FrequencyMatch:
    """The frequencies that rotate a layer, read from the model and checked against its table."""

    inv_freq: Tensor
    """``[d_rot/2]`` slice frequencies θ_j (float32, CPU), as the model's buffer holds them."""
    scale: float
    """Rotary attention factor multiplied into cos and sin (YaRN's; 1 otherwise)."""
    deviation: float
    """Largest |cos|/|sin| difference between the layer's table and these frequencies."""


def match_frequencies(model: nn.Module, table: RotationTable, positions: Tensor) -> FrequencyMatch:
    """The model's frequencies and rotary factor that produced ``table``.

    Each of the rotary module's frequency buffers is tried; the one whose table equals the
    layer's (to float32 rounding at these positions, plus the rounding of the table to the
    dtype the layer received it in: bfloat16/float16 models) is returned. This both reads the
    frequencies "from the model's own rotary module" and proves they are the ones used. A table
    off by more than rounding but at most :data:`KERNEL_DEVIATION` is accepted with its
    deviation recorded, which the capture's own check then allows for.

    Raises:
        UserError: no buffer reproduces the table.
    """
    c, s = table.cos.double(), table.sin.double()
    pos = positions.reshape(-1).double().to(c.device)
    best, err_best = None, math.inf
    for freqs, scale in frequency_buffers(model):
        if freqs.shape[-1] != c.shape[-1]:
            continue
        ang = pos[:, None] * freqs.detach().to(c.device, torch.float32).double()[None, :]
        err = max((ang.cos() * scale - c).abs().max().item(), (ang.sin() * scale - s).abs().max().item())
        if err < err_best:
            best, err_best = (freqs.detach().float().cpu(), scale), err
    # float32 angles at position p carry ~p·6e-8 absolute error. A bfloat16/float16 model
    # computes its table in float32 and rounds each entry once to its own dtype: at most half
    # an ulp, eps/2·|entry|, where |entry| ≤ the rotary factor (1 without YaRN). One eps times
    # the table's largest entry is twice that bound (room for the float32 error beneath it):
    # ~1e-7 for float32 tables, 2⁻⁷ for bfloat16 ones, still far below what a wrong buffer or
    # rotary factor gives (differences of order one at most positions).
    rounding = torch.finfo(table.dtype).eps * max(1.0, float(c.abs().max()), float(s.abs().max())) if c.numel() else 0.0
    tol = (1e-5 + 2e-7 * float(pos.max()) if len(pos) else 1e-5) + rounding
    if best is None or err_best > tol + KERNEL_DEVIATION:
        raise UserError(
            f"none of {model.config.model_type}'s rotary frequency buffers reproduces the rotation "
            "its attention layers receive, so the probe cannot tell which frequencies rotate "
            "them; the supported families are listed in docs/families.md"
        )
    return FrequencyMatch(best[0], best[1], 0.0 if err_best <= tol else err_best)
