"""Failures a person can read, and a run that cannot make progress says so and
stops: a failed node's reason is one line (the exception's type and message, out
of the text Flower reports), and after ``max-idle-rounds`` rounds in a row in
which every node failed, the run ends with ``"status": "no-progress"``."""

from __future__ import annotations

import json

import pytest
from inprocess import InProcessGrid, node_context, server_context

from flwr_fedgkt import server_app
from flwr_fedgkt.recorder import MAX_REASON_CHARS, failure_line

RAY_REASON = (
    "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'\x1b[36mray::ClientAppActor"
    ".run()\x1b[39m (pid=1824, ip=192.0.2.2, actor_id=91258f06, repr=<flwr.simulation."
    "ray_transport.ray_actor.ClientAppActor object at 0x7f6f4f3b81d0>)\n"
    '  File "/site-packages/flwr/clientapp/client_app.py", line 161, in __call__\n'
    "    return self._registered_funcs[full_name](message, context)\n"
    '  File "/apps/faulty_app/client_app.py", line 23, in train\n'
    '    raise RuntimeError("simulated crash on partition 3")\n'
    "RuntimeError: simulated crash on partition 3\n\n"
    "The above exception was the direct cause of the following exception:\n\n"
    "\x1b[36mray::ClientAppActor.run()\x1b[39m (pid=1824, ip=192.0.2.2)\n"
    '  File "/site-packages/flwr/simulation/ray_transport/ray_actor.py", line 65, in run\n'
    "    raise ClientAppException(str(ex)) from ex\n"
    "flwr.clientapp.client_app.ClientAppException: \n"
    "Exception ClientAppException occurred. Message: simulated crash on partition 3'>"
)


def test_a_wrapped_traceback_becomes_the_exceptions_one_line() -> None:
    assert failure_line(RAY_REASON) == "RuntimeError: simulated crash on partition 3"
    assert failure_line("no reply within the round's timeout") == (
        "no reply within the round's timeout"
    )
    assert failure_line("\x1b[31mKeyError: 'img'\x1b[0m") == "KeyError: 'img'"
    assert failure_line(None) == "unknown error"
    long = failure_line("ValueError: " + "x" * 1000)
    assert len(long) == MAX_REASON_CHARS and long.startswith("ValueError: xxx")
    assert "\x1b" not in failure_line("\x1b[36mstill\x1b[39m no exception here")


def _raise(msg, context):
    raise RuntimeError(f"no data on node {context.node_id}")


def _raise_alike(msg, context):
    raise ValueError("item 0 of the data set is a dict without 'img' (keys: image, label)")


def _run_failing_nodes(tmp_path, handler=_raise, **config) -> dict:
    """The built-in ServerApp's main over two nodes whose training always raises
    (by default each its own error); its results.json."""
    out = tmp_path / "out"
    run_config = {
        "dataset": "synthetic",
        "batch-size": 16,
        "seed": 3,
        "device": "cpu",
        "output-dir": str(out),
        **config,
    }
    contexts = {10 + i: node_context(10 + i, i, 2, run_config) for i in range(2)}
    grid = InProcessGrid(contexts, handlers={(n, "train"): handler for n in contexts})
    context = server_context(run_config)
    server_app.main(grid, context)
    return json.loads((out / "results.json").read_text())


def test_a_run_in_which_every_node_fails_stops_with_status_no_progress(
    task_identity, tmp_path, caplog
) -> None:
    # Prepare / Execute: every node's training raises; two idle rounds allowed
    results = _run_failing_nodes(tmp_path, **{"num-server-rounds": 5, "max-idle-rounds": 2})
    # Assert: two rounds, then the run ended, with the reasons and their counts
    assert results["status"] == "no-progress"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    assert results["no_progress_reasons"] == {
        "RuntimeError: no data on node 10": 1,
        "RuntimeError: no data on node 11": 1,
    }
    assert "2 rounds in a row" in results["error"]
    assert not (tmp_path / "out" / "final_model.pt").exists()
    assert "no node replied usefully" in caplog.text


@pytest.mark.parametrize("max_idle_rounds", [0, 9])
def test_without_a_limit_the_run_goes_on(task_identity, tmp_path, max_idle_rounds) -> None:
    results = _run_failing_nodes(
        tmp_path, **{"num-server-rounds": 3, "max-idle-rounds": max_idle_rounds}
    )
    assert results["status"] == "completed" and len(results["rounds"]) == 3


@pytest.mark.parametrize("max_idle_rounds", [0, 3])
def test_one_error_on_every_node_in_round_1_stops_the_run_after_round_1(
    task_identity, tmp_path, caplog, max_idle_rounds
) -> None:
    # Prepare / Execute: every node's ClientApp raises the same error
    results = _run_failing_nodes(
        tmp_path, _raise_alike, **{"num-server-rounds": 5, "max-idle-rounds": max_idle_rounds}
    )
    # Assert: one round, then one line naming the error and what to do
    assert results["status"] == "no-progress"
    assert [r["round"] for r in results["rounds"]] == [1]
    assert results["error"].count("\n") == 0
    assert "the same error" in results["error"] and "fix it" in results["error"]
    assert "ValueError: item 0 of the data set is a dict without 'img'" in results["error"]


def test_nodes_that_time_out_alike_are_not_a_node_error(task_identity, tmp_path) -> None:
    # Prepare: every node is silent (no reply within the round's timeout)
    run_config = {"dataset": "synthetic", "batch-size": 16, "seed": 3, "device": "cpu"}
    run_config["output-dir"] = str(tmp_path / "out")
    run_config["num-server-rounds"] = 2
    run_config["max-idle-rounds"] = 0
    contexts = {10 + i: node_context(10 + i, i, 2, run_config) for i in range(2)}
    grid = InProcessGrid(contexts, silent=set(contexts))
    context = server_context(run_config)
    # Execute
    server_app.main(grid, context)
    # Assert: a lost or slow node may come back: the run goes on
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"] == "completed" and len(results["rounds"]) == 2
