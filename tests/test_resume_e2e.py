"""Resume after a real crash equals the uninterrupted run: a run on a local
simulation SuperLink is killed (SIGKILL of ``flwr run``, the SuperLink, its
SuperExec and the simulation) right after a round reaches ``results.json``, then
started again on a new SuperLink (new node ids) with ``resume-from`` and the same
``client-state-dir``. The uninterrupted run compared with is the session's shared
run of the repository's app (``message_api_run``, the same settings). (Exact
resume with the disk store, two of four nodes sampled by key, and a node ahead of
the checkpoint: in process, ``test_resume_and_faults.py``.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import E2E_NODES, E2E_RUN_CONFIG
from flower_processes import REPO, crash, flower_environment, flwr_run, start_local_superlink

pytestmark = pytest.mark.e2e

NODES = 3
BASE = "dataset='synthetic' synthetic-samples-per-node=40 batch-size=16 seed=5"
COMPARED = ("accuracy", "loss", "edge_accuracy", "edge_train_kd", "server_train_loss")


def _rounds(out: Path) -> list[dict]:
    try:
        return json.loads((out / "results.json").read_text())["rounds"]
    except (OSError, ValueError, KeyError):
        return []


def _run(
    workdir: Path,
    run_config: str,
    crash_after: int | None = None,
    nodes: int = NODES,
    app: Path = REPO,
) -> str:
    """One ``flwr run`` of ``app`` (the repository's) on a fresh local SuperLink;
    with ``crash_after``, the whole federation is killed as soon as that many
    rounds are in ``results.json``."""
    out = Path(run_config.split("output-dir='")[1].split("'")[0])
    with flower_environment(workdir) as env:
        start_local_superlink(env, workdir / "superlink.log")

        def watch(_line: str) -> None:
            # once the round is recorded and its checkpoint is on disk (written after
            # results.json), the resumed run has a checkpoint to go on from
            if crash_after is None or len(_rounds(out)) < crash_after:
                return
            if (out / f"checkpoint-round-{crash_after}.pt").exists():
                crash(env)

        result = flwr_run(
            env, app, run_config, nodes, timeout=900, log_file=workdir / "run.log", on_line=watch
        )
    if crash_after is None:
        assert result.returncode == 0, result.stdout[-3000:]
        assert "Exit Code" not in result.stdout and "Traceback" not in result.stdout, result.stdout[
            -3000:
        ]
    return result.stdout


def test_a_crashed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, message_api_run) -> None:
    # Prepare / Execute: (the uninterrupted run, message_api_run) and the same run
    # killed right after round 1's checkpoint, then resumed
    whole = message_api_run[0]["rounds"]
    split_out = tmp_path / "split"
    split = E2E_RUN_CONFIG.format(out=split_out) + f" client-state-dir='{tmp_path / 'clients'}'"
    _run(tmp_path / "c", split, crash_after=1, nodes=E2E_NODES)
    crashed = _rounds(split_out)
    _run(tmp_path / "r", f"{split} resume-from='{split_out}'", nodes=E2E_NODES)
    # Assert: the crash came after round 1 and before the run's end ...
    assert len(crashed) == 1
    resumed = _rounds(split_out)
    assert [r["round"] for r in resumed] == [1, 2]
    # ... and every round of the resumed run is the uninterrupted run's
    for expected, got in zip(whole, resumed, strict=True):
        assert got["train_nodes"] == expected["train_nodes"] == E2E_NODES
        for key in COMPARED:
            assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), (
                got["round"],
                key,
            )
    # in the round after the crash every node got its server logits back
    assert resumed[1]["bytes_down"] == whole[1]["bytes_down"] > 0
    assert resumed[1]["edge_train_kd"] > 0


def test_a_crashed_pipelined_run_resumes_and_an_impostor_gets_neither_key_nor_logits(
    tmp_path,
) -> None:
    # Prepare / Execute: a pipelined run of three honest nodes killed right after
    # round 1's checkpoint (written when round 2's uploads arrive: the nodes are a
    # round or two ahead), then resumed; in the resumed run the last node speaks
    # for node key "0" with a signing key of its own, and its key answer is the only
    # one for "0" (tests/apps/faulty, impostor = true)
    out = tmp_path / "out"
    config = (
        f"{BASE} num-server-rounds=3 pipeline=true impostor=true output-dir='{out}' "
        f"client-state-dir='{tmp_path / 'clients'}' min-available-nodes=3 min-train-nodes=3 "
        "min-evaluate-nodes=3"
    )
    faulty = REPO / "tests" / "apps" / "faulty"
    _run(tmp_path / "c", config, crash_after=1, app=faulty)
    crashed = _rounds(out)
    stdout = _run(tmp_path / "r", f"{config} resume-from='{out}'", app=faulty)
    # Assert: every round once, in order, scored; the run completed
    assert 1 <= len(crashed) < 3
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    rounds = results["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert all(r["accuracy"] is not None for r in rounds)
    # no node failed (a node ahead of the checkpoint rolls back); before the crash
    # all three trained, none rejected
    assert [r["failed_nodes"] for r in rounds] == [[]] * 3
    assert all(r["train_nodes"] == NODES and not r["rejected_replies"] for r in crashed)
    # after it, the impostor's key answer was not taken and each of its replies was
    # rejected, while node "0" trained, distilled and was scored ...
    assert "node key '0' belongs to another node" in stdout
    for record in rounds[len(crashed) :]:
        rejected = record["rejected_replies"]
        assert rejected and {r["node_key"] for r in rejected} == {"0"}, rejected
        assert all("proven by another signing key" in r["reason"] for r in rejected)
        assert record["train_nodes"] == NODES - 1 and "0" in record["node_accuracy"]
        assert record["edge_train_kd"] > 0
    # ... and the server never sent the impostor any server logits
    assert not (out / "impostor-got-logits").exists()
