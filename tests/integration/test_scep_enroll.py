"""Enrollment against micromdm scepserver (the real CA): key stores, methods, algorithms,
renewal, refusals, URL forms and fallbacks. Everything on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.config import ScepConfig
from agent.csr import CsrRequest
from agent.diagnostics import FailInfo, HResult
from agent.errors import PeerError, UnreachableError
from agent.scep.capabilities import ContentCipher
from agent.scep.certificate import as_certificate
from agent.scep.client import make_blocking_http
from agent.scep.enroll import EnrollOptions, EnrollResult, enroll, enroll_inline, is_blocking
from agent.scep.errors import ScepFailure
from agent.scep.messages import MessageType, public_key_der
from agent.sealing import Sealer
from keystores.base import HashAlg, KeyHandle, KeySpec
from keystores.software import SoftwareKeyStore
from tests.conftest import ScepServerInstance, free_port
from tests.scep_support import Reply, ScepProxy

pytestmark = pytest.mark.scepserver


@pytest.fixture
def software(tmp_path: Path) -> SoftwareKeyStore:
    return SoftwareKeyStore(tmp_path / "keys", Sealer(secrets.token_bytes(32)))


@pytest.fixture
def proxy(scepserver: ScepServerInstance) -> Iterator[ScepProxy]:
    p = ScepProxy(scepserver.url).start()
    yield p
    p.stop()


Runner = Callable[..., EnrollResult]


def _run_asyncio(options: EnrollOptions, key: KeyHandle, **kwargs: Any) -> EnrollResult:
    """As the daemon and certinst run it: an event loop, httpx."""
    return asyncio.run(enroll(options, key, **kwargs))


def _run_inline(options: EnrollOptions, key: KeyHandle, **kwargs: Any) -> EnrollResult:
    """As `dmagent scep` runs it: no event loop, the blocking transport, key ops inline."""
    with make_blocking_http(kwargs.get("config")) as http:
        return enroll_inline(options, key, http=http, **kwargs)


@pytest.fixture(params=["asyncio", "inline"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Every enrollment test runs both ways: the same flow must behave the same."""
    return _run_asyncio if request.param == "asyncio" else _run_inline


def _options(url: str, **kwargs: Any) -> EnrollOptions:
    csr = kwargs.pop("csr", None) or CsrRequest(
        subject="CN=dmagent-it, O=dmagent", subject_alt_names="3+it.example", key_usage=160,
        challenge=kwargs.pop("challenge", "secret"))
    return EnrollOptions(server_url=url, csr=csr, **kwargs)


