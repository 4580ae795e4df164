"""JSON without floats: numbers are read as ``int``/``Decimal`` and written back exactly.

The standard library can read decimals (``parse_float=Decimal``) but cannot write them,
so ``dumps`` is a small encoder that writes a ``Decimal`` as the exact JSON number it is.
"""

from __future__ import annotations

import json
from decimal import Decimal
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# One decoder for every call: json.loads with keyword arguments builds a new one (and its
# scanner) each time, which on the server's hot paths costs as much as the parse itself.
_DECODER = json.JSONDecoder(parse_float=Decimal, parse_constant=_reject_constant)


class JsonNumber:
    """A number read by ``loads_unconverted``, as its text."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


# Numbers are never converted, so no size of number is refused (Python's int stops at 4300 digits).
_UNCONVERTED = json.JSONDecoder(
    parse_int=JsonNumber, parse_float=JsonNumber, parse_constant=_reject_constant
)


def loads_unconverted(text: str) -> Any:
    """Parse JSON to learn its shape, for text that goes on as it is: numbers are ``JsonNumber``;
    NaN and Infinity are rejected."""
    return _UNCONVERTED.decode(text)


def loads(text: str | bytes) -> Any:
    """Parse JSON; fractional numbers become ``Decimal``; NaN and Infinity are rejected."""
    if isinstance(text, bytes | bytearray | memoryview):
        data = bytes(text)
        text = data.decode(json.detect_encoding(data), "surrogatepass")
    return _DECODER.decode(text)


def dumps(value: Any, indent: int | None = None) -> str:
    """Serialise to JSON text; ``Decimal`` is written as an exact number, never a float."""
    if indent is None:
        return _compact(value)
    parts: list[str] = []
    _encode(value, parts, indent, 0)
    return "".join(parts)


def _compact(value: Any) -> str:
    """One-line JSON, built with joins (the backfill serialises every row through this)."""
    kind = type(value)
    if kind is str:
        return encode_basestring(value)  # type: ignore[no-any-return]
    if kind is dict:
        return (
            "{"
            + ", ".join(encode_basestring(_key(k)) + ": " + _compact(v) for k, v in value.items())
            + "}"
        )
    if kind is list or kind is tuple:
        return "[" + ", ".join(map(_compact, value)) + "]"
    if value is None or value is True or value is False:
        return _CONSTANTS[value]
    if kind is int:
        return int.__repr__(value)
    parts: list[str] = []
    _encode(value, parts, None, 0)
    return "".join(parts)


def _key(key: Any) -> str:
    if not isinstance(key, str):
        raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
    return key


_CONSTANTS = {None: "null", True: "true", False: "false"}


def _encode(value: Any, out: list[str], indent: int | None, level: int) -> None:
    if isinstance(value, str):
        out.append(encode_basestring(value))
    elif value is None or value is True or value is False:
        out.append(_CONSTANTS[value])
    elif isinstance(value, int):
        out.append(int.__repr__(value))
    elif isinstance(value, Decimal):
        if not value.is_finite():
            raise ValueError(f"{value} cannot be written as JSON")
        out.append(str(value))
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, not {type(key).__name__}")
            if i:
                out.append(",")
            _newline(out, indent, level + 1)
            out.append(encode_basestring(key))
            out.append(": ")
            _encode(item, out, indent, level + 1)
        _newline(out, indent, level)
        out.append("}")
    elif isinstance(value, list | tuple):
        if not value:
            out.append("[]")
            return
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _newline(out, indent, level + 1)
            _encode(item, out, indent, level + 1)
        _newline(out, indent, level)
        out.append("]")
    else:
        # float lands here on purpose: amounts never travel as binary floating point.
        raise TypeError(f"{type(value).__name__} is not written as JSON here")


def _newline(out: list[str], indent: int | None, level: int) -> None:
    if indent is None:
        if out[-1] == ",":
            out.append(" ")
        return
    out.append("\n" + " " * (indent * level))
