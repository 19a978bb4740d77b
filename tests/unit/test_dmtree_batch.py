"""One store transaction per message: one commit, per-command savepoints, durable answers.

The executor runs the plain commands of a message in one transaction (a savepoint per Item)
and each top-level Atomic in its own; everything is committed before `execute` returns, and
deferred side effects (events) run only after that commit.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.dmtree.executor import TreeExecutor
from agent.registry import Registry
from agent.syncml.messages import Command, Results, Status
from tests.unit.dmtree_support import (
    Env,
    FaultyStore,
    add,
    atomic,
    codes,
    exec_,
    get,
    make_env,
    rep,
    results,
    scep,
    sequence,
    snapshot,
)

POLL = "./Vendor/MSFT/DMClient/Provider/MS%20DM%20Server/Poll"
FIRST = f"{POLL}/IntervalForFirstSetOfRetries"
SECOND = f"{POLL}/IntervalForSecondSetOfRetries"
NC = "./Vendor/MSFT/NodeCache/MS%20DM%20Server"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


def commits_during(env: Env, *commands: Command) -> tuple[list[str], list[Status | Results]]:
    seen: list[str] = []
    env.registry._conn.set_trace_callback(seen.append)
    try:
        out = env.run(*commands)
    finally:
        env.registry._conn.set_trace_callback(None)
    return [s for s in seen if s in ("COMMIT", "ROLLBACK")], out


def test_a_message_of_plain_commands_commits_once(env: Env) -> None:
    message = [add(f"a{i}", f"{NC}/Nodes/{i}/NodeURI", "./DevDetail/SwV") for i in range(10)]
    message += [get(f"g{i}", "./DevInfo/Mod") for i in range(10)]
    message += [rep(f"r{i}", f"{NC}/Nodes/{i}/ExpectedValue", str(i)) for i in range(10)]
    ends, out = commits_during(env, *message)
    assert ends == ["COMMIT"]
    assert {c for _, _, c in codes(out)} == {200}


def test_each_top_level_atomic_is_a_transaction_of_its_own(env: Env) -> None:
    ends, out = commits_during(env, rep("1", FIRST, "20"),
                               atomic("2", rep("3", SECOND, "70")),
                               get("4", FIRST), atomic("5", rep("6", FIRST, "x")))
    # the first batch, the first Atomic, the Get's batch, the failed Atomic
    assert ends == ["COMMIT", "COMMIT", "COMMIT", "ROLLBACK"]
    assert codes(out) == [("Replace", "1", 200), ("Atomic", "2", 200), ("Replace", "3", 200),
                          ("Get", "4", 200), ("Atomic", "5", 507), ("Replace", "6", 400)]


def test_a_failing_command_undoes_only_itself(env: Env) -> None:
    out = env.run(rep("1", FIRST, "20"), rep("2", SECOND, "not a number"),
                  add("3", f"{NC}/Nodes/1/NodeURI", "./DevInfo/Mod"),
                  add("4", f"{NC}/Nodes/1/NodeURI", "./DevInfo/Man"),  # 418: exists
                  get("5", FIRST, f"{NC}/Nodes/1/NodeURI"))
    assert codes(out) == [("Replace", "1", 200), ("Replace", "2", 400), ("Add", "3", 200),
                          ("Add", "4", 418), ("Get", "5", 200)]
    assert [i.data for i in results(out)[0].items] == ["20", "./DevInfo/Mod"]


def test_what_the_client_answered_is_committed(env: Env) -> None:
    env.run(rep("1", FIRST, "25"), sequence("2", rep("3", SECOND, "65")))
    other = Registry(env.registry.path)  # another connection sees only committed data
    try:
        poll = f"HKLM\\SOFTWARE\\Microsoft\\Enrollments\\{env.enrollment.enrollment_id}" \
               r"\DMClient\MS DM Server\Poll"
        assert other.query(poll, "IntervalForFirstSetOfRetries") == 25
        assert other.query(poll, "IntervalForSecondSetOfRetries") == 65
    finally:
        other.close()


def test_a_failed_commit_fails_every_command_that_had_succeeded(env: Env) -> None:
    base = f"{scep()}/Install"
    env.run(rep("0", f"{base}/ServerURL", "https://ca.example/scep"))
    before = snapshot(env.registry)
    executor = TreeExecutor(env.tree, FaultyStore(env.registry, commit=True))
    out = executor.execute([rep("1", FIRST, "20"), get("2", "./DevInfo/Mod"),
                            rep("3", SECOND, "x"), exec_("4", f"{base}/Enroll"),
                            sequence("5", rep("6", FIRST, "30"), atomic("7", rep("8", SECOND,
                                                                                 "70")))],
                           "1")
    assert codes(out) == [("Replace", "1", 500), ("Get", "2", 500), ("Replace", "3", 400),
                          ("Exec", "4", 500), ("Sequence", "5", 200), ("Replace", "6", 500),
                          ("Atomic", "7", 500), ("Replace", "8", 216)]
    assert results(out) == []  # a Get's data may show what was never committed
    assert snapshot(env.registry) == before
    assert env.ctx.events.read() == [] and len(env.tree.deferred) == 0  # no CspExecute event
    assert sum("commit failed" in f.message for f in executor.failures) == 5


def test_deferred_events_run_after_the_commit(env: Env) -> None:
    base = f"{scep()}/Install"
    seen_committed: list[bool] = []
    env.run(rep("1", f"{base}/ServerURL", "https://ca.example/scep"))
    events = env.ctx.events

    original = events.write

    def write(record: object) -> None:
        seen_committed.append(not env.registry.in_transaction)
        original(record)  # type: ignore[arg-type]

    events.write = write  # type: ignore[method-assign]
    out = env.run(exec_("2", f"{base}/Enroll"), get("3", f"{scep()}/Status"))
    assert codes(out) == [("Exec", "2", 200), ("Get", "3", 200)]
    assert seen_committed == [True]
    assert len(events.read()) == 1
