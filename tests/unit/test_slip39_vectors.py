"""The reference implementation's SLIP-39 vectors, through the project's own share parsing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from shamir_mnemonic import MnemonicError

from kms.custody import recover_secret
from kms.errors import InvalidShareError

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "slip39_vectors.json").read_text())


@pytest.mark.parametrize(
    ("description", "mnemonics", "secret", "_xprv"), VECTORS, ids=[v[0][:60] for v in VECTORS]
)
def test_vector(description: str, mnemonics: list[str], secret: str, _xprv: str) -> None:
    if secret:
        assert recover_secret(mnemonics, b"TREZOR").hex() == secret, description
    else:
        with pytest.raises((InvalidShareError, MnemonicError, ValueError)):
            recover_secret(mnemonics, b"TREZOR")


def test_vectors_cover_valid_and_invalid() -> None:
    assert sum(1 for v in VECTORS if v[2]) >= 10
    assert sum(1 for v in VECTORS if not v[2]) >= 20
