"""The SCEP enrolment flow, as dmcertinst runs it: caps → CA certs → CSR → PKCSReq → CertRep.

Used by `dmagent scep enroll|renew` and by the certinst job. One call is one transaction:
GetCACaps (which also picks the ServerURL / URL form that answers), GetCACert with the
CAThumbprint check *before any request is sent*, the CSR and the PKCSReq (or RenewalReq)
signed through the key handle, then the CertRep, fully checked. PENDING is polled with CertPoll
every RetryDelay minutes, RetryCount times; still PENDING after that is E_PENDING.

Key operations (signing, decrypting) block when the key lives in a TPM, so for such handles
they run in a worker thread (`asyncio.to_thread`); software keys are used inline because a
thread hop costs more than an RSA-2048 signature. The sleep function, the length of a minute
and the clock are injected so tests do not wait minutes.

One-shot commands run this same coroutine without an event loop: `enroll_inline` (blocking
HTTP transport, key operations inline, `agent.scep.inline.run_inline`).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from agent.config import ScepConfig
from agent.csr import CsrRequest, build_csr
from agent.scep import messages as msgs
from agent.scep.cacerts import CaCertificates, check_ca_thumbprint
from agent.scep.capabilities import (
    Algorithms,
    Capabilities,
    ContentCipher,
    choose_algorithms,
    parse_caps,
)
from agent.scep.client import EndpointMemo, ScepClient
from agent.scep.errors import ScepPendingError
from agent.scep.inline import blocking_sleep, run_inline
from keystores.base import HashAlg, KeyAlgorithm, KeyHandle

if TYPE_CHECKING:
    import httpx

    from agent.httpio import BlockingHttp
    from agent.scep.certificate import Certificate, CertificateLike

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[Any]]


@dataclass(frozen=True)
class EnrollOptions:
    """One enrolment's inputs, in Install-node terms."""

    server_url: str
    csr: CsrRequest
    ca_thumbprint: str = ""
    retry_delay_minutes: float = 5.0  # RetryDelay
    retry_count: int = 3  # RetryCount; 0 = do not poll
    caps_override: str | None = None  # use these capabilities instead of the server's
    cipher: ContentCipher | None = None  # force the request envelope cipher
    digest: HashAlg | None = None  # force the SignedData digest
    post: bool | None = None  # force POST (True) or GET (False)


@dataclass(frozen=True)
class EnrollResult:
    """What a successful enrolment produced (frozen: it is reported, never patched)."""

    certificate: Certificate  # `.to_x509()` for cryptography's object
    chain: tuple[Certificate, ...]
    ca: CaCertificates
    respondent_url: str
    transaction_id: str
    message_type: msgs.MessageType
    algorithms: Algorithms
    capabilities: Capabilities
    polls: int
    reply_digest: HashAlg
    timings: tuple[tuple[str, float], ...] = field(default=())

    def timings_ms(self) -> dict[str, float]:
        return {name: round(seconds * 1000, 2) for name, seconds in self.timings}


def _require_rsa(key: KeyHandle) -> None:
    if key.spec.algorithm is not KeyAlgorithm.RSA:
        from agent.diagnostics import HResult
        from agent.errors import LocalError

        raise LocalError("SCEP needs an RSA key: the CA encrypts its reply to our key "
                         "(RFC 8894 §3.2.2)", hresult=HResult.NTE_BAD_ALGID)


def is_blocking(handle: KeyHandle) -> bool:
    """TPM handles block on the TPM (a socket or /dev/tpmrm0 round trip per command)."""
    flag = getattr(handle, "blocking", None)
    if isinstance(flag, bool):
        return flag
    return type(handle).__module__.startswith("keystores.tpm")


