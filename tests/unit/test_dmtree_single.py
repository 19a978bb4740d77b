"""The executor's short path for one-Item commands answers exactly as the general path does.

`TreeExecutor._run_batch` runs a one-Item command with a CmdID (outside Atomic, not Copy)
through `_single` instead of `_run` → `_item_command` → `_item` → `_render`. This file runs
the same commands through both, on two devices in the same state, and requires the same
Status/Results objects, the same recorded failures, the same store, the same events and the
same deferred work — also when the batch's commit fails and with TargetRef echo on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.dmtree.csp import CSP, ItemValue, Op, Resolved, Value, interior, leaf
from agent.dmtree.executor import TreeExecutor
from agent.dmtree.uri import Scope
from agent.errors import LocalError, NotFoundError
from agent.registry import Registry, Rollback
from agent.syncml.messages import Cmd, Command, Item, ItemCommand, Meta, Results, Status
from tests.unit.dmtree_support import (
    Env,
    FaultyStore,
    add,
    atomic,
    cmd,
    delete,
    exec_,
    get,
    make_env,
    rep,
    scep,
    sequence,
    snapshot,
)

POLL = "./Vendor/MSFT/DMClient/Provider/MS%20DM%20Server/Poll"
FIRST = f"{POLL}/IntervalForFirstSetOfRetries"
NC = "./Vendor/MSFT/NodeCache/MS%20DM%20Server"
INSTALL = f"{scep()}/Install"
TEST = "./Vendor/MSFT/Test"


class GeneralExecutor(TreeExecutor):
    """Every command through `_run` and `_render`: `_run_batch` as it was before `_single`."""

    def _run_batch(self, commands: Sequence[Command], msg_ref: str) -> list[Status | Results]:
        if not commands:
            return []
        deferred = self.tree.deferred
        mark = deferred.mark()
        outcomes: list[Any] = []
        try:
            with self.store.transaction():
                for command in commands:
                    outcomes.append(self._run(command, in_atomic=False))
        except Exception as exc:
            deferred.discard(mark)
            for outcome in outcomes:
                self._commit_failed(outcome, f"commit failed: {exc}")
        else:
            deferred.flush()
        out: list[Status | Results] = []
        for outcome in outcomes:
            out += self._render(outcome, msg_ref, suppress=False)
        return out


class FaultCSP(CSP):
    """Writes a value, then fails in the way the node's name says."""

    schema = interior("Test", Op.GET, *(leaf(name, "chr", Op.REPLACE | Op.GET | Op.EXEC)
                                        for name in ("Ok", "Status", "Agent", "Missing",
                                                     "Crash", "Quiet")))

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def exists(self, r: Resolved) -> bool:
        return r.spec.is_interior or self.registry.query(r"HKLM\Test", r.spec.name) is not None

    def read(self, r: Resolved) -> Any:
        from agent.dmtree.csp import NodeValue

        return NodeValue("chr", str(self.registry.query(r"HKLM\Test", r.spec.name)))

    def write(self, r: Resolved, value: Value, item: ItemValue) -> None:
        self.registry.set_sz(r"HKLM\Test", r.spec.name, str(value))
        self._fail(r.spec.name)

    def execute(self, r: Resolved, item: ItemValue) -> None:
        self.registry.set_sz(r"HKLM\Test", "Executed", item.data or "")
        self._fail(r.spec.name)

    @staticmethod
    def _fail(name: str) -> None:
        from agent.dmtree.errors import DMStatusError

        if name == "Status":
            raise DMStatusError(409, "conflict")
        if name == "Agent":
            raise LocalError("the device refuses")
        if name == "Missing":
            raise NotFoundError("no such thing")
        if name == "Crash":
            raise RuntimeError("CSP bug")
        if name == "Quiet":  # the store's own "undo quietly": the block swallows it
            raise Rollback


SETUP: list[Command] = [
    rep("s1", f"{INSTALL}/ServerURL", "https://ca.example/scep"),
    add("s2", f"{NC}/Nodes/1/NodeURI", "./DevInfo/Man"),
    add("s3", f"{NC}/Nodes/2/NodeURI", "./DevDetail/SwV"),
    rep("s4", f"{TEST}/Ok", "before"),
]

