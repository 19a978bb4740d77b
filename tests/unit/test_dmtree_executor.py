"""The command executor: status codes, Atomic/Sequence semantics, NoResp, missing CmdID."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.dmtree.csp import CSP, ItemValue, Op, Resolved, Value, interior, leaf
from agent.dmtree.executor import TreeExecutor
from agent.dmtree.uri import Scope
from agent.registry import Registry
from agent.syncml.messages import (
    Alert,
    Cmd,
    Container,
    Item,
    ItemCommand,
    Results,
    Status,
    UnknownCommand,
)
from tests.unit.dmtree_support import (
    Env,
    FaultyStore,
    add,
    atomic,
    codes,
    delete,
    exec_,
    get,
    get_code,
    make_env,
    rep,
    results,
    scep,
    sequence,
    snapshot,
    value_of,
)

POLL = "./Vendor/MSFT/DMClient/Provider/MS%20DM%20Server/Poll"
FIRST = f"{POLL}/IntervalForFirstSetOfRetries"
SECOND = f"{POLL}/IntervalForSecondSetOfRetries"
NC = "./Vendor/MSFT/NodeCache/MS%20DM%20Server"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


# --- single commands ---------------------------------------------------------------------------

@pytest.mark.parametrize(("command", "code"), [
    (rep("1", FIRST, "30", "int"), 200),
    (rep("1", FIRST, "30"), 200),  # no Meta: the node's format
    (rep("1", FIRST, "thirty", "int"), 400),  # not an int
    (rep("1", FIRST, "30", "chr"), 415),  # wrong Meta Format
    (rep("1", f"{POLL}/PollOnLogin", "maybe", "bool"), 400),
    (rep("1", "./DevInfo/DevId", "x"), 405),  # Get-only
    (delete("1", "./DevDetail/SwV"), 405),
    (exec_("1", "./DevInfo/Lang"), 405),  # not executable
    (get("1", "./DevInfo/Nope"), 404),
    (get("1", "./Device/Vendor/MSFT/NoSuchCSP/X"), 404),
    (rep("1", "./Vendor/MSFT", "x"), 405),  # permanent interior node above the CSPs
    (add("1", f"{NC}/Nodes/1", None, "node"), 200),
    (ItemCommand(Cmd.COPY, "1", (Item(target=FIRST, source=SECOND),)), 406),
    (add("1", "./Vendor/MSFT/ClientCertificateInstall/PFXCertInstall/P1/KeyLocation", "1",
         "int"), 406),
    (ItemCommand(Cmd.REPLACE, "1", (Item(data="1"),)), 400),  # an Item without Target
    (ItemCommand(Cmd.REPLACE, "1", ()), 400),  # a command without Item
    (get("1", "./Vendor/" + "x" * 300), 414),
    (get("1", "/Vendor/MSFT"), 400),
])
def test_single_command_codes(env: Env, command: ItemCommand, code: int) -> None:
    assert codes(env.run(command)) == [(command.kind.value, "1", code)]


def test_add_existing_is_418_and_delete_missing_is_404(env: Env) -> None:
    assert codes(env.run(add("1", f"{NC}/CacheVersion", "v1"),
                         add("2", f"{NC}/CacheVersion", "v2"),
                         delete("3", f"{NC}/Nodes/none"))) == [
        ("Add", "1", 200), ("Add", "2", 418), ("Delete", "3", 404)]
    assert value_of(env, f"{NC}/CacheVersion") == ("chr", "v1")


def test_get_answers_status_then_results_with_format_and_source(env: Env) -> None:
    out = env.run(rep("1", FIRST, "30", "int"), get("2", f" {FIRST} "), msg_ref="7")
    assert [type(o) for o in out] == [Status, Status, Results]
    res = out[2]
    assert isinstance(res, Results)
    assert (res.msg_ref, res.cmd_ref, res.cmd_id) == ("7", "2", "")
    (it,) = res.items
    assert (it.source, it.meta and it.meta.format, it.data) == (FIRST, "int", "30")
    assert all(s.msg_ref == "7" and s.cmd_id == "" for s in out)


def test_get_of_interior_node_lists_children_with_format_node(env: Env) -> None:
    assert value_of(env, "./DevInfo") == ("node", "DevId/Man/Mod/DmV/Lang")
    fmt, data = value_of(env, "./Device/Vendor/MSFT")
    assert fmt == "node" and data is not None
    assert {"ClientCertificateInstall", "NodeCache", "DMClient",
            "RootCATrustedCertificates"} <= set(data.split("/"))
    assert value_of(env, "./Vendor/MSFT/DMClient/Provider") == ("node", "MS%20DM%20Server")


def test_items_with_different_codes_get_a_status_each(env: Env) -> None:
    out = env.run(get("1", "./DevInfo/DmV", "./DevInfo/Nope", "./DevInfo/Lang"))
    assert codes(out) == [("Get", "1", 200), ("Get", "1", 404), ("Get", "1", 200)]
    (res,) = results(out)
    assert [i.data for i in res.items] == ["1.3", "en-US"]
    same = env.run(get("2", "./DevInfo/DmV", "./DevInfo/Lang"))
    assert codes(same) == [("Get", "2", 200)]


def test_target_refs_are_echoed_only_on_request(tmp_path: Path) -> None:
    env = make_env(tmp_path, echo_target_refs=True)
    out = env.run(get("1", "./DevInfo/DmV", "./DevInfo/Nope"))
    assert [s.target_refs for s in out if isinstance(s, Status)] == [
        ("./DevInfo/DmV",), ("./DevInfo/Nope",)]
    plain = TreeExecutor(env.tree, env.registry).execute([get("2", "./DevInfo/DmV")], "1")
    assert plain[0].target_refs == () if isinstance(plain[0], Status) else False


@pytest.mark.parametrize("cmd_id", [None, "", "  "])
def test_missing_cmdid_is_400_with_empty_cmdref_and_not_executed(env: Env,
                                                                 cmd_id: str | None) -> None:
    out = env.run(rep(cmd_id, FIRST, "99", "int"), rep("2", SECOND, "77", "int"))
    assert codes(out) == [("Replace", "", 400), ("Replace", "2", 200)]
    assert value_of(env, FIRST) == ("int", "15")  # the default: not written


def test_unknown_command_and_responses_are_400_alerts_406(env: Env) -> None:
    out = env.run(UnknownCommand("Search", "5"), UnknownCommand("Frob", None),
                  sequence("6", Alert("7", "1101"), Status("8", "1", "1", "Get", 200)))
    assert codes(out) == [("Search", "5", 400), ("Frob", "", 400), ("Sequence", "6", 200),
                          ("Alert", "7", 406), ("Status", "8", 400)]


def test_no_resp_suppresses_status_but_executes(env: Env) -> None:
    out = env.run(ItemCommand(Cmd.REPLACE, "1", (Item(target=FIRST, data="20"),), no_resp=True),
                  atomic("2", rep("3", SECOND, "90"), no_resp=True),
                  sequence("4", rep("5", f"{POLL}/NumberOfFirstRetries", "4")),
                  ItemCommand(Cmd.GET, "6", (Item(target=FIRST),), no_resp=True))
    assert codes(out) == [("Sequence", "4", 200), ("Replace", "5", 200)]
    assert [i.data for r in results(out) for i in r.items] == ["20"]  # Results still sent
    assert value_of(env, SECOND) == ("int", "90")


# --- Atomic --------------------------------------------------------------------------------------

def test_atomic_success_commits_everything(env: Env) -> None:
    out = env.run(atomic("1", rep("2", FIRST, "5"), rep("3", SECOND, "50"),
                         add("4", f"{NC}/CacheVersion", "v")))
    assert codes(out) == [("Atomic", "1", 200), ("Replace", "2", 200), ("Replace", "3", 200),
                          ("Add", "4", 200)]
    assert value_of(env, SECOND) == ("int", "50")


def test_atomic_failure_rolls_back_byte_for_byte(env: Env) -> None:
    env.run(rep("0", FIRST, "7"), add("0b", f"{NC}/CacheVersion", "v0"))
    before = snapshot(env.registry)
    out = env.run(atomic("1",
                         rep("2", FIRST, "5"),
                         add("3", f"{NC}/Nodes/n1/NodeURI", "./DevInfo/DmV"),
                         delete("4", f"{NC}/CacheVersion"),
                         rep("5", "./DevInfo/DevId", "x"),  # 405: fails the Atomic
                         rep("6", SECOND, "50"),
                         sequence("7", rep("8", FIRST, "1"))))
    assert codes(out) == [("Atomic", "1", 507), ("Replace", "2", 216), ("Add", "3", 216),
                          ("Delete", "4", 216), ("Replace", "5", 405), ("Replace", "6", 215),
                          ("Sequence", "7", 215), ("Replace", "8", 215)]
    assert snapshot(env.registry) == before
    assert env.registry.integrity_check() == "ok"


def test_nested_atomic_inner_500_outer_507(env: Env) -> None:
    before = snapshot(env.registry)
    out = env.run(atomic("1", rep("2", FIRST, "5"), atomic("3", rep("4", SECOND, "6")),
                         rep("5", SECOND, "7")))
    assert codes(out) == [("Atomic", "1", 507), ("Replace", "2", 216), ("Atomic", "3", 500),
                          ("Replace", "4", 215), ("Replace", "5", 215)]
    assert snapshot(env.registry) == before


def test_get_inside_atomic_is_500(env: Env) -> None:
    out = env.run(atomic("1", rep("2", FIRST, "5"), get("3", FIRST)))
    assert codes(out) == [("Atomic", "1", 507), ("Replace", "2", 216), ("Get", "3", 500)]
    assert results(out) == []
    assert value_of(env, FIRST) == ("int", "15")


def test_missing_cmdid_inside_atomic_fails_it(env: Env) -> None:
    out = env.run(atomic("1", rep(None, FIRST, "5"), rep("3", SECOND, "6")))
    assert codes(out) == [("Atomic", "1", 507), ("Replace", "", 400), ("Replace", "3", 215)]
    out = env.run(atomic(None, rep("2", FIRST, "5")))
    assert codes(out) == [("Atomic", "", 400), ("Replace", "2", 215)]
    assert value_of(env, FIRST) == ("int", "15")


def test_unknown_command_inside_atomic_fails_it(env: Env) -> None:
    out = env.run(atomic("1", rep("2", FIRST, "5"), UnknownCommand("Map", "3")))
    assert codes(out) == [("Atomic", "1", 507), ("Replace", "2", 216), ("Map", "3", 400)]


def test_sequence_inside_atomic_fails_the_atomic(env: Env) -> None:
    out = env.run(atomic("1", sequence("2", rep("3", FIRST, "5"), get("4", FIRST),
                                       rep("5", SECOND, "6")), rep("6", SECOND, "7")))
    assert codes(out) == [("Atomic", "1", 507), ("Sequence", "2", 216), ("Replace", "3", 216),
                          ("Get", "4", 500), ("Replace", "5", 215), ("Replace", "6", 215)]


# --- Sequence ------------------------------------------------------------------------------------

def test_sequence_runs_in_order_and_continues_after_a_failure(env: Env) -> None:
    out = env.run(sequence("1", rep("2", FIRST, "5"), rep("3", "./DevInfo/Man", "x"),
                           get("4", FIRST), rep("5", SECOND, "6")))
    assert codes(out) == [("Sequence", "1", 200), ("Replace", "2", 200), ("Replace", "3", 405),
                          ("Get", "4", 200), ("Replace", "5", 200)]
    assert [i.data for r in results(out) for i in r.items] == ["5"]
    assert value_of(env, SECOND) == ("int", "6")


def test_atomic_inside_sequence_is_allowed(env: Env) -> None:
    out = env.run(sequence("1", atomic("2", rep("3", FIRST, "5")), get("4", FIRST)))
    assert codes(out) == [("Sequence", "1", 200), ("Atomic", "2", 200), ("Replace", "3", 200),
                          ("Get", "4", 200)]


# --- faults --------------------------------------------------------------------------------------

def test_rollback_failure_is_516_for_what_had_succeeded(env: Env) -> None:
    executor = TreeExecutor(env.tree, FaultyStore(env.registry, rollback=True))
    out = executor.execute([atomic("1", rep("2", FIRST, "5"), rep("3", "./DevInfo/Mod", "m"),
                                   rep("4", SECOND, "6"))], "1")
    assert codes(out) == [("Atomic", "1", 507), ("Replace", "2", 516), ("Replace", "3", 405),
                          ("Replace", "4", 215)]
    assert any(f.code == 516 for f in executor.failures)


def test_commit_failure_is_500_and_nothing_applied(env: Env) -> None:
    executor = TreeExecutor(env.tree, FaultyStore(env.registry, commit=True))
    out = executor.execute([atomic("1", rep("2", FIRST, "5"))], "1")
    assert codes(out) == [("Atomic", "1", 500), ("Replace", "2", 216)]
    assert value_of(env, FIRST) == ("int", "15")


class HalfWriteCSP(CSP):
    """Writes one value, then fails: the item's own transaction must undo the first write."""

    schema = interior("Test", Op.GET, leaf("Boom", "chr", Op.REPLACE | Op.GET),
                      leaf("Crash", "chr", Op.REPLACE))

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def exists(self, r: Resolved) -> bool:
        return r.spec.is_interior or self.registry.query(r"HKLM\Test", r.spec.name) is not None

    def write(self, r: Resolved, value: Value, item: ItemValue) -> None:
        self.registry.set_sz(r"HKLM\Test", r.spec.name, str(value))
        if r.spec.name == "Crash":
            raise RuntimeError("CSP bug")
        from agent.dmtree.errors import DMStatusError

        raise DMStatusError(500, "device busy")