def _check_issued(result: EnrollResult, key: KeyHandle, server: ScepServerInstance) -> None:
    cert = result.certificate.to_x509()
    assert public_key_der(cert.public_key()) == public_key_der(key.public_key())
    ca = x509.load_pem_x509_certificate(server.ca_cert_pem.read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == \
        "dmagent-it"
    assert result.ca.ca == as_certificate(ca)


def _pki_ops(server: ScepServerInstance) -> int:
    return server.log().count("op=PKIOperation")


@pytest.mark.parametrize("post", [True, False], ids=["POST", "GET"])
def test_enroll_software_key(scepserver: ScepServerInstance, software: SoftwareKeyStore,
                             post: bool, run: Runner) -> None:
    key = software.create(KeySpec())
    result = run(_options(scepserver.url, post=post,
                           ca_thumbprint=scepserver.ca_thumbprint.lower()), key)
    _check_issued(result, key, scepserver)
    assert result.algorithms.post is post
    # micromdm offers AES + SHA-256 (and SCEPStandard): the Windows choice
    assert (result.algorithms.cipher, result.algorithms.digest) == (ContentCipher.AES128,
                                                                    HashAlg.SHA256)
    assert result.reply_digest is HashAlg.SHA1  # micromdm 2.1.0 answers with SHA-1 anyway
    assert result.message_type is MessageType.PKCS_REQ and result.polls == 0
    assert result.respondent_url == scepserver.url  # /scep/pkiclient.exe 404 -> bare URL
    assert {name for name, _ in result.timings} >= {"getcacaps", "getcacert", "pkioperation"}


# "each cipher/digest the server offers", forced through the caps override (and explicitly
# for the ones a caps list cannot select)
ALGORITHMS = [
    ({"caps_override": "AES\nSHA-256\nPOSTPKIOperation"}, ContentCipher.AES128,
     HashAlg.SHA256),
    ({"caps_override": "AES\nSHA-1"}, ContentCipher.AES128, HashAlg.SHA1),
    ({"caps_override": "DES3\nSHA-256"}, ContentCipher.DES3, HashAlg.SHA256),
    ({"caps_override": "DES3\nSHA-1\nPOSTPKIOperation"}, ContentCipher.DES3, HashAlg.SHA1),
    ({"caps_override": ""}, ContentCipher.DES3, HashAlg.SHA1),  # nothing offered
    ({"cipher": ContentCipher.DES}, ContentCipher.DES, HashAlg.SHA256),
    ({"cipher": ContentCipher.AES256, "digest": HashAlg.SHA512}, ContentCipher.AES256,
     HashAlg.SHA512),
]


@pytest.mark.parametrize(("forced", "cipher", "digest"), ALGORITHMS,
                         ids=[f"{c.value}-{d.value}" for _, c, d in ALGORITHMS])
def test_enroll_each_algorithm(scepserver: ScepServerInstance, software: SoftwareKeyStore,
                               proxy: ScepProxy, forced: dict[str, Any], cipher: ContentCipher,
                               digest: HashAlg, run: Runner) -> None:
    from tests.scep_support import load_depot_ca, parse_request

    seen: list[Any] = []

    def record(request_der: bytes, real: bytes) -> Reply:
        seen.append(parse_request(request_der, load_depot_ca(scepserver.depot)))
        return Reply(real)

    proxy.on_pki = record
    key = software.create(KeySpec())
    result = run(_options(proxy.url, **forced), key,
                  config=ScepConfig(windows_url_form=False))
    _check_issued(result, key, scepserver)
    assert (result.algorithms.cipher, result.algorithms.digest) == (cipher, digest)
    # what went over the wire is what was chosen
    assert seen[0].digest_alg is digest
    assert seen[0].cipher == {"des-cbc": "des", "3des-cbc": "tripledes_3key",
                              "aes128-cbc": "aes128_cbc",
                              "aes256-cbc": "aes256_cbc"}[cipher.value]


@pytest.mark.swtpm
@pytest.mark.parametrize("post", [True, False], ids=["POST", "GET"])
def test_enroll_tpm_key(scepserver: ScepServerInstance, swtpm: Any, tmp_path: Path,
                        post: bool, run: Runner) -> None:
    from keystores.tpm import TpmKeyStore

    store = TpmKeyStore(swtpm.tcti, tmp_path / "tpm")
    key = store.create(KeySpec())
    assert is_blocking(key)  # its operations go through asyncio.to_thread
    result = run(_options(scepserver.url, post=post, ca_thumbprint=scepserver.ca_thumbprint),
                  key)
    _check_issued(result, key, scepserver)
    # the private key never left the TPM: a reloaded handle is the same key
    assert public_key_der(store.load(key.key_id).public_key()) == public_key_der(
        result.certificate.public_key())
    assert store.transient_handles() == 0  # every transient object flushed


@pytest.mark.parametrize("reuse_key", [False, True], ids=["new-key", "same-key"])
def test_renewal(scepserver: ScepServerInstance, software: SoftwareKeyStore,
                 reuse_key: bool, run: Runner) -> None:
    old_key = software.create(KeySpec())
    first = run(_options(scepserver.url), old_key)
    new_key = old_key if reuse_key else software.create(KeySpec())
    before = _pki_ops(scepserver)
    renewed = run(_options(scepserver.url), new_key,
                   renew_with=(old_key, first.certificate))
    assert renewed.message_type is MessageType.RENEWAL_REQ  # micromdm advertises Renewal
    _check_issued(renewed, new_key, scepserver)
    assert renewed.certificate.serial_number != first.certificate.serial_number
    assert _pki_ops(scepserver) == before + 1


def test_renewal_without_renewal_capability_sends_pkcsreq(
        scepserver: ScepServerInstance, software: SoftwareKeyStore, run: Runner) -> None:
    old_key = software.create(KeySpec())
    first = run(_options(scepserver.url), old_key)
    new_key = software.create(KeySpec())
    renewed = run(_options(scepserver.url, caps_override="AES\nSHA-256"), new_key,
                   renew_with=(old_key, first.certificate))
    assert renewed.message_type is MessageType.PKCS_REQ
    _check_issued(renewed, new_key, scepserver)


def test_wrong_challenge_is_a_clear_failure(scepserver: ScepServerInstance,
                                            software: SoftwareKeyStore, run: Runner) -> None:
    key = software.create(KeySpec())
    with pytest.raises(ScepFailure) as err:
        run(_options(scepserver.url, challenge="not-the-secret"), key)
    assert err.value.fail_info is FailInfo.BAD_REQUEST
    assert err.value.hresult == HResult.E_ACCESSDENIED
    assert "FAILURE, badRequest (2)" in err.value.message
    assert "challenge" in err.value.advice
    assert "not-the-secret" not in err.value.message


def test_wrong_ca_thumbprint_refused_before_any_request(
        scepserver: ScepServerInstance, software: SoftwareKeyStore, proxy: ScepProxy,
        run: Runner) -> None:
    key = software.create(KeySpec())
    before = _pki_ops(scepserver)
    wrong = "0C93E3B330AC0F3770CCED39CE5EDCBD23919305"
    with pytest.raises(PeerError) as err:
        run(_options(proxy.url, ca_thumbprint=wrong), key)
    assert err.value.hresult == HResult.CERT_E_UNTRUSTEDCA
    # the server named is the one that answered, with Windows' /pkiclient.exe (seed 001)
    assert (f"Failed to Initialize SCEP enrollment with NDES Server '{proxy.url}"
            "/pkiclient.exe', CA cert "
            f"thumbprint '{wrong}' and server certs '{scepserver.ca_thumbprint}'"
            ) == err.value.message
    assert proxy.count("PKIOperation") == 0  # the counting proxy saw none
    assert proxy.count("GetCACert") == 1
    assert _pki_ops(scepserver) == before  # and neither did the CA


def test_windows_wire_form(scepserver: ScepServerInstance, software: SoftwareKeyStore,
                           proxy: ScepProxy, run: Runner) -> None:
    """`<ServerURL>/pkiclient.exe?operation=...&message=default`, the NDES client UA."""
    key = software.create(KeySpec())
    cfg = ScepConfig()
    url = proxy.url.removesuffix("/scep") + "/certsrv/mscep/mscep.dll"
    result = run(_options(url), key, config=cfg)
    paths = [p for _, p, _ in proxy.requests]
    assert paths[0] == "/certsrv/mscep/mscep.dll/pkiclient.exe?operation=GetCACaps&message=default"
    assert paths[1] == "/certsrv/mscep/mscep.dll/pkiclient.exe?operation=GetCACert&message=default"
    assert paths[2] == "/certsrv/mscep/mscep.dll/pkiclient.exe?operation=PKIOperation"
    assert all(h.get("User-Agent") == cfg.user_agent for _, _, h in proxy.requests)
    assert cfg.user_agent.startswith("Mozilla/4.0 (compatible; Win32; NDES client 10.0.")
    assert result.respondent_url == url + "/pkiclient.exe"


def test_trailing_slash_gives_windows_double_slash(proxy: ScepProxy,
                                                   software: SoftwareKeyStore, run: Runner) -> None:
    key = software.create(KeySpec())
    result = run(_options(proxy.url + "/"), key)
    assert proxy.requests[0][1].startswith("/scep//pkiclient.exe?operation=GetCACaps")
    assert result.respondent_url == proxy.url + "//pkiclient.exe"


def test_get_pki_operation_is_base64_url_encoded(proxy: ScepProxy,
                                                 software: SoftwareKeyStore, run: Runner) -> None:
    import base64
    import urllib.parse

    key = software.create(KeySpec())
    run(_options(proxy.url, post=False), key, config=ScepConfig(windows_url_form=False))
    method, path, _ = next(r for r in proxy.requests if "PKIOperation" in r[1])
    assert method == "GET"
    raw = path.split("message=", 1)[1]
    assert "+" not in raw and "/" not in raw and "=" not in raw  # all percent-encoded
    der = base64.b64decode(urllib.parse.unquote(raw))
    assert der[0] == 0x30


def test_url_already_naming_pkiclient_is_used_as_is(scepserver: ScepServerInstance,
                                                    software: SoftwareKeyStore,
                                                    run: Runner) -> None:
    key = software.create(KeySpec())
    with pytest.raises(UnreachableError) as err:
        run(_options(scepserver.url + "/pkiclient.exe"), key)
    assert err.value.hresult == HResult.HTTP_E_STATUS_NOT_FOUND == 0x80190194


def test_plain_url_form(scepserver: ScepServerInstance, software: SoftwareKeyStore,
                        proxy: ScepProxy, run: Runner) -> None:
    key = software.create(KeySpec())
    result = run(_options(proxy.url), key, config=ScepConfig(windows_url_form=False))
    assert proxy.requests[0][1] == "/scep?operation=GetCACaps"
    assert result.respondent_url == proxy.url


def _server_error_proxy(scepserver: ScepServerInstance, status: int) -> ScepProxy:
    p = ScepProxy(scepserver.url)
    p.on_get = lambda op: Reply(b"broken", status, "text/plain")
    return p.start()


@pytest.mark.parametrize("status", [500, 503, 404])
def test_fallback_to_next_server_url(scepserver: ScepServerInstance,
                                     software: SoftwareKeyStore, status: int, run: Runner) -> None:
    bad = _server_error_proxy(scepserver, status)
    try:
        dead = f"http://127.0.0.1:{free_port()}/scep"
        key = software.create(KeySpec())
        result = run(_options(f"{dead};{bad.url}; {scepserver.url}"), key)
        assert result.respondent_url == scepserver.url
        _check_issued(result, key, scepserver)
    finally:
        bad.stop()


def test_no_fallback_on_403(scepserver: ScepServerInstance, software: SoftwareKeyStore,
                            run: Runner) -> None:
    forbidden = _server_error_proxy(scepserver, 403)
    try:
        with pytest.raises(UnreachableError) as err:
            run(_options(f"{forbidden.url};{scepserver.url}"), software.create(KeySpec()))
        assert err.value.hresult == HResult.HTTP_E_STATUS_FORBIDDEN
    finally:
        forbidden.stop()


@pytest.mark.parametrize(("status", "hresult"), [(500, 0x801901F4), (503, 0x801901F7),
                                                 (502, 0x801901F6), (413, 0x8019019D)])
def test_http_errors_become_windows_hresults(scepserver: ScepServerInstance,
                                             software: SoftwareKeyStore, status: int,
                                             hresult: int, run: Runner) -> None:
    bad = _server_error_proxy(scepserver, status)
    try:
        with pytest.raises(UnreachableError) as err:
            run(_options(bad.url), software.create(KeySpec()))
        assert err.value.hresult == hresult
        assert f"HTTP {status}" in err.value.message and "broken" in err.value.message
    finally:
        bad.stop()


def test_all_servers_unreachable(software: SoftwareKeyStore, run: Runner) -> None:
    urls = [f"http://127.0.0.1:{free_port()}/scep" for _ in range(2)]
    with pytest.raises(UnreachableError) as err:
        run(_options(";".join(urls)), software.create(KeySpec()))
    assert err.value.hresult == HResult.WINHTTP_CANNOT_CONNECT
    assert all(u in err.value.message for u in urls)


def test_timeout_is_winhttp_timeout(software: SoftwareKeyStore, run: Runner) -> None:
    import socket

    with socket.socket() as silent:  # accepts (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/scep"
        with pytest.raises(UnreachableError) as err:
            run(_options(url), software.create(KeySpec()),
                 config=dataclasses.replace(ScepConfig(), timeout=0.3))
    assert err.value.hresult == HResult.WINHTTP_TIMEOUT



def test_key_may_arrive_while_the_ca_is_asked(scepserver: ScepServerInstance,
                                              software: SoftwareKeyStore,
                                              proxy: ScepProxy) -> None:
    """enroll() accepts a key still being generated: GetCACaps/GetCACert go first."""
    seen_before_key: list[int] = []

    async def main() -> EnrollResult:
        async def slow_key() -> KeyHandle:
            await asyncio.sleep(0.05)
            seen_before_key.append(len(proxy.requests))
            return await asyncio.to_thread(software.create, KeySpec())

        return await enroll(_options(proxy.url), slow_key(),
                            config=ScepConfig(windows_url_form=False))

    result = asyncio.run(main())
    assert seen_before_key == [2]  # caps + cert were asked before the key was there
    assert [n for n, _ in result.timings][:3] == ["getcacaps", "getcacert", "key"]
    key = software.load(software.list_ids()[0])
    _check_issued(result, key, scepserver)


def test_key_may_arrive_while_the_ca_is_asked_without_a_loop(
        scepserver: ScepServerInstance, software: SoftwareKeyStore, proxy: ScepProxy) -> None:
    """The one-shot way: the key is made in a worker thread, awaited through `Waiting`."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from agent.scep.inline import Waiting

    asked = threading.Event()

    def slow_key() -> KeyHandle:
        assert asked.wait(10)  # made only once GetCACert was answered
        return software.create(KeySpec())

    proxy.on_get = lambda op: asked.set() if op == "GetCACert" else None
    with ThreadPoolExecutor(max_workers=1) as pool, make_blocking_http() as http:
        pending = pool.submit(slow_key)
        result = enroll_inline(_options(proxy.url), Waiting(pending), http=http,
                               config=ScepConfig(windows_url_form=False))
    assert [n for n, _ in result.timings][:3] == ["getcacaps", "getcacert", "key"]
    _check_issued(result, pending.result(), scepserver)


def test_endpoint_memo_skips_the_probe_next_time(software: SoftwareKeyStore,
                                                 proxy: ScepProxy) -> None:
    from agent.scep.client import EndpointMemo, make_http_client

    proxy.bare_only = True  # like micromdm: /scep/pkiclient.exe is a 404
    memo = EndpointMemo()

    async def one() -> EnrollResult:
        async with make_http_client() as http:
            return await enroll(_options(proxy.url), software.create(KeySpec()), http=http,
                                memo=memo)

    def probes() -> int:
        return sum("pkiclient.exe" in path for _, path, _ in proxy.requests)

    first = asyncio.run(one())
    assert probes() == 1 and first.respondent_url == proxy.url
    second = asyncio.run(one())
    assert probes() == 1  # no second probe: the memo knew the bare URL answers
    assert second.respondent_url == proxy.url
    without = asyncio.run(enroll(_options(proxy.url), software.create(KeySpec())))
    assert probes() == 2 and without.respondent_url == proxy.url
