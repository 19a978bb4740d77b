"""The lab CA's HTTP surface with a plain HTTP client: routes and NDES URL behaviour, content
types, GET message encoding, body limits, and the token-protected control endpoint."""

from __future__ import annotations

import base64
import urllib.parse
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest
from cryptography import x509

from agent.csr import CsrRequest, build_csr
from agent.scep import messages as m
from agent.scep.cacerts import parse_ca_certs
from agent.scep.capabilities import Algorithms, ContentCipher
from agent.scep.certificate import as_certificate
from keystores.base import HashAlg
from lab.scepca.db import Status
from lab.scepca.testing import LabScepCA
from tests.scep_support import CryptoKeyHandle

CaFactory = Callable[..., LabScepCA]
DES3_SHA1 = Algorithms(ContentCipher.DES3, HashAlg.SHA1, False)


@pytest.fixture(scope="module")
def key() -> CryptoKeyHandle:
    return CryptoKeyHandle.rsa()


def _get(url: str, **kw: object) -> httpx.Response:
    return httpx.get(url, timeout=5, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("path", "status"), [
    ("/certsrv/mscep/mscep.dll", 403),
    ("/certsrv/mscep/mscep.dll/", 403),
    ("/certsrv/mscep/mscep.dll/pkiclient.exe", 403),
    ("/CertSrv/MSCEP/mscep.dll", 403),  # IIS paths are case-insensitive
    ("/certsrv/mscep/mscep.dll?operation=GetCACaps", 200),
    ("/certsrv/mscep/mscep.dll//pkiclient.exe?operation=GetCACaps&message=default", 200),
    ("/certsrv/mscep/mscep.dll/pkiclient.exe?operation=Bogus", 400),
    ("/certsrv/mscep_admin/", 404),
    ("/scep?operation=GetCACaps", 404),
])
def test_ndes_routes(lab_scep_ca: CaFactory, path: str, status: int) -> None:
    """Seed 001's checklist: 'SCEP URL not giving the expected 403' — the bare URL is 403."""
    ca = lab_scep_ca(mode="ndes")
    resp = _get(ca.base_url + path)
    assert resp.status_code == status
    if status == 403:
        assert "403" in resp.text and resp.headers["content-type"] == "text/html"
    if status == 200:
        assert resp.text.split() == ["POSTPKIOperation", "Renewal", "SHA-1", "DES3"]


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/scep", 400),
    ("GET", "/scep/pkiclient.exe?operation=GetCACaps", 200),
    ("POST", "/scep?operation=GetCACaps", 405),
    ("PUT", "/scep?operation=PKIOperation", 405),
    ("GET", "/scep?operation=PKIOperation&message=%%%", 400),
    ("GET", "/scep?operation=PKIOperation&message=AAAA", 400),  # base64, but no pkiMessage
    ("GET", "/other", 404),
])
def test_normal_routes(lab_scep_ca: CaFactory, method: str, path: str, status: int) -> None:
    ca = lab_scep_ca()
    assert httpx.request(method, ca.base_url + path, timeout=5).status_code == status


@pytest.mark.parametrize(("mode", "ctype", "count"), [
    ("normal", "application/x-x509-ca-cert", 1),
    ("ndes", "application/x-x509-ca-ra-cert", 3),
])
def test_getcacert(lab_scep_ca: CaFactory, mode: str, ctype: str, count: int) -> None:
    ca = lab_scep_ca(mode=mode)
    resp = _get(ca.url + "?operation=GetCACert&message=default")
    assert resp.headers["content-type"] == ctype
    certs = parse_ca_certs(resp.content, ctype)
    assert len(certs.certificates) == count and certs.ca == as_certificate(ca.ca_cert)
    assert ca.thumbprint in certs.thumbprints
    if mode == "ndes":
        assert certs.signers[0] == as_certificate(ca.ca.ra_sign.cert)
        assert certs.encryption == as_certificate(ca.ca.ra_enc.cert)


def _pkcs_req(ca: LabScepCA, key: CryptoKeyHandle, recipient: x509.Certificate,
              challenge: str = "secret") -> m.PendingRequest:
    csr = build_csr(CsrRequest(subject="CN=http-device", challenge=challenge), key)
    return m.pkcs_req(csr, handle=key, recipient=recipient, algorithms=DES3_SHA1,
                      now=datetime.now(UTC))


@pytest.mark.parametrize("encoding", ["percent-encoded", "raw-plus", "urlsafe"])
def test_pkioperation_get_message_encodings(lab_scep_ca: CaFactory, key: CryptoKeyHandle,
                                            encoding: str) -> None:
    """Clients differ in how they put base64 in the query: %2B, a raw '+', or base64url."""
    ca = lab_scep_ca(mode="ndes")
    req = _pkcs_req(ca, key, ca.ca.ra_enc.cert)
    b64 = base64.b64encode(req.der).decode()
    if encoding == "percent-encoded":
        message = urllib.parse.quote(b64, safe="")
    elif encoding == "raw-plus":
        message = b64.replace("/", "%2F").replace("=", "%3D")  # '+' left as is
    else:
        message = base64.urlsafe_b64encode(req.der).decode().rstrip("=")
    assert "+" in b64  # the case worth testing (a DER message of this size has one)
    resp = httpx.get(f"{ca.url}/pkiclient.exe?operation=PKIOperation&message={message}",
                     timeout=5)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/x-pki-message"
    rep = m.parse_cert_rep(resp.content, req, trusted=[ca.ca.ra_sign.cert], handle=key,
                           expected_key=key.public_key())
    assert rep.status is m.PkiStatus.SUCCESS


