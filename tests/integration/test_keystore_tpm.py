"""What is particular to the TPM key store and the TPM sealer, against a real swtpm."""

from __future__ import annotations

import hashlib
import secrets
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from keystores.base import (
    NTE_BAD_DATA,
    HashAlg,
    KeyAlgorithm,
    KeySpec,
    KeyStore,
    KeyStoreError,
    Padding,
    TpmUnavailableError,
    UnsupportedKeyError,
    key_id_for,
)
from tests.conftest import SwtpmInstance, free_port, need_binary, stop_process, wait_for_port

tpm2_pytss = pytest.importorskip("tpm2_pytss")

from keystores.tpm import TpmKeyStore, probe_tpm  # noqa: E402
from keystores.tpm_sealing import TpmSealer  # noqa: E402

pytestmark = pytest.mark.swtpm
RSA = KeySpec(KeyAlgorithm.RSA, 2048)
EC = KeySpec(KeyAlgorithm.EC, 256)


def _rsa(pub: object) -> rsa.RSAPublicKey:
    assert isinstance(pub, rsa.RSAPublicKey)
    return pub


def _ec(pub: object) -> ec.EllipticCurvePublicKey:
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    return pub


@pytest.fixture
def store(swtpm: SwtpmInstance, tmp_path: Path) -> TpmKeyStore:
    return TpmKeyStore(swtpm.tcti, tmp_path / "tpmkeys")


def test_is_a_keystore(store: TpmKeyStore) -> None:
    assert isinstance(store, KeyStore)
    assert store.kind == "tpm"


def test_probe(swtpm: SwtpmInstance) -> None:
    info = probe_tpm(swtpm.tcti)
    assert info.manufacturer == "IBM"  # libtpms reports IBM
    assert info.ecc_srk is True


def test_attributes_of_created_keys(store: TpmKeyStore) -> None:
    """sign|decrypt for RSA (SCEP key transport), never restricted, fixedTPM|fixedParent."""
    from tpm2_pytss import TPMA_OBJECT
    from tpm2_pytss.tsskey import TSSPrivKey

    for spec, decrypt in ((RSA, True), (EC, False)):
        h = store.create(spec)
        pem = (store.directory / f"{h.key_id}.tss2.pem").read_bytes()
        assert pem.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
        attrs = TSSPrivKey.from_pem(pem).public.publicArea.objectAttributes
        for bit in (TPMA_OBJECT.SIGN_ENCRYPT, TPMA_OBJECT.FIXEDTPM, TPMA_OBJECT.FIXEDPARENT,
                    TPMA_OBJECT.SENSITIVEDATAORIGIN, TPMA_OBJECT.USERWITHAUTH):
            assert attrs & bit, bit
        assert not attrs & TPMA_OBJECT.RESTRICTED
        assert bool(attrs & TPMA_OBJECT.DECRYPT) is decrypt


def test_blob_loads_with_tpm2_pytss_in_a_fresh_store(swtpm: SwtpmInstance,
                                                     store: TpmKeyStore) -> None:
    """The PEM is the standard TSS2 key file: TSSPrivKey loads it under the same SRK."""
    from tpm2_pytss import ESAPI, TPM2_ALG, TPM2_RH, TPM2_ST, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK
    from tpm2_pytss.tsskey import TSSPrivKey

    h = store.create(RSA)
    pem = (store.directory / f"{h.key_id}.tss2.pem").read_bytes()
    with ESAPI(swtpm.tcti) as ectx:
        handle = TSSPrivKey.from_pem(pem).load(ectx)
        try:
            scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.RSASSA)
            scheme.details.rsassa.hashAlg = TPM2_ALG.SHA256
            sig = ectx.sign(handle, hashlib.sha256(b"x").digest(), scheme,
                            TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL))
        finally:
            ectx.flush_context(handle)
    _rsa(h.public_key()).verify(bytes(sig.signature.rsassa.sig), b"x", padding.PKCS1v15(),
                                hashes.SHA256())
    # And a fresh store instance (a restarted agent) uses it too.
    again = TpmKeyStore(swtpm.tcti, store.directory).load(h.key_id)
    assert key_id_for(again.public_key()) == h.key_id


def test_handles_flushed_after_every_operation(store: TpmKeyStore) -> None:
    """swtpm has 3 object slots: one leaked handle per call would fail by the third key."""
    data = b"slot check"
    for i in range(20):
        spec = EC if i % 2 else KeySpec(KeyAlgorithm.RSA, 1024)
        h = store.create(spec)
        sig = h.sign(data, HashAlg.SHA256)
        pub = h.public_key()
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        else:
            pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
    assert store.transient_handles() == 0


def test_handles_flushed_after_failures(store: TpmKeyStore) -> None:
    h = store.create(KeySpec(KeyAlgorithm.RSA, 1024))
    for _ in range(5):
        with pytest.raises(KeyStoreError) as ei:
            h.decrypt(secrets.token_bytes(128), Padding.OAEP)
        assert ei.value.hresult == NTE_BAD_DATA
        with pytest.raises(KeyStoreError):
            h.sign(b"x", HashAlg.SHA256, Padding.OAEP)
    assert store.transient_handles() == 0


