"""`LabScepCA`: the lab SCEP CA as a context manager, for tests and embedding.

    with LabScepCA(tmp_path / "ca", mode="ndes", challenge="secret") as ca:
        ca.url          # http://127.0.0.1:PORT/certsrv/mscep/mscep.dll
        ca.thumbprint   # SHA-1 of the root (CAThumbprint)
        ca.add_fault("503@PKCSReq:count=1")
        ca.approve(txid)

It runs in a background thread of the calling process (its own event loop), with a fresh
directory unless one is given. `ca_from=` copies the keys of an existing CA directory (tests
make one CA per session: RSA key generation is the slow part of start-up) with a fresh
database.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509

from lab.scepca.ca import CA_FILES, CertificateAuthority
from lab.scepca.config import CAConfig, Mode, PendingPolicy
from lab.scepca.db import CADatabase, RequestRow
from lab.scepca.faults import FaultRule, FaultSet, parse_fault
from lab.scepca.policy import ChallengeVerifier, NoChallenge, StaticChallenge
from lab.scepca.runner import ThreadedServer, build_app


def copy_ca(source: Path, target: Path) -> None:
    """Copy a CA's keys and certificates (not its database) to `target`."""
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    for base in CA_FILES.values():
        for suffix in (".pem", ".key.pem"):
            shutil.copy2(source / f"{base}{suffix}", target / f"{base}{suffix}")


class LabScepCA:
    def __init__(self, directory: Path | None = None, *, mode: Mode | str = Mode.NORMAL,
                 challenge: str | None = "secret", verifier: ChallengeVerifier | None = None,
                 pending: PendingPolicy | str = "none",
                 faults: Sequence[str | FaultRule] = (), token: str | None = None,
                 ca_from: Path | None = None, config: CAConfig | None = None,
                 log_level: str = "warning", **overrides: Any) -> None:
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if directory is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="lab-scepca-")
            directory = Path(self._tmp.name)
        self.directory = Path(directory)
        if ca_from is not None and not CertificateAuthority.exists(self.directory):
            copy_ca(Path(ca_from), self.directory)
        if verifier is None:
            verifier = StaticChallenge(challenge) if challenge else NoChallenge()
        base = config or CAConfig()
        self.config = replace(base, mode=Mode(mode), verifier=verifier,
                              pending=pending if isinstance(pending, PendingPolicy)
                              else PendingPolicy.parse(pending), **overrides)
        rules = [parse_fault(f) if isinstance(f, str) else f for f in faults]
        self.app = build_app(self.directory, self.config, faults=FaultSet(rules), token=token)
        self._server = ThreadedServer(self.app, log_level=log_level)
        self._running = False

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> LabScepCA:
        if not self._running:
            self._server.start()
            self._running = True
        return self

    def stop(self) -> None:
        if self._running:
            self._server.stop()
            self._running = False
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LabScepCA:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # --- what clients need --------------------------------------------------------------------

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The SCEP URL (ServerURL): `/scep`, or NDES' `/certsrv/mscep/mscep.dll`."""
        return self.base_url + self.config.path

    @property
    def token(self) -> str:
        return self.app.token

    @property
    def ca(self) -> CertificateAuthority:
        return self.app.service.ca

    @property
    def ca_cert(self) -> x509.Certificate:
        return self.ca.cert

    @property
    def thumbprint(self) -> str:
        return self.ca.thumbprint

    @property
    def db(self) -> CADatabase:
        return self.app.service.db

    # --- control --------------------------------------------------------------------------------

    def add_fault(self, fault: str | FaultRule) -> FaultRule:
        return self.app.faults.add(parse_fault(fault) if isinstance(fault, str) else fault)

    def clear_faults(self) -> None:
        self.app.faults.clear()

    def approve(self, transaction_id: str) -> RequestRow:
        return self.db.approve(transaction_id)

    def reject(self, transaction_id: str, reason: str = "rejected by the operator") -> RequestRow:
        return self.db.reject(transaction_id, reason)

    def requests(self) -> list[RequestRow]:
        return self.db.requests()
