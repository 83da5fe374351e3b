"""Every command of the README runs as written, and the figures printed beside it
are the ones it produces.

The two set-up commands run in ``.ci/run`` (the main job through
``tools/readme_main_job.py``, the tests as CI's own test command). The others
measure for hours; here each runs as written on the results it stored
(``compare.py --report-only`` on a copy of its output folder; ``privacy.py``
with its ``--out`` a copy of the stored results, which it reports without
measuring again; the profile one-liner as it is), and the README's figures must
equal what it prints or writes. A new command in the README fails
:func:`test_every_readme_command_is_checked` until it has a check here.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from flower_processes import REPO

README = REPO / "README.md"
TEXT = README.read_text()


BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def _joined(block: str) -> list[str]:
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip()]


def commands(markdown: str) -> list[str]:
    """The commands of the ```bash blocks, continuation lines joined."""
    return [command for block in BLOCK.findall(markdown) for command in _joined(block)]


def _block(command: str) -> re.Match:
    """The README's bash block that holds ``command``."""
    for match in BLOCK.finditer(TEXT):
        if command in _joined(match.group(1)):
            return match
    raise AssertionError(f"no bash block holds {command!r}")


def paragraph_before(command: str) -> str:
    """The README's paragraph just above the bash block holding ``command``."""
    return TEXT[: _block(command).start()].rstrip().rsplit("\n\n", 1)[1]


def paragraph_after_table(command: str) -> str:
    """The README's paragraph just below the table that follows ``command``."""
    rest = re.sub(r"^\s*(?:\|.*\|\n)+", "", TEXT[_block(command).end() :])
    return rest.strip().split("\n\n", 1)[0]


def table_after(command: str) -> list[list[str]]:
    """The cells of the first Markdown table after ``command``'s bash block."""
    lines = re.match(r"\s*((?:\|.*\|\n)+)", TEXT[_block(command).end() :])
    assert lines is not None, f"no table after {command!r}"
    return [cells(line) for line in lines.group(1).splitlines() if not line.startswith("|---")]


def main_table() -> dict[str, list[str]]:
    """The main comparison's results table, by its first column."""
    main = next(c for c in commands(TEXT) if c.startswith(MAIN_COMPARISON))
    return {row[0]: row[1:] for row in table_after(main)}


def parts(command: str) -> list[list[str]]:
    """A command line's ``&&``-joined commands, each as its argv."""
    return [shlex.split(part) for part in command.split("&&")]


def extras(part: list[str]) -> set[str]:
    """The extras a ``pip install -e ".[a,b]"`` names."""
    match = re.fullmatch(r"\.\[(.*)\]", part[-1])
    return set(match.group(1).split(",")) if match else set()


def script(argv: list[str], name: str) -> list[str]:
    assert argv[:2] == ["python", name], argv
    return argv[2:]


def load(path: Path):
    """The script at ``path`` as a module (the one imported already, if any)."""
    if path.stem in sys.modules:
        return sys.modules[path.stem]
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def cells(line: str) -> list[str]:
    return [cell.strip().strip("`").replace("**", "") for cell in line.strip("|").split("|")]


def percent(fractions: list[float]) -> str:
    """Mean and sample sd of accuracies as the README writes them: 98.80 % (0.98)."""
    values = [100 * value for value in fractions]
    return f"{statistics.mean(values):.2f} % ({statistics.stdev(values):.2f})"


def _compare_report(command: str, tmp_path: Path) -> dict[tuple[str, str], dict]:
    """``compare.py`` as the README runs it, on a copy of its output folder with
    ``--report-only``; its seeds.json figures by (setting, algorithm)."""
    argv = script(parts(command)[-1], "baselines/compare.py")
    compare = load(REPO / "baselines" / "compare.py")
    stored = compare.parse_args(argv).output_dir
    copy = tmp_path / "results"
    shutil.copytree(REPO / stored, copy)
    (copy / "seeds.json").unlink()
    argv[argv.index("--output-dir") + 1] = str(copy)
    assert compare.main([*argv, "--report-only"]) == 0
    report = json.loads((copy / "seeds.json").read_text())
    return {(row["setting"], row["algorithm"]): row for row in report["runs"]}


def _run_mb(row: dict) -> float:
    return statistics.mean(row["bytes_per_client_whole_run"]) / 1e6


