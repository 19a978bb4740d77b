"""Lab SCEP profiles: TOML parsing, validation, variable expansion, Intune's naming."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from lab import x500
from lab.profiles import (
    EXAMPLE_DIR,
    MissingVariableError,
    ProfileError,
    SanType,
    Scope,
    Var,
    expand_profile,
    find_profile,
    load_profiles,
    parse_profile,
)

ACCOUNT = "dede853d-e274-406b-9d0d-47b6fe65b440"
POLICY = "286033f4-0515-414d-b58f-08e74f6e8e3c"
BASE = {"id": POLICY, "subject": "CN={{DeviceName}}", "ekus": ["client_auth"],
        "key_usage": 160}


def prof(**changes: object) -> dict[str, object]:
    return {**BASE, **changes}


def test_example_profiles_load_and_expand() -> None:
    profiles = load_profiles(EXAMPLE_DIR)
    assert {p.scope for p in profiles.values()} == {Scope.DEVICE, Scope.USER}
    values = {Var.DEVICE_NAME: "host1", Var.AAD_DEVICE_ID: "aad-1", Var.DEVICE_ID: "dev-1",
              Var.UPN: "alice@lab.test", Var.USER_NAME: "alice", Var.EMAIL: "alice@lab.test"}
    for p in profiles.values():
        e = expand_profile(p, ACCOUNT, values)
        assert "{{" not in e.subject_text and "{{" not in e.san_text
    assert find_profile(profiles, "device-client-auth") is not None
    assert find_profile(profiles, POLICY.upper()) is not None
    assert find_profile(profiles, "nope") is None


def test_unique_id_and_request_id_follow_intune() -> None:
    p = parse_profile(prof(version=4))
    uid = p.unique_id(ACCOUNT)
    # seed 000: ModelName_AC_<acct>_LogicalName_<policy with _>_Hash_<signed int>
    assert re.fullmatch(rf"ModelName_AC_{ACCOUNT}_LogicalName_286033f4_0515_414d_b58f_"
                        r"08e74f6e8e3c_Hash_-?\d+", uid)
    # seed 001: ModelName=AC_<acct>/LogicalName_<policy>;Version=<v>;Hash=<n>
    assert p.request_id(ACCOUNT) == (f"ModelName=AC_{ACCOUNT}/LogicalName_286033f4_0515_414d_"
                                     f"b58f_08e74f6e8e3c;Version=4;Hash={p.hash_value}")
    assert -2**31 <= p.hash_value < 2**31


def test_hash_changes_with_settings_not_with_name() -> None:
    a = parse_profile(prof())
    assert parse_profile(prof(name="renamed")).hash_value == a.hash_value
    assert parse_profile(prof(key_length=4096)).hash_value != a.hash_value
    assert parse_profile(prof(version=2)).hash_value != a.hash_value
    assert parse_profile(prof(subject="CN={{DeviceName}},O=x")).hash_value != a.hash_value


@pytest.mark.parametrize(("changes", "message"), [
    ({"id": "not-a-guid"}, "not a GUID"),
    ({"scope": "tenant"}, "scope"),
    ({"subject": "CN"}, "missing '='"),
    ({"subject": "XX=a"}, "unknown attribute"),
    ({"subject": "CN={{NoSuchVar}}"}, "unknown variable"),
    ({"subject": "CN={{UserPrincipalName}}"}, "cannot use user variables"),
    ({"key_usage": 0x10}, "must include digital_signature"),
    ({"key_usage": ["sign_things"]}, "not one of"),
    ({"key_length": 3072}, "key_length"),
    ({"key_protection": 7}, "key_protection"),
    ({"hash_algorithm": "MD5"}, "hash_algorithm"),
    ({"validity": {"period": "Weeks", "units": 1}}, "validity.period"),
    ({"renewal_threshold": 0}, "renewal_threshold"),
    ({"retry_count": 31}, "retry_count"),
    ({"san": [{"type": "x400", "value": "a"}]}, "san[0].type"),
    ({"san": [{"type": "dns"}]}, "san[0]"),
    ({"ekus": ["1.2.x"]}, "ekus"),
    ({"colour": "blue"}, "unknown key"),
])
def test_invalid_profiles_are_refused_with_the_key(changes: dict[str, object],
                                                   message: str) -> None:
    with pytest.raises(ProfileError, match=re.escape(message)):
        parse_profile(prof(**changes))


def test_names_and_numbers_are_equivalent() -> None:
    a = parse_profile(prof(key_usage=["digital_signature", "key_encipherment"],
                           key_protection="tpm_if_present", ekus=["client_auth", "any"],
                           san=[{"type": "upn", "value": "{{DeviceName}}"}], scope="user"))
    b = parse_profile(prof(key_usage=160, key_protection=2,
                           ekus="1.3.6.1.5.5.7.3.2+2.5.29.37.0",
                           san=[{"type": 11, "value": "{{DeviceName}}"}], scope="user"))
    assert a.settings() == b.settings()
    assert a.sans[0].type is SanType.UPN


@pytest.mark.parametrize(("subject", "values", "text", "pairs"), [
    ("CN={{DeviceName}},OU=Devices", {Var.DEVICE_NAME: "pc1"}, "CN=pc1,OU=Devices",
     [("2.5.4.3", "pc1"), ("2.5.4.11", "Devices")]),
    # a value with a separator gets Windows quoting, the pair keeps the raw value
    ("CN={{DeviceName}}", {Var.DEVICE_NAME: "a,b"}, 'CN="a,b"', [("2.5.4.3", "a,b")]),
    ('O="Lab, ""Inc"""', {}, 'O="Lab, ""Inc"""', [("2.5.4.10", 'Lab, "Inc"')]),
    ("CN={{serialnumber}}+SERIALNUMBER={{SERIALNUMBER}}", {Var.SERIAL: "S1"},
     "CN=S1+SERIALNUMBER=S1", [("2.5.4.3", "S1"), ("2.5.4.5", "S1")]),
    ("E={{EmailAddress}};CN={{UserName}}", {Var.EMAIL: "a@b", Var.USER_NAME: "a"},
     "E=a@b,CN=a", [("1.2.840.113549.1.9.1", "a@b"), ("2.5.4.3", "a")]),
    ("OID.1.2.3.4=x", {}, "OID.1.2.3.4=x", [("1.2.3.4", "x")]),
])
def test_subject_expansion(subject: str, values: dict[Var, str], text: str,
                           pairs: list[tuple[str, str]]) -> None:
    p = parse_profile(prof(subject=subject, scope="user"))
    e = expand_profile(p, ACCOUNT, values)
    assert e.subject_text == text
    assert e.subject_pairs == pairs
    assert x500.pairs(x500.parse(e.subject_text)) == pairs  # what we send parses back


