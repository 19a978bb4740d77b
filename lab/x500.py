"""X.500 name strings as Windows writes them (CertStrToName / CertNameToStr, CERT_X500_NAME_STR).

The SCEP profile's SubjectName travels as such a string (`CN=host,OU=Devices,O="Lab, Inc."`).
The lab needs it three ways: to expand `{{variables}}` inside values without breaking the syntax,
to render the string the device receives (with Windows quoting: a value holding a separator,
quote or leading/trailing space is wrapped in double quotes, inner quotes doubled), and to know
which (OID, value) pairs the CSR must carry.

Syntax accepted (wincrypt.h, CERT_NAME_STR_* flags): RDNs separated by `,` or `;` (or a newline),
multi-valued RDNs joined with `+`, `KEY=value`, KEY a known abbreviation (case-insensitive) or a
dotted OID (optionally `OID.` prefixed), values optionally quoted with `"` (`""` for a quote).
"""

from __future__ import annotations

from dataclasses import dataclass

# Attribute keys CertStrToName knows (the X500 set), with their OIDs.
KEY_OIDS: dict[str, str] = {
    "CN": "2.5.4.3",
    "SN": "2.5.4.4",  # surname
    "SERIALNUMBER": "2.5.4.5",
    "C": "2.5.4.6",
    "L": "2.5.4.7",
    "S": "2.5.4.8",
    "ST": "2.5.4.8",
    "STREET": "2.5.4.9",
    "O": "2.5.4.10",
    "OU": "2.5.4.11",
    "T": "2.5.4.12",
    "TITLE": "2.5.4.12",
    "DESCRIPTION": "2.5.4.13",
    "POSTALCODE": "2.5.4.17",
    "G": "2.5.4.42",
    "GN": "2.5.4.42",
    "GIVENNAME": "2.5.4.42",
    "I": "2.5.4.43",
    "INITIALS": "2.5.4.43",
    "E": "1.2.840.113549.1.9.1",
    "EMAIL": "1.2.840.113549.1.9.1",
    "DC": "0.9.2342.19200300.100.1.25",
    "UID": "0.9.2342.19200300.100.1.1",
    "UNSTRUCTUREDNAME": "1.2.840.113549.1.9.2",
    "UNSTRUCTUREDADDRESS": "1.2.840.113549.1.9.8",
}

# The key CertNameToStr prints for an OID (first spelling wins).
OID_KEYS: dict[str, str] = {}
for _k, _o in KEY_OIDS.items():
    OID_KEYS.setdefault(_o, _k)
OID_KEYS["2.5.4.8"] = "S"

_SPECIAL = set(',+="\n<>#;')


class X500Error(ValueError):
    """The string is not a valid X.500 name string."""


@dataclass(frozen=True)
class Attr:
    key: str  # as written (upper-cased abbreviation, or the dotted OID)
    oid: str
    value: str


Rdn = tuple[Attr, ...]


def key_oid(key: str) -> str:
    k = key.strip()
    upper = k.upper()
    if upper in KEY_OIDS:
        return KEY_OIDS[upper]
    if upper.startswith("OID."):
        k = k[4:]
    parts = k.split(".")
    if len(parts) >= 2 and all(p.isdigit() for p in parts):
        return k
    raise X500Error(f"unknown attribute {key!r} in the subject name "
                    f"(use one of {', '.join(sorted(KEY_OIDS))} or a dotted OID)")


def parse(text: str) -> tuple[Rdn, ...]:
    """Parse a name string into RDNs, in the order written."""
    rdns: list[Rdn] = []
    current: list[Attr] = []
    i, n = 0, len(text)
    if not text.strip():
        return ()
    while True:
        # key
        eq = text.find("=", i)
        if eq < 0:
            raise X500Error(f"missing '=' after {text[i:].strip()!r} in the subject name")
        key = text[i:eq].strip()
        if not key:
            raise X500Error(f"empty attribute name at offset {i} in the subject name")
        oid = key_oid(key)
        j = eq + 1
        while j < n and text[j] in " \t":
            j += 1
        if j < n and text[j] == '"':
            j += 1
            buf: list[str] = []
            while True:
                if j >= n:
                    raise X500Error("unterminated quoted value in the subject name")
                if text[j] == '"':
                    if j + 1 < n and text[j + 1] == '"':
                        buf.append('"')
                        j += 2
                        continue
                    j += 1
                    break
                buf.append(text[j])
                j += 1
            value = "".join(buf)
            while j < n and text[j] in " \t":
                j += 1
        else:
            start = j
            while j < n and text[j] not in ",;+\n":
                j += 1
            value = text[start:j].strip()
        current.append(Attr(key.upper() if not key[0].isdigit() else key, oid, value))
        if j >= n:
            rdns.append(tuple(current))
            return tuple(rdns)
        sep = text[j]
        if sep not in ",;+\n":
            raise X500Error(f"unexpected {sep!r} after a quoted value in the subject name")
        if sep != "+":
            rdns.append(tuple(current))
            current = []
        i = j + 1
        if i >= n or not text[i:].strip():
            raise X500Error("the subject name ends with a separator")


def quote_value(value: str) -> str:
    """Quote like CertNameToStr: only when the value needs it."""
    if value == "" or any(c in _SPECIAL for c in value) or value != value.strip():
        return '"' + value.replace('"', '""') + '"'
    return value


def render(rdns: tuple[Rdn, ...], separator: str = ",") -> str:
    return separator.join("+".join(f"{a.key}={quote_value(a.value)}" for a in rdn)
                          for rdn in rdns)


def pairs(rdns: tuple[Rdn, ...]) -> list[tuple[str, str]]:
    """(OID, value) pairs, flattened in order."""
    return [(a.oid, a.value) for rdn in rdns for a in rdn]
