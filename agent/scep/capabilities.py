"""GetCACaps parsing and the choice of algorithms (RFC 8894 §3.5.2), sans-IO.

The CA lists one capability per line; keywords are case-insensitive and unknown keywords must
be ignored (§3.5.2). From them we pick the content cipher for the request envelope, the digest
for the SignedData, and whether PKIOperation goes by POST. Windows' NDES client prefers
AES + SHA-256 when the CA offers them and falls back to 3DES / SHA-1 only when it must.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from keystores.base import HashAlg


class Cap(enum.StrEnum):
    """The capability keywords of RFC 8894 §3.5.2 (plus the obsolete ones servers still send)."""

    AES = "AES"
    DES3 = "DES3"
    GET_NEXT_CA_CERT = "GetNextCACert"
    POST_PKI_OPERATION = "POSTPKIOperation"
    RENEWAL = "Renewal"
    SHA1 = "SHA-1"
    SHA256 = "SHA-256"
    SHA512 = "SHA-512"
    SCEP_STANDARD = "SCEPStandard"
    UPDATE = "Update"


class ContentCipher(enum.StrEnum):
    """Content-encryption algorithms for EnvelopedData; values name them in output."""

    DES = "des-cbc"
    DES3 = "3des-cbc"
    AES128 = "aes128-cbc"
    AES192 = "aes192-cbc"
    AES256 = "aes256-cbc"

    @property
    def key_size(self) -> int:
        return _KEY_SIZES[self]

    @property
    def block_size(self) -> int:
        return 8 if self in (ContentCipher.DES, ContentCipher.DES3) else 16


_KEY_SIZES = {ContentCipher.DES: 8, ContentCipher.DES3: 24, ContentCipher.AES128: 16,
              ContentCipher.AES192: 24, ContentCipher.AES256: 32}


@dataclass(frozen=True)
class Capabilities:
    """What the CA advertised (canonical keyword spelling, in the order sent)."""

    keywords: tuple[str, ...] = ()
    unknown: tuple[str, ...] = ()  # lines we did not recognise (kept for diagnostics)

    def has(self, cap: Cap) -> bool:
        return cap.value in self.keywords

    @property
    def scep_standard(self) -> bool:
        return self.has(Cap.SCEP_STANDARD)

    @property
    def aes(self) -> bool:
        # §3.5.2: SCEPStandard means AES, POSTPKIOperation and SHA-256 are all supported.
        return self.has(Cap.AES) or self.scep_standard

    @property
    def des3(self) -> bool:
        return self.has(Cap.DES3)

    @property
    def sha256(self) -> bool:
        return self.has(Cap.SHA256) or self.scep_standard

    @property
    def sha512(self) -> bool:
        return self.has(Cap.SHA512)

    @property
    def sha1(self) -> bool:
        return self.has(Cap.SHA1)

    @property
    def post(self) -> bool:
        return self.has(Cap.POST_PKI_OPERATION) or self.scep_standard

    @property
    def renewal(self) -> bool:
        return self.has(Cap.RENEWAL)

    def as_text(self) -> str:
        return "\n".join(self.keywords + self.unknown)


_BY_LOWER = {c.value.lower(): c.value for c in Cap}
_KEYWORD = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # what a capability looks like


def parse_caps(body: bytes | str) -> Capabilities:
    """Parse a GetCACaps body: one keyword per line (LF or CRLF), case-insensitive.

    Non-text bodies are tolerated (a CA answering GetCACaps with HTML is "no capabilities"),
    because §3.5.1 lets a client fall back to defaults when the CA says nothing useful.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    known: list[str] = []
    unknown: list[str] = []
    for raw in text.replace("\r", "\n").split("\n"):
        word = raw.strip()
        if not word:
            continue
        canonical = _BY_LOWER.get(word.lower())
        if canonical is None:
            if len(word) <= 64 and _KEYWORD.match(word):
                unknown.append(word)
        elif canonical not in known:
            known.append(canonical)
    return Capabilities(tuple(known), tuple(unknown))


@dataclass(frozen=True)
class Algorithms:
    """What one enrollment uses: request envelope cipher, SignedData digest, HTTP method."""

    cipher: ContentCipher
    digest: HashAlg
    post: bool

    def as_dict(self) -> dict[str, str]:
        return {"cipher": self.cipher.value, "digest": self.digest.value,
                "method": "POST" if self.post else "GET"}


def choose_algorithms(caps: Capabilities, *, cipher: ContentCipher | None = None,
                      digest: HashAlg | None = None, post: bool | None = None) -> Algorithms:
    """Pick the strongest algorithms the CA offers; explicit arguments force a choice.

    Cipher: AES-128 when AES (or SCEPStandard) is offered, else 3DES. A CA offering neither
    gets 3DES too: §3.5.2 makes single DES the legacy default, but it is broken, and every CA
    still deployed decrypts 3DES; single DES is used only when forced.
    Digest: SHA-256 when offered, else SHA-512, else SHA-1 (the legacy default, §3.5.2).
    Method: POST when POSTPKIOperation (or SCEPStandard) is offered, else GET.
    """
    if cipher is None:
        cipher = ContentCipher.AES128 if caps.aes else ContentCipher.DES3
    if digest is None:
        if caps.sha256:
            digest = HashAlg.SHA256
        elif caps.sha512:
            digest = HashAlg.SHA512
        else:
            digest = HashAlg.SHA1
    if post is None:
        post = caps.post
    return Algorithms(cipher, digest, post)
