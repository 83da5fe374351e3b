"""torch's CPU threads: from the process's resources (affinity, cgroup quota,
OMP_NUM_THREADS), fixed by ``torch-threads``, or adapted to the CPU the other
processes leave free (:class:`~flwr_fedgkt.threads.FairThreads`)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

from flwr_fedgkt import threads
from flwr_fedgkt.codec import encode_features
from flwr_fedgkt.server import ServerTrainer
from flwr_fedgkt.settings import ConfigError, RunConfig
from flwr_fedgkt.store import FeatureStore
from flwr_fedgkt.threads import FairThreads, available_cpus, machine_busy_seconds, resolve_threads
from flwr_fedgkt.validation import validate_payload

AFFINITY = len(os.sched_getaffinity(0))


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Every test leaves torch's intra-op thread count as it found it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _cpu_max(tmp_path, text: str):
    path = tmp_path / "cpu.max"
    path.write_text(text)
    return path


# -- available_cpus -------------------------------------------------------------------------
def test_a_fractional_quota_rounds_up_and_caps_the_affinity(tmp_path) -> None:
    # Prepare: 1.5 CPUs of quota
    cpu_max = _cpu_max(tmp_path, "150000 100000\n")
    # Execute
    cpus = available_cpus(environ={}, cpu_max=cpu_max)
    # Assert: ceil(1.5) = 2, never more than the affinity
    assert cpus == min(AFFINITY, 2)


def test_the_quota_caps_a_larger_affinity(tmp_path, monkeypatch) -> None:
    # Prepare: 4 CPUs of affinity, quotas of 1.5 and 0.5 CPUs
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    one_and_a_half = _cpu_max(tmp_path, "150000 100000")
    half = tmp_path / "half"
    half.write_text("50000 100000")
    # Execute / Assert: ceil(1.5) = 2 of the 4; ceil(0.5) = 1
    assert available_cpus(environ={}, cpu_max=one_and_a_half) == 2
    assert available_cpus(environ={}, cpu_max=half) == 1
    # no quota file: the 4 of the affinity
    assert available_cpus(environ={}, cpu_max=tmp_path / "missing") == 4


def test_no_quota_gives_the_affinity(tmp_path) -> None:
    # Prepare
    cpu_max = _cpu_max(tmp_path, "max 100000\n")
    # Execute / Assert
    assert available_cpus(environ={}, cpu_max=cpu_max) == AFFINITY


def test_a_missing_cpu_max_gives_the_affinity(tmp_path) -> None:
    assert available_cpus(environ={}, cpu_max=tmp_path / "no-such-file") == AFFINITY


def test_omp_num_threads_caps_the_cpus(tmp_path) -> None:
    # Prepare
    missing = tmp_path / "no-such-file"
    # Execute / Assert
    assert available_cpus(environ={"OMP_NUM_THREADS": "1"}, cpu_max=missing) == 1
    assert available_cpus(environ={"OMP_NUM_THREADS": " 1 "}, cpu_max=missing) == 1
    # more than the affinity: the affinity
    assert available_cpus(environ={"OMP_NUM_THREADS": "64"}, cpu_max=missing) == AFFINITY


@pytest.mark.parametrize("omp", ["abc", "0", "-1", "1.5", ""])
def test_an_omp_num_threads_that_is_no_positive_integer_is_ignored(tmp_path, omp) -> None:
    cpus = available_cpus(environ={"OMP_NUM_THREADS": omp}, cpu_max=tmp_path / "no-such-file")
    assert cpus == AFFINITY


# -- resolve_threads --------------------------------------------------------------------------
def test_resolve_threads_takes_a_positive_setting_as_it_is() -> None:
    assert resolve_threads(3) == 3
    assert resolve_threads(1, environ={"OMP_NUM_THREADS": "2"}) == 1


def test_resolve_threads_zero_takes_the_processs_cpus() -> None:
    assert resolve_threads(0, environ={"OMP_NUM_THREADS": "1"}) == 1


def test_resolve_threads_rejects_a_negative_setting() -> None:
    with pytest.raises(ValueError, match="torch-threads"):
        resolve_threads(-1)


# -- machine_busy_seconds ---------------------------------------------------------------------
def test_busy_seconds_leave_out_idle_iowait_and_guest_time(tmp_path) -> None:
    # Prepare: user nice system idle iowait irq softirq steal guest guest_nice
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 20 30 400 50 6 7 8 9 10\ncpu0 50 10 15 200 25 3 3 4 4 5\n")
    # Execute
    busy = machine_busy_seconds(stat)
    # Assert: user + nice + system + irq + softirq + steal = 171 ticks (idle 400 and
    # iowait 50 are not busy; guest 9 and guest_nice 10 are inside user and nice already)
    assert busy == pytest.approx(171 / os.sysconf("SC_CLK_TCK"))


@pytest.mark.parametrize(
    "text",
    ["cpu  100 twenty 30 400 50\n", "intr 100 20 30 400 50\n", "cpu 1 2 3\n", "", "\n"],
)
def test_a_malformed_proc_stat_gives_none(tmp_path, text) -> None:
    stat = tmp_path / "stat"
    stat.write_text(text)
    assert machine_busy_seconds(stat) is None


def test_a_missing_proc_stat_gives_none(tmp_path) -> None:
    assert machine_busy_seconds(tmp_path / "no-such-file") is None


# -- FairThreads ------------------------------------------------------------------------------
class FakeMachine:
    """The clock, the machine's busy CPU seconds and this process's, stepped by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.busy: float | None = 5000.0
        self.own = 40.0

    def step(self, seconds: float, busy: float, own: float) -> None:
        self.now += seconds
        if self.busy is not None:
            self.busy += busy
        self.own += own

    def fair(self, setting: int = 0) -> FairThreads:
        return FairThreads(
            setting,
            interval=0.5,
            busy_seconds=lambda: self.busy,
            process_seconds=lambda: self.own,
            clock=lambda: self.now,
        )


