"""LocURI parsing: scopes, escapes, malformed and over-long URIs."""

from __future__ import annotations

import pytest

from agent.dmtree.errors import DMStatusError
from agent.dmtree.uri import (
    MAX_DEPTH,
    MAX_SEGMENT_LEN,
    MAX_TOTAL_LEN,
    Scope,
    encode_segment,
    parse_uri,
)


@pytest.mark.parametrize(("text", "scope", "segments", "canonical"), [
    ("./Device/Vendor/MSFT/NodeCache", Scope.DEVICE, ("Vendor", "MSFT", "NodeCache"),
     "./Device/Vendor/MSFT/NodeCache"),
    ("./Vendor/MSFT/NodeCache", Scope.DEVICE, ("Vendor", "MSFT", "NodeCache"),
     "./Device/Vendor/MSFT/NodeCache"),
    ("Vendor/MSFT/DMClient", Scope.DEVICE, ("Vendor", "MSFT", "DMClient"),
     "./Device/Vendor/MSFT/DMClient"),
    ("./User/Vendor/MSFT/ClientCertificateInstall", Scope.USER,
     ("Vendor", "MSFT", "ClientCertificateInstall"),
     "./User/Vendor/MSFT/ClientCertificateInstall"),
    ("./user/vendor/MSFT/X", Scope.USER, ("vendor", "MSFT", "X"), "./User/vendor/MSFT/X"),
    ("./device/Vendor/MSFT/X", Scope.DEVICE, ("Vendor", "MSFT", "X"), "./Device/Vendor/MSFT/X"),
    ("./DevInfo/DevId", Scope.GLOBAL, ("DevInfo", "DevId"), "./DevInfo/DevId"),
    ("./DevDetail", Scope.GLOBAL, ("DevDetail",), "./DevDetail"),
    (".", Scope.GLOBAL, (), "."),
    ("./Device", Scope.DEVICE, (), "./Device"),
    ("  ./DevInfo/Man \n", Scope.GLOBAL, ("DevInfo", "Man"), "./DevInfo/Man"),
    ("./Vendor/MSFT/NodeCache/MDM%20SyncML%20Server/Nodes/20", Scope.DEVICE,
     ("Vendor", "MSFT", "NodeCache", "MDM SyncML Server", "Nodes", "20"),
     "./Device/Vendor/MSFT/NodeCache/MDM%20SyncML%20Server/Nodes/20"),
    ("./Vendor/MSFT/X/caf%C3%A9", Scope.DEVICE, ("Vendor", "MSFT", "X", "café"),
     "./Device/Vendor/MSFT/X/caf%C3%A9"),
    ("./Vendor/MSFT/X/a.b", Scope.DEVICE, ("Vendor", "MSFT", "X", "a.b"),
     "./Device/Vendor/MSFT/X/a.b"),
])
def test_parse(text: str, scope: Scope, segments: tuple[str, ...], canonical: str) -> None:
    uri = parse_uri(text)
    assert (uri.scope, uri.segments, uri.canonical) == (scope, segments, canonical)
    assert uri.raw == text.strip()


@pytest.mark.parametrize(("text", "code"), [
    (None, 400),
    ("", 400),
    ("   ", 400),
    ("/Vendor/MSFT/X", 400),  # MS: LocURI can't start with '/'
    ("./Vendor//MSFT", 400),
    ("./Vendor/MSFT/", 400),
    ("./Vendor/MSFT/../X", 400),
    ("./Vendor/./MSFT", 400),
    ("./Vendor/MSFT/*", 400),  # MS: a node name can't be only '*'
    ("./Vendor/MSFT/%zz", 400),
    ("./Vendor/MSFT/%C3", 400),  # not UTF-8
    ("./Vendor/MSFT/a%5Cb", 400),  # backslash cannot be a registry key name
    ("./Vendor/MSFT/a%2Fb", 400),
    ("./Vendor/" + "x" * (MAX_SEGMENT_LEN + 1), 414),
    ("./" + "/".join(["a"] * (MAX_DEPTH + 2)), 414),
    ("./Vendor/" + "x" * MAX_TOTAL_LEN, 414),
])
def test_malformed(text: str | None, code: int) -> None:
    with pytest.raises(DMStatusError) as exc:
        parse_uri(text)
    assert exc.value.code == code


def test_limits_are_inclusive() -> None:
    assert parse_uri("./Vendor/" + "x" * MAX_SEGMENT_LEN).segments[-1] == "x" * MAX_SEGMENT_LEN
    assert len(parse_uri("./" + "/".join(["a"] * MAX_DEPTH)).segments) == MAX_DEPTH


@pytest.mark.parametrize(("name", "encoded"), [
    ("MS DM Server", "MS%20DM%20Server"), ("a/b", "a%2Fb"), ("x.y_z-1~", "x.y_z-1~"),
    ("é", "%C3%A9"), ("100%", "100%25")])
def test_encode_segment_round_trips(name: str, encoded: str) -> None:
    assert encode_segment(name) == encoded
    if "/" not in name:
        assert parse_uri(f"./Vendor/{encoded}").segments[-1] == name
