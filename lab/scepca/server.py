"""The SCEP CA over HTTP (RFC 8894 §4): a plain ASGI app served by uvicorn on loopback.

Routes:
- `/scep` (normal mode) or `/certsrv/mscep/mscep.dll` (NDES mode), each also with
  `/pkiclient.exe` after it (repeated slashes collapse: Windows sends `mscep.dll//pkiclient.exe`
  when ServerURL ends with `/`): `operation=GetCACaps|GetCACert|PKIOperation`. NDES answers the
  bare URL (no operation) with 403, the "expected 403" of seed 001's checklist.
- `/lab-ca/…` the control endpoint (bearer token): `faults` (GET list, POST add, DELETE clear,
  DELETE faults/<id>), `status`, `requests`, `approve/<txid>`, `reject/<txid>`.

The CA's work (CMS, RSA, SQLite, the verifier program) runs in worker threads so a slow
verifier or a hung fault never blocks other requests on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import re
import urllib.parse
from collections import Counter
from typing import Any

from lab.asgi import BodyTooLarge, Receive, Scope, Send, read_body
from lab.scepca import protocol as proto
from lab.scepca.config import Mode
from lab.scepca.db import Status
from lab.scepca.faults import FaultKind, FaultRule, FaultSet, FaultSpecError, build_rule
from lab.scepca.service import Reply, ScepService

log = logging.getLogger("lab.scepca.http")


_OPERATIONS = {"getcacaps": "GetCACaps", "getcacert": "GetCACert",
               "pkioperation": "PKIOperation"}
_BODY_FAULTS = (FaultKind.TRUNCATE, FaultKind.CUT, FaultKind.CONTENT_TYPE)
_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 413: "Request Entity Too Large",
            414: "URI Too Long", 500: "Internal Server Error", 502: "Bad Gateway",
            503: "Service Unavailable", 504: "Gateway Timeout"}


def error_page(status: int, detail: str = "") -> bytes:
    """An IIS-like error page (what a browser or a client's error snippet shows)."""
    reason = _REASONS.get(status, "Error")
    text = f"HTTP Error {status}. {reason}" + (f" - {detail}" if detail else "")
    return (f"<html><head><title>{status} - {reason}</title></head>"
            f"<body><h1>{text}</h1></body></html>\n").encode()


class ScepCAApp:
    def __init__(self, service: ScepService, faults: FaultSet | None = None, *,
                 token: str = "") -> None:
        self.service = service
        self.faults = faults or FaultSet()
        self.token = token
        self.stats: Counter[str] = Counter()
        self._closing: asyncio.Event | None = None

    # --- plumbing -------------------------------------------------------------------------

    def _closing_event(self) -> asyncio.Event:
        if self._closing is None:
            self._closing = asyncio.Event()
        return self._closing

    def close(self) -> None:
        """Release hung requests (call on the server's loop)."""
        self._closing_event().set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = re.sub(r"/{2,}", "/", scope.get("path") or "/")
        if path.startswith("/lab-ca/"):
            await self._control(scope, receive, send, path)
            return
        base = self.service.config.path
        lower = path.lower().rstrip("/")
        if lower not in (base.lower(), f"{base.lower()}/pkiclient.exe"):
            await _respond(send, 404, "text/html", error_page(404))
            return
        await self._scep(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._closing_event()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- SCEP -----------------------------------------------------------------------------

    async def _scep(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"].upper()
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"),
                                      keep_blank_values=True)
        op_raw = (query.get("operation") or [""])[0]
        if not op_raw:
            if self.service.config.mode is Mode.NDES:
                # NDES behind the Intune policy module: the bare URL is forbidden.
                await _respond(send, 403, "text/html",
                               error_page(403, "Forbidden: Access is denied."))
            else:
                await _respond(send, 400, "text/plain", b"missing operation parameter\n")
            return
        operation = _OPERATIONS.get(op_raw.lower())
        if operation is None:
            await _respond(send, 400, "text/plain",
                           f"unknown operation {op_raw[:40]!r}\n".encode())
            return
        if method not in ("GET", "HEAD") and not (operation == "PKIOperation"
                                                  and method == "POST"):
            await _respond(send, 405, "text/html", error_page(405))
            return
        body = b""
        if method == "POST":
            limit = self.service.config.max_body
            try:
                body = await read_body(receive, limit)
            except BodyTooLarge:
                await _respond(send, 413, "text/html", error_page(413))
                return
            if body[:1] != b"\x30":  # some clients POST base64
                body = _b64(body.decode("latin-1")) or body
        elif operation == "PKIOperation":
            # parse_qs turned '+' into ' ' (form encoding); base64 needs it back.
            message = (query.get("message") or [""])[0].replace(" ", "+")
            decoded = _b64(message)
            if decoded is None:
                await _respond(send, 400, "text/plain",
                               b"the message parameter is not base64\n")
                return
            body = decoded
        message_name = None
        if operation == "PKIOperation":
            mtype = proto.peek_message_type(body)
            message_name = proto.message_name(mtype) if mtype is not None else None
        label = message_name or operation
        pending_rule: FaultRule | None = None
        rule = self.faults.take(operation, message_name, "before")
        if rule is not None:
            self._count_fault(rule, label)
            if rule.kind in _BODY_FAULTS:
                pending_rule = rule  # needs the real reply: process, then spoil it
            elif await self._fault_without_reply(rule, receive, send):
                return
        reply = await self._handle(operation, body)
        rule = pending_rule or self.faults.take(operation, message_name, "after")
        if rule is not None and rule is not pending_rule:
            self._count_fault(rule, label)
        if rule is not None and await self._fault_with_reply(rule, reply, receive, send):
            return
        self.stats[f"{label} {reply.status_code}"] += 1
        log.info("%s %s -> %d %s", method, label, reply.status_code,
                 reply.pki_status.name if reply.pki_status is not None else "")
        await _respond(send, reply.status_code, reply.content_type,
                       b"" if method == "HEAD" else reply.body)

    async def _handle(self, operation: str, body: bytes) -> Reply:
        try:
            if operation == "GetCACaps":
                return self.service.get_ca_caps()
            if operation == "GetCACert":
                return self.service.get_ca_cert()
            return await asyncio.to_thread(self.service.pki_operation, body)
        except Exception:
            log.exception("%s failed", operation)
            return Reply(500, "text/html", error_page(500), operation)

    def _count_fault(self, rule: FaultRule, label: str) -> None:
        log.info("fault %s fires on %s (hit %d)", rule.spec(), label, rule.hits)
        self.stats[f"{label} fault:{rule.kind.value}"] += 1

    async def _fault_without_reply(self, rule: FaultRule, receive: Receive,
                                   send: Send) -> bool:
        """Status, timeout and slow faults before the CA sees the request; True when the
        request is answered (or abandoned) by the fault."""
        if rule.kind is FaultKind.SLOW:
            await self._wait(rule.delay, receive)
            return False
        if rule.kind is FaultKind.STATUS:
            await _respond(send, rule.status, "text/html",
                           error_page(rule.status, "injected by the lab CA"))
            return True
        # TIMEOUT
        if await self._wait(rule.delay, receive):  # nobody gave up: answer as a proxy would
            await _respond(send, 504, "text/html", error_page(504))
        return True

    async def _fault_with_reply(self, rule: FaultRule, reply: Reply, receive: Receive,
                                send: Send) -> bool:
        """Any fault applied to a reply the CA already made (phase=after, body faults)."""
        if rule.kind not in _BODY_FAULTS:
            handled = await self._fault_without_reply(rule, receive, send)
            if not handled:  # slow: the delayed real reply
                await _respond(send, reply.status_code, reply.content_type, reply.body)
            return True
        body = reply.body
        keep = len(body) // 2 if rule.size is None else min(rule.size, len(body))
        if rule.kind is FaultKind.TRUNCATE:
            await _respond(send, reply.status_code, reply.content_type, body[:keep])
        elif rule.kind is FaultKind.CUT:
            await send({"type": "http.response.start", "status": reply.status_code,
                        "headers": [(b"content-type", reply.content_type.encode()),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body[:keep], "more_body": True})
            # Returning with the response incomplete makes uvicorn close the connection.
        else:  # CONTENT_TYPE
            await _respond(send, reply.status_code, rule.content_type, body)
        return True

    async def _wait(self, seconds: float, receive: Receive) -> bool:
        """Sleep `seconds`; True if the time ran out, False when the client went away or the
        server is closing (so hung requests never outlive the test that made them)."""
        closing = self._closing_event()
        tasks = [asyncio.ensure_future(asyncio.sleep(seconds)),
                 asyncio.ensure_future(closing.wait()),
                 asyncio.ensure_future(_disconnected(receive))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
        return tasks[0] in done and not closing.is_set()

    # --- control endpoint ---------------------------------------------------------------------

    def _authorized(self, scope: Scope) -> bool:
        if not self.token:
            return False
        headers = dict(scope.get("headers") or [])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else \
            headers.get(b"x-lab-token", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _control(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        if not self._authorized(scope):
            await _json(send, 401, {"error": "missing or wrong control token"})
            return
        method = scope["method"].upper()
        parts = [p for p in path.split("/") if p][1:]  # after "lab-ca"
        try:
            body = await read_body(receive, 1 << 16)
        except BodyTooLarge:
            await _json(send, 413, {"error": "body too large"})
            return
        try:
            result = await self._control_action(method, parts, body)
        except (FaultSpecError, ValueError) as exc:
            await _json(send, 400, {"error": str(exc)})
            return
        except LookupError as exc:
            await _json(send, 404, {"error": str(exc).strip("'\"")})
            return
        await _json(send, 200, result)

    async def _control_action(self, method: str, parts: list[str], body: bytes) -> Any:
        db = self.service.db
        if parts == ["faults"] and method == "GET":
            return {"rules": [r.as_dict() for r in self.faults.rules()]}
        if parts == ["faults"] and method == "POST":
            data = json.loads(body or b"{}")
            if isinstance(data, dict) and "rules" in data:
                if data.get("replace"):
                    self.faults.clear()
                items = data["rules"]
            else:
                items = data if isinstance(data, list) else [data]
            rules = [build_rule(i if isinstance(i, dict) else {"spec": str(i)})
                     for i in items]
            return {"added": [self.faults.add(r).as_dict() for r in rules]}
        if parts == ["faults"] and method == "DELETE":
            self.faults.clear()
            return {"rules": []}
        if len(parts) == 2 and parts[0] == "faults" and method == "DELETE":
            if not self.faults.remove(int(parts[1])):
                raise LookupError(f"no fault rule {parts[1]}")
            return {"removed": int(parts[1])}
        if parts == ["status"] and method == "GET":
            cfg = self.service.config
            return {"mode": cfg.mode.value, "path": cfg.path, "caps": list(cfg.effective_caps),
                    "thumbprint": self.service.ca.thumbprint, "pending": str(cfg.pending),
                    "verifier": cfg.verifier.name if cfg.verifier else "none",
                    "stats": dict(self.stats)}
        if parts == ["requests"] and method == "GET":
            rows = await asyncio.to_thread(db.requests)
            return {"requests": [r.as_dict() for r in rows]}
        if len(parts) == 2 and parts[0] in ("approve", "reject") and method == "POST":
            if parts[0] == "approve":
                row = await asyncio.to_thread(db.approve, parts[1], who="control endpoint")
            else:
                reason = (json.loads(body or b"{}") or {}).get("reason", "rejected by the "
                                                                         "operator")
                row = await asyncio.to_thread(db.reject, parts[1], str(reason),
                                              who="control endpoint")
            return row.as_dict()
        raise LookupError(f"no control action {method} /lab-ca/{'/'.join(parts)}")



async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _b64(text: str) -> bytes | None:
    cleaned = urllib.parse.unquote(text.strip()).replace(" ", "+").replace("\n", "")
    cleaned = cleaned.replace("-", "+").replace("_", "/")
    try:
        return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None


async def _respond(send: Send, status: int, content_type: str, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _json(send: Send, status: int, data: Any) -> None:
    await _respond(send, status, "application/json",
                   json.dumps(data, indent=1, default=str).encode() + b"\n")


__all__ = ["ScepCAApp", "Status", "error_page"]