@pytest.fixture
def two_cpus(monkeypatch):
    """The process has 2 CPUs, whatever this machine has."""
    monkeypatch.setattr(threads, "available_cpus", lambda environ=None, **kwargs: 2)


def test_fair_threads_leave_the_cpu_other_processes_take(two_cpus) -> None:
    # Prepare
    machine = FakeMachine()
    fair = machine.fair()
    torch.set_num_threads(1)
    # Execute / Assert: at the start, the process's 2 CPUs
    assert fair.start() == 2
    assert fair.threads == 2 and torch.get_num_threads() == 2
    # 1 s: the machine busy 2.0 s, this process 1.0 s -> the others took 1.0 CPU
    machine.step(1.0, busy=2.0, own=1.0)
    assert fair.update() == 1
    assert fair.others == pytest.approx(1.0)
    assert torch.get_num_threads() == 1
    # 1 s more: busy 2.0 s, all of it this process's -> the others took none
    machine.step(1.0, busy=2.0, own=2.0)
    assert fair.update() == 2
    assert fair.others == pytest.approx(0.0)
    assert torch.get_num_threads() == 2
    # the counts it set since start(); a new start() forgets them
    assert fair.used == {1, 2}
    fair.start()
    assert fair.used == {2}


def test_fair_threads_round_the_free_cpus_to_the_nearest(two_cpus) -> None:
    # Prepare
    machine = FakeMachine()
    fair = machine.fair()
    fair.start()
    # Execute / Assert: others 0.4 CPU -> 1.6 free -> 2 threads
    machine.step(1.0, busy=1.4, own=1.0)
    assert fair.update() == 2
    # others 0.6 CPU -> 1.4 free -> 1 thread
    machine.step(1.0, busy=1.6, own=1.0)
    assert fair.update() == 1
    # others 3 CPUs (more than the process has) -> still 1 thread
    machine.step(1.0, busy=3.0, own=0.0)
    assert fair.update() == 1
    assert fair.others == pytest.approx(3.0)


def test_an_update_before_the_interval_changes_nothing(two_cpus) -> None:
    # Prepare
    machine = FakeMachine()
    fair = machine.fair()
    fair.start()
    # Execute: 0.05 s (before the first measurement, due 0.1 s after start) in
    # which the others took both CPUs (0.1 busy s, none this process's)
    machine.step(0.05, busy=0.1, own=0.0)
    threads_early = fair.update()
    # Assert: not measured yet
    assert threads_early == 2 and fair.others == 0.0
    assert torch.get_num_threads() == 2
    # Execute: 0.07 s more in which only this process ran (0.07 busy s, all its own)
    machine.step(0.07, busy=0.07, own=0.07)
    # Assert: measured over the whole 0.12 s since start: others took
    # (0.17 - 0.07) / 0.12 = 0.83 CPU -> 2 - 0.83 = 1.17 -> 1 thread
    assert fair.update() == 1
    assert fair.others == pytest.approx(0.1 / 0.12)
    # Execute / Assert: from then on every 0.5 s: 0.25 s later, with the others
    # gone, nothing is measured yet; at 0.5 s it is
    machine.step(0.25, busy=0.5, own=0.5)
    assert fair.update() == 1 and fair.others == pytest.approx(0.1 / 0.12)
    machine.step(0.26, busy=0.52, own=0.52)
    assert fair.update() == 2 and fair.others == pytest.approx(0.0, abs=1e-9)


