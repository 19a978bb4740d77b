"""The OMA-DM session I/O shell: session state machine ↔ transport until the session ends.

Thin on purpose: the protocol lives in `agent.syncml.session` (sans-IO), the DM tree in
`agent.dmtree`, HTTP in `agent.transport`. This module wires them for one device and one
enrollment and keeps the little per-account state a session leaves behind (the SessionID
counter and the server's MD5 nonce for the next session).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from agent.errors import ConfigError, DmAgentError, LocalError
from agent.syncml.auth import AuthScheme, Credentials, decode_nonce
from agent.syncml.messages import Alert, AlertCode, Item, Meta
from agent.syncml.session import (
    ClientSession,
    DeviceInfo,
    Event,
    Executor,
    LoginStatus,
    SendMessage,
    SessionConfig,
)
from agent.syncml.summary import SessionSummary
from agent.transport import Transport, management_url

if TYPE_CHECKING:
    from agent.device import DeviceContext
    from agent.enrollment import Enrollment

# Per-account session state the agent keeps (Windows keeps the equivalent in DMAcc).
STATE_KEY = r"HKLM\SOFTWARE\dmagent\OMADM\Accounts"
SESSION_COUNTER = "LastSessionID"  # REG_DWORD, 1..255 (MS-MDM §2.2.3.8: an 8-bit counter)
SERVER_NONCE = "ServerNextNonce"  # REG_SZ, base64 NextNonce of the server's last Chal


def state_key(enrollment: Enrollment) -> str:
    return f"{STATE_KEY}\\{enrollment.account_id}"


def next_session_id(ctx: DeviceContext, enrollment: Enrollment) -> str:
    """The next SessionID for this account: a small hex counter, as Windows uses."""
    key = state_key(enrollment)
    reg = ctx.registry
    with reg.transaction():
        last = reg.query(key, SESSION_COUNTER)
        n = (last if isinstance(last, int) else 0) % 255 + 1
        reg.set_dword(key, SESSION_COUNTER, n)
    return f"{n:X}"


def credentials_from_config(ctx: DeviceContext) -> Credentials | None:
    server = ctx.config.server
    if server.auth == "none":
        return None
    if not server.username:
        raise ConfigError(f"server.auth is {server.auth!r} but server.username is empty")
    scheme = AuthScheme.MD5 if server.auth == "md5" else AuthScheme.BASIC
    return Credentials(server.username, server.password, scheme)


def session_config(ctx: DeviceContext, enrollment: Enrollment, *, session_id: str,
                   server_initiated: bool = False,
                   login_status: LoginStatus | None = None) -> SessionConfig:
    dev = ctx.device
    if login_status is None:  # "user" when there is an enrolled/interactive user to speak of
        login_status = LoginStatus.USER if (enrollment.upn or dev.user_upn) else \
            LoginStatus.NONE
    stored = ctx.registry.query(state_key(enrollment), SERVER_NONCE)
    nonce = decode_nonce(stored) if isinstance(stored, str) else None
    return SessionConfig(
        extra_alerts=tuple(enrollment_alerts(ctx)) if ctx.config.sync.alert_1226 else (),
        server_url=enrollment.server_url,
        device=DeviceInfo(dev_id=dev.device_id, man=dev.manufacturer, mod=dev.model,
                          lang=dev.language),
        session_id=session_id, login_status=login_status, server_initiated=server_initiated,
        credentials=credentials_from_config(ctx), nonce=nonce,
        max_obj_size=ctx.config.server.max_response_bytes)


def tree_executor(ctx: DeviceContext, enrollment: Enrollment) -> Executor:
    """The device's DM tree (agent.dmtree) as the session's executor."""
    try:
        from agent.dmtree.executor import TreeExecutor
        from agent.dmtree.tree import build_tree
    except ImportError as exc:
        raise LocalError(f"the DM tree is not available in this build ({exc})") from None
    return TreeExecutor(build_tree(ctx, enrollment), ctx.registry)


async def run_session(ctx: DeviceContext, enrollment: Enrollment, executor: Executor,
                      transport: Transport, *, server_initiated: bool = False,
                      login_status: LoginStatus | None = None,
                      clock: Callable[[], float] = time.monotonic) -> SessionSummary:
    """Run one management session to its end. The summary says how it ended; when it failed,
    `summary.failure` holds the error (the caller decides whether to raise it)."""
    if not enrollment.server_url:
        raise ConfigError(f"enrollment {enrollment.enrollment_id} has no server URL (ADDR)")
    config = session_config(ctx, enrollment, session_id=next_session_id(ctx, enrollment),
                            server_initiated=server_initiated, login_status=login_status)
    session = ClientSession(config, executor)
    default_url = management_url(enrollment.server_url)
    started = clock()
    event: Event = session.start()
    while isinstance(event, SendMessage):
        try:
            data = await transport.post(event.resp_uri or default_url, event.body)
        except DmAgentError as exc:
            event = session.fail(exc)
            break
        event = session.receive(data)
    summary = event.summary
    summary.duration_s = clock() - started
    if summary.next_nonce:
        ctx.registry.set_sz(state_key(enrollment), SERVER_NONCE, summary.next_nonce)
    if config.extra_alerts and summary.failure is None:
        clear_enrollment_alerts(ctx)  # delivered: the server answered the session
    return summary


# --- Alert 1226 after an enrollment (optional, see SyncConfig.alert_1226) ----------------------

ALERT_FLAG = "ReportResultAlert"  # on the SCEP node key, set by certinst when it finishes
ALERT_TYPE = "com.microsoft:mdm.SCEP.enrollment.result"
_SCEP_ROOTS = ((r"HKLM\Software\Microsoft\SCEP", "./Device"),
               (r"HKCU\Software\Microsoft\SCEP", "./User"))


def _flagged_nodes(ctx: DeviceContext) -> list[tuple[str, str, str]]:
    """(node key, scope prefix, UniqueID) of the nodes waiting to report their result."""
    reg = ctx.registry
    out = []
    for root, scope in _SCEP_ROOTS:
        if not reg.key_exists(root):
            continue
        for provider in reg.subkeys(root):
            for uid in reg.subkeys(f"{root}\\{provider}"):
                node = f"{root}\\{provider}\\{uid}"
                if reg.query(node, ALERT_FLAG):
                    out.append((node, scope, uid))
    return out


def enrollment_alerts(ctx: DeviceContext) -> list[Alert]:
    """One generic alert per finished enrollment: Source = the node's Enroll, Data = the signed
    ErrorCode (0 on success), Format int."""
    from agent.diagnostics import to_signed

    alerts = []
    for node, scope, uid in _flagged_nodes(ctx):
        error = ctx.registry.query(node, "ErrorCode")
        uri = f"{scope}/Vendor/MSFT/ClientCertificateInstall/SCEP/{uid}/Install/Enroll"
        alerts.append(Alert("", str(int(AlertCode.GENERIC)), (Item(
            source=uri, meta=Meta(format="int", type=ALERT_TYPE),
            data=str(to_signed(error if isinstance(error, int) else 0))),)))
    return alerts


def clear_enrollment_alerts(ctx: DeviceContext) -> None:
    with ctx.registry.transaction():
        for node, _, _ in _flagged_nodes(ctx):
            ctx.registry.delete_value(node, ALERT_FLAG)
