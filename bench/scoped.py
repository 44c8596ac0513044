"""The restore path for the benchmark: principals, an approved request, a scoped credential.

The scoped target measures what a restore tool really does: each request carries an access
token bound to the tool's key (``cnf.jkt``) and a fresh RFC 9449 DPoP proof, which the server
verifies and spends (one-time ``jti``) in the same transaction as the audit record. wrk cannot
sign, so the proofs (and, for the login scenario, the client assertions) are signed before each
run and handed to wrk one per request (see ``bench/wrk/vault.lua``, ``BENCH_LINES``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from api.principal_keys import KeyHolder

if TYPE_CHECKING:
    from pathlib import Path

Call = Callable[..., tuple[int, dict[str, Any]]]
CREDENTIAL_REFRESH_S = 300.0  # tool credentials live 15 minutes; take a new one well before
LOGIN_ROLE = "embassy-bench"  # OpenBao's jwt role; Embassy KMS accepts and ignores the field


class SetupError(RuntimeError):
    pass


@dataclass
class RestorePath:
    """An approved restore of ``dataset`` and the tool that holds its credential."""

    base_url: str
    audience: str
    dataset: str
    request_id: str
    tool: KeyHolder
    login_party: KeyHolder
    call: Call
    _credential: str = ""
    _taken_at: float = 0.0

    def credential(self) -> str:
        """The scoped, DPoP-bound token; re-issued before it could expire mid-run."""
        if not self._credential or time.monotonic() - self._taken_at > CREDENTIAL_REFRESH_S:
            tool_token = _login(self.call, self.base_url, self.tool, self.audience)
            url = f"{self.base_url}/v1/ekms/proposals/{self.request_id}/credential"
            proof = self.tool.dpop_proof("POST", url, tool_token)
            payload = _ok(self.call(url, tool_token, "POST", {}, {"DPoP": proof}), url)
            self._credential = str(payload["auth"]["client_token"])
            self._taken_at = time.monotonic()
        return self._credential

    def write_proofs(self, path: Path, url: str, count: int) -> str:
        """Sign ``count`` one-time proofs for POSTs to ``url``; returns the token they bind."""
        token = self.credential()
        now = time.time()
        with path.open("w") as out:
            for _ in range(count):
                out.write(self.tool.dpop_proof("POST", url, token, now=now) + "\n")
        return token

    def write_logins(self, path: Path, count: int) -> None:
        """Login bodies, each with an assertion of its own (a ``jti`` is accepted once)."""
        now = time.time()
        with path.open("w") as out:
            for _ in range(count):
                body = {
                    "jwt": self.login_party.assertion(self.audience, now=now),
                    "role": LOGIN_ROLE,
                }
                out.write(json.dumps(body, separators=(",", ":")) + "\n")

    def check(self, url: str, body: dict[str, Any], expect_plaintext: str) -> None:
        """The scoped path must really decrypt, and refuse a replayed proof."""
        token = self.credential()
        proof = self.tool.dpop_proof("POST", url, token)
        status, payload = self.call(url, None, "POST", body, _dpop_headers(token, proof))
        if status != 200 or payload.get("data", {}).get("plaintext") != expect_plaintext:
            raise SetupError(f"scoped decrypt failed: {status} {json.dumps(payload)[:300]}")
        status, _ = self.call(url, None, "POST", body, _dpop_headers(token, proof))
        if status != 401:
            raise SetupError(f"a replayed DPoP proof was not refused (status {status})")


def configure_peer_login(call: Call, peer_url: str, token: str, path: RestorePath) -> None:
    """OpenBao's jwt auth method, trusting the same principal key and audience.

    The peer then does the same work per login as Embassy KMS: verify an ES256 assertion
    against a configured public key, check ``aud`` and ``exp``, mint and store a token, audit.
    It does not remember ``jti`` values, so it does less than Embassy KMS here.
    """
    pem = (
        path.login_party.key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    steps = (
        ("sys/auth/jwt", {"type": "jwt"}),
        ("auth/jwt/config", {"jwt_validation_pubkeys": [pem]}),
        (
            f"auth/jwt/role/{LOGIN_ROLE}",
            {
                "role_type": "jwt",
                "bound_audiences": [path.audience],
                "user_claim": "sub",
                "token_policies": ["default"],
                "token_ttl": "1h",
            },
        ),
    )
    for route, body in steps:
        url = f"{peer_url}/v1/{route}"
        _ok(call(url, token, "POST", body), url)
    url = f"{peer_url}/v1/auth/jwt/login"
    body = {"jwt": path.login_party.assertion(path.audience), "role": LOGIN_ROLE}
    _ok(call(url, None, "POST", body), "OpenBao jwt login")


def _dpop_headers(token: str, proof: str) -> dict[str, str]:
    return {"Authorization": f"DPoP {token}", "DPoP": proof}


def _ok(answer: tuple[int, dict[str, Any]], what: str) -> dict[str, Any]:
    status, payload = answer
    if not 200 <= status < 300:
        raise SetupError(f"{what} -> {status}: {json.dumps(payload)[:500]}")
    return payload


def _login(call: Call, base_url: str, party: KeyHolder, audience: str) -> str:
    url = f"{base_url}/v1/auth/jwt/login"
    payload = _ok(call(url, None, "POST", {"jwt": party.assertion(audience)}), url)
    return str(payload["auth"]["client_token"])


def establish(call: Call, base_url: str, root_token: str, dataset: str) -> RestorePath:
    """Register principals with the root token, file a restore and have two officials approve.

    This is the flow of docs/access-control.md, done once; the figures measure its last step.
    """
    status = _ok(call(f"{base_url}/v1/ekms/status", root_token), "status")["data"]
    audience = f"embassy-kms/{status['site']}"
    officials = [KeyHolder.generate(f"bench-official-{n}") for n in range(3)]
    operator = KeyHolder.generate("bench-operator")
    tool = KeyHolder.generate("bench-restore-tool")

    def register(party: KeyHolder, role: str) -> None:
        url = f"{base_url}/v1/ekms/principals/{party.principal}"
        _ok(call(url, root_token, "POST", {"roles": [role], "jwk": party.jwk}), url)

    for official in officials:
        register(official, "official")
    register(operator, "restore-operator")
    register(tool, "restore-tool")
    payload = {
        "datasets": [dataset],
        "site": status["site"],
        "reason": "scheduled-restore-test",
        "justification": "benchmark of the restore path",
        "tool": tool.principal,
        "ttl": 86_400,
    }
    url = f"{base_url}/v1/ekms/proposals"
    proposal = _ok(
        call(
            url,
            _login(call, base_url, operator, audience),
            "POST",
            {"kind": "restore", "payload": payload},
        ),
        url,
    )["data"]
    for official in officials[:2]:
        decide = f"{base_url}/v1/ekms/proposals/{proposal['id']}/decide"
        signature = official.approval(proposal, audience)
        token = _login(call, base_url, official, audience)
        _ok(call(decide, token, "POST", {"signature": signature}), decide)
    return RestorePath(base_url, audience, dataset, proposal["id"], tool, operator, call)
