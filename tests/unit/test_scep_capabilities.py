"""GetCACaps parsing and algorithm choice (RFC 8894 §3.5), table-driven."""

from __future__ import annotations

import pytest

from agent.scep.capabilities import Cap, ContentCipher, choose_algorithms, parse_caps
from keystores.base import HashAlg

MICROMDM = b"Renewal\nSHA-1\nSHA-256\nAES\nDES3\nSCEPStandard\nPOSTPKIOperation\n"


@pytest.mark.parametrize(("body", "keywords", "unknown"), [
    (MICROMDM, ("Renewal", "SHA-1", "SHA-256", "AES", "DES3", "SCEPStandard",
                "POSTPKIOperation"), ()),
    (b"aes\r\npostpkioperation\r\nsha-512\r\n", ("AES", "POSTPKIOperation", "SHA-512"), ()),
    (b"  DES3  \n\n\nGetNextCACert\nFoo-Bar\n", ("DES3", "GetNextCACert"), ("Foo-Bar",)),
    (b"", (), ()),
    (b"AES\nAES\naes", ("AES",), ()),
    ("Renewal\nUpdate", ("Renewal", "Update"), ()),
    (b"<html>\xff\xfe</html>", (), ()),  # HTML error page: not printable, ignored
])
def test_parse_caps(body: bytes | str, keywords: tuple[str, ...],
                    unknown: tuple[str, ...]) -> None:
    caps = parse_caps(body)
    assert caps.keywords == keywords
    assert caps.unknown == unknown


@pytest.mark.parametrize(("body", "cipher", "digest", "post"), [
    # the Windows preference: AES-128 + SHA-256 whenever offered
    (MICROMDM, ContentCipher.AES128, HashAlg.SHA256, True),
    (b"SCEPStandard", ContentCipher.AES128, HashAlg.SHA256, True),  # implies all three
    (b"AES\nSHA-1", ContentCipher.AES128, HashAlg.SHA1, False),
    (b"DES3\nSHA-256\nSHA-1", ContentCipher.DES3, HashAlg.SHA256, False),
    (b"DES3\nSHA-1\nPOSTPKIOperation", ContentCipher.DES3, HashAlg.SHA1, True),
    (b"SHA-512\nAES", ContentCipher.AES128, HashAlg.SHA512, False),
    (b"SHA-512\nSHA-256", ContentCipher.DES3, HashAlg.SHA256, False),
    # nothing offered: 3DES / SHA-1 (single DES only when forced)
    (b"", ContentCipher.DES3, HashAlg.SHA1, False),
    (b"Renewal", ContentCipher.DES3, HashAlg.SHA1, False),
])
def test_choice(body: bytes, cipher: ContentCipher, digest: HashAlg, post: bool) -> None:
    algs = choose_algorithms(parse_caps(body))
    assert (algs.cipher, algs.digest, algs.post) == (cipher, digest, post)


def test_forced_choices_win() -> None:
    algs = choose_algorithms(parse_caps(MICROMDM), cipher=ContentCipher.DES,
                             digest=HashAlg.SHA512, post=False)
    assert (algs.cipher, algs.digest, algs.post) == (ContentCipher.DES, HashAlg.SHA512, False)
    assert algs.as_dict() == {"cipher": "des-cbc", "digest": "sha512", "method": "GET"}


@pytest.mark.parametrize(("body", "renewal"), [(MICROMDM, True), (b"AES", False),
                                               (b"renewal", True)])
def test_renewal_flag(body: bytes, renewal: bool) -> None:
    assert parse_caps(body).renewal is renewal
    assert parse_caps(body).has(Cap.RENEWAL) is renewal


@pytest.mark.parametrize(("cipher", "key", "block"), [
    (ContentCipher.DES, 8, 8), (ContentCipher.DES3, 24, 8), (ContentCipher.AES128, 16, 16),
    (ContentCipher.AES192, 24, 16), (ContentCipher.AES256, 32, 16)])
def test_cipher_sizes(cipher: ContentCipher, key: int, block: int) -> None:
    assert (cipher.key_size, cipher.block_size) == (key, block)
