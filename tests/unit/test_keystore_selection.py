"""KeyProtection → key store, for the values that need no TPM (see the integration test)."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from agent.sealing import Sealer
from keystores.base import KeyStoreError, TpmUnavailableError, UnsupportedKeyError
from keystores.selection import (
    DEFAULT_KEY_PROTECTION,
    PROVIDER_NAMES,
    KeyProtection,
    select_keystore,
)
from keystores.software import SoftwareKeyStore


def _select(tmp_path: Path, kp: int, tcti: str | None = None) -> object:
    return select_keystore(kp, tpm_tcti=tcti, software_dir=tmp_path / "sw",
                           tpm_dir=tmp_path / "tpm", sealing=Sealer(secrets.token_bytes(32)))


def test_software_is_the_default(tmp_path: Path) -> None:
    assert DEFAULT_KEY_PROTECTION == 3
    store = _select(tmp_path, DEFAULT_KEY_PROTECTION, tcti="swtpm:host=127.0.0.1,port=1")
    assert isinstance(store, SoftwareKeyStore)
    assert store.directory == tmp_path / "sw"


@pytest.mark.parametrize("tcti", [None, ""])
def test_tpm_required_without_tcti(tmp_path: Path, tcti: str | None) -> None:
    with pytest.raises(TpmUnavailableError) as ei:
        _select(tmp_path, 1, tcti)
    assert ei.value.hresult == 0x8028400F  # TBS_E_TPM_NOT_FOUND
    assert "no TPM is configured" in ei.value.message
    assert ei.value.advice


@pytest.mark.parametrize("tcti", [None, ""])
def test_tpm_preferred_without_tcti_falls_back(tmp_path: Path, tcti: str | None) -> None:
    assert isinstance(_select(tmp_path, 2, tcti), SoftwareKeyStore)


def test_windows_hello_not_supported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedKeyError) as ei:
        _select(tmp_path, 4)
    assert ei.value.hresult == 0x80090029  # NTE_NOT_SUPPORTED
    assert "Windows Hello" in ei.value.message


@pytest.mark.parametrize("kp", [0, 5, -1, 255])
def test_invalid_values(tmp_path: Path, kp: int) -> None:
    with pytest.raises(KeyStoreError) as ei:
        _select(tmp_path, kp)
    assert ei.value.hresult == 0x80070057  # E_INVALIDARG
    assert str(kp) in ei.value.message
    assert not (tmp_path / "sw").exists()


@pytest.mark.parametrize(("kp", "name"), [
    (1, "Microsoft Platform Crypto Provider"), (2, "Microsoft Platform Crypto Provider"),
    (3, "Microsoft Software Key Storage Provider"), (4, "Microsoft Passport Key Storage Provider")])
def test_provider_names(kp: int, name: str) -> None:
    assert KeyProtection(kp).provider_name == name
    assert set(PROVIDER_NAMES) == {"tpm", "software"}
