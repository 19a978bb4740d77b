"""A third-party client against the lab CA: micromdm `scepclient` 2.1.0 (Debian `scep`).

What it shows: normal mode enrols; NDES mode enrols too when the CA does not hold clients to
its 3DES/SHA-1 capabilities (scepclient picks the RA encryption certificate out of the three
GetCACert certificates), and is refused with badAlg when it does, because scepclient always
encrypts with single DES whatever GetCACaps says.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509

from lab.scepca.db import Status
from lab.scepca.testing import LabScepCA
from tests.conftest import need_binary

pytestmark = pytest.mark.scepserver  # the same Debian package ships scepclient

CaFactory = Callable[..., LabScepCA]


def scepclient(ca: LabScepCA, workdir: Path, *, challenge: str = "secret", cn: str = "sc-1",
               ndes_path: bool = False) -> subprocess.CompletedProcess[str]:
    binary = need_binary("scepclient")
    workdir.mkdir(parents=True, exist_ok=True)
    url = ca.url + ("/pkiclient.exe" if ndes_path else "")
    return subprocess.run(
        [binary, "-server-url", url, "-challenge", challenge, "-cn", cn,
         "-private-key", str(workdir / "key.pem"), "-certificate", str(workdir / "cert.pem"),
         "-keySize", "2048"],
        capture_output=True, text=True, timeout=60, check=False)


def _issued(workdir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((workdir / "cert.pem").read_bytes())


def test_scepclient_normal_mode(lab_scep_ca: CaFactory, tmp_path: Path) -> None:
    ca = lab_scep_ca()
    proc = scepclient(ca, tmp_path / "c1")
    assert proc.returncode == 0, proc.stderr
    cert = _issued(tmp_path / "c1")
    cert.verify_directly_issued_by(ca.ca_cert)
    assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "sc-1"
    (row,) = ca.requests()
    assert row.status is Status.ISSUED and int(row.serial or "0", 16) == cert.serial_number


def test_scepclient_ndes_mode_with_relaxed_caps(lab_scep_ca: CaFactory, tmp_path: Path) -> None:
    ca = lab_scep_ca(mode="ndes", enforce_caps=False)
    proc = scepclient(ca, tmp_path / "c1", ndes_path=True)
    assert proc.returncode == 0, proc.stderr
    _issued(tmp_path / "c1").verify_directly_issued_by(ca.ca_cert)


def test_scepclient_ndes_mode_refused_for_single_des(lab_scep_ca: CaFactory,
                                                     tmp_path: Path) -> None:
    ca = lab_scep_ca(mode="ndes")
    proc = scepclient(ca, tmp_path / "c1", ndes_path=True)
    assert proc.returncode != 0
    assert "badAlg" in proc.stdout + proc.stderr
    (row,) = ca.requests()
    assert row.status is Status.REJECTED and "des-cbc is not offered" in row.reason


def test_scepclient_wrong_challenge(lab_scep_ca: CaFactory, tmp_path: Path) -> None:
    ca = lab_scep_ca(challenge="right")
    proc = scepclient(ca, tmp_path / "c1", challenge="wrong")
    assert proc.returncode != 0 and "badRequest" in proc.stdout + proc.stderr
    assert not (tmp_path / "c1" / "cert.pem").exists()


def test_scepclient_in_parallel(lab_scep_ca: CaFactory, tmp_path: Path) -> None:
    """Ten separate client processes at once: ten certificates, ten unique serials."""
    ca = lab_scep_ca()
    with ThreadPoolExecutor(10) as pool:
        procs = list(pool.map(lambda i: scepclient(ca, tmp_path / f"c{i}", cn=f"sc-{i}"),
                              range(10)))
    assert all(p.returncode == 0 for p in procs), [p.stderr for p in procs]
    serials = {_issued(tmp_path / f"c{i}").serial_number for i in range(10)}
    assert len(serials) == 10
    assert {int(r.serial or "0", 16) for r in ca.requests()} == serials
