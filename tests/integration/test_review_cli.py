"""``ekms login`` and ``ekms review`` against a real server, run in-process (``api.cli.main``).

The officers log in with key files (a private JWK, a PEM) and act as themselves; the address,
audience and token come from the environment, as an officer's shell would set them.
"""

from __future__ import annotations

import csv
import json
import os
from typing import TYPE_CHECKING, Any

from api.cli import main
from tests.integration.test_review_api import (
    CAMPAIGNS,
    Review,
    sqlite_only,
    world_fixture,  # noqa: F401 - the fixture review builds on
)
from tests.integration.test_review_api import review as review_fixture  # noqa: F401

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

AUDIENCE = "embassy-kms/embassy-1"


class Ekms:
    """Runs ``ekms`` with the given token; returns (exit status, stdout, stderr)."""

    def __init__(
        self, review: Review, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        for name in ("VAULT_ADDR", "VAULT_TOKEN", "EKMS_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("EKMS_ADDR", review.world.server.url)
        monkeypatch.setenv("EKMS_AUDIENCE", AUDIENCE)

    def __call__(self, token: str | None, *args: str | Path) -> tuple[int, str, str]:
        if token is None:
            self.monkeypatch.delenv("EKMS_TOKEN", raising=False)
        else:
            self.monkeypatch.setenv("EKMS_TOKEN", token)
        self.capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        out, err = self.capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    def json(self, token: str | None, *args: str | Path) -> Any:
        code, out, err = self(token, *args, "-format", "json")
        assert code == 0, err
        return json.loads(out)


def key_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    path.chmod(0o600)
    return path


@sqlite_only
def test_login_then_review_from_the_command_line(
    review_fixture: Review,  # noqa: F811 - the imported fixture
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    review = review_fixture
    world = review.world
    ekms = Ekms(review, monkeypatch, capsys)

    # --- login: a private JWK for one officer, a PEM for the other ---------------------------
    jwk = key_file(tmp_path / "officer.jwk", json.dumps(world.officer.private_jwk()).encode())
    pem = key_file(tmp_path / "officer-2.pem", review.officer2.private_pem())
    code, officer, err = ekms(None, "login", "--principal", "officer", "--key", jwk)
    assert code == 0, err
    officer = officer.strip()
    assert world.call("GET", "auth/token/lookup-self", officer).json()["data"]["entity_id"] == (
        "officer"
    )
    auth = ekms.json(None, "login", "-principal", "officer-2", "-key", pem, "-role", "x")
    assert auth["metadata"] == {"principal": "officer-2"}
    officer2 = auth["client_token"]

    code, _, err = ekms(None, "login", "--principal", "officer", "--key", jwk, "--audience", "x")
    assert code == 2
    assert "401" in err
    assert "--audience (used: x" in err
    code, _, err = ekms(None, "login", "--principal", "officer-2", "--key", jwk)
    assert code == 2
    assert "401" in err
    junk = key_file(tmp_path / "junk.jwk", b"hello")
    code, _, err = ekms(None, "login", "--principal", "officer", "--key", junk)
    assert code == 2
    assert "key file" in err
    assert "not a private JWK" in err
    code, _, err = ekms(None, "login", "--principal", "officer", "--key", tmp_path / "none")
    assert code == 2
    assert "cannot read key file" in err
    jwk.chmod(0o640)
    code, _, err = ekms(None, "login", "--principal", "officer", "--key", jwk)
    assert code == 0
    assert "can be read by other users" in err

    # --- the report -------------------------------------------------------------------------
    code, out, err = ekms(officer, "review", "report")
    assert code == 0, err
    assert out.startswith("Access report as of ")
    assert "Unused keys     2: laws, registry" in out
    code, out, _ = ekms(officer, "review", "report", "--section", "principals")
    assert code == 0
    assert out.splitlines()[0].split()[:3] == ["id", "display_name", "roles"]
    assert any(line.startswith("officer-2 ") for line in out.splitlines())
    data = ekms.json(officer, "review", "report", "--principal", "operator")["data"]
    assert [p["id"] for p in data["principals"]] == ["operator"]
    target = tmp_path / "usage.csv"
    code, _, err = ekms(
        officer, "review", "report", "-format", "csv", "--section", "usage", "-o", target
    )
    assert code == 0, err
    rows = list(csv.reader(target.read_text(encoding="utf-8").splitlines()))
    assert rows[0] == ["principal", "dataset", "site", "issued", "used", "denied"]
    assert not (tmp_path / "usage.csv.partial").exists()
    code, _, err = ekms(officer, "review", "report", "-format", "csv")
    assert code == 2
    assert "needs --section" in err
    code, _, err = ekms(officer, "review", "report", "--since", "last week")
    assert code == 2
    assert "400: since must be" in err
    operator = world.login(world.operator)
    code, _, err = ekms(operator, "review", "report")
    assert code == 2
    assert "403" in err
    assert operator not in err

    # --- a campaign -------------------------------------------------------------------------
    code, _, err = ekms(world.root, "review", "campaign", "open")
    assert code == 2
    assert "403: the root token is not a principal" in err
    opened = ekms.json(
        officer,
        "review",
        "campaign",
        "open",
        "--duration",
        "72h",
        "--scope",
        "operator",
        "officer",
        "--scope",
        "restore-tool",
    )
    cid = opened["data"]["campaign"]["id"]
    assert sorted(opened["data"]["campaign"]["items"]) == ["officer", "operator", "restore-tool"]
    code, out, _ = ekms(officer, "review", "campaign", "list")
    assert code == 0
    assert cid in out
    assert "PENDING" in out
    code, out, _ = ekms(officer, "review", "campaign", "list", "--state", "closed")
    assert out.strip() == "No review campaigns."
    note = "ok\x1b[2J"  # a terminal escape: shown, never obeyed
    code, out, _ = ekms(officer, "review", "campaign", "certify", cid, "operator", "--note", note)
    assert code == 0
    assert out.strip() == f"Certified operator in campaign {cid}; 2 still pending."
    code, _, err = ekms(officer, "review", "campaign", "certify", cid, "officer")
    assert code == 2
    assert "403: permission denied" in err
    code, _, err = ekms(officer2, "review", "campaign", "revoke", cid, "officer")
    assert code == 2  # --note is required
    code, out, err = ekms(officer2, "review", "campaign", "certify", cid, "officer")
    assert code == 0, err
    code, out, _ = ekms(officer, "review", "campaign", "show", cid)
    assert code == 0
    assert out.startswith(f"Campaign   {cid} (open)")
    assert "Progress   2 certified, 0 revoked, 1 pending" in out
    assert "ok?[2J" in out
    assert "\x1b" not in out
    assert any(
        line.split()[:4] == ["operator", "restore-operator", "yes", "certified"]
        for line in out.splitlines()
    )
    code, _, err = ekms(officer, "review", "campaign", "show", "no-such-campaign")
    assert code == 2
    assert "404: no review campaign" in err

    code, out, err = ekms(officer, "review", "campaign", "close", cid)
    assert code == 0, err
    assert out.splitlines() == [
        f"Campaign {cid} closed.",
        "Suspended (not certified): restore-tool",
        "Revoked: none",
        "Left to a quorum of officials (propose remove-official): none",
    ]
    code, _, err = ekms(officer, "review", "campaign", "close", cid)
    assert code == 2
    assert "409: the campaign is closed" in err
    assert (
        world.call("GET", f"{CAMPAIGNS}/{cid}", officer).json()["data"]["principals"][
            "restore-tool"
        ]["active"]
        is False
    )
    assert os.environ["EKMS_TOKEN"] == officer
