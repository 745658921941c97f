"""Running a Flower app as its users run it: ``flwr run``, on a local SuperLink of our own.

``flwr run APP`` submits the app to a SuperLink; for a local simulation it starts one itself
when none answers, detached, on fixed ports, in the environment and working directory of
whoever ran it first, and leaves it running. The demo and the tests start that SuperLink
themselves instead (:class:`LocalSuperLink`), so that they know its process id and stop it when
they are done — also on errors — and so that they choose its environment:

- ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: the app runs in this interpreter's
  environment (FLStore, torch and scikit-learn already installed) instead of one that
  ``uv sync`` would build from the app's dependencies (and fill with a CUDA torch);
- its working directory: the app finds the local stack through ``.flstore/local.json`` there;
- a private ``FLWR_HOME`` (Flower's configuration, installed apps, logs) and a free port, so
  a SuperLink the user runs elsewhere is neither used nor disturbed;
- Flower's and Ray's log levels (``FLWR_LOG_LEVEL``, Ray's ``logging_level``), telemetry off.

Everything here goes through Flower's command line (``flower-superlink``, ``flwr run``,
``flwr ls``): no Flower module is imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["FlowerRun", "FlowerRunError", "LocalSuperLink", "copy_app", "toml_args"]

STARTED = re.compile(r"Successfully started run (\d+)")
COMPLETED = "finished:completed"


class FlowerRunError(RuntimeError):
    """A Flower run did not start or did not complete; the message says where its output is."""


@dataclass
class FlowerRun:
    """What ``flwr run`` did: the run id Flower gave, its final status, its output."""

    run_id: int | None
    status: str
    seconds: float
    log: Path
    superlink_pid: int | None = None
    errors: list[str] = field(default_factory=list)
    """Lines of the run's output that Flower or Ray logged as errors (also on success)."""

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED


