"""The site registry over HTTP: registration, failover, failback, retirement, gating, tree heads.

A real server (SoftHSM; SQLite and PostgreSQL) at the site ``embassy-1``, with the officials,
officer, operator and restore tool of ``test_access``. Where a second site's signed tree head is
needed, a second real node (``home``: its own SoftHSM token and database) is initialised and
unsealed, and signs a head with its HSM's audit key.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from api.cli import main
from kms.errors import ConflictError
from kms.policy import SiteKind
from kms.sites import SiteBackend, SiteRecord, SiteStatus, StatusChange
from storage.sql_store import SqlStore
from tests.conftest import _SOFTHSM_DIR as SOFTHSM_DIR
from tests.integration.test_access import AUDIENCE, Party, World, encrypt, file_restore
from tests.integration.test_access import world as world_fixture  # noqa: F401 - the fixture

if TYPE_CHECKING:
    import requests

S = SiteStatus
HERE = "embassy-1"
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
def world(world_fixture: World) -> World:  # noqa: F811 - test_access's world, by that name
    return world_fixture


def data(response: requests.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    return dict(response.json()["data"])


def error(response: requests.Response, status: int) -> str:
    assert response.status_code == status, response.text
    return " ".join(response.json()["errors"])


def set_own_status(world: World, status: SiteStatus) -> None:
    """What an import or another node would have left in the registry (not an API path)."""
    store = world.server.runtime.store
    own = store.site(HERE)
    assert own is not None
    assert store.change_site_statuses([StatusChange(HERE, own.status, status)], 0.0)


def propose(world: World, official: Party, kind: str, payload: dict[str, Any]) -> Any:
    return world.call(
        "POST",
        "ekms/proposals",
        world.login(official),
        body={"kind": kind, "payload": payload},
    )


def decided(world: World, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Filed by official 0, approved by officials 1 and 2: executed here."""
    proposal = data(propose(world, world.officials[0], kind, payload))
    assert data(world.approve(world.officials[1], proposal))["state"] == "pending"
    assert data(world.approve(world.officials[2], proposal))["state"] == "approved"
    return proposal


def register(world: World, name: str, **body: Any) -> requests.Response:
    officer = world.login(world.officer)
    return world.call(
        "POST", f"ekms/sites/{name}", officer, body={"kind": "home", "backend": "pkcs11", **body}
    )


def records(world: World, operation: str) -> list[dict[str, Any]]:
    found = world.server.runtime.store.audit_records(100_000)
    return [r for r in found if r["operation"] == operation]


# --- this site and the registry ---------------------------------------------------------------


def test_this_site_registers_itself_active_and_officers_register_others(world: World) -> None:
    site = data(world.call("GET", "ekms/site", world.root))
    assert (site["name"], site["kind"], site["status"]) == (HERE, "embassy", "active")
    assert site["backend"] == "pkcs11"
    assert site["serving"] is True
    assert site["emergency"] is None
    assert data(world.call("GET", "ekms/status", world.root))["site_status"] == "active"
    # Any authenticated caller may ask where it is; nobody without a token.
    assert data(world.call("GET", "ekms/site", world.login(world.operator)))["name"] == HERE
    error(world.call("GET", "ekms/site"), 403)

    # The audit key reaches the row once it exists (the first head makes it).
    assert site["audit_public_key"] is None
    officer = world.login(world.officer)
    data(world.call("POST", "ekms/audit/tree-head", officer))
    heads = data(world.call("GET", "ekms/audit/heads", officer))
    site = data(world.call("GET", "ekms/site", officer))
    assert site["audit_public_key"] == heads["public_key"]
    assert site["audit_kid"] == heads["kid"]

    key = Party.ec("home-audit").jwk
    home = data(
        register(world, "home", url="https://home.example:8200", audit_public_key=key, note="HQ")
    )
    assert (home["status"], home["kind"], home["audit_public_key"]) == ("standby", "home", key)
    listed = data(world.call("LIST", "ekms/sites", officer))
    assert listed["keys"] == [HERE, "home"]
    assert listed["key_info"]["home"]["url"] == "https://home.example:8200"
    assert data(world.call("GET", "ekms/sites?list=true", officer))["keys"] == [HERE, "home"]
    assert data(world.call("GET", "ekms/sites/home", world.login(world.officials[0])))["note"]
    assert records(world, "site.register")[-1]["details"] == {
        "site": "home",
        "kind": "home",
        "backend": "pkcs11",
        "audit_kid": home["audit_kid"],
    }


