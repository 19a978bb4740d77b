"""Hostile replies: a real HTTP server on 127.0.0.1 in front of micromdm scepserver serves
crafted CertReps, made by re-signing the real ones with the CA's own key (so only the field
under test is wrong). Each must end in a precise error type + HRESULT, with no certificate
returned and nothing left behind in the key store but the key the caller made."""

from __future__ import annotations

import asyncio
import secrets
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from asn1crypto import cms as acms
from asn1crypto import core

from agent.config import ScepConfig
from agent.csr import CsrRequest
from agent.diagnostics import HResult
from agent.errors import DmAgentError, PeerError
from agent.scep import messages as m
from agent.scep.client import make_blocking_http
from agent.scep.enroll import EnrollOptions, enroll, enroll_inline
from agent.sealing import Sealer
from keystores.base import KeySpec
from keystores.software import SoftwareKeyStore
from tests.conftest import ScepServerInstance
from tests.scep_support import (
    CertAndKey,
    CryptoKeyHandle,
    Reply,
    ScepProxy,
    issue_from_csr,
    load_depot_ca,
    make_ca,
    make_cert_rep,
    parse_request,
    resign,
)

pytestmark = pytest.mark.scepserver
PLAIN = ScepConfig(windows_url_form=False)


@pytest.fixture
def proxy(scepserver: ScepServerInstance) -> Iterator[ScepProxy]:
    p = ScepProxy(scepserver.url).start()
    yield p
    p.stop()


@pytest.fixture
def ca(scepserver: ScepServerInstance) -> CertAndKey:
    return load_depot_ca(scepserver.depot)


@pytest.fixture
def store(tmp_path: Path) -> SoftwareKeyStore:
    return SoftwareKeyStore(tmp_path / "keys", Sealer(secrets.token_bytes(32)))


Enroll = Callable[..., DmAgentError]


@pytest.fixture(params=["asyncio", "inline"])
def inline(request: pytest.FixtureRequest) -> bool:
    """Each hostile reply is met by both drivers: asyncio + httpx (daemon, certinst) and no
    event loop + the blocking transport (`dmagent scep`); both must refuse it alike."""
    return bool(request.param == "inline")


@pytest.fixture
def refused(inline: bool) -> Enroll:
    def run(url: str, store: SoftwareKeyStore, config: ScepConfig = PLAIN) -> DmAgentError:
        key = store.create(KeySpec())
        options = EnrollOptions(url, CsrRequest(subject="CN=hostile-test", challenge="secret"))
        with pytest.raises(DmAgentError) as err:
            if inline:
                with make_blocking_http(config) as http:
                    enroll_inline(options, key, http=http, config=config)
            else:
                asyncio.run(enroll(options, key, config=config))
        assert store.list_ids() == [key.key_id]  # nothing else appeared; no certificate
        return err.value

    return run


def _flip_signature(real: bytes) -> bytes:
    info = acms.ContentInfo.load(real)
    sig = info["content"]["signer_infos"][0]["signature"].native
    bad = sig[:-1] + bytes([sig[-1] ^ 0x01])
    assert real.count(sig) == 1
    return real.replace(sig, bad)


def _real_attr_change(oid: str, value: core.Asn1Value | None,
                      ca: CertAndKey) -> Callable[[bytes, bytes], Reply]:
    return lambda request, real: Reply(resign(real, ca, changes={oid: value}))