def check_comparison(command: str, tmp_path: Path) -> None:
    rows = _compare_report(command, tmp_path)
    table = {row[0]: row[1:] for row in table_after(command)}
    for setting, label in (("iid", "IID"), ("dirichlet-0.5", "Dirichlet 0.5")):
        quoted = table[f"final accuracy, {label}"]
        assert quoted == [
            percent(rows[setting, "fedgkt"]["final_accuracy"]),
            percent(rows[setting, "fedavg"]["final_accuracy"]),
        ], setting
    assert table["MB per client over the run (up + down), IID"] == [
        f"{_run_mb(rows['iid', 'fedgkt']):.2f}",
        f"{_run_mb(rows['iid', 'fedavg']):.2f}",
    ]


def check_frozen_comparison(command: str, tmp_path: Path) -> None:
    rows = _compare_report(command, tmp_path)
    sentence = " ".join(paragraph_before(command).split())
    iid, dirichlet = rows["iid", "fedgkt"], rows["dirichlet-0.5", "fedgkt"]
    assert f"moves {_run_mb(iid):.2f} MB over the run" in sentence
    assert f"at {percent(iid['final_accuracy'])} IID" in sentence
    assert f"and {percent(dirichlet['final_accuracy'])} Dirichlet 0.5" in sentence
    # the ratio to FedAvg's bytes in the main comparison's table
    fedavg = float(main_table()["MB per client over the run (up + down), IID"][1])
    assert f"{_run_mb(iid) / fedavg:.2f}x FedAvg's bytes" in sentence


def check_profile(command: str, tmp_path: Path) -> None:
    # Execute: as written
    out = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    profile = ast.literal_eval(out.stdout.strip())
    # Assert: the sentence before it and the results table quote these figures
    from flwr_fedgkt.accounting import model_profile

    edge, resnet56 = model_profile("resnet8", 10), model_profile("resnet56", 10)
    sentence = " ".join(paragraph_before(command).split())
    mflops = profile["train_flops_per_sample"] / 1e6
    assert f"{profile['params']:,} parameters and {mflops:.1f} training MFLOPs" in sentence
    ratios = (profile["params"] / edge["params"], mflops / (edge["train_flops_per_sample"] / 1e6))
    assert f"({ratios[0]:.0f}x and {ratios[1]:.1f}x ResNet-8's)" in sentence
    table = main_table()
    assert table["parameters trained on the edge"] == [
        f"{edge['params']:,}",
        f"{resnet56['params']:,} ({resnet56['params'] / edge['params']:.0f}x)",
    ]
    edge_mflops = edge["train_flops_per_sample"] / 1e6
    big_mflops = resnet56["train_flops_per_sample"] / 1e6
    assert table["edge training MFLOPs per sample"] == [
        f"{edge_mflops:.1f}",
        f"{big_mflops:.1f} ({big_mflops / edge_mflops:.2f}x)",
    ]


