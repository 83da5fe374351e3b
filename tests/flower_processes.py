"""Start and stop real Flower processes for end-to-end tests.

Every process a test starts is stopped by its process id (and its process group),
including processes started by those processes, which are found through a marker
in their environment.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
MARKER = "FLWR_FEDGKT_TEST_RUN"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _marked_pids(token: str) -> list[int]:
    """Processes whose environment carries this test's marker."""
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


def stop(pids: list[int], grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            for kill in (lambda p, s: os.killpg(p, s), os.kill):
                try:
                    kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)


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


@contextmanager
def flower_environment(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A private FLWR_HOME, free local-SuperLink ports and a process marker.

    On exit every process that carries the marker is stopped, by id.
    """
    token = uuid.uuid4().hex
    env = dict(os.environ)
    env.update(
        {
            MARKER: token,
            "FLWR_HOME": str(tmp_path / "flwr-home"),
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
        stop(_marked_pids(token))


def start_local_superlink(env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """Start the simulation SuperLink that ``flwr run`` would start, so that the test
    owns its process id; wait until it answers."""
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
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + 60
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
    raise RuntimeError(f"flower-superlink did not answer within 60 s; see {log_file}")


def flwr_run(
    env: dict[str, str], app: Path, run_config: str, num_supernodes: int, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``flwr run <app> --stream`` on the local simulation SuperLink."""
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
