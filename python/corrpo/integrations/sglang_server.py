"""A local SGLang HTTP server in a child process, for tests, examples and single-machine
runs (RL stacks start their own). Imports nothing of SGLang here: the server runs under
``python`` (default: this interpreter, which must have sglang installed).

    with SGLangServer("path/to/model", env={"CORRPO_SGLANG_STATS": "1"}) as engine:
        response = engine.generate(input_ids=[[1, 2, 3]], sampling_params={"n": 4}, return_logprob=True)

On a machine without a GPU pass ``cpu_stub``: the directory holding a CPU stand-in for
``sgl_kernel`` (tests/sglang_engine/stub_sgl_kernel.py builds it; SGLang imports the
package even on the CPU, and its PyPI wheel only loads with CUDA). The server then runs
SGLang's CPU engine with torch's own attention and sampling.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# SGLang's CPU engine with the backends that need no compiled sgl_kernel op.
CPU_ARGS = (
    "--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
    "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SGLangServer:
    """``python -m sglang.launch_server --model-path MODEL ARGS`` on a free loopback port,
    ready when its ``/health`` answers (minutes: SGLang's imports take most of it).
    ``stop()`` ends the server and every process it started (its own process group)."""

    def __init__(
        self,
        model_path: str | Path,
        *args: str,
        env: dict[str, str] | None = None,
        cpu_stub: str | Path | None = None,
        python: str = sys.executable,
        log: Path | None = None,
        ready_timeout: float = 900.0,
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="sglang-server-")
        self.log_path = log or Path(self._dir.name) / "server.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {**os.environ, **(env or {})}
        command = [python, "-m", "sglang.launch_server", "--model-path", str(model_path),
                   "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        if cpu_stub is not None:
            command += CPU_ARGS
            environ["SGLANG_USE_CPU_ENGINE"] = "1"
            environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(cpu_stub), environ.get("PYTHONPATH")) if p)
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*command, *args], stdout=self._log, stderr=subprocess.STDOUT, env=environ, start_new_session=True
        )
        try:
            self._wait(ready_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"SGLang exited with {self.process.returncode}:\n{self.log()[-6000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"SGLang was not serving after {timeout} s:\n{self.log()[-6000:]}")
            time.sleep(1.0)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def post(self, path: str, body: dict[str, Any], timeout: float = 300.0) -> bytes:
        request = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as err:
            raise RuntimeError(f"SGLang answered {path} with {err.code}: {err.read().decode(errors='replace')}") from None

    def generate(self, **body: Any) -> Any:
        """``/generate`` with ``body`` as its JSON: the parsed response (a dict, or a list of
        them for a batch or ``n`` > 1), or with ``stream=True`` the SSE text."""
        raw = self.post("/generate", body)
        return raw.decode() if body.get("stream") else json.loads(raw)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        # SGLang's scheduler and detokenizer live in the same group and may outlast it.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> SGLangServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self._dir.cleanup()
