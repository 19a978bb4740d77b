"""The store survives `kill -9` mid-transaction: no corruption, no partial writes."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from agent.registry import Registry

# Each transaction bumps a counter and writes a key plus three values that all carry the same
# number, then deletes the previous key: any partial commit breaks one of the invariants below.
WRITER = textwrap.dedent(r"""
    import sys
    from pathlib import Path
    from agent.registry import Registry, RegType
    reg = Registry(Path(sys.argv[1]))
    print("ready", flush=True)
    while True:
        with reg.transaction():
            n = (reg.query(r"HKLM\Crash", "n") or 0) + 1
            reg.set_dword(r"HKLM\Crash", "n", n)
            key = rf"HKLM\Crash\Items\item{n}"
            reg.set_dword(key, "a", n)
            reg.set_value(key, "b", RegType.REG_BINARY, n.to_bytes(4, "little") * 256)
            reg.set_sz(key, "c", str(n) * 100)
            if n > 1:
                reg.delete_key(rf"HKLM\Crash\Items\item{n - 1}")
""")


def check_consistent(path: Path) -> int:
    reg = Registry(path)
    try:
        assert reg.integrity_check() == "ok"
        n = reg.query(r"HKLM\Crash", "n")
        if n is None:
            assert not reg.key_exists(r"HKLM\Crash\Items")
            return 0
        assert isinstance(n, int)
        items = reg.subkeys(r"HKLM\Crash\Items")
        assert items == [f"item{n}"], (n, items)
        key = rf"HKLM\Crash\Items\item{n}"
        assert reg.query(key, "a") == n
        assert reg.query(key, "b") == n.to_bytes(4, "little") * 256
        assert reg.query(key, "c") == str(n) * 100
        return n
    finally:
        reg.close()


def test_kill_9_mid_transaction_leaves_a_consistent_store(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    rng = random.Random(1234)
    previous = 0
    trials = 12
    for _ in range(trials):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db)],
                                stdout=subprocess.PIPE, cwd=Path(__file__).parents[2],
                                env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.01, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        n = check_consistent(db)
        assert n >= previous  # committed transactions are never lost
        previous = n
    assert previous > trials  # the writer did real work between kills
