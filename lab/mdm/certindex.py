"""Where the lab learns about issued certificates, to compute renewal itself (seed 000: the
renewal threshold never reaches the device; the server inspects the certificate).

Sources, by thumbprint: the CRS records (the lab's own SCEP CA records issued certificates there
directly), then micromdm scepserver's file depot (`<depot>/<CN>.<serial>.pem`, one certificate
per file). A certificate found in the depot also completes the CRS record of the request for
its key (status `issued`, thumbprint, serial, validity), like the connector's CRS upload.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from lab.challenge import thumbprint as cert_thumbprint
from lab.csrcheck import spki_sha1
from lab.state import LabState


@dataclass(frozen=True)
class CertInfo:
    thumbprint: str
    serial: str
    not_before: float
    not_after: float
    spki_sha1: str | None = None

    def renew_at(self, threshold_percent: int) -> float:
        """Renewal is due once less than `threshold_percent` of the lifetime is left."""
        lifetime = self.not_after - self.not_before
        return self.not_after - lifetime * threshold_percent / 100.0


class CertIndex:
    def __init__(self, state: LabState, depot: str = "") -> None:
        self.state = state
        self.depot = Path(depot) if depot else None
        self._by_thumb: dict[str, CertInfo] = {}
        self._seen: dict[Path, float] = {}

    def find(self, thumbprint: str) -> CertInfo | None:
        tp = thumbprint.strip().replace(" ", "").upper()
        if not tp:
            return None
        row = self.state.crs_for_thumbprint(tp)
        if row is not None and row["not_before"] is not None and row["expires"] is not None:
            return CertInfo(tp, row["serial"] or "", float(row["not_before"]),
                            float(row["expires"]), row["spki_sha1"])
        if tp not in self._by_thumb:
            self._scan()
        info = self._by_thumb.get(tp)
        if info is not None and info.spki_sha1:
            self.state.complete_crs(info.spki_sha1, thumbprint=tp, serial=info.serial,
                                    not_before=info.not_before, expires=info.not_after)
        return info

    def _scan(self) -> None:
        if self.depot is None or not self.depot.is_dir():
            return
        for path in self.depot.glob("*.pem"):
            if path.name == "ca.pem":
                continue
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if self._seen.get(path) == mtime:
                continue
            self._seen[path] = mtime
            try:
                cert = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError):
                continue
            info = CertInfo(cert_thumbprint(cert), format(cert.serial_number, "X"),
                            cert.not_valid_before_utc.timestamp(),
                            cert.not_valid_after_utc.timestamp(), spki_sha1(cert.public_key()))
            self._by_thumb[info.thumbprint] = info
