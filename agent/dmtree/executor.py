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
- outside Atomic every Item runs in its own savepoint: a CSP write that touches several
  values is all-or-nothing per Item, a failing Item undoes only itself.

Transactions and durability: the commands between two top-level Atomics run in one store
transaction (a savepoint per Item), each top-level Atomic in one of its own, so a message of
plain commands costs one commit (one fsync under synchronous=FULL), not one per command; an
Atomic's commit decides only its own fate, as before. Everything is
committed before `execute` returns, i.e. before the client answers the message: what the
client reports as done is on disk. Deferred side effects run after that commit. When the
commit itself fails, nothing of that transaction was applied: its commands that had succeeded
answer 500 (an Atomic 500 with its commands 216, as when an Atomic's own commit fails).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from agent.dmtree.csp import ItemValue, item_value
from agent.dmtree.errors import DMStatusError
from agent.dmtree.tree import DMTree
from agent.errors import DmAgentError, NotFoundError
from agent.registry import Registry, Rollback
from agent.syncml import _build
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


class _NestedBlocks(Protocol):
    """Nested blocks as two calls (`Registry.begin_nested` / `end_nested`)."""

    def begin_nested(self) -> int: ...

    def end_nested(self, token: int, exc: BaseException | None) -> bool: ...


class _StoreBlocks:
    """`_NestedBlocks` over any `TransactionalStore`: each block is one `transaction()`
    entered and exited by hand, exactly as a `with` statement does it."""

    def __init__(self, store: TransactionalStore) -> None:
        self.store = store
        self.open: list[AbstractContextManager[None]] = []

    def begin_nested(self) -> int:
        block = self.store.transaction()
        block.__enter__()
        self.open.append(block)
        return 0

    def end_nested(self, token: int, exc: BaseException | None) -> bool:
        block = self.open.pop()
        if exc is None:
            block.__exit__(None, None, None)
            return False
        return bool(block.__exit__(type(exc), exc, exc.__traceback__))


@dataclass(frozen=True)
class Failure:
    """A command or item that did not answer 2xx, for logs and diagnostics (no data values)."""

    cmd: str
    cmd_ref: str
    target: str
    code: int
    message: str


_OK = int(StatusCode.OK)
_FAILED = int(StatusCode.COMMAND_FAILED)
_NOT_FOUND = int(StatusCode.NOT_FOUND)


class _ItemOutcome:
    __slots__ = ("code", "result", "target")

    def __init__(self, target: str, code: int, result: Item | None = None) -> None:
        self.target = target
        self.code = code
        self.result = result


class _Outcome:
    # Plain slotted classes: one of each is made per command (a dataclass costs more).
    __slots__ = ("children", "cmd_ref", "code", "items", "name", "no_resp")

    def __init__(self, name: str, cmd_ref: str, no_resp: bool, code: int = _OK) -> None:
        self.name = name
        self.cmd_ref = cmd_ref
        self.no_resp = no_resp
        self.code = code
        self.items: list[_ItemOutcome] = []
        self.children: list[_Outcome] = []

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


# The outcome of a one-Item command run by `TreeExecutor._single`: what an `_Outcome` with one
# `_ItemOutcome` records, as one tuple: (Cmd name, CmdRef, NoResp, target, code, Results item).
_SingleOutcome = tuple[str, str, bool, str, int, Item | None]


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
        self._metas: dict[tuple[str, str | None], Meta] = {}
        # The per-command blocks of _single: the registry's own calls when the store is one
        self._blocks: _NestedBlocks = store if isinstance(store, Registry) else \
            _StoreBlocks(store)

    def execute(self, commands: Sequence[Command], msg_ref: str) -> list[Status | Results]:
        self.failures = []
        if Container not in map(type, commands):  # no Atomic: one batch (checked in C)
            return self._run_batch(commands, msg_ref)
        out: list[Status | Results] = []
        batch: list[Command] = []
        for cmd in commands:
            if isinstance(cmd, Container) and cmd.kind is Cmd.ATOMIC:
                # A top-level Atomic is a transaction of its own: its commit decides exactly
                # its own fate, not that of the plain commands around it.
                out += self._run_batch(batch, msg_ref)
                batch = []
                outcome = self._run(cmd, in_atomic=False)
                self.tree.deferred.flush()  # what the Atomic deferred survived its commit
                out += self._render(outcome, msg_ref, suppress=False)
            else:
                batch.append(cmd)
        out += self._run_batch(batch, msg_ref)
        return out

    def _run_batch(self, commands: Sequence[Command], msg_ref: str) -> list[Status | Results]:
        """Plain commands (and Sequences) in one store transaction, committed before they are
        answered."""
        if not commands:
            return []
        deferred = self.tree.deferred
        mark = deferred.mark()
        outcomes: list[_Outcome | _SingleOutcome] = []
        single = self._single
        try:
            with self.store.transaction():
                for cmd in commands:
                    # The common case, a one-Item command with a CmdID, on a shorter path
                    # with the same rules (see _single).
                    if type(cmd) is ItemCommand and len(cmd.items) == 1 and \
                            cmd.kind is not _COPY and type(cmd.cmd_id) is str:
                        cmd_ref = cmd.cmd_id.strip()
                        if cmd_ref:
                            outcomes.append(single(cmd, cmd_ref))
                            continue
                    outcomes.append(self._run(cmd, in_atomic=False))
        except Exception as exc:  # the commit failed: nothing of the batch was applied
            deferred.discard(mark)
            log.error("commit of %d commands failed: %s", len(commands), exc, exc_info=True)
            why = f"commit failed: {exc}"
            for i, outcome in enumerate(outcomes):
                if isinstance(outcome, tuple):  # what _commit_failed does for an _Outcome
                    name, cmd_ref, no_resp, target, code, _ = outcome
                    if code in _DONE:
                        outcomes[i] = (name, cmd_ref, no_resp, target, _FAILED, None)
                        self._failed(name, cmd_ref, target, StatusCode.COMMAND_FAILED, why)
                else:
                    self._commit_failed(outcome, why)
        else:
            deferred.flush()
        out: list[Status | Results] = []
        append = out.append
        status, results = _build.status, _build.results
        echo = self.echo_target_refs
        for outcome in outcomes:
            if isinstance(outcome, tuple):  # _render's one-Item case, inline
                name, cmd_ref, no_resp, target, code, result = outcome
                if not no_resp:
                    append(status(msg_ref, cmd_ref, name, code,
                                  (target,) if echo and target else ()))
                if result is not None:
                    append(results(msg_ref, cmd_ref, (result,)))
            else:
                out += self._render(outcome, msg_ref, suppress=False)
        return out

    def _commit_failed(self, outcome: _Outcome, why: str) -> None:
        """Rewrite what had succeeded in a transaction that did not commit."""
        if outcome.name == Cmd.ATOMIC:
            if outcome.code == StatusCode.OK:
                outcome.mark_rolled_back(StatusCode.ATOMIC_ROLLBACK_OK)
                outcome.code = StatusCode.COMMAND_FAILED
                self._fail(outcome, "", StatusCode.COMMAND_FAILED, why)
            return
        for item in outcome.items:
            if item.code in _DONE:
                item.code = StatusCode.COMMAND_FAILED
                item.result = None
                self._fail(outcome, item.target, StatusCode.COMMAND_FAILED, why)
        for child in outcome.children:
            self._commit_failed(child, why)

    # --- execution ---------------------------------------------------------------------------

    def _run(self, cmd: Command, in_atomic: bool) -> _Outcome:
        if type(cmd) is ItemCommand:  # the common case first
            outcome = _Outcome(_NAMES[cmd.kind], _cmd_ref(cmd), cmd.no_resp)
        else:
            outcome = _Outcome(command_name(cmd), _cmd_ref(cmd),
                               bool(getattr(cmd, "no_resp", False)))
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
        kind = cmd.kind
        if kind is _GET and in_atomic:
            return self._refuse(outcome, cmd, StatusCode.COMMAND_FAILED,
                                "Get is not allowed inside Atomic")
        if kind is _COPY:
            return self._refuse(outcome, cmd, StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED,
                                "Copy is not supported")
        if not cmd.items:
            return self._refuse(outcome, cmd, StatusCode.BAD_REQUEST, "no Item")
        for item in cmd.items:
            outcome.items.append(self._item(cmd, item, outcome))
        return outcome

    def _single(self, cmd: ItemCommand, cmd_ref: str) -> _SingleOutcome:
        """A one-Item command outside Atomic with a CmdID (not Copy): what `_run` →
        `_item_command` → `_item` do for it, minus their generality, recording the same
        outcome and failures. tests/unit/test_dmtree_single.py holds both paths to the same
        answers."""
        kind = cmd.kind
        name = _NAMES[kind]
        item = cmd.items[0]
        target = (item.target or "").strip()
        tree = self.tree
        deferred = tree.deferred
        mark = len(deferred.pending)
        blocks = self._blocks
        result = None
        try:
            # `with self.store.transaction():` as two calls (a `with` costs more than the block)
            token = blocks.begin_nested()
            try:
                if kind is _GET:
                    node = tree.get(target)
                    # _build.item(target, source, meta, data): a Results item
                    result = _build.item(None, target, self._meta(node.format, node.type),
                                         node.data)
                elif kind is _DELETE:
                    tree.delete(target)
                else:
                    meta = item.meta or cmd.meta
                    self._apply(kind, target, item_value(
                        item.data, meta.format, meta.type) if meta is not None else
                        item_value(item.data, None, None))
            except BaseException as exc:
                if not blocks.end_nested(token, exc):
                    raise
            else:
                blocks.end_nested(token, None)
        except DMStatusError as exc:
            deferred.discard(mark)
            self._failed(name, cmd_ref, target, exc.code, exc.message)
            return name, cmd_ref, cmd.no_resp, target, exc.code, None
        except DmAgentError as exc:
            deferred.discard(mark)
            code = _NOT_FOUND if isinstance(exc, NotFoundError) else _FAILED
            self._failed(name, cmd_ref, target, code, exc.message)
            return name, cmd_ref, cmd.no_resp, target, code, None
        except Exception as exc:  # a store or CSP fault: fail this command, keep the session
            deferred.discard(mark)
            log.warning("%s %s failed: %s", name, target, exc, exc_info=True)
            self._failed(name, cmd_ref, target, StatusCode.COMMAND_FAILED,
                         f"{type(exc).__name__}: {exc}")
            return name, cmd_ref, cmd.no_resp, target, _FAILED, None
        return name, cmd_ref, cmd.no_resp, target, _OK, result

    def _item(self, cmd: ItemCommand, item: Item, outcome: _Outcome) -> _ItemOutcome:
        target = (item.target or "").strip()
        kind = cmd.kind
        value = None
        if kind is not _GET and kind is not _DELETE:  # what carries data
            meta = item.meta or cmd.meta
            value = ItemValue(item.data, meta.format if meta else None,
                              meta.type if meta else None)
        deferred = self.tree.deferred
        mark = len(deferred)
        result = None  # also when a CSP's Rollback ends the block quietly (it was unbound)
        try:
            with self.store.transaction():
                result = self._apply(kind, target, value)
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
        return _ItemOutcome(target, _OK, result)

    def _apply(self, kind: Cmd, target: str, value: ItemValue | None) -> Item | None:
        # `target` is the trimmed LocURI: the tree parses it (and memoizes the parse), and it
        # is what Results echo as Source.
        tree = self.tree
        if kind is _GET:
            node = tree.get(target)
            return _build.item(source=target, meta=self._meta(node.format, node.type),
                               data=node.data)
        if kind is _DELETE:
            tree.delete(target)
            return None
        assert value is not None
        if kind is _REPLACE:
            tree.replace(target, value)
        elif kind is _ADD:
            tree.add(target, value)
        elif kind is _EXEC:
            tree.exec(target, value)
        else:  # pragma: no cover - ItemCommand kinds are the five above plus Copy
            raise DMStatusError(StatusCode.OPTIONAL_FEATURE_NOT_SUPPORTED, kind.value)
        return None

    def _meta(self, fmt: str, type_: str | None) -> Meta:
        """Results Meta, shared per (Format, Type): Meta is immutable and a message's Results
        carry the same few."""
        key = (fmt, type_)
        meta = self._metas.get(key)
        if meta is None:
            if len(self._metas) >= 64:
                self._metas.clear()
            # plain str values (NodeValue formats are Format members): the encoder writes
            # them into every Results, and an f-string formats a str subclass the slow way
            meta = self._metas[key] = Meta(format=str.__str__(fmt),
                                           type=None if type_ is None else str.__str__(type_))
        return meta

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
        self._failed(outcome.name, outcome.cmd_ref, target, code, message)

    def _failed(self, name: str, cmd_ref: str, target: str, code: int, message: str) -> None:
        self.failures.append(Failure(name, cmd_ref, target, code, message))
        log.info("%s %s%s: %d %s", name, cmd_ref or "(no CmdID)",
                 f" {target}" if target else "", code, message)

    # --- rendering ---------------------------------------------------------------------------

    def _render(self, outcome: _Outcome, msg_ref: str,
                suppress: bool) -> list[Status | Results]:
        suppress = suppress or outcome.no_resp
        items = outcome.items
        if len(items) == 1 and not outcome.children:  # the common case: one Item
            only = items[0]
            out: list[Status | Results] = [] if suppress else [
                self._status(outcome, msg_ref, only.code, (only.target,))]
            if only.result is not None:
                out.append(_build.results(msg_ref, outcome.cmd_ref, (only.result,)))
            return out
        out = []
        if not suppress:
            codes = {i.code for i in items}
            if len(codes) > 1:  # MS-MDM §2.2.6.1: a Status per Item when codes differ
                out += [self._status(outcome, msg_ref, i.code, (i.target,))
                        for i in items]
            else:
                code = codes.pop() if codes else outcome.code
                out.append(self._status(outcome, msg_ref, code,
                                        tuple(i.target for i in items)))
        results = tuple(i.result for i in items if i.result is not None)
        if results:
            out.append(_build.results(msg_ref, outcome.cmd_ref, results))
        for child in outcome.children:
            out += self._render(child, msg_ref, suppress)
        return out

    def _status(self, outcome: _Outcome, msg_ref: str, code: int,
                targets: tuple[str, ...]) -> Status:
        # _build: the dataclass constructor, minus the frozen __init__'s cost (see there).
        return _build.status(msg_ref, outcome.cmd_ref, outcome.name, int(code),
                             tuple(t for t in targets if t) if self.echo_target_refs else ())


_DONE = frozenset({StatusCode.OK, StatusCode.ACCEPTED_FOR_PROCESSING})
# Enum members as module constants: a class attribute lookup per use adds up per command.
_GET, _ADD, _REPLACE, _DELETE, _EXEC, _COPY = (Cmd.GET, Cmd.ADD, Cmd.REPLACE, Cmd.DELETE,
                                               Cmd.EXEC, Cmd.COPY)
_NAMES: dict[Cmd, str] = {c: c.value for c in Cmd}


def _cmd_ref(cmd: Command) -> str:
    cmd_id = getattr(cmd, "cmd_id", None)
    return cmd_id.strip() if type(cmd_id) is str else ""


def _not_executed(cmd: Command) -> _Outcome:
    outcome = _Outcome(command_name(cmd), _cmd_ref(cmd), bool(getattr(cmd, "no_resp", False)),
                       StatusCode.NOT_EXECUTED)
    if isinstance(cmd, Container):
        outcome.children = [_not_executed(c) for c in cmd.commands]
    return outcome