def test_pkioperation_post_base64_body_and_size_limit(lab_scep_ca: CaFactory,
                                                      key: CryptoKeyHandle) -> None:
    ca = lab_scep_ca(max_body=64 * 1024)
    req = _pkcs_req(ca, key, ca.ca_cert)
    resp = httpx.post(ca.url + "?operation=PKIOperation", timeout=5,
                      content=base64.b64encode(req.der))
    assert resp.status_code == 200
    m.parse_cert_rep(resp.content, req, trusted=[ca.ca_cert], handle=key)
    big = httpx.post(ca.url + "?operation=PKIOperation", timeout=5,
                     content=b"\x30" + b"\x00" * (65 * 1024))
    assert big.status_code == 413


# --- control endpoint -------------------------------------------------------------------------

def _ctl(ca: LabScepCA, method: str, path: str, token: str | None = None,
         **kw: object) -> httpx.Response:
    given = ca.token if token is None else token
    headers = {"Authorization": f"Bearer {given}"} if given else {}
    return httpx.request(method, f"{ca.base_url}/lab-ca/{path}", headers=headers,
                         timeout=5, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("token", ["", "wrong"])
def test_control_needs_the_token(lab_scep_ca: CaFactory, token: str) -> None:
    ca = lab_scep_ca()
    assert _ctl(ca, "GET", "faults", token=token).status_code == 401
    assert _ctl(ca, "POST", "faults", token=token, json={"spec": "500"}).status_code == 401
    assert httpx.get(f"{ca.base_url}/lab-ca/faults", timeout=5,
                     headers={"X-Lab-Token": ca.token}).status_code == 200
    assert ca.app.faults.rules() == []


def test_control_faults_at_run_time(lab_scep_ca: CaFactory) -> None:
    ca = lab_scep_ca()
    caps = ca.url + "?operation=GetCACaps"
    added = _ctl(ca, "POST", "faults", json={"spec": "503@GetCACaps:count=1"}).json()["added"]
    assert added[0]["spec"] == "503@GetCACaps:count=1"
    assert _get(caps).status_code == 503
    assert _get(caps).status_code == 200  # count=1 used up
    rules = _ctl(ca, "GET", "faults").json()["rules"]
    assert [(r["id"], r["hits"]) for r in rules] == [(added[0]["id"], 1)]
    resp = _ctl(ca, "POST", "faults", json={"rules": [
        {"kind": "status", "status": 500, "op": "GetCACert"},
        "content-type@GetCACaps:value=application/octet-stream"], "replace": True})
    assert resp.status_code == 200 and len(_ctl(ca, "GET", "faults").json()["rules"]) == 2
    assert _get(ca.url + "?operation=GetCACert").status_code == 500
    assert _get(caps).headers["content-type"] == "application/octet-stream"
    rule_id = _ctl(ca, "GET", "faults").json()["rules"][0]["id"]
    assert _ctl(ca, "DELETE", f"faults/{rule_id}").json() == {"removed": rule_id}
    assert _ctl(ca, "DELETE", f"faults/{rule_id}").status_code == 404
    assert _ctl(ca, "DELETE", "faults").json() == {"rules": []}
    assert _get(ca.url + "?operation=GetCACert").status_code == 200
    bad = _ctl(ca, "POST", "faults", json={"spec": "418@Nowhere"})
    assert bad.status_code == 400 and "unknown operation" in bad.json()["error"]


def test_control_status_requests_and_approval(lab_scep_ca: CaFactory,
                                              key: CryptoKeyHandle) -> None:
    ca = lab_scep_ca(pending="manual")
    req = _pkcs_req(ca, key, ca.ca_cert)
    resp = httpx.post(ca.url + "?operation=PKIOperation", content=req.der, timeout=5)
    assert m.parse_cert_rep(resp.content, req, trusted=[ca.ca_cert],
                            handle=key).status is m.PkiStatus.PENDING
    status = _ctl(ca, "GET", "status").json()
    assert status["mode"] == "normal" and status["pending"] == "manual"
    assert status["thumbprint"] == ca.thumbprint and status["stats"]["PKCSReq 200"] == 1
    (row,) = _ctl(ca, "GET", "requests").json()["requests"]
    assert row["status"] == "pending" and row["transaction_id"] == req.transaction_id
    approved = _ctl(ca, "POST", f"approve/{req.transaction_id}").json()
    assert approved["approved"] is True
    again = _ctl(ca, "POST", f"approve/{req.transaction_id}")
    assert again.status_code == 200  # still pending (approved) until the next poll
    assert _ctl(ca, "POST", "approve/nope").status_code == 404
    assert ca.db.get(req.transaction_id) is not None
    rejected = _ctl(ca, "POST", f"reject/{req.transaction_id}", json={"reason": "policy"})
    assert rejected.json()["status"] == Status.REJECTED.value


def test_timeout_fault_is_released_on_stop(lab_scep_ca: CaFactory) -> None:
    """A hung request never keeps the server (or the test session) alive."""
    import threading
    import time

    ca = lab_scep_ca(faults=["timeout@GetCACaps"])
    outcome: list[str] = []

    def call() -> None:
        try:
            _get(ca.url + "?operation=GetCACaps")
            outcome.append("answered")
        except httpx.HTTPError as exc:
            outcome.append(type(exc).__name__)

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.3)
    started = time.monotonic()
    ca.stop()
    thread.join(10)
    assert time.monotonic() - started < 5 and outcome
