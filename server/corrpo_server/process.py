"""A ``corrpo-server`` in a child process: for scripts, tests and trainers that want a local
server for the length of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


class ServerProcess:
    """Starts ``corrpo-server serve`` on a free port with ``args``, and waits until it serves.

        with corrpo_server.ServerProcess("--model", "path/to/model") as server:
            client = RewardClient(server.target)

    The server runs as ``sys.executable -m corrpo_server``: the one installed beside the
    caller, whatever ``corrpo-server`` comes first on PATH. It drains and exits when the
    process that started it dies, however it dies (``--parent-pid``), so it never outlives
    its trainer. ``stop()`` (and leaving the ``with`` block) sends SIGTERM, a graceful
    drain, and returns the exit code.

    args: flags of ``corrpo-server serve`` (``--port`` among them picks the port, else a
        free one is taken). host: the address to listen on. env: variables added to this
        process's environment for the server. log: where its output goes (JSON lines),
        else a temporary file. ready_timeout: seconds to wait for it to serve; a server
        that exits or does not serve by then raises RuntimeError or TimeoutError with its
        log, and nothing is left running.

    Attributes: ``target`` (host:port for ``RewardClient``), ``port``, ``metrics_port``
    (None without ``--metrics-port``), ``log_path``, ``process`` (the ``subprocess.Popen``).
    """

    def __init__(
        self,
        *args: str,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        log: Path | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="corrpo-server-")
        port_file = Path(self._dir.name) / "ports.json"
        self.log_path = log or Path(self._dir.name) / "server.log"
        command = [
            sys.executable, "-m", "corrpo_server", "serve", "--host", host, "--port-file", str(port_file),
            "--parent-pid", str(os.getpid()),
        ]  # fmt: skip
        if "--port" not in args:
            command += ["--port", "0"]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*command, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            ports = self._wait_for(port_file, ready_timeout)
        except BaseException:
            self.kill()
            self._log.close()
            self._dir.cleanup()
            raise
        self.host = host
        self.port: int = ports["port"]
        self.metrics_port: int | None = ports["metrics_port"]

    def _wait_for(self, port_file: Path, timeout: float) -> dict:
        """The ports the server wrote once it serves (``--port-file``)."""
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"corrpo-server exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"corrpo-server was not serving after {timeout} s:\n{self.log()}")
            time.sleep(0.02)
        return json.loads(port_file.read_text())

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def log(self) -> str:
        """Everything the server has written (JSON lines)."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict]:
        """The server's log lines that are JSON objects."""
        out = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        return out

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()
