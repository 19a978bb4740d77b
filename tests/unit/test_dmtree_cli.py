"""`dmagent tree get|list` as a user runs it (a separate process on a private state dir)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from agent.config import load_config
from agent.device import DeviceContext
from agent.dmtree.executor import TreeExecutor
from agent.dmtree.tree import build_tree
from agent.enrollment import EnrollmentStore
from tests.conftest import CliResult
from tests.unit.dmtree_support import UNIQUE_ID, atomic, codes, exec_, rep

SECRET = "TopSecretChallenge-do-not-print"


def _provision(state_dir: Path) -> None:
    with DeviceContext(load_config(env={}, overrides={"state_dir": state_dir})) as ctx:
        enrollment = EnrollmentStore(ctx.registry).add("https://mdm.example.test/omadm")
        tree = build_tree(ctx, enrollment)
        base = f"./Vendor/MSFT/ClientCertificateInstall/SCEP/{UNIQUE_ID}/Install"
        out = TreeExecutor(tree, ctx.registry).execute([atomic(
            "1", rep("2", f"{base}/ServerURL", "https://ca.example.test/scep"),
            rep("3", f"{base}/Challenge", SECRET), rep("4", f"{base}/KeyUsage", "160", "int"),
            exec_("5", f"{base}/Enroll"))], "1")
        assert {c for _, _, c in codes(out)} == {200}


def test_tree_get_and_list(state_dir: Path, run_cli: Callable[..., CliResult]) -> None:
    _provision(state_dir)
    node = f"./Device/Vendor/MSFT/ClientCertificateInstall/SCEP/{UNIQUE_ID}"
    r = run_cli("tree", "get", f"{node}/Status")
    assert (r.returncode, r.stdout) == (0, "[int] 32\n"), r.stderr
    r = run_cli("tree", "get", "--json", f"{node}/Install/KeyUsage")
    assert json.loads(r.stdout) == {"uri": f"{node}/Install/KeyUsage", "format": "int",
                                    "type": None, "data": "160", "children": None}
    r = run_cli("tree", "get", "./Vendor/MSFT/ClientCertificateInstall/SCEP")
    assert r.stdout.splitlines() == [UNIQUE_ID]
    r = run_cli("tree", "list")
    assert r.returncode == 0, r.stderr
    assert "./DevInfo/DmV  [chr] 1.3" in r.stdout.splitlines()
    assert f"{node}/Install/Challenge  (405 Get is not allowed on " \
           f"ClientCertificateInstall/SCEP/{UNIQUE_ID}/Install/Challenge)" in r.stdout
    assert SECRET not in r.stdout + r.stderr
    r = run_cli("tree", "list", "--json", node)
    rows = json.loads(r.stdout)
    assert rows[0] == {"uri": node, "format": "node",
                       "data": "Install/CertThumbprint/Status/ErrorCode/RespondentServerUrl"}
    r = run_cli("tree", "get", "./DevInfo/Nope")
    assert r.returncode == 5 and "404" in r.stderr
    r = run_cli("tree", "get", "./Vendor//x")
    assert r.returncode == 1 and "400" in r.stderr
