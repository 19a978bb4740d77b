"""agent.csr: Install values -> PKCS#10, table-driven, checked by parsing with `cryptography`."""

from __future__ import annotations

import ipaddress

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.csr import (
    CsrRequest,
    build_csr,
    csr_hash,
    key_usage_names,
    name_to_str,
    parse_key_usage,
    parse_sans,
    parse_subject,
    parse_valid_period,
    subject_der,
)
from agent.diagnostics import HResult
from agent.errors import PeerError
from keystores.base import HashAlg
from tests.scep_support import CryptoKeyHandle

CN, ORG, OU = NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME
EMAIL = NameOID.EMAIL_ADDRESS


def _rdns(text: str) -> list[list[tuple[str, str]]]:
    return [[(a.oid, a.value) for a in rdn] for rdn in parse_subject(text)]


@pytest.mark.parametrize(("text", "expected"), [
    ("CN=joymalya", [[("2.5.4.3", "joymalya")]]),
    ("CN=a, O=b", [[("2.5.4.3", "a")], [("2.5.4.10", "b")]]),
    ("CN=a;O=b", [[("2.5.4.3", "a")], [("2.5.4.10", "b")]]),
    ("CN=a; O=b, OU=c", [[("2.5.4.3", "a")], [("2.5.4.10", "b")], [("2.5.4.11", "c")]]),
    # quoted values keep separators, doubled quotes are one quote
    ('CN=a, O="x, y"', [[("2.5.4.3", "a")], [("2.5.4.10", "x, y")]]),
    ('O="Contoso; ""Ltd"" + Co"', [[("2.5.4.10", 'Contoso; "Ltd" + Co')]]),
    ('CN=" padded "', [[("2.5.4.3", " padded ")]]),
    ('CN="a=b"', [[("2.5.4.3", "a=b")]]),
    # multi-valued RDN
    ("CN=a + OU=b, O=c", [[("2.5.4.3", "a"), ("2.5.4.11", "b")], [("2.5.4.10", "c")]]),
    # unquoted values are trimmed; keys are case-insensitive
    ("  cn =  spaced value  ,o=x", [[("2.5.4.3", "spaced value")], [("2.5.4.10", "x")]]),
    # a backslash is an ordinary character in CertStrToName (DOMAIN\user subjects)
    ("CN=CONTOSO\\jdoe", [[("2.5.4.3", "CONTOSO\\jdoe")]]),
    ("E=user@example.com", [[("1.2.840.113549.1.9.1", "user@example.com")]]),
    ("EMAIL=user@example.com", [[("1.2.840.113549.1.9.1", "user@example.com")]]),
    ("STREET=1 Main St, L=Town, S=State, C=US",
     [[("2.5.4.9", "1 Main St")], [("2.5.4.7", "Town")], [("2.5.4.8", "State")],
      [("2.5.4.6", "US")]]),
    ("DC=corp, DC=example", [[("0.9.2342.19200300.100.1.25", "corp")],
                             [("0.9.2342.19200300.100.1.25", "example")]]),
    ("SERIALNUMBER=ABC123, SN=Doe, G=Jane, T=Eng, I=J",
     [[("2.5.4.5", "ABC123")], [("2.5.4.4", "Doe")], [("2.5.4.42", "Jane")],
      [("2.5.4.12", "Eng")], [("2.5.4.43", "J")]]),
    ("OID.2.5.4.3=byoid", [[("2.5.4.3", "byoid")]]),
    ("1.2.3.4=custom", [[("1.2.3.4", "custom")]]),
    ("", []),
    ("CN=München", [[("2.5.4.3", "München")]]),
])
def test_subject_parsing(text: str, expected: list[list[tuple[str, str]]]) -> None:
    assert _rdns(text) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("CN", "has no '='"),
    ("CN=a,", "ends with a separator"),
    ("CN=a, FOO=b", "unknown attribute 'FOO'"),
    ('CN="open', "quoted value is not closed"),
    ('CN="a"b', "unexpected 'b' after a quoted value"),
    ("CN=", "CN has an empty value"),
    ("C=USA", "not a two-letter country code"),
    ("E=jörg@example.com", "must be ASCII"),
    ("=x", "is not an attribute name"),
    ("1.2.3.4=#zz", "is not hex-encoded DER"),
])
def test_subject_errors_name_node_and_value(text: str, why: str) -> None:
    with pytest.raises(PeerError) as err:
        parse_subject(text)
    assert err.value.hresult == HResult.E_INVALIDARG
    assert "Install/SubjectName" in err.value.message
    assert repr(text) in err.value.message
    assert why in err.value.message


