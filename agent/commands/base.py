"""What every `dmagent` subcommand gets: lazily loaded config and device context, output helpers."""

from __future__ import annotations

import argparse
import json
import sys
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from agent.config import Config
    from agent.device import DeviceContext


class Command(Protocol):
    """A subcommand handler: returns the process exit code."""

    def __call__(self, args: argparse.Namespace, app: App) -> int: ...


class App:
    """Per-invocation state shared by the subcommands."""

    def __init__(self, args: argparse.Namespace, stdout: TextIO | None = None) -> None:
        self.args = args
        self.stdout = stdout or sys.stdout

    @cached_property
    def config(self) -> Config:
        from agent.config import load_config

        overrides: dict[str, Any] = {}
        if getattr(self.args, "state_dir", None):
            overrides["state_dir"] = Path(self.args.state_dir)
        return load_config(getattr(self.args, "config", None), overrides=overrides)

    @cached_property
    def ctx(self) -> DeviceContext:
        from agent.device import DeviceContext

        return DeviceContext(self.config)

    def close(self) -> None:
        if "ctx" in self.__dict__:
            self.ctx.close()

    def print(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def print_json(self, obj: Any) -> None:
        json.dump(obj, self.stdout, indent=2, ensure_ascii=False, default=str)
        self.stdout.write("\n")


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
