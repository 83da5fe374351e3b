"""Start and stop local Flower processes: a simulation SuperLink and ``flwr run``.

Development tooling for the end-to-end tests (through ``tests/flower_processes.py``),
the benchmarks and the comparison command (``baselines/compare.py``). It lives in
the repository, outside the ``flwr_fedgkt`` package: scripts put this folder on
``sys.path`` before they import it::

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from local_flower import simulate

It imports no Flower code and drives Flower's public command-line tools
(``flower-superlink``, ``flower-superexec``, ``flwr run``).

Every process started here runs in a session and process group of its own (its
process group id is its process id), with a private ``FLWR_HOME`` and free ports.
The SuperLink runs with ``--isolation process`` and its SuperExec is started here
too, so the processes the SuperExec starts (the simulation with the ServerApp,
Ray's processes) stay in the SuperExec's process group. :func:`flower_environment`
records every process started under it and, on exit, stops their process groups
by id: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "REPO",
    "free_port",
    "processes_naming",
    "stop",
    "crash",
    "ray_cluster",
    "flower_environment",
    "start_local_superlink",
    "flwr_run",
    "simulate",
    "simulate_run",
    "SimulatedRun",
]

REPO = Path(__file__).resolve().parents[1]
"""The repository root (a Flower App)."""

ENV_ID = "FLWR_FEDGKT_ENV_ID"
"""Environment variable naming the :func:`flower_environment` a process belongs to."""

_STARTED: dict[str, list[subprocess.Popen]] = {}
"""The processes started under each open environment, by its ``ENV_ID`` value."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _signal(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group ``pid`` and to the process ``pid``."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _running(target: int | subprocess.Popen) -> bool:
    """Whether the process or any process of its group is still there (reaps it
    first when it is a child of this process, so that it does not linger as a zombie)."""
    if isinstance(target, subprocess.Popen):
        target.poll()
        pid = target.pid
    else:
        pid = target
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, 0)
            return True
        except ProcessLookupError:
            continue
        except PermissionError:  # the id now belongs to someone else's process
            return False
    return False


def stop(processes: Iterable[int | subprocess.Popen], grace: float = 5.0) -> None:
    """Stop ``processes`` (ids or :class:`subprocess.Popen`) with their process
    groups: SIGTERM, then SIGKILL to what is left after ``grace`` seconds."""
    targets = list(processes)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for target in targets:
            _signal(target.pid if isinstance(target, subprocess.Popen) else target, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_running(t) for t in targets):
            time.sleep(0.1)
        if not any(_running(t) for t in targets):
            return


def crash(env: dict[str, str]) -> None:
    """SIGKILL every process started under ``env`` (``flwr run``, the SuperLink,
    its SuperExec and what they started), with their process groups, at once and
    without a grace period: a crash of the whole federation."""
    for process in _STARTED.get(env[ENV_ID], []):
        _signal(process.pid, signal.SIGKILL)
    for process in _STARTED.get(env[ENV_ID], []):
        process.poll()


