from __future__ import annotations

import json

from kms.audit import AuditRecord, time_us
from kms.canonical import canonical_json


def record(**changes: object) -> AuditRecord:
    values: dict[str, object] = {
        "time": 1_750_000_000.000001,
        "request_id": "r-1",
        "node": "n",
        "operation": "transit.decrypt",
        "decision": "allow",
        "status": 200,
        "key": "k",
        "details": {"contexts": ["hmac-sha256:ab"], "items": 2},
    }
    values.update(changes)
    return AuditRecord(**values)  # type: ignore[arg-type]


def test_the_leaf_has_integer_microseconds_and_no_float() -> None:
    leaf = record().leaf_json()
    assert leaf["time_us"] == 1_750_000_000_000_001
    assert "time" not in leaf
    assert {k: v for k, v in record().to_json().items() if k != "time"} == {
        k: v for k, v in leaf.items() if k != "time_us"
    }
    assert "principal" not in leaf  # None and {} stay out, as in to_json


def test_canonical_bytes_are_the_canonical_json_of_the_leaf() -> None:
    data = record().canonical()
    assert data == canonical_json(record().leaf_json())
    assert canonical_json(json.loads(data)) == data


def test_details_canonical_json_refuses_are_replaced_by_the_reason() -> None:
    data = json.loads(record(details={"ratio": 0.5, "big": 2**60}).canonical())
    assert data["operation"] == "transit.decrypt"
    assert data["details"] == {
        "unencodable_details": "canonical JSON: integer outside ±(2**53 - 1), the range JSON "
        "numbers hold exactly at $.details.big"
    }


def test_time_us_rounds_to_the_nearest_microsecond() -> None:
    assert time_us(1.0000004) == 1_000_000
    assert time_us(1.0000006) == 1_000_001
    assert time_us(0.0) == 0
