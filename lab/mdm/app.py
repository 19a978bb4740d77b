"""The lab's ASGI application: the OMA-DM endpoint and the JSON control API on one server.

- `POST /ManagementServer/MDM.svc[/…][?mode=Maintenance&Platform=WoA]`: SyncML (MdmEngine).
- `/lab/…`: the control API (bearer token from `control.token`), see `lab.control`:
  GET status, devices, devices/{id}, devices/{id}/commands, devices/{id}/messages, profiles,
  commands/{n}, crs; PATCH devices/{id}; POST devices/{id}/commands (raw SyncML), assignments,
  unassign. `GET /lab/health` needs no token.

Plain ASGI (no framework): uvicorn serves it. Requests are handled one at a time on the event
loop: each is a few SQLite statements in one transaction, so there is nothing to overlap, and a
single writer keeps the session logic free of races.
"""

from __future__ import annotations

import hmac
import json
import time
import traceback
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote

from lab.asgi import BodyTooLarge, Receive, Scope, Send, read_body
from lab.control import ControlError, ControlNotFound, LocalControl, dumps
from lab.labdir import LabDir
from lab.mdm.engine import MdmEngine
from lab.state import LabState

MAX_BODY = 8 * 1024 * 1024


class LabApp:
    def __init__(self, lab: LabDir, *, clock: Callable[[], float] = time.time) -> None:
        self.lab = lab
        self.state = LabState(lab.db_path)
        self.engine = MdmEngine(lab, self.state, clock=clock)
        self.control = LocalControl(lab, self.state)
        self.token = lab.token()
        self.mdm_path = lab.config().server_path.rstrip("/").lower()

    def close(self) -> None:
        self.state.close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1").split("?", 1)[0]
        method = scope["method"]
        try:
            body = await read_body(receive, MAX_BODY)
        except BodyTooLarge:
            await _respond(send, 413, b"request body too large\n", "text/plain")
            return
        lowered = path.lower().rstrip("/")
        if lowered == self.mdm_path or lowered.startswith(self.mdm_path + "/"):
            await self._mdm(scope, method, path, body, send)
        elif path == "/lab/health":
            await _respond(send, 200, b'{"ok": true}', "application/json")
        elif path.startswith("/lab/"):
            await self._control(scope, method, path, body, send)
        else:
            await _respond(send, 404, b"not found\n", "text/plain")

    async def _mdm(self, scope: Scope, method: str, path: str, body: bytes, send: Send) -> None:
        if method != "POST":
            await _respond(send, 405, b"SyncML is POSTed\n", "text/plain",
                           extra=[(b"allow", b"POST")])
            return
        url = f"{scope.get('scheme', 'https')}://{_host(scope)}{path}"
        try:
            reply = self.engine.handle(body, url)
        except Exception:  # a lab bug must show up in the answer, not kill the server
            await _respond(send, 500, traceback.format_exc().encode(), "text/plain")
            return
        await _respond(send, reply.status, reply.body, reply.content_type)

    async def _control(self, scope: Scope, method: str, path: str, body: bytes,
                       send: Send) -> None:
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.token}".encode()):
            await _respond(send, 401, dumps({"error": "missing or wrong bearer token "
                                             "(see the lab's control.token)"}),
                           "application/json")
            return
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        parts = [unquote(p) for p in path[len("/lab/"):].split("/")]
        try:
            result = self._route(method, parts, query, body)
        except ControlNotFound as exc:
            await _respond(send, 404, dumps({"error": exc.message}), "application/json")
            return
        except ControlError as exc:
            await _respond(send, exc.status, dumps({"error": exc.message}), "application/json")
            return
        except (ValueError, KeyError, TypeError) as exc:
            await _respond(send, 400, dumps({"error": f"bad request: {exc}"}),
                           "application/json")
            return
        await _respond(send, 200, dumps(result), "application/json")

    def _route(self, method: str, parts: list[str], query: dict[str, str], body: bytes) -> Any:
        c = self.control
        match (method, parts):
            case ("GET", ["status"]):
                return c.status()
            case ("GET", ["devices"]):
                return c.devices()
            case ("GET", ["devices", device]):
                return c.device(device)
            case ("PATCH", ["devices", device]):
                return c.set_device(device, **_json(body))
            case ("GET", ["devices", device, "commands"]):
                return c.commands(device, query.get("state"))
            case ("POST", ["devices", device, "commands"]):
                return c.enqueue(device, body.decode("utf-8"))
            case ("GET", ["devices", device, "messages"]):
                return c.messages(device, session=query.get("session"),
                                  after=int(query.get("after", 0)),
                                  limit=int(query.get("limit", 1000)))
            case ("GET", ["profiles"]):
                return c.profiles()
            case ("POST", ["assignments"]):
                a = _json(body)
                return c.assign(str(a["profile"]), device=a.get("device"), group=a.get("group"))
            case ("POST", ["unassign"]):
                a = _json(body)
                return c.unassign(str(a["profile"]), device=a.get("device"),
                                  group=a.get("group"))
            case ("GET", ["commands", number]):
                return c.command(int(number))
            case ("GET", ["crs"]):
                return c.crs(query.get("device"))
        raise ControlNotFound(f"no control route {method} /lab/{'/'.join(parts)}")


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body or b"{}")
    except ValueError as exc:
        raise ControlError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ControlError("body must be a JSON object")
    return data


def _host(scope: Scope) -> str:
    for name, value in scope.get("headers") or []:
        if name == b"host":
            return str(value.decode("latin-1"))
    server = scope.get("server") or ("127.0.0.1", 443)
    return f"{server[0]}:{server[1]}"



async def _respond(send: Send, status: int, body: bytes, content_type: str,
                   extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", content_type.encode()),
               (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
