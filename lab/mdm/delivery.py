"""SCEP profile delivery like Intune (seeds 000/001): what to send a device, and what its answers
mean.

Per session, in two rounds:
- round A (the answer to package 1): inventory Gets on a device's first session (DeviceName,
  serial), and the follow-up Gets — `…/SCEP/<UniqueID>/Status`, `ErrorCode`, `CertThumbprint` —
  for every profile the device was sent (plus NodeCache ChangedNodes when NodeCache is on);
- round B (once round A is answered): for each assigned profile, `decide` whether to (re)deliver:
  the trusted root (`RootCATrustedCertificates/Root/<SHA1>/EncodedCertificate`, once per device),
  then one `Atomic` of Replace (or Add) of every Install node with a fresh challenge and
  `Exec …/Install/Enroll` last; a `Delete` of the node when a profile is no longer assigned.

Renewal is computed here from the issued certificate (CertIndex) and the profile's threshold;
the threshold never goes to the device. A failed profile is re-sent with a new challenge once the
retry policy allows (DeliveryPolicy), and at once when the device reports the certificate gone
(no thumbprint, or Status 16 with 0x80092004 CRYPT_E_NOT_FOUND).
"""

from __future__ import annotations

import base64
import enum
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.syncml import codec
from agent.syncml.messages import Cmd, Command, Container, Item, ItemCommand, Meta
from lab.challenge import thumbprint as cert_thumbprint
from lab.issue import issue_challenge
from lab.labdir import DeliveryPolicy, LabConfig, LabDir
from lab.mdm.certindex import CertIndex
from lab.pki import load_cert
from lab.profiles import (
    ExpandedProfile,
    MissingVariableError,
    ScepProfile,
    Scope,
    Var,
    expand_profile,
)
from lab.state import LabState, Row

CHALLENGE_PLACEHOLDER = "{{lab:challenge}}"
CRYPT_E_NOT_FOUND_SIGNED = -2146885628  # 0x80092004: the certificate is gone
INVENTORY_NODES = {"./DevDetail/Ext/Microsoft/DeviceName": "DeviceName",
                   "./DevDetail/Ext/Microsoft/SMBIOSSerialNumber": "SMBIOSSerialNumber"}
FOLLOWUP_NODES = ("Status", "ErrorCode", "CertThumbprint")
PENDING_GRACE = 300.0  # seconds past the challenge's validity before an unfinished enrollment
#                        is treated as lost (the device can no longer use that challenge)


def scep_node(scope: Scope | str, unique_id: str) -> str:
    return f"{Scope(scope).uri_root}/Vendor/MSFT/ClientCertificateInstall/SCEP/{unique_id}"


def root_node(scope: Scope | str, sha1: str) -> str:
    return (f"{Scope(scope).uri_root}/Vendor/MSFT/RootCATrustedCertificates/Root/{sha1}/"
            "EncodedCertificate")


@dataclass(frozen=True)
class Planned:
    xml: str
    purpose: dict[str, Any]


class Action(enum.Enum):
    DELIVER = "deliver"
    WAIT = "wait"
    NONE = "none"


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str


