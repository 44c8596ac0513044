"""Speaking to Embassy KMS as a machine: login with an RFC 7523 assertion, DPoP on every call.

Backup writers and restore tools hold key-bound tokens (``cnf.jkt``), so every request carries a
fresh RFC 9449 proof signed by the machine's key. Connections are kept alive, one per thread,
with the standard library only.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

from api.backup.archive import Reason, RefusedError, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable

    from api.principal_keys import KeyHolder

REFRESH_MARGIN_S = 60.0  # a token this close to expiry is renewed before use
_MAX_BODY = 64 << 20
# How an unsealed site that is not active (standby, failed-over, retired) words its 503.
SITE_REFUSAL = "this site is "


class ServiceError(RefusedError):
    """The service answered with an error: its status, messages and request id."""

    def __init__(self, status: int, errors: list[str], request_id: str | None) -> None:
        reason = {401: Reason.UNAUTHENTICATED, 503: Reason.SEALED}.get(status, Reason.DENIED)
        if status not in (401, 403, 503):
            reason = Reason.SERVICE_ERROR
        elif status == 503 and errors and errors[0].startswith(SITE_REFUSAL):
            reason = Reason.WRONG_SITE  # unsealed, but not the active site (ADR 0012 §6)
        super().__init__(
            reason, "; ".join(errors) or "no message", status=status, request_id=request_id
        )
        self.errors = errors


def default_audience(site: str) -> str:
    """The service's default audience, ``embassy-kms/<site_name>``, unless EKMS_AUDIENCE says."""
    return os.environ.get("EKMS_AUDIENCE") or f"embassy-kms/{site}"


class Service:
    """One service address; a keep-alive connection per thread."""

    def __init__(self, address: str, *, timeout: float = 60.0) -> None:
        parts = urllib.parse.urlsplit(address.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"address {address!r} must be http(s)://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.username:
            raise UsageError(f"address {address!r} must not carry a path, query or user")
        default_port = 443 if parts.scheme == "https" else 80
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or default_port
        host = f"[{self._host}]" if ":" in self._host else self._host
        netloc = host if self._port == default_port else f"{host}:{self._port}"
        self.base = f"{parts.scheme}://{netloc}"  # as the Host header names it, for DPoP's htu
        self._timeout = timeout
        self._local = threading.local()
        self._open: list[http.client.HTTPConnection] = []
        self._open_lock = threading.Lock()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every thread's connection."""
        with self._open_lock:
            for conn in self._open:
                conn.close()
            self._open.clear()

    def url(self, path: str) -> str:
        return f"{self.base}/v1/{path}"

    def _connection(self, fresh: bool) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is not None and not fresh:
            return conn
        if conn is not None:
            conn.close()
            with self._open_lock:
                self._open.remove(conn)
        if self._https:
            cafile = os.environ.get("EKMS_CACERT") or os.environ.get("VAULT_CACERT")
            context = ssl.create_default_context(cafile=cafile)
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._timeout, context=context
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self._timeout)
        self._local.conn = conn
        with self._open_lock:
            self._open.append(conn)
        return conn

    def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        token: str | None = None,
        holder: KeyHolder | None = None,
        now: Callable[[], float] = time.time,
    ) -> dict[str, Any]:
        """One call; a stale kept-alive connection is retried once, with a fresh proof."""
        payload = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            headers = {"Content-Type": "application/json"}
            if token is not None:
                if holder is not None:
                    headers["Authorization"] = f"DPoP {token}"
                    headers["DPoP"] = holder.dpop_proof(method, self.url(path), token, now=now())
                else:
                    headers["X-Vault-Token"] = token
            conn = self._connection(fresh=attempt == 1)
            try:
                conn.request(method, f"/v1/{path}", body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read(_MAX_BODY + 1)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if attempt == 0:
                    continue
                raise RefusedError(
                    Reason.SERVICE_ERROR, f"{self.base} closed the connection"
                ) from None
            except OSError as exc:
                raise RefusedError(
                    Reason.SERVICE_ERROR, f"cannot reach {self.base}: {exc.strerror or exc}"
                ) from None
            return _answer(response.status, raw, response.getheader("X-Request-Id"))
        raise AssertionError  # pragma: no cover - the loop returns or raises


def _answer(status: int, raw: bytes, request_id: str | None) -> dict[str, Any]:
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {}
    if not isinstance(data, dict):
        data = {}
    if status >= 400 and not ("batch_results" in (data.get("data") or {}) and status == 400):
        errors = data.get("errors")
        messages = [str(e) for e in errors] if isinstance(errors, list) else []
        raise ServiceError(status, messages, data.get("request_id") or request_id)
    data["_status"] = status
    return data


@dataclass
class _Token:
    value: str
    expires_at: float


class MachineSession:
    """A backup writer or restore tool logged in with its own key (a DPoP-bound token)."""

    def __init__(
        self,
        service: Service,
        holder: KeyHolder,
        audience: str,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.holder = holder
        self.audience = audience
        self.clock = clock  # dates assertions and proofs, and judges expiry
        self._token: _Token | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MachineSession({self.holder.principal!r} at {self.service.base})"

    def token(self) -> str:
        with self._lock:
            if self._token is None or self._token.expires_at - self.clock() < REFRESH_MARGIN_S:
                self._token = self._login()
            return self._token.value

    def _login(self) -> _Token:
        try:
            answer = self.service.request(
                "POST",
                "auth/jwt/login",
                body={"jwt": self.holder.assertion(self.audience, now=self.clock())},
            )
        except ServiceError as exc:
            if exc.status == 401:
                raise RefusedError(
                    Reason.UNAUTHENTICATED,
                    f"login as {self.holder.principal!r} refused: check the principal, that the "
                    f"key file holds its registered key, and the audience ({self.audience}; "
                    "set --audience or EKMS_AUDIENCE)",
                    status=401,
                    request_id=exc.request_id,
                ) from None
            raise
        auth = answer.get("auth") or {}
        return _Token(str(auth["client_token"]), self.clock() + float(auth["lease_duration"]))

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A call with this machine's own token."""
        return self.service.request(
            method, path, body=body, token=self.token(), holder=self.holder, now=self.clock
        )

    def call_with(
        self, token: str, method: str, path: str, body: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """A call with another token bound to this machine's key (a restore credential)."""
        return self.service.request(
            method, path, body=body, token=token, holder=self.holder, now=self.clock
        )

    def site(self) -> str:
        return str(self.call("GET", "ekms/status")["data"]["site"])

    def manifest_key(self, name: str) -> dict[str, Any]:
        """The manifest key's description (type, versions, PEM public keys)."""
        return dict(self.call("GET", f"transit/keys/{name}")["data"])


def token_claims(token: str) -> dict[str, Any]:
    """The claims of a token the service just handed us, read without verifying.

    Only for diagnosis and early checks; the service checks every use itself.
    """
    try:
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}
