"""Render registry content the way Windows tools do: `reg query` text and `.reg` export files."""

from __future__ import annotations

from collections.abc import Iterable

from agent.registry import ROOT_LONG_NAMES, RegType, RegValue


def long_path(canon: str) -> str:
    """`HKLM\\Software` → `HKEY_LOCAL_MACHINE\\Software`."""
    root, sep, rest = canon.partition("\\")
    return ROOT_LONG_NAMES.get(root, root) + sep + rest


def query_data_text(value: RegValue) -> str:
    """The data column of `reg query`."""
    t, d = value.type, value.data
    if t in (RegType.REG_DWORD, RegType.REG_QWORD):
        assert isinstance(d, int)
        return f"0x{d:x}"
    if t in (RegType.REG_BINARY, RegType.REG_NONE):
        assert isinstance(d, bytes)
        return d.hex().upper()
    if t is RegType.REG_MULTI_SZ:
        assert isinstance(d, tuple)
        return "\\0".join(d)
    return str(d)


def format_query(blocks: Iterable[tuple[str, list[RegValue]]],
                 subkeys: Iterable[str] = ()) -> str:
    """`reg query` output: per key a blank line, the full key path, its values indented by four
    spaces (name, type, data separated by four spaces); then, without /s, the subkey paths."""
    lines: list[str] = []
    for key, values in blocks:
        lines += ["", long_path(key)]
        for v in values:
            lines.append(f"    {v.name or '(Default)'}    {v.type.name}    {query_data_text(v)}")
    sub = [long_path(s) for s in subkeys]
    if sub:
        lines.append("")
        lines += sub
    lines.append("")
    return "\n".join(lines) + "\n"


def format_reg_file(blocks: Iterable[tuple[str, list[RegValue]]]) -> str:
    """A `Windows Registry Editor Version 5.00` file, as `reg export` writes it."""
    out = ["Windows Registry Editor Version 5.00", ""]
    for key, values in blocks:
        out.append(f"[{long_path(key)}]")
        out += [_reg_file_line(v) for v in values]
        out.append("")
    return "\r\n".join(out) + "\r\n"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _reg_file_line(v: RegValue) -> str:
    name = "@" if v.name == "" else _quote(v.name)
    t, d = v.type, v.data
    if t is RegType.REG_SZ:
        assert isinstance(d, str)
        return f"{name}={_quote(d)}"
    if t is RegType.REG_DWORD:
        assert isinstance(d, int)
        return f"{name}=dword:{d:08x}"
    if t is RegType.REG_BINARY:
        assert isinstance(d, bytes)
        return _hex_line(name, "hex", d)
    if t is RegType.REG_QWORD:
        assert isinstance(d, int)
        return _hex_line(name, "hex(b)", d.to_bytes(8, "little"))
    if t is RegType.REG_EXPAND_SZ:
        assert isinstance(d, str)
        return _hex_line(name, "hex(2)", (d + "\0").encode("utf-16-le"))
    if t is RegType.REG_MULTI_SZ:
        assert isinstance(d, tuple)
        raw = "".join(s + "\0" for s in d) + "\0"
        return _hex_line(name, "hex(7)", raw.encode("utf-16-le"))
    assert isinstance(d, bytes)
    return _hex_line(name, "hex(0)", d)


def _hex_line(name: str, tag: str, data: bytes) -> str:
    """regedit wraps hex data at 80 columns with `,\\` and two-space continuation lines."""
    prefix = f"{name}={tag}:"
    pieces = [f"{b:02x}" for b in data]
    lines: list[str] = []
    current = prefix
    for i, piece in enumerate(pieces):
        token = piece + ("," if i < len(pieces) - 1 else "")
        if len(current) + len(token) > 78 and current.strip():
            lines.append(current + "\\")
            current = "  "
        current += token
    lines.append(current)
    return "\r\n".join(lines)