COMMANDS: list[Command] = [
    # Get: leaves, interior nodes, the root, whitespace, missing and malformed URIs
    get("1", "./DevInfo/DevId"), get("2", "  ./DevInfo/Man\n"), get("3", "./DevDetail"),
    get("4", "."), get("5", "./Vendor/MSFT"), get("6", "./DevInfo/Nope"),
    get("7", "./a//b"), get("8", "/Vendor/MSFT"), get("9", "./Vendor/" + "x" * 300),
    ItemCommand(Cmd.GET, "10", (Item(),)), get("11", f"{scep()}/Status"),
    get("12", f"{NC}/ChangedNodes"), get("13", f"{NC}/ChangedNodesData"),
    get("14", f"{TEST}/Ok"), get("14b", "./devinfo/devid"),
    # Replace / Add: formats, values, access rules, Meta on the command, NodeCache types
    rep("15", FIRST, "30", "int"), rep("16", FIRST, "thirty", "int"),
    rep("17", FIRST, "30", "chr"), rep("18", "./DevInfo/DevId", "x"),
    rep("19", f"{NC}/Nodes/1/ExpectedValue", "Contoso"),
    rep("20", f"{NC}/Nodes/2/ExpectedValue", None, None, "application/x-nodemon-nonexistent"),
    ItemCommand(Cmd.REPLACE, "21", (Item(target=FIRST, data="45"),), meta=Meta(format="int")),
    ItemCommand(Cmd.REPLACE, "22", (Item(target=FIRST, data="46", meta=Meta(format="int")),),
                meta=Meta(format="chr")),
    ItemCommand(Cmd.REPLACE, "23", (Item(data="1"),)),
    add("24", f"{NC}/CacheVersion", "v1"), add("25", f"{NC}/CacheVersion", "v2"),
    add("26", f"{NC}/Nodes/3", None, "node"), add("27", f"{NC}/Nodes/a,b", None, "node"),
    rep("28", f"{NC}/Nodes/1/AutoSetExpectedValue", ""),
    add("29", "./Vendor/MSFT/ClientCertificateInstall/PFXCertInstall/P1/KeyLocation", "1",
        "int"),
    rep("30", "./Vendor/MSFT", "x"),
    # Delete, Exec
    delete("31", f"{NC}/Nodes/3"), delete("32", f"{NC}/Nodes/none"),
    delete("33", "./DevDetail/SwV"), exec_("34", "./DevInfo/Lang"),
    exec_("35", f"{INSTALL}/Enroll"),
    # CSP failures after a write: each must leave nothing behind
    rep("36", f"{TEST}/Ok", "after"), rep("37", f"{TEST}/Status", "x"),
    rep("38", f"{TEST}/Agent", "x"), rep("39", f"{TEST}/Missing", "x"),
    rep("40", f"{TEST}/Crash", "x"), exec_("41", f"{TEST}/Crash", "run"),
    rep("40b", f"{TEST}/Quiet", "x"), exec_("41b", f"{TEST}/Quiet", "run"),
    exec_("42", f"{TEST}/Ok", "ran"),
    # NoResp, CmdIDs with whitespace or none, commands the short path leaves alone
    cmd(Cmd.REPLACE, "43", FIRST, "50", "int", no_resp=True),
    cmd(Cmd.GET, "44", "./DevInfo/Mod", no_resp=True),
    get(" 45 ", "./DevInfo/Lang"), get("", "./DevInfo/Lang"), get(None, "./DevInfo/Lang"),
    get("   ", "./DevInfo/Lang"),
    ItemCommand(Cmd.COPY, "46", (Item(target=FIRST, source=FIRST),)),
    get("47", "./DevInfo/DmV", "./DevInfo/Nope"), ItemCommand(Cmd.REPLACE, "48", ()),
    sequence("49", rep("50", FIRST, "60", "int"), get("51", FIRST)),
    atomic("52", rep("53", FIRST, "70", "int"), rep("54", "./DevInfo/Mod", "m")),
    get("55", FIRST), get("56", f"{NC}/ChangedNodes"), get("57", f"{TEST}/Ok"),
]


def _env(path: Path, general: bool, *, echo: bool = False,
         failing_commit: bool = False) -> Env:
    env = make_env(path, echo_target_refs=echo)
    env.tree.mount(Scope.DEVICE, ("Vendor", "MSFT", "Test"), FaultCSP(env.registry))
    env.run(*SETUP)
    store: Any = FaultyStore(env.registry, commit=True) if failing_commit else env.registry
    env.executor = (GeneralExecutor if general else TreeExecutor)(env.tree, store,
                                                                  echo_target_refs=echo)
    return env


def _state(env: Env) -> tuple[Any, ...]:
    events = [(e.event_id, e.message) for e in env.ctx.events.read()] \
        if env.ctx.events.path.exists() else []
    # A task's Id is a fresh GUID on each device: compare that it is there, not its value.
    store = [(key, [v if v.name != "Id" else v.name for v in values])
             for key, values in snapshot(env.registry)]
    return store, events, len(env.tree.deferred)


@pytest.mark.parametrize(("echo", "failing_commit"), [(False, False), (True, False),
                                                      (False, True)])
def test_short_path_answers_as_the_general_path(tmp_path: Path, echo: bool,
                                                failing_commit: bool) -> None:
    short = _env(tmp_path / "short", False, echo=echo, failing_commit=failing_commit)
    general = _env(tmp_path / "general", True, echo=echo, failing_commit=failing_commit)
    assert _state(short) == _state(general)
    for commands in (COMMANDS, COMMANDS[::-1], COMMANDS):  # again: now on the changed tree
        out = short.executor.execute(commands, "5")
        assert out == general.executor.execute(commands, "5")
        assert short.executor.failures == general.executor.failures
        assert _state(short) == _state(general)
    # The answers are not vacuous: the table reaches every kind of outcome.
    answered = {s.data for s in out if isinstance(s, Status)}
    if failing_commit:
        assert {500, 215, 216} <= answered or {500} <= answered
    else:
        assert {200, 400, 404, 405, 406, 409, 415, 418, 500, 414} <= answered
        assert sum(isinstance(r, Results) for r in out) >= 10


def test_item_value_builder_makes_what_the_constructor_makes() -> None:
    import dataclasses

    from agent.dmtree.csp import item_value

    for args in [("x", "chr", None), (None, None, None), ("", "int", "text/plain")]:
        built, constructed = item_value(*args), ItemValue(*args)
        assert built == constructed and hash(built) == hash(constructed)
        assert repr(built) == repr(constructed) and vars(built) == vars(constructed)
        assert dataclasses.replace(built) == constructed
        with pytest.raises(dataclasses.FrozenInstanceError):
            built.data = "y"  # type: ignore[misc]
