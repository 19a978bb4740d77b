"""Helpers for the DM tree and CSP tests: a device with an enrollment, and SyncML builders."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import Config, DeviceConfig, TasksConfig
from agent.device import DeviceContext
from agent.dmtree.executor import TreeExecutor
from agent.dmtree.tree import DMTree, build_tree
from agent.enrollment import Enrollment, EnrollmentStore
from agent.registry import Registry, Rollback
from agent.syncml.messages import (
    Cmd,
    Command,
    Container,
    Item,
    ItemCommand,
    Meta,
    Results,
    Status,
)

USER_SID = "S-1-12-1-3546063745-1309206162-2641703837-3589660599"
ACCOUNT_ID = "dede853d-e274-406b-9d0d-47b6fe65b440"
UNIQUE_ID = (f"ModelName_AC_{ACCOUNT_ID}_LogicalName_286033f4_0515_414d_b58f_08e74f6e8e3c"
             "_Hash_68180377")
NOW = 1_700_000_000.0


class FaultyStore:
    """Wraps the registry; makes the outermost rollback or commit fail like a broken disk."""

    def __init__(self, registry: Registry, *, rollback: bool = False,
                 commit: bool = False) -> None:
        self.registry = registry
        self.fail_rollback = rollback
        self.fail_commit = commit
        self.depth = 0

    @contextmanager
    def transaction(self) -> Iterator[None]:
        outer = self.depth == 0
        self.depth += 1
        try:
            with self.registry.transaction():
                try:
                    yield
                except Rollback:
                    if outer and self.fail_rollback:
                        raise sqlite3.OperationalError("disk I/O error (ROLLBACK)") from None
                    raise
                if outer and self.fail_commit:
                    raise sqlite3.OperationalError("database or disk is full (COMMIT)")
        finally:
            self.depth -= 1


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    ctx: DeviceContext
    enrollment: Enrollment
    tree: DMTree
    executor: TreeExecutor
    clock: Clock
    removed: list[Any] = field(default_factory=list)

    @property
    def registry(self) -> Registry:
        return self.ctx.registry

    def run(self, *commands: Command, msg_ref: str = "1") -> list[Status | Results]:
        return self.executor.execute(list(commands), msg_ref)


def make_env(tmp_path: Path, *, enrolled: bool = True, tasks: TasksConfig | None = None,
             **executor_kw: Any) -> Env:
    cfg = Config(state_dir=tmp_path / "state",
                 device=DeviceConfig(device_id="6A2F1C0E-0000-4000-8000-000000000001",
                                     name="DESKTOP-TEST", user_sid=USER_SID),
                 tasks=tasks or TasksConfig())
    ctx = DeviceContext(cfg)
    enrollment = EnrollmentStore(ctx.registry).add(
        "https://mdm.example.test/omadm", account_id=ACCOUNT_ID,
        enrollment_id="81D43C39-0417-4466-8D6E-553DD5C3358F")
    clock = Clock()
    removed: list[Any] = []
    tree = build_tree(ctx, enrollment if enrolled else None, clock=clock,
                      cert_removal_hooks=[lambda reg, ref: removed.append(ref)])
    return Env(ctx, enrollment, tree, TreeExecutor(tree, ctx.registry, **executor_kw), clock,
               removed)


def item(target: str, data: str | None = None, fmt: str | None = None,
         type_: str | None = None) -> Item:
    meta = Meta(format=fmt, type=type_) if fmt or type_ else None
    return Item(target=target, data=data, meta=meta)


def cmd(kind: Cmd, cmd_id: str | None, target: str, data: str | None = None,
        fmt: str | None = None, type_: str | None = None, no_resp: bool = False) -> ItemCommand:
    return ItemCommand(kind, cmd_id, (item(target, data, fmt, type_),), no_resp=no_resp)


def add(cmd_id: str | None, target: str, data: str | None = None, fmt: str | None = None,
        type_: str | None = None) -> ItemCommand:
    return cmd(Cmd.ADD, cmd_id, target, data, fmt, type_)


def rep(cmd_id: str | None, target: str, data: str | None = None, fmt: str | None = None,
        type_: str | None = None) -> ItemCommand:
    return cmd(Cmd.REPLACE, cmd_id, target, data, fmt, type_)


def get(cmd_id: str | None, *targets: str) -> ItemCommand:
    return ItemCommand(Cmd.GET, cmd_id, tuple(Item(target=t) for t in targets))


def delete(cmd_id: str | None, target: str) -> ItemCommand:
    return cmd(Cmd.DELETE, cmd_id, target)


def exec_(cmd_id: str | None, target: str, data: str | None = None) -> ItemCommand:
    return cmd(Cmd.EXEC, cmd_id, target, data)


def atomic(cmd_id: str | None, *commands: Command, no_resp: bool = False) -> Container:
    return Container(Cmd.ATOMIC, cmd_id, tuple(commands), no_resp=no_resp)


def sequence(cmd_id: str | None, *commands: Command, no_resp: bool = False) -> Container:
    return Container(Cmd.SEQUENCE, cmd_id, tuple(commands), no_resp=no_resp)


def codes(out: list[Status | Results]) -> list[tuple[str, str, int]]:
    """(Cmd, CmdRef, code) of every Status, in order."""
    return [(s.cmd, s.cmd_ref, s.data) for s in out if isinstance(s, Status)]


def results(out: list[Status | Results]) -> list[Results]:
    return [r for r in out if isinstance(r, Results)]


def value_of(env: Env, uri: str) -> tuple[str | None, str | None]:
    """(Meta Format, Data) that a Get of `uri` answers, or raises AssertionError with the code."""
    out = env.run(get("g", uri))
    status = [s for s in out if isinstance(s, Status)]
    assert status[0].data == 200, f"Get {uri} answered {status[0].data}"
    res = results(out)[0].items[0]
    return (res.meta.format if res.meta else None), res.data


def get_code(env: Env, uri: str) -> int:
    return codes(env.run(get("g", uri)))[0][2]


def snapshot(registry: Registry) -> list[Any]:
    """Every key and value of every hive, for byte-for-byte comparisons."""
    return list(registry.walk("HKLM")) + list(registry.walk("HKU"))


def scep(scope: str = "Device", uid: str = UNIQUE_ID) -> str:
    return f"./{scope}/Vendor/MSFT/ClientCertificateInstall/SCEP/{uid}"
