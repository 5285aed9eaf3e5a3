"""Imports point one way: notebooks ← commands ← model code ← maths ← plumbing
(docs/architecture.md, "Layers").

Every module under ``anomaly/`` is parsed with :mod:`ast`; every import counts, the ones
inside functions included (a lazy import still runs, and :func:`anomaly.io.code_version`
hashes it into provenance), and so does ``importlib.import_module("anomaly.…")`` with a
literal name. The layer table below is the one place the layering is written down; the
list in docs/architecture.md names the same modules in the same order.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "anomaly"

LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Top first. A module may import modules of its own row or of rows below it, never above.
    ("commands", (
        "anomaly.figures", "anomaly.probe.cli", "anomaly.probe.__main__", "anomaly.probe.atlas.cli",
        "anomaly.probe.atlas.__main__", "anomaly.coca.geometry",
        "anomaly.ablation.__main__", "anomaly.ablation.run", "anomaly.ablation.sweep",
    )),
    # Model code, ordered so that no package of it imports one above it (no cycles).
    ("model code: ablation", ("anomaly.ablation",)),
    ("model code: probe", ("anomaly.probe",)),
    ("model code: variants", ("anomaly.variants",)),
    ("model code: models", ("anomaly.models", "anomaly.bundled")),
    ("model code: coca", ("anomaly.coca",)),
    ("model code: model_surgery", ("anomaly.model_surgery",)),
    ("maths: analytic", ("anomaly.analytic",)),
    ("maths: rope", ("anomaly.rope",)),
    ("plumbing", (
        "anomaly", "anomaly.errors", "anomaly.cli", "anomaly.io", "anomaly.outputs", "anomaly.sameness",
        "anomaly.plotting", "anomaly.corpus", "anomaly.replication", "anomaly.verdicts",
    )),
)
"""The layer table. A name covers the module and, for a package, everything in it; the
longest name that covers a module decides its row (``anomaly.coca.geometry``, the command
``python -m anomaly.coca.geometry``, is a command although ``anomaly.coca`` is model code).
``anomaly`` itself is only the package's ``__init__`` (its version)."""

COMMAND_DRIVES = {
    "anomaly.probe.__main__": {"anomaly.probe.cli"},
    "anomaly.probe.atlas.__main__": {"anomaly.probe.atlas.cli"},
    "anomaly.ablation.__main__": {"anomaly.ablation.run"},
}
"""Commands never import one another (no module imports a sibling's orchestrator or a CLI),
except an entry module importing the command it runs."""

