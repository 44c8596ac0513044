"""Shared fixtures: a real SoftHSM token per test, SQLite or PostgreSQL, a real HTTP server.

SoftHSM reads its configuration when the PKCS#11 library is first loaded, so one token store is
configured for the whole session (before any test touches PKCS#11) and each test gets a token of
its own with a unique label.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Self

import pytest

_SOFTHSM_DIR = Path(tempfile.mkdtemp(prefix="ekms-test-softhsm-"))
os.environ["SOFTHSM2_CONF"] = str(_SOFTHSM_DIR / "softhsm2.conf")

from typing import TYPE_CHECKING  # noqa: E402

from api.app import create_app  # noqa: E402
from api.protocol import uvicorn_config  # noqa: E402
from api.runtime import Runtime, create_runtime, local_seal_control, prepare_hsm  # noqa: E402
from api.settings import Settings  # noqa: E402
from hsm.softhsm import write_config  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Iterator

write_config(_SOFTHSM_DIR)


def make_settings(data_dir: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "softhsm_dir": str(_SOFTHSM_DIR),
        "token_label": f"t-{uuid.uuid4().hex[:12]}",
        "workers": 1,
        "node_name": "test-node",
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    if not PostgresServer.available():
        pytest.fail("PostgreSQL is not installed: run `make test`, which installs it")
    with PostgresServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ekms.db'}"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.create_database(f"ekms_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Runtime]:
    module = prepare_hsm(settings)
    rt = create_runtime(settings, module=module)
    yield rt
    rt.close()


class ServerThread:
    """A real uvicorn server in a thread, for clients that need a socket (hvac, the CLI)."""

    def __init__(self, runtime: Runtime) -> None:
        import socket

        import uvicorn

        self.runtime = runtime
        self.custodian = local_seal_control(runtime)
        app = create_app(runtime, self.custodian)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(app))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture
def server(runtime: Runtime) -> Iterator[ServerThread]:
    with ServerThread(runtime) as running:
        yield running
