"""`dmagent sync`: run an OMA-DM management session now — through the running daemon when
there is one, else (and always with --once) in this process."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from agent.commands.base import App, add_json_flag

if TYPE_CHECKING:
    from agent.enrollment import Enrollment
    from agent.syncml.summary import SessionSummary


def register(sub: Any) -> None:
    p = sub.add_parser(
        "sync", help="run an OMA-DM session with the MDM server now",
        description="Run one OMA-DM (SyncML 1.2, MS-MDM) management session with the MDM "
                    "server, like Settings > Accounts > Access work or school > Sync: package "
                    "1, then the server's commands against the DM tree until the server ends "
                    "the session. When a daemon runs for this state dir, it syncs (like "
                    "SIGHUP) and this command prints its result; otherwise, and always with "
                    "--once, the session runs in this process.",
        epilog="exit codes: 0 the session completed, 1 the server refused or broke the "
               "protocol (auth, abort), 4 the server could not be reached, 5 no enrollment.")
    p.add_argument("--once", action="store_true",
                   help="run the session in this process even when a daemon runs")
    p.add_argument("--server", metavar="URL",
                   help="the MDM server's OMA-DM URL (ADDR); uses or creates the enrollment "
                        "for it (default: server.url, else the default enrollment)")
    p.add_argument("--login-status", choices=("user", "others", "none"),
                   help="what Alert 1224 LoginStatus reports (default: user when a user UPN "
                        "is known, else none)")
    p.add_argument("--server-initiated", action="store_true",
                   help="answer a server notification: Alert 1200 instead of 1201")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace, app: App) -> int:
    import asyncio

    from agent.omadm import run_session, tree_executor
    from agent.syncml.session import LoginStatus
    from agent.transport import HttpTransport, TransportOptions

    if not args.once and not args.server:
        from agent.statelock import StateLock

        if StateLock(app.config.state_dir / "dmagent.lock").holder_pid() is not None:
            return _through_daemon(args, app)
    ctx = app.ctx
    enrollment = _enrollment(app, args.server)
    executor = tree_executor(ctx, enrollment)
    login = LoginStatus(args.login_status) if args.login_status else None

    async def session() -> SessionSummary:
        async with HttpTransport(TransportOptions.from_config(ctx.config.server)) as transport:
            return await run_session(ctx, enrollment, executor, transport,
                                     server_initiated=args.server_initiated,
                                     login_status=login)

    from agent.enrollment import EnrollmentStore

    summary = asyncio.run(session())
    EnrollmentStore(ctx.registry).record_session(
        enrollment, summary.failure is None,
        detail="ok" if summary.failure is None else summary.failure.message)
    if args.json:
        app.print_json({"enrollment_id": enrollment.enrollment_id, **summary.as_dict()})
    else:
        _print_text(app, enrollment, summary)
    if summary.failure is not None:
        raise summary.failure
    return 0


def _through_daemon(args: argparse.Namespace, app: App) -> int:
    import asyncio

    from agent.control import request
    from agent.errors import PeerError

    answer = asyncio.run(request(app.config.state_dir, {"cmd": "sync"}))
    if args.json:
        app.print_json({"via": "daemon", **answer})
    else:
        for r in answer.get("results", []):
            summary = r.get("summary", {})
            app.print(f"Session with enrollment {r['enrollment_id']} (through the daemon): "
                      f"{'completed' if r['ok'] else 'failed: ' + r.get('error', '')}"
                      + (f", {summary.get('messages_sent')} message(s) sent"
                         if summary else ""))
        if not answer.get("results"):
            app.print("the daemon has no enrollment to sync" if answer.get("ok") else
                      f"the daemon could not sync: {answer.get('error', '')}")
    if not answer.get("ok"):
        detail = "; ".join(r.get("error", "") for r in answer.get("results", []))
        raise PeerError(f"the sync through the daemon failed: {detail or answer.get('error')}")
    return 0


def _enrollment(app: App, server: str | None) -> Enrollment:
    from agent.enrollment import EnrollmentStore
    from agent.errors import NotFoundError

    store = EnrollmentStore(app.ctx.registry)
    url = server or app.config.server.url
    if url:
        return store.ensure(url)
    enrollment = store.default()
    if enrollment is None:
        raise NotFoundError("there is no MDM enrollment to sync with",
                            advice="run `dmagent sync --once --server https://<server>/<path>` "
                                   "or set server.url in the configuration")
    return enrollment


def _print_text(app: App, enrollment: Enrollment, s: SessionSummary) -> None:
    took = f" in {s.duration_s:.2f} s" if s.duration_s is not None else ""
    app.print(f"Session {s.session_id} with {s.server_url} (enrollment "
              f"{enrollment.enrollment_id}): {s.outcome}{took}")
    app.print(f"  messages:          {s.messages_sent} sent ({s.bytes_sent} bytes), "
              f"{s.messages_received} received ({s.bytes_received} bytes)")
    app.print(f"  commands received: {_counts(s.commands_received) or 'none'}")
    app.print(f"  statuses sent:     {_counts(s.statuses_sent) or 'none'}")
    app.print(f"  results sent:      {s.results_sent}")
    if s.auth_scheme:
        state = "accepted" if s.authenticated else "not accepted"
        app.print(f"  authentication:    {s.auth_scheme} ({state})")
    for err in s.errors:
        app.print(f"  warning:           {err}")


def _counts(counter: dict[Any, int]) -> str:
    return ", ".join(f"{key} x{n}" for key, n in sorted(counter.items(), key=lambda kv:
                                                         str(kv[0])))