@pytest.mark.parametrize(("text", "oid", "tag"), [
    ("CN=plain", "2.5.4.3", 0x13),  # PrintableString when it fits
    ("CN=with_underscore", "2.5.4.3", 0x0C),  # '_' is not printable: UTF8String
    ("CN=München", "2.5.4.3", 0x0C),
    ("C=US", "2.5.4.6", 0x13),
    ("E=a@b.c", "1.2.840.113549.1.9.1", 0x16),  # IA5String
    ("DC=corp", "0.9.2342.19200300.100.1.25", 0x16),
])
def test_subject_string_types(text: str, oid: str, tag: int) -> None:
    from asn1crypto import x509 as ax509

    name = ax509.Name.load(subject_der(text))
    atv = name.chosen[0][0]
    assert atv["type"].dotted == oid
    assert atv["value"].dump()[0] == tag


def test_hex_value_is_verbatim_der() -> None:
    from asn1crypto import x509 as ax509

    der = subject_der("1.2.3.4=#0c03616263")

    atv = ax509.Name.load(der).chosen[0][0]
    assert atv["value"].dump() == bytes.fromhex("0c03616263")


@pytest.mark.parametrize("text", [
    "CN=a, O=b", 'CN=a, O="x, y"', 'O="say ""hi"""', 'CN=" lead"', "CN=a + OU=b, O=c",
    "E=a@b.c, DC=corp, C=US", 'CN="#notcomment"', 'CN="x;y"', "CN=CONTOSO\\jdoe",
])
def test_name_to_str_round_trip(text: str) -> None:
    der = subject_der(text)
    assert subject_der(name_to_str(der)) == der


_value = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")),
                 min_size=1, max_size=20)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["CN", "O", "OU", "L", "STREET", "T"]), _value),
                min_size=1, max_size=5))
def test_any_value_round_trips_through_certnametostr_quoting(
        pairs: list[tuple[str, str]]) -> None:
    from asn1crypto import x509 as ax509

    text = ", ".join(f'{k}="{v.replace(chr(34), chr(34) * 2)}"' for k, v in pairs)
    der = subject_der(text)
    values = [rdn[0]["value"].native for rdn in ax509.Name.load(der).chosen]
    assert values == [v for _, v in pairs]
    assert subject_der(name_to_str(der)) == der


# --- SubjectAlternativeNames ----------------------------------------------------------------

def _san(text: str) -> x509.SubjectAlternativeName:
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = CryptoKeyHandle(rsa.generate_private_key(65537, 1024))
    csr = x509.load_der_x509_csr(build_csr(CsrRequest(subject="CN=x", subject_alt_names=text),
                                           key))
    return csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


@pytest.mark.parametrize(("text", "expected"), [
    ("2+user@example.com", [x509.RFC822Name("user@example.com")]),
    ("3+host.example.com", [x509.DNSName("host.example.com")]),
    ("7+https://example.com/a?b=c+d", [x509.UniformResourceIdentifier(
        "https://example.com/a?b=c+d")]),  # only the first '+' splits
    ("8+10.1.2.3", [x509.IPAddress(ipaddress.ip_address("10.1.2.3"))]),
    ("8+2001:db8::1", [x509.IPAddress(ipaddress.ip_address("2001:db8::1"))]),
    ("9+1.2.3.4.5", [x509.RegisteredID(ObjectIdentifier("1.2.3.4.5"))]),
    ("11+user@contoso.com", [x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"),
                                            bytes.fromhex("0c10") + b"user@contoso.com")]),
    ("1+u@c.com", [x509.OtherName(ObjectIdentifier("1.3.6.1.4.1.311.20.2.3"),
                                  bytes.fromhex("0c07") + b"u@c.com")]),
    ("5+CN=dir, O=x", [x509.DirectoryName(x509.Name([
        x509.NameAttribute(CN, "dir"), x509.NameAttribute(ORG, "x")]))]),
    (" 3+a.example ; 2+b@example.com ;", [x509.DNSName("a.example"),
                                          x509.RFC822Name("b@example.com")]),
    ("3+bücher.example", [x509.DNSName("xn--bcher-kva.example")]),
])
def test_san_formats(text: str, expected: list[x509.GeneralName]) -> None:
    assert list(_san(text)) == expected


