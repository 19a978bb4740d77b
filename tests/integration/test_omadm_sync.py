"""Whole OMA-DM sessions over real HTTPS on 127.0.0.1: `run_session` in process and
`dmagent sync --once` as a user runs it."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.config import load_config
from agent.device import DeviceContext
from agent.diagnostics import HResult
from agent.enrollment import EnrollmentStore
from agent.errors import PeerError, UnreachableError
from agent.omadm import SERVER_NONCE, run_session, state_key
from agent.syncml import codec
from agent.syncml.messages import (
    Chal,
    Cmd,
    Item,
    ItemCommand,
    Meta,
    Results,
    Status,
    SyncHdr,
    SyncMLMessage,
)
from agent.syncml.summary import SessionSummary
from agent.transport import HttpTransport, TransportOptions
from tests.conftest import CliResult, free_port
from tests.integration.test_omadm_transport import (
    HttpsServer,
    Pki,
    Reply,
    Request,
    ScriptedDMServer,
    make_pki,
)
from tests.unit.test_syncml_session import TreeStub

DEV = "5D1E0C7A-2B3C-4D5E-8F90-A1B2C3D4E5F6"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def server(pki: Pki) -> Iterator[HttpsServer]:
    s = HttpsServer(pki)
    yield s
    s.stop()


def _ctx(state: Path, **overrides: object) -> DeviceContext:
    return DeviceContext(load_config(env={}, overrides={
        "state_dir": str(state), "device.device_id": DEV, **overrides}))


def _session(ctx: DeviceContext, url: str, pki: Pki, executor: object) -> SessionSummary:
    enrollment = EnrollmentStore(ctx.registry).ensure(url)

    async def go() -> SessionSummary:
        async with HttpTransport(TransportOptions(ca_bundle=str(pki.ca))) as t:
            return await run_session(ctx, enrollment, executor, t)  # type: ignore[arg-type]
    return asyncio.run(go())


def get(cmd_id: str, uri: str) -> ItemCommand:
    return ItemCommand(Cmd.GET, cmd_id, (Item(target=uri),))


def test_run_session_end_to_end(server: HttpsServer, pki: Pki, tmp_path: Path) -> None:
    dm = ScriptedDMServer([[get("a1b2", "./DevDetail/SwV"),
                            ItemCommand(Cmd.REPLACE, "7", (Item(target="./x", data="1"),))],
                           [get("9", "./x")]])
    server.handler = dm
    url = server.base + "/omadm/cimhandler.ashx"
    tree = TreeStub({"./DevDetail/SwV": "10.0.22631.4460"})
    with _ctx(tmp_path) as ctx:
        summary = _session(ctx, url, pki, tree)
        assert summary.outcome == "completed" and summary.failure is None
        assert summary.session_id == "1" and summary.duration_s is not None
        assert (summary.messages_sent, summary.messages_received) == (3, 3)
        assert summary.commands_received == {"Status": 8, "Get": 2, "Replace": 1}
        assert summary.results_sent == 2
        assert [r.path for r in server.requests] == [
            "/omadm/cimhandler.ashx?mode=Maintenance&Platform=WoA"] * 3
        p1, m2, m3 = dm.received
        assert (p1.header.msg_id, m2.header.msg_id, m3.header.msg_id) == ("1", "2", "3")
        assert {m.header.session_id for m in dm.received} == {"1"}
        assert p1.header.source == DEV and p1.header.target == url
        results = [c for c in m2.body if isinstance(c, Results)]
        assert results[0].items[0].data == "10.0.22631.4460"
        assert tree.values["./x"] == "1"
        # The next session gets the next SessionID.
        assert _session(ctx, url, pki, TreeStub()).session_id == "2"


def test_run_session_md5_auth_and_nonce_kept(server: HttpsServer, pki: Pki,
                                             tmp_path: Path) -> None:
    nonces = iter([b"first-nonce", b"next-session-nonce"])
    seen: list[SyncMLMessage] = []

    def handler(req: Request) -> Reply:
        msg = codec.decode(req.body)
        seen.append(msg)
        h = msg.header
        chal = Chal(Meta(type="syncml:auth-md5", format="b64",
                         next_nonce=base64.b64encode(next(nonces, b"n")).decode()))
        code = 212 if h.cred is not None else 401
        body = (Status("1", h.msg_id, "0", "SyncHdr", code, chal=chal),)
        return Reply(body=codec.encode(SyncMLMessage(SyncHdr(h.session_id, str(len(seen)),
                                                             h.source, h.target), body)))

    server.handler = handler
    with _ctx(tmp_path, **{"server.auth": "md5", "server.username": "dev",
                           "server.password": "pw"}) as ctx:
        summary = _session(ctx, server.base + "/dm", pki, TreeStub())
        assert summary.outcome == "completed" and summary.authenticated
        assert seen[0].header.cred is None and seen[1].header.cred is not None
        enrollment = EnrollmentStore(ctx.registry).ensure(server.base + "/dm")
        stored = ctx.registry.query(state_key(enrollment), SERVER_NONCE)
        assert base64.b64decode(str(stored)) == b"next-session-nonce"
        # The next session starts with credentials for the stored nonce: no challenge needed.
        seen.clear()
        assert _session(ctx, server.base + "/dm", pki, TreeStub()).authenticated
        assert len(seen) == 1 and seen[0].header.cred is not None


def test_run_session_unreachable(pki: Pki, tmp_path: Path) -> None:
    with _ctx(tmp_path) as ctx:
        summary = _session(ctx, f"https://127.0.0.1:{free_port()}/dm", pki, TreeStub())
    assert summary.outcome == "failed"
    assert isinstance(summary.failure, UnreachableError)
    assert summary.hresult == HResult.WINHTTP_CANNOT_CONNECT


def test_run_session_follows_resp_uri(server: HttpsServer, pki: Pki, tmp_path: Path) -> None:
    paths: list[str] = []

    def handler(req: Request) -> Reply:
        paths.append(req.path)
        msg = codec.decode(req.body)
        h = msg.header
        body: tuple[Status | ItemCommand, ...] = (Status("1", h.msg_id, "0", "SyncHdr", 200),)
        if len(paths) == 1:
            body += (get("2", "./a"),)
        return Reply(body=codec.encode(SyncMLMessage(SyncHdr(
            h.session_id, str(len(paths)), h.source, h.target,
            resp_uri=server.base + "/dm/next?sid=77"), body)))

    server.handler = handler
    with _ctx(tmp_path) as ctx:
        assert _session(ctx, server.base + "/dm", pki, TreeStub({"./a": "1"})).outcome == \
            "completed"
    assert paths == ["/dm?mode=Maintenance&Platform=WoA", "/dm/next?sid=77"]


def test_run_session_auth_refused(server: HttpsServer, pki: Pki, tmp_path: Path) -> None:
    server.handler = ScriptedDMServer(header_code=401)
    with _ctx(tmp_path, **{"server.auth": "basic", "server.username": "dev",
                           "server.password": "wrong"}) as ctx:
        summary = _session(ctx, server.base + "/dm", pki, TreeStub())
    assert isinstance(summary.failure, PeerError)
    assert summary.hresult == HResult.HTTP_E_STATUS_DENIED


# --- the CLI ------------------------------------------------------------------------------------

@pytest.fixture
def dmagent(run_cli: Callable[..., CliResult], pki: Pki) -> Callable[..., CliResult]:
    def run(*args: str, **env: str) -> CliResult:
        return run_cli(*args, env={"DMAGENT_SERVER_CA_BUNDLE": str(pki.ca),
                                   "DMAGENT_DEVICE_DEVICE_ID": DEV, **env})
    return run


def test_cli_sync_once_with_the_real_dm_tree(server: HttpsServer,
                                             dmagent: Callable[..., CliResult]) -> None:
    dm = ScriptedDMServer([[get("1", "./DevInfo/DevId"), get("2", "./DevInfo/NoSuchNode")]])
    server.handler = dm
    url = server.base + "/omadm/cimhandler.ashx"
    res = dmagent("sync", "--once", "--server", url)
    assert res.returncode == 0, res.stderr
    assert f"with {url}" in res.stdout and ": completed in " in res.stdout
    assert "Get x2" in res.stdout and "results sent:      1" in res.stdout
    reply = dm.received[1]
    statuses = {(s.cmd_ref, s.data) for s in reply.body if isinstance(s, Status)}
    assert ("1", 200) in statuses and ("2", 404) in statuses
    (results,) = [c for c in reply.body if isinstance(c, Results)]
    assert results.items[0].data == DEV
    # JSON, and the same enrollment (and the next SessionID) the second time.
    server.handler = ScriptedDMServer()
    res = dmagent("sync", "--once", "--server", url, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["outcome"] == "completed" and out["session_id"] == "2"
    assert out["commands_received"] == {"Status": 4}


def test_cli_sync_errors(server: HttpsServer, dmagent: Callable[..., CliResult]) -> None:
    # No daemon runs for this state dir: a plain `sync` runs the session in this process.
    res = dmagent("sync")
    assert res.returncode == 5 and "no MDM enrollment" in res.stderr

    res = dmagent("sync", "--once")
    assert res.returncode == 5 and "no MDM enrollment" in res.stderr

    res = dmagent("sync", "--once", "--server", f"https://127.0.0.1:{free_port()}/dm")
    assert res.returncode == 4 and "cannot connect" in res.stderr

    server.handler = ScriptedDMServer(header_code=401)
    res = dmagent("sync", "--once", "--server", server.base + "/dm")
    assert res.returncode == 1 and "requires SyncML credentials" in res.stderr
    assert ": failed" in res.stdout

    res = dmagent("sync", "--once", "--server", server.base + "/dm", DMAGENT_SERVER_CA_BUNDLE="")
    assert res.returncode == 4 and "not trusted" in res.stderr
