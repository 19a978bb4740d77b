"""`dmagent scep ...` builds only the scep parser (start-up cost), and the lean parser never
changes what argparse decides: help lists every command, a wrong guess re-parses in full."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest

from agent import cli
from tests.conftest import REPO


@pytest.mark.parametrize(("argv", "expected"), [
    (["scep", "enroll", "http://x/scep"], "scep"),
    (["-v", "scep"], "scep"),
    (["-vv", "--state-dir", "scep", "tree"], "tree"),  # the option's value is not the command
    (["--config", "sync", "scep"], "scep"),
    (["--conf", "sync", "scep"], "scep"),  # argparse accepts unambiguous long prefixes
    (["--state", "sync", "scep"], "scep"),
    (["--config=sync", "reg"], "reg"),
    (["-csync", "reg"], "reg"),  # -cFILE
    (["-c", "sync", "reg"], "reg"),
    (["-vc", "sync", "status"], "status"),  # -v then -c FILE
    (["-h", "scep"], None),  # top-level help: build everything so it lists all commands
    (["--he", "scep"], None),
    (["--version"], None),
    (["bogus", "scep"], None),  # argparse's "invalid choice" comes from the full parser
    ([], None),
    (["--", "scep"], None),
])
def test_chosen_command(argv: list[str], expected: str | None) -> None:
    assert cli.chosen_command(argv) == expected


def test_only_the_chosen_command_module_is_imported() -> None:
    code = ("import sys; from agent import cli; cli.build_parser(['scep', 'enroll']); "
            "print(sorted(m for m in sys.modules if m.startswith(('agent.commands.', "
            "'service.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.strip()
    assert out == "['agent.commands.base', 'agent.commands.scep']"


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["-h", "scep"], ["-vh"]):
        with pytest.raises(SystemExit) as done:
            cli.main(argv)
        assert done.value.code == 0
        out = capsys.readouterr().out
        assert all(f"    {name} " in out for name in cli.COMMANDS), argv


def test_errors_are_reported_by_the_full_parser(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main(["bogus"])
    assert done.value.code == 2
    assert "invalid choice: 'bogus' (choose from 'sync', 'run'" in capsys.readouterr().err


def test_a_wrong_guess_is_parsed_again_in_full(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli, "chosen_command", lambda argv: "sync")  # guess wrong on purpose
    assert cli.main(["error", "0x80190194"]) == 0
    assert "HTTP_E_STATUS_NOT_FOUND" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "one_shot"), [
    (["version"], True), (["error", "0x80190194"], True), (["run", "--help"], False)])
def test_gc_threshold_while_a_command_runs(monkeypatch: pytest.MonkeyPatch,
                                           argv: list[str], one_shot: bool) -> None:
    """One-shot commands run with a high gen0 threshold (imports are not garbage); the daemon
    keeps the defaults; either way the caller's thresholds are back afterwards."""
    import gc

    seen: list[tuple[int, int, int]] = []
    real_setup = cli.build_parser

    def spy(argv: list[str] | None = None) -> object:
        seen.append(gc.get_threshold())
        return real_setup(argv)

    monkeypatch.setattr(cli, "build_parser", spy)
    before = gc.get_threshold()
    with contextlib.suppress(SystemExit):  # --help exits from argparse
        cli.main(argv)
    assert gc.get_threshold() == before
    assert seen[0][0] == (cli.ONE_SHOT_GC_THRESHOLD if one_shot else before[0])
