"""Canonical JSON for audit records: one byte string per value, so a hash commits to the value.

The output is RFC 8785 (JCS) for the subset of JSON an audit record needs: objects with string
keys, arrays, strings, integers, booleans and null. Keys are sorted by UTF-16 code units (as
JCS requires; Python's own ``sorted`` orders code points and differs once a key holds a
character beyond U+FFFF), there is no whitespace, and text is UTF-8 with only the escapes
ECMAScript's ``JSON.stringify`` makes.

Floats are refused rather than formatted: JCS's number format is easy to get subtly wrong, and
an audit record has no use for one (the caller turns times into integer microseconds). Integers
are limited to what an IEEE 754 double holds exactly, so every JCS implementation reads the
same number back. Anything refused raises ``InvalidRequestError`` naming where it was found.

The service encodes every audit record on its hot path, so values where orjson's sorted output
is provably the same bytes (containers of exactly dict and list, ASCII keys, whose order is the
same in UTF-8 and UTF-16, exact str, bool, None and safe int scalars, nesting within the bound)
take that route; anything else goes through the encoder below. Both are tested against each
other over every code point and random values.
"""

from __future__ import annotations

from json.encoder import encode_basestring
from typing import Any

import orjson

from kms.errors import InvalidRequestError

MAX_SAFE_INTEGER = 2**53 - 1
MAX_DEPTH = 64

_ALLOWED = "only objects with string keys, arrays, strings, integers, booleans and null"


class _RejectedError(Exception):
    """Unwinds to ``canonical_json``, collecting the path to the refused value on the way."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []


def canonical_json(value: object) -> bytes:
    if (type(value) is dict or type(value) is list) and _plain(value, 0):
        try:
            return orjson.dumps(value, option=_ORJSON_OPTIONS)
        except orjson.JSONEncodeError:
            pass  # an integer beyond 2**53 or a lone surrogate: the encoder below says which
    return _canonical_json(value)


def canonical_record(fields: dict[str, Any]) -> bytes:
    """``canonical_json`` of an object whose keys the caller guarantees are ASCII strings.

    An audit record's top-level keys are its field names, so only its values need checking:
    this is the hot path's encoder (about half the cost of the general check).
    """
    for item in fields.values():
        kind = type(item)
        if kind in _PLAIN_SCALARS or ((kind is dict or kind is list) and _plain(item, 1)):
            continue
        return canonical_json(fields)
    try:
        return orjson.dumps(fields, option=_ORJSON_OPTIONS)
    except orjson.JSONEncodeError:
        return canonical_json(fields)  # an integer beyond 2**53 or a lone surrogate


# Sorted keys, and integers within ±(2**53 - 1) (orjson refuses others, as this module does).
_ORJSON_OPTIONS = orjson.OPT_SORT_KEYS | orjson.OPT_STRICT_INTEGER
_PLAIN_SCALARS = frozenset({str, int, bool, type(None)})


def _plain(container: dict[Any, Any] | list[Any], depth: int) -> bool:
    """Whether orjson with ``_ORJSON_OPTIONS`` writes the canonical bytes of ``container``.

    Exact types only (a subclass may serialise differently). Conservative: ``False`` only means
    the slower encoder decides.
    """
    if depth >= MAX_DEPTH:
        return False
    if type(container) is dict:
        if not _ascii_keys(container):
            return False
        items: Any = container.values()
    else:
        items = container
    for item in items:
        kind = type(item)
        if kind in _PLAIN_SCALARS:
            continue
        if (kind is not dict and kind is not list) or not _plain(item, depth + 1):
            return False
    return True


def _ascii_keys(obj: dict[Any, Any]) -> bool:
    """ASCII keys sort the same by UTF-8 bytes (orjson) and by UTF-16 code units (JCS)."""
    try:
        return "".join(obj).isascii()
    except TypeError:  # a key that is not a string
        return False


def _canonical_json(value: object) -> bytes:
    parts: list[str] = []
    try:
        _encode(value, parts, 0)
    except _RejectedError as exc:
        where = "$" + "".join(reversed(exc.path))
        raise InvalidRequestError(f"canonical JSON: {exc.problem} at {where}") from None
    try:
        return "".join(parts).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(
            "canonical JSON: strings must be valid Unicode (found a lone surrogate)"
        ) from None


def _encode(value: object, parts: list[str], depth: int) -> None:
    # bool first: it is a subclass of int.
    if value is None:
        parts.append("null")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif isinstance(value, str):
        parts.append(_quote(value))
    elif isinstance(value, int):
        parts.append(_integer(value))
    elif isinstance(value, float):
        raise _RejectedError(
            f"float {value!r} is not allowed; convert it to an integer (times to microseconds)"
        )
    elif isinstance(value, dict):
        _check_depth(depth)
        _object(value, parts, depth + 1)
    elif isinstance(value, list):
        _check_depth(depth)
        _array(value, parts, depth + 1)
    else:
        raise _RejectedError(f"type {type(value).__name__} is not allowed ({_ALLOWED})")


def _object(obj: dict[Any, Any], parts: list[str], depth: int) -> None:
    for key in obj:
        if not isinstance(key, str):
            raise _RejectedError(f"object keys must be strings, not {type(key).__name__}")
    parts.append("{")
    for n, key in enumerate(sorted(obj, key=_utf16_order)):
        if n:
            parts.append(",")
        parts.append(_quote(key))
        parts.append(":")
        try:
            _encode(obj[key], parts, depth)
        except _RejectedError as exc:
            exc.path.append(f".{key}" if key.isidentifier() else f"[{_quote(key)}]")
            raise
    parts.append("}")


def _array(items: list[Any], parts: list[str], depth: int) -> None:
    parts.append("[")
    for n, item in enumerate(items):
        if n:
            parts.append(",")
        try:
            _encode(item, parts, depth)
        except _RejectedError as exc:
            exc.path.append(f"[{n}]")
            raise
    parts.append("]")


def _check_depth(depth: int) -> None:
    """A bound, so a deep (or self-containing) value is refused instead of overflowing the stack."""
    if depth >= MAX_DEPTH:
        raise _RejectedError(f"nesting is deeper than {MAX_DEPTH} levels")


def _integer(value: int) -> str:
    if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        raise _RejectedError("integer outside ±(2**53 - 1), the range JSON numbers hold exactly")
    return int.__repr__(value)  # plain digits, also for int subclasses such as IntEnum


def _quote(text: str) -> str:
    """JCS string: ``"`` and ``\\`` escaped, controls as ``\\b\\t\\n\\f\\r`` or ``\\u00xx``.

    Python's encoder with ``ensure_ascii=False`` makes exactly these escapes, in lowercase hex;
    this is the function it calls, without building an encoder object for every string.
    """
    return encode_basestring(text)


def _utf16_order(key: str) -> bytes:
    # Big-endian UTF-16 bytes compare as the sequence of code units does.
    return key.encode("utf-16-be", "surrogatepass")
