"""The runner's checks of the peer of a two-site ceremony, before step 1.

The main service's registry is given as the answers of a service that only answers what the
check reads (``GET /v1/ekms/sites/NAME``); the rest of the runner is real.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from api.principal_keys import KeyHolder
from ceremonies.actions import Participant, Session, known_actions
from ceremonies.runner import Runner
from ceremonies.script import CeremonyRole, load_script
from ceremonies.service import Service, ServiceError
from ceremonies.terminal import Terminal

SCRIPTS = Path(__file__).resolve().parents[2] / "ceremonies" / "scripts"
PEER = {"site": "embassy-1", "site_kind": "embassy", "kid": "kid-of-embassy-1", "audience": "a"}


class Registry(Service):
    """A main service whose registry holds ``rows`` (name: row); nothing else is asked."""

    def __init__(self, rows: dict[str, dict[str, Any]]) -> None:
        super().__init__("http://main.invalid")
        self.rows = rows

    def call(self, method: str, path: str, _body: Any = None, **_: Any) -> Any:
        assert (method, path.rsplit("/", 1)[0]) == ("GET", "ekms/sites")
        row = self.rows.get(path.rsplit("/", 1)[1])
        if row is None:
            raise ServiceError("404: no such site", 404, None)
        return {"data": row}


def runner(rows: dict[str, dict[str, Any]], tmp_path: Path) -> Runner:
    script = load_script((SCRIPTS / "decommission-site.yaml").read_bytes(), known_actions()).script
    assert script is not None
    found = Runner(
        script,
        Registry(rows),
        Terminal(),
        tmp_path,
        peer=Service("http://peer.invalid"),
    )
    found.session = Session({"site": "home", "site_kind": "home", "audience": "b"})
    found.peer_session = Session(dict(PEER))
    admin = Participant("officer", CeremonyRole.ADMINISTRATOR, KeyHolder.generate("officer"), "")
    admin.token = "token"
    found.participants = [admin]
    return found


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (None, None),  # not registered here: nothing to compare (provision-site registers it)
        ({"kind": "embassy", "audit_kid": None}, None),  # registered without a key
        ({"kind": "embassy", "audit_kid": "kid-of-embassy-1"}, None),
        (
            {"kind": "public-cloud", "audit_kid": None},
            "registered embassy-1 as public-cloud: it is not the expected site",
        ),
        (
            {"kind": "embassy", "audit_kid": "another-kid"},
            (
                "its audit key (kid-of-embassy-1) is not the one the main service registered "
                "for embassy-1 (another-kid): it is not the expected site"
            ),
        ),
    ],
)
def test_a_peer_is_the_site_the_main_service_registered(
    row: dict[str, Any] | None, problem: str | None, tmp_path: Path
) -> None:
    found = runner({} if row is None else {"embassy-1": row}, tmp_path)
    problems = found._registered_peer_problems()
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problem in problems[0]


def test_a_peer_that_is_the_main_site_is_refused(tmp_path: Path) -> None:
    found = runner({}, tmp_path)
    found.peer_session = Session({**PEER, "site": "home", "initialized": True, "sealed": False})
    problems = found._peer_problems(1)
    assert len(problems) == 1
    assert problems[0].startswith("the peer is site home, the same site as the main service")