def toml_args(values: Mapping[str, Any]) -> str:
    """``k=v`` pairs as ``flwr run --run-config`` / ``--federation-config`` take them (TOML
    values: strings quoted, booleans lower-case)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))

    return " ".join(f"{k}={value(v)}" for k, v in values.items())


def copy_app(app: str | Path, into: str | Path) -> Path:
    """A copy of a Flower app's folder under ``into`` (``flwr run`` moves a legacy
    ``[tool.flwr.federations]`` table of the app's ``pyproject.toml`` into Flower's own
    configuration and comments it out in the file: run a copy, keep the original)."""
    source = Path(app)
    target = Path(into) / source.name
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalSuperLink:
    """``flower-superlink --simulation``, started in ``workdir``, stopped by its pid.

    Parameters
    ----------
    workdir : path
        The SuperLink's (and so the ServerApp's) working directory.
    log_dir : path
        Where ``superlink.log`` and the ``flwr run`` output go.
    log_level : str, default "ERROR"
        Flower's console log level for the SuperLink, the simulation and the command line
        (``FLWR_LOG_LEVEL``); errors are always logged.
    install_dependencies : bool, default False
        Let the SuperLink install the app's dependencies with ``uv sync`` into a fresh
        environment (Flower's default) instead of running it in this environment.
    env : mapping, optional
        More environment variables for every Flower process.
    """

    def __init__(
        self,
        workdir: str | Path,
        log_dir: str | Path,
        *,
        log_level: str = "ERROR",
        install_dependencies: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.log_dir = Path(log_dir).resolve()
        self.flwr_home = self.workdir / ".flwr-home"
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.env = self._environment(log_level, install_dependencies, env or {})

    def _environment(
        self, log_level: str, install_dependencies: bool, extra: Mapping[str, str]
    ) -> dict[str, str]:
        env = dict(os.environ)
        # `flwr` and `flower-superlink` are this interpreter's (the venv's bin/)
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
        env.update(
            {
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(self.port),
                "FLWR_LOG_LEVEL": log_level,
                "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                # Ray's advice for CPU-only runs; also silences its FutureWarning about it
                "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            }
        )
        if install_dependencies:
            env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
        else:
            env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env.update(extra)
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self, timeout: float = 60) -> LocalSuperLink:
        """Start the SuperLink and wait until it answers on its HTTP API."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.log_dir / "superlink.log"
        command = [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-file",
            str(log_file),
        ]
        with (self.log_dir / "superlink.out").open("wb") as out:
            self.process = subprocess.Popen(
                command,
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C of the demo reaches it through stop()
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise FlowerRunError(
                    f"flower-superlink exited with code {self.process.returncode}: "
                    f"{_tail(self.log_dir / 'superlink.out')}"
                )
            if self._healthy():
                return self
            time.sleep(0.2)
        self.stop()
        raise FlowerRunError(f"flower-superlink did not answer within {timeout:.0f} s")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=1) as resp:
                return bool(200 <= resp.status < 300)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout: float = 20) -> None:
        """Stop the SuperLink (SIGTERM to its pid, SIGKILL if it does not exit in time); it
        stops the simulation it runs."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def __enter__(self) -> LocalSuperLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(
        self,
        app: str | Path,
        *,
        run_config: Mapping[str, Any] | None = None,
        federation_config: Mapping[str, Any] | None = None,
        timeout: float = 1200,
        while_running: Callable[[], None] | None = None,
        log_name: str = "flwr-run.log",
    ) -> FlowerRun:
        """``flwr run APP --stream`` against this SuperLink, until the run ends.

        ``while_running()`` is called about twice a second while it runs (a progress bar).
        The run's output (Flower's command line and the streamed log of the run) goes to
        ``log_dir/log_name``; its status is then read with ``flwr ls``.
        """
        if self.process is None:
            raise FlowerRunError("start the SuperLink before running an app on it")
        command = ["flwr", "run", str(Path(app).resolve()), "--stream"]
        if run_config:
            command += ["--run-config", toml_args(run_config)]
        if federation_config:
            command += ["--federation-config", toml_args(federation_config)]
        log_path = self.log_dir / log_name
        t0 = time.perf_counter()
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
            try:
                self._wait(process, timeout, while_running, log_path)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait(10)
        seconds = time.perf_counter() - t0
        text = log_path.read_text(errors="replace")
        started = STARTED.search(text)
        run_id = int(started.group(1)) if started else None
        status = self._status(run_id) if run_id is not None else "not started"
        return FlowerRun(run_id, status, seconds, log_path, self.pid, _error_lines(text))

    def _wait(
        self,
        process: subprocess.Popen[bytes],
        timeout: float,
        while_running: Callable[[], None] | None,
        log_path: Path,
    ) -> None:
        deadline = time.monotonic() + timeout
        while process.poll() is None:
            if time.monotonic() > deadline:
                raise FlowerRunError(
                    f"flwr run did not finish within {timeout:.0f} s; its output: {log_path}"
                )
            if self.process is not None and self.process.poll() is not None:
                raise FlowerRunError(
                    f"the SuperLink exited during the run: {_tail(self.log_dir / 'superlink.out')}"
                )
            if while_running is not None:
                while_running()
            time.sleep(0.5)
        if while_running is not None:
            while_running()

    def _status(self, run_id: int) -> str:
        """The run's status as ``flwr ls`` reports it (``finished:completed``, …)."""
        command = ["flwr", "ls", "--run-id", str(run_id), "--format", "json"]
        for _ in range(20):  # the status turns final a moment after the log stream ends
            done = subprocess.run(
                command, cwd=self.workdir, env=self.env, capture_output=True, check=False
            )
            status = _run_status(done.stdout.decode(errors="replace"), run_id)
            if status.startswith("finished"):
                return status
            time.sleep(0.5)
        return status


def _run_status(output: str, run_id: int) -> str:
    """The status of ``run_id`` in ``flwr ls --format json`` output (``unknown`` if absent)."""
    start = output.find("{")
    try:
        answer = json.loads(output[start:]) if start >= 0 else {}
    except ValueError:
        return "unknown"
    for run in answer.get("runs", []):
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "unknown"))
    return "unknown"


def _error_lines(text: str) -> list[str]:
    """Lines Flower or Ray logged as errors, or that carry a traceback."""
    clean = re.sub(r"\x1b\[[0-9;]*m", "", text)
    keep = re.compile(r"\bERROR\b|Traceback|Error:|Exception:")
    return [line.rstrip() for line in clean.splitlines() if keep.search(line)]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no output in {path})"
