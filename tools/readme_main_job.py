"""Run the README's main-job command exactly as written and check what it wrote.

    python tools/readme_main_job.py

The command is read from the README (the bash line that starts with
``pip install -e . &&`` and runs ``flwr run``) and run with ``bash -c`` in the
repository root, under a private ``FLWR_HOME``. It passes when the command exits
0, Flower's log shows no failed app ("Exit Code"), and ``outputs/`` holds a
completed ``results.json`` written by this run (one record per round, trained
past chance), ``accuracy.png`` and ``final_model.pt``. Every process the command
left running (the local SuperLink ``flwr run`` starts and what it started) is
found by that ``FLWR_HOME`` in its environment and stopped by id.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "pip install -e . && "


def main_job_command(readme: Path = REPO / "README.md") -> str:
    lines = [
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), re.S)
        for line in block.splitlines()
        if line.startswith(PREFIX) and "flwr run" in line
    ]
    if len(lines) != 1:
        raise SystemExit(f"expected one main-job command in the README, found {len(lines)}")
    return lines[0]


def processes_with(variable: str) -> list[int]:
    """Ids of this user's processes whose environment holds ``variable``."""
    needle = variable.encode() + b"\0"
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes() + b"\0":
                found.append(int(proc.name))
        except OSError:  # another user's, or it has ended
            continue
    return found


def stop_all(variable: str) -> list[int]:
    """Stop every process holding ``variable``; the ids still running after."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in processes_with(variable):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 10
        while processes_with(variable) and time.monotonic() < deadline:
            time.sleep(0.2)
    return processes_with(variable)


def check(outputs: Path, log: str, started: float) -> list[str]:
    """What is wrong with the run's outputs and log (empty: nothing)."""
    problems = []
    if "Exit Code" in log:
        problems.append("Flower reports a failed app (Exit Code) in the log")
    results = outputs / "results.json"
    if not results.exists() or results.stat().st_mtime < started:
        return [*problems, f"the run wrote no {results}"]
    record = json.loads(results.read_text())
    rounds = record.get("rounds", [])
    if record.get("status") != "completed":
        problems.append(f"results.json status is {record.get('status')!r}, not 'completed'")
    if len(rounds) != record.get("config", {}).get("num-server-rounds"):
        problems.append(f"{len(rounds)} round records for {record.get('config')}")
    if not rounds or (rounds[-1].get("accuracy") or 0.0) < 0.5:
        problems.append(f"final accuracy {rounds[-1:]} is not past chance")
    for name in ("accuracy.png", "final_model.pt"):
        if not (outputs / name).exists() or (outputs / name).stat().st_mtime < started:
            problems.append(f"the run wrote no {outputs / name}")
    return problems


def main() -> int:
    command = main_job_command()
    home = Path(tempfile.mkdtemp(prefix="readme-main-job-"))
    variable = f"FLWR_HOME={home}"
    env = {**os.environ, "FLWR_HOME": str(home)}
    print(f"$ {command}", flush=True)
    started = time.time() - 1
    try:
        run = subprocess.run(
            ["bash", "-c", command],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
    finally:
        left = stop_all(variable)
    log = run.stdout + run.stderr
    problems = check(REPO / "outputs", log, started)
    if run.returncode != 0:
        problems.insert(0, f"the command exited with {run.returncode}")
    if left:
        problems.append(f"processes still running after stop: {left}")
    if problems:
        print(log[-6000:], file=sys.stderr)
        print("README main job FAILED:\n- " + "\n- ".join(problems), file=sys.stderr)
        return 1
    rounds = json.loads((REPO / "outputs" / "results.json").read_text())["rounds"]
    print(f"README main job: {len(rounds)} rounds, final accuracy {rounds[-1]['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
