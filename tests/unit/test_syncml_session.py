"""The client session state machine, driven by scripted server messages (no I/O)."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence

import pytest

from agent.syncml import codec
from agent.syncml.auth import AuthScheme, Credentials
from agent.syncml.messages import (
    Alert,
    Chal,
    Cmd,
    Command,
    Container,
    Item,
    ItemCommand,
    Meta,
    Results,
    Status,
    SyncHdr,
    SyncMLMessage,
    UnknownCommand,
    command_name,
)
from agent.syncml.session import (
    ClientSession,
    DeviceInfo,
    LoginStatus,
    SendMessage,
    SessionComplete,
    SessionConfig,
    SessionFailed,
    SessionStateError,
)

URL = "https://mdm.example.test/omadm/cimhandler.ashx"
DEV = "8B2A9C1E-0D5F-4E1B-9A77-3C4D5E6F7081"
DEVICE = DeviceInfo(dev_id=DEV, man="Contoso", mod="Virtual Device", lang="de-DE")


class TreeStub:
    """A small in-test executor: a dict of node values. Get → 200 + Results or 404; Add/Replace
    store (Add on an existing node 418); Delete; Exec 200; containers 200; unknown 400."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        self.values = dict(values or {})
        self.calls: list[tuple[list[Command], str]] = []

    def execute(self, commands: Sequence[Command], msg_ref: str) -> list[Status | Results]:
        self.calls.append((list(commands), msg_ref))
        out: list[Status | Results] = []
        for cmd in commands:
            out += self._one(cmd, msg_ref)
        return out

    def _one(self, cmd: Command, msg_ref: str) -> list[Status | Results]:
        ref = cmd.cmd_id or ""
        if not isinstance(cmd, ItemCommand):
            code = 200 if isinstance(cmd, Container) else 400
            return [Status("", msg_ref, ref, command_name(cmd), code)]
        item = cmd.items[0]
        uri = item.target or ""
        if cmd.kind is Cmd.GET:
            if uri not in self.values:
                return [Status("", msg_ref, ref, "Get", 404)]
            return [Status("", msg_ref, ref, "Get", 200),
                    Results("", msg_ref, ref, (Item(source=uri, meta=Meta(format="chr"),
                                                    data=self.values[uri]),))]
        if cmd.kind is Cmd.ADD and uri in self.values:
            return [Status("", msg_ref, ref, "Add", 418)]
        if cmd.kind in (Cmd.ADD, Cmd.REPLACE):
            self.values[uri] = item.data or ""
        elif cmd.kind is Cmd.DELETE:
            self.values.pop(uri, None)
        return [Status("", msg_ref, ref, cmd.kind.value, 200)]

    @property
    def executed(self) -> list[Command]:
        return [c for cmds, _ in self.calls for c in cmds]


def make(tree: TreeStub | None = None, **kwargs: object) -> tuple[ClientSession, TreeStub]:
    tree = tree or TreeStub()
    config = SessionConfig(URL, DEVICE, session_id="2A", **kwargs)  # type: ignore[arg-type]
    return ClientSession(config, tree), tree


def srv(msg_id: int, *body: Command, final: bool = True, session: str = "2A",
        meta: Meta | None = None, resp_uri: str | None = None) -> bytes:
    return codec.encode(SyncMLMessage(SyncHdr(session, str(msg_id), DEV, URL, meta=meta,
                                              resp_uri=resp_uri), body, final))


def hdr(msg_ref: int, code: int = 200, chal: Chal | None = None) -> Status:
    return Status("1", str(msg_ref), "0", "SyncHdr", code, chal=chal)


def sent(event: object) -> SyncMLMessage:
    assert isinstance(event, SendMessage), event
    return codec.decode(event.body)


def get(cmd_id: str, uri: str) -> ItemCommand:
    return ItemCommand(Cmd.GET, cmd_id, (Item(target=uri),))


def replace(cmd_id: str, uri: str, data: str, **item: object) -> ItemCommand:
    return ItemCommand(Cmd.REPLACE, cmd_id, (Item(target=uri, data=data, **item),))  # type: ignore[arg-type]