def test_registry_input_is_checked(world: World) -> None:
    officer = world.login(world.officer)
    data(register(world, "home"))
    cases = [
        (register(world, "home"), 409, "already registered"),
        (register(world, HERE, kind="embassy"), 409, "is this site"),
        (register(world, "Home"), 400, "a-z"),
        (register(world, "x" * 65), 400, "a-z"),
        (register(world, "cloud", kind="moon"), 400, "unknown site kind"),
        (register(world, "cloud", backend="floppy"), 400, "unknown site backend"),
        (register(world, "cloud", url="ftp://cloud"), 400, "url"),
        (register(world, "cloud", audit_public_key={"kty": "EC"}), 400, ""),
        (register(world, "cloud", colour="blue"), 400, "unknown field 'colour'"),
        (world.call("POST", "ekms/sites/cloud", officer, body={"kind": "home"}), 400, "backend"),
        (world.call("GET", "ekms/sites/nowhere", officer), 404, "no site 'nowhere'"),
        (world.call("GET", "ekms/sites/No_Where", officer), 400, "a-z"),
        (world.call("GET", "ekms/sites?colour=blue", officer), 400, "unknown query parameter"),
    ]
    for response, status, message in cases:
        assert message in error(response, status)
    operator = world.login(world.operator)
    body = {"kind": "home", "backend": "pkcs11"}
    error(world.call("POST", "ekms/sites/cloud", operator, body=body), 403)
    error(world.call("LIST", "ekms/sites", operator), 403)
    error(world.call("GET", "ekms/sites/home", operator), 403)
    # Ed25519 keys cannot sign this service's (ES256) tree heads.
    ed = Party.ed("cloud-audit").jwk
    assert "ES256" in error(register(world, "cloud", audit_public_key=ed), 400)
    assert "cloud" not in data(world.call("LIST", "ekms/sites", officer))["keys"]


# --- gating, failover, failback ----------------------------------------------------------------


def key_operations(world: World, token: str) -> dict[str, requests.Response]:
    context = {"context": "Y3R4"}
    item = {"plaintext": base64.b64encode(b"x").decode(), **context}
    return {
        "encrypt": world.call("POST", "transit/encrypt/laws", token, body=item),
        "decrypt": world.call(
            "POST", "transit/decrypt/laws", token, body={"ciphertext": "vault:v1:AAAA", **context}
        ),
        "rewrap": world.call(
            "POST", "transit/rewrap/laws", token, body={"ciphertext": "vault:v1:AAAA", **context}
        ),
        "datakey": world.call("POST", "transit/datakey/plaintext/laws", token, body=context),
        "sign": world.call("POST", "transit/sign/seal", token, body={"input": "eA=="}),
        "create": world.call("POST", "transit/keys/new-key", token),
        "rotate": world.call("POST", "transit/keys/laws/rotate", token),
    }


