"""The one error type of the DM tree: a SyncML status code plus a message for logs and the CLI.

CSPs raise `DMStatusError(code, message)`; the executor turns it into the command's Status
(OMA-TS-DM_RepPro-V1_2 §10 status codes, as the MS-MDM profile uses them).
"""

from __future__ import annotations

from agent.syncml.messages import StatusCode


class DMStatusError(Exception):
    """A tree operation failed with a SyncML status code (404, 405, 418, 400, 415, ...)."""

    def __init__(self, code: int, message: str = "") -> None:
        self.code = int(code)
        self.message = message or _code_name(self.code)
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code} {self.message}"


def _code_name(code: int) -> str:
    try:
        return StatusCode(code).name.replace("_", " ").lower()
    except ValueError:
        return f"status {code}"


def not_found(what: str) -> DMStatusError:
    return DMStatusError(StatusCode.NOT_FOUND, f"node not found: {what}")


def not_allowed(op: str, what: str) -> DMStatusError:
    return DMStatusError(StatusCode.COMMAND_NOT_ALLOWED, f"{op} is not allowed on {what}")


def bad_value(what: str, why: str) -> DMStatusError:
    return DMStatusError(StatusCode.BAD_REQUEST, f"invalid value for {what}: {why}")
