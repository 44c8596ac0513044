"""A throwaway PostgreSQL cluster for tests that need the real storage backend.

SQLite cannot stand in for PostgreSQL where the storage layer relies on row locks,
``SERIALIZABLE`` retries and PostgreSQL's type system, so integration tests start a real
server. Each ``PostgresServer`` owns a private cluster in a fresh temporary directory,
listens on 127.0.0.1 on a kernel-chosen port, and is destroyed on ``stop()``: tests never
touch a developer's own server on 5432, and two test runs on one machine never share one.

Durability is switched off (``fsync``, ``synchronous_commit``, ``full_page_writes``): the
cluster is deleted after the run, and on a 2-core CI machine those settings dominate the
cost of every commit and of ``CREATE DATABASE``.

Root: the test machines run as root, and ``initdb``/``postgres`` refuse to run as root,
so when the effective uid is 0 every server-side command runs as the ``postgres`` system
user that Debian's ``postgresql`` package creates (through ``runuser``, or ``setpriv``
where ``runuser`` is missing). As any other user they run as that user directly.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, LiteralString, Self

from tests.support.ports import LOOPBACK, free_port

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

SYSTEM_USER = "postgres"
"""The account Debian's ``postgresql`` package creates; used only when we are root."""

SUPERUSER = "postgres"
"""Database superuser name, fixed so URLs do not depend on which OS user ran initdb."""

DEFAULT_DATABASE = "ekms"

_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_DATABASE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_PORT_ATTEMPTS = 3
_LOG_TAIL_LINES = 40
_STOP_TIMEOUT = 30.0
# sun_path is 108 bytes on Linux, including the NUL; PostgreSQL appends "/.s.PGSQL.NNNNN".
_MAX_SOCKET_DIR_LEN = 107 - len("/.s.PGSQL.65535")


class PostgresStartError(RuntimeError):
    """The cluster could not be created or started; the message carries the server log."""


@dataclass(frozen=True)
class _RunAs:
    """How server-side commands are launched: a privilege-dropping prefix, and as whom."""

    prefix: tuple[str, ...]
    uid: int | None
    gid: int | None


def _version_key(path: Path) -> tuple[int, ...] | None:
    try:
        return tuple(int(part) for part in path.name.split("."))
    except ValueError:
        return None


