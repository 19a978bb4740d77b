"""The OMA-DM client session state machine (MS-MDM profile), sans-IO: bytes in, events out.

    session = ClientSession(config, executor)
    event = session.start()                  # SendMessage: package 1
    while isinstance(event, SendMessage):
        event = session.receive(post(event))  # the server's HTTP response body
    # SessionComplete or SessionFailed, each with the SessionSummary

No sockets, clock or logging here; the I/O shell (`agent.omadm`) moves the bytes.

Rules implemented (OMA-TS-DM_Protocol §8, MS-MDM §2.2 and §3, DESIGN.md §3):
- Package 1: SyncHdr (SessionID constant for the session, MsgID from 1, Target = server URL,
  Source = DeviceID, Meta MaxMsgSize/MaxObjSize), Alert 1201 (1200 when answering a server
  notification), Alert 1224 LoginStatus, Replace ./DevInfo/{DevId,Man,Mod,DmV,Lang}, Final.
  CmdIDs start at 2 as Windows numbers them (1 is the SyncHdr Status in every later message).
- Every reply starts with the Status for the server's SyncHdr (CmdRef 0), then one Status per
  server command in order, Results right after the Status of their Get. Server Status elements
  get none. A reply that would hold only the SyncHdr Status is not sent: the session is over.
  An empty HTTP body also ends it.
- A server message without Final: answer it and add Alert 1222 (next message), no Final.
- Alerts: 1222 → 200; 1223 → the session ends with an error; the other MS-MDM alert types → 200;
  user-interaction (1100-1104) and unknown → 406; a non-numeric code → 400.
- A command without CmdID → Status 400 with an empty CmdRef, not executed.
- Auth (auth.py): 401/407 with Chal on our SyncHdr → resend the message with Cred; 212 → no more
  credentials this session; the same credentials refused twice → stop with an auth error.
- Large objects (chunks.py) both ways; outgoing messages respect the server's MaxMsgSize.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from typing import Protocol

from agent.diagnostics import HResult, hresult_from_http_status
from agent.errors import DmAgentError, PeerError
from agent.syncml import codec
from agent.syncml.auth import AuthScheme, Credentials, decode_nonce, make_cred, scheme_of
from agent.syncml.chunks import Reassembler, utf8_len
from agent.syncml.messages import (
    Alert,
    AlertCode,
    Cmd,
    Command,
    Container,
    Cred,
    Item,
    ItemCommand,
    Meta,
    Results,
    Status,
    StatusCode,
    SyncHdr,
    SyncMLMessage,
    command_name,
)
from agent.syncml.outbox import Outbox, Outgoing
from agent.syncml.summary import SessionSummary

LOGIN_STATUS_TYPE = "com.microsoft/MDM/LoginStatus"
DEFAULT_MAX_MSG_SIZE = 524288  # what Windows and Intune advertise


class Executor(Protocol):
    """The DM tree (agent.dmtree.executor.TreeExecutor): executes one message's executable
    commands in order, returns one Status per command (Results right after a Get's Status),
    with cmd_id "" (the session numbers them)."""

    def execute(self, commands: Sequence[Command], msg_ref: str) -> list[Status | Results]: ...


class LoginStatus(enum.StrEnum):
    """Alert 1224 com.microsoft/MDM/LoginStatus data (MS docs "OMA DM protocol support")."""

    USER = "user"  # the enrolled user is logged in
    OTHERS = "others"  # another user without an MDM account is logged in
    NONE = "none"  # nobody is logged in


@dataclass(frozen=True)
class DeviceInfo:
    """./DevInfo as package 1 reports it."""

    dev_id: str
    man: str
    mod: str
    dmv: str = "1.3"  # MS-MDM §4: Windows reports DM version 1.3
    lang: str = "en-US"


@dataclass(frozen=True)
class SessionConfig:
    server_url: str  # the enrollment's ADDR: Target LocURI of every message
    device: DeviceInfo
    session_id: str = "1"
    login_status: LoginStatus = LoginStatus.USER
    server_initiated: bool = False  # answering a server notification: Alert 1200
    credentials: Credentials | None = None
    nonce: bytes | None = None  # md5 nonce from the last session, if the server gave one
    max_msg_size: int = DEFAULT_MAX_MSG_SIZE  # what we advertise
    max_obj_size: int = codec.DEFAULT_MAX_BYTES
    decode_limits: codec.DecodeLimits = codec.DEFAULT_LIMITS
    max_messages: int = 1000  # a server that never ends the session is an error
    # Client alerts for package 1 (e.g. Alert 1226 reporting an asynchronous CSP result).
    extra_alerts: tuple[Alert, ...] = ()


@dataclass(frozen=True)
class SendMessage:
    body: bytes
    msg_id: str
    resp_uri: str | None = None  # post here instead of the server URL (server's RespURI)


@dataclass(frozen=True)
class SessionComplete:
    summary: SessionSummary


@dataclass(frozen=True)
class SessionFailed:
    error: DmAgentError
    summary: SessionSummary


Event = SendMessage | SessionComplete | SessionFailed


class _State(enum.Enum):
    IDLE = "idle"
    WAITING = "waiting for the server"
    DONE = "done"


class SessionStateError(RuntimeError):
    """The caller drove the session out of order (a bug in the I/O shell)."""


class ClientSession:
    def __init__(self, config: SessionConfig, executor: Executor) -> None:
        self.config = config
        self.executor = executor
        self.summary = SessionSummary(config.session_id, config.server_url, config.device.dev_id)
        self._state = _State.IDLE
        self._msg_id = 0  # last MsgID sent
        self._server_msg_id = ""
        self._server_final = True
        self._server_max_msg: int | None = None
        self._server_max_obj: int | None = None
        self._resp_uri: str | None = None
        self._outbox = Outbox()
        self._reassembler = Reassembler(config.max_obj_size)
        creds = config.credentials
        self._scheme: AuthScheme | None = creds.scheme if creds else None
        self._nonce = config.nonce
        self._send_cred = creds is not None  # until the server answers 212 (or 200)
        self._last_cred: Cred | None = None  # in our last message
        self._answered_chal = False  # we resent a message with credentials after a 401/407
        self._last_body: list[Outgoing] = []  # commands of our last message, for a resend
        # what every header advertises (immutable: made once)
        self._header_meta = Meta(max_msg_size=config.max_msg_size,
                                 max_obj_size=config.max_obj_size)
        self._last_final = True

    # --- public API -------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def start(self) -> SendMessage:
        if self._state is not _State.IDLE:
            raise SessionStateError("start() called twice")
        self._state = _State.WAITING
        code = AlertCode.SERVER_INITIATED_MGMT if self.config.server_initiated \
            else AlertCode.CLIENT_INITIATED_MGMT
        dev = self.config.device
        chr_meta = Meta(format="chr")
        body: list[Outgoing] = [
            Alert("", str(int(code))),
            Alert("", str(int(AlertCode.CLIENT_EVENT)), (Item(
                meta=Meta(format="chr", type=LOGIN_STATUS_TYPE),
                data=self.config.login_status.value),)),
            ItemCommand(Cmd.REPLACE, "", tuple(
                Item(source=f"./DevInfo/{name}", meta=chr_meta, data=value)
                for name, value in (("DevId", dev.dev_id), ("Man", dev.man), ("Mod", dev.mod),
                                    ("DmV", dev.dmv), ("Lang", dev.lang)))),
            *self.config.extra_alerts,
        ]
        return self._send(body, final=True)

    def receive(self, data: bytes) -> Event:
        """Feed the server's response body; get the next message to send or the end."""
        if self._state is not _State.WAITING:
            raise SessionStateError(f"receive() while {self._state.value}")
        self.summary.messages_received += 1
        self.summary.bytes_received += len(data)
        if not data or data.isspace():  # MS-MDM: an empty HTTP 200 ends the session
            return self._complete()
        try:
            msg = codec.decode(data, self.config.decode_limits)
            return self._handle(msg)
        except DmAgentError as exc:
            return self._fail(exc)

    def fail(self, error: DmAgentError) -> SessionFailed:
        """The I/O shell could not deliver a message (transport error): end the session."""
        return self._fail(error)

    # --- receiving --------------------------------------------------------------------------

    def _handle(self, msg: SyncMLMessage) -> Event:
        hdr = msg.header
        if hdr.session_id.lower() != self.config.session_id.lower():
            raise PeerError(f"the server answered SessionID {hdr.session_id!r} in session "
                            f"{self.config.session_id!r}", hresult=HResult.ERROR_INVALID_DATA,
                            advice="the server must echo the client's SessionID "
                                   "(MS-MDM §2.2.3.8)")
        if hdr.ver_dtd and hdr.ver_dtd != "1.2":
            raise PeerError(f"unsupported SyncML VerDTD {hdr.ver_dtd!r} (expected 1.2)",
                            hresult=HResult.ERROR_NOT_SUPPORTED)
        self._server_msg_id = hdr.msg_id
        self._server_final = msg.final
        if hdr.meta is not None:
            self._server_max_msg = hdr.meta.max_msg_size or self._server_max_msg
            self._server_max_obj = hdr.meta.max_obj_size or self._server_max_obj
        if hdr.resp_uri:
            self._resp_uri = hdr.resp_uri
        self._count(msg.body)

        retry = self._check_header_status(msg)
        if retry is not None:
            return retry

        responses: list[Outgoing] = []
        run: list[Command] = []
        busy = self._reassembler.busy  # changes only in _item_command
        for cmd in msg.body:
            if type(cmd) is ItemCommand and cmd.cmd_id and not cmd.no_resp and not busy and \
                    len(cmd.items) == 1 and not cmd.items[0].more_data:
                run.append(cmd)  # the common case: what _item_command appends to the run
                continue
            if isinstance(cmd, Status):
                continue
            if cmd.cmd_id is None or cmd.cmd_id == "":
                # MS-MDM: a command without CmdID gets Status 400 with an empty CmdRef.
                self._flush(run, responses)
                responses.append(self._status("", command_name(cmd), StatusCode.BAD_REQUEST))
            elif isinstance(cmd, Alert):
                self._flush(run, responses)
                responses.append(self._alert_status(cmd))
            elif isinstance(cmd, Results):
                self._flush(run, responses)
                responses.append(self._status(cmd.cmd_id, "Results", StatusCode.OK))
            elif isinstance(cmd, ItemCommand):
                self._item_command(cmd, run, responses)
                busy = self._reassembler.busy
            elif isinstance(cmd, Container) and cmd.no_resp:  # executed, answered by nobody
                self._flush(run, responses)
                self.executor.execute([cmd], self._server_msg_id)
            else:
                run.append(cmd)
        self._flush(run, responses)
        self._outbox.add(self._limit_objects(responses))
        if msg.final and not self._outbox:
            return self._complete()
        extra: list[Outgoing] = []
        if not msg.final:  # the server's package continues: ask for its next message
            extra.append(Alert("", str(int(AlertCode.NEXT_MESSAGE))))
        return self._send_queue(extra)

    def _count(self, commands: Sequence[Command]) -> None:
        names: list[str] = []  # counted in one Counter.update: a message has dozens
        for cmd in commands:
            if type(cmd) is ItemCommand:
                names.append(_ITEM_NAMES[cmd.kind])
                continue
            names.append(command_name(cmd))
            if isinstance(cmd, Status):
                self.summary.statuses_received[cmd.data] += 1
                if cmd.chal is not None and cmd.chal.meta.next_nonce:
                    self.summary.next_nonce = cmd.chal.meta.next_nonce
            elif isinstance(cmd, Container):
                self._count(cmd.commands)
        self.summary.commands_received.update(names)

    def _check_header_status(self, msg: SyncMLMessage) -> Event | None:
        """Act on the server's Status for our SyncHdr: auth accepted, challenge, refusal."""
        mine = str(self._msg_id)
        statuses = [c for c in msg.body if isinstance(c, Status) and c.cmd_ref == "0"]
        status = next((s for s in statuses if s.msg_ref == mine), statuses[0] if statuses
                      else None)
        if status is None:
            return None
        if status.chal is not None:
            nonce = decode_nonce(status.chal.meta.next_nonce or "")
            if nonce is not None:
                self._nonce = nonce
        code = status.data
        if code == StatusCode.AUTHENTICATION_ACCEPTED:
            self.summary.authenticated = True
            self._send_cred = False
            return None
        if code in (StatusCode.INVALID_CREDENTIALS, StatusCode.MISSING_CREDENTIALS):
            return self._challenged(status)
        if code < 300:
            self._send_cred = False  # the server does not ask for SyncML credentials
            return None
        raise PeerError(f"the server refused message {status.msg_ref or mine}: Status {code} "
                        "for the SyncHdr", hresult=_hresult_for_status(code))

    def _challenged(self, status: Status) -> Event:
        code = status.data
        creds = self.config.credentials
        wanted: AuthScheme | None = self._scheme or AuthScheme.BASIC
        if status.chal is not None:
            wanted = scheme_of(status.chal.meta.type) if status.chal.meta.type else \
                AuthScheme.BASIC  # OMA-TS-DM_Security §5.3: Chal without Type means basic
            if wanted is None:
                raise PeerError(f"the server asks for authentication scheme "
                                f"{status.chal.meta.type!r}, which the client does not support",
                                hresult=hresult_from_http_status(code),
                                advice="configure the server for syncml:auth-basic or "
                                       "syncml:auth-md5")
        if creds is None:
            raise PeerError(f"the server requires SyncML credentials ({wanted}), Status {code}, "
                            "but none are configured", hresult=hresult_from_http_status(code),
                            advice="set server.auth, server.username and server.password")
        assert wanted is not None
        cred = make_cred(creds, wanted, self._nonce)
        if cred is None:
            raise PeerError(f"the server asks for {wanted} without a usable NextNonce",
                            hresult=hresult_from_http_status(code))
        if self._last_cred is not None and (self._answered_chal or cred == self._last_cred):
            # Credentials refused after we answered a challenge, or the very credentials just
            # refused: a second try cannot succeed.
            raise PeerError(f"the server rejected the credentials of {creds.username!r} "
                            f"({wanted}, Status {code})", hresult=hresult_from_http_status(code),
                            advice="check server.username and server.password")
        self._answered_chal = True
        self._scheme = wanted
        self._send_cred = True
        # Resend our last message with credentials; the server's commands in a refused
        # message are not executed (they came with an unauthenticated session).
        return self._send([self._header_status(), *self._last_body], final=self._last_final)

    def _item_command(self, cmd: ItemCommand, run: list[Command],
                      responses: list[Outgoing]) -> None:
        items = cmd.items
        if not (cmd.no_resp or self._reassembler.busy or
                (items[0].more_data if len(items) == 1 else any(i.more_data for i in items))):
            run.append(cmd)  # the common case: not part of a large object
            return
        result = self._reassembler.feed(cmd)
        if result.abandoned is not None:
            self._flush(run, responses)
            self.summary.errors.append(f"the server left the chunked object {result.abandoned} "
                                       "unfinished")
            responses.append(Alert("", str(int(AlertCode.NO_END_OF_DATA)),
                                   (Item(source=result.abandoned),)))
        if result.command is None:
            self._flush(run, responses)
            assert result.status is not None and cmd.cmd_id is not None
            if result.status not in (StatusCode.CHUNKED_ITEM_ACCEPTED,):
                self.summary.errors.append(
                    f"chunked {cmd.kind.value} {cmd.items[-1].target if cmd.items else ''}: "
                    f"answered {result.status}")
            if not cmd.no_resp:
                responses.append(self._status(cmd.cmd_id, cmd.kind.value, result.status))
        elif result.command.no_resp:
            self._flush(run, responses)
            self.executor.execute([result.command], self._server_msg_id)
        else:
            run.append(result.command)

    def _flush(self, run: list[Command], responses: list[Outgoing]) -> None:
        """Execute a run of consecutive executable commands through the DM tree."""
        if not run:
            return
        out = self.executor.execute(list(run), self._server_msg_id)
        # (map: these checks run over every answer of every message; C-level iteration)
        if sum(map(isinstance, out, repeat(Status))) < len(run):
            self.summary.errors.append(f"the DM tree answered {len(out)} responses for "
                                       f"{len(run)} commands")
        if all(map(_msg_ref, out)):  # the executor filled them in (it normally does)
            responses.extend(out)
        else:
            for o in out:
                responses.append(o if o.msg_ref else dataclasses.replace(
                    o, msg_ref=self._server_msg_id))
        run.clear()

    def _alert_status(self, alert: Alert) -> Status:
        assert alert.cmd_id is not None
        code = alert.code
        if code is None:
            result = StatusCode.BAD_REQUEST
        elif code == AlertCode.SESSION_ABORT:
            raise PeerError("the server aborted the session (Alert 1223)",
                            hresult=HResult.E_ABORT)
        elif code == AlertCode.NO_END_OF_DATA:
            self.summary.errors.append("the server did not receive the end of a chunked object "
                                       "(Alert 1225)")
            self._outbox.drop_chunked()
            result = StatusCode.OK
        elif code in _ACCEPTED_ALERTS:
            result = StatusCode.OK
        else:  # user-interaction alerts (1100-1104) are not in the MS-MDM profile
            result = StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED
        return self._status(alert.cmd_id, "Alert", result)

    def _limit_objects(self, responses: list[Outgoing]) -> list[Outgoing]:
        """Results bigger than the server's MaxObjSize are not sent: their Get is answered 413
        (OMA-TS-DM_Protocol §7: an object larger than MaxObjSize must not be sent)."""
        limit = self._server_max_obj
        if limit is None:
            return responses
        out: list[Outgoing] = []
        for r in responses:
            if isinstance(r, Results) and any(utf8_len(i.data or "") > limit for i in r.items):
                self.summary.errors.append(f"Results for Get {r.cmd_ref} exceed the server's "
                                           f"MaxObjSize {limit}: answered 413")
                for i in range(len(out) - 1, -1, -1):
                    prev = out[i]
                    if isinstance(prev, Status) and prev.cmd_ref == r.cmd_ref:
                        out[i] = dataclasses.replace(
                            prev, data=StatusCode.REQUEST_ENTITY_TOO_LARGE)
                        break
                continue
            out.append(r)
        return out

    # --- sending ----------------------------------------------------------------------------

    def _status(self, cmd_ref: str, cmd: str, code: int) -> Status:
        return Status("", self._server_msg_id, cmd_ref, cmd, int(code))

    def _header_status(self) -> Status:
        code = StatusCode.AUTHENTICATION_ACCEPTED if self.summary.authenticated \
            else StatusCode.OK
        return self._status("0", "SyncHdr", code)

    def _header(self) -> SyncHdr:
        creds = self.config.credentials
        cred = None
        if self._send_cred and creds is not None and self._scheme is not None:
            cred = make_cred(creds, self._scheme, self._nonce)
        self._last_cred = cred
        if cred is not None:
            self.summary.auth_scheme = self._scheme
        return SyncHdr(
            session_id=self.config.session_id, msg_id=str(self._msg_id + 1),
            target=self.config.server_url, source=self.config.device.dev_id,
            # OMA-TS-DM_Security §5: the user name goes in Source/LocName with the Cred.
            source_name=creds.username if cred is not None and creds is not None else None,
            cred=cred, meta=self._header_meta)

    def _send_queue(self, extra: list[Outgoing]) -> SendMessage:
        """The next message: the SyncHdr Status, what fits of the outbox, then `extra`."""
        if self.summary.messages_sent >= self.config.max_messages:
            raise PeerError(f"the server did not end the session after "
                            f"{self.config.max_messages} messages",
                            hresult=HResult.ERROR_TIMEOUT)
        header = self._header()
        body = self._outbox.pack(header, self._header_status(), self._server_max_msg, extra)
        final = not self._outbox and self._server_final
        return self._send(body, final=final, header=header)

    def _send(self, body: list[Outgoing], *, final: bool,
              header: SyncHdr | None = None) -> SendMessage:
        """Number, encode and account for one message. `body` starts with the SyncHdr Status
        in every message but package 1, which has none: Windows still starts its CmdIDs at 2
        there, so CmdID 1 always belongs to the SyncHdr Status."""
        header = header or self._header()
        has_hdr = _has_hdr(body)
        self._last_body = body[has_hdr:]
        self._last_final = final
        self._msg_id += 1
        data = codec.encode(SyncMLMessage(header, tuple(body), final),
                            number_from=2 - has_hdr)
        s = self.summary
        s.messages_sent += 1
        s.bytes_sent += len(data)
        s.statuses_sent.update([c.data for c in body if isinstance(c, Status)])  # one update
        s.results_sent += sum(map(isinstance, body, repeat(Results)))
        self._state = _State.WAITING
        return SendMessage(data, header.msg_id, self._resp_uri)

    # --- the end ----------------------------------------------------------------------------

    def _complete(self) -> SessionComplete:
        self._state = _State.DONE
        if self._reassembler.pending_target is not None:
            self.summary.errors.append(f"the session ended inside the chunked object "
                                       f"{self._reassembler.pending_target}")
        self.summary.outcome = "completed"
        return SessionComplete(self.summary)

    def _fail(self, error: DmAgentError) -> SessionFailed:
        self._state = _State.DONE
        self.summary.outcome = "aborted" if error.hresult == HResult.E_ABORT else "failed"
        self.summary.error = error.message
        self.summary.hresult = error.hresult
        self.summary.failure = error
        return SessionFailed(error, self.summary)


_ITEM_NAMES: dict[Cmd, str] = {c: c.value for c in Cmd}  # command_name, without enum lookups
_msg_ref = attrgetter("msg_ref")

# MS-MDM §2.2.7.2 lists these as the supported alert types.
_ACCEPTED_ALERTS = frozenset({AlertCode.SERVER_INITIATED_MGMT, AlertCode.CLIENT_INITIATED_MGMT,
                              AlertCode.NEXT_MESSAGE, AlertCode.CLIENT_EVENT,
                              AlertCode.GENERIC})


def _has_hdr(body: list[Outgoing]) -> int:
    first = body[0] if body else None
    return int(isinstance(first, Status) and first.cmd_ref == "0" and first.cmd == "SyncHdr")


def _hresult_for_status(code: int) -> int:
    try:
        return hresult_from_http_status(code)
    except ValueError:
        return HResult.HTTP_E_STATUS_UNEXPECTED


__all__ = ["ClientSession", "DeviceInfo", "Event", "Executor", "LoginStatus", "SendMessage",
           "SessionComplete", "SessionConfig", "SessionFailed", "SessionStateError"]
