"""The lab's control operations, as JSON-ready values: one implementation, two ways in.

`LocalControl` works on the lab directory's state database directly; the HTTP control API of
`lab serve` (`/lab/...`, bearer token) exposes the same methods, and `HttpControl` is its client
(tests, `LabServer.client`, the CLI when a server is running). `connect(lab)` picks: the running
server for that directory if there is one, else local. The database is the single source of
truth either way (the server reads the queue, assignments and devices from it each session).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any, Protocol

from lab.labdir import LabDir
from lab.profiles import ProfileError, find_profile
from lab.state import LabState, Row

_TIME_KEYS = frozenset({"at", "first_seen", "last_session", "issued_at", "expires_at", "used_at",
                        "created", "sent_at", "done_at", "updated", "last_sent", "not_before",
                        "not_after", "renew_at", "expires", "started"})


class ControlError(Exception):
    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ControlNotFound(ControlError):
    status = 404


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def present(row: Row) -> dict[str, Any]:
    """A state row for JSON: times as ISO-8601 UTC strings, secrets left out."""
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k == "auth_password":
            out["auth_password_set"] = v is not None
            continue
        out[k] = iso(v) if k in _TIME_KEYS and isinstance(v, int | float) else v
    return out


class Control(Protocol):
    def status(self) -> dict[str, Any]: ...
    def devices(self) -> list[dict[str, Any]]: ...
    def device(self, device_id: str) -> dict[str, Any]: ...
    def set_device(self, device_id: str, **fields: Any) -> dict[str, Any]: ...
    def profiles(self) -> list[dict[str, Any]]: ...
    def assign(self, profile: str, *, device: str | None = None,
               group: str | None = None) -> dict[str, Any]: ...
    def unassign(self, profile: str, *, device: str | None = None,
                 group: str | None = None) -> dict[str, Any]: ...
    def enqueue(self, device_id: str, xml: str) -> dict[str, Any]: ...
    def command(self, command_id: int) -> dict[str, Any]: ...
    def commands(self, device_id: str, state: str | None = None) -> list[dict[str, Any]]: ...
    def messages(self, device_id: str, *, session: str | None = None, after: int = 0,
                 limit: int = 1000) -> list[dict[str, Any]]: ...
    def crs(self, device: str | None = None) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class LocalControl:
    def __init__(self, lab: LabDir, state: LabState | None = None) -> None:
        self.lab = lab
        self._own = state is None
        self.state = state if state is not None else LabState(lab.db_path)

    def close(self) -> None:
        if self._own:
            self.state.close()

    def status(self) -> dict[str, Any]:
        cfg = self.lab.config()
        return {"dir": str(self.lab.path), "account_id": cfg.account_id,
                "scep_url": cfg.scep_url, "scep_ca": cfg.scep_ca, "scep_depot": cfg.scep_depot,
                "devices": len(self.state.list_devices()),
                "profiles": len(self._profiles()), "server": self.lab.server_info()}

    def devices(self) -> list[dict[str, Any]]:
        return [present(d) for d in self.state.list_devices()]

    def device(self, device_id: str) -> dict[str, Any]:
        dev = self.state.get_device(device_id)
        if dev is None:
            raise ControlNotFound(f"no device {device_id!r} (it has not connected and was not "
                                  f"registered with set-device)")
        st = self.state
        return {
            **present(dev),
            "assigned": sorted(st.assigned_profiles(device_id)),
            "reported": {u: present(r) for u, r in st.reported(device_id).items()},
            "deliveries": [present(d) for d in st.deliveries(device_id)],
            "queued": [present(c) for c in st.commands(device_id, "queued")],
            "sessions": [present(s) for s in st.sessions(device_id)[-10:]],
            "challenges": [present(c) for c in st.challenges(device_id)[-20:]],
            "crs": [present(c) for c in st.crs(device_id)[-20:]],
        }

    def set_device(self, device_id: str, **fields: Any) -> dict[str, Any]:
        allowed = {"name", "upn", "serial", "aad_device_id", "groups", "auth_password"}
        bad = set(fields) - allowed
        if bad:
            raise ControlError(f"unknown device field(s): {', '.join(sorted(bad))}")
        if "groups" in fields and (not isinstance(fields["groups"], list) or
                                   not all(isinstance(g, str) for g in fields["groups"])):
            raise ControlError("groups must be a list of strings")
        for key in allowed - {"groups"}:
            if key in fields and fields[key] is not None and not isinstance(fields[key], str):
                raise ControlError(f"{key} must be a string")
        return present(self.state.set_device(device_id, **fields))

    def _profiles(self) -> dict[str, Any]:
        try:
            return self.lab.profiles()
        except ProfileError as exc:
            raise ControlError(str(exc)) from None

    def profiles(self) -> list[dict[str, Any]]:
        account = self.lab.config().account_id
        out = []
        for p in self._profiles().values():
            out.append({"id": p.id, "name": p.name, "scope": p.scope.value,
                        "file": str(p.source) if p.source else None,
                        "unique_id": p.unique_id(account), "request_id": p.request_id(account),
                        "renewal_threshold": p.renewal_threshold, "settings": p.settings(),
                        "assignments": [present(a) for a in self.state.assignments(p.id)]})
        return out

    def _target(self, profile: str, device: str | None, group: str | None) -> tuple[str, str,
                                                                                    str]:
        prof = find_profile(self._profiles(), profile)
        if prof is None:
            raise ControlNotFound(f"no profile {profile!r} in {self.lab.profiles_path}")
        if (device is None) == (group is None):
            raise ControlError("give exactly one of device or group")
        return (prof.id, "device", device) if device is not None else (prof.id, "group",
                                                                       str(group))

    def assign(self, profile: str, *, device: str | None = None,
               group: str | None = None) -> dict[str, Any]:
        pid, kind, target = self._target(profile, device, group)
        changed = self.state.assign(pid, kind, target)
        return {"profile_id": pid, "kind": kind, "target": target, "changed": changed}

    def unassign(self, profile: str, *, device: str | None = None,
                 group: str | None = None) -> dict[str, Any]:
        pid, kind, target = self._target(profile, device, group)
        changed = self.state.unassign(pid, kind, target)
        return {"profile_id": pid, "kind": kind, "target": target, "changed": changed}

    def enqueue(self, device_id: str, xml: str) -> dict[str, Any]:
        from lab.mdm.fragments import FragmentError, split_fragment

        try:
            parts = split_fragment(xml)
        except FragmentError as exc:
            raise ControlError(str(exc)) from None
        with self.state.transaction():
            ids = [self.state.enqueue(device_id, part, origin="api") for part in parts]
        return {"device_id": device_id, "ids": ids}

    def command(self, command_id: int) -> dict[str, Any]:
        row = self.state.get_command(command_id)
        if row is None:
            raise ControlNotFound(f"no command {command_id}")
        out = present(row)
        ids = row["cmd_ids"]["all"] if isinstance(row["cmd_ids"], dict) else []
        responses = (self.state.responses(row["device_id"], row["session_id"], ids)
                     if row["session_id"] else [])
        out["statuses"] = [present(r) for r in responses if r["kind"] == "Status"]
        out["results"] = [present(r) for r in responses if r["kind"] == "Results"]
        return out

    def commands(self, device_id: str, state: str | None = None) -> list[dict[str, Any]]:
        return [present(c) for c in self.state.commands(device_id, state)]

    def messages(self, device_id: str, *, session: str | None = None, after: int = 0,
                 limit: int = 1000) -> list[dict[str, Any]]:
        return [present(m) for m in self.state.messages(device_id, session_id=session,
                                                        after_id=after, limit=limit)]

    def crs(self, device: str | None = None) -> list[dict[str, Any]]:
        return [present(r) for r in self.state.crs(device)]


class HttpControl:
    """The control API over HTTPS (same methods, same JSON as LocalControl)."""

    def __init__(self, base_url: str, token: str, ca_bundle: str | None = None,
                 timeout: float = 30.0) -> None:
        import ssl

        import httpx

        self.base_url = base_url.rstrip("/")
        verify = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout, verify=verify,
                                    headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, *, body: Any = None,
              params: dict[str, Any] | None = None, raw: str | None = None) -> Any:
        kwargs: dict[str, Any] = {"params": {k: v for k, v in (params or {}).items()
                                             if v is not None}}
        if raw is not None:
            kwargs["content"] = raw.encode()
            kwargs["headers"] = {"Content-Type": "application/xml"}
        elif body is not None:
            kwargs["json"] = body
        resp = self._client.request(method, path, **kwargs)
        try:
            data = resp.json()
        except ValueError:
            data = {"error": resp.text}
        if resp.status_code == 404:
            raise ControlNotFound(data.get("error", resp.text))
        if resp.status_code >= 400:
            raise ControlError(f"HTTP {resp.status_code}: {data.get('error', resp.text)}")
        return data

    def status(self) -> dict[str, Any]:
        return dict(self._call("GET", "/lab/status"))

    def devices(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/lab/devices"))

    def device(self, device_id: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/lab/devices/{_q(device_id)}"))

    def set_device(self, device_id: str, **fields: Any) -> dict[str, Any]:
        return dict(self._call("PATCH", f"/lab/devices/{_q(device_id)}", body=fields))

    def profiles(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/lab/profiles"))

    def assign(self, profile: str, *, device: str | None = None,
               group: str | None = None) -> dict[str, Any]:
        return dict(self._call("POST", "/lab/assignments",
                               body={"profile": profile, "device": device, "group": group}))

    def unassign(self, profile: str, *, device: str | None = None,
                 group: str | None = None) -> dict[str, Any]:
        return dict(self._call("POST", "/lab/unassign",
                               body={"profile": profile, "device": device, "group": group}))

    def enqueue(self, device_id: str, xml: str) -> dict[str, Any]:
        return dict(self._call("POST", f"/lab/devices/{_q(device_id)}/commands", raw=xml))

    def command(self, command_id: int) -> dict[str, Any]:
        return dict(self._call("GET", f"/lab/commands/{int(command_id)}"))

    def commands(self, device_id: str, state: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/lab/devices/{_q(device_id)}/commands",
                               params={"state": state}))

    def messages(self, device_id: str, *, session: str | None = None, after: int = 0,
                 limit: int = 1000) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/lab/devices/{_q(device_id)}/messages",
                               params={"session": session, "after": after, "limit": limit}))

    def crs(self, device: str | None = None) -> list[dict[str, Any]]:
        return list(self._call("GET", "/lab/crs", params={"device": device}))


def _q(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def connect(lab: LabDir) -> Control:
    """The running server's control API for this lab, else local access to its state."""
    info = lab.server_info()
    if info and _alive(info.get("pid")) and info.get("url"):
        return HttpControl(str(info["url"]), lab.token(), str(lab.ca_cert_path))
    return LocalControl(lab)


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, default=str).encode()