def statuses(msg: SyncMLMessage) -> list[tuple[str, str, str, int]]:
    return [(c.msg_ref, c.cmd_ref, c.cmd, c.data) for c in msg.body if isinstance(c, Status)]


# --- package 1 ------------------------------------------------------------------------------

@pytest.mark.parametrize("initiated,login,alert", [
    (False, LoginStatus.USER, "1201"), (True, LoginStatus.NONE, "1200"),
    (False, LoginStatus.OTHERS, "1201")])
def test_package_1(initiated: bool, login: LoginStatus, alert: str) -> None:
    session, _ = make(server_initiated=initiated, login_status=login)
    msg = sent(session.start())
    h = msg.header
    assert (h.session_id, h.msg_id, h.target, h.source, h.ver_dtd, h.ver_proto) == (
        "2A", "1", URL, DEV, "1.2", "DM/1.2")
    assert h.meta == Meta(max_msg_size=524288, max_obj_size=4 * 1024 * 1024)
    assert h.cred is None
    assert msg.final
    a1, a2, rep = msg.body
    assert a1 == Alert("2", alert)
    assert a2 == Alert("3", "1224", (Item(meta=Meta(format="chr",
                                                    type="com.microsoft/MDM/LoginStatus"),
                                          data=login.value),))
    assert isinstance(rep, ItemCommand) and rep.kind is Cmd.REPLACE and rep.cmd_id == "4"
    assert [(i.source, i.data, i.meta) for i in rep.items] == [
        (f"./DevInfo/{n}", v, Meta(format="chr")) for n, v in
        (("DevId", DEV), ("Man", "Contoso"), ("Mod", "Virtual Device"), ("DmV", "1.3"),
         ("Lang", "de-DE"))]
    with pytest.raises(SessionStateError):
        session.start()


# --- replies: order, references, end of session ---------------------------------------------

def test_status_order_cmdref_msgref_and_results() -> None:
    session, tree = make(TreeStub({"./DevDetail/SwV": "10.0.22631", "./a": "x"}))
    session.start()
    reply = sent(session.receive(srv(
        1, hdr(1), Status("2", "1", "2", "Alert", 200),
        get("uuid-1", "./DevDetail/SwV"),
        replace("7", "./b", "v"),
        get("8", "./missing"),
        Alert("9", "1226"),
        UnknownCommand("Frobnicate", "10"),
        ItemCommand(Cmd.GET, None, (Item(target="./a"),)),
        Container(Cmd.ATOMIC, "11", (replace("12", "./c", "1"),)),
        Results("13", "1", "4", (Item(source="./x", data="y"),)))))
    assert statuses(reply) == [
        ("1", "0", "SyncHdr", 200), ("1", "uuid-1", "Get", 200), ("1", "7", "Replace", 200),
        ("1", "8", "Get", 404), ("1", "9", "Alert", 200), ("1", "10", "Frobnicate", 400),
        ("1", "", "Get", 400), ("1", "11", "Atomic", 200), ("1", "13", "Results", 200)]
    kinds = [type(c).__name__ for c in reply.body]
    assert kinds[:3] == ["Status", "Status", "Results"]  # Results right after its Get's Status
    res = reply.body[2]
    assert isinstance(res, Results) and (res.msg_ref, res.cmd_ref) == ("1", "uuid-1")
    assert res.items[0].data == "10.0.22631"
    assert [c.cmd_id for c in reply.body] == [str(n) for n in range(1, len(reply.body) + 1)]
    assert reply.header.msg_id == "2" and reply.final
    # The command without CmdID was not executed; the others ran in two runs around the Alert.
    assert all(c.cmd_id for c in tree.executed)
    assert [m for _, m in tree.calls] == ["1"] * len(tree.calls)
    assert tree.values["./b"] == "v"
    assert isinstance(tree.executed[-1], Container)  # containers go to the tree whole


def test_only_synchdr_status_ends_the_session_without_sending() -> None:
    session, _ = make()
    session.start()
    done = session.receive(srv(1, hdr(1), Status("2", "1", "2", "Alert", 200),
                               Status("3", "1", "4", "Replace", 200)))
    assert isinstance(done, SessionComplete)
    s = done.summary
    assert (s.outcome, s.messages_sent, s.messages_received) == ("completed", 1, 1)
    assert s.statuses_received == {200: 3}
    with pytest.raises(SessionStateError):
        session.receive(srv(2, hdr(2)))


