"""The lab OMA-DM server over HTTPS, driven by the agent's SyncML session (scripted DM tree):
package 1, recorded messages and statuses, queue semantics, CmdIDs, multi-message packages both
ways, client large objects, syncml:auth-md5, the control API."""

from __future__ import annotations

import re
import ssl
import uuid
from collections.abc import Iterator

import httpx
import pytest
from lxml import etree

from agent.syncml import codec
from agent.syncml.auth import AuthScheme, Credentials
from agent.syncml.messages import Alert, ItemCommand, Status
from agent.syncml.session import SessionComplete, SessionFailed
from lab.control import ControlError, ControlNotFound, HttpControl
from lab.testing import LabServer, ScriptedTree, run_session

DEV = "dev-lab-0001"
GET_SWV = ("<Get><CmdID>7</CmdID><Item><Target><LocURI>./DevDetail/SwV</LocURI></Target>"
           "</Item></Get>")
REPLACE_X = ("<Replace><CmdID>8</CmdID><Item><Target><LocURI>./Vendor/MSFT/Test/X</LocURI>"
             "</Target><Meta><Format xmlns=\"syncml:metinf\">int</Format></Meta><Data>5</Data>"
             "</Item></Replace>")


@pytest.fixture
def lab() -> Iterator[LabServer]:
    with LabServer(config={"session": {"inventory": False}}) as server:
        yield server


@pytest.fixture
def client(lab: LabServer) -> HttpControl:
    assert lab.client is not None
    return lab.client


def test_package1_is_answered_recorded_and_the_session_ends(lab: LabServer,
                                                            client: HttpControl) -> None:
    tree = ScriptedTree()
    event, ex = run_session(lab.url, lab.ca_bundle, DEV, tree)
    assert isinstance(event, SessionComplete), event
    assert ex.http_status == [200]
    reply = codec.decode(ex.received[0])
    statuses = [c for c in reply.body if isinstance(c, Status)]
    # SyncHdr first (CmdRef 0), then one Status per client command in order
    assert (statuses[0].cmd_ref, statuses[0].cmd, statuses[0].data) == ("0", "SyncHdr", 200)
    assert [(s.cmd, s.data) for s in statuses[1:]] == [("Alert", 200), ("Alert", 200),
                                                        ("Replace", 200)]
    assert reply.final and reply.header.session_id == "1" and reply.header.target == DEV
    msgs = client.messages(DEV)
    assert [m["direction"] for m in msgs] == ["in", "out"]
    assert msgs[0]["body"].encode() == ex.sent[0]
    info = client.device(DEV)["info"]
    assert info["DevId"] == DEV and info["com.microsoft/MDM/LoginStatus"] == "user"


def test_empty_200_ends_the_session_after_the_last_statuses(lab: LabServer,
                                                            client: HttpControl) -> None:
    client.enqueue(DEV, GET_SWV)
    tree = ScriptedTree(values={"./DevDetail/SwV": "10.0.22631"})
    event, ex = run_session(lab.url, lab.ca_bundle, DEV, tree)
    assert isinstance(event, SessionComplete)
    assert len(ex.received) == 2 and ex.received[-1] == b""  # the server ended it
    assert client.messages(DEV)[-1]["http_status"] == 200


def test_queued_commands_are_sent_in_order_with_new_cmdids_and_tracked(
        lab: LabServer, client: HttpControl) -> None:
    ids = client.enqueue(DEV, GET_SWV + REPLACE_X)["ids"]
    other = client.enqueue("someone-else", GET_SWV)["ids"]
    assert len(ids) == 2
    assert [c["state"] for c in client.commands(DEV)] == ["queued", "queued"]
    tree = ScriptedTree(values={"./DevDetail/SwV": "10.0.22631"})
    event, ex = run_session(lab.url, lab.ca_bundle, DEV, tree)
    assert isinstance(event, SessionComplete)
    assert tree.executed == [("Get", "./DevDetail/SwV"), ("Replace", "./Vendor/MSFT/Test/X")]
    sent = [c for c in codec.decode(ex.received[0]).body if isinstance(c, ItemCommand)]
    for c in sent:  # UUID CmdIDs like Intune, not the ones given
        assert c.cmd_id is not None
        uuid.UUID(c.cmd_id)
    get = client.command(ids[0])
    assert get["state"] == "done" and get["cmd_id"] == sent[0].cmd_id
    assert [s["code"] for s in get["statuses"]] == [200]
    assert get["results"][0]["items"][0]["data"] == "10.0.22631"
    assert client.command(ids[1])["statuses"][0]["code"] == 200
    assert tree.values["./Vendor/MSFT/Test/X"] == "5"
    assert client.device(DEV)["reported"]["./DevDetail/SwV"]["value"] == "10.0.22631"
    assert client.command(other[0])["state"] == "queued"  # not for this device
    # the queue is drained: the next session only gets package 1's statuses
    tree2 = ScriptedTree()
    _, ex2 = run_session(lab.url, lab.ca_bundle, DEV, tree2, session_id="2")
    assert tree2.executed == [] and len(ex2.received) == 1