@pytest.mark.parametrize(("text", "why"), [
    ("3", "is not <format>+<value>"),
    ("3+", "is not <format>+<value>"),
    ("4+x400", "is not a supported name format"),
    ("x+y", "is not a supported name format"),
    ("8+999.1.1.1", "is not an IPv4 or IPv6 address"),
    ("9+not.an.oid", "is not an OID"),
    ("2+no-at-sign", "has no '@'"),
    ("7+no-scheme", "has no scheme"),
    ("3+a b", "is not a DNS name"),
])
def test_san_errors(text: str, why: str) -> None:
    with pytest.raises(PeerError) as err:
        parse_sans(text)
    assert err.value.hresult == HResult.E_INVALIDARG
    assert "Install/SubjectAlternativeNames" in err.value.message
    assert why in err.value.message


# --- KeyUsage, EKU, template, validity, hash --------------------------------------------------

@pytest.mark.parametrize(("value", "names"), [
    (160, ["digitalSignature", "keyEncipherment"]),
    ("128", ["digitalSignature"]),
    ("32", ["keyEncipherment"]),
    ("0xA0", ["digitalSignature", "keyEncipherment"]),
    (0x80 | 0x40 | 0x10 | 0x08, ["digitalSignature", "nonRepudiation", "dataEncipherment",
                                 "keyAgreement"]),
    (0x8028, ["keyEncipherment", "keyAgreement", "decipherOnly"]),
])
def test_key_usage_bits(value: int | str, names: list[str]) -> None:
    assert key_usage_names(parse_key_usage(value)) == names


@pytest.mark.parametrize("value", ["0", "16", "abc", "0x10000", "-1", "0x4000", "0x21",
                                   "0x8020"])
def test_key_usage_errors(value: str) -> None:
    with pytest.raises(PeerError) as err:
        parse_key_usage(value)
    assert err.value.hresult == HResult.E_INVALIDARG
    assert "Install/KeyUsage" in err.value.message


@pytest.mark.parametrize(("bits", "der"), [
    (160, "030205a0"),  # digitalSignature + keyEncipherment, 5 unused bits
    (0x80, "03020780"),
    (0x20, "03020520"),
    (0x29, "03020029"),  # + keyAgreement + encipherOnly (bit 7): no unused bits
    (0x8028, "0303072880"),  # + keyAgreement + decipherOnly (bit 8): two bytes
])
def test_key_usage_extension_der(bits: int, der: str) -> None:
    key = CryptoKeyHandle.rsa(1024)
    csr = x509.load_der_x509_csr(build_csr(CsrRequest(subject="CN=x", key_usage=bits), key))
    ext = csr.extensions.get_extension_for_class(x509.KeyUsage)
    assert ext.critical
    assert ext.value.public_bytes().hex() == der
    assert ext.value.digital_signature == bool(bits & 0x80)
    assert ext.value.key_encipherment == bool(bits & 0x20)


@pytest.mark.parametrize(("period", "units", "expected"), [
    ("Days", "30", ("Days", 30)), ("years", 2, ("Years", 2)), ("Months", "0", None),
    ("", "", None), ("Weeks", "3", ("Weeks", 3)),
])
def test_valid_period(period: str, units: str | int,
                      expected: tuple[str, int] | None) -> None:
    got = parse_valid_period(period, units)
    assert (None if got is None else (got[0].value, got[1])) == expected


@pytest.mark.parametrize(("period", "units", "node"), [
    ("Fortnights", "2", "ValidPeriod"), ("Days", "x", "ValidPeriodUnits"),
    ("Days", "-1", "ValidPeriodUnits"), ("", "5", "ValidPeriod"),
])
def test_valid_period_errors(period: str, units: str, node: str) -> None:
    with pytest.raises(PeerError) as err:
        parse_valid_period(period, units)
    assert f"Install/{node}" in err.value.message


@pytest.mark.parametrize("value", ["SHA-1", "SHA-2", "SHA-1+SHA-2", "sha-3", "SHA-2+SHA-3"])
def test_csr_hash_is_at_least_sha256(value: str) -> None:
    assert csr_hash(value) is HashAlg.SHA256


def test_csr_hash_rejects_unknown() -> None:
    with pytest.raises(PeerError, match="Install/HashAlgorithm"):
        csr_hash("MD5")


