"""DMClient: Poll schedule nodes (defaults, DWORD persistence, read API) and Unenroll."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.csp.dmclient import poll_key, read_poll_schedule, unenroll_requested
from agent.registry import RegType
from service.pollplan import next_poll_minutes
from tests.unit.dmtree_support import (
    Env,
    add,
    codes,
    delete,
    exec_,
    get_code,
    make_env,
    rep,
    value_of,
)

PROVIDER = "./Vendor/MSFT/DMClient/Provider/MS%20DM%20Server"
POLL = f"{PROVIDER}/Poll"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


@pytest.mark.parametrize(("node", "default"), [
    ("IntervalForFirstSetOfRetries", ("int", "15")), ("NumberOfFirstRetries", ("int", "10")),
    ("IntervalForSecondSetOfRetries", ("int", "60")), ("NumberOfSecondRetries", ("int", "16")),
    ("IntervalForRemainingScheduledRetries", ("int", "1440")),
    ("NumberOfRemainingScheduledRetries", ("int", "0")), ("PollOnLogin", ("bool", "false")),
    ("AllUsersPollOnFirstLogin", ("bool", "false")),
])
def test_unset_values_read_back_as_defaults(env: Env, node: str,
                                            default: tuple[str, str]) -> None:
    assert value_of(env, f"{POLL}/{node}") == default


def test_values_persist_as_dwords_under_the_enrollment(env: Env) -> None:
    out = env.run(rep("1", f"{POLL}/IntervalForFirstSetOfRetries", "3", "int"),
                  rep("2", f"{POLL}/NumberOfFirstRetries", "5", "int"),
                  add("3", f"{POLL}/PollOnLogin", "true", "bool"),
                  rep("4", f"{POLL}/IntervalForRemainingScheduledRetries", "480", "int"))
    assert {c for _, _, c in codes(out)} == {200}
    key = poll_key(env.enrollment)
    assert key == (r"HKLM\SOFTWARE\Microsoft\Enrollments\81D43C39-0417-4466-8D6E-553DD5C3358F"
                   r"\DMClient\MS DM Server\Poll")
    assert env.registry.get_value(key, "IntervalForFirstSetOfRetries").type is RegType.REG_DWORD
    assert env.registry.query(key, "PollOnLogin") == 1
    assert value_of(env, f"{POLL}/PollOnLogin") == ("bool", "true")
    schedule = read_poll_schedule(env.registry, env.enrollment)
    assert schedule.sets == ((3, 5), (60, 16), (480, 0))
    assert schedule.poll_on_login and not schedule.all_users_poll_on_first_login
    # the scheduler's view: 5 polls 3 min apart, then 16 hourly, then every 8 hours forever
    assert [next_poll_minutes(schedule.sets, n) for n in (0, 4, 5, 20, 21, 500)] == [
        3, 3, 60, 60, 480, 480]


def test_defaults_without_any_value(env: Env) -> None:
    schedule = read_poll_schedule(env.registry, env.enrollment)
    assert schedule.sets == ((15, 10), (60, 16), (1440, 0))


@pytest.mark.parametrize(("command", "code"), [
    (rep("1", f"{POLL}/NumberOfFirstRetries", "-1", "int"), 400),
    (rep("1", f"{POLL}/NumberOfFirstRetries", "ten", "int"), 400),
    (rep("1", f"{POLL}/PollOnLogin", "1", "bool"), 400),
    (rep("1", f"{POLL}/PollOnLogin", "true", "int"), 415),
    (rep("1", f"{POLL}/NoSuchSetting", "1", "int"), 404),
    (rep("1", "./Vendor/MSFT/DMClient/Provider/OtherServer/Poll/PollOnLogin", "true"), 404),
    (rep("1", "./User/Vendor/MSFT/DMClient/Provider/MS%20DM%20Server/Poll/PollOnLogin",
         "true"), 404),
    (delete("1", f"{POLL}/NumberOfFirstRetries"), 404),  # never set
    (delete("1", PROVIDER), 405),
    (rep("1", f"{PROVIDER}/Unenroll", ""), 405),
])
def test_refusals(env: Env, command: object, code: int) -> None:
    assert [c for _, _, c in codes(env.run(command))] == [code]  # type: ignore[arg-type]


def test_delete_returns_a_value_to_its_default(env: Env) -> None:
    env.run(rep("1", f"{POLL}/NumberOfSecondRetries", "2", "int"))
    assert codes(env.run(delete("2", f"{POLL}/NumberOfSecondRetries"))) == [
        ("Delete", "2", 200)]
    assert value_of(env, f"{POLL}/NumberOfSecondRetries") == ("int", "16")


@pytest.mark.parametrize("target", [f"{PROVIDER}/Unenroll", "./Vendor/MSFT/DMClient/Unenroll"])
def test_unenroll_marks_the_enrollment(env: Env, target: str) -> None:
    assert not unenroll_requested(env.registry, env.enrollment)
    assert codes(env.run(exec_("1", target, "MS DM Server"))) == [("Exec", "1", 200)]
    assert unenroll_requested(env.registry, env.enrollment)
    assert env.registry.query(env.enrollment.key, "UnenrollRequestTime") == int(
        env.clock.now * 1000)
    assert value_of(env, target) == ("null", "")


def test_without_enrollment(tmp_path: Path) -> None:
    env = make_env(tmp_path, enrolled=False)
    assert get_code(env, f"{POLL}/PollOnLogin") == 404
    assert value_of(env, "./Vendor/MSFT/DMClient/Provider") == ("node", "")
    assert codes(env.run(exec_("1", "./Vendor/MSFT/DMClient/Unenroll"))) == [("Exec", "1", 500)]
