"""KeyProtection 1 and 2 against a real swtpm, and against a configured TPM that is absent."""

from __future__ import annotations

import secrets
import socket
from pathlib import Path

import pytest

from agent.sealing import Sealer
from keystores.base import KeyAlgorithm, KeySpec, KeyStore, TpmUnavailableError
from keystores.selection import select_keystore
from keystores.software import SoftwareKeyStore
from tests.conftest import SwtpmInstance, free_port

pytest.importorskip("tpm2_pytss")
pytestmark = pytest.mark.swtpm


def _select(tmp_path: Path, kp: int, tcti: str, timeout: float = 2.0) -> KeyStore:
    return select_keystore(kp, tpm_tcti=tcti, software_dir=tmp_path / "sw",
                           tpm_dir=tmp_path / "tpm", sealing=Sealer(secrets.token_bytes(32)),
                           probe_timeout=timeout)


def _absent_tcti() -> str:
    return f"swtpm:host=127.0.0.1,port={free_port()}"  # nothing listens there


def _silent_pair() -> tuple[socket.socket, socket.socket]:
    """Listening sockets on P and P+1 that never answer (swtpm's data and control ports)."""
    for _ in range(50):
        a = socket.socket()
        a.bind(("127.0.0.1", 0))
        b = socket.socket()
        try:
            b.bind(("127.0.0.1", a.getsockname()[1] + 1))
        except OSError:
            a.close()
            b.close()
            continue
        a.listen()
        b.listen()
        return a, b
    raise RuntimeError("no free port pair")


@pytest.mark.parametrize("kp", [1, 2])
def test_tpm_present(tmp_path: Path, swtpm: SwtpmInstance, kp: int) -> None:
    from keystores.tpm import TpmKeyStore

    store = _select(tmp_path, kp, swtpm.tcti)
    assert isinstance(store, TpmKeyStore)
    assert store.kind == "tpm"
    assert store.directory == tmp_path / "tpm"
    h = store.create(KeySpec(KeyAlgorithm.EC, 256))
    assert (tmp_path / "tpm" / f"{h.key_id}.tss2.pem").exists()


def test_software_even_when_tpm_present(tmp_path: Path, swtpm: SwtpmInstance) -> None:
    assert isinstance(_select(tmp_path, 3, swtpm.tcti), SoftwareKeyStore)


def test_tpm_required_but_absent(tmp_path: Path) -> None:
    tcti = _absent_tcti()
    with pytest.raises(TpmUnavailableError) as ei:
        _select(tmp_path, 1, tcti)
    assert ei.value.hresult == 0x8028400F  # TBS_E_TPM_NOT_FOUND
    assert tcti in ei.value.message
    assert ei.value.advice


def test_tpm_preferred_but_absent_falls_back(tmp_path: Path) -> None:
    store = _select(tmp_path, 2, _absent_tcti())
    assert isinstance(store, SoftwareKeyStore)
    store.create(KeySpec(KeyAlgorithm.EC, 256))
    assert not (tmp_path / "tpm").exists()


def test_tpm_that_hangs_counts_as_absent(tmp_path: Path) -> None:
    """Accepting but never answering (a wedged TPM) must not hang enrollment."""
    a, b = _silent_pair()
    with a, b:
        tcti = f"swtpm:host=127.0.0.1,port={a.getsockname()[1]}"
        assert isinstance(_select(tmp_path, 2, tcti, timeout=0.3), SoftwareKeyStore)
        with pytest.raises(TpmUnavailableError, match="did not answer"):
            _select(tmp_path, 1, tcti, timeout=0.3)