def check_privacy(command: str, tmp_path: Path) -> None:
    install, run = parts(command)
    assert extras(install) <= set(_extras())
    argv = script(run, "benchmarks/privacy.py")
    privacy = load(REPO / "benchmarks" / "privacy.py")
    parsed = privacy.parse_args(argv)
    # Execute: as written, its output folder a copy of the stored results (every
    # run there, so it measures nothing and prints the table)
    copy = tmp_path / "privacy"
    shutil.copytree(REPO / "baselines" / "_static" / "privacy", copy)
    out = subprocess.run(
        [sys.executable, "benchmarks/privacy.py", *argv, "--out", str(copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[" + parsed.datasets[0] + "/" not in out.stdout, "it measured again"
    printed = [cells(line) for line in out.stdout.splitlines() if line.startswith("| ")]
    header, *rows = printed
    measured = {row[0]: dict(zip(header, row, strict=True)) for row in rows}
    readme_header, *readme_rows = table_after(command)
    # Assert: the README's rows are the printed ones, column by column, and its
    # run-config column is what the setting sets
    assert [row[0] for row in readme_rows] == parsed.settings
    for row in readme_rows:
        quoted = dict(zip(readme_header, row, strict=True))
        common = set(quoted) & set(measured[row[0]]) - {"setting"}
        assert len(common) == 5, common
        for column in common:
            assert quoted[column] == measured[row[0]][column], (row[0], column)
        assert quoted["run config"] == _run_config_text(privacy.SETTINGS[row[0]])


def _run_config_text(setting: dict[str, object]) -> str:
    if not setting:
        return "(none)"

    def value(v: object) -> str:
        return json.dumps(v) if isinstance(v, str) else f"{v:g}"

    return "`, `".join(f"{k} = {value(v)}" for k, v in setting.items())


STRAGGLER_SETTINGS = {"IID": "iid-slow", "Dirichlet 0.5": "dirichlet-slow"}


def _straggler_tables(command: str, copy: Path) -> dict[tuple[str, str], dict[str, str]]:
    """``stragglers.py`` as the README runs it, ``--report-only`` on ``copy``: its
    printed rows by (setting, method), each a dict of header to cell."""
    argv = script(parts(command)[-1], "benchmarks/stragglers.py")
    load(REPO / "benchmarks" / "stragglers.py").parse_args(argv)
    out = subprocess.run(
        [sys.executable, "benchmarks/stragglers.py", *argv, "--report-only", "--out", str(copy)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows: dict[tuple[str, str], dict[str, str]] = {}
    setting, header = "", []
    for line in out.stdout.splitlines():
        if re.match(r"[\w-]+ \(budget ", line):
            setting = line.split()[0]
        elif line.startswith("| method"):
            header = cells(line)
        elif line.startswith("| ") and not line.startswith("|---"):
            row = dict(zip(header, cells(line), strict=True))
            rows[setting, row["method"]] = row
    return rows


def check_stragglers(command: str, tmp_path: Path) -> None:
    # Execute: every stragglers command of the README, on a copy of the results
    copy = tmp_path / "stragglers"
    shutil.copytree(REPO / "baselines" / "_static" / "stragglers", copy)
    printed: dict[tuple[str, str], dict[str, str]] = {}
    mine = [c for c in commands(TEXT) if c.startswith(STRAGGLERS)]
    for each in mine:
        printed |= _straggler_tables(each, copy)
    # Assert: each cell of the README's table (after the last command) is the
    # printed one of its setting (the column's prefix) and method
    header, *rows = table_after(mine[-1])
    assert len(rows) >= 4
    for row in rows:
        for column, cell in list(zip(header, row, strict=True))[1:]:
            label, _, name = column.partition(": ")
            assert cell == printed[STRAGGLER_SETTINGS[label], row[0]][name], (row[0], column)
    # ... and the sentence after the table quotes the runs without slow nodes
    after = " ".join(paragraph_after_table(mine[-1]).split())
    for method in ("fedgkt-pipeline", "fedgkt-async"):
        quoted = printed["iid-no-slow", method]["s to 95 %"]
        assert f"`{method}` {quoted} s" in after, (method, quoted)


def _extras() -> dict[str, list[str]]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["project"]["optional-dependencies"]


def check_docs(command: str, tmp_path: Path) -> None:
    # the site's build runs in .ci/run (mkdocs build --strict); here: the extra
    # the command installs holds MkDocs, and the configuration it serves exists
    install, serve = parts(command)
    assert extras(install) == {"docs"}
    assert any(dep.startswith("mkdocs>=") for dep in _extras()["docs"])
    assert serve == ["mkdocs", "serve"] and (REPO / "mkdocs.yml").is_file()


def check_setup_main_job(command: str, tmp_path: Path) -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "python tools/readme_main_job.py" in ci.splitlines()


def check_setup_tests(command: str, tmp_path: Path) -> None:
    install, run = parts(command)
    assert extras(install) == {"test"} and run == ["pytest", "-q"]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "python -m pytest -q" in ci
    assert any('-e ".[test' in line and "pip install" in line for line in ci)


STRAGGLERS = "python benchmarks/stragglers.py "
MAIN_COMPARISON = "python baselines/compare.py --output-dir baselines/_static/digits-seeds "
CHECKS = {
    "pip install -e . && FLWR_TELEMETRY_ENABLED=0": check_setup_main_job,
    'pip install -e ".[test]" && pytest -q': check_setup_tests,
    MAIN_COMPARISON: check_comparison,
    "python baselines/compare.py --output-dir baselines/_static/digits-freeze": (
        check_frozen_comparison
    ),
    'python -c "from flwr_fedgkt.accounting import model_profile': check_profile,
    'pip install -e ".[privacy]" && python benchmarks/privacy.py': check_privacy,
    'pip install -e ".[docs]" && mkdocs serve': check_docs,
    STRAGGLERS: check_stragglers,
}


def _check_of(command: str):
    found = [check for prefix, check in CHECKS.items() if command.startswith(prefix)]
    return found[0] if len(found) == 1 else None


def test_every_readme_command_is_checked() -> None:
    unchecked = [command for command in commands(TEXT) if _check_of(command) is None]
    assert unchecked == []
    unused = [p for p in CHECKS if not any(c.startswith(p) for c in commands(TEXT))]
    assert unused == []


@pytest.mark.parametrize("prefix", list(CHECKS), ids=lambda p: CHECKS[p].__name__)
def test_the_readme_command_runs_as_written(prefix: str, tmp_path: Path) -> None:
    # the first README command of the check's kind (a check covers all of its kind)
    command = next(c for c in commands(TEXT) if c.startswith(prefix))
    CHECKS[prefix](command, tmp_path)