def test_a_standby_site_refuses_key_operations_until_a_failover(world: World) -> None:
    assert world.call("POST", "transit/keys/seal", world.root, body={"type": "ecdsa-p256"}).ok
    ciphertext = encrypt(world, "laws", b"land register")
    request = file_restore(world, ["laws"])
    world.approve(world.officials[0], request)
    assert data(world.approve(world.officials[1], request))["state"] == "approved"
    data(register(world, "home"))
    set_own_status(world, S.STANDBY)

    for name, response in key_operations(world, world.root).items():
        message = error(response, 503)
        assert message.startswith("this site is standby: "), name
    credential = world.tool_call(
        f"ekms/proposals/{request['id']}/credential", world.login(world.tool)
    )
    assert error(credential, 503).startswith("this site is standby")
    # Refusals are audited, with the reason.
    refused = records(world, "transit.encrypt")[-1]
    assert (refused["status"], refused["reason"][:23]) == (503, "this site is standby: k")
    assert records(world, "proposal.credential")[-1]["status"] == 503
    # Reading, verifying, the registry, status and proposals work in every status.
    assert world.call("GET", "transit/keys/laws", world.root).ok
    assert world.call("POST", "transit/verify/seal", world.root, body={}).status_code == 400
    assert data(world.call("GET", "ekms/site", world.root))["serving"] is False
    assert data(world.call("GET", "ekms/status", world.root))["site_status"] == "standby"

    bad = [
        ({"previous": "home", "justification": "x", "extra": 1}, 400, "unknown field 'extra'"),
        ({"previous": "nowhere", "justification": "x"}, 404, "no site 'nowhere'"),
        ({"previous": HERE, "justification": "x"}, 400, "another site"),
        ({"previous": "home"}, 400, "justification is required"),
        ({"previous": 7, "justification": "x"}, 400, "a-z"),
    ]
    for payload, status, message in bad:
        assert message in error(
            propose(world, world.officials[0], "site-failover", payload), status
        )
    error(propose(world, world.operator, "site-failover", {"previous": "home"}), 403)

    proposal = decided(
        world, "site-failover", {"previous": "home", "justification": "home site lost"}
    )
    assert proposal["payload"] == {"previous": "home", "justification": "home site lost"}
    assert data(world.call("GET", "ekms/site", world.root))["status"] == "active"
    assert data(world.call("GET", "ekms/sites/home", world.root))["status"] == "failed-over"
    decrypt = world.call(
        "POST",
        "transit/decrypt/laws",
        world.root,
        body={"ciphertext": ciphertext, "context": "Y3R4"},
    )
    assert base64.b64decode(data(decrypt)["plaintext"]) == b"land register"
    granted = world.tool_call(f"ekms/proposals/{request['id']}/credential", world.login(world.tool))
    assert granted.status_code == 200, granted.text
    # An active site has nothing to fail over.
    again = {"previous": "home", "justification": "again"}
    assert "already active" in error(
        propose(world, world.officials[0], "site-failover", again), 409
    )


def test_failback_retires_the_embassy_and_a_retired_site_refuses_everything(world: World) -> None:
    data(register(world, "embassy-2", kind="embassy"))
    unknown = {"embassy": "embassy-9", "justification": "x"}
    error(propose(world, world.officials[0], "site-failback", unknown), 404)
    set_own_status(world, S.FAILED_OVER)
    assert error(key_operations(world, world.root)["encrypt"], 503).startswith(
        "this site is failed-over: "
    )
    decided(world, "site-failback", {"embassy": "embassy-2", "justification": "home rebuilt"})
    assert data(world.call("GET", "ekms/site", world.root))["status"] == "active"
    assert data(world.call("GET", "ekms/sites/embassy-2", world.root))["status"] == "retired"
    assert world.call("POST", "transit/keys/laws/rotate", world.root).ok

    set_own_status(world, S.RETIRED)
    for name, response in key_operations(world, world.root).items():
        assert error(response, 503).startswith("this site is retired: "), name
    payloads = {
        "site-failover": {"previous": "embassy-2", "justification": "x"},
        "site-failback": {"embassy": "embassy-2", "justification": "x"},
        "site-retire": {"justification": "x"},
    }
    for kind, payload in payloads.items():
        message = error(propose(world, world.officials[0], kind, payload), 409)
        assert "this site is retired" in message


