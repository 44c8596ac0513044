"""Sites of one security domain, each a real ``ekms server`` process, for end-to-end tests.

Two sites cannot share one process: SoftHSM keeps one library state per process, and a second
token opened beside the first breaks the first one's sessions. So each site here is its own
server (the supervisor and its workers, ``python -m api.cli server -config FILE``) with its own
data directory, database and key backend: a SoftHSM token under ``<data_dir>/softhsm`` (the
default ``softhsm_dir``), or an OpenBao/Vault transit mount. The test process never loads
PKCS#11 for them; it deletes a lost site's token with ``softhsm2-util --delete-token``, as an
operator would.

``SiteProcess`` is also the site's HTTP client: every call goes to ``/v1/...`` with an optional
token, logins and approvals are signed for the site's own audience, and DPoP proofs for its
own URLs. Principals are ``api.principal_keys.KeyHolder`` (the tests' ``Party`` is one).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

import requests

from api.settings import Settings, softhsm_conf_path
from tests.support.ports import LOOPBACK, free_port

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from types import TracebackType

    from api.principal_keys import KeyHolder

ROOT = Path(__file__).parents[2]
_READY_TIMEOUT = 90.0  # a cold interpreter importing the app, on a loaded machine
_STOP_GRACE = 20.0
_HTTP_TIMEOUT = 60.0
_LAUNCH_ATTEMPTS = 3


@dataclass(frozen=True)
class SiteSpec:
    """What makes a site: its name and kind in the domain, where it keeps its state, its backend.

    ``settings`` holds any other ``ekms.toml`` setting (``workers``, ``restore_policy``...).
    """

    name: str
    kind: str  # home | embassy | public-cloud
    data_dir: Path
    backend: str = "pkcs11"  # pkcs11 | transit
    token_label: str = ""  # default: the site's name and a random suffix (pkcs11 only)
    node_name: str = ""  # default: <name>-1
    transit_address: str = ""
    transit_mount: str = "transit"
    transit_key_prefix: str = "ekms-"
    workers: int = 1
    settings: Mapping[str, Any] = field(default_factory=dict)

    def values(self, listen: str) -> dict[str, Any]:
        """The site's settings as ``ekms.toml`` holds them."""
        values: dict[str, Any] = {
            "data_dir": str(self.data_dir),
            "listen": listen,
            "workers": self.workers,
            "node_name": self.node_name or f"{self.name}-1",
            "site_name": self.name,
            "site_kind": self.kind,
            "backend": self.backend,
        }
        if self.backend == "pkcs11":
            values["token_label"] = self.token_label or f"{self.name}-{uuid.uuid4().hex[:8]}"
        else:
            values.update(
                transit_address=self.transit_address,
                transit_mount=self.transit_mount,
                transit_key_prefix=self.transit_key_prefix,
            )
        values.update(self.settings)
        return values


def _toml(values: Mapping[str, Any]) -> str:
    """Flat settings as TOML. JSON strings are valid TOML basic strings; tables are inline."""

    def value(item: object) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float, str)):
            return json.dumps(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(v) for v in item) + "]"
        if isinstance(item, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {value(v)}" for k, v in item.items()) + "}"
        raise TypeError(f"no TOML for {type(item).__name__}")

    return "".join(f"{name} = {value(item)}\n" for name, item in values.items())


