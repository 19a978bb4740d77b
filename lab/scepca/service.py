"""The CA's decisions: what to answer each SCEP operation, and what to record.

Synchronous and transport-free (the ASGI shell runs it in a worker thread): a PKIOperation
body in, a `Reply` out. Between them: the message checks of `protocol`, the clock check
(badTime), the algorithm policy (badAlg when GetCACaps did not offer what the client used),
the challenge policy (the pluggable verifier, like the NDES policy module's VerifyRequest),
renewal authentication by a certificate this CA issued, PENDING with manual or timed
approval, issuance, the database, and the Notify hook (CRS records).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from agent.diagnostics import FailInfo, HResult
from agent.errors import DmAgentError
from agent.scep.capabilities import ContentCipher
from agent.scep.messages import MessageType, PkiStatus
from lab.scepca import protocol as proto
from lab.scepca.ca import CertificateAuthority, IssuePlan, random_serial, sha1_thumbprint
from lab.scepca.config import CAConfig, Mode, PendingKind
from lab.scepca.csrinfo import CsrError, CsrInfo, cert_names, parse_csr
from lab.scepca.db import CADatabase, RequestRow, SerialCollision, Status, serial_hex
from lab.scepca.notify import CrsDirectoryNotifier, CrsRecord, parse_challenge
from lab.scepca.policy import VerifyContext

log = logging.getLogger("lab.scepca")

# CERT_*_KEY_USAGE bits (wincrypt.h), as Install/KeyUsage and templates carry them.
_KU_BITS = {"digital_signature": 0x80, "content_commitment": 0x40, "key_encipherment": 0x20,
            "data_encipherment": 0x10, "key_agreement": 0x08, "key_cert_sign": 0x04,
            "crl_sign": 0x02, "encipher_only": 0x01, "decipher_only": 0x8000}


def key_usage_from_bits(bits: int) -> x509.KeyUsage:
    flags = {name: bool(bits & bit) for name, bit in _KU_BITS.items()}
    if not flags["key_agreement"]:
        flags["encipher_only"] = flags["decipher_only"] = False
    return x509.KeyUsage(**flags)


def spki_hash(key: PublicKeyTypes) -> str:
    der = key.public_bytes(serialization.Encoding.DER,
                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True)
class Reply:
    """One HTTP answer plus what it was, for logs, stats and fault routing."""

    status_code: int
    content_type: str
    body: bytes
    operation: str = ""
    transaction_id: str = ""
    pki_status: PkiStatus | None = None
    fail_info: FailInfo | None = None
    text: str = ""


class _Refuse(Exception):
    def __init__(self, fail_info: FailInfo, text: str) -> None:
        super().__init__(text)
        self.fail_info = fail_info
        self.text = text


class ScepService:
    def __init__(self, ca: CertificateAuthority, db: CADatabase, config: CAConfig, *,
                 clock: Callable[[], datetime] | None = None,
                 rand: Callable[[int], bytes] = os.urandom) -> None:
        self.ca = ca
        self.db = db
        self.config = config
        self._clock = clock or (lambda: datetime.now(UTC))
        self._rand = rand
        self._notifiers: list[Callable[[CrsRecord], None]] = []
        if config.notifier is not None:
            self._notifiers.append(config.notifier)
        if config.crs_dir:
            self._notifiers.append(CrsDirectoryNotifier(Path(config.crs_dir)))

    # --- roles ------------------------------------------------------------------------------

    def now(self) -> datetime:
        return self._clock() + timedelta(seconds=self.config.clock_offset)

    @property
    def ndes(self) -> bool:
        return self.config.mode is Mode.NDES

    @property
    def signer(self) -> proto.ReplySigner:
        pair = self.ca.ra_sign if self.ndes else self.ca.ca
        return proto.ReplySigner(pair.cert, pair.handle)

    @property
    def decrypters(self) -> list[proto.Decrypter]:
        pair = self.ca.ra_enc if self.ndes else self.ca.ca
        return [(pair.cert, pair.handle)]

    # --- GET operations ---------------------------------------------------------------------

    def get_ca_caps(self) -> Reply:
        return Reply(200, "text/plain", proto.caps_reply(self.config.effective_caps),
                     "GetCACaps")

    def get_ca_cert(self) -> Reply:
        ra = [self.ca.ra_sign.cert, self.ca.ra_enc.cert] if self.ndes else []
        ctype, body = proto.ca_cert_reply(self.ca.cert, ra)
        return Reply(200, ctype, body, "GetCACert")

    # --- PKIOperation -----------------------------------------------------------------------

    def pki_operation(self, body: bytes) -> Reply:
        try:
            req = proto.parse_pki_message(body, self.decrypters)
        except proto.MalformedRequest as exc:
            log.info("PKIOperation: malformed request: %s", exc)
            return Reply(400, "text/plain", f"bad SCEP request: {exc}\n".encode(),
                         "PKIOperation", text=str(exc))
        except proto.RequestRefused as exc:
            self._record_refusal(exc.header, exc.fail_info, exc.text, None)
            return self._failure(exc.header, exc.fail_info, exc.text)
        header = req.header
        try:
            self._check_time_and_algorithms(req)
            mtype = req.message_type
            if mtype in (MessageType.PKCS_REQ, MessageType.RENEWAL_REQ):
                return self._enroll(req)
            if mtype is MessageType.CERT_POLL:
                return self._cert_poll(req)
            if mtype is MessageType.GET_CERT:
                return self._get_cert(req)
            return self._get_crl(req)
        except _Refuse as exc:
            self._record_refusal(header, exc.fail_info, exc.text, req)
            return self._failure(header, exc.fail_info, exc.text)

    def _check_time_and_algorithms(self, req: proto.ScepRequest) -> None:
        now = self.now()
        if req.signing_time is not None:
            skew = abs((now - req.signing_time).total_seconds())
            if skew > self.config.max_clock_skew:
                raise _Refuse(FailInfo.BAD_TIME, f"signingTime "
                              f"{req.signing_time:%Y-%m-%d %H:%M:%S}Z is {skew:.0f}s away "
                              f"from the CA's clock ({now:%Y-%m-%d %H:%M:%S}Z); at most "
                              f"{self.config.max_clock_skew:.0f}s is accepted")
        if self.config.effective_enforce_caps:
            caps = self.config.effective_caps
            if not proto.digest_allowed(req.header.digest_alg, caps):
                raise _Refuse(FailInfo.BAD_ALG, f"digest {req.header.digest_alg.value} is not "
                              f"offered by GetCACaps ({', '.join(caps)})")
            if not proto.cipher_allowed(req.cipher, caps):
                raise _Refuse(FailInfo.BAD_ALG, f"content cipher {req.cipher.value} is not "
                              f"offered by GetCACaps ({', '.join(caps)})")
        if not isinstance(req.signer_cert.public_key(), rsa.RSAPublicKey):
            raise _Refuse(FailInfo.BAD_ALG, "the signer certificate has no RSA key, so no "
                          "reply can be encrypted to it (RFC 8894 §3.2.2)")

    # --- replies ----------------------------------------------------------------------------

    def _reply(self, header: proto.RequestHeader, status: PkiStatus, *,
               fail_info: FailInfo | None = None, text: str = "",
               certs: list[x509.Certificate] | None = None, crls: list[bytes] | None = None,
               recipient: x509.Certificate | None = None,
               cipher: ContentCipher | None = None) -> Reply:
        body = proto.build_cert_rep(header, status, signer=self.signer, now=self.now(),
                                    fail_info=fail_info, fail_text=text, certs=certs or [],
                                    crls=crls or [], recipient=recipient,
                                    cipher=cipher or ContentCipher.DES3, rand=self._rand)
        return Reply(200, proto.CT_PKI_MESSAGE, body, proto.message_name(header.message_type),
                     header.transaction_id, status, fail_info, text)

    def _failure(self, header: proto.RequestHeader, fail_info: FailInfo, text: str) -> Reply:
        log.info("%s %s: FAILURE %s: %s", proto.message_name(header.message_type),
                 header.transaction_id, proto.FAIL_NAMES[fail_info], text)
        return self._reply(header, PkiStatus.FAILURE, fail_info=fail_info, text=text)

    def _success(self, req: proto.ScepRequest, certs: list[x509.Certificate],
                 crls: list[bytes] | None = None) -> Reply:
        return self._reply(req.header, PkiStatus.SUCCESS, certs=certs, crls=crls,
                           recipient=req.signer_cert, cipher=req.cipher)

    def _issued_reply(self, req: proto.ScepRequest, cert_der: bytes) -> Reply:
        cert = x509.load_der_x509_certificate(cert_der)
        # NDES returns the issued certificate with its CA; micromdm only the certificate.
        certs = [cert, self.ca.cert] if self.ndes else [cert]
        return self._success(req, certs)

    # --- enrolment --------------------------------------------------------------------------

    def _enroll(self, req: proto.ScepRequest) -> Reply:
        try:
            csr = parse_csr(req.message_data)
        except CsrError as exc:
            raise _Refuse(FailInfo.BAD_MESSAGE_CHECK if exc.bad_signature
                          else FailInfo.BAD_REQUEST, exc.message) from None
        if csr.key_size < self.config.min_key_size and isinstance(csr.public_key,
                                                                  rsa.RSAPublicKey):
            raise _Refuse(FailInfo.BAD_REQUEST, f"RSA-{csr.key_size} is below this CA's "
                          f"minimum of {self.config.min_key_size} bits")
        csr_hash = hashlib.sha256(csr.der).hexdigest()
        existing = self.db.get(req.transaction_id)
        # A retransmission (the client resends the same request when it got no reply):
        # answer from the record, never issue twice.
        if (existing is not None and existing.csr_sha256 == csr_hash
                and existing.message_type == int(req.message_type)
                and existing.status in (Status.ISSUED, Status.PENDING)):
            return self._continue(req, existing, "retransmitted request")
        accepted, decider, reason = self._authenticate(req, csr)
        info = parse_challenge(csr.challenge)
        common = {"transaction_id": req.transaction_id, "message_type": int(req.message_type),
                  "subject": csr.subject.rfc4514_string(), "requester": req.requester,
                  "signer_key": spki_hash(req.signer_cert.public_key()),
                  "csr_sha256": csr_hash, "device_id": info.device_id,
                  "user_id": info.user_id, "request_id": info.request_id}
        if not accepted:
            with self.db.write() as conn:
                self.db.add_decision(conn, transaction_id=req.transaction_id,
                                     message_type=int(req.message_type), decider=decider,
                                     accepted=False, reason=reason, requester=req.requester)
                self.db.insert(conn, status=Status.REJECTED, reason=reason, **common)
        # The CSR holds the challenge password (a secret): it is kept only while the request
        # waits for approval (the certificate is issued from it later), never after.
            self._notify_failure(req, common, reason, FailInfo.BAD_REQUEST)
            log.info("%s %s: FAILURE badRequest: %s", proto.message_name(req.message_type),
                     req.transaction_id, reason)
            return self._reply(req.header, PkiStatus.FAILURE, fail_info=FailInfo.BAD_REQUEST,
                               text=reason)
        pending = self.config.pending
        if pending.kind is not PendingKind.NONE:
            now_ts = self.now().timestamp()
            with self.db.write() as conn:
                self.db.add_decision(conn, transaction_id=req.transaction_id,
                                     message_type=int(req.message_type), decider=decider,
                                     accepted=True, reason=reason, requester=req.requester)
                self.db.insert(conn, status=Status.PENDING, csr=csr.der,
                               reason=f"waiting for approval ({pending})",
                               approve_at=now_ts + pending.value
                               if pending.kind is PendingKind.AFTER_SECONDS else None,
                               approve_polls=int(pending.value)
                               if pending.kind is PendingKind.AFTER_POLLS else None,
                               **common)
            log.info("%s %s: PENDING (%s)", proto.message_name(req.message_type),
                     req.transaction_id, pending)
            return self._reply(req.header, PkiStatus.PENDING)
        with self.db.write() as conn:
            self.db.add_decision(conn, transaction_id=req.transaction_id,
                                 message_type=int(req.message_type), decider=decider,
                                 accepted=True, reason=reason, requester=req.requester)
            row_id = self.db.insert(conn, status=Status.PENDING, reason="issuing",
                                    **common)
            cert = self._issue_into(conn, row_id, csr)
        self._notify_issued(req.transaction_id, cert)
        return self._issued_reply(req, cert.public_bytes(serialization.Encoding.DER))

    def _authenticate(self, req: proto.ScepRequest, csr: CsrInfo) -> tuple[bool, str, str]:
        """(accepted, decider, reason) — the VerifyRequest step."""
        if req.message_type is MessageType.RENEWAL_REQ:
            if not self.config.allow_renewal or not any(
                    c.lower() == "renewal" for c in self.config.effective_caps):
                return False, "renewal", "RenewalReq is not allowed by this CA"
            ok, why = self._renewal_signer_ok(req, csr)
            return ok, "renewal", why
        verifier = self.config.verifier
        if verifier is None:
            verdict_ok, decider, why = True, "none", "no challenge policy configured"
        else:
            ctx = VerifyContext(req.transaction_id, int(req.message_type), csr.der,
                                csr.challenge, csr.subject.rfc4514_string(), req.requester)
            verdict = verifier.verify(ctx)
            verdict_ok, decider, why = verdict.accepted, verifier.name, verdict.reason
        if verdict_ok:
            return True, decider, why
        # NDES accepts a request without a (valid) password when it is signed with a
        # certificate that chains to the CA and names the same subject (event 28's text).
        if self.config.allow_renewal and self.ca.issued_by_us(req.signer_cert):
            ok, renew_why = self._renewal_signer_ok(req, csr)
            if ok:
                return True, "renewal", f"{why}; accepted instead because {renew_why}"
        return False, decider, why

    def _renewal_signer_ok(self, req: proto.ScepRequest, csr: CsrInfo) -> tuple[bool, str]:
        signer = req.signer_cert
        serial = serial_hex(signer.serial_number)
        if not self.ca.issued_by_us(signer):
            return False, (f"the request is signed by {signer.subject.rfc4514_string()} "
                           f"(serial {serial}), which this CA did not issue")
        row = self.db.by_serial(signer.serial_number)
        if row is None or row.status is not Status.ISSUED:
            state = "unknown to the database" if row is None else row.status.value
            return False, f"the signing certificate {serial} is {state}"
        now = self.now()
        if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
            return False, f"the signing certificate {serial} is not valid now (expired?)"
        if self.config.renewal_requires_same_name and not (cert_names(signer) & csr.names()):
            return False, (f"the CSR names ({csr.subject.rfc4514_string()}) share nothing "
                           f"with the signing certificate's subject or SAN (serial {serial})")
        return True, f"signed by certificate {serial} issued by this CA"

    def _plan(self, csr: CsrInfo) -> tuple[IssuePlan, str]:
        cfg = self.config
        name, template = cfg.template(csr.template_name)
        days = template.validity_days or cfg.validity_days
        validity = timedelta(days=days)
        if cfg.honor_validity_request and csr.requested_validity is not None:
            validity = min(csr.requested_validity, timedelta(days=cfg.max_validity_days))
        now = self.now().replace(microsecond=0)
        not_before = now - timedelta(minutes=1)
        not_after = min(now + validity, self.ca.cert.not_valid_after_utc)
        ku = csr.key_usage or key_usage_from_bits(template.key_usage)
        ekus = csr.ekus if csr.ekus is not None else template.ekus
        return IssuePlan(csr.subject, csr.public_key, random_serial(), not_before, not_after,
                         ku, tuple(ekus), csr.san), name

    def _issue_into(self, conn: sqlite3.Connection, row_id: int,
                    csr: CsrInfo) -> x509.Certificate:
        """Issue and record inside the caller's write transaction (the row is locked)."""
        for _ in range(8):
            plan, template = self._plan(csr)
            cert = self.ca.issue(plan)
            try:
                self.db.update(conn, row_id,
                               status=Status.ISSUED, serial=serial_hex(plan.serial),
                               thumbprint=sha1_thumbprint(cert), template=template,
                               not_after=cert.not_valid_after_utc.isoformat(),
                               cert=cert.public_bytes(serialization.Encoding.DER),
                               reason="issued", csr=None)
            except SerialCollision:
                continue
            log.info("issued serial %s to %s (thumbprint %s)", serial_hex(plan.serial),
                     csr.subject.rfc4514_string(), sha1_thumbprint(cert))
            return cert
        raise RuntimeError("could not find a free serial number")  # pragma: no cover

    def _continue(self, req: proto.ScepRequest, row: RequestRow, why: str) -> Reply:
        """Answer for an existing request: its certificate, PENDING, or issue it now that it
        is approved. The row is re-read under the writer lock, so concurrent polls and
        `approve` never issue twice."""
        issued: x509.Certificate | None = None
        with self.db.write() as conn:
            current = self.db.latest_for(conn, req.transaction_id)
            assert current is not None
            if current.status is Status.PENDING:
                polls = current.polls + (1 if req.message_type is MessageType.CERT_POLL
                                         else 0)
                self.db.update(conn, current.id, polls=polls)
                now_ts = self.now().timestamp()
                due = (current.approved
                       or (current.approve_at is not None and now_ts >= current.approve_at)
                       or (current.approve_polls is not None
                           and polls >= current.approve_polls))
                if not due:
                    return self._reply(req.header, PkiStatus.PENDING)
                if not current.approved:
                    self.db.add_decision(conn, transaction_id=req.transaction_id,
                                         message_type=current.message_type,
                                         decider="timer", accepted=True,
                                         reason=f"approved automatically ({self.config.pending})",
                                         requester=current.requester)
                assert current.csr is not None
                issued = self._issue_into(conn, current.id, parse_csr(current.csr))
                cert_der = issued.public_bytes(serialization.Encoding.DER)
            elif current.status in (Status.ISSUED, Status.REVOKED):
                assert current.cert is not None
                cert_der = current.cert
            else:
                raise _Refuse(FailInfo.BAD_REQUEST, f"the request was rejected: "
                              f"{current.reason}")
        if issued is not None:
            self._notify_issued(req.transaction_id, issued)
        log.info("%s %s: SUCCESS (%s)", proto.message_name(req.message_type),
                 req.transaction_id, why)
        return self._issued_reply(req, cert_der)

    # --- CertPoll, GetCert, GetCRL ---------------------------------------------------------

    def _check_issuer(self, req: proto.ScepRequest) -> None:
        if not proto.same_name(req.issuer_der, self.ca.cert.subject):
            raise _Refuse(FailInfo.BAD_CERT_ID, f"issuer {proto.name_text(req.issuer_der)} "
                          f"is not this CA ({self.ca.cert.subject.rfc4514_string()})")

    def _cert_poll(self, req: proto.ScepRequest) -> Reply:
        self._check_issuer(req)
        row = self.db.get(req.transaction_id)
        if row is None:
            raise _Refuse(FailInfo.BAD_CERT_ID, f"no request with transaction id "
                          f"{req.transaction_id}")
        if row.signer_key and row.signer_key != spki_hash(req.signer_cert.public_key()):
            raise _Refuse(FailInfo.BAD_CERT_ID, "the CertPoll is not signed with the key "
                          "that signed the original request")
        return self._continue(req, row, "poll")

    def _get_cert(self, req: proto.ScepRequest) -> Reply:
        self._check_issuer(req)
        assert req.serial is not None
        row = self.db.by_serial(req.serial)
        if row is None or row.cert is None:
            raise _Refuse(FailInfo.BAD_CERT_ID, f"no certificate with serial "
                          f"{serial_hex(req.serial)} was issued by this CA")
        return self._success(req, [x509.load_der_x509_certificate(row.cert)])

    def _get_crl(self, req: proto.ScepRequest) -> Reply:
        self._check_issuer(req)
        revoked = [(serial, datetime.fromtimestamp(at, UTC))
                   for serial, at in self.db.revoked()]
        crl = self.ca.crl(revoked, now=self.now().replace(microsecond=0))
        return self._success(req, [], [crl.public_bytes(serialization.Encoding.DER)])

    # --- records and Notify ----------------------------------------------------------------

    def _record_refusal(self, header: proto.RequestHeader, fail_info: FailInfo, text: str,
                        req: proto.ScepRequest | None) -> None:
        """Enrolment refusals become `rejected` rows; every refusal is a decision."""
        requester = header.signer_cert.subject.rfc4514_string() if header.signer_cert else ""
        name = proto.FAIL_NAMES[fail_info]
        enrol = header.message_type in (MessageType.PKCS_REQ, MessageType.RENEWAL_REQ)
        csr_der = req.message_data if req is not None and enrol else None
        subject = ""
        if csr_der is not None:
            try:
                subject = x509.load_der_x509_csr(csr_der).subject.rfc4514_string()
            except ValueError:
                subject = ""
        with self.db.write() as conn:
            self.db.add_decision(conn, transaction_id=header.transaction_id,
                                 message_type=header.message_type, decider="protocol",
                                 accepted=False, reason=f"{name}: {text}",
                                 requester=requester)
            if enrol:
                self.db.insert(conn, transaction_id=header.transaction_id,
                               message_type=header.message_type, status=Status.REJECTED,
                               subject=subject, requester=requester,
                               reason=f"{name}: {text}",
                               csr_sha256=hashlib.sha256(csr_der).hexdigest()
                               if csr_der else "")
        if enrol:
            self._notify(CrsRecord(transaction_id=header.transaction_id, status=1,
                                   hresult=int(fail_info.hresult), subject=subject,
                                   issuer_ca=self.ca.cert.subject.rfc4514_string(),
                                   message=f"{name}: {text}"), header.transaction_id)

    def _notify_failure(self, req: proto.ScepRequest, common: dict[str, object],
                        reason: str, fail_info: FailInfo) -> None:
        self._notify(CrsRecord(transaction_id=req.transaction_id, status=1,
                               hresult=int(fail_info.hresult),
                               device_id=str(common["device_id"]),
                               user_id=str(common["user_id"]),
                               request_id=str(common["request_id"]),
                               subject=str(common["subject"]),
                               issuer_ca=self.ca.cert.subject.rfc4514_string(),
                               message=reason), req.transaction_id)

    def _notify_issued(self, transaction_id: str, cert: x509.Certificate) -> None:
        row = self.db.get(transaction_id)
        self._notify(CrsRecord(
            transaction_id=transaction_id, status=0, hresult=0,
            device_id=row.device_id if row else "", user_id=row.user_id if row else "",
            request_id=row.request_id if row else "", serial=serial_hex(cert.serial_number),
            thumbprint=sha1_thumbprint(cert), expiration=cert.not_valid_after_utc,
            not_before=cert.not_valid_before_utc,
            spki_sha1=hashlib.sha1(  # noqa: S324 - an identifier
                cert.public_key().public_bytes(
                    serialization.Encoding.DER,
                    serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest().upper(),
            issuer_ca=self.ca.cert.subject.rfc4514_string(),
            subject=cert.subject.rfc4514_string(), message="issued"), transaction_id)

    def _notify(self, record: CrsRecord, transaction_id: str) -> None:
        """Call every notifier; a failing one is recorded (as NDES logs `Exiting Notify with
        0x…`) and never undoes the issuance."""
        hresult = 0
        for notifier in self._notifiers:
            try:
                notifier(record)
            except Exception as exc:
                hresult = exc.hresult if isinstance(exc, DmAgentError) else HResult.E_FAIL
                log.warning("Notify for %s failed: %s", transaction_id, exc)
        if not self._notifiers:
            return
        row = self.db.get(transaction_id)
        if row is not None:
            with self.db.write() as conn:
                self.db.update(conn, row.id, notify_hresult=int(hresult))
