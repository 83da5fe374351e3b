"""The core is plain PyTorch: no core module imports Flower (``flwr``). Only the
Flower layer does; it translates Messages and holds the core's round engine."""

import ast

from flower_processes import REPO

PACKAGE = REPO / "flwr_fedgkt"
FLOWER_LAYER = {
    "strategy.py",
    "pipeline.py",
    "asynchronous.py",
    "budget.py",
    "grid.py",
    "node_context.py",
    "compat.py",
    "legacy/__init__.py",
    "legacy/client.py",
    "legacy/strategy.py",
    "legacy/fedavg_names.py",
    "legacy/wire.py",
    "legacy/server_app.py",
    "records.py",
    "client.py",
    "client_app.py",
    "server_app.py",
}
RE_EXPORTS = {"compat.py", "legacy/__init__.py"}
"""Flower-layer modules that only re-export other Flower-layer modules."""


def _imported_packages(path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_no_core_module_imports_flower() -> None:
    # Prepare
    core = [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE).as_posix() not in FLOWER_LAYER
    ]
    assert len(core) >= 10 and any(p.name == "rounds.py" for p in core)
    # Execute
    offenders = {p.relative_to(PACKAGE).as_posix() for p in core if "flwr" in _imported_packages(p)}
    # Assert
    assert offenders == set()


def _module_file(module) -> str:
    """A module's file relative to the package: ``x.py``, or ``x/__init__.py`` for
    a subpackage."""
    if (PACKAGE / module).is_dir():
        return (module / "__init__.py").as_posix()
    return module.as_posix() + ".py"


def _relative_imports(path) -> set[str]:
    """The package modules ``path`` imports relatively (``from .x import``,
    ``from . import x``), as paths relative to the package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = path.parent.relative_to(PACKAGE)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = here
            for _ in range(node.level - 1):
                base = base.parent
            if node.module:
                found.add(_module_file(base / node.module.replace(".", "/")))
            else:
                found.update(_module_file(base / alias.name) for alias in node.names)
    return found


def test_no_core_module_imports_the_flower_layer() -> None:
    # Prepare
    core = [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE).as_posix() not in FLOWER_LAYER | {"__init__.py"}
    ]
    assert "validation/__init__.py" in _relative_imports(PACKAGE / "rounds.py")  # sees imports
    # Execute
    offenders = {
        p.relative_to(PACKAGE).as_posix(): _relative_imports(p) & FLOWER_LAYER for p in core
    }
    # Assert
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_flower_layer_does_import_flower() -> None:
    # the check above looks at the right thing: the Flower layer's imports are seen
    for name in FLOWER_LAYER - RE_EXPORTS:
        assert "flwr" in _imported_packages(PACKAGE / name), name
    for name in RE_EXPORTS:
        assert _relative_imports(PACKAGE / name) & FLOWER_LAYER, name


def test_the_public_api_is_exported_and_typed() -> None:
    import flwr_fedgkt

    # every name in __all__ resolves, and the package says it is typed
    for name in flwr_fedgkt.__all__:
        assert getattr(flwr_fedgkt, name) is not None, name
    assert {"FedGKT", "PipelinedFedGKT", "FedGKTClient", "ServerTrainer", "Settings"} <= set(
        flwr_fedgkt.__all__
    )
    # internals and the legacy API are not the package's API
    assert not {"LegacyFedGKT", "RoundEngine", "LogitTable"} & set(flwr_fedgkt.__all__)
    assert (PACKAGE / "py.typed").exists()