def test_work_starts_with_the_count_the_last_work_ended_with(two_cpus) -> None:
    # Prepare: a busy neighbour took a CPU during the last training: 1 thread
    machine = FakeMachine()
    fair = machine.fair()
    fair.start()
    machine.step(0.2, busy=0.4, own=0.2)
    assert fair.update() == 1
    machine.step(30.0, busy=30.0, own=0.0)  # idle here; the neighbour ran on
    # Execute: the next training starts
    started = fair.start()
    # Assert: still 1 thread (no step at the contended count of 2 first), and a
    # neighbour gone shows at the first measurement
    assert started == 1 and torch.get_num_threads() == 1
    machine.step(0.11, busy=0.11, own=0.11)
    assert fair.update() == 2


def test_start_measures_from_now_not_from_the_idle_time_before(two_cpus) -> None:
    # Prepare: while the process was idle, the others took both CPUs for 10 s
    machine = FakeMachine()
    fair = machine.fair()
    machine.step(10.0, busy=20.0, own=0.0)
    # Execute
    started = fair.start()
    machine.step(1.0, busy=2.0, own=2.0)  # then only this process ran
    # Assert
    assert started == 2
    assert fair.update() == 2 and fair.others == pytest.approx(0.0)


def test_a_positive_setting_never_adapts(two_cpus) -> None:
    # Prepare
    machine = FakeMachine()
    fair = machine.fair(3)
    # Execute: the others take both CPUs for a second
    assert fair.start() == 3
    machine.step(1.0, busy=2.0, own=0.0)
    # Assert
    assert fair.update() == 3
    assert fair.cpus == 3 and fair.adaptive is False
    assert torch.get_num_threads() == 3


def test_without_the_machines_cpu_time_the_threads_stay_at_the_cpus(two_cpus) -> None:
    # Prepare: no /proc/stat (busy_seconds gives None)
    machine = FakeMachine()
    machine.busy = None
    fair = machine.fair()
    # Execute
    fair.start()
    machine.step(1.0, busy=0.0, own=0.0)
    threads_after = fair.update()
    # Assert
    assert threads_after == 2 and fair.others == 0.0
    assert torch.get_num_threads() == 2


# -- the server's threads ---------------------------------------------------------------------
def _store(samples: int = 12) -> FeatureStore:
    gen = torch.Generator().manual_seed(0)
    arrays = encode_features(torch.randn(samples, 4, generator=gen), "float32").arrays()
    arrays.update(
        logits=torch.randn(samples, 3, generator=gen).numpy(),
        labels=(np.arange(samples) % 3).astype(np.int64),
        ids=np.arange(samples, dtype=np.int64),
    )
    store = FeatureStore()
    store.put("a", validate_payload(arrays, "float32", (4,), 3), 1)
    return store


def _one_thread_trainer(model: nn.Module) -> ServerTrainer:
    """A trainer of ``model`` on 4 features, batches of 4, ``torch_threads=1``."""
    return ServerTrainer(
        model=model,
        feature_shape=(4,),
        device="cpu",
        precision="float32",
        batch_size=4,
        torch_threads=1,
    )


def test_the_server_trains_with_torch_threads() -> None:
    # Prepare: torch at 2 threads before; record the threads at every forward
    torch.set_num_threads(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    trainer = _one_thread_trainer(model)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    # Execute
    result = trainer.train(_store(), epochs=1)
    # Assert: 12 samples in batches of 4 -> 3 steps, each with 1 thread
    assert result.samples == 12
    assert seen == [1, 1, 1]
    assert result.threads == [1]
    assert trainer.threads is not None and trainer.threads.cpus == 1


def test_each_server_step_sets_the_threads_again() -> None:
    # Prepare: after each forward something else in the process (an edge trainer's
    # FairThreads, say) sets torch to 2 threads
    torch.set_num_threads(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    trainer = _one_thread_trainer(model)
    seen: list[int] = []

    def record_then_change(module, args, output):
        seen.append(torch.get_num_threads())
        torch.set_num_threads(2)

    model.register_forward_hook(record_then_change)
    # Execute
    trainer.train(_store(), epochs=1)
    # Assert: every one of the 3 steps ran with the trainer's 1 thread
    assert seen == [1, 1, 1]


def test_a_negative_torch_threads_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="torch-threads"):
        RunConfig.from_mapping({"torch-threads": -1})


def test_the_run_configs_torch_threads_reach_the_server_trainer() -> None:
    # Execute
    trainer = ServerTrainer.from_run_config(
        RunConfig.from_mapping({"torch-threads": 1, "device": "cpu"}), 10
    )
    # Assert
    assert trainer.threads is not None
    assert trainer.threads.cpus == 1 and trainer.threads.adaptive is False
