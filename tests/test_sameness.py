"""A regenerated output within the stated tolerances keeps the committed bytes; a real change
replaces them (anomaly.sameness, used by anomaly.outputs for every command's outputs)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from anomaly.outputs import MANIFEST, claim
from anomaly.sameness import JSON_ATOL, JSON_RTOL, same_result, same_value


@pytest.mark.parametrize("a, b, same", [
    (0.123456, 0.123457, True),  # 6th significant digit: CPU rounding
    (1234.56, 1234.57, True),
    (0.1234, 0.1236, False),  # 4th digit: a changed result
    (0.0, 4e-7, True),  # zero up to rounding
    (0.0, 4e-6, False),
    (1, 1.0, True),  # the JSON writer may print an integral float either way
    (True, 1.0, False),
    ("0.1", 0.1, False),
    ({"a": 1.0}, {"a": 1.0, "b": 2}, False),
    ([1.0, 2.0], [1.0, 2.0, 3.0], False),
    ({"x": [0.5, {"y": "s"}]}, {"x": [0.50001, {"y": "s"}]}, True),
    ({"x": [0.5, {"y": "s"}]}, {"x": [0.5, {"y": "t"}]}, False),
    (None, None, True),
    (None, 0.0, False),
])
def test_json_values(a, b, same):
    assert same_value(a, b) is same
    assert same_value(b, a) is same


def test_tolerances_are_as_documented():
    assert JSON_RTOL == 1e-4 and JSON_ATOL == 1e-6


def _figure(folder, stem, value, shift=0):
    """A tiny figure as save_figure writes it: a PNG, a PDF and its JSON record."""
    from matplotlib import image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.full((8, 8, 3), 100, dtype=np.uint8)
    pixels[2, 3, 0] += shift
    image.imsave(folder / f"{stem}.png", pixels, metadata={"Software": None})
    (folder / f"{stem}.pdf").write_bytes(b"%PDF-1.4 drawn at " + repr(value).encode())
    (folder / f"{stem}.json").write_text(json.dumps({"value": value, "command": "cmd"}))


@pytest.mark.parametrize("value, shift, replaced", [
    (0.3333333, 1, set()),  # noise in the record and one level in one pixel: the same figure
    (0.3333333, 12, {"f.png", "f.pdf"}),  # the picture changed (the record is the same)
    (0.3334, 0, {"f.json", "f.pdf"}),  # the data changed
])
def test_a_figure_is_kept_or_replaced(tmp_path, value, shift, replaced):
    out = tmp_path / "figs"
    first = claim(out, "cmd", ["f.png", "f.pdf", "f.json"])
    with first.writing() as stage:
        _figure(stage, "f", 0.3333334)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != MANIFEST}
    second = claim(out, "cmd", ["f.png", "f.pdf", "f.json"])
    with second.writing() as stage:
        _figure(stage, "f", value, shift)
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != MANIFEST}
    assert {name for name in after if after[name] != before[name]} == replaced


def test_other_files_need_identical_bytes(tmp_path):
    (tmp_path / "a.txt").write_text("x 0.123456")
    (tmp_path / "b.txt").write_text("x 0.123457")
    assert not same_result(tmp_path / "a.txt", tmp_path / "b.txt")
    assert same_result(tmp_path / "a.txt", tmp_path / "a.txt")
    assert not same_result(tmp_path / "missing.json", tmp_path / "a.txt")