def decide(d: Row | None, unique_id: str, now: float, policy: DeliveryPolicy,
           renew_at: float | None, challenge_validity: float) -> Decision:
    """Whether an assigned profile must be (re)sent now. Pure: `d` is the delivery record."""
    if d is None:
        return Decision(Action.DELIVER, "assigned, never delivered")
    if d["unique_id"] != unique_id:
        return Decision(Action.DELIVER, f"profile changed (was {d['unique_id']})")
    state = d["state"]
    if state in ("pending", "not-applicable"):
        return Decision(Action.DELIVER, "not delivered yet")
    if state == "missing":
        return Decision(Action.DELIVER, "the device does not have the node (Get 404)")
    if state == "removed-cert":
        return Decision(Action.DELIVER, "the device reports no certificate thumbprint")
    if state == "sent":
        return Decision(Action.WAIT, "waiting for the Atomic's status")
    if state in ("failed", "atomic-failed"):
        if state == "failed" and d["error_code"] == CRYPT_E_NOT_FOUND_SIGNED:
            return Decision(Action.DELIVER, "certificate removed (0x80092004)")
        if not policy.retry_failed:
            return Decision(Action.NONE, "failed; retries are off")
        if policy.max_attempts and d["attempts"] >= policy.max_attempts:
            return Decision(Action.NONE, f"failed {d['attempts']} times; giving up")
        if d["sessions_since"] < policy.retry_after_sessions:
            return Decision(Action.WAIT, f"failed; retry after {policy.retry_after_sessions} "
                                         f"session(s)")
        what = (f"0x{d['error_code'] & 0xFFFFFFFF:08X}" if d["error_code"] is not None
                else d["detail"] or state)
        return Decision(Action.DELIVER, f"retry after failure ({what})")
    if state in ("delivered", "enrolling"):
        if d["last_sent"] is not None and now > d["last_sent"] + challenge_validity \
                + PENDING_GRACE:
            return Decision(Action.DELIVER, "enrollment unfinished after the challenge expired")
        return Decision(Action.WAIT, "enrollment in progress")
    if state == "installed":
        if renew_at is not None and now >= renew_at:
            return Decision(Action.DELIVER, "renewal threshold reached")
        return Decision(Action.NONE, "installed")
    return Decision(Action.NONE, f"state {state}")


def _cached(d: Row) -> bool:
    """Installed, and the device's NodeCache watches the thumbprint we know."""
    return bool(d["state"] == "installed" and d["nodecache_id"] and d["thumbprint"]
                and str(d["nodecache_expected"] or "").upper() == d["thumbprint"])


def device_values(device_id: str, dev: Row | None) -> dict[Var, str | None]:
    dev = dev or {}
    info = dev.get("info") or {}
    upn = dev.get("upn") or None
    return {
        Var.DEVICE_ID: device_id,
        Var.DEVICE_NAME: dev.get("name") or info.get("DeviceName"),
        Var.AAD_DEVICE_ID: dev.get("aad_device_id") or device_id,
        Var.SERIAL: dev.get("serial") or info.get("SMBIOSSerialNumber"),
        Var.FQDN: info.get("DNSComputerName"),
        Var.UPN: upn, Var.EMAIL: upn,
        Var.USER_NAME: upn.split("@", 1)[0] if upn else None,
    }


def _item(kind: Cmd, target: str, data: str | None = None, fmt: str | None = None) -> Command:
    return ItemCommand(kind, None, (Item(target=target, data=data,
                                         meta=Meta(format=fmt) if fmt else None),))


def install_atomic(e: ExpandedProfile, *, server_urls: str, ca_thumbprint: str, verb: Cmd,
                   add_node: bool) -> Container:
    """Intune's order (seed 001: CAThumbprint is the 12th Replace, SANs the 13th, Exec last)."""
    p = e.profile
    base = scep_node(p.scope, e.unique_id)
    nodes: list[tuple[str, str, str]] = [
        ("ServerURL", server_urls, "chr"), ("Challenge", CHALLENGE_PLACEHOLDER, "chr"),
        ("EKUMapping", "+".join(p.ekus), "chr"), ("KeyUsage", str(p.key_usage), "int"),
        ("SubjectName", e.subject_text, "chr"), ("KeyProtection", str(p.key_protection), "int"),
        ("RetryDelay", str(p.retry_delay), "int"), ("RetryCount", str(p.retry_count), "int"),
        ("TemplateName", p.template_name, "chr"), ("KeyLength", str(p.key_length), "int"),
        ("HashAlgorithm", "+".join(p.hash_algorithms), "chr"),
        ("CAThumbprint", ca_thumbprint, "chr"),
        ("SubjectAlternativeNames", e.san_text, "chr"),
        ("ValidPeriod", p.valid_period, "chr"),
        ("ValidPeriodUnits", str(p.valid_period_units), "int"),
        ("ContainerName", p.container_name, "chr"),
    ]
    extras = dict(p.extra_nodes)
    cmds: list[Command] = []
    if add_node:
        cmds.append(_item(Cmd.ADD, base, fmt="node"))
    for name, default, fmt in nodes:
        value = extras.pop(name, default)
        if not value:
            continue  # optional and empty: not sent (TemplateName, SANs, ContainerName)
        cmds.append(_item(verb, f"{base}/Install/{name}", value, fmt))
    for name, value in extras.items():
        cmds.append(_item(verb, f"{base}/Install/{name}", value, "chr"))
    cmds.append(_item(Cmd.EXEC, f"{base}/Install/Enroll"))
    return Container(Cmd.ATOMIC, None, tuple(cmds))


