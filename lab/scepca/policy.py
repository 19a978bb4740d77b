"""Challenge verification: the policy module's VerifyRequest, pluggable.

- `StaticChallenge`: one shared challenge password (NDES without a policy module, micromdm
  `-challenge`);
- `NoChallenge`: accept every request (an open lab CA);
- `ExecVerifier`: run a program with the DER CSR on stdin, exit status 0 = accept — the
  contract of micromdm scepserver's `-csrverifierexec`, so the same validator (the lab MDM
  server's `dmagent lab verify-csr`) serves both CAs. The transaction id and message type are
  passed in the environment (TRANSACTIONID, as newer micromdm releases do; SCEP_MESSAGE_TYPE);
- `FunctionVerifier`: any Python callable (the lab MDM server's in-process validator).

Every verdict carries a reason; the service records each one. Reasons never contain the
challenge itself (it is a secret).
"""

from __future__ import annotations

import hmac
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class VerifyContext:
    transaction_id: str
    message_type: int
    csr_der: bytes
    challenge: str | None
    subject: str
    requester: str


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str


@runtime_checkable
class ChallengeVerifier(Protocol):
    @property
    def name(self) -> str: ...

    def verify(self, ctx: VerifyContext) -> Verdict: ...


class NoChallenge:
    name = "none"

    def verify(self, ctx: VerifyContext) -> Verdict:
        return Verdict(True, "no challenge required")


class StaticChallenge:
    name = "static"

    def __init__(self, secret: str) -> None:
        if not secret:
            raise ValueError("a static challenge cannot be empty (use NoChallenge)")
        self._secret = secret.encode()

    def __repr__(self) -> str:
        return "StaticChallenge(<secret>)"

    def verify(self, ctx: VerifyContext) -> Verdict:
        if ctx.challenge is None:
            return Verdict(False, "the CSR carries no challengePassword")
        if hmac.compare_digest(ctx.challenge.encode(), self._secret):
            return Verdict(True, "challenge password matches")
        return Verdict(False, "challenge password is wrong")


class ExecVerifier:
    name = "exec"

    def __init__(self, argv: Sequence[str] | str, *, timeout: float = 30.0) -> None:
        self.argv = [argv] if isinstance(argv, str) else list(argv)
        if not self.argv:
            raise ValueError("ExecVerifier needs a program")
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"ExecVerifier({self.argv!r})"

    def verify(self, ctx: VerifyContext) -> Verdict:
        env = {**os.environ, "TRANSACTIONID": ctx.transaction_id,
               "SCEP_MESSAGE_TYPE": str(ctx.message_type)}
        try:
            proc = subprocess.run(self.argv, input=ctx.csr_der, capture_output=True,
                                  timeout=self.timeout, env=env, check=False)
        except subprocess.TimeoutExpired:
            return Verdict(False, f"verifier {self.argv[0]} timed out after {self.timeout:g}s")
        except OSError as exc:
            return Verdict(False, f"verifier {self.argv[0]} could not run: {exc.strerror}")
        said = (proc.stderr or proc.stdout or b"").decode("utf-8", "replace").strip()
        said = said.splitlines()[-1][:200] if said else ""
        if proc.returncode == 0:
            return Verdict(True, f"verifier {self.argv[0]} accepted" + (f": {said}"
                                                                         if said else ""))
        return Verdict(False, f"verifier {self.argv[0]} exited {proc.returncode}"
                       + (f": {said}" if said else ""))


class FunctionVerifier:
    name = "function"

    def __init__(self, fn: Callable[[VerifyContext], bool | Verdict], name: str = "") -> None:
        self._fn = fn
        if name:
            self.name = name

    def verify(self, ctx: VerifyContext) -> Verdict:
        try:
            out = self._fn(ctx)
        except Exception as exc:  # a broken hook refuses, never issues
            return Verdict(False, f"verifier raised {type(exc).__name__}: {exc}")
        if isinstance(out, Verdict):
            return out
        return Verdict(bool(out), "accepted by the verifier" if out else
                       "refused by the verifier")
