"""When a regenerated output file is the same result as the one already there.

Regeneration must leave ``git status`` clean on any machine with the locked versions
(requirements.lock; docs/architecture.md, "Outputs"). Bit-identical bytes are out of reach
across CPUs: float32 kernels round differently with and without AVX-512 (a probe summary
moved in the 6th significant digit), numpy's vectorised ``log10`` differs in the last bit,
and anti-aliasing moves with both (seen: 1/255 at a few dozen pixels with AVX-512, 3/255 at
59 pixels of ``fig3_map.png`` with numpy's and torch's vector kernels off). So a regenerated file that is the *same result* within
the tolerances below keeps the existing bytes, and anything larger (a moved curve, new
text, a changed number in the 4th digit) replaces it:

* **PNG**: same size, every channel within :data:`PNG_TOLERANCE` (4/255);
* **JSON**: the same keys, strings, integers and booleans, and every float within a
  relative :data:`JSON_RTOL` (1e-4) or an absolute :data:`JSON_ATOL` (1e-6);
* **PDF**: the vector form of the same drawing as its PNG sibling, kept when that PNG and
  the JSON sibling (the figure's data and provenance) are both the same by the rules above;
* anything else: identical bytes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

PNG_TOLERANCE = 4 / 255
"""Largest per-channel difference at which a re-rendered PNG counts as the same picture."""
JSON_RTOL = 1e-4
"""Relative tolerance on floats in a JSON record (CPU-dependent float32 rounding is ~1e-6)."""
JSON_ATOL = 1e-6
"""Absolute tolerance on floats in a JSON record (values that are zero up to rounding)."""


def same_result(old: Path, new: Path) -> bool:
    """Whether ``new`` (just written) is the same result as the existing file ``old``.

    ``new``'s siblings (same stem, other suffix) are read for a PDF; call this for every
    file of a batch *before* moving any of them.
    """
    if not old.is_file() or not new.is_file():
        return False
    if old.read_bytes() == new.read_bytes():
        return True
    suffix = new.suffix.lower()
    if suffix == ".png":
        return same_picture(old, new)
    if suffix == ".json":
        return same_json(old, new)
    if suffix == ".pdf":
        pictures = [(old.with_suffix(s), new.with_suffix(s)) for s in (".png", ".json")]
        return all(new_s.is_file() for _, new_s in pictures) and all(
            same_result(old_s, new_s) for old_s, new_s in pictures)
    return False


def same_picture(old: Path, new: Path) -> bool:
    """Two PNGs of the same size whose channels all differ by at most :data:`PNG_TOLERANCE`.

    Rasterisation is not bit-exact across CPUs: a last-bit difference in a coordinate can
    move the anti-aliasing of a nearly straight line by a few levels at a few dozen pixels,
    while a real change (a moved curve, new text) differs by tens of levels or more.
    """
    import numpy as np
    from matplotlib import image

    try:
        a, b = image.imread(old), image.imread(new)  # [rows, cols, channels] in [0, 1]
    except (OSError, ValueError, SyntaxError):
        return False  # not a PNG we can read: replace it
    return a.shape == b.shape and float(np.abs(a - b).max()) <= PNG_TOLERANCE + 1e-6


def same_json(old: Path, new: Path) -> bool:
    """Two JSON files with the same structure whose floats agree within the tolerances."""
    try:
        a = json.loads(old.read_text(encoding="utf-8"))
        b = json.loads(new.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return same_value(a, b)


def same_value(a: Any, b: Any) -> bool:
    """:func:`same_json` on parsed values (floats compared with tolerance, all else exactly)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) \
                or not isinstance(b, (int, float)):
            return False
        return math.isclose(a, b, rel_tol=JSON_RTOL, abs_tol=JSON_ATOL)
    return type(a) is type(b) and a == b