def test_a_failing_item_leaves_no_partial_write(env: Env) -> None:
    env.tree.mount(Scope.DEVICE, ("Vendor", "MSFT", "Test"), HalfWriteCSP(env.registry))
    before = snapshot(env.registry)
    out = env.run(rep("1", "./Vendor/MSFT/Test/Boom", "x"),
                  rep("2", "./Vendor/MSFT/Test/Crash", "y"), rep("3", FIRST, "9"))
    assert codes(out) == [("Replace", "1", 500), ("Replace", "2", 500), ("Replace", "3", 200)]
    assert not env.registry.key_exists(r"HKLM\Test")
    assert len(snapshot(env.registry)) > len(before)  # FIRST was written
    assert get_code(env, "./Vendor/MSFT/Test/Boom") == 404


def test_failures_are_recorded_without_data(env: Env) -> None:
    env.executor.execute([rep("1", "./DevInfo/DevId", "secret-value")], "1")
    (failure,) = env.executor.failures
    assert (failure.cmd, failure.cmd_ref, failure.target, failure.code) == (
        "Replace", "1", "./DevInfo/DevId", 405)
    assert "secret-value" not in failure.message


def test_exec_enroll_in_rolled_back_atomic_leaves_no_task_and_no_event(env: Env) -> None:
    base = f"{scep()}/Install"
    before = snapshot(env.registry)
    out = env.run(atomic("1", rep("2", f"{base}/ServerURL", "https://ca.example/scep"),
                         exec_("3", f"{base}/Enroll"),
                         rep("4", f"{base}/KeyLength", "3000", "int")))  # 400 after the Exec
    assert codes(out) == [("Atomic", "1", 507), ("Replace", "2", 216), ("Exec", "3", 216),
                          ("Replace", "4", 400)]
    assert snapshot(env.registry) == before
    assert env.ctx.events.read() == []
    assert len(env.tree.deferred) == 0


def test_containers_without_children_and_status_order(env: Env) -> None:
    out = env.run(atomic("1"), sequence("2"), Container(Cmd.SEQUENCE, "3",
                                                        (rep("4", FIRST, "3"),)))
    assert codes(out) == [("Atomic", "1", 200), ("Sequence", "2", 200), ("Sequence", "3", 200),
                          ("Replace", "4", 200)]
