"""Lab profile delivery: the Atomic's content (device and user scope) and the (re)delivery
decision table (renewal, removal, failures, retry policy)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.syncml import codec
from agent.syncml.messages import Cmd, Container, ItemCommand
from lab.labdir import DeliveryPolicy
from lab.mdm.certindex import CertInfo
from lab.mdm.delivery import (
    CHALLENGE_PLACEHOLDER,
    CRYPT_E_NOT_FOUND_SIGNED,
    Action,
    decide,
    install_atomic,
    root_node,
    scep_node,
)
from lab.profiles import Scope, Var, expand_profile, parse_profile

ACCOUNT = "d70bf40e-1822-44b4-9ee5-0cc777c5bf70"
POLICY = "3b597a2d-27d2-45ff-bca6-57d2db6f17fb"
CA_THUMB = "0C93E3B330AC0F3770CCED39CE5EDCBD23919305"
VALUES = {Var.DEVICE_NAME: "pc1", Var.DEVICE_ID: "dev1", Var.AAD_DEVICE_ID: "dev1",
          Var.UPN: "joy@lab.test", Var.USER_NAME: "joy", Var.EMAIL: "joy@lab.test"}


def _profile(scope: str, **extra: Any) -> Any:
    data: dict[str, Any] = {
        "id": POLICY, "scope": scope, "subject": "CN={{DeviceName}}",
        "san": [{"type": "dns", "value": "{{DeviceName}}.lab.test"}],
        "ekus": ["client_auth"], "key_usage": 160, "key_protection": 2,
        "validity": {"period": "Months", "units": 6}, **extra}
    if scope == "user":
        data["subject"] = "CN={{UserName}}"
        data["san"] = [{"type": "upn", "value": "{{UserPrincipalName}}"}]
    return parse_profile(data)


def _atomic(scope: str, verb: Cmd = Cmd.REPLACE, **extra: Any) -> tuple[Container, str]:
    p = _profile(scope, **extra)
    e = expand_profile(p, ACCOUNT, VALUES)
    atomic = install_atomic(e, server_urls="https://a/scep;https://b/scep",
                            ca_thumbprint=CA_THUMB, verb=verb, add_node=verb is Cmd.ADD)
    return atomic, e.unique_id


@pytest.mark.parametrize(("scope", "root"), [("device", "./Device"), ("user", "./User")])
def test_atomic_holds_every_install_node_then_enroll(scope: str, root: str) -> None:
    atomic, uid = _atomic(scope)
    assert atomic.kind is Cmd.ATOMIC
    cmds = [c for c in atomic.commands if isinstance(c, ItemCommand)]
    assert len(cmds) == len(atomic.commands)
    base = f"{root}/Vendor/MSFT/ClientCertificateInstall/SCEP/{uid}/Install/"
    assert uid.startswith(f"ModelName_AC_{ACCOUNT}_LogicalName_3b597a2d_27d2_45ff_bca6_"
                          "57d2db6f17fb_Hash_")
    names = [(c.kind, (c.items[0].target or "").removeprefix(base)) for c in cmds]
    # Intune's order (seed 001): ServerURL, Challenge, …, CAThumbprint, SANs, …, Exec last
    assert names == [(Cmd.REPLACE, n) for n in (
        "ServerURL", "Challenge", "EKUMapping", "KeyUsage", "SubjectName", "KeyProtection",
        "RetryDelay", "RetryCount", "KeyLength", "HashAlgorithm", "CAThumbprint",
        "SubjectAlternativeNames", "ValidPeriod", "ValidPeriodUnits")] + [(Cmd.EXEC, "Enroll")]
    values = {n: (c.items[0].data, c.items[0].meta.format if c.items[0].meta else None)
              for (_, n), c in zip(names, cmds, strict=True)}
    assert values["ServerURL"] == ("https://a/scep;https://b/scep", "chr")
    assert values["Challenge"] == (CHALLENGE_PLACEHOLDER, "chr")
    assert values["EKUMapping"] == ("1.3.6.1.5.5.7.3.2", "chr")
    assert values["KeyUsage"] == ("160", "int") and values["KeyLength"] == ("2048", "int")
    assert values["KeyProtection"] == ("2", "int") and values["CAThumbprint"][0] == CA_THUMB
    assert values["ValidPeriod"] == ("Months", "chr") and values["ValidPeriodUnits"][0] == "6"
    assert values["HashAlgorithm"] == ("SHA-2", "chr")
    if scope == "device":
        assert values["SubjectName"][0] == "CN=pc1"
        assert values["SubjectAlternativeNames"][0] == "3+pc1.lab.test"
    else:
        assert values["SubjectName"][0] == "CN=joy"
        assert values["SubjectAlternativeNames"][0] == "11+joy@lab.test"
    assert values["Enroll"] == (None, None)
    # the renewal threshold never goes to the device
    assert "20" not in {v for v, _ in values.values() if v}
    # and it is valid SyncML for the agent's codec
    codec.decode(codec.encode(_wrap(atomic)))


def _wrap(c: Container) -> Any:
    from agent.syncml.messages import SyncHdr, SyncMLMessage

    return SyncMLMessage(SyncHdr("1", "1", "dev", "srv"), (c,), True)


def test_add_mode_adds_the_node_first() -> None:
    atomic, uid = _atomic("device", Cmd.ADD)
    first = atomic.commands[0]
    assert isinstance(first, ItemCommand) and first.kind is Cmd.ADD
    assert first.items[0].target == scep_node(Scope.DEVICE, uid)
    assert first.items[0].meta is not None and first.items[0].meta.format == "node"
    assert all(c.kind in (Cmd.ADD, Cmd.EXEC) for c in atomic.commands
               if isinstance(c, ItemCommand))


def test_optional_nodes_and_extra_overrides() -> None:
    atomic, _ = _atomic("device", san=[], template_name="Machine", container_name="c1",
                        extra_nodes={"KeyLength": "3000", "CustomTextToShowInPrompt": "hi"})
    got = {(c.items[0].target or "").rsplit("/", 1)[1]: c.items[0].data
           for c in atomic.commands if isinstance(c, ItemCommand)}
    assert "SubjectAlternativeNames" not in got
    assert got["TemplateName"] == "Machine" and got["ContainerName"] == "c1"
    assert got["KeyLength"] == "3000" and got["CustomTextToShowInPrompt"] == "hi"


def test_root_node_path() -> None:
    assert root_node(Scope.DEVICE, CA_THUMB) == (
        f"./Device/Vendor/MSFT/RootCATrustedCertificates/Root/{CA_THUMB}/EncodedCertificate")


def test_renewal_point() -> None:
    info = CertInfo("T", "1", not_before=1000.0, not_after=11000.0)
    assert info.renew_at(20) == 9000.0
    assert info.renew_at(50) == 6000.0


UID = "ModelName_AC_x_LogicalName_y_Hash_1"
POL = DeliveryPolicy()
VALID = 3600.0


def row(**kw: Any) -> dict[str, Any]:
    base = {"unique_id": UID, "state": "installed", "attempts": 1, "sessions_since": 0,
            "error_code": None, "detail": None, "last_sent": 0.0, "renew_at": None}
    return {**base, **kw}


@pytest.mark.parametrize(("d", "now", "policy", "renew_at", "action"), [
    (None, 0, POL, None, Action.DELIVER),
    (row(unique_id="other"), 0, POL, None, Action.DELIVER),  # profile edited: new node
    (row(state="pending"), 0, POL, None, Action.DELIVER),
    (row(state="not-applicable"), 0, POL, None, Action.DELIVER),
    (row(state="missing"), 0, POL, None, Action.DELIVER),  # Get Status → 404
    (row(state="removed-cert"), 0, POL, None, Action.DELIVER),  # no thumbprint
    (row(state="sent"), 0, POL, None, Action.WAIT),
    (row(state="installed"), 100, POL, 200.0, Action.NONE),
    (row(state="installed"), 200, POL, 200.0, Action.DELIVER),  # renewal threshold reached
    (row(state="installed"), 10**9, POL, None, Action.NONE),  # certificate unknown
    (row(state="failed", error_code=CRYPT_E_NOT_FOUND_SIGNED), 0, POL, None, Action.DELIVER),
    (row(state="failed", error_code=-2145844748), 0, POL, None, Action.WAIT),  # next session
    (row(state="failed", error_code=-2145844748, sessions_since=1), 0, POL, None,
     Action.DELIVER),
    (row(state="failed", sessions_since=1), 0, replace(POL, retry_failed=False), None,
     Action.NONE),
    (row(state="failed", sessions_since=5, attempts=3), 0, replace(POL, max_attempts=3), None,
     Action.NONE),
    (row(state="failed", sessions_since=0), 0, replace(POL, retry_after_sessions=0), None,
     Action.DELIVER),
    (row(state="atomic-failed", sessions_since=1), 0, POL, None, Action.DELIVER),
    (row(state="enrolling", last_sent=0.0), 100, POL, None, Action.WAIT),
    (row(state="delivered", last_sent=0.0), VALID + 301, POL, None, Action.DELIVER),
])
def test_decide(d: dict[str, Any] | None, now: float, policy: DeliveryPolicy,
                renew_at: float | None, action: Action) -> None:
    decision = decide(d, UID, now, policy, renew_at, VALID)
    assert decision.action is action, decision.reason
    assert decision.reason