def test_objects_leaked_by_a_killed_process_are_swept(swtpm_factory: Callable[[], SwtpmInstance],
                                                     tmp_path: Path) -> None:
    """A process SIGKILLed mid-operation leaves its transient objects in swtpm (no resource
    manager flushes them); three such leaks used to exhaust its slots for good (0x902)."""
    from tpm2_pytss import (
        ESAPI,
        ESYS_TR,
        TPM2B_DATA,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPML_PCR_SELECTION,
    )
    from tpm2_pytss.TCTILdr import TCTILdr

    from keystores.tpm_session import _srk_template

    tpm = swtpm_factory()
    tcti = TCTILdr.parse(tpm.tcti)
    ectx = ESAPI(tcti)
    for _ in range(3):  # fill every object slot, then vanish without flushing
        ectx.create_primary(in_sensitive=TPM2B_SENSITIVE_CREATE(),
                            in_public=TPM2B_PUBLIC(publicArea=_srk_template(True)),
                            primary_handle=ESYS_TR.RH_OWNER, outside_info=TPM2B_DATA(),
                            creation_pcr=TPML_PCR_SELECTION())
    ectx.close()
    tcti.close()
    store = TpmKeyStore(tpm.tcti, tmp_path / "keys")
    assert store.transient_handles() == 3
    h = store.create(RSA)
    assert h.sign(b"after the sweep", HashAlg.SHA256)
    assert store.transient_handles() == 0


def test_decrypt_accepts_short_ciphertext(store: TpmKeyStore) -> None:
    """A ciphertext whose encoder dropped leading zero octets is I2OSP-padded back."""
    h = store.create(KeySpec(KeyAlgorithm.RSA, 1024))
    pub = _rsa(h.public_key())
    while True:
        ct = pub.encrypt(b"cek", padding.PKCS1v15())
        if ct[0] == 0:
            break
    assert h.decrypt(ct.lstrip(b"\0")) == b"cek"
    with pytest.raises(KeyStoreError, match="longer"):
        h.decrypt(b"\1" * 129)


def test_exportable_refused_up_front(store: TpmKeyStore) -> None:
    with pytest.raises(UnsupportedKeyError, match="fixedTPM"):
        store.check(KeySpec(KeyAlgorithm.EC, 256, exportable=True))
    with pytest.raises(UnsupportedKeyError):
        store.create(KeySpec(KeyAlgorithm.EC, 256, exportable=True))
    assert store.list_ids() == []


def test_concurrent_use_from_threads(store: TpmKeyStore) -> None:
    """asyncio.to_thread callers share a store: the per-store lock serialises TPM sessions."""
    keys = [store.create(EC) for _ in range(3)]

    def work(i: int) -> bool:
        k = keys[i % 3]
        data = f"msg {i}".encode()
        sig = k.sign(data, HashAlg.SHA384)
        _ec(k.public_key()).verify(sig, data, ec.ECDSA(hashes.SHA384()))
        return True

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(work, range(24)))
    assert store.transient_handles() == 0


def test_blob_of_another_tpm_is_refused_at_load(
        swtpm_factory: Callable[[], SwtpmInstance], store: TpmKeyStore) -> None:
    """State copied from another device: TPM2_Load fails its integrity check, clearly."""
    h = store.create(EC)
    other = swtpm_factory()
    with pytest.raises(KeyStoreError) as ei:
        TpmKeyStore(other.tcti, store.directory).load(h.key_id)
    assert "does not load" in ei.value.message
    assert "another TPM" in ei.value.advice
    assert ei.value.hresult & 0xFFFF0000 == 0x80280000  # TPM_20_E_* facility


# --- unreachable and restarted TPMs -----------------------------------------------------------