def test_retire_revokes_every_token_and_destroys_the_keys(world: World) -> None:
    ciphertext = encrypt(world, "laws", b"archive")
    officer_before = world.login(world.officer)
    operator_before = world.login(world.operator)
    _, credential = _grant(world)
    assert world.call("GET", "ekms/site", officer_before).ok

    runtime = world.server.runtime
    handles = {
        version.handle
        for name in ("laws", "registry")
        for version in runtime.keys.policy(name).versions.values()
    }
    assert handles <= runtime.backend.handles()
    bad = {"justification": "closing", "destroy_keys": "yes"}
    assert "destroy_keys" in error(propose(world, world.officials[0], "site-retire", bad), 400)
    decided(world, "site-retire", {"justification": "embassy closed", "destroy_keys": True})

    for token in (officer_before, operator_before, world.root):
        assert world.call("GET", "ekms/site", token).status_code in (401, 403)
    body = {"ciphertext": ciphertext, "context": "Y3R4"}
    assert world.tool_call("transit/decrypt/laws", credential, body).status_code == 401
    # People log in again (to read and export the log); the site serves no key operation.
    officer = world.login(world.officer)
    site = data(world.call("GET", "ekms/site", officer))
    assert (site["status"], site["serving"]) == ("retired", False)
    error(world.call("GET", "transit/keys/laws", officer), 404)
    error(world.call("GET", "transit/keys/registry", officer), 404)
    error(world.call("LIST", "transit/keys", officer), 404)
    assert not handles & runtime.backend.handles()  # gone from the HSM, not only the registry
    # Its own log stays signable and exportable: the system keys are kept.
    data(world.call("POST", "ekms/audit/tree-head", officer))
    assert world.call("GET", "ekms/audit/export", officer).ok
    decide = records(world, "proposal.decide")[-1]
    assert (decide["status"], decide["details"]["state"]) == (200, "approved")


def _grant(world: World) -> tuple[dict[str, Any], str]:
    request = file_restore(world, ["laws"])
    world.approve(world.officials[0], request)
    world.approve(world.officials[1], request)
    answer = world.tool_call(f"ekms/proposals/{request['id']}/credential", world.login(world.tool))
    assert answer.status_code == 200, answer.text
    return request, str(answer.json()["auth"]["client_token"])


def test_retire_without_destroying_keeps_the_keys(world: World) -> None:
    decided(world, "site-retire", {"justification": "moved to a new building"})
    officer = world.login(world.officer)
    assert world.call("GET", "transit/keys/laws", officer).ok
    assert data(world.call("GET", "ekms/site", officer))["status"] == "retired"


# --- other sites' tree heads --------------------------------------------------------------------


# A second site in a process of its own: SoftHSM keeps one library state per process, and a
# second node initialising its token in this process would invalidate the first one's sessions.
_HOME_SITE = """
import json, sys
from pathlib import Path
from api.runtime import create_runtime, local_seal_control, prepare_hsm
from api.settings import Settings

data_dir, softhsm_dir, label = sys.argv[1:4]
settings = Settings(
    data_dir=Path(data_dir), softhsm_dir=softhsm_dir, token_label=label, workers=1,
    node_name="home-1", site_name="home", site_kind="home",
)
runtime = create_runtime(settings, module=prepare_hsm(settings))
result = runtime.initialise(threshold=2, shares=3)
custodian = local_seal_control(runtime)
for share in result.mnemonics[:2]:
    custodian.submit(share)
head, jws = runtime.audit_log.sign_head()
print(json.dumps({
    "own": runtime.sites.own().to_json(),
    "key": runtime.audit_log.public_key().to_json(),
    "line": {"type": "head", **head.claims(), "jws": jws},
}))
runtime.close()
"""