@pytest.mark.parametrize("body", [b"", b"  \r\n"])
def test_empty_http_body_ends_the_session(body: bytes) -> None:
    session, _ = make()
    session.start()
    assert isinstance(session.receive(body), SessionComplete)


def test_session_continues_until_the_server_stops() -> None:
    session, _ = make(TreeStub({"./x": "1"}))
    session.start()
    r2 = sent(session.receive(srv(1, hdr(1), get("5", "./x"))))
    r3 = sent(session.receive(srv(2, hdr(2), replace("6", "./x", "2"))))
    assert statuses(r3) == [("2", "0", "SyncHdr", 200), ("2", "6", "Replace", 200)]
    assert (r2.header.msg_id, r3.header.msg_id) == ("2", "3")
    done = session.receive(srv(3, hdr(3)))
    assert isinstance(done, SessionComplete)
    s = done.summary
    assert s.commands_received == {"Status": 3, "Get": 1, "Replace": 1}
    assert s.statuses_sent == {200: 4} and s.results_sent == 1 and s.messages_sent == 3


# --- multi-message packages -----------------------------------------------------------------

def test_server_message_without_final_gets_alert_1222() -> None:
    session, tree = make(TreeStub({"./a": "A", "./b": "B"}))
    session.start()
    r = sent(session.receive(srv(1, hdr(1), get("3", "./a"), final=False)))
    assert not r.final
    assert isinstance(r.body[-1], Alert) and r.body[-1].data == "1222"
    assert [type(c).__name__ for c in r.body] == ["Status", "Status", "Results", "Alert"]
    r2 = sent(session.receive(srv(2, hdr(2), get("4", "./b"))))
    assert r2.final and not any(isinstance(c, Alert) for c in r2.body)
    assert [m for _, m in tree.calls] == ["1", "2"]
    assert isinstance(session.receive(srv(3, hdr(3))), SessionComplete)


ALERTS = [("1222", 200), ("1226", 200), ("1224", 200), ("1201", 200), ("1100", 406),
          ("1101", 406), ("1104", 406), ("9999", 406), ("abc", 400), ("", 400)]


@pytest.mark.parametrize("code,expected", ALERTS)
def test_server_alerts(code: str, expected: int) -> None:
    session, _ = make()
    session.start()
    reply = sent(session.receive(srv(1, hdr(1), Alert("5", code))))
    assert statuses(reply)[1] == ("1", "5", "Alert", expected)


def test_alert_1223_aborts() -> None:
    session, tree = make()
    session.start()
    event = session.receive(srv(1, hdr(1), Alert("5", "1223"), get("6", "./x")))
    assert isinstance(event, SessionFailed)
    assert event.error.hresult == 0x80004004  # E_ABORT
    assert "aborted the session (Alert 1223)" in event.error.message
    assert event.summary.outcome == "aborted"
    assert tree.calls == []  # nothing after the abort is executed
    with pytest.raises(SessionStateError):
        session.receive(b"")


def test_no_resp_command_gets_no_status_but_runs() -> None:
    session, tree = make()
    session.start()
    cmd = ItemCommand(Cmd.REPLACE, "5", (Item(target="./q", data="1"),), no_resp=True)
    reply = sent(session.receive(srv(1, hdr(1), cmd, replace("6", "./r", "2"))))
    assert statuses(reply) == [("1", "0", "SyncHdr", 200), ("1", "6", "Replace", 200)]
    assert tree.values == {"./q": "1", "./r": "2"}


def test_executor_without_msgref_gets_it_filled() -> None:
    class Bare:
        def execute(self, commands: Sequence[Command], msg_ref: str) -> list[Status | Results]:
            return [Status("", "", c.cmd_id or "", command_name(c), 200) for c in commands]

    session = ClientSession(SessionConfig(URL, DEVICE, session_id="2A"), Bare())
    session.start()
    reply = sent(session.receive(srv(7, hdr(1), replace("5", "./x", "1"))))
    assert statuses(reply)[1] == ("7", "5", "Replace", 200)


