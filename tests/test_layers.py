"""The core is plain PyTorch: no core module imports Flower (``flwr``). Only the
Flower layer does; it translates Messages and holds the core's round engine."""

import ast

from flower_processes import REPO

PACKAGE = REPO / "flwr_fedgkt"
FLOWER_LAYER = {
    "strategy.py",
    "compat.py",
    "records.py",
    "client.py",
    "client_app.py",
    "server_app.py",
}


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
                found.add((base / node.module.replace(".", "/")).as_posix() + ".py")
            else:
                found.update((base / alias.name).as_posix() + ".py" for alias in node.names)
    return found


def test_no_core_module_imports_the_flower_layer() -> None:
    # Prepare
    core = [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if p.relative_to(PACKAGE).as_posix() not in FLOWER_LAYER | {"__init__.py"}
    ]
    assert "features.py" in _relative_imports(PACKAGE / "rounds.py")  # the check sees imports
    # Execute
    offenders = {
        p.relative_to(PACKAGE).as_posix(): _relative_imports(p) & FLOWER_LAYER for p in core
    }
    # Assert
    assert {name: found for name, found in offenders.items() if found} == {}


def test_the_flower_layer_does_import_flower() -> None:
    # the check above looks at the right thing: the Flower layer's imports are seen
    for name in FLOWER_LAYER:
        assert "flwr" in _imported_packages(PACKAGE / name), name


def test_the_public_api_is_exported_and_typed() -> None:
    import flwr_fedgkt

    # every name in __all__ resolves, and the package says it is typed
    for name in flwr_fedgkt.__all__:
        assert getattr(flwr_fedgkt, name) is not None, name
    assert {"FedGKT", "LegacyFedGKT", "RoundEngine", "ServerTrainer"} <= set(flwr_fedgkt.__all__)
    assert (PACKAGE / "py.typed").exists()
