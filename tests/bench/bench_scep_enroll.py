"""SCEP enrollment cost (`make bench`): dmagent against micromdm's own client, same server.

1. Whole process: N sequential `dmagent scep enroll` runs (fresh RSA-2048 key each, software
   key store) and N `scepclient` runs (it generates its RSA-2048 key too), interleaved so load
   drifts hit both alike. Target: dmagent <= 1.0x scepclient per enrollment (the totals of
   the N runs; the medians' ratio is printed too, with a bootstrap interval).
2. In process: `enroll()` with a key made beforehand, i.e. the client's own overhead beyond
   key generation (server time included). Target: <= 15 ms per enrollment.

Prints medians, the ratio, the per-phase split and what dominates start-up; the targets are
reported, not asserted (the numbers depend on the machine), correctness is asserted.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, ScepServerInstance, need_binary

pytestmark = [pytest.mark.bench, pytest.mark.scepserver]
# scepclient's per-run time spreads 0.05-0.6 s (Go key generation): medians of 50 runs moved
# 110-155 ms between runs here, so the default is 100 (about a minute).
N = int(os.environ.get("DMAGENT_BENCH_N", "100"))


def _dmagent_argv() -> list[str]:
    script = Path(sys.executable).with_name("dmagent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


def _ms(values: list[float]) -> str:
    return (f"median {statistics.median(values) * 1000:7.1f} ms  "
            f"mean {statistics.fmean(values) * 1000:7.1f}  "
            f"min {min(values) * 1000:7.1f}  max {max(values) * 1000:7.1f}")


def _import_profile(argv: list[str], env: dict[str, str]) -> list[tuple[int, str]]:
    """Top-level imports by cumulative time (python -X importtime) for one CLI run."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "agent.cli", *argv[1:]],
                          env=env, capture_output=True, text=True, cwd=REPO, check=True)
    rows = []
    for line in proc.stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3:
            continue
        cumulative, name = parts[1].strip(), parts[2]
        if cumulative.isdigit() and name.startswith(" ") and not name.startswith("  "):
            rows.append((int(cumulative), name.strip()))  # depth 0: imported by our code
    return sorted(rows, reverse=True)[:12]


def _bootstrap_median_ratio(ours: list[float], theirs: list[float],
                            rounds: int = 2000) -> tuple[float, float]:
    """A 95% interval of median(ours) / median(theirs), resampling both (fixed seed)."""
    rng = random.Random(8894)
    ratios = sorted(statistics.median(rng.choices(ours, k=len(ours)))
                    / statistics.median(rng.choices(theirs, k=len(theirs)))
                    for _ in range(rounds))
    return ratios[int(rounds * 0.025)], ratios[int(rounds * 0.975) - 1]


def _byte_compile() -> str:
    """Compile the project's modules as `pip install` does for an installed package.

    The environment may set PYTHONDONTWRITEBYTECODE, and then every module changed since its
    .pyc was written is recompiled at each start: that would measure the compiler, not dmagent.
    The warm-up enrollment runs without it, so it also writes the compiled dataclass methods
    beside the .pyc files (agent.dataclass_cache), as a first run does on an installed agent.
    """
    dirs = ["agent", "keystores", "service", "lab"]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *dirs], cwd=REPO, check=True,
                   capture_output=True)
    return " ".join(dirs)


def test_cli_against_scepclient(scepserver: ScepServerInstance, tmp_path: Path) -> None:
    scepclient = need_binary("scepclient")
    compiled = _byte_compile()
    env = {**os.environ, "DMAGENT_STATE_DIR": str(tmp_path / "state"),
           "DMAGENT_SCEP_CHALLENGE": scepserver.challenge}
    env.pop("DMAGENT_CONFIG", None)
    dm_argv = _dmagent_argv()

    def dmagent(i: int) -> float:
        argv = [*dm_argv, "scep", "enroll", scepserver.url, "--subject", f"CN=bench-dm-{i}",
                "--json"]
        run_env = env if i >= 0 else {k: v for k, v in env.items()
                                      if k != "PYTHONDONTWRITEBYTECODE"}
        started = time.perf_counter()
        proc = subprocess.run(argv, env=run_env, capture_output=True, text=True, cwd=REPO,
                              check=False)
        elapsed = time.perf_counter() - started
        assert proc.returncode == 0, proc.stderr
        assert len(json.loads(proc.stdout)["thumbprint"]) == 40
        return elapsed

    def micromdm(i: int) -> float:
        key, cert = tmp_path / f"sc{i}.key", tmp_path / f"sc{i}.pem"
        argv = [scepclient, "-server-url", scepserver.url, "-challenge", scepserver.challenge,
                "-private-key", str(key), "-certificate", str(cert), "-cn", f"bench-sc-{i}"]
        started = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, check=False)
        elapsed = time.perf_counter() - started
        assert proc.returncode == 0 and cert.exists(), proc.stderr
        return elapsed

    dmagent(-1), micromdm(-1)  # warm the page cache, the server and dmagent's caches
    ours, theirs = [], []
    for i in range(N):
        ours.append(dmagent(i))
        theirs.append(micromdm(i))
    idle = []
    for _ in range(5):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        idle.append(time.perf_counter() - started)
    # N enrollments one after another cost the sum, so the cost per enrollment is the mean and
    # the ratio of the totals decides. The ratio of the medians (a typical single run) is
    # printed with a bootstrap interval: scepclient's Go key generation spreads its runs from
    # 0.05 to 0.6 s, and its median moved 110-155 ms between runs of 50 here.
    total_ratio = sum(ours) / sum(theirs)
    ratio = statistics.median(ours) / statistics.median(theirs)
    low, high = _bootstrap_median_ratio(ours, theirs)
    print(f"\n=== SCEP enrollment, whole process, N={N}, RSA-2048, {scepserver.url}")
    print(f"(byte-compiled first: python -m compileall -q {compiled})")
    print(f"dmagent scep enroll : {_ms(ours)}")
    print(f"scepclient          : {_ms(theirs)}")
    print(f"ratio dmagent/scepclient per enrollment (of the totals) = {total_ratio:.2f}x  "
          f"(target <= 1.0x: {'met' if total_ratio <= 1.0 else 'MISSED'})")
    print(f"ratio of the medians = {ratio:.2f}x  (95% bootstrap interval {low:.2f}-{high:.2f})")
    print(f"python -c pass      : {_ms(idle)}  (interpreter floor)")
    imports = _import_profile(
        [*dm_argv, "scep", "enroll", scepserver.url, "--subject", "CN=bench-import"], env)
    print("largest top-level imports of one run (cumulative, python -X importtime):")
    for micros, name in imports:
        print(f"  {micros / 1000:7.1f} ms  {name}")