def _has_binaries(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def find_bindir() -> Path | None:
    """Locate the server binaries, preferring Debian's newest versioned directory.

    Debian keeps ``initdb`` and ``pg_ctl`` off ``PATH`` (under
    ``/usr/lib/postgresql/<version>/bin``) so that several versions can coexist;
    ``pg_config --bindir`` covers other layouts, but it can come from ``libpq-dev``
    alone and point at a directory without a server, hence the check for binaries.
    """
    if _DEBIAN_ROOT.is_dir():
        versioned = [
            (key, candidate / "bin")
            for candidate in _DEBIAN_ROOT.iterdir()
            if (key := _version_key(candidate)) is not None
        ]
        for _, bindir in sorted(versioned, reverse=True):
            if _has_binaries(bindir):
                return bindir
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        result = subprocess.run(
            [pg_config, "--bindir"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    bindir = Path(result.stdout.strip())
    return bindir if _has_binaries(bindir) else None


def _run_as() -> _RunAs:
    if os.geteuid() != 0:
        return _RunAs(prefix=(), uid=None, gid=None)
    try:
        user = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresStartError(
            f"running as root, but there is no {SYSTEM_USER!r} system user to run the "
            "server as (initdb refuses root); install Debian's postgresql package"
        ) from None
    runuser = shutil.which("runuser")
    if runuser is not None:
        return _RunAs((runuser, "-u", SYSTEM_USER, "--"), user.pw_uid, user.pw_gid)
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        prefix = (
            setpriv,
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "--",
        )
        return _RunAs(prefix, user.pw_uid, user.pw_gid)
    raise PostgresStartError(
        "running as root, but neither runuser nor setpriv is available to drop to the "
        f"{SYSTEM_USER!r} user (both ship with util-linux)"
    )


def _can_traverse(directory: Path, uid: int, gids: set[int]) -> bool:
    info = directory.stat()
    if info.st_uid == uid:
        return bool(info.st_mode & stat.S_IXUSR)
    if info.st_gid in gids:
        return bool(info.st_mode & stat.S_IXGRP)
    return bool(info.st_mode & stat.S_IXOTH)


def _check_traversable(directory: Path, run_as: _RunAs) -> None:
    """Fail early, and clearly, if the server user could not reach its own data directory.

    Without this, a ``TMPDIR`` under ``/root`` (mode 0700) makes initdb fail with a bare
    "Permission denied" that does not say which directory is at fault.
    """
    if run_as.uid is None or run_as.gid is None:
        return
    gids = {run_as.gid, *os.getgrouplist(SYSTEM_USER, run_as.gid)}
    for parent in directory.resolve().parents:
        if not _can_traverse(parent, run_as.uid, gids):
            raise PostgresStartError(
                f"the {SYSTEM_USER!r} user cannot traverse {parent}, so it cannot reach "
                f"{directory}; pass base_dir= (for example /tmp) or set TMPDIR"
            )


def _tail(path: Path, lines: int = _LOG_TAIL_LINES, *, start: int = 0) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


def _is_alive(pid: int) -> bool:
    """Whether ``pid`` is a live process; a zombie awaiting its reaper counts as dead.

    The killed postmaster is not our child, so its exit is reaped by init, or by nobody in
    a container whose PID 1 does not reap: ``kill(pid, 0)`` alone would wait on a corpse.
    """
    try:
        status = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return False
    return status.rpartition(")")[2].split()[:1] != ["Z"]


def _quote_conf(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class PostgresServer:
    """A private PostgreSQL cluster on 127.0.0.1, created on ``start()``, deleted on ``stop()``.

    Use as a context manager (typically from a session-scoped fixture) and hand each test
    its own database from ``create_database`` rather than a server of its own: creating a
    database takes tens of milliseconds, a cluster about a second.
    """

    def __init__(
        self,
        *,
        bindir: Path | None = None,
        base_dir: Path | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self._bindir = bindir
        self._base_dir = base_dir
        self._startup_timeout = startup_timeout
        self._root: Path | None = None
        self._port: int | None = None
        self._run_as = _RunAs(prefix=(), uid=None, gid=None)
        self._env: dict[str, str] = {}

    @staticmethod
    def available() -> bool:
        """Whether this machine can run the server: binaries present, and a user to run as.

        Lets test set-up skip with a reason instead of erroring where PostgreSQL is absent.
        """
        if find_bindir() is None:
            return False
        try:
            _run_as()
        except PostgresStartError:
            return False
        return True

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> Self:
        """Create the cluster, start the server and create the ``ekms`` database.

        Everything started is torn down again if any step fails, so a failed start leaks
        neither a server process nor a temporary directory.
        """
        if self._root is not None:
            raise RuntimeError("PostgresServer is already started")
        bindir = self._bindir or find_bindir()
        if bindir is None:
            raise PostgresStartError(
                "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin "
                "or via pg_config --bindir; install Debian's postgresql package"
            )
        deadline = time.monotonic() + self._startup_timeout
        self._run_as = _run_as()
        self._env = self._child_env()
        self._root = self._make_root()
        atexit.register(self.stop)
        try:
            self._initdb(bindir, deadline)
            self._start_postmaster(bindir, deadline)
            self.create_database(DEFAULT_DATABASE)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (``-m immediate``: nothing in it is worth a clean shutdown).

        Idempotent, and falls back to killing the postmaster so that a wedged server
        cannot outlive the test run.
        """
        root = self._root
        if root is None:
            return
        atexit.unregister(self.stop)
        try:
            self._stop_postmaster()
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

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("PostgresServer is not running")
        return self._port

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``ekms`` database."""
        return self.url_for(DEFAULT_DATABASE)

    @property
    def dsn(self) -> str:
        """libpq URI of the ``ekms`` database, for ``psycopg.connect``."""
        return self.dsn_for(DEFAULT_DATABASE)

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of ``database`` on this server."""
        return f"postgresql+psycopg://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def dsn_for(self, database: str) -> str:
        """libpq URI of ``database`` on this server."""
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def data_dir(self) -> Path:
        return self._require_root() / "data"

    @property
    def log_path(self) -> Path:
        """The server log, kept beside the data directory so failures can quote it."""
        return self._require_root() / "server.log"

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return _tail(self.log_path, lines)

    # -- databases -------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL.

        Per-test databases keep tests independent without the cost of a cluster each.
        Names are restricted to lower-case identifiers so they need no quoting in SQL
        and no escaping in URLs.
        """
        self._execute_admin("CREATE DATABASE {}", name)
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting any session a test left open on it."""
        self._execute_admin("DROP DATABASE IF EXISTS {} WITH (FORCE)", name)

    def _execute_admin(self, template: LiteralString, name: str) -> None:
        # Imported here so that available() and the module itself work without psycopg.
        import psycopg
        from psycopg import sql

        if not _DATABASE_NAME.fullmatch(name):
            raise ValueError(f"database name must match {_DATABASE_NAME.pattern}: {name!r}")
        statement = sql.SQL(template).format(sql.Identifier(name))
        with psycopg.connect(self.dsn_for("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(statement)

    # -- internals -------------------------------------------------------------------

    def _require_root(self) -> Path:
        if self._root is None:
            raise RuntimeError("PostgresServer is not running")
        return self._root

    @staticmethod
    def _child_env() -> dict[str, str]:
        """The server's environment: the caller's, minus anything that would redirect it.

        ``PGDATA``, ``PGPORT``, ``PGHOST`` and friends from a developer's shell would
        otherwise leak into pg_ctl and libpq; ``LC_ALL=C`` keeps a box without generated
        locales from failing initdb and keeps log messages in English for error reports.
        """
        env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def _make_root(self) -> Path:
        base = self._base_dir or Path(tempfile.gettempdir())
        root = Path(tempfile.mkdtemp(prefix="ekms-pg-", dir=base))
        if len(str(root)) > _MAX_SOCKET_DIR_LEN:
            root.rmdir()
            raise PostgresStartError(
                f"temporary directory {root} is too long for a unix socket path; "
                "pass a shorter base_dir="
            )
        try:
            if self._run_as.uid is not None and self._run_as.gid is not None:
                os.chown(root, self._run_as.uid, self._run_as.gid)
            _check_traversable(root, self._run_as)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return root

    def _run(self, args: Sequence[str], *, deadline: float, what: str) -> str:
        """Run a server-side command as the server user, bounded by ``deadline``.

        A new session lets a timeout kill the whole tree (runuser and its child), and
        ``cwd`` is the cluster's own directory because initdb fails when it cannot read
        the current directory, as the ``postgres`` user cannot read ``/root``.
        """
        timeout = max(deadline - time.monotonic(), 1.0)
        with subprocess.Popen(
            [*self._run_as.prefix, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self._require_root(),
            env=self._env,
            start_new_session=True,
        ) as process:
            try:
                output, _ = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
                raise PostgresStartError(
                    f"{what} did not finish within {timeout:.0f}s\n{output}"
                ) from None
        if process.returncode != 0:
            raise PostgresStartError(f"{what} failed (exit {process.returncode}):\n{output}")
        return output

    def _initdb(self, bindir: Path, deadline: float) -> None:
        self._run(
            [
                str(bindir / "initdb"),
                "--pgdata",
                str(self.data_dir),
                "--username",
                SUPERUSER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                "C",
                "--no-sync",
            ],
            deadline=deadline,
            what="initdb",
        )
        # Trust is safe only because nothing but loopback and a socket in a 0700
        # directory can reach the server; initdb's pg_hba.conf trusts exactly those.
        settings = {
            "listen_addresses": _quote_conf(LOOPBACK),
            "unix_socket_directories": _quote_conf(str(self._require_root())),
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
        }
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# Embassy KMS test cluster\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())

    def _start_postmaster(self, bindir: Path, deadline: float) -> None:
        """Start the server, retrying on a fresh port if another process took ours.

        The port is passed on pg_ctl's command line rather than written to the config
        so that a retry needs no config rewrite.
        """
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = free_port()
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            remaining = max(int(deadline - time.monotonic()), 1)
            try:
                self._run(
                    [
                        str(bindir / "pg_ctl"),
                        "start",
                        "--pgdata",
                        str(self.data_dir),
                        "--log",
                        str(self.log_path),
                        "--wait",
                        "--timeout",
                        str(remaining),
                        "--silent",
                        "-o",
                        f"-p {port}",
                    ],
                    deadline=deadline + 5,
                    what="pg_ctl start",
                )
            except PostgresStartError as exc:
                log = _tail(self.log_path, start=log_offset)
                if "Address already in use" in log and attempt < _PORT_ATTEMPTS:
                    continue
                raise PostgresStartError(f"{exc}\n--- server log (tail) ---\n{log}") from None
            self._port = port
            return

    def _stop_postmaster(self) -> None:
        pid_file = self.data_dir / "postmaster.pid"
        if not pid_file.exists():
            return
        bindir = self._bindir or find_bindir()
        if bindir is not None:
            # A failed pg_ctl stop falls through to killing the postmaster by pid.
            with contextlib.suppress(PostgresStartError):
                self._run(
                    [
                        str(bindir / "pg_ctl"),
                        "stop",
                        "--pgdata",
                        str(self.data_dir),
                        "--mode",
                        "immediate",
                        "--wait",
                        "--timeout",
                        str(int(_STOP_TIMEOUT)),
                        "--silent",
                    ],
                    deadline=time.monotonic() + _STOP_TIMEOUT + 5,
                    what="pg_ctl stop",
                )
        self._kill_postmaster(pid_file)

    def _kill_postmaster(self, pid_file: Path) -> None:
        """SIGKILL the postmaster named in a leftover pid file, if it is really ours.

        The pid file can outlive its process, and the pid can since have been reused, so
        the process must show our data directory on its command line before it is killed.
        """
        try:
            pid = int(pid_file.read_text(encoding="utf-8").splitlines()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return
        if os.fsencode(self.data_dir) not in cmdline:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        # Backends notice the postmaster's death and exit by themselves.
        deadline = time.monotonic() + 10
        while _is_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