def _free_pair() -> int:
    """A port P with P+1 also free (swtpm's TCTI talks to the control channel on P+1)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", p + 1))
            except OSError:
                continue
        return p
    raise RuntimeError("no free port pair")


def _swtpm_at(state: Path, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [need_binary("swtpm"), "socket", "--tpm2", "--tpmstate", f"dir={state}",
         "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
         "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
         "--flags", "not-need-init,startup-clear"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc)
    wait_for_port(port + 1, proc)
    return proc


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[tuple[Path, int, list[subprocess.Popen[bytes]]]]:
    state = tmp_path / "swtpm-state"
    state.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    yield state, _free_pair(), procs
    for p in procs:
        stop_process(p)


def test_survives_swtpm_restart(
        tmp_path: Path, restartable: tuple[Path, int, list[subprocess.Popen[bytes]]]) -> None:
    state, port, procs = restartable
    procs.append(_swtpm_at(state, port))
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    store = TpmKeyStore(tcti, tmp_path / "keys")
    h = store.create(EC)
    from keystores.software import SoftwareKeyStore

    soft = SoftwareKeyStore(tmp_path / "soft", TpmSealer(tcti))  # passwords sealed by this TPM
    sh = soft.create(EC)
    stop_process(procs[-1])

    with pytest.raises(TpmUnavailableError):  # not "sealed under another machine key"
        soft.load(sh.key_id)

    with pytest.raises(TpmUnavailableError) as ei:
        h.sign(b"x", HashAlg.SHA256)
    assert f"port={port}" in ei.value.message
    assert ei.value.hresult == 0x8028400F  # TBS_E_TPM_NOT_FOUND
    assert "swtpm" in ei.value.advice
    with pytest.raises(TpmUnavailableError):
        store.load(h.key_id)

    procs.append(_swtpm_at(state, port))  # same state: same owner seed, same SRK
    sig = h.sign(b"x", HashAlg.SHA256)
    _ec(h.public_key()).verify(sig, b"x", ec.ECDSA(hashes.SHA256()))
    assert store.load(h.key_id).key_id == h.key_id
    assert soft.load(sh.key_id).public_key() == sh.public_key()


def test_probe_nothing_listening() -> None:
    port = _free_pair()
    with pytest.raises(TpmUnavailableError) as ei:
        probe_tpm(f"swtpm:host=127.0.0.1,port={port}", timeout=5)
    assert ei.value.hresult == 0x8028400F
    assert str(port) in ei.value.message
    assert "port + 1" in ei.value.advice  # the swtpm control channel, a common mistake


def test_probe_silent_peer_times_out() -> None:
    """Something accepts connections but never answers: the probe gives up on time."""
    port = _free_pair()
    with socket.socket() as a, socket.socket() as b:
        a.bind(("127.0.0.1", port))
        b.bind(("127.0.0.1", port + 1))
        a.listen()
        b.listen()
        t0 = time.monotonic()
        with pytest.raises(TpmUnavailableError, match=r"did not answer within 0\.5 s"):
            probe_tpm(f"swtpm:host=127.0.0.1,port={port}", timeout=0.5)
        assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("tcti", ["", "nosuchtcti:foo", "device:/nonexistent/tpmrm0"])
def test_probe_bad_tcti(tcti: str) -> None:
    with pytest.raises(TpmUnavailableError) as ei:
        probe_tpm(tcti, timeout=5)
    assert ei.value.advice


def test_missing_tpm2_pytss_is_tpm_unavailable(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    from keystores import tpm, tpm_session

    monkeypatch.setattr(tpm_session, "_IMPORT_ERROR",
                        ImportError("No module named 'tpm2_pytss'"))
    with pytest.raises(TpmUnavailableError, match="tpm2-pytss") as ei:
        tpm.TpmKeyStore("swtpm:", tmp_path)
    assert "dmagent[tpm]" in ei.value.advice


# --- sealing ------------------------------------------------------------------------------------

def test_sealer_round_trip_and_binding(swtpm: SwtpmInstance,
                                       swtpm_factory: Callable[[], SwtpmInstance]) -> None:
    sealer = TpmSealer(swtpm.tcti)
    machine_key = secrets.token_bytes(32)
    blob = sealer.seal(machine_key, "machine-key")
    assert machine_key not in blob
    assert sealer.unseal(blob, "machine-key") == machine_key
    assert TpmSealer(swtpm.tcti).unseal(blob, "machine-key") == machine_key  # a restart
    assert sealer.seal(machine_key, "machine-key") != blob  # fresh key and nonce each time

    with pytest.raises(KeyStoreError, match="another purpose"):
        sealer.unseal(blob, "key:other")
    damaged = bytearray(blob)
    damaged[-1] ^= 1
    with pytest.raises(KeyStoreError):
        sealer.unseal(bytes(damaged), "machine-key")
    with pytest.raises(KeyStoreError, match="damaged"):
        sealer.unseal(blob[:40], "machine-key")
    with pytest.raises(KeyStoreError, match="damaged"):
        sealer.unseal(b"DMS1" + blob[4:], "machine-key")

    other = swtpm_factory()
    with pytest.raises(KeyStoreError) as ei:
        TpmSealer(other.tcti).unseal(blob, "machine-key")
    assert "another TPM" in ei.value.advice
    assert sealer._conn.transient_handles() == 0


def test_sealer_protects_software_keys(swtpm: SwtpmInstance, tmp_path: Path) -> None:
    """The chain the agent builds: software KSP passwords sealed by the TPM."""
    from keystores.software import SoftwareKeyStore

    store = SoftwareKeyStore(tmp_path / "keys", TpmSealer(swtpm.tcti))
    h = store.create(EC)
    again = SoftwareKeyStore(tmp_path / "keys", TpmSealer(swtpm.tcti)).load(h.key_id)
    assert again.public_key() == h.public_key()


def test_measure_rsa2048_create(store: TpmKeyStore, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a benchmark: a sanity bound (swtpm takes ~0.1-0.3 s) that also reports the time."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        store.create(RSA)
        times.append(time.perf_counter() - t0)
    with capsys.disabled():
        print(f"\nTPM RSA-2048 create on swtpm: {', '.join(f'{t:.3f}' for t in times)} s")
    assert min(times) < 3
