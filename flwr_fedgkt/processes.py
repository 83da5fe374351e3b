"""Start and stop local Flower processes (a simulation SuperLink, ``flwr run``).

Used by the comparison command and by the end-to-end tests. Every process started
here runs with a private ``FLWR_HOME``, free ports and a marker in its environment;
:func:`flower_environment` stops all of them on exit, by process id (and process
group), including the processes they started themselves (ServerApp, simulation
engine, Ray workers), which inherit the marker.

This module imports no Flower code; it drives Flower's command-line tools.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

__all__ = [
    "MARKER",
    "REPO",
    "free_port",
    "marked_pids",
    "stop",
    "flower_environment",
    "start_local_superlink",
    "flwr_run",
    "simulate",
]

REPO = Path(__file__).resolve().parents[1]
"""The repository root (a Flower App) when the package is installed editable."""

MARKER = "FLWR_FEDGKT_TEST_RUN"
"""Environment variable whose value tags every process one environment started."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def marked_pids(token: str) -> list[int]:
    """Processes whose environment carries ``MARKER=token`` (never this process)."""
    pids = []
    needle = f"{MARKER}={token}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return state != "Z"


def stop(pids: list[int], grace: float = 5.0) -> None:
    """Stop ``pids`` and their process groups: SIGTERM, then SIGKILL after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        if not any(_alive(p) for p in pids):
            return


@contextmanager
def flower_environment(workdir: Path) -> Iterator[dict[str, str]]:
    """Environment for Flower processes: ``FLWR_HOME`` under ``workdir``, free
    local-SuperLink ports, no telemetry, no runtime dependency installation, and a
    process marker.

    On exit (also on error) every process that carries the marker is stopped.
    """
    token = uuid.uuid4().hex
    env = dict(os.environ)
    env.update(
        {
            MARKER: token,
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
    try:
        yield env
    finally:
        stop(marked_pids(token))


def start_local_superlink(
    env: dict[str, str], log_file: Path, timeout: float = 60.0
) -> subprocess.Popen:
    """Start the simulation SuperLink that ``flwr run`` would start, so that the
    caller owns its process id; wait until it answers on its HTTP port."""
    http_port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    command = [
        "flower-superlink",
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
        "--host",
        "127.0.0.1",
        "--port",
        http_port,
        "--database",
        str(Path(env["FLWR_HOME"]) / "state.db"),
    ]
    Path(env["FLWR_HOME"]).mkdir(parents=True, exist_ok=True)
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {process.returncode}; see {log_file}")
        try:
            if httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=1).is_success:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop([process.pid])
    raise RuntimeError(f"flower-superlink did not answer within {timeout:.0f} s; see {log_file}")


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
        Seconds before the run is stopped and ``AssertionError`` raised.
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
        process = subprocess.Popen(
            command,
            env=env,
            cwd=str(app),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop([process.pid])
            out, _ = process.communicate()
            raise AssertionError(f"flwr run timed out after {timeout} s:\n{out[-4000:]}") from None
        return subprocess.CompletedProcess(command, process.returncode, out, "")

    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as sink, open(log_file) as source:
        process = subprocess.Popen(
            command,
            env=env,
            cwd=str(app),
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
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
                stop([process.pid])
                raise AssertionError(
                    f"flwr run timed out after {timeout} s; see {log_file}:\n"
                    f"{log_file.read_text()[-4000:]}"
                )
            time.sleep(0.5)
        if pending and on_line is not None:
            on_line(pending)
    return subprocess.CompletedProcess(command, process.returncode, log_file.read_text(), "")


def simulate(
    run_config: str, num_supernodes: int, app: Path = REPO, timeout: float = 3600
) -> tuple[list[dict], float]:
    """One ``flwr run`` of ``app`` on its own local simulation SuperLink (private
    ``FLWR_HOME``, free ports, every process stopped by id afterwards).

    ``run_config`` must not set ``output-dir``: the run writes to a temporary one.
    Returns the rounds of its ``results.json`` and the wall time of ``flwr run``;
    raises RuntimeError with the end of the log when the run fails.
    """
    import json
    import tempfile

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
        if result.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{log_file.read_text()[-3000:]}")
        return json.loads((out / "results.json").read_text())["rounds"], wall
