"""The server side of an OMA-DM session (MS-MDM profile): one client message in, one reply out.

`MdmEngine.handle(body, url)` is called per HTTP POST. Sessions are keyed by DeviceID (SyncHdr
Source LocURI) and SessionID and kept in the state database, so a restart or a second worker sees
the same sessions. Per message (OMA-TS-DM_Protocol §8, DESIGN.md §3):

- auth: with `syncml:auth-md5` on, a message without valid Cred gets SyncHdr Status 407 (none
  sent) or 401 (wrong) with a Chal carrying NextNonce, and nothing else is processed; a valid
  digest gets 212 (plus the nonce for the next session) and no more credentials are needed.
- the reply starts with the Status for the client's SyncHdr, then a Status for each client
  command (Alert, Replace of DevInfo, chunk acknowledgements 213/424); the client's Status and
  Results are recorded per CmdRef (they get no Status back).
- client large objects: Results/Replace items with MoreData are accumulated (213 each), the last
  chunk completes them (424 when Meta/Size disagrees).
- a client message without Final and without Alert 1222: its package continues → reply with
  Alert 1222 and wait. A client Alert 1222: send the next message of our package.
- otherwise the queued commands go out in order (CmdIDs re-numbered: UUIDs like Intune, or
  counters), within the client's MaxMsgSize and the lab's per-message command limit; when
  commands remain the message has no Final (a multi-message package).
- nothing to send and nothing to answer: an empty HTTP 200 ends the session.

Profile delivery (lab.mdm.delivery) adds its commands to the same queue: round A when the
session starts, round B once round A is answered.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.errors import DmAgentError
from agent.syncml import codec
from agent.syncml.auth import AuthScheme, md5_digest, scheme_of
from agent.syncml.messages import (
    CONTENT_TYPE,
    Alert,
    AlertCode,
    Chal,
    Cmd,
    Command,
    Item,
    ItemCommand,
    Meta,
    Results,
    Status,
    StatusCode,
    SyncHdr,
    SyncMLMessage,
    UnknownCommand,
    command_name,
)
from lab.labdir import LabConfig, LabDir
from lab.mdm.certindex import CertIndex
from lab.mdm.delivery import Planner
from lab.mdm.fragments import parse_fragment, renumber
from lab.profiles import ProfileError, ScepProfile, load_profiles
from lab.state import LabState

CHUNK_KEY = "lo"
REDACTED = "***challenge {id} (not recorded)***"


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = CONTENT_TYPE


def _new_session() -> dict[str, Any]:
    return {"server_msg": 0, "next_cmd": 1, "authenticated": False, "phase": "new",
            "lab_rows_a": [], "cmd_map": {}, CHUNK_KEY: {}, "max_msg_size": None}


class MdmEngine:
    """Handles SyncML messages for every device of one lab (not thread-safe: one caller)."""

    def __init__(self, lab: LabDir, state: LabState, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.lab = lab
        self.state = state
        self.clock = clock
        self._cfg: tuple[int, LabConfig] | None = None
        self._profiles: tuple[tuple[tuple[str, int], ...], dict[str, ScepProfile]] | None = None
        self._certs: CertIndex | None = None

    # --- configuration, re-read when the files change -------------------------------------

    def config(self) -> LabConfig:
        mtime = self.lab.config_path.stat().st_mtime_ns
        if self._cfg is None or self._cfg[0] != mtime:
            self._cfg = (mtime, self.lab.config())
            self._certs = None
        return self._cfg[1]

    def profiles(self, cfg: LabConfig) -> dict[str, ScepProfile]:
        directory = self.lab.path / cfg.profiles_dir
        sig = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in directory.glob("*.toml"))) \
            if directory.is_dir() else ()
        if self._profiles is None or self._profiles[0] != sig:
            self._profiles = (sig, load_profiles(directory))
        return self._profiles[1]

    def certs(self, cfg: LabConfig) -> CertIndex:
        if self._certs is None:
            self._certs = CertIndex(self.state, cfg.scep_depot)
        return self._certs

    # --- one message ----------------------------------------------------------------------

    def handle(self, data: bytes, url: str) -> Reply:
        now = self.clock()
        try:
            msg = codec.decode(data)
        except DmAgentError as exc:
            self.state.add_message(device_id=None, session_id=None, msg_id=None,
                                   direction="in", body=data.decode("utf-8", "replace"),
                                   now=now, http_status=400)
            text = exc.message.replace("from the server", "from the client")
            return Reply(400, f"{text}\n".encode(), "text/plain; charset=utf-8")
        cfg = self.config()
        try:
            profiles = self.profiles(cfg)
        except ProfileError as exc:  # a broken profile file must not stop management
            profiles = {}
            self.state.add_message(device_id=None, session_id=None, msg_id=None,
                                   direction="error", body=f"profiles not loaded: {exc}",
                                   now=now, http_status=500)
        with self.state.transaction():
            return _Exchange(self, cfg, profiles, msg, url, now, data).run()


class _Exchange:
    """The work for one request (holds what one message needs)."""

    def __init__(self, engine: MdmEngine, cfg: LabConfig, profiles: dict[str, ScepProfile],
                 msg: SyncMLMessage, url: str, now: float, raw: bytes) -> None:
        self.e, self.cfg, self.msg, self.url, self.now, self.raw = engine, cfg, msg, url, now, raw
        self.st = engine.state
        hdr = msg.header
        self.device = hdr.source.strip()
        self.session_id = hdr.session_id.strip()
        self.planner = Planner(engine.lab, self.st, cfg, profiles, engine.certs(cfg), now)
        loaded = self.st.load_session(self.device, self.session_id)
        closed = loaded is not None and loaded.get("closed", False)
        self.new = loaded is None or closed
        self.sess: dict[str, Any] = _new_session() if self.new else loaded  # type: ignore[assignment]
        self.out: list[Command] = []
        self.sent_any = False
        self.tokens: list[tuple[str, str]] = []  # (token, challenge id) to redact

    # --- helpers --------------------------------------------------------------------------

    def next_id(self) -> str:
        if self.cfg.session.cmd_ids == "uuid":
            return str(uuid.uuid4())
        n = int(self.sess["next_cmd"])
        self.sess["next_cmd"] = n + 1
        return str(n)

    def status(self, cmd_ref: str, cmd: str, code: int, **kw: Any) -> Status:
        return Status(self.next_id(), self.msg.header.msg_id, cmd_ref, cmd, int(code), **kw)

    # --- the exchange -----------------------------------------------------------------------

    def run(self) -> Reply:
        hdr = self.msg.header
        if self.new:
            self.start_session()
        if hdr.meta is not None and hdr.meta.max_msg_size:
            self.sess["max_msg_size"] = hdr.meta.max_msg_size
        self.st.add_message(device_id=self.device, session_id=self.session_id,
                            msg_id=hdr.msg_id, direction="in",
                            body=self.raw.decode("utf-8", "replace"), now=self.now)
        code, chal = self.authenticate()
        self.out.append(self.status("0", "SyncHdr", code, target_refs=(hdr.target,),
                                    source_refs=(hdr.source,), chal=chal))
        if code in (StatusCode.INVALID_CREDENTIALS, StatusCode.MISSING_CREDENTIALS):
            return self.send(final=True)  # nothing else is processed unauthenticated
        wants_next = self.process_body()
        if self.sess.get("aborted"):
            self.close()
            return self.send(final=True)
        if not self.msg.final and not wants_next:
            # The client's package continues: ask for its next message (OMA-TS-DM_Protocol §8).
            self.out.append(Alert(self.next_id(), str(int(AlertCode.NEXT_MESSAGE))))
            return self.send(final=True)
        self.plan()
        more = self.pack()
        if len(self.out) == 1 and not self.sent_any:
            self.close()
            return self.finish(Reply(200, b""))
        return self.send(final=not more)

    def start_session(self) -> None:
        dev = self.st.get_device(self.device)
        self.sess["first_session"] = dev is None or not dev["sessions"]
        for old in self.st.sessions(self.device):
            if not old["closed"]:
                self.st.requeue_unanswered(self.device, old["session_id"])
                self.st.save_session(self.device, old["session_id"], {"closed": True}, self.now,
                                     closed=True)
        # lab commands planned for an earlier session but never sent are re-planned now
        for row in self.st.queued(self.device):
            if row["origin"] == "lab":
                self.st.db.execute("UPDATE commands SET state = 'dropped' WHERE id = ?",
                                   (row["id"],))
        self.st.touch_session(self.device, self.now)
        self.planner.session_started(self.device)

    def close(self) -> None:
        self.sess["closed"] = True
        self.st.requeue_unanswered(self.device, self.session_id)

    # --- authentication ---------------------------------------------------------------------

    def authenticate(self) -> tuple[int, Chal | None]:
        pol = self.cfg.session
        if pol.auth == "none" or self.sess["authenticated"]:
            return StatusCode.OK, None
        hdr = self.msg.header
        dev = self.st.ensure_device(self.device, self.now)
        nonce_b64 = (dev["info"] or {}).get("md5_nonce") or self.new_nonce()
        cred = hdr.cred
        if cred is None:
            return StatusCode.MISSING_CREDENTIALS, self.chal(nonce_b64)
        username = pol.auth_username or self.device
        ok = scheme_of(cred.meta.type) is AuthScheme.MD5 and \
            (not hdr.source_name or hdr.source_name == username)
        if ok:
            secret = dev["auth_password"] or pol.auth_password
            expected = md5_digest(username, secret, base64.b64decode(nonce_b64))
            ok = hmac.compare_digest(expected.encode(), cred.data.strip().encode())
        if not ok:
            return StatusCode.INVALID_CREDENTIALS, self.chal(self.new_nonce())
        self.sess["authenticated"] = True
        # 212: authenticated for the rest of the session; the Chal gives the next session's nonce
        return StatusCode.AUTHENTICATION_ACCEPTED, self.chal(self.new_nonce())

    def new_nonce(self) -> str:
        nonce = base64.b64encode(secrets.token_bytes(16)).decode()
        self.st.merge_device_info(self.device, {"md5_nonce": nonce})
        return nonce

    @staticmethod
    def chal(nonce_b64: str) -> Chal:
        return Chal(Meta(format="b64", type=AuthScheme.MD5.value, next_nonce=nonce_b64))

    # --- the client's commands --------------------------------------------------------------

    def process_body(self) -> bool:
        """Record/answer the client's commands; True when it sent Alert 1222 (next message)."""
        wants_next = False
        touched: set[int] = set()
        for cmd in self.msg.body:
            if isinstance(cmd, Status):
                self.record(cmd.cmd_ref, "Status", cmd.cmd, cmd.data, [], touched)
                continue
            if isinstance(cmd, Results):
                self.results(cmd, touched)
                continue
            if not cmd.cmd_id:
                # MS-MDM: a command without CmdID is answered 400 with an empty CmdRef
                self.out.append(self.status("", command_name(cmd), StatusCode.BAD_REQUEST))
                continue
            if isinstance(cmd, Alert):
                wants_next |= self.alert(cmd)
            elif isinstance(cmd, ItemCommand) and cmd.kind in (Cmd.REPLACE, Cmd.ADD):
                self.out.append(self.status(cmd.cmd_id, cmd.kind.value, self.client_item(cmd)))
            elif isinstance(cmd, UnknownCommand):
                self.out.append(self.status(cmd.cmd_id, cmd.name, StatusCode.BAD_REQUEST))
            else:
                self.out.append(self.status(cmd.cmd_id, command_name(cmd),
                                            StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED))
        for row_id in sorted(touched):
            self.maybe_done(row_id)
        return wants_next

    def record(self, cmd_ref: str, kind: str, cmd: str | None, code: int | None,
               items: list[dict[str, Any]], touched: set[int]) -> None:
        self.st.add_response(self.device, self.session_id, msg_ref=self.msg_ref_of(cmd_ref),
                             cmd_ref=cmd_ref, kind=kind, cmd=cmd, code=code, items=items,
                             now=self.now)
        row_id = self.sess["cmd_map"].get(cmd_ref)
        if row_id is not None:
            touched.add(int(row_id))

    def msg_ref_of(self, cmd_ref: str) -> str:
        for cmd in self.msg.body:
            if isinstance(cmd, Status | Results) and cmd.cmd_ref == cmd_ref:
                return cmd.msg_ref
        return ""

    def results(self, res: Results, touched: set[int]) -> None:
        items = list(res.items)
        lo: dict[str, Any] = self.sess[CHUNK_KEY]
        key = f"Results:{res.cmd_ref}"
        if items and items[-1].more_data:
            part = lo.setdefault(key, {"data": "", "size": None})
            first = items[-1]
            if part["size"] is None and first.meta is not None and first.meta.size is not None:
                part["size"] = first.meta.size
            part["data"] += first.data or ""
            self.out.append(self.status(res.cmd_id, "Results", StatusCode.CHUNKED_ITEM_ACCEPTED))
            return
        if key in lo and items:
            part = lo.pop(key)
            whole = part["data"] + (items[-1].data or "")
            items[-1] = Item(target=items[-1].target, source=items[-1].source,
                             meta=items[-1].meta, data=whole)
            if part["size"] is not None and len(whole.encode()) != part["size"]:
                self.out.append(self.status(res.cmd_id, "Results", StatusCode.SIZE_MISMATCH))
        recorded = []
        for it in items:
            fmt = (it.meta.format if it.meta else None) or (res.meta.format if res.meta
                                                             else None)
            recorded.append({"source": it.source, "data": it.data, "format": fmt,
                             "type": it.meta.type if it.meta else None})
            if it.source:
                self.st.set_reported(self.device, it.source.strip(), it.data, fmt, 200, self.now)
        self.record(res.cmd_ref, "Results", "Results", None, recorded, touched)

    def alert(self, alert: Alert) -> bool:
        code = alert.code
        assert alert.cmd_id is not None
        if code is None:
            self.out.append(self.status(alert.cmd_id, "Alert", StatusCode.BAD_REQUEST))
            return False
        if code == AlertCode.CLIENT_EVENT and alert.items:
            item = alert.items[0]
            kind = (item.meta.type if item.meta else None) or "event"
            self.st.merge_device_info(self.device, {kind: item.data or ""})
        elif code == AlertCode.GENERIC and alert.items:
            item = alert.items[0]
            kind = (item.meta.type if item.meta else None) or "generic"
            self.st.merge_device_info(self.device, {f"alert1226:{kind}": item.data or ""})
        elif code == AlertCode.SESSION_ABORT:
            self.sess["aborted"] = True
        elif code == AlertCode.NO_END_OF_DATA:
            self.sess[CHUNK_KEY] = {}
        self.out.append(self.status(alert.cmd_id, "Alert", StatusCode.OK))
        return code == AlertCode.NEXT_MESSAGE

    def client_item(self, cmd: ItemCommand) -> int:
        """A client Replace/Add (package 1's DevInfo): remember the values; chunks buffered."""
        lo: dict[str, Any] = self.sess[CHUNK_KEY]
        code: int = StatusCode.OK
        for it in cmd.items:
            uri = (it.source or it.target or "").strip()
            key = f"{cmd.kind.value}:{uri}"
            data = it.data or ""
            if it.more_data:
                part = lo.setdefault(key, {"data": "", "size": None})
                if part["size"] is None and it.meta is not None and it.meta.size is not None:
                    part["size"] = it.meta.size
                part["data"] += data
                code = StatusCode.CHUNKED_ITEM_ACCEPTED
                continue
            if key in lo:
                part = lo.pop(key)
                data = part["data"] + data
                if part["size"] is not None and len(data.encode()) != part["size"]:
                    code = StatusCode.SIZE_MISMATCH
                    continue
            fmt = it.meta.format if it.meta else None
            self.st.set_reported(self.device, uri, data, fmt, 200, self.now)
            if uri.startswith("./DevInfo/"):
                self.st.merge_device_info(self.device, {uri.rsplit("/", 1)[1]: data})
        return code

    def maybe_done(self, row_id: int) -> None:
        row = self.st.get_command(row_id)
        if row is None or row["state"] != "sent" or not isinstance(row["cmd_ids"], dict):
            return
        responses = self.st.responses(self.device, self.session_id, row["cmd_ids"]["all"])
        answers: list[tuple[int | None, list[dict[str, Any]]]] = []
        for top in row["cmd_ids"]["top"]:
            statuses = [r for r in responses if r["cmd_ref"] == top and r["kind"] == "Status"]
            if not statuses:
                return  # not answered yet
            items = [i for r in responses if r["cmd_ref"] == top and r["kind"] == "Results"
                     for i in r["items"]]
            answers.append((statuses[-1]["code"], items))
        self.st.mark_done(row_id, self.now)
        if row["origin"] == "lab":
            for p in self.planner.handle(self.device, row["purpose"], answers):
                new_id = self.enqueue_lab(p.xml, p.purpose)
                if self.sess["phase"] in ("new", "A"):
                    self.sess["lab_rows_a"].append(new_id)

    # --- planning and sending ----------------------------------------------------------------

    def plan(self) -> None:
        phase = self.sess["phase"]
        if phase == "new":
            planned = self.planner.round_a(self.device, bool(self.sess.get("first_session")))
            self.sess["lab_rows_a"] = [self.enqueue_lab(p.xml, p.purpose) for p in planned]
            self.sess["phase"] = phase = "A"
        if phase == "A":
            pending = [r for r in self.sess["lab_rows_a"]
                       if (self.st.get_command(r) or {}).get("state") in ("queued", "sent")]
            if not pending:
                for p in self.planner.round_b(self.device):
                    self.enqueue_lab(p.xml, p.purpose)
                self.sess["phase"] = "done"

    def enqueue_lab(self, xml: str, purpose: dict[str, Any]) -> int:
        return self.st.enqueue(self.device, xml, origin="lab", purpose=purpose, now=self.now)

    def pack(self) -> bool:
        """Move queued commands into this message; True when some must wait for the next."""
        self.sent_any = False
        budget = self.sess.get("max_msg_size") or None
        limit = self.cfg.session.max_commands_per_message
        used = codec.MESSAGE_OVERHEAD + len(codec.encode_header(self.header()).encode()) + \
            sum(len(codec.encode_command(c).encode()) for c in self.out)
        count = 0
        queued = self.st.queued(self.device)
        for row in queued:
            if limit and count >= limit:
                return True
            try:
                cmds = parse_fragment(row["xml"])
                cmds, challenge_id, token = self.planner.materialize(
                    self.device, row["purpose"], cmds)
            except (ValueError, LookupError) as exc:
                self.st.db.execute("UPDATE commands SET state = 'dropped', done_at = ?, "
                                   "purpose = json_set(purpose, '$.error', ?) WHERE id = ?",
                                   (self.now, str(exc), row["id"]))
                continue
            numbered: list[Command] = []
            top: list[str] = []
            every: list[str] = []
            for c in cmds:
                n, ids = renumber(c, self.next_id)
                numbered.append(n)
                top.append(ids[0])
                every.extend(ids)
            encoded = "".join(codec.encode_command(c) for c in numbered)
            size = len(encoded.encode())
            if budget and used + size > budget and (self.sent_any or len(self.out) > 1):
                if challenge_id:
                    self.st.db.execute("DELETE FROM challenges WHERE id = ?", (challenge_id,))
                return True
            self.out.extend(numbered)
            used += size
            count += len(numbered)
            self.sent_any = True
            stored = encoded.replace(token, REDACTED.format(id=challenge_id)) if token else encoded
            if token:
                self.tokens.append((token, str(challenge_id)))
            purpose = dict(row["purpose"])
            if challenge_id:
                purpose["challenge_id"] = challenge_id
            self.st.mark_sent(row["id"], session_id=self.session_id,
                              msg_id=str(int(self.sess["server_msg"]) + 1), cmd_id=top[0],
                              cmd_ids={"top": top, "all": every},
                              xml=stored, now=self.now)
            if purpose != row["purpose"]:
                self.st.db.execute("UPDATE commands SET purpose = json(?) WHERE id = ?",
                                   (_json(purpose), row["id"]))
            for cid in every:
                self.sess["cmd_map"][cid] = row["id"]
        return False

    def header(self) -> SyncHdr:
        return SyncHdr(session_id=self.msg.header.session_id,
                       msg_id=str(int(self.sess["server_msg"]) + 1), target=self.device,
                       source=self.url,
                       meta=Meta(max_msg_size=self.cfg.session.max_msg_size)
                       if self.cfg.session.max_msg_size else None)

    def send(self, *, final: bool) -> Reply:
        hdr = self.header()
        self.sess["server_msg"] = int(hdr.msg_id)
        body = codec.encode(SyncMLMessage(hdr, tuple(self.out), final))
        return self.finish(Reply(200, body), body)

    def finish(self, reply: Reply, body: bytes = b"") -> Reply:
        text = body.decode("utf-8")
        for token, cid in self.tokens:
            text = text.replace(token, REDACTED.format(id=cid))
        self.st.add_message(device_id=self.device, session_id=self.session_id,
                            msg_id=str(self.sess["server_msg"]) if body else None,
                            direction="out", body=text, now=self.now,
                            http_status=reply.status)
        self.st.save_session(self.device, self.session_id, self.sess, self.now,
                             closed=bool(self.sess.get("closed")))
        return reply


def _json(obj: object) -> str:
    import json

    return json.dumps(obj)
