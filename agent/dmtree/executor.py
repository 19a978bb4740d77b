"""Execute the server's commands of one message against the DM tree and answer each with Status.

The session hands over the executable commands of a message in order (item commands, Atomic,
Sequence, unknown elements) and gets back, in the same order, one Status per command — one per
Item when the Items' codes differ (MS-MDM §2.2.6.1) — and a Results right after the Status of
each Get. Status/Results carry `cmd_id=""`: the session numbers them.

Rules (MS "OMA DM protocol support"; OMA-TS-DM_RepPro-V1_2 §6.6, §10):
- a command without CmdID is not executed: 400 with an empty CmdRef;
- an element that is not a DM command (UnknownCommand) answers 400, under SyncBody, Atomic or
  Sequence alike; Copy is not supported by the Windows client: 406 (optional feature); a
  user-interaction Alert inside a container: 406;
- NoResp: no Status for that command (a container's NoResp covers what it contains);
- Atomic: all or nothing, through one store transaction (each item in its own savepoint). On
  the first failure the rest is not executed (215), everything done is rolled back: the
  Atomic answers 507, commands that had succeeded 216 (516 if the rollback itself failed),
  the failing command keeps its own code. Nested Atomic: the inner one 500 (so the outer
  507); Get inside Atomic: 500. Side effects that are not store writes (events) are deferred
  until the Atomic commits and dropped when it rolls back.
- Sequence: the commands run in order; a failure does not stop the later ones (a Sequence
  only orders, it does not make atomic) and the Sequence itself answers 200. Inside an
  Atomic, a failure in the Sequence fails the Atomic.
- outside Atomic every Item runs in its own transaction: a CSP write that touches several
  values is all-or-nothing per Item.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from agent.dmtree.csp import ItemValue
from agent.dmtree.errors import DMStatusError
from agent.dmtree.tree import DMTree
from agent.dmtree.uri import parse_uri
from agent.errors import DmAgentError, NotFoundError
from agent.registry import Rollback
from agent.syncml.messages import (
    Alert,
    Cmd,
    Command,
    Container,
    Item,
    ItemCommand,
    Meta,
    Results,
    Status,
    StatusCode,
    UnknownCommand,
    command_name,
)

log = logging.getLogger("dmagent.dmtree")


class TransactionalStore(Protocol):
    """What the executor needs from the store: nestable all-or-nothing blocks (savepoints)
    that raising `agent.registry.Rollback` undoes. `Registry` is one."""

    def transaction(self) -> AbstractContextManager[None]: ...


@dataclass(frozen=True)
class Failure:
    """A command or item that did not answer 2xx, for logs and diagnostics (no data values)."""

    cmd: str
    cmd_ref: str
    target: str
    code: int
    message: str


@dataclass
class _ItemOutcome:
    target: str
    code: int
    result: Item | None = None


@dataclass
class _Outcome:
    name: str
    cmd_ref: str
    no_resp: bool
    code: int = StatusCode.OK
    items: list[_ItemOutcome] = field(default_factory=list)
    children: list[_Outcome] = field(default_factory=list)

    def ok(self) -> bool:
        return self.code < 300 and all(i.code < 300 for i in self.items) and \
            all(c.ok() for c in self.children)

    def mark_rolled_back(self, code: int) -> None:
        """After an Atomic failed: what had succeeded is now 216 (or 516)."""
        if self.code == StatusCode.OK:
            self.code = code
        for item in self.items:
            if item.code == StatusCode.OK:
                item.code = code
        for child in self.children:
            child.mark_rolled_back(code)


@dataclass
class _AtomicState:
    failed: bool = False
    rolling_back: bool = False

    def end(self) -> None:
        if self.failed:
            self.rolling_back = True
            raise Rollback


class TreeExecutor:
    def __init__(self, tree: DMTree, store: TransactionalStore, *,
                 echo_target_refs: bool = False) -> None:
        """`echo_target_refs`: put the items' LocURIs in Status TargetRef. Off by default:
        the MS-MDM examples (§3.1.5.2.1, §4) show the Windows client's Status without it."""
        self.tree = tree
        self.store = store
        self.echo_target_refs = echo_target_refs
        self.failures: list[Failure] = []

    def execute(self, commands: Sequence[Command], msg_ref: str) -> list[Status | Results]:
        self.failures = []
        out: list[Status | Results] = []
        for cmd in commands:
            out += self._render(self._run(cmd, in_atomic=False), msg_ref, suppress=False)
        return out

    # --- execution ---------------------------------------------------------------------------

    def _run(self, cmd: Command, in_atomic: bool) -> _Outcome:
        outcome = _Outcome(command_name(cmd), _cmd_ref(cmd), bool(getattr(cmd, "no_resp", False)))
        if not outcome.cmd_ref:
            # MS: "If no CmdID is provided in the DM command, the client returns blank in the
            # status element and the status code 400."
            return self._refuse(outcome, cmd, StatusCode.BAD_REQUEST, "no CmdID")
        if isinstance(cmd, ItemCommand):
            return self._item_command(cmd, outcome, in_atomic)
        if isinstance(cmd, Container) and cmd.kind is Cmd.ATOMIC:
            return self._atomic(cmd, outcome, in_atomic)
        if isinstance(cmd, Container):
            return self._sequence(cmd, outcome, in_atomic)
        if isinstance(cmd, UnknownCommand):
            return self._refuse(outcome, cmd, StatusCode.BAD_REQUEST,
                                f"<{cmd.name}> is not a DM command")
        if isinstance(cmd, Alert):
            return self._refuse(outcome, cmd, StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED,
                                "user-interaction alerts are not supported")
        return self._refuse(outcome, cmd, StatusCode.BAD_REQUEST,
                            f"{outcome.name} is a response, not a command")

    def _refuse(self, outcome: _Outcome, cmd: Command, code: int, why: str) -> _Outcome:
        outcome.code = code
        self._fail(outcome, "", code, why)
        if isinstance(cmd, Container):
            outcome.children = [_not_executed(c) for c in cmd.commands]
        return outcome

    def _item_command(self, cmd: ItemCommand, outcome: _Outcome, in_atomic: bool) -> _Outcome:
        if cmd.kind is Cmd.GET and in_atomic:
            return self._refuse(outcome, cmd, StatusCode.COMMAND_FAILED,
                                "Get is not allowed inside Atomic")
        if cmd.kind is Cmd.COPY:
            return self._refuse(outcome, cmd, StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED,
                                "Copy is not supported")
        if not cmd.items:
            return self._refuse(outcome, cmd, StatusCode.BAD_REQUEST, "no Item")
        for item in cmd.items:
            outcome.items.append(self._item(cmd, item, outcome, in_atomic))
        return outcome

    def _item(self, cmd: ItemCommand, item: Item, outcome: _Outcome,
              in_atomic: bool) -> _ItemOutcome:
        target = (item.target or "").strip()
        meta = item.meta or cmd.meta
        value = ItemValue(item.data, meta.format if meta else None, meta.type if meta else None)
        deferred = self.tree.deferred
        mark = deferred.mark()
        try:
            with self.store.transaction():
                result = self._apply(cmd.kind, target, value)
        except DMStatusError as exc:
            deferred.discard(mark)
            self._fail(outcome, target, exc.code, exc.message)
            return _ItemOutcome(target, exc.code)
        except DmAgentError as exc:
            deferred.discard(mark)
            code = StatusCode.NOT_FOUND if isinstance(exc, NotFoundError) else \
                StatusCode.COMMAND_FAILED
            self._fail(outcome, target, code, exc.message)
            return _ItemOutcome(target, code)
        except Exception as exc:  # a store or CSP fault: fail this command, keep the session
            deferred.discard(mark)
            log.warning("%s %s failed: %s", outcome.name, target, exc, exc_info=True)
            self._fail(outcome, target, StatusCode.COMMAND_FAILED,
                       f"{type(exc).__name__}: {exc}")
            return _ItemOutcome(target, StatusCode.COMMAND_FAILED)
        if not in_atomic:
            deferred.flush()
        return _ItemOutcome(target, StatusCode.OK, result)

    def _apply(self, kind: Cmd, target: str, value: ItemValue) -> Item | None:
        uri = parse_uri(target)
        if kind is Cmd.GET:
            node = self.tree.get(uri)
            return Item(source=uri.raw, meta=Meta(format=node.format, type=node.type),
                        data=node.data)
        if kind is Cmd.ADD:
            self.tree.add(uri, value)
        elif kind is Cmd.REPLACE:
            self.tree.replace(uri, value)
        elif kind is Cmd.DELETE:
            self.tree.delete(uri)
        elif kind is Cmd.EXEC:
            self.tree.exec(uri, value)
        else:  # pragma: no cover - ItemCommand kinds are the five above plus Copy
            raise DMStatusError(StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED, kind.value)
        return None

    def _atomic(self, cmd: Container, outcome: _Outcome, in_atomic: bool) -> _Outcome:
        if in_atomic:
            return self._refuse(outcome, cmd, StatusCode.COMMAND_FAILED,
                                "nested Atomic is not allowed")
        deferred = self.tree.deferred
        mark = deferred.mark()
        state = _AtomicState()
        try:
            with self.store.transaction():
                for child in cmd.commands:
                    if state.failed:
                        outcome.children.append(_not_executed(child))
                        continue
                    result = self._run(child, in_atomic=True)
                    outcome.children.append(result)
                    state.failed = not result.ok()
                state.end()  # raises Rollback after a failure; the store undoes the block
        except Exception as exc:
            deferred.discard(mark)
            log.error("Atomic %s: %s failed: %s", outcome.cmd_ref,
                      "rollback" if state.rolling_back else "commit", exc, exc_info=True)
            if state.rolling_back:  # what succeeded may still be in the store
                outcome.code = StatusCode.ATOMIC_FAILED
                outcome.mark_rolled_back(StatusCode.ATOMIC_ROLLBACK_FAILED)
                self._fail(outcome, "", StatusCode.ATOMIC_ROLLBACK_FAILED, str(exc))
            else:  # the commit failed: nothing was applied
                outcome.mark_rolled_back(StatusCode.ATOMIC_ROLLBACK_OK)
                outcome.code = StatusCode.COMMAND_FAILED
                self._fail(outcome, "", StatusCode.COMMAND_FAILED, f"commit failed: {exc}")
            return outcome
        if state.failed:
            deferred.discard(mark)
            outcome.mark_rolled_back(StatusCode.ATOMIC_ROLLBACK_OK)
            outcome.code = StatusCode.ATOMIC_FAILED
            self._fail(outcome, "", StatusCode.ATOMIC_FAILED, "a command failed; rolled back")
        else:
            deferred.flush()
        return outcome

    def _sequence(self, cmd: Container, outcome: _Outcome, in_atomic: bool) -> _Outcome:
        failed = False
        for child in cmd.commands:
            if failed:
                outcome.children.append(_not_executed(child))
                continue
            result = self._run(child, in_atomic)
            outcome.children.append(result)
            failed = in_atomic and not result.ok()
        return outcome

    def _fail(self, outcome: _Outcome, target: str, code: int, message: str) -> None:
        self.failures.append(Failure(outcome.name, outcome.cmd_ref, target, code, message))
        log.info("%s %s%s: %d %s", outcome.name, outcome.cmd_ref or "(no CmdID)",
                 f" {target}" if target else "", code, message)

    # --- rendering ---------------------------------------------------------------------------

    def _render(self, outcome: _Outcome, msg_ref: str,
                suppress: bool) -> list[Status | Results]:
        suppress = suppress or outcome.no_resp
        out: list[Status | Results] = []
        if not suppress:
            codes = {i.code for i in outcome.items}
            if len(codes) > 1:  # MS-MDM §2.2.6.1: a Status per Item when codes differ
                out += [self._status(outcome, msg_ref, i.code, (i.target,))
                        for i in outcome.items]
            else:
                code = codes.pop() if codes else outcome.code
                out.append(self._status(outcome, msg_ref, code,
                                        tuple(i.target for i in outcome.items)))
        results = tuple(i.result for i in outcome.items if i.result is not None)
        if results:
            out.append(Results(cmd_id="", msg_ref=msg_ref, cmd_ref=outcome.cmd_ref,
                               items=results))
        for child in outcome.children:
            out += self._render(child, msg_ref, suppress)
        return out

    def _status(self, outcome: _Outcome, msg_ref: str, code: int,
                targets: tuple[str, ...]) -> Status:
        return Status(cmd_id="", msg_ref=msg_ref, cmd_ref=outcome.cmd_ref, cmd=outcome.name,
                      data=int(code),
                      target_refs=tuple(t for t in targets if t) if self.echo_target_refs
                      else ())


def _cmd_ref(cmd: Command) -> str:
    cmd_id = getattr(cmd, "cmd_id", None)
    return cmd_id.strip() if isinstance(cmd_id, str) else ""


def _not_executed(cmd: Command) -> _Outcome:
    outcome = _Outcome(command_name(cmd), _cmd_ref(cmd), bool(getattr(cmd, "no_resp", False)),
                       StatusCode.NOT_EXECUTED)
    if isinstance(cmd, Container):
        outcome.children = [_not_executed(c) for c in cmd.commands]
    return outcome