def test_in_process_overhead(scepserver: ScepServerInstance, tmp_path: Path) -> None:
    from agent.csr import CsrRequest
    from agent.scep.client import EndpointMemo, make_blocking_http, make_http_client
    from agent.scep.enroll import EnrollOptions, EnrollResult, enroll, enroll_inline
    from agent.scep.messages import public_key_der
    from agent.sealing import Sealer
    from keystores.base import KeyHandle, KeySpec
    from keystores.software import SoftwareKeyStore

    store = SoftwareKeyStore(tmp_path / "keys", Sealer(secrets.token_bytes(32)))
    Samples = tuple[list[float], list[float], dict[str, list[float]]]

    def measure(one: Callable[[EnrollOptions, KeyHandle], EnrollResult]) -> Samples:
        keygen: list[float] = []
        total: list[float] = []
        phases: dict[str, list[float]] = {}
        for i in range(N + 1):
            started = time.perf_counter()
            key = store.create(KeySpec())
            made = time.perf_counter()
            options = EnrollOptions(scepserver.url, CsrRequest(
                subject=f"CN=bench-ip-{i}", challenge=scepserver.challenge))
            result = one(options, key)
            done = time.perf_counter()
            assert public_key_der(result.certificate.public_key()) == \
                public_key_der(key.public_key())
            if i == 0:
                continue  # the first run pays one-time imports and connection set-up
            keygen.append(made - started)
            total.append(done - made)
            for name, ms in result.timings_ms().items():
                phases.setdefault(name, []).append(ms)
        return keygen, total, phases

    def on_asyncio(shared: bool) -> Samples:
        """As the daemon, certinst and fleets run it: an event loop and httpx."""
        with asyncio.Runner() as runner:
            http = make_http_client() if shared else None
            memo = EndpointMemo() if shared else None
            try:
                return measure(lambda options, key: runner.run(
                    enroll(options, key, http=http, memo=memo)))
            finally:
                if http is not None:
                    runner.run(http.aclose())

    def inline(shared: bool) -> Samples:
        """As `dmagent scep` runs it: no event loop, the blocking transport."""
        memo = EndpointMemo() if shared else None
        with make_blocking_http() as kept:
            def one(options: EnrollOptions, key: KeyHandle) -> EnrollResult:
                if shared:
                    return enroll_inline(options, key, http=kept, memo=memo)
                with make_blocking_http() as own:
                    return enroll_inline(options, key, http=own)

            return measure(one)

    runs = {"enroll() on asyncio + httpx, own client": on_asyncio(False),
            "enroll() on asyncio + httpx, shared client + memo (a fleet)": on_asyncio(True),
            "enroll_inline(), blocking transport, own (dmagent scep)": inline(False),
            "enroll_inline(), blocking transport, shared + memo": inline(True)}
    keygen = next(iter(runs.values()))[0]
    print(f"\n=== SCEP enrollment in process, N={N}")
    print(f"key generation (software store, RSA-2048): {_ms(keygen)}")
    for label, (_, total, _) in runs.items():
        print(f"{label:60s}: {_ms(total)}")
    for label, (_, _, phases) in runs.items():
        split = ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in phases.items())
        print(f"phases, {label} (median ms): {split}")
    best = min(statistics.median(total) for _, total, _ in runs.values())
    print(f"target <= 15 ms beyond key generation (best way): "
          f"{'met' if best <= 0.015 else 'MISSED'}")
