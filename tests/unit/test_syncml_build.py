"""The fast message builders make exactly what the dataclass constructors make."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest

from agent.syncml import _build
from agent.syncml.messages import Cmd, Cred, Item, ItemCommand, Meta, Results, Status

META = Meta(format="chr", type="text/plain")
ITEM = Item(source="./DevInfo/Mod", meta=META, data="VM")

CASES: list[tuple[Any, Any]] = [
    (_build.status("2", "abc", "Get", 200),
     Status(cmd_id="", msg_ref="2", cmd_ref="abc", cmd="Get", data=200)),
    (_build.status("2", "r1", "Replace", 405, ("./DevInfo/DevId",), cmd_id="7"),
     Status("7", "2", "r1", "Replace", 405, target_refs=("./DevInfo/DevId",))),
    (_build.results("3", "g", (ITEM,)), Results(cmd_id="", msg_ref="3", cmd_ref="g",
                                                items=(ITEM,))),
    (_build.item(source="./DevInfo/Mod", meta=META, data="VM"), ITEM),
    (_build.item(target=" ./a ", data="<x/>", more_data=True, data_is_xml=True),
     Item(target=" ./a ", data="<x/>", more_data=True, data_is_xml=True)),
    (_build.meta(format="chr", type="text/plain"), META),
    (_build.meta(size=10, max_msg_size=5, max_obj_size=6, next_nonce="bm9uY2U="),
     Meta(size=10, max_msg_size=5, max_obj_size=6, next_nonce="bm9uY2U=")),
    (_build.item_command(Cmd.GET, "1", (ITEM,), None, False, None),
     ItemCommand(Cmd.GET, "1", (ITEM,))),
    (_build.item_command(Cmd.REPLACE, None, (), META, True, Cred(META, "x")),
     ItemCommand(Cmd.REPLACE, None, (), META, True, Cred(META, "x"))),
]


@pytest.mark.parametrize(("built", "constructed"), CASES)
def test_builders_match_the_constructors(built: Any, constructed: Any) -> None:
    assert type(built) is type(constructed)
    assert built == constructed and hash(built) == hash(constructed)
    assert repr(built) == repr(constructed)
    assert vars(built) == vars(constructed)  # every field set, nothing extra
    assert dataclasses.replace(built) == constructed
    assert pickle.loads(pickle.dumps(built)) == constructed
    with pytest.raises(dataclasses.FrozenInstanceError):
        built.cmd_id = "x"  # still frozen


def test_classes_the_builders_cannot_handle_are_refused() -> None:
    @dataclasses.dataclass(frozen=True, slots=True)
    class Slotted:
        a: int = 0

    @dataclasses.dataclass(frozen=True)
    class Checked:
        a: int = 0

        def __post_init__(self) -> None:
            pass

    @dataclasses.dataclass(frozen=True)
    class Required:
        a: int

    for cls in (Slotted, Checked):
        with pytest.raises(TypeError, match="without its __init__"):
            _build._fields(cls, ("a",))
    with pytest.raises(TypeError, match="no plain default"):
        _build._fields(Required, ())
    with pytest.raises(TypeError, match="no field"):
        _build._fields(Required, ("a", "b"))
