"""The lab's CSR validator: what the Intune certificate connector does for NDES (seeds 000-002).

`verify_csr` decides whether a CA may issue for a CSR: the challenge (the CSR's
challengePassword) must parse, carry a valid lab signature, be within its hour, be one the lab
issued and never used, its profile must still be assigned to the device, and the CSR's subject,
SANs, key length, EKUs and key usage must be the ones it was issued for. The challenge is marked
used atomically (a single conditional UPDATE) only when everything else passed. Every decision
becomes a CRS record (Intune's CertRequestStatus) with a reason and an HRESULT.

micromdm scepserver 2.1.0 integration (`-csrverifierexec`, csrverifier/executable): it runs the
executable with no arguments and no TRANSACTIONID, writes the decrypted CSR as DER to stdin, and
answers the client CertRep FAILURE/badRequest on any non-zero exit. scepserver chains its static
`-challenge` check *after* the verifier (both must pass), so a lab challenge can never satisfy a
static challenge: run scepserver with `-csrverifierexec` and without `-challenge`
(`lab.testing.micromdm_with_validator` refuses the combination).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import datetime

from lab.challenge import ChallengeRefused, Claims, Reason, open_token, parse_token
from lab.csrcheck import CsrInfo, csr_info, mismatches
from lab.labdir import LabDir
from lab.state import LabState
from lab.x500 import OID_KEYS, quote_value


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: Reason | None
    detail: str
    crs_id: int
    claims: Claims | None = None

    @property
    def hresult(self) -> int:
        return 0 if self.reason is None else self.reason.hresult

    def line(self) -> str:
        if self.ok:
            return f"accepted: {self.detail} (CRS {self.crs_id})"
        assert self.reason is not None
        return (f"refused: {self.reason.value}: {self.detail} "
                f"(HRESULT 0x{self.hresult:08X}, CRS {self.crs_id})")


def verify_csr(lab: LabDir, data: bytes, *, now: datetime, transaction_id: str | None = None,
               state: LabState | None = None) -> Verdict:
    own = state is None
    st = state if state is not None else LabState(lab.db_path)
    try:
        return _verify(lab, st, data, now, transaction_id)
    finally:
        if own:
            st.close()


def _verify(lab: LabDir, st: LabState, data: bytes, now: datetime,
            transaction_id: str | None) -> Verdict:
    ts = now.timestamp()
    info: CsrInfo | None = None
    claims: Claims | None = None
    claimed_device: str | None = None
    try:
        info = csr_info(data)
        if info.challenge:
            # who the token says it is for (untrusted until verified), for the record
            with contextlib.suppress(ChallengeRefused):
                claimed_device = parse_token(info.challenge).device_id
        claims = open_token(info.challenge, lab.signer_certs(), now=now,
                            encryption_key=lab.encryption_key())
        row = st.get_challenge(claims.challenge_id)
        if row is None:
            raise ChallengeRefused(Reason.UNKNOWN_CHALLENGE,
                                   f"challenge {claims.challenge_id} was not issued by this lab")
        if row["used_at"] is not None:
            raise ChallengeRefused(Reason.REUSED, f"challenge {claims.challenge_id} was already "
                                   f"used (by {row['used_by'] or 'an earlier request'})")
        if claims.profile_id not in st.assigned_profiles(claims.device_id):
            raise ChallengeRefused(Reason.UNASSIGNED, f"profile {claims.profile_id} is no longer "
                                   f"assigned to device {claims.device_id}")
        problems = mismatches(claims, info)
        if problems:
            raise ChallengeRefused(problems[0].reason,
                                   "; ".join(p.detail for p in problems))
        used_by = transaction_id or f"spki:{info.spki_sha1}"
        outcome = st.use_challenge(claims.challenge_id, ts, used_by)
        if outcome != "ok":
            raise ChallengeRefused(Reason.REUSED if outcome == "reused"
                                   else Reason.UNKNOWN_CHALLENGE,
                                   f"challenge {claims.challenge_id} was used concurrently")
    except ChallengeRefused as refusal:
        crs_id = _record(st, ts, info, claims, claimed_device, transaction_id,
                         status="refused", reason=refusal.reason, detail=refusal.detail)
        return Verdict(False, refusal.reason, refusal.detail, crs_id, claims)
    detail = (f"challenge {claims.challenge_id} for device {claims.device_id}, "
              f"{claims.request_id}")
    crs_id = _record(st, ts, info, claims, claimed_device, transaction_id, status="verified",
                     reason=None, detail=detail)
    return Verdict(True, None, detail, crs_id, claims)


def _record(st: LabState, ts: float, info: CsrInfo | None, claims: Claims | None,
            claimed_device: str | None, transaction_id: str | None, *, status: str,
            reason: Reason | None, detail: str) -> int:
    device_id = claims.device_id if claims else claimed_device
    dev = st.get_device(device_id) if device_id else None
    subject = (",".join(f"{OID_KEYS.get(o, o)}={quote_value(v)}" for o, v in info.subject)
               if info else None)
    return st.add_crs(
        ts, device_id=device_id, upn=(dev or {}).get("upn"),
        profile_id=claims.profile_id if claims else None,
        unique_id=claims.unique_id if claims else None,
        request_id=claims.request_id if claims else None,
        challenge_id=claims.challenge_id if claims else None,
        transaction_id=transaction_id, spki_sha1=info.spki_sha1 if info else None,
        subject=subject, status=status, hresult=0 if reason is None else reason.hresult,
        reason=None if reason is None else reason.value, detail=detail)