# --- the whole request ----------------------------------------------------------------------

def test_full_csr_round_trip() -> None:
    key = CryptoKeyHandle.rsa(2048)
    req = CsrRequest(subject='CN=device1, O="Contoso, Ltd", OU=IT, E=dev@contoso.com',
                     subject_alt_names="3+device1.contoso.com;11+user@contoso.com;8+10.0.0.7",
                     key_usage=160, eku="1.3.6.1.5.5.7.3.2+1.3.6.1.4.1.311.10.3.4",
                     template_name="WiFiUser", valid_period="Years", valid_period_units=2,
                     hash_algorithm="SHA-1", challenge="s3cret-challenge")
    csr = x509.load_der_x509_csr(build_csr(req, key))
    assert csr.is_signature_valid
    assert csr.signature_hash_algorithm is not None
    assert csr.signature_hash_algorithm.name == "sha256"  # SHA-1 asked, SHA-256 is the floor
    assert csr.subject.get_attributes_for_oid(ORG)[0].value == "Contoso, Ltd"
    assert csr.subject.get_attributes_for_oid(EMAIL)[0].value == "dev@contoso.com"
    assert [a.oid for a in csr.subject] == [CN, ORG, OU, EMAIL]  # written order kept
    eku = csr.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH,
                         ObjectIdentifier("1.3.6.1.4.1.311.10.3.4")]
    template = csr.extensions.get_extension_for_oid(ObjectIdentifier("1.3.6.1.4.1.311.20.2"))
    assert template.value.value == b"\x1e\x10" + "WiFiUser".encode("utf-16-be")  # BMPString
    challenge = csr.attributes.get_attribute_for_oid(ObjectIdentifier("1.2.840.113549.1.9.7"))
    assert challenge.value == b"s3cret-challenge"
    assert challenge._type == 0x13  # PrintableString
    pairs = csr.attributes.get_attribute_for_oid(ObjectIdentifier("1.3.6.1.4.1.311.13.2.1"))
    from asn1crypto import core

    from agent.scep.cms import ber_elements

    found = []
    assert pairs._type == 0x30  # one value: SEQUENCE OF EnrollmentNameValuePair
    for _, _, _, pair, _ in ber_elements(pairs.value):
        name, value = (core.BMPString.load(e[4]).native for e in ber_elements(pair))
        found.append((name, value))
    assert found == [("ValidityPeriod", "Years"), ("ValidityPeriodUnits", "2")]
    public = key.public_key()
    public.verify(csr.signature, csr.tbs_certrequest_bytes, padding.PKCS1v15(),  # type: ignore[union-attr]
                  hashes.SHA256())


def test_challenge_utf8_when_not_printable() -> None:
    key = CryptoKeyHandle.rsa(1024)
    csr = x509.load_der_x509_csr(build_csr(CsrRequest(subject="CN=x", challenge="pa_ss{ü}"),
                                           key))
    attr = csr.attributes.get_attribute_for_oid(ObjectIdentifier("1.2.840.113549.1.9.7"))
    assert attr._type == 0x0C
    assert attr.value.decode() == "pa_ss{ü}"


def test_challenge_not_in_repr() -> None:
    assert "topsecret" not in repr(CsrRequest(subject="CN=x", challenge="topsecret"))


def test_ecdsa_key_csr() -> None:
    key = CryptoKeyHandle(ec.generate_private_key(ec.SECP256R1()))
    csr = x509.load_der_x509_csr(build_csr(CsrRequest(subject="CN=ec"), key))
    assert csr.is_signature_valid
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)


def test_empty_subject_makes_san_critical() -> None:
    key = CryptoKeyHandle.rsa(1024)
    csr = x509.load_der_x509_csr(build_csr(CsrRequest(subject="", subject_alt_names="3+a.b"),
                                           key))
    assert len(csr.subject) == 0
    assert csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_no_optional_parts_no_attributes() -> None:
    key = CryptoKeyHandle.rsa(1024)
    csr = x509.load_der_x509_csr(build_csr(CsrRequest(subject="CN=bare"), key))
    assert list(csr.attributes) == []
    assert list(csr.extensions) == []


def test_template_name_outside_bmp_is_refused() -> None:
    with pytest.raises(PeerError, match="Install/TemplateName"):
        build_csr(CsrRequest(subject="CN=x", template_name="Wi\U0001F600Fi"),
                  CryptoKeyHandle.rsa(1024))
