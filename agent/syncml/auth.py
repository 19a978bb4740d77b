"""SyncML client credentials: `syncml:auth-basic` and `syncml:auth-md5` (OMA-TS-DM_Security §5).

basic: Data = b64("name:secret").
md5:   Data = b64(md5(b64(md5("name:secret")) + ":" + nonce)), where nonce is the *binary*
       nonce: the base64-decoded NextNonce of the server's last Chal (MS-MDM §1.3.1: "the MD5
       binary nonce is sent over XML in B64-encoded format, but the octal form of the binary
       data is used when the server calculates the hash").
Both go in the SyncHdr's <Cred> with Meta Format b64 and Type naming the scheme.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
from dataclasses import dataclass, field

from agent.syncml.messages import Cred, Meta


class AuthScheme(enum.StrEnum):
    BASIC = "syncml:auth-basic"
    MD5 = "syncml:auth-md5"


@dataclass(frozen=True)
class Credentials:
    """What the client authenticates with; `secret` never appears in repr or logs."""

    username: str
    secret: str = field(repr=False)
    scheme: AuthScheme = AuthScheme.MD5


def md5_digest(username: str, secret: str, nonce: bytes) -> str:
    # MD5 is what the protocol specifies; usedforsecurity=False keeps FIPS builds working.
    inner = base64.b64encode(
        hashlib.md5(f"{username}:{secret}".encode(), usedforsecurity=False).digest())
    outer = hashlib.md5(inner + b":" + nonce, usedforsecurity=False).digest()
    return base64.b64encode(outer).decode("ascii")


def basic_digest(username: str, secret: str) -> str:
    return base64.b64encode(f"{username}:{secret}".encode()).decode("ascii")


def decode_nonce(next_nonce: str) -> bytes | None:
    """The binary nonce of a NextNonce, or None when it is not base64."""
    try:
        return base64.b64decode(next_nonce.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None


def make_cred(creds: Credentials, scheme: AuthScheme, nonce: bytes | None) -> Cred | None:
    """The <Cred> for `scheme`, or None when md5 has no nonce yet (wait for the Chal)."""
    if scheme is AuthScheme.BASIC:
        data = basic_digest(creds.username, creds.secret)
    elif nonce is None:
        return None
    else:
        data = md5_digest(creds.username, creds.secret, nonce)
    return Cred(Meta(format="b64", type=scheme.value), data)


def scheme_of(type_: str | None) -> AuthScheme | None:
    """The scheme a Chal's Meta/Type asks for (case-insensitive, as servers vary)."""
    wanted = (type_ or "").strip().lower()
    for scheme in AuthScheme:
        if scheme.value == wanted:
            return scheme
    return None
