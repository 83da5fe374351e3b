"""Shared test helpers: Flower messages without a running federation."""

from __future__ import annotations

import json
import os
import time

import pytest
from flower_processes import (
    REPO,
    flower_environment,
    flwr_run,
    processes_naming,
    ray_cluster,
    start_local_superlink,
)
from flwr.app import Message, Metadata, RecordDict

from flwr_fedgkt import threads

# Flower's SuperExecs look for new work (a run's ServerApp, a deployed node's
# ClientApp for each message) once a second by default; every tenth of a second
# spares each end-to-end run and each deployed message most of that wait
os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")

# The Message-API app's end-to-end run that several test modules check (with the
# default feature dtype, int8). Its threads are fixed: the runs it is compared with
# (resumed, legacy) must compute alike whatever else the machine runs meanwhile
E2E_RUN_CONFIG = (
    "num-server-rounds=2 dataset='synthetic' synthetic-samples-per-node=300 server-epochs=2 "
    "batch-size=16 client-epochs=1 seed=1 torch-threads=2 output-dir='{out}'"
)
E2E_NODES = 2


class FakeGrid:
    """Node discovery only: the strategy samples nodes through the Grid; its nodes
    do not answer the strategy's key query (as ClientApps without a query handler)."""

    def __init__(self, node_ids) -> None:
        self.node_ids = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, timeout=None) -> list:
        return []


class UntouchedGrid:
    """A Grid the ServerApp must not use: it stops before its first round (data
    missing or too small). With ``node_ids`` it lists those nodes; anything else
    it is asked for fails the test."""

    def __init__(self, node_ids=None) -> None:
        if node_ids is not None:
            node_ids = list(node_ids)
            self.get_node_ids = lambda: list(node_ids)

    def __getattr__(self, name: str):
        raise AssertionError(f"the ServerApp used the grid ({name}) before its data check")


def make_message(
    content: RecordDict, src_node_id: int, dst_node_id: int, message_type: str
) -> Message:
    """A Message with explicit metadata, as the runtime would deliver it."""
    metadata = Metadata(
        run_id=1,
        message_id=f"{src_node_id}-{dst_node_id}-{time.monotonic_ns()}",
        src_node_id=src_node_id,
        dst_node_id=dst_node_id,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


@pytest.fixture
def one_thread():
    """Tiny models: one intra-op thread is fastest and does not oversubscribe a
    busy machine (the previous setting is restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_data_caches():
    """The data module's caches empty before and after the test, so that no test
    sees (or leaves) a data set loaded by another. Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("fresh_data_caches")``."""
    from flwr_fedgkt import data

    data.clear_caches()
    yield
    data.clear_caches()


def set_task_identity(monkeypatch: pytest.MonkeyPatch):
    """Give this process the identity a ServerApp/ClientApp process would have."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    return TaskIdentity


@pytest.fixture
def task_identity(monkeypatch):
    """Give this process the identity a ServerApp/ClientApp process would have."""
    return set_task_identity(monkeypatch)


@pytest.fixture(autouse=True)
def fixed_threads(request, monkeypatch):
    """In-process training keeps the process's thread count whatever else the
    machine runs (``FairThreads`` measures nothing), so that tests comparing two
    trainings exactly do not depend on the load; ``test_threads.py`` checks the
    adaptation itself on a fake machine."""
    if request.module.__name__ != "test_threads":
        monkeypatch.setattr(threads, "machine_busy_seconds", lambda *args, **kwargs: None)
    yield


@pytest.fixture(scope="session", autouse=True)
def shared_ray_cluster(request, tmp_path_factory):
    """One Ray cluster for every simulation of the session, when the session has
    end-to-end tests: each simulation attaches to it through ``RAY_ADDRESS`` (saves
    starting a cluster per ``flwr run``). Stopped by process id at the end."""
    if not any(item.get_closest_marker("e2e") for item in request.session.items):
        yield None
        return
    log = tmp_path_factory.mktemp("ray") / "ray.log"
    with ray_cluster(log) as cluster, pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_ADDRESS", cluster.address)
        yield cluster
    left = processes_naming(cluster.temp_dir)
    assert left == [], f"Ray cluster processes still running: {left}"


@pytest.fixture(scope="session")
def flower_federation(tmp_path_factory):
    """One private FLWR_HOME and local simulation SuperLink for the session's runs;
    every process started under it is stopped by id at the end."""
    home = tmp_path_factory.mktemp("flower")
    with flower_environment(home) as env:
        start_local_superlink(env, home / "superlink.log")
        yield env, home


def run_app(federation, app, name: str) -> tuple[dict, str]:
    """``flwr run <app>`` with :data:`E2E_RUN_CONFIG`; its results.json and log."""
    env, home = federation
    out = home / name
    result = flwr_run(env, app, E2E_RUN_CONFIG.format(out=out), num_supernodes=E2E_NODES)
    assert result.returncode == 0, result.stdout[-4000:]
    assert (out / "results.json").exists(), result.stdout[-4000:]
    return json.loads((out / "results.json").read_text()), result.stdout


@pytest.fixture(scope="session")
def message_api_run(flower_federation) -> tuple[dict, str]:
    """The FedGKT app at the repository root, run once for the whole session."""
    return run_app(flower_federation, REPO, "message-api")
