"""ClientCertificateInstall SCEP: the seed 001 Atomic, registry layout, sealing, task, status."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.certstore import CertStore, StoreName, thumbprint
from agent.certstore import Scope as StoreScope
from agent.config import TasksConfig
from agent.csp.clientcertificateinstall import ScepNodeRef, remove_from_my
from agent.csp.scep_values import challenge_purpose, read_install
from agent.diagnostics import HResult, to_signed
from agent.dmtree.uri import Scope
from agent.registry import RegType
from agent.sealing import SealError
from agent.syncml.messages import Command
from agent.taskstore import SYSTEM_SID, TaskStore, task_name
from tests.unit.dmtree_support import (
    UNIQUE_ID,
    USER_SID,
    Env,
    add,
    atomic,
    codes,
    delete,
    exec_,
    get,
    get_code,
    make_env,
    rep,
    results,
    scep,
    snapshot,
    value_of,
)

CHALLENGE = "PENlcnRFbnJvbGxUb2tlbj48RGF0YT48Q2VydEVucm9sbENoYWxsZW5nZT5NSUlOQVFZ"
CA_THUMB = "0C93E3B330AC0F3770CCED39CE5EDCBD23919305"
SCEP_URL = "https://joyndes-blueear.msappproxy.net/certsrv/mscep/mscep.dll/"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def seed_atomic(scope: str, uid: str = UNIQUE_ID) -> list[Command]:
    """The SCEP profile of seed 001 (Intune, as traced by SyncML Viewer)."""
    base = f"{scep(scope, uid)}/Install"
    return [atomic("19",
                   rep("3", f"{base}/ServerURL", SCEP_URL),
                   rep("4", f"{base}/Challenge", CHALLENGE),
                   rep("7", f"{base}/SubjectName", "CN=joymalya"),
                   rep("14", f"{base}/CAThumbprint", CA_THUMB),
                   rep("15", f"{base}/SubjectAlternativeNames",
                       "11+joymalya@contoso.com;2+joymalya@contoso.com"),
                   exec_("18", f"{base}/Enroll"))]


def expected_keys(scope: str, uid: str = UNIQUE_ID) -> tuple[str, str, str]:
    hive = "HKLM" if scope == "Device" else f"HKU\\{USER_SID}"
    node = f"{hive}\\Software\\Microsoft\\SCEP\\MS DM Server\\{uid}"
    return hive, node, f"{node}\\Install"


@pytest.mark.parametrize("scope", ["Device", "User"])
def test_seed_atomic_lands_where_windows_keeps_it(env: Env, scope: str) -> None:
    out = env.run(*seed_atomic(scope))
    assert codes(out) == [("Atomic", "19", 200), ("Replace", "3", 200), ("Replace", "4", 200),
                          ("Replace", "7", 200), ("Replace", "14", 200), ("Replace", "15", 200),
                          ("Exec", "18", 200)]
    reg = env.registry
    _, node, install = expected_keys(scope)
    assert reg.get_value(install, "ServerURL").type is RegType.REG_SZ
    assert reg.query(install, "ServerURL") == SCEP_URL
    assert reg.query(install, "SubjectName") == "CN=joymalya"
    assert reg.query(install, "CAThumbprint") == CA_THUMB
    assert reg.query(install, "SubjectAlternativeNames") == (
        "11+joymalya@contoso.com;2+joymalya@contoso.com")
    sealed = reg.get_value(install, "Challenge")
    assert sealed.type is RegType.REG_BINARY
    assert isinstance(sealed.data, bytes) and CHALLENGE.encode() not in sealed.data
    assert env.ctx.sealer.unseal(sealed.data, challenge_purpose(reg, install)) == \
        CHALLENGE.encode()
    assert (reg.query(node, "Status"), reg.query(node, "ErrorCode")) == (32, 0)

    sid = SYSTEM_SID if scope == "Device" else USER_SID
    hive_arg = "HKLM" if scope == "Device" else "HKCU"
    task = TaskStore(reg).get(env.enrollment.enrollment_id, task_name(UNIQUE_ID, sid))
    rel = f"Software\\Microsoft\\SCEP\\MS DM Server\\{UNIQUE_ID}\\Install"
    assert task.name == UNIQUE_ID + sid
    assert task.action == f'dmagent certinst -s -k "{rel}" -h {hive_arg} -t {UNIQUE_ID}'
    assert (task.attempts, task.attempts_made, task.interval_seconds, task.next_run_ms) == (
        3, 0, 60, int(env.clock.now * 1000))
    assert (task.hive, task.install_key, task.unique_id) == (hive_arg, rel, UNIQUE_ID)

    (event,) = env.ctx.events.read()
    assert event.event_id == 306
    assert event.data["install_sid"] == sid
    assert CHALLENGE not in event.message

    out = env.run(get("30", f"{scep(scope)}/Status", f"{scep(scope)}/ErrorCode",
                      f"{scep(scope)}/CertThumbprint"))
    assert codes(out) == [("Get", "30", 200)]
    items = results(out)[0].items
    assert [(i.meta.format if i.meta else None, i.data) for i in items] == [
        ("int", "32"), ("int", "0"), ("chr", "")]


def test_challenge_clear_text_is_nowhere_in_the_database(env: Env) -> None:
    env.run(*seed_atomic("Device"), *seed_atomic("User"))
    db = env.ctx.config.registry_path
    raw = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))
    assert raw and CHALLENGE.encode() not in raw
    assert CHALLENGE.encode("utf-16-le") not in raw
    logged = (env.ctx.config.events_path.read_bytes())
    assert CHALLENGE.encode() not in logged


def test_sealed_challenge_is_bound_to_its_value_path(env: Env) -> None:
    env.run(*seed_atomic("Device"))
    _, _, install = expected_keys("Device")
    blob = env.registry.query(install, "Challenge")
    assert isinstance(blob, bytes)
    other = install.replace(UNIQUE_ID, "Other")
    with pytest.raises(SealError):
        env.ctx.sealer.unseal(blob, challenge_purpose(env.registry, other))
    # any spelling of the same key unseals: the purpose is case-folded
    assert env.ctx.sealer.unseal(blob, challenge_purpose(env.registry, install.lower())) == \
        CHALLENGE.encode()


def test_user_purpose_via_hkcu_matches_hku(env: Env) -> None:
    env.run(*seed_atomic("User"))
    rel = f"Software\\Microsoft\\SCEP\\MS DM Server\\{UNIQUE_ID}\\Install"
    settings = read_install(env.registry, env.ctx.sealer, f"HKCU\\{rel}")
    assert settings.challenge == CHALLENGE


def test_read_install_applies_the_csp_defaults(env: Env) -> None:
    env.run(*seed_atomic("Device"))
    s = read_install(env.registry, env.ctx.sealer, expected_keys("Device")[2])
    assert s.server_urls == (SCEP_URL,)
    assert s.challenge == CHALLENGE
    assert (s.key_protection, s.retry_delay, s.retry_count, s.key_length) == (3, 5, 3, 2048)
    assert s.subject_alternative_names == ((11, "joymalya@contoso.com"),
                                           (2, "joymalya@contoso.com"))
    assert s.ca_thumbprint == CA_THUMB and s.hash_algorithms == ("SHA-2",)


def test_retry_count_above_30_is_stored_but_used_as_30(env: Env) -> None:
    base = f"{scep()}/Install"
    assert codes(env.run(rep("1", f"{base}/RetryCount", "45", "int"))) == [
        ("Replace", "1", 200)]
    assert value_of(env, f"{base}/RetryCount") == ("int", "45")
    assert read_install(env.registry, env.ctx.sealer,
                        expected_keys("Device")[2]).retry_count == 30


def test_get_of_unknown_unique_id_is_404(env: Env) -> None:
    for leaf in ("Status", "ErrorCode", "CertThumbprint", "RespondentServerUrl", "Install"):
        assert get_code(env, f"{scep(uid='NoSuchProfile')}/{leaf}") == 404
    assert get_code(env, scep(uid="NoSuchProfile")) == 404


def test_status_nodes_are_get_only_and_challenge_write_only(env: Env) -> None:
    env.run(*seed_atomic("Device"))
    out = env.run(rep("1", f"{scep()}/Status", "1", "int"),
                  delete("2", f"{scep()}/ErrorCode"),
                  get("3", f"{scep()}/Install/Challenge"),
                  get("4", f"{scep()}/Install/Enroll"),
                  exec_("5", f"{scep()}/Install/ServerURL"))
    assert [c for _, _, c in codes(out)] == [405, 405, 405, 405, 405]


def test_add_on_existing_nodes_is_418(env: Env) -> None:
    out = env.run(add("1", scep(uid="P1"), None, "node"), add("2", scep(uid="P1"), None, "node"),
                  add("3", f"{scep(uid='P1')}/Install/KeyLength", "2048", "int"),
                  add("4", f"{scep(uid='P1')}/Install/KeyLength", "4096", "int"),
                  rep("5", f"{scep(uid='P1')}/Install/KeyLength", "4096", "int"))
    assert [c for _, _, c in codes(out)] == [200, 418, 200, 418, 200]
    assert value_of(env, f"{scep(uid='P1')}/Install/KeyLength") == ("int", "4096")


def test_the_ms_docs_example_atomic_with_add(env: Env) -> None:
    base = f"{scep(uid='MSDocs')}/Install"
    out = env.run(atomic(
        "300", add("301", scep(uid="MSDocs"), None, "node"),
        add("302", f"{base}/RetryCount", "1", "int"), add("303", f"{base}/RetryDelay", "1", "int"),
        add("304", f"{base}/KeyUsage", "160", "int"),
        add("305", f"{base}/KeyLength", "1024", "int"),
        add("306", f"{base}/HashAlgorithm", "SHA-1", "chr"),
        add("307", f"{base}/SubjectName", "CN=ContosoCSP", "chr"),
        add("308", f"{base}/SubjectAlternativeNames", "", "chr"),
        add("309", f"{base}/ValidPeriod", "Years", "chr"),
        add("310", f"{base}/ValidPeriodUnits", "1", "int"),
        add("311", f"{base}/EKUMapping", "1.3.6.1.4.1.311.10.3.12+1.3.6.1.5.5.7.3.2", "chr"),
        add("312", f"{base}/KeyProtection", "3", "int"),
        add("313", f"{base}/ServerURL", "http://contoso.com/certsrv/mscep/mscep.dll", "chr"),
        add("314", f"{base}/Challenge", "1234CB055B7EBF384A9486A22B7559A5", "chr"),
        add("315", f"{base}/CAThumbprint", CA_THUMB, "chr"), exec_("316", f"{base}/Enroll")))
    assert {c for _, _, c in codes(out)} == {200}
    assert value_of(env, f"{base}/KeyUsage") == ("int", "160")
    fmt, data = value_of(env, base)
    assert fmt == "node" and data is not None and "Challenge" in data.split("/")


@pytest.mark.parametrize(("node", "value", "fmt"), [
    ("ServerURL", "", None), ("ServerURL", "ftp://ca.example/scep", None),
    ("ServerURL", "https://ok.example/scep;not a url", None),
    ("Challenge", "", None),
    ("EKUMapping", "1.3.6.1.5.5.7.3.2+clientAuth", None),
    ("KeyUsage", "1", "int"), ("KeyUsage", "0", "int"), ("KeyUsage", "-128", "int"),
    ("KeyUsage", "0x80", "int"),
    ("SubjectName", "joymalya", None),
    ("KeyProtection", "0", "int"), ("KeyProtection", "5", "int"),
    ("RetryDelay", "0", "int"),
    ("RetryCount", "-1", "int"),
    ("KeyLength", "3072", "int"),
    ("HashAlgorithm", "SHA-256", None), ("HashAlgorithm", "SHA-1+MD5", None),
    ("CAThumbprint", "12345087E648875D1DF5D9F9FF89DD10", None),
    ("SubjectAlternativeNames", "joymalya@contoso.com", None),
    ("SubjectAlternativeNames", "4+x", None),
    ("SubjectAlternativeNames", "8+not-an-ip", None),
    ("SubjectAlternativeNames", "2+no-at-sign", None),
    ("SubjectAlternativeNames", "3+", None),
    ("ValidPeriod", "Weeks", None),
    ("ValidPeriodUnits", "-3", "int"),
    ("TemplateName", "bad\x00name", None),
])
def test_invalid_install_values_are_400_and_not_stored(env: Env, node: str, value: str,
                                                       fmt: str | None) -> None:
    target = f"{scep()}/Install/{node}"
    assert codes(env.run(rep("1", target, value, fmt))) == [("Replace", "1", 400)]
    assert not env.registry.key_exists(expected_keys("Device")[1])


@pytest.mark.parametrize(("node", "value", "fmt", "stored"), [
    ("ServerURL", "https://a.example/scep;http://b.example:8080/x", None,
     "https://a.example/scep;http://b.example:8080/x"),
    ("KeyUsage", "32", "int", 32), ("KeyUsage", "+160", "int", 160),
    ("KeyProtection", "1", "int", 1), ("KeyProtection", "4", "int", 4),
    ("RetryDelay", "1", "int", 1), ("RetryCount", "0", "int", 0),
    ("KeyLength", "4096", "int", 4096),
    ("HashAlgorithm", "SHA-1+SHA-2+sha-3", None, "SHA-1+SHA-2+sha-3"),
    ("CAThumbprint", "0c 93 e3 b3 30 ac 0f 37 70 cc ed 39 ce 5e dc bd 23 91 93 05", None,
     "0c 93 e3 b3 30 ac 0f 37 70 cc ed 39 ce 5e dc bd 23 91 93 05"),
    ("SubjectAlternativeNames", "3+host.contoso.com;8+10.0.0.1;8+::1;7+https://x/;9+1.2.3",
     None, "3+host.contoso.com;8+10.0.0.1;8+::1;7+https://x/;9+1.2.3"),
    ("SubjectAlternativeNames", "", None, ""),
    ("SubjectName", 'CN="Doe, John",OU=IT,O=Contoso', None, 'CN="Doe, John",OU=IT,O=Contoso'),
    ("ValidPeriod", "months", None, "months"), ("ValidPeriodUnits", "0", "int", 0),
    ("TemplateName", "1.3.6.1.4.1.311.21.8.1", None, "1.3.6.1.4.1.311.21.8.1"),
    ("ContainerName", "c", None, "c"), ("AADKeyIdentifierList", "a;b", None, "a;b"),
    ("CustomTextToShowInPrompt", "Hello", None, "Hello"), ("EKUMapping", "", None, ""),
])
def test_valid_install_values_are_stored_with_their_type(env: Env, node: str, value: str,
                                                         fmt: str | None,
                                                         stored: object) -> None:
    target = f"{scep()}/Install/{node}"
    assert codes(env.run(rep("1", target, value, fmt))) == [("Replace", "1", 200)]
    got = env.registry.get_value(expected_keys("Device")[2], node)
    assert got.data == stored
    assert got.type is (RegType.REG_DWORD if isinstance(stored, int) else RegType.REG_SZ)


def test_status_after_the_job_and_after_the_certificate_is_gone(env: Env) -> None:
    env.run(*seed_atomic("Device"))
    _, node, _ = expected_keys("Device")
    der = _cert("joymalya")
    tp = thumbprint(der)
    with env.registry.transaction():  # what the enrollment job writes on success
        CertStore(env.registry).add(StoreScope.DEVICE, StoreName.MY, der, unique_id=UNIQUE_ID)
        env.registry.set_dword(node, "Status", 1)
        env.registry.set_dword(node, "ErrorCode", 0)
        env.registry.set_sz(node, "CertThumbprint", tp)
        env.registry.set_sz(node, "RespondentServerUrl", SCEP_URL + "pkiclient.exe")
    assert value_of(env, f"{scep()}/Status") == ("int", "1")
    assert value_of(env, f"{scep()}/CertThumbprint") == ("chr", tp)
    assert value_of(env, f"{scep()}/RespondentServerUrl") == ("chr", SCEP_URL + "pkiclient.exe")
    CertStore(env.registry).delete(StoreScope.DEVICE, StoreName.MY, tp)
    # what a Windows 11 host answers once the certificate was removed
    assert value_of(env, f"{scep()}/Status") == ("int", "16")
    assert value_of(env, f"{scep()}/ErrorCode") == ("int", "-2146885628")
    assert value_of(env, f"{scep()}/CertThumbprint") == ("chr", "")


def test_error_code_is_reported_as_signed_decimal(env: Env) -> None:
    env.run(*seed_atomic("Device"))
    env.registry.set_dword(expected_keys("Device")[1], "Status", 16)
    env.registry.set_dword(expected_keys("Device")[1], "ErrorCode",
                           HResult.HTTP_E_STATUS_SERVER_ERROR)
    assert value_of(env, f"{scep()}/ErrorCode") == ("int", "-2145844748")
    assert to_signed(HResult.HTTP_E_STATUS_SERVER_ERROR) == -2145844748


def test_delete_removes_node_task_and_calls_the_certificate_hook(env: Env) -> None:
    env.run(*seed_atomic("Device"), *seed_atomic("User"))
    _, node, _ = expected_keys("Device")
    env.registry.set_sz(node, "CertThumbprint", "AB" * 20)
    tasks = TaskStore(env.registry)
    assert len(tasks.list()) == 2
    assert codes(env.run(delete("1", scep()))) == [("Delete", "1", 200)]
    assert not env.registry.key_exists(node)
    assert [t.hive for t in tasks.list()] == ["HKCU"]  # the user's task stays
    assert env.removed == [ScepNodeRef(Scope.DEVICE, "MS DM Server", UNIQUE_ID, node, "AB" * 20)]
    assert get_code(env, f"{scep()}/Status") == 404
    assert codes(env.run(delete("2", scep()))) == [("Delete", "2", 404)]


def test_delete_inside_a_failed_atomic_keeps_everything(env: Env) -> None:
    env.run(*seed_atomic("Device"))
    before = snapshot(env.registry)
    out = env.run(atomic("1", delete("2", scep()), rep("3", "./DevInfo/DmV", "2")))
    assert codes(out) == [("Atomic", "1", 507), ("Delete", "2", 216), ("Replace", "3", 405)]
    assert snapshot(env.registry) == before


def test_default_hook_removes_the_nodes_certificates(env: Env) -> None:
    store = CertStore(env.registry)
    mine, other = _cert("mine"), _cert("other")
    store.add(StoreScope.DEVICE, StoreName.MY, mine, unique_id=UNIQUE_ID)
    store.add(StoreScope.DEVICE, StoreName.MY, other, unique_id="SomethingElse")
    remove_from_my(env.registry, ScepNodeRef(Scope.DEVICE, "MS DM Server", UNIQUE_ID,
                                             "HKLM\\x", ""))
    assert [c.thumbprint for c in store.list_store(StoreScope.DEVICE, StoreName.MY)] == [
        thumbprint(other)]


def test_exec_enroll_twice_rearms_the_same_task(env: Env) -> None:
    env.run(*seed_atomic("Device"))
    tasks = TaskStore(env.registry)
    name = task_name(UNIQUE_ID, SYSTEM_SID)
    first = tasks.record_attempt(env.enrollment.enrollment_id, name, 5)
    assert first.attempts_made == 1
    env.clock.now += 3600
    assert codes(env.run(exec_("9", f"{scep()}/Install/Enroll"))) == [("Exec", "9", 200)]
    again = tasks.get(env.enrollment.enrollment_id, name)
    assert (again.id, again.attempts_made, again.next_run_ms) == (
        first.id, 0, int(env.clock.now * 1000))
    assert len(env.ctx.events.read()) == 2


def test_task_trigger_follows_the_config(tmp_path: Path) -> None:
    env = make_env(tmp_path, tasks=TasksConfig(attempts=5, interval_seconds=2.5))
    env.run(*seed_atomic("Device"))
    (task,) = TaskStore(env.registry).list()
    assert (task.attempts, task.interval_seconds) == (5, 2)


def test_exec_enroll_needs_install_values_and_an_enrollment(tmp_path: Path) -> None:
    env = make_env(tmp_path, enrolled=False)
    assert codes(env.run(exec_("1", f"{scep()}/Install/Enroll"))) == [("Exec", "1", 404)]
    env.run(rep("2", f"{scep()}/Install/ServerURL", SCEP_URL))
    assert codes(env.run(exec_("3", f"{scep()}/Install/Enroll"))) == [("Exec", "3", 500)]
    assert TaskStore(env.registry).list() == []


def test_interior_gets_and_case_insensitive_names(env: Env) -> None:
    env.run(*seed_atomic("Device"))
    assert value_of(env, "./Device/Vendor/MSFT/ClientCertificateInstall") == (
        "node", "PFXCertInstall/SCEP")
    assert value_of(env, "./Device/Vendor/MSFT/ClientCertificateInstall/SCEP") == (
        "node", UNIQUE_ID)
    assert value_of(env, "./Vendor/MSFT/ClientCertificateInstall/PFXCertInstall") == ("node", "")
    assert value_of(env, scep()) == (
        "node", "Install/CertThumbprint/Status/ErrorCode/RespondentServerUrl")
    assert value_of(env, f"./device/vendor/msft/clientcertificateinstall/scep/"
                         f"{UNIQUE_ID.lower()}/install/subjectname") == ("chr", "CN=joymalya")
    assert value_of(env, "./User/Vendor/MSFT/ClientCertificateInstall/SCEP") == ("node", "")


def test_delete_of_single_install_values(env: Env) -> None:
    env.run(*seed_atomic("Device"))
    out = env.run(delete("1", f"{scep()}/Install/Challenge"),
                  delete("2", f"{scep()}/Install/Challenge"),
                  delete("3", f"{scep()}/Install"), get("4", f"{scep()}/Install"))
    assert [c for _, _, c in codes(out)] == [200, 404, 200, 404]
    assert get_code(env, f"{scep()}/Status") == 200


def _cert(cn: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)