def test_resp_uri_is_used_for_the_next_message() -> None:
    session, _ = make(TreeStub({"./a": "1"}))
    assert session.start().resp_uri is None
    event = session.receive(srv(1, hdr(1), get("2", "./a"), resp_uri="https://other/dm?s=9"))
    assert isinstance(event, SendMessage) and event.resp_uri == "https://other/dm?s=9"


# --- large objects: server to client --------------------------------------------------------

OBJ = "0123456789" * 30  # 300 bytes


def _chunks(parts: list[str], *, size: int | None = len(OBJ), kind: Cmd = Cmd.REPLACE,
            uri: str = "./Vendor/MSFT/Big") -> list[ItemCommand]:
    out = []
    for n, part in enumerate(parts):
        meta = Meta(format="chr", size=size) if n == 0 else None
        out.append(ItemCommand(kind, f"c{n}", (Item(target=uri, meta=meta, data=part,
                                                     more_data=n < len(parts) - 1),)))
    return out


def test_incoming_large_object_is_reassembled() -> None:
    session, tree = make()
    session.start()
    c0, c1, c2 = _chunks([OBJ[:100], OBJ[100:250], OBJ[250:]])
    r1 = sent(session.receive(srv(1, hdr(1), c0, final=False)))
    assert statuses(r1)[1:] == [("1", "c0", "Replace", 213)]
    assert isinstance(r1.body[-1], Alert) and r1.body[-1].data == "1222" and not r1.final
    r2 = sent(session.receive(srv(2, hdr(2), c1, final=False)))
    assert statuses(r2)[1:] == [("2", "c1", "Replace", 213)]
    assert tree.calls == []
    r3 = sent(session.receive(srv(3, hdr(3), c2, get("9", "./Vendor/MSFT/Big"))))
    assert statuses(r3)[1:] == [("3", "c2", "Replace", 200), ("3", "9", "Get", 200)]
    whole = tree.calls[0][0][0]
    assert isinstance(whole, ItemCommand) and whole.cmd_id == "c2"
    assert whole.items[0].data == OBJ and not whole.items[0].more_data
    assert tree.values["./Vendor/MSFT/Big"] == OBJ


@pytest.mark.parametrize("size", [len(OBJ) + 1, len(OBJ) - 1])
def test_incoming_large_object_size_mismatch_is_424(size: int) -> None:
    session, tree = make()
    session.start()
    c0, c1 = _chunks([OBJ[:200], OBJ[200:]], size=size)
    sent(session.receive(srv(1, hdr(1), c0, final=False)))
    reply = sent(session.receive(srv(2, hdr(2), c1)))
    assert statuses(reply)[1:] == [("2", "c1", "Replace", 424)]
    assert tree.calls == []
    assert any("424" in e for e in session.summary.errors)


def test_incoming_large_object_interrupted_sends_alert_1225() -> None:
    session, tree = make()
    session.start()
    c0, _ = _chunks([OBJ[:200], OBJ[200:]])
    sent(session.receive(srv(1, hdr(1), c0, final=False)))
    reply = sent(session.receive(srv(2, hdr(2), replace("7", "./other", "v"))))
    alert = next(c for c in reply.body if isinstance(c, Alert))
    assert alert.data == "1225" and alert.items[0].source == "./Vendor/MSFT/Big"
    assert statuses(reply)[1:] == [("2", "7", "Replace", 200)]
    assert tree.values == {"./other": "v"}


@pytest.mark.parametrize("size,code", [(None, 412), (10 * 1024 * 1024, 413)])
def test_incoming_large_object_refused_for_every_chunk(size: int | None, code: int) -> None:
    session, tree = make()
    session.start()
    c0, c1, c2 = _chunks([OBJ[:100], OBJ[100:200], OBJ[200:]], size=size)
    codes = []
    for n, chunk in enumerate((c0, c1, c2), start=1):
        reply = sent(session.receive(srv(n, hdr(n), chunk, final=n == 3)))
        codes.append(statuses(reply)[1][3])
    assert codes == [code] * 3 and tree.calls == []


# --- large objects: client to server --------------------------------------------------------

