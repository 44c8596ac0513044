from __future__ import annotations

import enum
import json
import math
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kms.canonical import (
    MAX_DEPTH,
    MAX_SAFE_INTEGER,
    _canonical_json,
    canonical_json,
    canonical_record,
)
from kms.errors import InvalidRequestError

if TYPE_CHECKING:
    from collections.abc import Callable


class IntFlagLike(enum.IntEnum):
    ONE = 1


# --- RFC 8785 vectors ---------------------------------------------------------------------------


def test_rfc8785_section_3_2_3_sorting() -> None:
    # RFC 8785 section 3.2.3: property names sort by UTF-16 code units, so the emoji U+1F600
    # (surrogates D83D DE00) comes before U+FB33, which a code-point sort would reverse.
    source = json.loads(
        '{"\\u20ac": "Euro Sign", "\\r": "Carriage Return", '
        '"\\ufb33": "Hebrew Letter Dalet With Dagesh", "1": "One", '
        '"\\ud83d\\ude00": "Emoji: Grinning Face", "\\u0080": "Control", '
        '"\\u00f6": "Latin Small Letter O With Diaeresis"}'
    )
    expected = (
        '{"\\r":"Carriage Return","1":"One","\u0080":"Control",'
        '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign",'
        '"\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}'
    )
    assert canonical_json(source) == expected.encode()


def test_rfc8785_section_3_2_2_strings_and_literals() -> None:
    # RFC 8785 section 3.2.2's sample, without its "numbers" member (floats are refused here).
    source = json.loads(
        '{"string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/", '
        '"literals": [null, true, false]}'
    )
    expected = '{"literals":[null,true,false],"string":"€$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}'
    assert canonical_json(source) == expected.encode()


def test_cyberphone_weird_vector() -> None:
    # testdata/input/weird.json and testdata/outhex/weird.txt of the RFC 8785 reference
    # implementation, https://github.com/cyberphone/json-canonicalization
    source = json.loads(
        '{"\\u20ac": "Euro Sign", "\\r": "Carriage Return", "\\u000a": "Newline", '
        '"1": "One", "\\u0080": "Control\\u007f", "\\ud83d\\ude02": "Smiley", '
        '"\\u00f6": "Latin Small Letter O With Diaeresis", '
        '"\\ufb33": "Hebrew Letter Dalet With Dagesh", "</script>": "Browser Challenge"}'
    )
    expected = bytes.fromhex(
        "7b225c6e223a224e65776c696e65222c225c72223a2243617272696167652052657475726e222c2231"
        "223a224f6e65222c223c2f7363726970743e223a2242726f77736572204368616c6c656e6765222c22"
        "c280223a22436f6e74726f6c7f222c22c3b6223a224c6174696e20536d616c6c204c6574746572204f"
        "205769746820446961657265736973222c22e282ac223a224575726f205369676e222c22f09f988222"
        "3a22536d696c6579222c22efacb3223a22486562726577204c65747465722044616c65742057697468"
        "20446167657368227d"
    )
    assert canonical_json(source) == expected


# --- the rules, one by one ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, b"null"),
        (True, b"true"),
        (False, b"false"),
        (0, b"0"),
        (-17, b"-17"),
        (MAX_SAFE_INTEGER, b"9007199254740991"),
        (-MAX_SAFE_INTEGER, b"-9007199254740991"),
        ("", b'""'),
        ([], b"[]"),
        ({}, b"{}"),
        ([1, True, None, "x"], b'[1,true,null,"x"]'),
        (
            {"b": 1, "a": {"d": [{"z": 1, "a": 2}], "c": None}},
            b'{"a":{"c":null,"d":[{"a":2,"z":1}]},"b":1}',
        ),
        ({"B": 1, "a": 2, "_": 3, "10": 4, "9": 5}, b'{"10":4,"9":5,"B":1,"_":3,"a":2}'),
        ("Grüße, 東京 😀", '"Grüße, 東京 😀"'.encode()),
        ("\u2028\u2029\x7f", '"\u2028\u2029\x7f"'.encode()),  # literal, as JSON.stringify
        ("\x00\x08\t\n\x0b\x0c\r\x1f", b'"\\u0000\\b\\t\\n\\u000b\\f\\r\\u001f"'),
        ('"\\/', b'"\\"\\\\/"'),
    ],
)
def test_canonical_forms(value: object, expected: bytes) -> None:
    assert canonical_json(value) == expected