class SiteProcess:
    """One site as a running ``ekms server``, and a client for it.

    ``start`` writes the config and launches the server (``launch`` and ``wait_ready`` apart
    let several sites start at once); ``stop`` ends its process group; ``delete_token`` and
    ``destroy`` are the loss of the site. The config is checked here first with ``Settings``,
    so a bad spec fails in the test, not in a server log.
    """

    def __init__(self, spec: SiteSpec, *, log: Path | None = None) -> None:
        self.spec = spec
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.values = spec.values(f"{LOOPBACK}:{self.port}")
        self.settings = Settings.from_mapping(dict(self.values))
        self.log = log or spec.data_dir.parent / f"{spec.name}-{self.values['node_name']}.log"
        self.config = spec.data_dir.parent / f"{spec.name}-{self.values['node_name']}.toml"
        self.process: subprocess.Popen[bytes] | None = None
        self.http = requests.Session()
        self.http.trust_env = False  # loopback only: no proxy, no ~/.netrc

    def __repr__(self) -> str:
        return f"SiteProcess({self.name!r}, {self.url})"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def audience(self) -> str:
        return self.settings.audience

    # --- the process ----------------------------------------------------------------------

    def launch(self) -> Self:
        self.spec.data_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(_toml(self.values))
        env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "server", "-config", str(self.config)],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, timeout: float = _READY_TIMEOUT) -> Self:
        """Until ``sys/health`` answers (sealed or not). The supervisor listens before its
        workers have imported the app, so a connection that waits is not a failure yet."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                break
            try:
                status = self.http.get(f"{self.url}/v1/sys/health", timeout=5).status_code
            except requests.RequestException:
                status = 0
            if status in (200, 429, 501, 503):
                return self
            time.sleep(0.1)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"site {self.name} did not start on {self.url}:\n{tail}")

    def start(self) -> Self:
        """Launch and wait; a port taken meanwhile by someone else is retried on a new one."""
        for attempt in range(1, _LAUNCH_ATTEMPTS + 1):
            offset = self.log.stat().st_size if self.log.exists() else 0
            try:
                return self.launch().wait_ready()
            except RuntimeError:
                if attempt == _LAUNCH_ATTEMPTS or "address already in use" not in self.log_tail(
                    start=offset
                ):
                    raise
                self._move(free_port())
        raise AssertionError("unreachable")

    def _move(self, port: int) -> None:
        self.port = port
        self.url = f"http://{LOOPBACK}:{port}"
        self.values["listen"] = f"{LOOPBACK}:{port}"

    def stop(self) -> None:
        """End the server's process group (it is a session leader), TERM then KILL."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):  # gone already
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=_STOP_GRACE)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):  # gone already
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def delete_token(self) -> None:
        """Delete this site's SoftHSM token, as the HSM's administrator would (the site must be
        stopped: a running server would keep its session)."""
        if self.spec.backend != "pkcs11":
            raise ValueError(f"site {self.name} has no PKCS#11 token")
        util = shutil.which("softhsm2-util")
        if util is None:
            raise RuntimeError("softhsm2-util is not installed")
        env = {**os.environ, "SOFTHSM2_CONF": str(softhsm_conf_path(self.settings))}
        subprocess.run(
            [util, "--delete-token", "--token", self.settings.token_label],
            env=env,
            check=True,
            capture_output=True,
            timeout=30,
        )

    def token_exists(self) -> bool:
        util = shutil.which("softhsm2-util")
        conf = softhsm_conf_path(self.settings)
        if util is None or not conf.exists():
            return False
        shown = subprocess.run(
            [util, "--show-slots"],
            env={**os.environ, "SOFTHSM2_CONF": str(conf)},
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        labels = {
            line.split(":", 1)[1].strip()
            for line in shown.stdout.splitlines()
            if line.strip().startswith("Label:")
        }
        return self.settings.token_label in labels

    def destroy(self) -> None:
        """The site is lost: stopped, its token deleted, its data directory gone."""
        self.stop()
        if self.spec.backend == "pkcs11" and softhsm_conf_path(self.settings).exists():
            self.delete_token()
        shutil.rmtree(self.spec.data_dir)

    def log_tail(self, lines: int = 60, *, start: int = 0) -> str:
        try:
            with self.log.open("rb") as handle:
                handle.seek(start)
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])

    def write_credential(self, credential: Mapping[str, str]) -> Path:
        """A transit site's credential file, read at its first unseal (ADR 0012 §8)."""
        path = Path(self.settings.transit_credential_file)
        path.write_text(json.dumps(dict(credential)))
        path.chmod(0o600)
        return path

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- the client -----------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        **headers: str,
    ) -> requests.Response:
        if token:
            headers["X-Vault-Token"] = token
        return self.http.request(
            method, f"{self.url}/v1/{path}", json=body, headers=headers, timeout=_HTTP_TIMEOUT
        )

    def initialise(self, shares: int = 3, threshold: int = 2) -> tuple[list[str], str]:
        """``sys/init``: the share set's mnemonics and the root token."""
        answer = self.call(
            "PUT", "sys/init", body={"secret_shares": shares, "secret_threshold": threshold}
        )
        _ok(answer)
        return list(answer.json()["keys"]), str(answer.json()["root_token"])

    def unseal(self, shares: Iterable[str]) -> dict[str, Any]:
        """Submit shares until the site opens; the last seal status (raises on any error)."""
        status: dict[str, Any] = {}
        for share in shares:
            answer = self.call("PUT", "sys/unseal", body={"key": share})
            _ok(answer)
            status = answer.json()
            if not status["sealed"]:
                break
        return status

    def login(self, holder: KeyHolder) -> str:
        answer = self.call("POST", "auth/jwt/login", body={"jwt": holder.assertion(self.audience)})
        _ok(answer)
        return str(answer.json()["auth"]["client_token"])

    def propose(
        self, holder: KeyHolder, kind: str, payload: Mapping[str, Any]
    ) -> requests.Response:
        body = {"kind": kind, "payload": dict(payload)}
        return self.call("POST", "ekms/proposals", self.login(holder), body)

    def approve(
        self, official: KeyHolder, proposal: Mapping[str, Any], decision: str = "approve"
    ) -> requests.Response:
        signature = official.approval(dict(proposal), self.audience, decision)
        return self.call(
            "POST",
            f"ekms/proposals/{proposal['id']}/decide",
            self.login(official),
            {"signature": signature},
        )

    def decided(
        self, kind: str, payload: Mapping[str, Any], officials: Sequence[KeyHolder]
    ) -> dict[str, Any]:
        """Filed by the first official, approved by the others until it is decided."""
        proposal = data(self.propose(officials[0], kind, payload))
        for official in officials[1:]:
            proposal = data(self.approve(official, proposal))
            if proposal["state"] != "pending":
                break
        assert proposal["state"] == "approved", proposal
        return proposal

    def dpop_call(
        self, holder: KeyHolder, method: str, path: str, token: str, body: Any = None
    ) -> requests.Response:
        """A request with a DPoP proof for this site's URL: how a restore tool calls."""
        proof = holder.dpop_proof(method, f"{self.url}/v1/{path}", token)
        return self.call(method, path, token, body, DPoP=proof)

    def register_principal(self, token: str, holder: KeyHolder, role: str) -> None:
        body = {"roles": [role], "jwk": holder.jwk}
        data(self.call("POST", f"ekms/principals/{holder.principal}", token, body))

    def register_site(self, token: str, other: SiteProcess) -> dict[str, Any]:
        """Register ``other`` in this site's registry (``standby``), by its kind and backend."""
        body = {"kind": other.spec.kind, "backend": other.spec.backend}
        return data(self.call("POST", f"ekms/sites/{other.name}", token, body))

    def export_backup(self, token: str, target: str) -> dict[str, Any]:
        """``domain/export`` for ``target``: ``backup`` (the document), ``summary``, ``skipped``."""
        return data(self.call("POST", "ekms/domain/export", token, {"target_site": target}))

    def records(self, token: str, operation: str, limit: int = 1000) -> list[dict[str, Any]]:
        """This site's audit records of ``operation`` (``transit.*`` for a prefix), oldest
        first, read over its audit API."""
        query = urllib.parse.urlencode({"operation": operation, "limit": limit, "after": -1})
        answer = self.call("GET", f"ekms/audit/records?{query}", token)
        return [entry["record"] for entry in data(answer)["records"]]


