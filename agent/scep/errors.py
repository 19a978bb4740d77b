"""SCEP-specific error types (both are `PeerError`s: the CA answered, with a refusal)."""

from __future__ import annotations

from agent.diagnostics import FailInfo, HResult
from agent.errors import PeerError


class ScepFailure(PeerError):
    """The CA answered pkiStatus FAILURE (RFC 8894 §3.3.2.2); `fail_info` says why."""

    def __init__(self, message: str, fail_info: FailInfo | None, *, fail_text: str = "",
                 advice: str = "") -> None:
        hresult = fail_info.hresult if fail_info is not None else HResult.E_FAIL
        super().__init__(message, hresult=hresult, advice=advice)
        self.fail_info = fail_info
        self.fail_text = fail_text


class ScepPendingError(PeerError):
    """The request is still PENDING after the last poll (RetryCount exhausted)."""

    default_hresult = HResult.E_PENDING

    def __init__(self, message: str, *, transaction_id: str, polls: int,
                 advice: str = "") -> None:
        super().__init__(message, advice=advice)
        self.transaction_id = transaction_id
        self.polls = polls
