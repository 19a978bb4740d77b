"""agent.commands.keymaker: the `scep enroll` key started before the CLI parses, and handed
over only when the parsed arguments ask for that very key."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.commands import keymaker
from agent.sealing import Sealer
from keystores.base import KeyAlgorithm, KeySpec
from keystores.software import SoftwareKeyStore

URL = "http://127.0.0.1:1/scep"


@pytest.mark.parametrize(("argv", "size"), [
    (["scep", "enroll", URL, "--subject", "CN=x"], 2048),
    (["-v", "--state-dir", "/tmp/s", "scep", "enroll", URL], 2048),
    (["scep", "enroll", URL, "--key-length", "1024"], 1024),
    (["scep", "enroll", URL, "--key-length=3072", "--keystore", "software"], 3072),
    (["scep", "enroll", URL, "--keystore=software", "--key-usage", "128"], 2048),
    (["scep", "enroll", URL, "--", "--keystore", "tpm"], 2048),  # positional after --
    (["scep", "enroll", URL, "--keystore", "tpm"], None),
    (["scep", "enroll", URL, "--keystore=tpm", "--tcti", "swtpm:port=1"], None),
    (["scep", "enroll", URL, "--keys", "tpm"], None),  # argparse's abbreviation: let it say
    (["scep", "enroll", URL, "--key-l", "1024"], None),
    (["scep", "enroll", URL, "--key-length", "999"], None),  # argparse refuses it
    (["scep", "enroll", URL, "--key-length", "big"], None),
    (["scep", "enroll", URL, "--key-length"], None),
    (["scep", "enroll", "--help"], None),
    (["scep", "enroll", URL, "-h"], None),
    (["scep", "renew", URL], None),
    (["scep", "getcacaps", URL], None),
    (["scep"], None),
    (["status"], None),
])
def test_which_command_lines_start_a_key(argv: list[str], size: int | None) -> None:
    assert keymaker.early_key_size(argv) == size


@pytest.fixture
def store(tmp_path: Path) -> SoftwareKeyStore:
    return SoftwareKeyStore(tmp_path / "keys", Sealer(secrets.token_bytes(32)))


@pytest.fixture(autouse=True)
def _no_early_key_left() -> Iterator[None]:
    yield
    keymaker.release_early()


def test_the_early_key_is_taken_when_the_size_agrees(store: SoftwareKeyStore) -> None:
    keymaker.start_early(["scep", "enroll", URL, "--key-length", "1024"])
    maker = keymaker.take_early(1024)
    assert maker is not None and maker.rsa_size == 1024
    assert keymaker.take_early(1024) is None  # handed over once
    spec = KeySpec(KeyAlgorithm.RSA, 1024)
    maker.store_in(store, spec)
    handle = maker.job.result()
    assert handle.spec.size == 1024 and store.load(handle.key_id).spec == handle.spec


def test_an_early_key_of_another_size_is_abandoned_unstored(tmp_path: Path) -> None:
    keymaker.start_early(["scep", "enroll", URL, "--key-length", "1024"])
    early = keymaker._early.maker
    assert early is not None
    assert keymaker.take_early(2048) is None
    assert isinstance(early.job.exception(), keymaker.Abandoned)
    assert not list(tmp_path.rglob("*"))  # nothing was written anywhere


def test_release_abandons_a_key_nobody_took() -> None:
    keymaker.start_early(["scep", "enroll", URL, "--key-length", "1024"])
    early = keymaker._early.maker
    assert early is not None
    keymaker.release_early()
    assert isinstance(early.job.exception(), keymaker.Abandoned)
    assert keymaker.take_early(1024) is None
