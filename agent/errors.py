"""The agent's error types.

Two families, as a device reports them: the peer said something wrong (`PeerError`) and we
could not reach the peer (`UnreachableError`). Both carry the HRESULT the Windows client would
write to ErrorCode. Local problems (bad configuration, bad arguments, missing state) have their
own types. `agent.cli` is the one place that turns any of them into user-facing output.
"""

from __future__ import annotations

# HRESULT defaults as literals (names from agent.diagnostics.HResult): importing that table
# costs ~14 ms, and every CLI start imports this module.
E_FAIL = 0x80004005
ERROR_FILE_NOT_FOUND = 0x80070002
ERROR_BUSY = 0x800700AA


class DmAgentError(Exception):
    """Base of every error the agent raises on purpose.

    `hresult` is what the device would report (ErrorCode); `advice` is one line telling the
    user what to try next (printed after the message by the CLI).
    """

    exit_code = 1
    default_hresult: int = E_FAIL

    def __init__(self, message: str, *, hresult: int | None = None, advice: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hresult = self.default_hresult if hresult is None else hresult
        self.advice = advice

    def diagnostics(self) -> str:
        """A multi-line explanation for `-v` output and logs."""
        from agent.diagnostics import describe_hresult

        lines = [self.message, f"HRESULT: {describe_hresult(self.hresult)}"]
        if self.advice:
            lines.append(f"Advice: {self.advice}")
        return "\n".join(lines)


class PeerError(DmAgentError):
    """The peer (MDM server, SCEP server, TPM) answered, but what it said is wrong or a refusal."""


class UnreachableError(DmAgentError):
    """We could not talk to the peer: connection refused, DNS, TLS, timeout, HTTP error status."""

    exit_code = 4


class ConfigError(DmAgentError):
    """The configuration file or environment holds an invalid value."""

    exit_code = 3


class NotFoundError(DmAgentError):
    """A registry key, value, node, task or certificate does not exist."""

    exit_code = 5
    default_hresult = ERROR_FILE_NOT_FOUND


class StateLockedError(DmAgentError):
    """Another process holds the state directory (e.g. a running daemon)."""

    exit_code = 6
    default_hresult = ERROR_BUSY


class LocalError(DmAgentError):
    """Something on this device failed: a key store, the store, a file, invalid local input."""
