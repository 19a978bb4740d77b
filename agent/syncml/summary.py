"""What happened in one OMA-DM session, for `dmagent sync` and the daemon's status.

A record being filled in while the session runs (the session state machine counts, the I/O shell
adds the duration), so unlike the protocol messages it is mutable.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.diagnostics import format_hex

if TYPE_CHECKING:
    from agent.errors import DmAgentError


@dataclass
class SessionSummary:
    session_id: str
    server_url: str
    device_id: str
    outcome: str = "running"  # running | completed | failed | aborted
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    commands_received: Counter[str] = field(default_factory=Counter)  # by element name
    statuses_sent: Counter[int] = field(default_factory=Counter)  # by code
    statuses_received: Counter[int] = field(default_factory=Counter)  # server's, for ours
    results_sent: int = 0
    authenticated: bool = False  # the server answered 212 to our credentials
    auth_scheme: str | None = None
    next_nonce: str | None = None  # the server's latest NextNonce (base64), for next session
    errors: list[str] = field(default_factory=list)  # non-fatal problems, in order
    error: str | None = None  # what ended the session, when it did not complete
    hresult: int | None = None
    duration_s: float | None = None
    failure: DmAgentError | None = field(default=None, repr=False)  # the error object itself

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id, "server_url": self.server_url,
            "device_id": self.device_id, "outcome": self.outcome,
            "messages_sent": self.messages_sent, "messages_received": self.messages_received,
            "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
            "commands_received": dict(sorted(self.commands_received.items())),
            "statuses_sent": {str(k): v for k, v in sorted(self.statuses_sent.items())},
            "statuses_received": {str(k): v for k, v in sorted(self.statuses_received.items())},
            "results_sent": self.results_sent, "authenticated": self.authenticated,
            "auth_scheme": self.auth_scheme, "errors": list(self.errors), "error": self.error,
            "hresult": None if self.hresult is None else format_hex(self.hresult),
            "duration_s": None if self.duration_s is None else round(self.duration_s, 3),
        }
