"""NodeCache: expected values, change detection, AutoSetExpectedValue, persistence."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest

from tests.unit.dmtree_support import (
    USER_SID,
    Env,
    add,
    atomic,
    codes,
    delete,
    get_code,
    make_env,
    rep,
    value_of,
)

NC = "./Vendor/MSFT/NodeCache/MDM%20SyncML%20Server"
KEY = r"HKLM\SOFTWARE\Microsoft\Provisioning\NodeCache\CSP\Device\MDM SyncML Server"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    env = make_env(tmp_path)
    out = env.run(add("1", NC, None, "node"),
                  add("2", f"{NC}/Nodes/10", None, "node"),
                  add("3", f"{NC}/Nodes/20", None, "node"),
                  add("4", f"{NC}/Nodes/20/NodeURI", "./DevDetail/Ext/Microsoft/DeviceName"),
                  add("5", f"{NC}/Nodes/20/ExpectedValue", "DESKTOP-TEST"))
    assert {c for _, _, c in codes(out)} == {200}
    return env


def test_documented_example_and_persistence(env: Env) -> None:
    assert env.registry.query(f"{KEY}\\Nodes\\20", "NodeURI") == \
        "./DevDetail/Ext/Microsoft/DeviceName"
    assert env.registry.query(f"{KEY}\\Nodes\\20", "ExpectedValue") == "DESKTOP-TEST"
    # Node 10 has no NodeURI: always reported as changed (NodeCache CSP reference)
    assert value_of(env, f"{NC}/ChangedNodes") == ("chr", "10")
    assert value_of(env, f"{NC}/ChangedNodesData") == (
        "chr", '<Nodes><Node Id="10" Uri=""></Node></Nodes>')
    assert value_of(env, f"{NC}/Nodes") == ("node", "10/20")
    assert value_of(env, f"{NC}/Nodes/20") == ("node", "NodeURI/ExpectedValue")
    assert value_of(env, "./Vendor/MSFT/NodeCache") == ("node", "MDM%20SyncML%20Server")


def test_changed_value_is_listed_with_its_data(env: Env) -> None:
    env.run(rep("1", f"{NC}/Nodes/20/ExpectedValue", "OLDNAME"),
            delete("2", f"{NC}/Nodes/10"))
    assert value_of(env, f"{NC}/ChangedNodes") == ("chr", "20")
    encoded = base64.b64encode(b"DESKTOP-TEST").decode()
    assert value_of(env, f"{NC}/ChangedNodesData") == (
        "chr", '<Nodes><Node Id="20" Uri="./DevDetail/Ext/Microsoft/DeviceName">'
               f"{encoded}</Node></Nodes>")


@pytest.mark.parametrize(("uri", "expected", "type_", "changed"), [
    ("./DevInfo/Nope", "x-nodemon-nonexistent", None, False),
    ("./DevInfo/Nope", "", "application/x-nodemon-nonexistent", False),
    ("./DevInfo/DmV", "", "application/x-nodemon-nonexistent", True),
    ("./DevInfo/Nope", "1.3", None, True),
    ("./DevInfo/DmV", "1.3", None, False),
    ("./DevInfo/DmV", hashlib.sha256(b"1.3").hexdigest(), "application/x-nodemon-sha256", False),
    ("./DevInfo/DmV", base64.b64encode(hashlib.sha256(b"1.3").digest()).decode(),
     "application/x-nodemon-sha256", False),
    ("./DevInfo/DmV", hashlib.sha256(b"1.2").hexdigest(), "application/x-nodemon-sha256", True),
    ("./DevInfo", "DevId/Man/Mod/DmV/Lang", None, False),  # an interior node: its child list
])
def test_expected_value_kinds(env: Env, uri: str, expected: str, type_: str | None,
                              changed: bool) -> None:
    env.run(delete("0", f"{NC}/Nodes/10"), add("1", f"{NC}/Nodes/30/NodeURI", uri),
            add("2", f"{NC}/Nodes/30/ExpectedValue", expected, "chr", type_))
    assert value_of(env, f"{NC}/ChangedNodes") == ("chr", "30" if changed else "")


def test_auto_set_expected_value_snapshots_the_current_value(env: Env) -> None:
    env.run(rep("1", f"{NC}/Nodes/20/ExpectedValue", "STALE"),
            rep("2", f"{NC}/Nodes/20/AutoSetExpectedValue", ""),
            add("3", f"{NC}/Nodes/40/NodeURI", "./DevInfo/Missing"),
            add("4", f"{NC}/Nodes/40/AutoSetExpectedValue", ""),
            delete("5", f"{NC}/Nodes/10"))
    assert value_of(env, f"{NC}/Nodes/20/ExpectedValue") == ("chr", "DESKTOP-TEST")
    assert value_of(env, f"{NC}/Nodes/40/ExpectedValue") == ("chr", "x-nodemon-nonexistent")
    assert value_of(env, f"{NC}/ChangedNodes") == ("chr", "")


def test_auto_set_sees_writes_of_the_same_atomic(env: Env) -> None:
    poll = "./Vendor/MSFT/DMClient/Provider/MS%20DM%20Server/Poll/NumberOfFirstRetries"
    out = env.run(atomic("1", add("2", f"{NC}/Nodes/50/NodeURI", poll),
                         rep("3", poll, "4", "int"),
                         rep("4", f"{NC}/Nodes/50/AutoSetExpectedValue", "")))
    assert {c for _, _, c in codes(out)} == {200}
    assert value_of(env, f"{NC}/Nodes/50/ExpectedValue") == ("chr", "4")


def test_auto_set_without_node_uri_is_400(env: Env) -> None:
    assert codes(env.run(rep("1", f"{NC}/Nodes/10/AutoSetExpectedValue", ""))) == [
        ("Replace", "1", 400)]


def test_cache_version_and_access_rules(env: Env) -> None:
    out = env.run(add("1", f"{NC}/CacheVersion", "SCCM0001"),
                  rep("2", f"{NC}/CacheVersion", "SCCM0002"),
                  rep("3", f"{NC}/ChangedNodes", "x"),
                  add("4", f"{NC}/Nodes/a,b", None, "node"),
                  add("5", f"{NC}/Nodes/20", None, "node"),
                  rep("6", f"{NC}/Nodes/20/ExpectedValue", "<x/>", "node"))
    assert [c for _, _, c in codes(out)] == [200, 200, 405, 400, 418, 415]
    assert value_of(env, f"{NC}/CacheVersion") == ("chr", "SCCM0002")
    assert env.registry.query(KEY, "CacheVersion") == "SCCM0002"


def test_self_reference_does_not_loop(env: Env) -> None:
    env.run(delete("0", f"{NC}/Nodes/10"),
            add("1", f"{NC}/Nodes/60/NodeURI", f"{NC}/ChangedNodes"),
            add("2", f"{NC}/Nodes/60/ExpectedValue", "x"))
    assert value_of(env, f"{NC}/ChangedNodes") == ("chr", "60")


def test_delete_provider_and_user_scope(env: Env) -> None:
    user_nc = "./User/Vendor/MSFT/NodeCache/P1"
    env.run(add("1", f"{user_nc}/Nodes/1/NodeURI", "./DevInfo/Lang"),
            add("2", f"{user_nc}/Nodes/1/ExpectedValue", "en-US"))
    user_key = (f"HKU\\{USER_SID}\\SOFTWARE\\Microsoft\\Provisioning\\NodeCache\\CSP\\User"
                r"\P1\Nodes\1")
    assert env.registry.query(user_key, "ExpectedValue") == "en-US"
    assert value_of(env, f"{user_nc}/ChangedNodes") == ("chr", "")
    assert codes(env.run(delete("3", NC))) == [("Delete", "3", 200)]
    assert get_code(env, f"{NC}/ChangedNodes") == 404
    assert not env.registry.key_exists(KEY)
