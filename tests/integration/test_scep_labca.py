"""Enrollment against the lab SCEP CA (lab.scepca) for what micromdm cannot do: an NDES-like
server (separate RA signing/encryption certificates, 3DES/SHA-1, mscep.dll path) and PENDING
replies polled with CertPoll every RetryDelay, RetryCount times."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.csr import CsrRequest
from agent.diagnostics import HResult
from agent.scep.capabilities import ContentCipher
from agent.scep.certificate import as_certificate
from agent.scep.enroll import EnrollOptions, enroll
from agent.scep.errors import ScepPendingError
from agent.scep.messages import public_key_der
from agent.sealing import Sealer
from keystores.base import HashAlg, KeySpec
from keystores.software import SoftwareKeyStore


@pytest.fixture
def store(tmp_path: Path) -> SoftwareKeyStore:
    return SoftwareKeyStore(tmp_path / "keys", Sealer(secrets.token_bytes(32)))


class FakeSleep:
    """Records the delays instead of waiting them."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def _options(url: str, **kwargs: Any) -> EnrollOptions:
    return EnrollOptions(url, CsrRequest(subject="CN=lab-device", key_usage=160,
                                         challenge="secret"), **kwargs)


def test_ndes_mode_uses_the_ra_pair(lab_scep_ca: Callable[..., Any],
                                    store: SoftwareKeyStore) -> None:
    ca = lab_scep_ca(mode="ndes")
    key = store.create(KeySpec())
    result = asyncio.run(enroll(_options(ca.url, ca_thumbprint=ca.thumbprint), key))
    assert result.respondent_url == ca.url + "/pkiclient.exe"  # NDES answers the Windows form
    assert result.ca.has_ra
    assert result.ca.encryption != result.ca.signers[0]  # split RA certificates
    assert result.ca.ca == as_certificate(ca.ca_cert)
    # NDES offers DES3/SHA-1 only: the client falls back to them
    assert (result.algorithms.cipher, result.algorithms.digest) == (ContentCipher.DES3,
                                                                    HashAlg.SHA1)
    assert public_key_der(result.certificate.public_key()) == public_key_der(key.public_key())


def test_pending_then_issued_after_polls(lab_scep_ca: Callable[..., Any],
                                         store: SoftwareKeyStore) -> None:
    ca = lab_scep_ca(pending="polls:2")
    sleep = FakeSleep()
    key = store.create(KeySpec())
    result = asyncio.run(enroll(_options(ca.url, retry_delay_minutes=5, retry_count=3), key,
                                sleep=sleep, minute_seconds=0.001))
    assert result.polls == 2
    assert sleep.calls == [pytest.approx(0.005)] * 2  # RetryDelay 5 "minutes" of 1 ms
    assert public_key_der(result.certificate.public_key()) == public_key_der(key.public_key())
    names = [n for n, _ in result.timings]
    assert names.count("poll1") == 1 and names.count("poll2") == 1


def test_still_pending_after_retry_count(lab_scep_ca: Callable[..., Any],
                                         store: SoftwareKeyStore) -> None:
    ca = lab_scep_ca(pending="manual")
    sleep = FakeSleep()
    with pytest.raises(ScepPendingError) as err:
        asyncio.run(enroll(_options(ca.url, retry_delay_minutes=1, retry_count=2),
                           store.create(KeySpec()), sleep=sleep, minute_seconds=0.0))
    assert err.value.hresult == HResult.E_PENDING
    assert err.value.polls == 2 and len(sleep.calls) == 2
    assert err.value.transaction_id in err.value.message


def test_retry_count_zero_means_no_polling(lab_scep_ca: Callable[..., Any],
                                           store: SoftwareKeyStore) -> None:
    ca = lab_scep_ca(pending="manual")
    sleep = FakeSleep()
    with pytest.raises(ScepPendingError) as err:
        asyncio.run(enroll(_options(ca.url, retry_count=0), store.create(KeySpec()),
                           sleep=sleep))
    assert err.value.polls == 0 and sleep.calls == []


def test_approved_while_polling(lab_scep_ca: Callable[..., Any],
                                store: SoftwareKeyStore) -> None:
    """The operator approves between two polls: the next CertPoll gets the certificate."""
    ca = lab_scep_ca(pending="manual")

    async def approve_then_wait(_: float) -> None:
        for row in ca.requests():
            if row.status == "pending":
                ca.approve(row.transaction_id)

    key = store.create(KeySpec())
    result = asyncio.run(enroll(_options(ca.url, retry_count=3), key,
                                sleep=approve_then_wait))
    assert result.polls == 1


def test_pending_polled_without_an_event_loop(lab_scep_ca: Callable[..., Any],
                                              store: SoftwareKeyStore) -> None:
    """`dmagent scep enroll` polls PENDING on the blocking transport, sleeping in its thread."""
    from agent.scep.client import make_blocking_http
    from agent.scep.enroll import enroll_inline

    ca = lab_scep_ca(pending="polls:2")
    key = store.create(KeySpec())
    with make_blocking_http() as http:
        result = enroll_inline(_options(ca.url, retry_delay_minutes=1, retry_count=3), key,
                               http=http, minute_seconds=0.02)
    assert result.polls == 2
    waited = dict(result.timings)
    assert waited["poll1"] >= 0.02 and waited["poll2"] >= 0.02  # RetryDelay really slept
    assert public_key_der(result.certificate.public_key()) == public_key_der(key.public_key())