COMMANDS = LAYERS[0][1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The toolkit module ``name`` is, or lies in (``from anomaly.x import f``: ``anomaly.x``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """``(module, line)`` for every toolkit module that module ``name`` (its source at
    ``path``) imports, at any depth of the file. ``from anomaly.pkg import sub`` counts
    ``anomaly.pkg.sub`` when that is a module."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for target in targets:
            resolved = _resolve(target, modules) if target.split(".")[0] == "anomaly" else None
            if resolved is not None and resolved != name and (resolved, node.lineno) not in found:
                found.append((resolved, node.lineno))
    return found


def layer_of(module: str) -> int:
    """Row of ``module`` in :data:`LAYERS` (0 = top)."""
    best: tuple[int, int] | None = None  # (length of the covering name, row)
    for row, (_, names) in enumerate(LAYERS):
        for covering in names:
            covers = module == covering or (covering != "anomaly" and module.startswith(covering + "."))
            if covers and (best is None or len(covering) > best[0]):
                best = (len(covering), row)
    if best is None:
        raise KeyError(f"{module} is in no row of the layer table (tests/test_layers.py LAYERS); "
                       "add it where docs/architecture.md puts it")
    return best[1]


def upward_imports(modules: dict[str, Path] | None = None) -> list[str]:
    """Every import that runs back up the table, or from one command into another."""
    modules = _modules() if modules is None else modules
    bad = []
    for name, path in modules.items():
        row = layer_of(name)
        for target, line in imports_of(name, path, modules):
            where = f"{name}:{line} ({LAYERS[row][0]}) imports {target}"
            if layer_of(target) < row:
                bad.append(f"{where} ({LAYERS[layer_of(target)][0]}), which sits above it")
            elif row == 0 and layer_of(target) == 0 and target not in COMMAND_DRIVES.get(name, ()):
                bad.append(f"{where}, another command")
    return bad


def _package(module: str) -> str:
    """The unit a cycle is looked for between: ``anomaly.<first part>`` (a command is its own)."""
    return module if module in COMMANDS else ".".join(module.split(".")[:2])


def package_cycles(modules: dict[str, Path] | None = None) -> list[list[str]]:
    """Cycles in the graph of imports between packages (each package's own imports left out)."""
    modules = _modules() if modules is None else modules
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for target, _ in imports_of(name, path, modules):
            if _package(target) != _package(name):
                graph[_package(name)].add(_package(target))
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:  # depth-first search; a grey node met again closes a cycle
        state[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "grey":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "black"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_every_module_has_a_layer():
    for name in _modules():
        layer_of(name)  # raises, naming the module, when the table misses it


def test_no_import_runs_back_up():
    assert upward_imports() == []


def test_no_cycles_between_packages():
    assert package_cycles() == []


def test_coca_imports_neither_the_probe_nor_models():
    # CoCA is attention and the HF drop-in; the measurement of models lives with the probe.
    modules = _modules()
    for name, path in modules.items():
        if name.startswith("anomaly.coca") and name not in COMMANDS:
            targets = {t for t, _ in imports_of(name, path, modules)}
            assert not {t for t in targets if t.startswith(("anomaly.probe", "anomaly.models"))}, name


def test_the_docs_name_the_layers_in_the_same_order():
    """docs/architecture.md lists commands, then model code, maths and plumbing, naming
    each command of the table and the model-code packages in the table's order (bottom-up)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    heads = [section.index(f"**{h}**") for h in ("Notebooks", "Commands", "Model code", "Maths", "Plumbing")]
    assert heads == sorted(heads)
    commands = section[heads[1]:heads[2]]
    for name in COMMANDS:
        assert f"`{name}`" in commands, f"docs/architecture.md does not list the command {name}"
    model = section[heads[2]:heads[3]]
    order = [model.index(f"- `{names[0]}`") for title, names in LAYERS if title.startswith("model code")]
    assert order == sorted(order, reverse=True), "model code in docs/architecture.md is not listed bottom-up"
    maths = section[heads[3]:heads[4]]
    assert maths.index("`anomaly.rope`") < maths.index("`anomaly.analytic`")


def _tree_with(tmp_path: Path, name: str, source: str) -> dict[str, Path]:
    """The real modules plus a planted module ``name`` with ``source``, under ``tmp_path``."""
    modules = _modules()
    path = tmp_path / Path(*name.split(".")).with_suffix(".py")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return {**modules, name: path}


@pytest.mark.parametrize(("planted", "source", "cycle"), [
    # model code importing a command, inside a function (as a lazy import does)
    ("anomaly.probe.planted", "def f():\n    from anomaly.probe.cli import main\n", True),
    # plumbing reaching up into model code
    ("anomaly.plotting.planted", "from anomaly import model_surgery\n", False),
    # a sibling's orchestrator, imported by name
    ("anomaly.ablation.planted", "import importlib\n\nimportlib.import_module('anomaly.ablation.run')\n", True),
    # CoCA importing the probe (the coupling coca/geometry.py once made)
    ("anomaly.coca.planted", "from anomaly.probe import capture\n", True),
    # one command importing another
    ("anomaly.figures", "from anomaly.ablation.run import run\n", False),
])
def test_a_planted_violation_is_found(tmp_path, planted, source, cycle):
    # Against the real tree as it stands, so this checks the checker whatever else fails.
    modules = _tree_with(tmp_path, planted, source)
    found = sorted(set(upward_imports(modules)) - set(upward_imports()))
    assert len(found) == 1 and found[0].startswith(f"{planted}:"), found
    new_cycles = [c for c in package_cycles(modules) if c not in package_cycles()]
    assert bool(new_cycles) == cycle, new_cycles


# ------------------------------------------- provenance hashes what can change the result


def test_provenance_hashes_only_what_can_change_the_result():
    from anomaly.io import code_version

    fig3 = set(code_version("anomaly.figures"))  # the analytic figures: maths, plotting, plumbing
    assert not {f for f in fig3 if f.startswith("anomaly/model_surgery/")}
    assert not {f for f in fig3 if f.startswith(("anomaly/probe/", "anomaly/coca/", "anomaly/ablation/"))}
    probe = set(code_version("anomaly.probe.__main__"))  # the probe of a real model
    assert "anomaly/probe/slack_geometry.py" in probe
    assert not {f for f in probe if f.startswith("anomaly/ablation/") or f == "anomaly/coca/geometry.py"}


def test_the_probe_of_an_ablation_checkpoint_hashes_the_files_that_loaded_it(tmp_path, monkeypatch):
    import json
    import sys
    from types import SimpleNamespace

    from anomaly.io import code_version
    from anomaly.probe.cli import entry
    from test_probe_coca import _ablation_run

    run, _ = _ablation_run(tmp_path, monkeypatch, seeds=(0,))
    # As under python -m anomaly.probe, where Provenance.from_argv hashes the main module's code.
    monkeypatch.setitem(sys.modules, "__main__", SimpleNamespace(__spec__=SimpleNamespace(name="anomaly.probe.__main__")))
    out = tmp_path / "probe"
    assert entry(["--model", str(run / "rope"), "--tokens", "24", "--out", str(out), "--quiet", "--no-figures",
                  "--device", "cpu"]) == 0
    code = json.loads((out / "summary.json").read_text())["provenance"]["code"]
    assert list(code) == sorted(code)
    assert code == {**code_version("anomaly.probe.__main__"), **code_version("anomaly.ablation.checkpoint")}
    assert "anomaly/ablation/train.py" in code
