"""A local ``mlflow server`` process (``run.tracking_server``, and the head of a test cluster)."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

#: ``python -c`` prefix of the server's command: PR_SET_PDEATHSIG (Linux), so the server also stops
#: when the invocation that started it is killed outright (SIGKILL: no ``finally`` runs), then the
#: real ``mlflow server`` replaces this interpreter (the signal setting survives ``execv``).
_PDEATHSIG = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\nexcept (OSError, AttributeError):\n    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n    sys.exit(0)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'mlflow', 'server', *sys.argv[2:]])\n"
)


class TrackingServer:
    """A real ``mlflow server`` process on this machine, started and stopped by this process.

    ``run.tracking_server: true`` runs one for an invocation (:func:`local_server`); the
    two-node test runs one as a cluster's head would. Its output goes to ``log``, never to the
    terminal; it runs in its own session, so a Ctrl-C in the terminal reaches the invocation,
    which logs the runs' end and then stops the server (:meth:`stop`); killed outright, the
    invocation takes the server with it (``PR_SET_PDEATHSIG``: start it from the main thread).

    Args:
        backend_uri: the server's backend store (``sqlite:///<abs path>``).
        artifacts: artifact location URI (``file:///...``, ``s3://...``).
        log: the server's stdout and stderr (appended).
        serve_artifacts: True: clients send artifacts through the server, which writes them to
            ``artifacts`` (``--artifacts-destination``; new experiments get ``mlflow-artifacts:/``
            locations, which only a tracking server resolves); False: new experiments' artifacts
            go to ``artifacts/<experiment id>``, written by the clients themselves
            (``--default-artifact-root``), so a direct sqlite client of the same store reads
            and writes them too.
        host: interface to bind (default: loopback only).
        port: None: a free port (a new one if it is taken before the server binds it).
    """

    #: seconds to wait for ``/health`` (the server imports MLflow twice: ~5-15 s on 2 busy cores)
    START_TIMEOUT = 180.0

    def __init__(
        self,
        backend_uri: str,
        artifacts: str,
        log: Path,
        *,
        serve_artifacts: bool = False,
        host: str = "127.0.0.1",
        port: int | None = None,
    ):
        self.backend_uri, self.artifacts, self.log = backend_uri, artifacts, Path(log)
        self.serve_artifacts, self.host, self._fixed_port = serve_artifacts, host, port
        self.port: int | None = None
        self._proc: Any = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def args(self) -> list[str]:
        """``mlflow server`` arguments (without the command)."""
        art = (
            ["--artifacts-destination", self.artifacts]
            if self.serve_artifacts
            else ["--default-artifact-root", self.artifacts, "--no-serve-artifacts"]
        )
        return [
            "--backend-store-uri",
            self.backend_uri,
            *art,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def command(self) -> str:
        """The server's command line, for people (errors, docs)."""
        return " ".join([sys.executable, "-m", "mlflow", "server", *self.args()])

    def launch(self) -> TrackingServer:
        """Start the process (returns at once; :meth:`wait_ready` waits for it)."""
        import subprocess

        self.port = self._fixed_port or _free_port(self.host)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runner processes
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "a") as out:
            out.write(f"$ {self.command()}\n")
            out.flush()
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _PDEATHSIG, str(os.getpid()), *self.args()],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, not it: we stop it after logging
            )
        return self

    def wait_ready(self, timeout: float | None = None) -> str:
        """Wait until the server answers ``GET /health``; returns its URL.

        A port taken between choosing it and the server's bind (by anything else on the machine)
        is retried on another free port (three times).

        Raises:
            PipelineError: the server exited or did not answer within ``timeout`` (default
                :data:`START_TIMEOUT`); names the command and its log, with the log's tail.
        """
        import urllib.request

        from pipeline.errors import PipelineError

        deadline = time.monotonic() + (timeout or self.START_TIMEOUT)
        retries = 0 if self._fixed_port else 3
        while True:
            rc = self._proc.poll()
            if rc is not None:
                tail = _tail(self.log)
                if retries and "address already in use" in tail.lower():
                    retries -= 1
                    self.launch()
                    continue
                self._proc = None
                raise PipelineError(
                    f"the MLflow tracking server did not start: `{self.command()}` exited with status {rc}; "
                    f"its log: {self.log}\n{tail}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200 and r.read().strip() == b"OK":
                        return self.url
            except Exception:  # noqa: BLE001 - not up yet (refused, reset, another protocol on the port)
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PipelineError(
                    f"the MLflow tracking server did not answer {self.url}/health within "
                    f"{timeout or self.START_TIMEOUT:.0f} s; command: `{self.command()}`; its log: {self.log}\n"
                    f"{_tail(self.log)}"
                )
            time.sleep(0.3)

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server and its workers (SIGTERM to its process group, SIGKILL after
        ``timeout`` seconds); idempotent."""
        import signal
        import subprocess

        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the group is the server's processes
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)

    def __enter__(self) -> str:
        self.launch()
        try:
            return self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def local_server(store_uri: str, log: Path) -> TrackingServer:
    """The invocation's server of ``run.tracking_server``: ``mlflow server`` on 127.0.0.1 (a free
    port) over the invocation's own sqlite store (``store_uri``: ``sqlite:///<work_dir>/mlflow.db``),
    new experiments' artifacts in ``<work_dir>/mlartifacts/<experiment id>`` (written by the
    clients: every process of a one-machine invocation reaches that folder). Runs logged through
    it are runs of that sqlite store: ``mlflow ui``, ``zeroseg compare`` and ``zeroseg gc`` read
    them without a server afterwards, and a fully cached invocation (which starts no server)
    journals into the same store.

    Raises:
        ValueError: ``store_uri`` is not ``sqlite:///``.
    """
    if not store_uri.startswith("sqlite:///"):
        raise ValueError(f"a local tracking server serves a sqlite store, got {store_uri!r}")
    root = Path(store_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts"
    return TrackingServer(store_uri, root.as_uri(), log, serve_artifacts=False)


__all__ = ["TrackingServer", "local_server"]
