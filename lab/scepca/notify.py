"""The NDES policy module's Notify step: a Certificate Request Status (CRS) record per request.

After NDES issues (or fails) a certificate, the Intune policy module calls Notify; the
connector drops a `<id>.CRS` XML file (Version, CertSerialNumber, UserID, DeviceID, IssuerCA,
Thumbprint, CertificateRequestID, TransactionID, CertExpirationDate, Status, HResult) and
uploads it, which is how the MDM learns the thumbprint it later compares with what the device
reports. The lab CA builds the same record and hands it to a configurable callable (the lab
MDM server's state store), and can also drop the XML files in `Succeed/` and `Failed/`.

Device, user and request ids come from the challenge when it is parseable: an Intune-style
token (base64 XML `<CertEnrollToken>` with DeviceID, UserID, CertificateRequestId), or JSON /
`key=value;` text carrying the same names. The challenge itself is never recorded.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

CRS_VERSION = 9  # the Version element the seed's CRS files carry


@dataclass(frozen=True)
class ChallengeInfo:
    device_id: str = ""
    user_id: str = ""
    request_id: str = ""


_KEYS = {"deviceid": "device_id", "device_id": "device_id", "device": "device_id",
         "userid": "user_id", "user_id": "user_id", "user": "user_id",
         "certificaterequestid": "request_id", "request_id": "request_id",
         "requestid": "request_id"}


def _from_mapping(data: Mapping[str, Any]) -> ChallengeInfo:
    found: dict[str, str] = {}
    for key, value in data.items():
        name = _KEYS.get(str(key).lower())
        if name and isinstance(value, str | int):
            found.setdefault(name, str(value))
    return ChallengeInfo(**found)


_XML_TAG = re.compile(r"<(DeviceID|UserID|CertificateRequestId)>([^<]*)</\w+>", re.IGNORECASE)


def _from_xml(text: str) -> ChallengeInfo | None:
    found: dict[str, str] = {}
    for tag, value in _XML_TAG.findall(text):
        name = _KEYS[tag.lower()]
        found.setdefault(name, value.strip())
    return ChallengeInfo(**found) if found else None


def parse_challenge(challenge: str | None) -> ChallengeInfo:
    """Best-effort ids from a challenge; an opaque challenge gives empty ids."""
    if not challenge:
        return ChallengeInfo()
    text = challenge.strip()
    candidates = [text]
    try:
        decoded = base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
        candidates.append(decoded.decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        pass
    for cand in candidates:
        if cand.lstrip().startswith("{"):
            try:
                data = json.loads(cand)
            except ValueError:
                continue
            if isinstance(data, dict):
                info = _from_mapping(data)
                if info != ChallengeInfo():
                    return info
        if "<" in cand:
            xml_info = _from_xml(cand)
            if xml_info is not None:
                return xml_info
        if "=" in cand and ";" in cand:
            pairs = dict(p.split("=", 1) for p in cand.split(";") if "=" in p)
            info = _from_mapping({k.strip(): v.strip() for k, v in pairs.items()})
            if info != ChallengeInfo():
                return info
    return ChallengeInfo()


@dataclass(frozen=True)
class CrsRecord:
    """One Certificate Request Status record (the fields of the seed's .CRS file)."""

    transaction_id: str
    status: int  # 0 success, otherwise failed
    hresult: int  # unsigned HRESULT; 0 on success
    device_id: str = ""
    user_id: str = ""
    request_id: str = ""  # CertificateRequestID
    serial: str = ""  # CertSerialNumber, upper-case hex
    thumbprint: str = ""
    expiration: datetime | None = None
    not_before: datetime | None = None
    spki_sha1: str = ""  # SHA-1 of the certificate's SubjectPublicKeyInfo, upper-case hex
    issuer_ca: str = ""
    subject: str = ""
    message: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status == 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["expiration"] = self.expiration.isoformat() if self.expiration else None
        d["not_before"] = self.not_before.isoformat() if self.not_before else None
        return d

    def to_xml(self) -> str:
        """The CRS file body, element for element as the Intune connector writes it."""
        exp = ""
        if self.expiration is not None:
            e = self.expiration
            hour = e.hour % 12 or 12
            exp = (f"{e.month}/{e.day}/{e.year} {hour}:{e.minute:02d}:{e.second:02d} "
                   f"{'AM' if e.hour < 12 else 'PM'}")
        signed_hr = self.hresult - (1 << 32) if self.hresult & 0x80000000 else self.hresult
        fields = [("Version", str(CRS_VERSION)), ("CertSerialNumber", self.serial),
                  ("UserID", self.user_id), ("DeviceID", self.device_id),
                  ("IssuerCA", self.issuer_ca), ("UploadAttempt", "1"),
                  ("UploadStatus", "2" if self.succeeded else "3"),
                  ("Thumbprint", self.thumbprint),
                  ("CertificateRequestID", self.request_id),
                  ("TransactionID", self.transaction_id), ("CertExpirationDate", exp),
                  ("Status", str(self.status)), ("HResult", str(signed_hr))]
        body = "".join(f"  <{k}>{escape(v)}</{k}>\n" for k, v in fields)
        return ('<?xml version="1.0" encoding="utf-8"?>\n<CertRequestStatus '
                'xmlns:xsd="http://www.w3.org/2001/XMLSchema" '
                'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">\n'
                f"{body}</CertRequestStatus>\n")


class CrsDirectoryNotifier:
    """Drops `<txid>.CRS` into `<root>/Succeed` or `<root>/Failed`, as the connector does."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __call__(self, record: CrsRecord) -> None:
        folder = self.root / ("Succeed" if record.succeeded else "Failed")
        folder.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^0-9A-Za-z_-]", "_", record.transaction_id)[:80] or "request"
        path = folder / f"{name.upper()}.CRS"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(record.to_xml(), encoding="utf-8")
        os.replace(tmp, path)


class LabStateNotifier:
    """Notify into the lab MDM server's state (`lab.state.LabState.complete_crs`): the issued
    certificate is attached to the CRS record its CSR validation created, which is how the
    lab MDM server learns the thumbprint the device will report (the connector's upload)."""

    def __init__(self, state_db: Path) -> None:
        self.state_db = Path(state_db)

    def __call__(self, record: CrsRecord) -> None:
        if not record.succeeded or not record.spki_sha1:
            return  # failures are recorded by the validator that refused them
        from lab.state import LabState

        with LabState(self.state_db) as state:
            state.complete_crs(record.spki_sha1, thumbprint=record.thumbprint,
                               serial=record.serial,
                               not_before=record.not_before.timestamp()
                               if record.not_before else 0.0,
                               expires=record.expiration.timestamp()
                               if record.expiration else 0.0)