def data(response: requests.Response, status: int = 200) -> dict[str, Any]:
    """The ``data`` of an answer that must have ``status``; the body in the failure message."""
    _ok(response, status)
    return dict(response.json()["data"])


def error(response: requests.Response, status: int) -> str:
    """The error text of an answer that must have failed with ``status``."""
    _ok(response, status)
    return " ".join(response.json()["errors"])


def _ok(response: requests.Response, status: int = 200) -> None:
    assert response.status_code == status, (
        f"{response.request.method} {response.url}: {response.status_code} {response.text[:2000]}"
    )


def bootstrap(
    home: SiteProcess,
    *,
    officials: Sequence[KeyHolder],
    officer: KeyHolder,
    others: Mapping[str, Sequence[KeyHolder]] | None = None,
    shares: int = 3,
    threshold: int = 2,
) -> tuple[list[str], str]:
    """A new domain at ``home``: initialised, unsealed, its officials registered by the root
    token (the bootstrap), its security officer too, and ``others`` (role: holders) by the
    officer. Returns the shares and the root token."""
    mnemonics, root = home.initialise(shares, threshold)
    assert home.unseal(mnemonics[:threshold])["sealed"] is False
    for official in officials:
        home.register_principal(root, official, "official")
    home.register_principal(root, officer, "security-officer")
    token = home.login(officer)
    for role, holders in (others or {}).items():
        for holder in holders:
            home.register_principal(token, holder, role)
    return mnemonics, root


def provision(
    source: SiteProcess, token: str, target: SiteProcess, shares: Iterable[str]
) -> dict[str, Any]:
    """Provision ``target`` from ``source``: export a domain backup for it (``target`` must be
    registered at ``source``), load it on the new node, and unseal it with ``shares``, which
    runs the import. Returns the export's answer."""
    exported = source.export_backup(token, target.name)
    loaded = data(target.call("POST", "ekms/domain/load", body=exported["backup"]))
    assert (loaded["initialized"], loaded["sealed"]) == (True, True)
    assert target.unseal(shares)["sealed"] is False
    return exported


def start_all(sites: Iterable[SiteProcess]) -> list[SiteProcess]:
    """Launch every site, then wait for each: their start-ups overlap. On failure the sites
    already launched keep running: the caller stops them (``stop`` is safe on any site)."""
    launched = [site.launch() for site in sites]
    for site in launched:
        site.wait_ready()
    return launched