def test_failed_command_status_is_recorded(lab: LabServer, client: HttpControl) -> None:
    cid = client.enqueue(DEV, GET_SWV)["ids"][0]
    run_session(lab.url, lab.ca_bundle, DEV, ScriptedTree())  # SwV missing: 404
    cmd = client.command(cid)
    assert cmd["state"] == "done" and cmd["statuses"][0]["code"] == 404
    assert cmd["results"] == []


def test_counter_cmdids(lab: LabServer, client: HttpControl) -> None:
    lab.configure(session={"cmd_ids": "counter"})
    client.enqueue(DEV, GET_SWV + REPLACE_X)
    _, ex = run_session(lab.url, lab.ca_bundle, DEV, ScriptedTree())
    body = codec.decode(ex.received[0]).body
    assert [c.cmd_id for c in body] == [str(n) for n in range(1, len(body) + 1)]


def test_atomic_statuses_are_tracked_per_inner_cmdid(lab: LabServer,
                                                     client: HttpControl) -> None:
    atomic = f"<Atomic><CmdID>1</CmdID>{REPLACE_X}{GET_SWV.replace('Get', 'Delete')}</Atomic>"
    cid = client.enqueue(DEV, atomic)["ids"][0]
    tree = ScriptedTree()  # Delete of a missing node: 404 → the Atomic fails, Replace rolled back
    run_session(lab.url, lab.ca_bundle, DEV, tree)
    cmd = client.command(cid)
    assert len(cmd["cmd_ids"]["all"]) == 3
    assert sorted(s["code"] for s in cmd["statuses"]) == [216, 404, 507]
    assert "./Vendor/MSFT/Test/X" not in tree.values


def test_server_multi_message_package(lab: LabServer, client: HttpControl) -> None:
    lab.configure(session={"max_commands_per_message": 1})
    ids = client.enqueue(DEV, GET_SWV + REPLACE_X + GET_SWV)["ids"]
    tree = ScriptedTree(values={"./DevDetail/SwV": "v"})
    event, ex = run_session(lab.url, lab.ca_bundle, DEV, tree)
    assert isinstance(event, SessionComplete), event
    replies = [codec.decode(b) for b in ex.received if b]
    assert [r.final for r in replies] == [False, False, True]
    # the device asked for each next message with Alert 1222
    for body in ex.sent[1:3]:
        msg = codec.decode(body)
        assert any(isinstance(c, Alert) and c.code == 1222 for c in msg.body)
        assert not msg.final
    assert [client.command(i)["state"] for i in ids] == ["done"] * 3


def test_client_large_object_is_reassembled(lab: LabServer, client: HttpControl) -> None:
    lab.configure(session={"max_msg_size": 1600})  # the device must chunk its big Results
    big = "".join(f"{i:05d}" for i in range(1400))  # 7000 characters
    cid = client.enqueue(DEV, GET_SWV)["ids"][0]
    event, ex = run_session(lab.url, lab.ca_bundle, DEV,
                            ScriptedTree(values={"./DevDetail/SwV": big}))
    assert isinstance(event, SessionComplete), event
    assert len(ex.sent) >= 5  # package 1 + several chunks
    chunk_acks = [s for b in ex.received if b for s in codec.decode(b).body
                  if isinstance(s, Status) and s.data == 213]
    assert chunk_acks and all(s.cmd == "Results" for s in chunk_acks)
    assert client.command(cid)["results"][0]["items"][0]["data"] == big
    assert client.device(DEV)["reported"]["./DevDetail/SwV"]["value"] == big


def _creds(lab: LabServer, secret: str | None = None) -> Credentials:
    cfg = lab.lab.config()
    return Credentials(DEV, secret or cfg.session.auth_password, AuthScheme.MD5)


def test_auth_md5_challenge_then_212(lab: LabServer, client: HttpControl) -> None:
    lab.configure(session={"auth": "md5"})
    client.enqueue(DEV, GET_SWV)
    tree = ScriptedTree(values={"./DevDetail/SwV": "v"})
    event, ex = run_session(lab.url, lab.ca_bundle, DEV, tree, credentials=_creds(lab))
    assert isinstance(event, SessionComplete), event
    first, second = codec.decode(ex.received[0]), codec.decode(ex.received[1])
    hdr1 = first.body[0]
    assert isinstance(hdr1, Status) and hdr1.data in (401, 407) and hdr1.chal is not None
    assert hdr1.chal.meta.type == "syncml:auth-md5" and hdr1.chal.meta.next_nonce
    assert len(first.body) == 1  # nothing processed before authentication
    hdr2 = second.body[0]
    assert isinstance(hdr2, Status) and hdr2.data == 212
    assert hdr2.chal is not None and hdr2.chal.meta.next_nonce != hdr1.chal.meta.next_nonce
    assert tree.executed == [("Get", "./DevDetail/SwV")]
    # the next session authenticates at once with the nonce from the 212
    from agent.syncml.auth import decode_nonce

    nonce = decode_nonce(hdr2.chal.meta.next_nonce or "")
    event2, ex2 = run_session(lab.url, lab.ca_bundle, DEV, ScriptedTree(), session_id="2",
                              credentials=_creds(lab), nonce=nonce)
    assert isinstance(event2, SessionComplete)
    hdr = codec.decode(ex2.received[0]).body[0]
    assert isinstance(hdr, Status) and hdr.data == 212


