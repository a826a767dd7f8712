"""Run a fuzz target under atheris (libFuzzer) when it is installed, else a seeded mutator.

Every harness calls :func:`main` with its ``test_one_input(data: bytes)`` and seed inputs.

    python fuzz/fuzz_wire.py -runs=1000000          # atheris: libFuzzer flags
    python fuzz/fuzz_wire.py --runs 100000 --seed 1  # without atheris: the built-in mutator
    python fuzz/fuzz_wire.py --runs 100000 CORPUS    # ... also mutating a libFuzzer corpus

``XDSFAST_FUZZ_ENGINE=random`` forces the built-in mutator (e.g. for a short CI run).
The built-in one flips, inserts, deletes, duplicates and splices bytes of the seeds and of
inputs that were interesting enough to keep (a bounded pool), deterministically per seed.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

Target = Callable[[bytes], None]

_INTERESTING = (b"\x00", b"\x80", b"\xff", b"\x7f", b"\x0a", b"\x12", b"\x1a", b"\x0b", b"\x0c")


def _atheris() -> Any:
    """The atheris module, or None (not installed, or the built-in mutator was asked for)."""
    if os.environ.get("XDSFAST_FUZZ_ENGINE", "") == "random":
        return None
    try:
        import atheris  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    return atheris


def instrumented() -> contextlib.AbstractContextManager[Any]:
    """Wrap the imports of the code under test: coverage feedback for libFuzzer."""
    atheris = _atheris()
    return contextlib.nullcontext() if atheris is None else atheris.instrument_imports()


def mutate(rng: random.Random, data: bytes, pool: Sequence[bytes], max_len: int) -> bytes:
    """One to four random edits of ``data`` (bytes in, bytes out)."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(buf))
        if op == 0 and buf:  # flip a bit
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # set a byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2:  # insert interesting bytes
            buf[pos:pos] = rng.choice(_INTERESTING) * rng.randint(1, 3)
        elif op == 3 and buf:  # delete a run
            del buf[pos : pos + rng.randint(1, 8)]
        elif op == 4 and buf:  # duplicate a run
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 32)]
        elif op == 5 and pool:  # splice in part of another input
            other = rng.choice(pool)
            start = rng.randint(0, len(other))
            buf[pos:pos] = other[start : start + rng.randint(1, 64)]
        elif op == 6:  # truncate
            del buf[pos:]
        else:  # random bytes
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
    return bytes(buf[:max_len])


def run_random(
    target: Target, seeds: Sequence[bytes], runs: int, seed: int, max_len: int = 4096
) -> int:
    rng = random.Random(seed)
    pool = list(seeds) or [b""]
    started = time.monotonic()
    for seed_input in pool:
        target(seed_input)
    for i in range(runs):
        data = mutate(rng, rng.choice(pool), pool, max_len)
        target(data)
        if i % 97 == 0:  # keep some mutants as parents, a bounded pool
            if len(pool) < 4096:
                pool.append(data)
            else:
                pool[rng.randrange(len(seeds), len(pool))] = data
    elapsed = time.monotonic() - started
    rate = runs / elapsed if elapsed else 0.0
    print(f"#{runs} DONE random mutator seed={seed} {elapsed:.1f}s ({rate:.0f} exec/s)")
    return 0


def _option(argv: list[str], name: str, default: int) -> int:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith(name + "="):
            return int(arg.split("=", 1)[1])
    return default


def main(target: Target, seeds: Sequence[bytes], argv: list[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    atheris = _atheris()
    if atheris is None:
        runs = _option(argv, "--runs", _option(argv, "-runs", 100_000))
        seed = _option(argv, "--seed", _option(argv, "-seed", 1))
        pool = list(seeds)
        for directory in (arg for arg in argv[1:] if not arg.startswith("-")):
            if os.path.isdir(directory):  # a libFuzzer corpus: more parents to mutate
                for name in sorted(os.listdir(directory)):
                    with open(os.path.join(directory, name), "rb") as corpus_file:
                        pool.append(corpus_file.read())
        return run_random(target, pool, runs, seed)
    # libFuzzer: the seeds go into the first corpus directory (a new one if none is given).
    corpora = [arg for arg in argv[1:] if not arg.startswith("-")]
    if not corpora:
        corpora.append(tempfile.mkdtemp(prefix="xdsfast-fuzz-"))
        argv.append(corpora[0])
    for i, data in enumerate(seeds):
        with open(os.path.join(corpora[0], f"seed{i}"), "wb") as out:
            out.write(data)
    if not any(arg.startswith("-timeout=") for arg in argv):
        argv.append("-timeout=10")  # an input that takes 10 s is a hang
    atheris.Setup(argv, target)
    atheris.Fuzz()
    return 0