def test_outgoing_results_are_chunked_to_the_server_max_msg_size() -> None:
    big = "".join(chr(0x41 + i % 26) for i in range(5000)) + "<&>é"
    session, _ = make(TreeStub({"./Vendor/MSFT/Blob": big, "./small": "s"}))
    session.start()
    limit = 1500
    event = session.receive(srv(1, hdr(1), get("g1", "./Vendor/MSFT/Blob"), get("g2", "./small"),
                                meta=Meta(max_msg_size=limit)))
    pieces: list[Item] = []
    all_statuses = []
    msg_id = 1
    while True:
        assert isinstance(event, SendMessage)
        assert len(event.body) <= limit
        reply = codec.decode(event.body)
        all_statuses += statuses(reply)
        for c in reply.body:
            if isinstance(c, Results) and c.cmd_ref == "g1":
                pieces.append(c.items[0])
        if reply.final:
            break
        assert pieces[-1].more_data
        msg_id += 1
        event = session.receive(srv(msg_id, hdr(msg_id), Status("2", str(msg_id), "3",
                                                                "Results", 213),
                                    Alert("3", "1222"), meta=Meta(max_msg_size=limit)))
    assert len(pieces) >= 4
    assert pieces[0].meta == Meta(format="chr", size=len(big.encode()))
    assert all(p.meta is None or p.meta.size is None for p in pieces[1:])
    assert [p.more_data for p in pieces] == [True] * (len(pieces) - 1) + [False]
    assert "".join(p.data or "" for p in pieces) == big
    assert ("1", "g2", "Get", 200) in all_statuses
    assert sum(1 for s in all_statuses if s[2] == "Alert") == len(pieces) - 1  # every 1222
    assert isinstance(session.receive(srv(msg_id + 1, hdr(msg_id + 1))), SessionComplete)


def test_results_larger_than_server_max_obj_size_answer_413() -> None:
    session, _ = make(TreeStub({"./big": "x" * 2000, "./ok": "y"}))
    session.start()
    reply = sent(session.receive(srv(1, hdr(1), get("1", "./big"), get("2", "./ok"),
                                     meta=Meta(max_obj_size=1000))))
    assert statuses(reply)[1:] == [("1", "1", "Get", 413), ("1", "2", "Get", 200)]
    assert [c.cmd_ref for c in reply.body if isinstance(c, Results)] == ["2"]


# --- authentication -------------------------------------------------------------------------

def _md5(user: str, secret: str, nonce: bytes) -> str:
    inner = base64.b64encode(hashlib.md5(f"{user}:{secret}".encode()).digest())
    return base64.b64encode(hashlib.md5(inner + b":" + nonce).digest()).decode()


def test_auth_basic_sent_until_212() -> None:
    creds = Credentials("dev-user", "s3cret", AuthScheme.BASIC)
    session, _ = make(TreeStub({"./a": "1"}), credentials=creds)
    p1 = sent(session.start())
    assert p1.header.cred is not None
    assert p1.header.cred.meta == Meta(format="b64", type="syncml:auth-basic")
    assert base64.b64decode(p1.header.cred.data) == b"dev-user:s3cret"
    assert p1.header.source_name == "dev-user"
    r = sent(session.receive(srv(1, hdr(1, 212), get("2", "./a"))))
    assert r.header.cred is None and r.header.source_name is None
    assert statuses(r)[0] == ("1", "0", "SyncHdr", 212)
    assert session.summary.authenticated and session.summary.auth_scheme == "syncml:auth-basic"
    assert "s3cret" not in repr(creds)