def test_auth_md5_wrong_secret_is_refused(lab: LabServer, client: HttpControl) -> None:
    lab.configure(session={"auth": "md5"})
    client.enqueue(DEV, GET_SWV)
    tree = ScriptedTree(values={"./DevDetail/SwV": "v"})
    event, ex = run_session(lab.url, lab.ca_bundle, DEV, tree,
                            credentials=_creds(lab, secret="wrong"))
    assert isinstance(event, SessionFailed)
    assert "rejected the credentials" in event.error.message
    codes = [codec.decode(b).body[0].data for b in ex.received]  # type: ignore[union-attr]
    assert codes[-1] == 401 and 212 not in codes
    assert tree.executed == []
    assert client.commands(DEV)[0]["state"] == "queued"  # nothing was sent unauthenticated


def test_unanswered_commands_go_back_to_the_queue(lab: LabServer, client: HttpControl) -> None:
    cid = client.enqueue(DEV, GET_SWV)["ids"][0]
    # the device gets the command but never answers (walks away after package 1)
    run_session(lab.url, lab.ca_bundle, DEV, ScriptedTree(), stop_after=1)
    assert client.command(cid)["state"] == "sent"
    tree = ScriptedTree(values={"./DevDetail/SwV": "v"})
    run_session(lab.url, lab.ca_bundle, DEV, tree, session_id="2")
    cmd = client.command(cid)
    assert cmd["state"] == "done" and cmd["session_id"] == "2"
    assert tree.executed == [("Get", "./DevDetail/SwV")]


def test_bad_syncml_is_refused_with_400(lab: LabServer) -> None:
    with httpx.Client(verify=ssl.create_default_context(cafile=lab.ca_bundle)) as http:
        r = http.post(lab.url, content=b"<SyncML><nope/></SyncML>")
        assert r.status_code == 400 and "namespace" in r.text and "client" in r.text
        r = http.post(lab.url, content=b'<SyncML xmlns="SYNCML:SYNCML1.2"><SyncBody/></SyncML>')
        assert r.status_code == 400 and "SyncHdr" in r.text
        r = http.post(lab.url, content=b'<!DOCTYPE x [<!ENTITY a "b">]><SyncML/>')
        assert r.status_code == 400
        assert http.get(lab.url).status_code == 405
        assert http.post(lab.url + "X", content=b"").status_code == 404
        # any path under the endpoint is the endpoint (Windows appends to ADDR at times)
        assert http.post(lab.url + "/sub", content=b"<SyncML/>").status_code == 400


def test_control_api_needs_the_token(lab: LabServer) -> None:
    tls = ssl.create_default_context(cafile=lab.ca_bundle)
    with httpx.Client(verify=tls, base_url=lab.base_url) as http:
        assert http.get("/lab/devices").status_code == 401
        r = http.get("/lab/devices", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401
        assert http.get("/lab/health").status_code == 200


def test_control_api_errors(client: HttpControl) -> None:
    with pytest.raises(ControlError, match=r"unknown SyncML command\(s\): Bogus"):
        client.enqueue(DEV, "<Bogus/>")
    with pytest.raises(ControlError, match="malformed"):
        client.enqueue(DEV, "<Get><CmdID>1</CmdID>")
    with pytest.raises(ControlNotFound):
        client.device("never-seen")
    with pytest.raises(ControlNotFound):
        client.command(999)
    with pytest.raises(ControlNotFound, match="no profile"):
        client.assign("nope", device=DEV)
    with pytest.raises(ControlError, match="exactly one"):
        client.assign("device-client-auth")


def test_assign_unassign_and_set_device(client: HttpControl) -> None:
    res = client.assign("device-client-auth", group="kiosks")
    assert res["changed"] and res["kind"] == "group"
    assert not client.assign("device-client-auth", group="kiosks")["changed"]
    client.set_device(DEV, name="pc1", groups=["kiosks"], upn="a@lab.test")
    dev = client.device(DEV)
    assert dev["assigned"] == [res["profile_id"]] and dev["name"] == "pc1"
    prof = next(p for p in client.profiles() if p["id"] == res["profile_id"])
    assert prof["assignments"][0]["target"] == "kiosks"
    assert client.unassign("device-client-auth", group="kiosks")["changed"]
    assert client.device(DEV)["assigned"] == []


def test_recorded_xml_is_wellformed_and_matches_the_wire(lab: LabServer,
                                                          client: HttpControl) -> None:
    client.enqueue(DEV, GET_SWV)
    _, ex = run_session(lab.url, lab.ca_bundle, DEV, ScriptedTree())
    out = [m for m in client.messages(DEV) if m["direction"] == "out" and m["body"]]
    assert out[0]["body"].encode() == ex.received[0]
    etree.fromstring(out[0]["body"].encode())
    assert re.search(r"<Get><CmdID>[0-9a-f-]{36}</CmdID>", out[0]["body"])