class Planner:
    """Delivery decisions for one request (holds the lab, its state and the time)."""

    def __init__(self, lab: LabDir, state: LabState, cfg: LabConfig,
                 profiles: dict[str, ScepProfile], certs: CertIndex, now: float) -> None:
        self.lab, self.state, self.cfg = lab, state, cfg
        self.profiles, self.certs, self.now = profiles, certs, now
        self._roots: dict[Path, x509.Certificate] = {}

    # --- session start and round A ----------------------------------------------------------

    def session_started(self, device_id: str) -> None:
        for d in self.state.deliveries(device_id):
            if d["state"] in ("failed", "atomic-failed"):
                self.state.put_delivery(device_id, d["profile_id"], self.now,
                                        sessions_since=d["sessions_since"] + 1)
            elif d["state"] == "sent":  # the Atomic's status never came back
                self.state.put_delivery(device_id, d["profile_id"], self.now, state="pending",
                                        detail="the Atomic was never answered")

    def round_a(self, device_id: str, first_session: bool) -> list[Planned]:
        out: list[Planned] = []
        dev = self.state.get_device(device_id) or {}
        if self.cfg.session.inventory and (first_session or not (dev.get("info") or {}).get(
                "DeviceName")) and not dev.get("name"):
            for uri in INVENTORY_NODES:
                out.append(Planned(codec.encode_command(_item(Cmd.GET, uri)),
                                   {"kind": "inventory", "uri": uri}))
        if not self.cfg.delivery.followup:
            return out
        cached = False
        for d in self.state.deliveries(device_id):
            if self.cfg.delivery.nodecache and _cached(d):
                cached = True  # the device's NodeCache tells us when it changes
            elif d["state"] in ("delivered", "enrolling", "installed", "failed",
                                "removed-cert"):
                out.append(self._followup(d))
        if cached:
            get = _item(Cmd.GET, f"{self.nodecache_root}/ChangedNodes")
            out.append(Planned(codec.encode_command(get), {"kind": "nodecache_changed"}))
        return out

    def _followup(self, d: Row) -> Planned:
        base = scep_node(d["scope"], d["unique_id"])
        gets = "".join(codec.encode_command(_item(Cmd.GET, f"{base}/{n}"))
                       for n in FOLLOWUP_NODES)
        return Planned(gets, {"kind": "followup", "profile": d["profile_id"],
                              "unique_id": d["unique_id"]})

    @property
    def nodecache_root(self) -> str:
        # Intune's provider is "MS DM Server": %-escaped in the URI (MS%20DM%20Server)
        return f"./Vendor/MSFT/NodeCache/{quote(self.cfg.provider_id, safe='')}"

    # --- round B ------------------------------------------------------------------------------

    def round_b(self, device_id: str) -> list[Planned]:
        out: list[Planned] = []
        assigned = self.state.assigned_profiles(device_id)
        dev = self.state.get_device(device_id)
        values = device_values(device_id, dev)
        roots_sent: set[tuple[str, str]] = set()
        validity = self.cfg.challenge.validity_minutes * 60.0
        for pid in sorted(assigned):
            profile = self.profiles.get(pid)
            if profile is None:
                continue  # assigned but its file is gone: nothing to deliver
            d = self.state.get_delivery(device_id, pid)
            uid = profile.unique_id(self.cfg.account_id)
            renew_at = d["renew_at"] if d is not None else None
            decision = decide(d, uid, self.now, self.cfg.delivery, renew_at, validity)
            if decision.action is not Action.DELIVER:
                if d is not None and decision.reason != (d["detail"] or ""):
                    self.state.put_delivery(device_id, pid, self.now, detail=decision.reason)
                continue
            planned = self._deliver(device_id, profile, d, values, decision.reason, roots_sent)
            out.extend(planned)
        if self.cfg.delivery.remove_on_unassign:
            for d in self.state.deliveries(device_id):
                if d["profile_id"] not in assigned and d["state"] != "removing":
                    node = scep_node(d["scope"], d["unique_id"])
                    out.append(Planned(codec.encode_command(_item(Cmd.DELETE, node)),
                                       {"kind": "remove", "profile": d["profile_id"],
                                        "unique_id": d["unique_id"]}))
                    self.state.put_delivery(device_id, d["profile_id"], self.now,
                                            state="removing", detail="profile unassigned")
        if self.cfg.delivery.nodecache:
            for d in self.state.deliveries(device_id):
                if d["profile_id"] in assigned and d["state"] == "installed" and \
                        d["scope"] == Scope.DEVICE.value and not _cached(d):
                    out.append(self._nodecache_setup(device_id, d))
        return out

    def _nodecache_setup(self, device_id: str, d: Row) -> Planned:
        """Watch the node's CertThumbprint: NodeURI + ExpectedValue, as Intune caches the
        certificate it expects (seed 000); a changed value shows up in ChangedNodes."""
        uri = f"{scep_node(d['scope'], d['unique_id'])}/CertThumbprint"
        reported = self.state.reported(device_id).get(uri)
        expected = (reported or {}).get("value") or d["thumbprint"]
        base = self.nodecache_root
        node_id = d["nodecache_id"]
        if node_id:
            cmds = [_item(Cmd.REPLACE, f"{base}/Nodes/{node_id}/ExpectedValue", expected, "chr")]
        else:
            used = [int(x["nodecache_id"]) for x in self.state.deliveries(device_id)
                    if str(x["nodecache_id"] or "").isdigit()]
            node_id = str(max(used, default=0) + 1)
            cmds = [_item(Cmd.ADD, base, fmt="node"),
                    _item(Cmd.ADD, f"{base}/Nodes/{node_id}", fmt="node"),
                    _item(Cmd.ADD, f"{base}/Nodes/{node_id}/NodeURI", uri, "chr"),
                    _item(Cmd.ADD, f"{base}/Nodes/{node_id}/ExpectedValue", expected, "chr")]
        return Planned("".join(codec.encode_command(c) for c in cmds),
                       {"kind": "nodecache_setup", "profile": d["profile_id"],
                        "node_id": node_id, "expected": expected})

    def _root(self, profile: ScepProfile) -> x509.Certificate | None:
        path_text = str(profile.trusted_root) if profile.trusted_root else self.cfg.scep_ca
        if not path_text:
            return None
        path = Path(path_text)
        if path not in self._roots:
            self._roots[path] = load_cert(path)
        return self._roots[path]

    def _deliver(self, device_id: str, profile: ScepProfile, d: Row | None,
                 values: dict[Var, str | None], reason: str,
                 roots_sent: set[tuple[str, str]]) -> list[Planned]:
        pid = profile.id
        uid = profile.unique_id(self.cfg.account_id)
        base = {"unique_id": uid, "scope": profile.scope.value}
        try:
            expanded = expand_profile(profile, self.cfg.account_id, values)
        except MissingVariableError as exc:
            self.state.put_delivery(device_id, pid, self.now, state="not-applicable",
                                    detail=f"cannot expand the profile: {exc}", **base)
            return []
        urls = ";".join(profile.scep_urls) or self.cfg.scep_url
        try:
            root = self._root(profile)
        except (OSError, ValueError) as exc:
            self.state.put_delivery(device_id, pid, self.now, state="not-applicable",
                                    detail=f"trusted root unreadable: {exc}", **base)
            return []
        ca_thumb = profile.ca_thumbprint or (cert_thumbprint(root) if root else "")
        if not urls or not ca_thumb:
            self.state.put_delivery(
                device_id, pid, self.now, state="not-applicable", **base,
                detail="no SCEP URL" if not urls else
                "no trusted root (set the profile's trusted_root or `lab serve --scep-ca`)")
            return []
        out: list[Planned] = []
        if root is not None:
            sha1 = cert_thumbprint(root)
            key = ("device", sha1)
            if key not in roots_sent and not self.state.has_root(device_id, "device", sha1):
                der = root.public_bytes(serialization.Encoding.DER)
                add = _item(Cmd.ADD, root_node(Scope.DEVICE, sha1),
                            base64.b64encode(der).decode(), "b64")
                out.append(Planned(codec.encode_command(add),
                                   {"kind": "root", "scope": "device", "thumbprint": sha1}))
                roots_sent.add(key)
        first = d is None or d["unique_id"] != uid
        verb = Cmd.ADD if first and self.cfg.delivery.install_verb == "Add" else Cmd.REPLACE
        atomic = install_atomic(expanded, server_urls=urls, ca_thumbprint=ca_thumb, verb=verb,
                                add_node=verb is Cmd.ADD)
        out.append(Planned(codec.encode_command(atomic),
                           {"kind": "deliver", "profile": pid, "unique_id": uid,
                            "reason": reason}))
        attempts = 1 if first else (d["attempts"] if d else 0) + 1
        self.state.put_delivery(device_id, pid, self.now, state="sent", attempts=attempts,
                                last_sent=self.now, sessions_since=0, status=None,
                                error_code=None, detail=reason, **base)
        return out

    # --- at send time -------------------------------------------------------------------------

    def materialize(self, device_id: str, purpose: dict[str, Any],
                    cmds: tuple[Command, ...]) -> tuple[tuple[Command, ...], str | None, str]:
        """Put a fresh challenge into a delivery's Atomic → (commands, challenge id, token)."""
        if purpose.get("kind") != "deliver":
            return cmds, None, ""
        profile = self.profiles.get(str(purpose["profile"]))
        if profile is None:
            raise LookupError(f"profile {purpose['profile']} disappeared")
        dev = self.state.get_device(device_id)
        expanded = expand_profile(profile, self.cfg.account_id, device_values(device_id, dev))
        now = datetime.fromtimestamp(self.now, UTC)
        token, claims = issue_challenge(self.lab, self.state, expanded, device_id, now,
                                        cfg=self.cfg)

        def fill(c: Command) -> Command:
            if isinstance(c, Container):
                return replace(c, commands=tuple(fill(s) for s in c.commands))
            if isinstance(c, ItemCommand):
                return replace(c, items=tuple(
                    replace(i, data=token) if i.data == CHALLENGE_PLACEHOLDER else i
                    for i in c.items))
            return c

        self.state.put_delivery(device_id, profile.id, self.now,
                                challenge_id=claims.challenge_id)
        return tuple(fill(c) for c in cmds), claims.challenge_id, token

    # --- answers --------------------------------------------------------------------------

    def handle(self, device_id: str, purpose: dict[str, Any],
               answers: list[tuple[int | None, list[dict[str, Any]]]]) -> list[Planned]:
        """`answers`: per top-level command of the row, its Status code and Results items.
        Returns more round-A commands when the answer calls for them (NodeCache changes)."""
        kind = purpose.get("kind")
        if kind == "nodecache_changed":
            return self._nodecache_changed(device_id, answers[0])
        if kind == "nodecache_setup":
            if all(code in (200, 418) for code, _ in answers):
                self.state.put_delivery(device_id, str(purpose["profile"]), self.now,
                                        nodecache_id=str(purpose["node_id"]),
                                        nodecache_expected=str(purpose["expected"]))
            else:
                self.state.put_delivery(device_id, str(purpose["profile"]), self.now,
                                        detail=f"NodeCache set-up answered "
                                               f"{[c for c, _ in answers]}")
            return []
        if kind == "inventory":
            code, items = answers[0]
            if code == 200 and items and items[0].get("data"):
                name = INVENTORY_NODES.get(str(purpose["uri"]), str(purpose["uri"]))
                self.state.merge_device_info(device_id, {name: str(items[0]["data"])})
        elif kind == "root":
            if answers[0][0] in (200, 418):
                self.state.add_root(device_id, str(purpose["scope"]),
                                    str(purpose["thumbprint"]), self.now)
        elif kind == "deliver":
            self._delivered(device_id, purpose, answers)
        elif kind == "followup":
            self._followed_up(device_id, purpose, answers)
        elif kind == "remove":
            code = answers[0][0]
            if code in (200, 404):
                self.state.delete_delivery(device_id, str(purpose["profile"]))
            else:  # tried again at the next session (round B re-sends unless "removing")
                self.state.put_delivery(device_id, str(purpose["profile"]), self.now,
                                        state="remove-failed", detail=f"Delete answered {code}")
        return []

    def _nodecache_changed(self, device_id: str,
                           answer: tuple[int | None, list[dict[str, Any]]]) -> list[Planned]:
        code, items = answer
        cached = [d for d in self.state.deliveries(device_id) if _cached(d)]
        if code != 200:  # the cache is gone (e.g. a reset device): read everything, set up again
            for d in cached:
                self.state.put_delivery(device_id, d["profile_id"], self.now, nodecache_id=None,
                                        nodecache_expected=None)
            return [self._followup(d) for d in cached]
        text = str(items[0].get("data") or "") if items else ""
        changed = {x for x in re.split(r"[,/\s]+", text) if x}
        out = []
        for d in cached:
            if d["nodecache_id"] in changed:
                self.state.put_delivery(device_id, d["profile_id"], self.now,
                                        detail="NodeCache: CertThumbprint changed",
                                        nodecache_expected=None)
                out.append(self._followup(d))
        return out

    def _delivered(self, device_id: str, purpose: dict[str, Any],
                   answers: list[tuple[int | None, list[dict[str, Any]]]]) -> None:
        code = answers[0][0]
        pid = str(purpose["profile"])
        if code == 200:
            self.state.put_delivery(device_id, pid, self.now, state="delivered",
                                    detail=f"Atomic 200 ({purpose.get('reason', '')})")
        else:
            self.state.put_delivery(device_id, pid, self.now, state="atomic-failed",
                                    sessions_since=0, status=code,
                                    detail=f"the device answered the Atomic {code}")

    def _followed_up(self, device_id: str, purpose: dict[str, Any],
                     answers: list[tuple[int | None, list[dict[str, Any]]]]) -> None:
        pid = str(purpose["profile"])
        d = self.state.get_delivery(device_id, pid)
        if d is None or d["unique_id"] != purpose["unique_id"]:
            return
        values: dict[str, str] = {}
        codes: dict[str, int | None] = {}
        for name, (code, items) in zip(FOLLOWUP_NODES, answers, strict=False):
            codes[name] = code
            if code == 200 and items:
                values[name] = str(items[0].get("data") or "")
        if codes.get("Status") == 404:
            self.state.put_delivery(device_id, pid, self.now, state="missing", status=None,
                                    detail="Get Status answered 404: the node is gone")
            return
        try:
            status = int(values["Status"]) if values.get("Status") else None
            error = int(values["ErrorCode"]) if values.get("ErrorCode") else None
        except ValueError:
            self.state.put_delivery(device_id, pid, self.now,
                                    detail=f"unreadable Status/ErrorCode {values}")
            return
        thumb = values.get("CertThumbprint", "").strip().upper()
        fields: dict[str, Any] = {"status": status, "error_code": error,
                                  "thumbprint": thumb or None}
        if status == 1 and thumb:
            fields["state"] = "installed"
            info = self.certs.find(thumb)
            if info is not None:
                profile = self.profiles.get(pid)
                threshold = profile.renewal_threshold if profile else 20
                fields.update(not_before=info.not_before, not_after=info.not_after,
                              renew_at=info.renew_at(threshold))
            else:
                fields.update(not_before=None, not_after=None, renew_at=None,
                              detail="installed; certificate not in the CA records "
                                     "(renewal cannot be computed)")
        elif status == 1:
            fields["state"] = "removed-cert"
        elif status == 16:
            fields["state"] = "failed"
            if d["state"] != "failed":
                fields["sessions_since"] = 0
        elif status in (2, 32):
            fields["state"] = "enrolling"
        self.state.put_delivery(device_id, pid, self.now, **fields)
