"""The comparison command (python baselines/compare.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flwr_fedgkt.accounting import model_profile

COMPARE = Path(__file__).resolve().parents[1] / "baselines" / "compare.py"
if str(COMPARE.parent) not in sys.path:
    sys.path.insert(0, str(COMPARE.parent))

from compare import (  # noqa: E402
    Settings,
    algorithm_config,
    markdown_table,
    plot_setting,
    run_config_string,
    seeds_report,
    setting_name,
    summarise,
)

PLOTS = ("accuracy.png", "bytes.png", "edge_compute.png")


def _results(algorithm: str, accuracies: list[float]) -> dict:
    """A results.json as the two ServerApps write it (3 nodes, 100 train / 20 test each)."""
    rounds = []
    for i, accuracy in enumerate(accuracies, start=1):
        record = {
            "round": i,
            "accuracy": accuracy,
            "edge_accuracy": accuracy / 2,
            "loss": 1.0,
            "seconds": 10.0 * i,
            "train_nodes": 3,
            "eval_nodes": 3,
            "eval_samples": 60,
        }
        if algorithm == "fedgkt":
            record.update(
                bytes_up=3 * 1_000_000, bytes_down=0 if i == 1 else 3 * 4_000, stored_samples=300
            )
        else:
            record.update(
                bytes_up=3 * 2_000_000,
                bytes_down=3 * 4_000_000,
                train_samples=300,
                per_client=[
                    {
                        "node_id": n,
                        "bytes_up": 2_000_000,
                        "bytes_down": 4_000_000,
                        "bytes_up_train": 2_000_000,
                        "bytes_down_train": 2_000_000,
                    }
                    for n in range(3)
                ],
            )
        rounds.append(record)
    edge = model_profile("resnet8" if algorithm == "fedgkt" else "resnet56")
    server = model_profile("resnet55") if algorithm == "fedgkt" else None
    return {
        "algorithm": algorithm,
        "config": {"client-epochs": 2},
        "edge_model": edge,
        "server_model": server,
        "rounds": rounds,
    }


def test_both_runs_of_a_setting_get_the_same_shared_config(tmp_path) -> None:
    # Prepare
    settings = Settings(
        dataset="synthetic",
        nodes=2,
        rounds=2,
        shared_config="batch-size=64",
        fedavg_config="client-lr=0.01",
    )
    # Execute
    gkt = algorithm_config(settings, "fedgkt", "dirichlet", tmp_path / "a")
    avg = algorithm_config(settings, "fedavg", "dirichlet", tmp_path / "b")
    # Assert
    shared = run_config_string(settings.shared("dirichlet"))
    assert gkt.startswith(shared) and avg.startswith(shared)
    assert "dataset='synthetic'" in shared and "partitioner='dirichlet'" in shared
    assert "min-available-nodes=2" in shared and "num-server-rounds=2" in shared
    assert "server-model='resnet55'" in gkt and "model='resnet56'" in avg
    assert avg.endswith("batch-size=64 client-lr=0.01")
    assert gkt.endswith("batch-size=64")
    assert f"output-dir='{tmp_path / 'a'}'" in gkt


def test_run_config_strings_quote_text_and_refuse_single_quotes() -> None:
    # Prepare / Execute
    text = run_config_string({"a": 1, "b": 0.5, "c": "x y", "d": True})
    # Assert
    assert text == "a=1 b=0.5 c='x y' d=true"
    with pytest.raises(ValueError):
        run_config_string({"output-dir": "/tmp/it's"})


def test_setting_names() -> None:
    assert setting_name("iid", 0.5) == "iid"
    assert setting_name("dirichlet", 0.5) == "dirichlet-0.5"


def test_summary_figures_come_from_the_results() -> None:
    # Prepare
    gkt_results = _results("fedgkt", [0.5, 0.8, 0.7])
    avg_results = _results("fedavg", [0.4, 0.6, 0.9])
    # Execute
    gkt = summarise(gkt_results, "iid")
    avg = summarise(avg_results, "iid")
    # Assert: accuracy
    assert (gkt.final_accuracy, gkt.best_accuracy, gkt.best_round) == (0.7, 0.8, 2)
    # bytes per client per round: round totals over nodes, or the per-client figures
    assert gkt.up_per_client == [1_000_000] * 3
    assert gkt.down_per_client == [0, 4_000, 4_000]
    assert avg.up_per_client == [2_000_000] * 3
    assert avg.down_per_client_train == [2_000_000] * 3
    # edge FLOPs: 2 epochs x 300 samples x train FLOPs (+ forward passes)
    r8, r56 = model_profile("resnet8"), model_profile("resnet56")
    per_round_gkt = 2 * 300 * r8["train_flops_per_sample"] + 360 * r8["forward_flops_per_sample"]
    per_round_avg = 2 * 300 * r56["train_flops_per_sample"] + 60 * r56["forward_flops_per_sample"]
    assert gkt.edge_flops == pytest.approx([per_round_gkt] * 3)
    assert avg.edge_flops == pytest.approx([per_round_avg] * 3)
    # FedGKT first reached its final accuracy (0.7) in round 2; FedAvg in round 3
    assert gkt.edge_flops_to_reach(0.7) == pytest.approx(2 * per_round_gkt)
    assert avg.edge_flops_to_reach(0.9) == pytest.approx(3 * per_round_avg)
    assert gkt.edge_flops_to_reach(0.95) is None
    assert gkt.seconds_per_round == pytest.approx(20.0)


def test_cumulative_bytes_per_client_and_to_a_target() -> None:
    # FedGKT per client: 1 MB up every round, 0 / 4 kB / 4 kB down
    gkt = summarise(_results("fedgkt", [0.5, 0.8, 0.7]), "iid")
    assert gkt.cumulative_bytes == [1_000_000, 2_004_000, 3_008_000]
    assert gkt.bytes_to_reach(0.8) == 2_004_000  # first reached in round 2
    assert gkt.bytes_to_reach(0.5) == 1_000_000
    assert gkt.bytes_to_reach(0.81) is None
    # FedAvg per client: 2 MB up + 4 MB down every round
    avg = summarise(_results("fedavg", [0.4, 0.6, 0.9]), "iid")
    assert avg.cumulative_bytes == [6_000_000, 12_000_000, 18_000_000]
    table = markdown_table([gkt, avg])
    # common target: the lower final accuracy, 0.7: FedGKT round 2, FedAvg round 3
    assert "| 3.008 | 2.004 |" in table and "| 18.000 | 18.000 |" in table
    assert "over the whole run 0.17x and until the common target 0.11x" in table


def test_seeds_report_gives_mean_and_spread_over_seeds() -> None:
    per_seed = {
        1: [
            summarise(_results("fedgkt", [0.5, 0.7]), "iid"),
            summarise(_results("fedavg", [0.6, 0.8]), "iid"),
        ],
        2: [
            summarise(_results("fedgkt", [0.5, 0.9]), "iid"),
            summarise(_results("fedavg", [0.6, 0.6]), "iid"),
        ],
    }
    text, figures = seeds_report(per_seed)
    # FedGKT finals 70 and 90: mean 80, sample sd 14.14; 2.004 MB per client per run
    assert "| iid | FedGKT | 80.00 (14.14) | 70.00, 90.00 | 2.00 (0.00) |" in text
    assert "| iid | FedAvg | 70.00 (14.14) | 80.00, 60.00 | 12.00 (0.00) |" in text
    # common targets: 0.7 in seed 1 (both reach it in round 2), 0.6 in seed 2
    # (FedGKT reaches it in round 2, FedAvg in round 1)
    (gkt,) = [f for f in figures if f["algorithm"] == "fedgkt"]
    assert gkt["bytes_per_client_to_common_target"] == [2_004_000, 2_004_000]
    (avg,) = [f for f in figures if f["algorithm"] == "fedavg"]
    assert avg["bytes_per_client_to_common_target"] == [12_000_000, 6_000_000]


def test_table_has_a_row_per_run_and_the_ratios(tmp_path) -> None:
    # Prepare
    summaries = [
        summarise(_results("fedgkt", [0.5, 0.7]), "iid"),
        summarise(_results("fedavg", [0.6, 0.8]), "iid"),
    ]
    # Execute
    table = markdown_table(summaries)
    # Assert
    rows = [line for line in table.splitlines() if line.startswith("| iid")]
    assert len(rows) == 2
    assert "| FedGKT | resnet8 | 70.00 |" in rows[0]
    assert "| FedAvg | resnet56 | 80.00 |" in rows[1]
    for column in (
        "final acc.",
        "best acc.",
        "edge params",
        "edge train MFLOPs / sample",
        "up MB / client / round",
        "down MB / client / round",
        "edge TFLOPs to final acc.",
        "s / round",
    ):
        assert column in table.splitlines()[0]
    assert "edge params 56x" in table
    assert "edge training FLOPs per sample 9.19x" in table
    assert "-10.00 points" in table


def test_plots_are_written(tmp_path) -> None:
    # Prepare
    pair = {
        "fedgkt": summarise(_results("fedgkt", [0.5, 0.7]), "iid"),
        "fedavg": summarise(_results("fedavg", [0.6, 0.8]), "iid"),
    }
    # Execute
    paths = plot_setting(pair, tmp_path, "test setting")
    # Assert
    assert sorted(p.name for p in paths) == sorted(PLOTS)
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 10_000


def test_help_describes_the_command() -> None:
    # Prepare / Execute
    result = subprocess.run(
        [sys.executable, str(COMPARE), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Assert
    assert result.returncode == 0
    for option in ("--dataset", "--partitioner", "--dirichlet-alpha", "--nodes", "--rounds"):
        assert option in result.stdout
    for option in ("--client-epochs", "--seed", "--output-dir", "--report-only"):
        assert option in result.stdout


def _processes_mentioning(text: str) -> list[int]:
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (
                needle in (entry / "environ").read_bytes()
                or needle in (entry / "cmdline").read_bytes()
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _compare_command(out: Path, scratch: Path, rounds: int, extra: list[str]) -> list[str]:
    """The comparison on 2 synthetic IID nodes, its FLWR_HOME under ``scratch``."""
    return [
        sys.executable,
        str(COMPARE),
        "--dataset",
        "synthetic",
        "--nodes",
        "2",
        "--rounds",
        str(rounds),
        "--partitioner",
        "iid",
        *extra,
        "--output-dir",
        str(out),
        "--flower-home",
        str(scratch),
    ]


@pytest.mark.e2e
def test_compare_runs_both_algorithms_end_to_end_and_writes_the_report(tmp_path) -> None:
    # Prepare: the command's private FLWR_HOME goes under tmp_path
    out = tmp_path / "out"
    scratch = tmp_path / "flower"
    extra = ["--seed", "1", "--shared-config", "synthetic-samples-per-node=60"]
    command = _compare_command(out, scratch, rounds=1, extra=extra)
    # Execute
    result = subprocess.run(command, capture_output=True, text=True, timeout=1500)
    # Assert: it ran and wrote both results, the table and all plots
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for algorithm in ("fedgkt", "fedavg"):
        rounds = json.loads((out / "iid" / algorithm / "results.json").read_text())["rounds"]
        assert [r["round"] for r in rounds] == [1]
    for plot in PLOTS:
        assert (out / "iid" / plot).stat().st_size > 10_000
    table = (out / "comparison.md").read_text()
    assert "| iid | FedGKT | resnet8 |" in table and "| iid | FedAvg | resnet56 |" in table
    # FedAvg bytes: the model down twice (train, evaluate) and up once, per node
    fedavg = json.loads((out / "iid" / "fedavg" / "results.json").read_text())
    model_bytes = fedavg["model_bytes"]
    for record in fedavg["rounds"]:
        assert len(record["per_client"]) == 2
        for client in record["per_client"]:
            assert client["bytes_down"] == 2 * model_bytes
            assert client["bytes_up"] == model_bytes
    # the same partitions and splits: the same number of test samples
    fedgkt = json.loads((out / "iid" / "fedgkt" / "results.json").read_text())
    assert fedgkt["rounds"][0]["eval_samples"] == fedavg["rounds"][0]["eval_samples"]
    summary = json.loads((out / "summary.json").read_text())
    assert {r["algorithm"] for r in summary["runs"]} == {"fedgkt", "fedavg"}
    # and every process it started is gone
    assert _processes_mentioning(str(scratch)) == []


@pytest.mark.e2e
def test_compare_fails_cleanly_and_stops_its_processes_when_a_run_fails(tmp_path) -> None:
    # Prepare: a FedGKT run config its ServerApp refuses
    scratch = tmp_path / "flower"
    command = _compare_command(
        tmp_path / "out",
        scratch,
        rounds=1,
        extra=["--fedgkt-config", "feature-dtype='float64'", "--timeout", "600"],
    )
    # Execute
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    # Assert
    assert result.returncode == 1
    assert "comparison failed" in result.stderr
    assert "feature-dtype" in (tmp_path / "out" / "iid" / "fedgkt" / "flwr-run.log").read_text()
    assert _processes_mentioning(str(scratch)) == []
