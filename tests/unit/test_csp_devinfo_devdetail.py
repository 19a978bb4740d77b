"""DevInfo and DevDetail: values from the device config, Get only, advertised URI limits."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.csp.devinfo import devinfo_values
from agent.dmtree.uri import MAX_DEPTH, MAX_SEGMENT_LEN, MAX_TOTAL_LEN
from tests.unit.dmtree_support import Env, codes, delete, make_env, rep, value_of


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return make_env(tmp_path)


@pytest.mark.parametrize(("uri", "expected"), [
    ("./DevInfo/DevId", ("chr", "6A2F1C0E-0000-4000-8000-000000000001")),
    ("./DevInfo/Man", ("chr", "dmagent")),
    ("./DevInfo/Mod", ("chr", "Virtual Device")),
    ("./DevInfo/DmV", ("chr", "1.3")),
    ("./DevInfo/Lang", ("chr", "en-US")),
    ("./DevInfo", ("node", "DevId/Man/Mod/DmV/Lang")),
    ("./DevDetail/DevTyp", ("chr", "Virtual Device")),
    ("./DevDetail/OEM", ("chr", "dmagent")),
    ("./DevDetail/SwV", ("chr", "10.0.22631.4460")),
    ("./DevDetail/LrgObj", ("bool", "true")),
    ("./DevDetail/URI/MaxDepth", ("chr", str(MAX_DEPTH))),
    ("./DevDetail/URI/MaxTotLen", ("chr", str(MAX_TOTAL_LEN))),
    ("./DevDetail/URI/MaxSegLen", ("chr", str(MAX_SEGMENT_LEN))),
    ("./DevDetail/URI", ("node", "MaxDepth/MaxTotLen/MaxSegLen")),
    ("./DevDetail/Ext/Microsoft/DeviceName", ("chr", "DESKTOP-TEST")),
    ("./DevDetail/Ext/Microsoft/OSPlatform", ("chr", "Windows 10 Enterprise")),
    ("./DevDetail/Ext/Microsoft/ProcessorArchitecture", ("int", "9")),
    ("./devdetail/ext/microsoft/devicename", ("chr", "DESKTOP-TEST")),
])
def test_values(env: Env, uri: str, expected: tuple[str, str]) -> None:
    assert value_of(env, uri) == expected


def test_everything_is_read_only(env: Env) -> None:
    out = env.run(rep("1", "./DevInfo/DmV", "1.2"), delete("2", "./DevDetail/URI"),
                  rep("3", "./DevDetail/Ext/Microsoft/DeviceName", "x"))
    assert [c for _, _, c in codes(out)] == [405, 405, 405]


def test_package_one_values_follow_the_config(env: Env) -> None:
    assert list(devinfo_values(env.ctx.device)) == ["DevId", "Man", "Mod", "DmV", "Lang"]