@dataclass(frozen=True)
class Home:
    own: dict[str, Any]
    key: dict[str, str]
    line: dict[str, Any]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Home:
    """A second real site, initialised and unsealed, whose HSM signed one audit tree head."""
    data_dir = tmp_path_factory.mktemp("home")
    answer = subprocess.run(
        [
            sys.executable,
            "-c",
            _HOME_SITE,
            str(data_dir),
            str(SOFTHSM_DIR),
            f"home-{uuid.uuid4().hex[:8]}",
        ],
        cwd=Path(__file__).parents[2],
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert answer.returncode == 0, answer.stderr.decode()[-3000:]
    return Home(**json.loads(answer.stdout.decode().splitlines()[-1]))


def test_other_sites_tree_heads_are_recorded_after_their_signature_is_checked(
    world: World, home: Home
) -> None:
    assert (home.own["name"], home.own["kind"], home.own["status"]) == ("home", "home", "active")
    line, jws = home.line, home.line["jws"]
    claims = {k: line[k] for k in ("root_hash", "size", "timestamp_ms")}
    officer = world.login(world.officer)

    def record(name: str, value: Any) -> requests.Response:
        body = {"tree_head": value}
        return world.call("POST", f"ekms/sites/{name}/tree-heads", officer, body=body)

    data(register(world, "home", audit_public_key=home.key))
    recorded = data(record("home", line))
    assert (recorded["site"], recorded["size"], recorded["jws"]) == ("home", line["size"], jws)
    assert data(record("home", jws))["root_hash"] == line["root_hash"]
    entry = records(world, "site.tree_head")[-2]
    assert entry["decision"] == "allow"
    assert entry["details"] == {"site": "home", **claims, "jws": jws}

    # This site's own head is signed by another key: refused as home's.
    own_head = data(world.call("POST", "ekms/audit/tree-head", officer))
    forged = {**line, "root_hash": "00" * 32}
    cases = [
        (record("home", own_head), 400, "does not verify with site 'home'"),
        (record("home", forged), 400, "does not match its signed payload"),
        (record("home", {**line, "size": -1}), 400, "malformed tree head"),
        (record("home", "a.b.c"), 400, "malformed"),
        (record("home", 7), 400, "tree_head"),
        (world.call("POST", "ekms/sites/home/tree-heads", officer, body={}), 400, "tree_head"),
        (record("nowhere", line), 404, "no site 'nowhere'"),
        (record(HERE, own_head), 400, "own heads"),
        (record("Home", line), 400, "a-z"),
    ]
    for response, status, message in cases:
        assert message in error(response, status)
    refused = records(world, "site.tree_head")[-1]
    assert (refused["status"], refused["decision"]) == (400, "error")
    data(register(world, "keyless"))
    assert "no registered audit public key" in error(record("keyless", line), 409)

    # A site registered before it had a key gets it pinned once, then its heads are recorded.
    def pin(name: str, key: Any, token: str = officer) -> requests.Response:
        body = {"audit_public_key": key}
        return world.call("POST", f"ekms/sites/{name}/audit-key", token, body=body)

    assert "32 bytes" in error(pin("keyless", {"kty": "OKP", "crv": "Ed25519", "x": "AA"}), 400)
    error(pin("keyless", home.key, world.login(world.operator)), 403)
    assert data(pin("keyless", home.key))["audit_kid"]
    assert data(record("keyless", line))["site"] == "keyless"
    assert "never replaced" in error(pin("keyless", home.key), 409)
    assert "never replaced" in error(pin("home", home.key), 409)
    assert "own audit key" in error(pin(HERE, home.key), 409)
    assert "no site 'nowhere'" in error(pin("nowhere", home.key), 404)
    assert records(world, "site.audit_key")[-1]["decision"] == "error"
    error(
        world.call("POST", "ekms/sites/home/tree-heads", world.login(world.operator), body={}),
        403,
    )


# --- the store's contract, on SQLite and PostgreSQL ---------------------------------------------


def test_store_sites_are_cached_per_generation_and_changed_all_or_nothing(
    database_url: str,
) -> None:
    first, second = SqlStore.open(database_url), SqlStore.open(database_url, run_migrations=False)
    try:

        def row(name: str, status: SiteStatus) -> SiteRecord:
            return SiteRecord(name, SiteKind.HOME, SiteBackend.PKCS11, status, 1.0, 1.0)

        assert first.insert_site(row("home", S.ACTIVE))
        assert not first.insert_site(row("home", S.STANDBY), only_if_absent=True)
        with pytest.raises(ConflictError):
            first.insert_site(row("home", S.STANDBY))
        assert second.site("home") == row("home", S.ACTIVE)
        assert first.insert_site(row("embassy-1", S.STANDBY))
        assert [s.name for s in second.sites()] == ["embassy-1", "home"]  # the cache moved on

        changes = [
            StatusChange("embassy-1", S.STANDBY, S.ACTIVE),
            StatusChange("home", S.STANDBY, S.FAILED_OVER),  # home is active: refused
        ]
        assert not first.change_site_statuses(changes, 2.0)
        assert second.site("embassy-1").status is S.STANDBY  # type: ignore[union-attr]
        changes[1] = StatusChange("home", S.ACTIVE, S.FAILED_OVER)
        assert first.change_site_statuses(changes, 2.0)
        assert second.site("embassy-1").status is S.ACTIVE  # type: ignore[union-attr]
        assert second.site("home").updated_at == 2.0  # type: ignore[union-attr]

        jwk = Party.ec("k").jwk
        assert first.set_site_audit_key("home", jwk, 3.0)
        assert second.site("home").audit_public_key == jwk  # type: ignore[union-attr]

        first.insert_token("root-1", b"r" * 32, ["root"], 1.0)
        assert second.find_token(b"r" * 32) is not None
        retire = [StatusChange("embassy-1", S.ACTIVE, S.RETIRED)]
        assert first.change_site_statuses(retire, 4.0, revoke_tokens=True)
        assert second.find_token(b"r" * 32) is None
    finally:
        first.dispose()
        second.dispose()


# --- the CLI ------------------------------------------------------------------------------------


def ekms(
    world: World,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    token: str,
    *args: str | Path,
) -> tuple[int, str, str]:
    for name in ("VAULT_ADDR", "VAULT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EKMS_ADDR", world.server.url)
    monkeypatch.setenv("EKMS_TOKEN", token)
    monkeypatch.setenv("EKMS_AUDIENCE", AUDIENCE)
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@sqlite_only  # the CLI is the same client whatever the store
def test_cli(
    world: World,
    home: Home,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    officer = world.login(world.officer)

    def run(*args: str | Path) -> tuple[int, str, str]:
        return ekms(world, monkeypatch, capsys, officer, *args)

    code, out, _ = run("site", "status")
    assert code == 0
    assert "embassy-1" in out
    assert "active" in out
    assert "Serving         yes" in out

    key_file = tmp_path / "home-audit.json"
    # The saved answer of home's GET /v1/ekms/audit/heads: its public_key is taken.
    key_file.write_text(json.dumps({"data": {"public_key": home.key}}))
    code, out, _ = run(
        "site", "register", "home", "--kind", "home", "--backend", "pkcs11", "--audit-key", key_file
    )
    assert (code, out.strip()) == (0, "Registered site home (home) as standby.")
    code, _, err = run("site", "register", "home", "--kind", "home", "--backend", "pkcs11")
    assert code == 2
    assert "409" in err
    code, out, _ = run("site", "list")
    assert code == 0
    assert out.splitlines()[0].split() == ["NAME", "KIND", "BACKEND", "STATUS", "URL"]
    assert out.splitlines()[2].split()[:4] == ["home", "home", "pkcs11", "standby"]
    code, out, _ = run("site", "show", "home", "-format", "json")
    assert json.loads(out)["audit_public_key"] == home.key
    code, _, err = run("site", "show", "../sys")
    assert code == 2
    assert "not a site name" in err

    export = tmp_path / "home-export.jsonl"
    export.write_text(json.dumps({"type": "export"}) + "\n" + json.dumps(home.line) + "\n")
    code, out, _ = run("site", "record-head", "home", export)
    assert code == 0, out
    assert f"size {home.line['size']}" in out
    bare = tmp_path / "head.jws"
    bare.write_text(home.line["jws"] + "\n")
    assert run("site", "record-head", "home", bare)[0] == 0
    junk = tmp_path / "junk.txt"
    junk.write_text("hello")
    code, _, err = run("site", "record-head", "home", junk)
    assert code == 2
    assert "holds no head line" in err
    code, _, err = run("site", "record-head", "home", tmp_path / "missing")
    assert code == 2
    assert "cannot read" in err