CASES: list[tuple[str, Callable[[CertAndKey], Callable[[bytes, bytes], Reply]], type, int, str]]
CASES = [
    ("tampered signature", lambda ca: lambda req, real: Reply(_flip_signature(real)),
     PeerError, HResult.NTE_BAD_SIGNATURE, "does not verify"),
    ("wrong recipientNonce", lambda ca: _real_attr_change(
        m.OID_RECIPIENT_NONCE, core.OctetString(b"\xee" * 16), ca),
     PeerError, HResult.NTE_BAD_DATA, "recipientNonce eeee"),
    ("wrong transactionID", lambda ca: _real_attr_change(
        m.OID_TRANSACTION_ID, core.PrintableString("f" * 40), ca),
     PeerError, HResult.CRYPT_E_NO_MATCH, "is for transaction 'ffff"),
    ("wrong messageType", lambda ca: _real_attr_change(
        m.OID_MESSAGE_TYPE, core.PrintableString("19"), ca),
     PeerError, HResult.CRYPT_E_UNEXPECTED_MSG_TYPE, "messageType '19'"),
    ("missing pkiStatus", lambda ca: _real_attr_change(m.OID_PKI_STATUS, None, ca),
     PeerError, HResult.CRYPT_E_AUTH_ATTR_MISSING, "no pkiStatus"),
    ("signed by another CA", lambda ca: lambda req, real: Reply(resign(real, make_ca("Evil"))),
     PeerError, HResult.CRYPT_E_SIGNER_NOT_FOUND, "not one of the CA/RA certificates"),
    ("content swapped after signing", lambda ca: lambda req, real: Reply(
        _swap_content(real)), PeerError, HResult.CRYPT_E_HASH_VALUE, "messageDigest"),
    ("garbage DER", lambda ca: lambda req, real: Reply(secrets.token_bytes(600)),
     PeerError, None, ""),
    ("HTML instead of CMS", lambda ca: lambda req, real: Reply(
        b"<html><body>Internal error</body></html>", content_type="text/html"),
     PeerError, HResult.CRYPT_E_ASN1_BADTAG, "starts with '<html><body>Inte'"),
    ("truncated body", lambda ca: lambda req, real: Reply(real[: len(real) // 2]),
     PeerError, HResult.CRYPT_E_ASN1_EOD, "truncated"),
    ("connection cut mid-body", lambda ca: lambda req, real: Reply(
        real[: len(real) // 2], declared_length=len(real)),
     PeerError, HResult.WINHTTP_CONNECTION_ERROR, "bytes of the"),
    ("empty 200", lambda ca: lambda req, real: Reply(b""),
     PeerError, HResult.CRYPT_E_ASN1_EOD, "empty"),
]


def _swap_content(real: bytes) -> bytes:
    """Flip a byte of the encrypted content without re-signing: the digest no longer fits."""
    info = acms.ContentInfo.load(real)
    econtent = info["content"]["encap_content_info"]["content"].contents
    assert real.count(econtent) == 1
    return real.replace(econtent, econtent[:-1] + bytes([econtent[-1] ^ 0x01]))


@pytest.mark.parametrize(("name", "make", "etype", "hresult", "text"), CASES,
                         ids=[c[0] for c in CASES])
def test_hostile_reply(proxy: ScepProxy, ca: CertAndKey, store: SoftwareKeyStore, name: str,
                       make: Callable[[CertAndKey], Callable[[bytes, bytes], Reply]],
                       etype: type, hresult: int | None, text: str,
                       refused: Enroll) -> None:
    proxy.on_pki = make(ca)
    err = refused(proxy.url, store)
    assert type(err) is etype, err
    if hresult is None:  # random bytes: either tag or length is wrong, both are precise
        assert err.hresult in (HResult.CRYPT_E_ASN1_BADTAG, HResult.CRYPT_E_ASN1_EOD), err
    else:
        assert err.hresult == hresult, err.message
    assert text in err.message
    assert proxy.count("PKIOperation") == 1


def test_certificate_for_another_key(proxy: ScepProxy, ca: CertAndKey,
                                     store: SoftwareKeyStore,
                                     refused: Enroll) -> None:
    """A correctly signed, correctly encrypted CertRep whose certificate is for a key we do
    not hold: refused, never returned for installation."""
    stranger = CryptoKeyHandle.rsa().public_key()

    def other_key(request_der: bytes, real: bytes) -> Reply:
        req = parse_request(request_der, ca)
        cert = issue_from_csr(req.message_data, ca, public_key=stranger)
        return Reply(make_cert_rep(req, ca, certs=(cert, ca.cert)))

    proxy.on_pki = other_key
    err = refused(proxy.url, store)
    assert isinstance(err, PeerError)
    assert err.hresult == HResult.CRYPT_E_NOT_FOUND
    assert "no certificate for our public key" in err.message


def test_crafted_success_is_accepted(proxy: ScepProxy, ca: CertAndKey,
                                     store: SoftwareKeyStore) -> None:
    """Control: the same crafting machinery, honest, passes (so the failures above are
    caused by the one field each case breaks)."""
    def honest(request_der: bytes, real: bytes) -> Reply:
        assert parse_request(request_der, ca).message_type == 19
        return Reply(resign(real, ca))

    proxy.on_pki = honest
    key = store.create(KeySpec())
    result = asyncio.run(enroll(EnrollOptions(proxy.url, CsrRequest(subject="CN=ok",
                                                                    challenge="secret")),
                                key, config=PLAIN))
    assert result.certificate.to_x509().subject.rfc4514_string() == "CN=ok"


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "chunked"])
def test_100mb_body_refused_fast_with_bounded_memory(proxy: ScepProxy, store: SoftwareKeyStore,
                                                     announce: bool,
                                                     refused: Enroll) -> None:
    size = 100 * 1024 * 1024
    proxy.on_pki = lambda req, real: (Reply(b"\x30" * 1024, declared_length=size) if announce
                                      else Reply(chunked_total=size))
    limit = ScepConfig().max_response_bytes
    tracemalloc.start()
    try:
        started = time.perf_counter()
        err = refused(proxy.url, store)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(err, PeerError)
    assert err.hresult == HResult.ERROR_MESSAGE_EXCEEDS_MAX_SIZE
    assert f"the limit is {limit} bytes" in err.message
    assert ("announces 104857600 bytes" if announce else f"more than {limit}") in err.message
    assert elapsed < 5.0
    assert peak < 3 * limit  # never near 100 MB: the body is not buffered


def test_smaller_limit_from_config(proxy: ScepProxy, store: SoftwareKeyStore,
                                   refused: Enroll) -> None:
    proxy.on_pki = lambda req, real: Reply(real + b"\x00" * 5000)
    err = refused(proxy.url, store, ScepConfig(windows_url_form=False,
                                               max_response_bytes=4096))
    assert err.hresult == HResult.ERROR_MESSAGE_EXCEEDS_MAX_SIZE


def test_hostile_getcacert_stops_before_request(proxy: ScepProxy,
                                                store: SoftwareKeyStore,
                                                refused: Enroll) -> None:
    proxy.on_get = lambda op: (Reply(b"\x30\x82\x01\x00garbage", content_type=
                                     "application/x-x509-ca-cert") if op == "GetCACert"
                               else None)
    err = refused(proxy.url, store)
    assert isinstance(err, PeerError)
    assert err.hresult in (HResult.CRYPT_E_BAD_ENCODE, HResult.CRYPT_E_ASN1_EOD)
    assert proxy.count("PKIOperation") == 0