async def _key_op(blocking: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    if blocking:
        import asyncio

        return await asyncio.to_thread(fn, *args, **kwargs)
    return fn(*args, **kwargs)


async def _asyncio_sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def _utcnow() -> datetime:
    return datetime.now(UTC)


class _Timer:
    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []
        self._t = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks.append((name, now - self._t))
        self._t = now


async def enroll(options: EnrollOptions, key: KeyHandle | Awaitable[KeyHandle], *,
                 config: ScepConfig | None = None,
                 http: httpx.AsyncClient | BlockingHttp | None = None,
                 sleep: Sleep = _asyncio_sleep, minute_seconds: float = 60.0,
                 now: Callable[[], datetime] = _utcnow,
                 renew_with: tuple[KeyHandle, CertificateLike] | None = None,
                 memo: EndpointMemo | None = None, offload: bool = True) -> EnrollResult:
    """Enrol `key` (already created in its key store) with the SCEP server(s) of `options`.

    `renew_with=(old_key, old_cert)` makes it a renewal: a RenewalReq signed with the
    existing certificate when the CA advertises Renewal, else a PKCSReq signed with it
    (RFC 8894 §3.3.1). The issued certificate must carry `key`'s public key. `http` and
    `memo` are shared by callers that run many enrollments (connection reuse, URL form).

    `key` may also be an awaitable of the handle (a key still being generated): GetCACaps and
    GetCACert need no key, so they run while it is made, and it is awaited only for the CSR.

    `offload=False` runs blocking key operations (TPM) in the calling thread: for a caller
    without an event loop (`enroll_inline`), where there is nothing else to keep running.
    """
    if not inspect.isawaitable(key):
        _require_rsa(key)
    timer = _Timer()
    async with ScepClient(options.server_url, config, http=http, memo=memo) as client:
        caps = await client.get_ca_caps()
        if options.caps_override is not None:
            caps = parse_caps(options.caps_override)
        timer.mark("getcacaps")
        ca = await client.get_ca_cert()
        check_ca_thumbprint(ca, options.ca_thumbprint, client.respondent_url)
        timer.mark("getcacert")
        algs = choose_algorithms(caps, cipher=options.cipher, digest=options.digest,
                                 post=options.post)
        if inspect.isawaitable(key):
            key = await key
            _require_rsa(key)
            timer.mark("key")
        blocking = offload and (
            is_blocking(key) or (renew_with is not None and is_blocking(renew_with[0])))
        csr_der = await _key_op(blocking, build_csr, options.csr, key)
        timer.mark("csr")
        if renew_with is None:
            signer_key = key
            request = await _key_op(blocking, msgs.pkcs_req, csr_der, handle=key,
                                    recipient=ca.encryption, algorithms=algs, now=now())
        else:
            signer_key, old_cert = renew_with
            mtype = (msgs.MessageType.RENEWAL_REQ if caps.renewal
                     else msgs.MessageType.PKCS_REQ)
            request = await _key_op(blocking, msgs.renewal_req, csr_der, old_handle=signer_key,
                                    old_cert=old_cert, recipient=ca.encryption,
                                    algorithms=algs, now=now(), message_type=mtype)
        timer.mark("request")
        first_type = request.message_type
        polls = 0
        while True:
            body = await client.pki_operation(request.der, post=algs.post)
            timer.mark("pkioperation" if polls == 0 else f"poll{polls}")
            rep = await _key_op(blocking, msgs.parse_cert_rep, body, request,
                                trusted=ca.signers, handle=signer_key,
                                expected_key=key.public_key())
            timer.mark("certrep" if polls == 0 else f"certrep{polls}")
            if rep.status is msgs.PkiStatus.SUCCESS:
                break
            if polls >= options.retry_count:
                raise ScepPendingError(
                    f"the SCEP server still has the request PENDING after {polls} poll(s) "
                    f"(transaction {request.transaction_id})",
                    transaction_id=request.transaction_id, polls=polls,
                    advice="approve the request on the CA, then run the enrolment again")
            await sleep(max(options.retry_delay_minutes, 0.0) * minute_seconds)
            polls += 1
            request = await _key_op(blocking, msgs.cert_poll, request, handle=signer_key,
                                    ca_cert=ca.ca, recipient=ca.encryption, now=now())
        assert rep.issued is not None
        return EnrollResult(
            certificate=rep.issued, chain=rep.chain, ca=ca,
            respondent_url=client.respondent_url, transaction_id=request.transaction_id,
            message_type=first_type,
            algorithms=algs, capabilities=caps, polls=polls, reply_digest=rep.digest_alg,
            timings=tuple(timer.marks))


def enroll_inline(options: EnrollOptions, key: KeyHandle | Awaitable[KeyHandle], *,
                  http: BlockingHttp, config: ScepConfig | None = None,
                  sleep: Sleep = blocking_sleep, **kwargs: Any) -> EnrollResult:
    """`enroll` for one-shot commands: no event loop, blocking HTTP, key operations inline.

    `key` may be `agent.scep.inline.Waiting(future)` for a key made in a worker thread meanwhile.
    """
    return run_inline(enroll(options, key, config=config, http=http, sleep=sleep,
                             offload=False, **kwargs))
