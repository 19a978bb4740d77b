"""The key of `dmagent scep enroll`, made in a worker thread from the command's first moment.

RSA key generation is the longest single step of an enrollment (50 ms typical for RSA-2048,
with a long tail) and needs nothing but the key size, so it should not wait for the rest of
the start-up. `start_early(argv)` is called by the CLI before it even builds its parser: when
the arguments ask `scep enroll` for a software key, generation starts at once, and `take_early`
hands that key maker to the command once its arguments are parsed, if they agree. A maker
nobody took is abandoned by `release_early` (its key is never stored). Only this module and
cryptography's RSA module are imported before the thread starts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.scep.inline import Background
    from keystores.base import KeyHandle, KeySpec, KeyStore

SIZES = (1024, 2048, 3072, 4096)  # `scep enroll --key-length` choices
DEFAULT_SIZE = 2048


class KeyMaker:
    """The enrollment key, made in a worker thread (`job`).

    With `rsa_size`, a software RSA key is generated at once, before the store is open (which
    needs the config and the machine key); `store_in(store, spec)` then lets the worker store
    it (the store checks it matches the spec). Without, the key can only be made by its store
    (a TPM), so the worker waits for `store_in`. `abandon()` releases a worker still waiting
    when the command fails first; the job then raises `Abandoned` and nothing is stored.
    """

    def __init__(self, rsa_size: int | None) -> None:
        from agent.scep.inline import Background

        self.rsa_size = rsa_size
        self._store: KeyStore | None = None
        self._spec: KeySpec | None = None
        self._store_ready = threading.Event()
        self.seconds = 0.0  # making and storing the key, not the wait for the store
        generate: Callable[[int], Any] | None = None
        if rsa_size is not None:
            from keystores.keygen import generate_rsa as generate
        self.job: Background[KeyHandle] = Background(self._make, generate, rsa_size,
                                                     name="keygen")

    def _make(self, generate: Callable[[int], Any] | None, size: int | None) -> KeyHandle:
        started = time.perf_counter()
        private_key = generate(size) if generate is not None and size is not None else None
        self.seconds = time.perf_counter() - started
        self._store_ready.wait()
        if self._store is None or self._spec is None:
            raise Abandoned
        started = time.perf_counter()
        if private_key is None:
            handle = self._store.create(self._spec)
        else:
            from keystores.software import SoftwareKeyStore

            if not isinstance(self._store, SoftwareKeyStore):
                raise TypeError("a key generated beforehand needs the software key store")
            handle = self._store.create(self._spec, private_key=private_key)
        self.seconds += time.perf_counter() - started
        return handle

    def store_in(self, store: KeyStore, spec: KeySpec) -> None:
        self._store, self._spec = store, spec
        self._store_ready.set()

    def abandon(self) -> None:
        self._store_ready.set()


class Abandoned(Exception):
    """The command failed before the key store was open: the key is not kept."""


class _Early:
    maker: KeyMaker | None = None


_early = _Early()


def start_early(argv: Sequence[str]) -> None:
    """Start generating the key `argv` (the CLI's arguments) will ask for, if it is plainly
    `scep enroll` with a software RSA key; anything unusual (help, abbreviated key options,
    a size argparse would refuse) starts nothing and leaves it to the parsed command."""
    size = early_key_size(argv)
    if size is not None and _early.maker is None:
        _early.maker = KeyMaker(size)


def early_key_size(argv: Sequence[str]) -> int | None:
    """The RSA size a `dmagent ... scep enroll ...` command line asks a software key of."""
    args = list(argv)
    try:
        at = args.index("scep")
    except ValueError:
        return None
    if args[at + 1:at + 2] != ["enroll"]:
        return None
    size, keystore = str(DEFAULT_SIZE), "software"
    rest = iter(args[at + 2:])
    for arg in rest:
        if arg == "--":
            break
        name, eq, value = arg.partition("=")
        if name in ("-h", "--help"):
            return None
        if name in ("--keystore", "--key-length"):
            if not eq:
                value = next(rest, "")
            if name == "--keystore":
                keystore = value
            else:
                size = value
        elif name.startswith("--keys") or name.startswith("--key-l"):
            return None  # an abbreviation argparse would accept: let it decide
    if keystore != "software" or not size.isdigit() or int(size) not in SIZES:
        return None
    return int(size)


def take_early(rsa_size: int) -> KeyMaker | None:
    """The key maker `start_early` started, if it makes an RSA key of `rsa_size` (else it is
    abandoned and None is returned: the command starts its own)."""
    maker, _early.maker = _early.maker, None
    if maker is not None and maker.rsa_size != rsa_size:
        maker.abandon()
        return None
    return maker


def release_early() -> None:
    """Abandon a key maker nobody took (the command failed or did not want it)."""
    maker, _early.maker = _early.maker, None
    if maker is not None:
        maker.abandon()