def _start(command: list[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` in a new session, recorded in ``env``'s environment."""
    process = subprocess.Popen(command, env=env, start_new_session=True, **kwargs)
    _STARTED.setdefault(env[ENV_ID], []).append(process)
    return process


@dataclass(frozen=True)
class RayCluster:
    """A running Ray cluster: its address and the temp dir that holds its logs."""

    address: str
    temp_dir: Path


def processes_naming(path: Path) -> list[int]:
    """Ids of the processes whose command line contains ``path``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if str(path).encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@contextmanager
def ray_cluster(log_file: Path, num_cpus: int | None = None) -> Iterator[RayCluster]:
    """A one-node Ray cluster on loopback (``ray start --head``).

    Simulations attach to it when ``RAY_ADDRESS`` holds the address, instead of
    starting a cluster of their own for every run. On exit the cluster's processes
    (found by its private temp dir) are stopped by id, not with ``ray stop``, which
    would stop every Ray user's cluster on the machine.
    """
    # A short temp dir: Ray's socket paths must stay below 108 characters
    temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    port = free_port()
    command = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1"]
    command += [f"--port={port}", f"--ray-client-server-port={free_port()}"]
    command += [f"--num-cpus={num_cpus or os.cpu_count() or 1}", "--include-dashboard=false"]
    command += ["--disable-usage-stats", f"--temp-dir={temp_dir}"]
    with open(log_file, "wb") as handle:
        cluster = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 120
        while "Ray runtime started" not in Path(log_file).read_text(errors="replace"):
            if cluster.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray cluster did not start; see {log_file}")
            time.sleep(0.2)
        yield RayCluster(address=f"127.0.0.1:{port}", temp_dir=temp_dir)
    finally:
        stop([cluster, *processes_naming(temp_dir)])
        left = processes_naming(temp_dir)
        if not left:
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def flower_environment(workdir: Path) -> Iterator[dict[str, str]]:
    """Environment for Flower processes: ``FLWR_HOME`` under ``workdir``, free
    local-SuperLink ports, no telemetry, no runtime dependency installation.

    On exit (also on error) every process started with it through this module is
    stopped, with its process group.
    """
    env_id = uuid.uuid4().hex
    env = dict(os.environ)
    env.update(
        {
            ENV_ID: env_id,
            "FLWR_HOME": str(Path(workdir) / "flwr-home"),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
            "RAY_DISABLE_USAGE_STATS": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    _STARTED[env_id] = []
    try:
        yield env
    finally:
        stop(_STARTED.pop(env_id, []))


def _answers(url: str) -> bool:
    """Whether ``url`` answers with a success status (no proxy in between)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=1) as response:
            return 200 <= response.status < 300
    except OSError:
        return False


def start_logged(command: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """Start ``command`` in a new session with its output appended to ``log_file``;
    stopped with the processes of ``env``'s :func:`flower_environment`."""
    with open(log_file, "ab") as handle:
        return _start(command, env, stdout=handle, stderr=subprocess.STDOUT)


def wait_healthy(
    port: int, process: subprocess.Popen, log_file: Path, timeout: float = 60.0
) -> None:
    """Wait until a SuperLink's HTTP API on 127.0.0.1:``port`` answers ``/health``.
    RuntimeError when ``process`` exits first, TimeoutError after ``timeout``
    seconds (both with the end of ``log_file``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.returncode}:\n{log_file.read_text()[-3000:]}"
            )
        if _answers(f"http://127.0.0.1:{port}/health"):
            return
        time.sleep(0.5)
    raise TimeoutError(
        f"no answer on port {port} within {timeout} s:\n{log_file.read_text()[-3000:]}"
    )


def start_local_superlink(
    env: dict[str, str], log_file: Path, timeout: float = 60.0
) -> subprocess.Popen:
    """Start a simulation SuperLink on 127.0.0.1 and its SuperExec; return the
    SuperLink's process once it answers on its HTTP port.

    ``FLWR_HOME/config.toml`` names this SuperLink as the ``local`` one, so
    ``flwr run`` connects to it and never starts one of its own. Both processes
    write to ``log_file``.
    """
    home = Path(env["FLWR_HOME"])
    address = f"127.0.0.1:{env['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']}"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n'
        f'[superlink.local]\naddress = "{address}"\ninsecure = true\n'
    )
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        superlink = _start(
            [
                "flower-superlink",
                "--insecure",
                "--simulation",
                "--isolation",
                "process",
                "--control-api-address",
                f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
                "--host",
                "127.0.0.1",
                "--port",
                address.rsplit(":", 1)[1],
                "--database",
                str(home / "state.db"),
            ],
            env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + timeout
    while not _answers(f"http://{address}/health"):
        if superlink.poll() is not None:
            raise RuntimeError(
                f"flower-superlink exited with {superlink.returncode}; see {log_file}"
            )
        if time.monotonic() > deadline:
            stop([superlink])
            raise TimeoutError(
                f"flower-superlink did not answer within {timeout:.0f} s; see {log_file}"
            )
        time.sleep(0.5)
    with open(log_file, "ab") as log:
        _start(
            [
                "flower-superexec",
                "--insecure",
                "--runtime-api-address",
                address,
                "--parent-pid",
                str(superlink.pid),
            ],
            env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return superlink


def flwr_run(
    env: dict[str, str],
    app: Path,
    run_config: str,
    num_supernodes: int,
    timeout: float = 600,
    log_file: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess:
    """``flwr run <app> --stream`` on the local simulation SuperLink.

    Parameters
    ----------
    env : dict[str, str]
        From :func:`flower_environment`.
    app : Path
        Directory of the Flower App (holds its ``pyproject.toml``).
    run_config : str
        The ``--run-config`` overrides, e.g. ``"num-server-rounds=2 dataset='digits'"``.
    num_supernodes : int
        Simulated SuperNodes (``--federation-config "num-supernodes=N"``).
    timeout : float (default: 600)
        Seconds before the command is stopped and ``TimeoutError`` raised.
    log_file : Path | None (default: None)
        When given, the command's output is written there as it arrives (and
        ``on_line`` is called with each new line); otherwise it is collected in memory.
    on_line : Callable[[str], None] | None (default: None)
        Called with every output line (only with ``log_file``).

    Returns
    -------
    subprocess.CompletedProcess
        With the return code and the whole output in ``stdout``.
    """
    command = [
        "flwr",
        "run",
        str(app),
        "--stream",
        "--federation-config",
        f"num-supernodes={num_supernodes}",
        "--run-config",
        run_config,
    ]
    if log_file is None:
        process = _start(
            command,
            env,
            cwd=str(app),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop([process])
            out, _ = process.communicate()
            raise TimeoutError(f"flwr run timed out after {timeout} s:\n{out[-4000:]}") from None
        return subprocess.CompletedProcess(command, process.returncode, out, "")

    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as sink, open(log_file) as source:
        process = _start(
            command, env, cwd=str(app), stdout=sink, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + timeout
        pending = ""
        while True:
            finished = process.poll() is not None
            pending += source.read()
            *lines, pending = pending.split("\n")
            if on_line is not None:
                for line in lines:
                    on_line(line)
            if finished:
                break
            if time.monotonic() > deadline:
                stop([process])
                raise TimeoutError(
                    f"flwr run timed out after {timeout} s; see {log_file}:\n"
                    f"{log_file.read_text()[-4000:]}"
                )
            time.sleep(0.5)
        if pending and on_line is not None:
            on_line(pending)
    return subprocess.CompletedProcess(command, process.returncode, log_file.read_text(), "")


@dataclass(frozen=True)
class SimulatedRun:
    """What :func:`simulate_run` measured: the run's ``results.json``, the wall
    time of ``flwr run`` and the bytes its output directory held at the end."""

    results: dict
    wall: float
    output_bytes: int


def simulate_run(
    run_config: str, num_supernodes: int, app: Path = REPO, timeout: float = 3600
) -> SimulatedRun:
    """One ``flwr run`` of ``app`` on its own local simulation SuperLink (private
    ``FLWR_HOME``, free ports, every process stopped by id afterwards).

    ``run_config`` must not set ``output-dir``: the run writes to a temporary one.
    Raises RuntimeError with the end of the log when the run fails, TimeoutError
    when it takes longer than ``timeout`` seconds.
    """
    with tempfile.TemporaryDirectory(prefix="fedgkt-run-") as scratch:
        workdir = Path(scratch)
        out, log_file = workdir / "run", workdir / "flwr-run.log"
        with flower_environment(workdir) as env:
            start_local_superlink(env, workdir / "superlink.log")
            start = time.perf_counter()
            result = flwr_run(
                env,
                app,
                f"{run_config} output-dir='{out}'".strip(),
                num_supernodes,
                timeout=timeout,
                log_file=log_file,
            )
            wall = time.perf_counter() - start
        if result.returncode != 0 or not (out / "results.json").exists():
            raise RuntimeError(f"flwr run failed:\n{log_file.read_text()[-3000:]}")
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        return SimulatedRun(json.loads((out / "results.json").read_text()), wall, size)


def simulate(
    run_config: str, num_supernodes: int, app: Path = REPO, timeout: float = 3600
) -> tuple[list[dict], float]:
    """:func:`simulate_run`'s rounds of ``results.json`` and wall time."""
    run = simulate_run(run_config, num_supernodes, app, timeout)
    return run.results["rounds"], run.wall