def test_auth_md5_challenge_then_accepted() -> None:
    creds = Credentials("dev-user", "s3cret", AuthScheme.MD5)
    session, tree = make(TreeStub({"./a": "1"}), credentials=creds)
    p1 = sent(session.start())
    assert p1.header.cred is None  # no nonce yet: wait for the server's challenge
    nonce = b"\x00\x01binary-nonce\xff"
    chal = Chal(Meta(format="b64", type="syncml:auth-md5",
                     next_nonce=base64.b64encode(nonce).decode()))
    retry = sent(session.receive(srv(1, hdr(1, 401, chal), get("7", "./a"))))
    assert tree.calls == []  # commands of a refused message are not executed
    assert retry.header.msg_id == "2"
    assert retry.header.cred is not None and retry.header.cred.data == _md5("dev-user",
                                                                            "s3cret", nonce)
    assert retry.header.cred.meta == Meta(format="b64", type="syncml:auth-md5")
    assert statuses(retry) == [("1", "0", "SyncHdr", 200)]
    assert [c.data for c in retry.body if isinstance(c, Alert)] == ["1201", "1224"]
    assert any(isinstance(c, ItemCommand) and c.kind is Cmd.REPLACE for c in retry.body)
    next_nonce = base64.b64encode(b"next").decode()
    r = sent(session.receive(srv(2, Status("1", "2", "0", "SyncHdr", 212, chal=Chal(Meta(
        type="syncml:auth-md5", format="b64", next_nonce=next_nonce))), get("8", "./a"))))
    assert r.header.cred is None and statuses(r)[0][3] == 212
    assert session.summary.next_nonce == next_nonce


def test_auth_md5_with_known_nonce_sends_cred_in_package_1() -> None:
    creds = Credentials("u", "p", AuthScheme.MD5)
    session, _ = make(credentials=creds, nonce=b"N")
    p1 = sent(session.start())
    assert p1.header.cred is not None and p1.header.cred.data == _md5("u", "p", b"N")


@pytest.mark.parametrize("scheme", [AuthScheme.BASIC, AuthScheme.MD5])
def test_wrong_password_stops_with_auth_error(scheme: AuthScheme) -> None:
    session, _ = make(credentials=Credentials("u", "wrong", scheme))
    session.start()
    n = 1
    event: object = None
    for _ in range(4):
        chal = Chal(Meta(type=scheme.value, format="b64",
                         next_nonce=base64.b64encode(f"n{n}".encode()).decode()))
        event = session.receive(srv(n, hdr(n, 401, chal)))
        if not isinstance(event, SendMessage):
            break
        n += 1
    assert isinstance(event, SessionFailed)
    assert event.error.hresult == 0x80190191  # HTTP_E_STATUS_DENIED
    assert "rejected the credentials of 'u'" in event.error.message
    # basic: the same credentials refused at once; md5: refused after answering a challenge
    assert event.summary.messages_sent == (1 if scheme is AuthScheme.BASIC else 2)


def test_auth_required_but_not_configured() -> None:
    session, _ = make()
    session.start()
    event = session.receive(srv(1, hdr(1, 407, Chal(Meta(type="syncml:auth-md5",
                                                          next_nonce="Tg==")))))
    assert isinstance(event, SessionFailed)
    assert "requires SyncML credentials (syncml:auth-md5)" in event.error.message
    assert event.error.hresult == 0x80190197
    assert "server.username" in event.error.advice


def test_unsupported_auth_scheme() -> None:
    session, _ = make(credentials=Credentials("u", "p"))
    session.start()
    event = session.receive(srv(1, hdr(1, 401, Chal(Meta(type="syncml:auth-MAC")))))
    assert isinstance(event, SessionFailed) and "'syncml:auth-MAC'" in event.error.message


# --- protocol errors ------------------------------------------------------------------------

@pytest.mark.parametrize("data,expect,hresult", [
    (srv(1, hdr(1, 500)), "Status 500 for the SyncHdr", 0x801901F4),
    (srv(1, hdr(1, 403)), "Status 403 for the SyncHdr", 0x80190193),
    (srv(1, hdr(1), session="99"), "SessionID '99' in session '2A'", 0x8007000D),
    (b"<html>login</html>", "root element is <html>", 0x86000018),
])
def test_protocol_errors_end_the_session(data: bytes, expect: str, hresult: int) -> None:
    session, _ = make()
    session.start()
    event = session.receive(data)
    assert isinstance(event, SessionFailed)
    assert expect in event.error.message and event.error.hresult == hresult
    assert event.summary.outcome == "failed" and event.summary.hresult == hresult


def test_endless_server_is_stopped() -> None:
    session, _ = make(TreeStub({"./a": "1"}), max_messages=3)
    session.start()
    events = [session.receive(srv(n, hdr(n), get(str(n + 1), "./a"))) for n in (1, 2, 3)]
    assert isinstance(events[1], SendMessage) and isinstance(events[2], SessionFailed)
    assert "did not end the session after 3 messages" in events[2].error.message