def test_missing_variable_value_names_the_variable() -> None:
    p = parse_profile(prof(subject="CN={{DeviceName}}",
                           san=[{"type": "dns", "value": "{{SerialNumber}}.lab"}]))
    with pytest.raises(MissingVariableError, match="SerialNumber"):
        expand_profile(p, ACCOUNT, {Var.DEVICE_NAME: "pc"})


def test_san_text_is_type_plus_value_joined_by_semicolons() -> None:
    p = parse_profile(prof(scope="user", san=[
        {"type": "upn", "value": "{{UserPrincipalName}}"},
        {"type": "dns", "value": "{{DeviceName}}.lab.test"},
        {"type": "ip", "value": "10.0.0.1"}]))
    e = expand_profile(p, ACCOUNT, {Var.UPN: "u@lab.test", Var.DEVICE_NAME: "pc"})
    assert e.san_text == "11+u@lab.test;3+pc.lab.test;8+10.0.0.1"


def test_load_profiles_refuses_duplicate_ids(tmp_path: Path) -> None:
    text = (EXAMPLE_DIR / "device-client-auth.toml").read_text()
    (tmp_path / "a.toml").write_text(text)
    (tmp_path / "b.toml").write_text(text)
    with pytest.raises(ProfileError, match="also used by"):
        load_profiles(tmp_path)


def test_trusted_root_is_relative_to_the_profile(tmp_path: Path) -> None:
    data = tomllib.loads((EXAMPLE_DIR / "device-client-auth.toml").read_text())
    p = parse_profile({**data, "trusted_root": "roots/ca.pem"}, base_dir=tmp_path)
    assert p.trusted_root == tmp_path / "roots" / "ca.pem"
