"""Issue a challenge for one device and one expanded profile, and remember it (state)."""

from __future__ import annotations

from datetime import datetime, timedelta

from lab.challenge import Claims, issue_token, new_claims
from lab.labdir import LabConfig, LabDir
from lab.profiles import ExpandedProfile
from lab.state import LabState


def issue_challenge(lab: LabDir, state: LabState, expanded: ExpandedProfile, device_id: str,
                    now: datetime, *, validity: timedelta | None = None,
                    cfg: LabConfig | None = None) -> tuple[str, Claims]:
    """The Challenge node value (a CertEnrollToken) and its claims; recorded as unused."""
    cfg = cfg or lab.config()
    prof = expanded.profile
    claims = new_claims(
        device_id=device_id, profile_id=prof.id, unique_id=expanded.unique_id,
        request_id=expanded.request_id, subject=tuple(expanded.subject_pairs),
        sans=tuple((int(t), v) for t, v in expanded.sans), key_length=prof.key_length,
        ekus=prof.ekus, key_usage=prof.key_usage, now=now,
        validity=validity or timedelta(minutes=cfg.challenge.validity_minutes))
    token = issue_token(claims, lab.signer(), encryption_key=lab.encryption_key(cfg))
    state.record_challenge(claims.challenge_id, device_id, prof.id, expanded.unique_id,
                           expanded.request_id, claims.issued_at.timestamp(),
                           claims.expires_at.timestamp())
    return token, claims
