"""Registry value types: what each REG_* type accepts, and how SQLite stores it.

Split from `agent.registry` (the store) so the typing rules read on their own: REG_DWORD and
REG_QWORD take signed or unsigned input and keep the unsigned value, REG_MULTI_SZ is a tuple of
non-empty strings, REG_BINARY bytes; a refused write raises LocalError naming the type.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from agent.errors import LocalError


class RegType(enum.IntEnum):
    """Value types, numbered as in winnt.h."""

    REG_NONE = 0
    REG_SZ = 1
    REG_EXPAND_SZ = 2
    REG_BINARY = 3
    REG_DWORD = 4
    REG_MULTI_SZ = 7
    REG_QWORD = 11


RegData = str | int | bytes | tuple[str, ...]


@dataclass(frozen=True)
class RegValue:
    name: str  # "" is the key's default value
    type: RegType
    data: RegData


_INT_RANGE = {RegType.REG_DWORD: 0xFFFFFFFF, RegType.REG_QWORD: 0xFFFFFFFFFFFFFFFF}


SZ: Final = RegType.REG_SZ
STRINGS: Final = frozenset({RegType.REG_SZ, RegType.REG_EXPAND_SZ})
CONVERTED: Final = frozenset({RegType.REG_MULTI_SZ, RegType.REG_QWORD})  # see decode_data


def encode(type_: RegType, data: RegData) -> str | int | bytes:
    """Validate data against its type and return what SQLite stores."""
    if type(type_) is not RegType:
        type_ = RegType(type_)
    if type_ in STRINGS:
        if not isinstance(data, str):
            raise LocalError(f"{type_.name} needs a string, got {type(data).__name__}")
        return data
    if type_ in _INT_RANGE:
        if not isinstance(data, int) or isinstance(data, bool):
            raise LocalError(f"{type_.name} needs an integer, got {type(data).__name__}")
        limit = _INT_RANGE[type_]
        if not -(limit // 2 + 1) <= data <= limit:
            raise LocalError(f"{data} does not fit in {type_.name}")
        data &= limit  # negative (signed) input is stored as its two's complement
        if type_ is RegType.REG_QWORD and data >= 2**63:
            return data - 2**64  # SQLite integers are signed 64-bit; decode_data undoes this
        return data
    if type_ in (RegType.REG_BINARY, RegType.REG_NONE):
        if not isinstance(data, bytes | bytearray):
            raise LocalError(f"{type_.name} needs bytes, got {type(data).__name__}")
        return bytes(data)
    if type_ is RegType.REG_MULTI_SZ:
        if isinstance(data, str) or not isinstance(data, tuple | list):
            raise LocalError("REG_MULTI_SZ needs a sequence of strings")
        if not all(isinstance(s, str) and s and "\0" not in s for s in data):
            raise LocalError("REG_MULTI_SZ entries must be non-empty strings without NUL")
        return "\0".join(data)
    raise LocalError(f"unsupported value type {type_!r}")


Row = tuple[str, RegType, str | int | bytes]  # (name, type, data as SQLite stores it)
Table = dict[str, dict[str, RegData]]  # what subkey_values() answers
TYPES: Final = {int(t): t for t in RegType}


def decode_data(type_: RegType, raw: str | int | bytes) -> RegData:
    if type_ is RegType.REG_MULTI_SZ:
        assert isinstance(raw, str)
        return tuple(raw.split("\0")) if raw else ()
    if type_ is RegType.REG_QWORD:
        assert isinstance(raw, int)
        return raw & 0xFFFFFFFFFFFFFFFF
    return raw


def decode_row(row: Row) -> RegValue:
    return RegValue(row[0], row[1], decode_data(row[1], row[2]))