def test_int_enum_is_written_as_its_number() -> None:
    class Level(enum.IntEnum):
        HIGH = 3

    assert canonical_json({"level": Level.HIGH}) == b'{"level":3}'


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (1.5, "float 1.5 is not allowed"),
        ({"t": 1.0}, "at $.t"),
        (
            {"a": [0, math.nan]},
            "float nan is not allowed; convert it to an integer (times to microseconds) at $.a[1]",
        ),
        ([math.inf], "at $[0]"),
        ({1: "x"}, "object keys must be strings, not int at $"),
        ({"ok": {None: 1}}, "object keys must be strings, not NoneType at $.ok"),
        (
            {"a b": (1, 2)},
            (
                "type tuple is not allowed (only objects with string keys, arrays, strings, "
                'integers, booleans and null) at $["a b"]'
            ),
        ),
        ([b"bytes"], "type bytes is not allowed"),
        ([{1, 2}], "type set is not allowed"),
        ({"n": MAX_SAFE_INTEGER + 1}, "integer outside"),
        ({"n": -MAX_SAFE_INTEGER - 1}, "integer outside"),
        (["\ud800"], "lone surrogate"),
        ({"\udfff": 1}, "lone surrogate"),
    ],
)
def test_refused_values(value: object, where: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        canonical_json(value)
    assert where in str(info.value)
    assert str(info.value).startswith("canonical JSON: ")


def test_depth_is_bounded_and_cycles_are_refused() -> None:
    deep: list[object] = []
    inner = deep
    for _ in range(MAX_DEPTH - 1):
        inner.append([])
        inner = inner[0]  # type: ignore[assignment]
    assert canonical_json(deep).startswith(b"[[")
    inner.append([])
    with pytest.raises(InvalidRequestError, match="deeper than"):
        canonical_json(deep)
    cycle: dict[str, object] = {}
    cycle["self"] = cycle
    with pytest.raises(InvalidRequestError, match="deeper than"):
        canonical_json(cycle)


# --- properties ---------------------------------------------------------------------------------

TEXT = st.characters(exclude_categories=("Cs",))  # any code point but a lone surrogate
BMP = st.characters(exclude_categories=("Cs",), max_codepoint=0xFFFF)


def json_values(key_characters: st.SearchStrategy[str]) -> st.SearchStrategy[object]:
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-MAX_SAFE_INTEGER, MAX_SAFE_INTEGER)
        | st.text(TEXT),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(key_characters, max_size=6), children, max_size=4)
        ),
        max_leaves=20,
    )


@settings(max_examples=200, deadline=None)
@given(json_values(TEXT))
def test_round_trip_and_idempotence(value: object) -> None:
    encoded = canonical_json(value)
    assert json.loads(encoded) == value
    assert canonical_json(json.loads(encoded)) == encoded
    assert b"\n" not in encoded  # one record per line, always


@settings(max_examples=200, deadline=None)
@given(json_values(BMP))
def test_matches_sorted_compact_json_when_keys_stay_in_the_bmp(value: object) -> None:
    """Below U+10000 UTF-16 order is code-point order, so Python's own encoder must agree."""
    expected = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert canonical_json(value) == expected.encode()


# --- the fast path (orjson) against the encoder -------------------------------------------------


def test_fast_path_escapes_every_code_point_as_the_encoder_does() -> None:
    characters = [chr(c) for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    for start in range(0, len(characters), 4096):
        chunk = characters[start : start + 4096]
        value = {"k": chunk, "s": "".join(chunk)}
        assert canonical_json(value) == _canonical_json(value)


@settings(max_examples=500, deadline=None)
@given(json_values(TEXT))
def test_fast_path_agrees_with_the_encoder(value: object) -> None:
    assert canonical_json(value) == _canonical_json(value)
    wrapped = {"record": value, "n": [value, {"\U0001f600": 1, "\ufb33": 2}]}
    assert canonical_json(wrapped) == _canonical_json(wrapped)


@pytest.mark.parametrize(
    "value",
    [
        {"a": 1.0},
        {"a": [2**53]},
        {"a": {"b": -(2**53)}},
        {1: "x"},
        {"a": "\ud800"},
        {"a": (1, 2)},
        {"a": IntFlagLike.ONE},
    ],
    ids=["float", "big-int", "small-int", "int-key", "surrogate", "tuple", "int-subclass"],
)
def test_values_the_fast_path_cannot_vouch_for_go_to_the_encoder(value: object) -> None:
    assert bytes_or_error(canonical_json, value) == bytes_or_error(_canonical_json, value)


def bytes_or_error(encode: Callable[[Any], bytes], value: object) -> bytes | str:
    """What an encoder gives for ``value``: its bytes, or the refusal's message."""
    try:
        return encode(value)
    except InvalidRequestError as exc:
        return str(exc)


# --- the record encoder: ASCII field names, values checked --------------------------------------

FIELD_NAMES = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=8)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(FIELD_NAMES, json_values(TEXT), max_size=6))
def test_record_encoder_agrees_with_the_encoder(fields: dict[str, object]) -> None:
    assert canonical_record(fields) == _canonical_json(fields)


@pytest.mark.parametrize(
    "value",
    [1.0, [2**53], {"b": -(2**53)}, {1: "x"}, "\ud800", (1, 2), IntFlagLike.ONE, {"\U0001f600": 1}],
    ids=[
        "float",
        "big-int",
        "small-int",
        "int-key",
        "surrogate",
        "tuple",
        "int-subclass",
        "astral",
    ],
)
def test_record_encoder_sends_what_it_cannot_vouch_for_to_the_encoder(value: object) -> None:
    fields = {"details": value, "status": 200}
    assert bytes_or_error(canonical_record, fields) == bytes_or_error(_canonical_json, fields)
