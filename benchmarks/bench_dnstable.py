"""The compiled DNS name table for a 100k-host NameTable (issue 22's scale).

asv: ``track_build_seconds``: ``table.build`` from the NameTable's wire bytes (best of
3); ``track_table_mib``: the table's own accounting (``nbytes``); ``peakmem_build``: the
process's peak memory around one build; ``time_fast_hit``: one local hit;
``track_burst_*``: a burst of pushes applied to a ``DnsTable`` on uvloop (see
:func:`burst`).  ``python benchmarks/bench_dnstable.py`` prints the burst figures:

    python benchmarks/bench_dnstable.py [--hosts N] [--pushes N] [--gap-ms MS]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any, ClassVar

import uvloop

from xdsfast.dns import table as table_module
from xdsfast.dns.table import DnsTable

try:  # asv imports this file as benchmarks.bench_dnstable; a script run has no package
    from .bench_dns import RULES, name_table, query
except ImportError:
    from bench_dns import RULES, name_table, query  # type: ignore[import-not-found,no-redef]

HOSTS = 100_000
PUSHES = 4


class _Counting(DnsTable):
    """A ``DnsTable`` that counts the tables it serves."""

    swaps = 0

    def _finish(self, *args: Any) -> None:
        before = self.answers
        super()._finish(*args)
        self.swaps += self.answers is not before


def burst(wire: bytes, pushes: int = PUSHES, gap: float = 0.0) -> dict[str, float]:
    """``pushes`` NameTables (the same bytes, versions 1..pushes) given to a ``DnsTable``
    ``gap`` seconds apart (0: back to back, as one loop turn), as the relay applies them.

    Returns ``last_s``, the seconds from the first push until the last one is served;
    ``cpu_s``, the process's CPU time meanwhile (builds included, whatever their thread);
    ``swaps``, how many tables were served on the way (the last one included) and
    ``superseded``, builds stopped early because a newer table arrived (0 where the
    table has no such count)."""

    async def run() -> dict[str, float]:
        table = _Counting(RULES)
        cpu = time.process_time()
        start = time.perf_counter()
        for k in range(1, pushes + 1):
            table.update(wire, str(k))
            if gap and k < pushes:
                await asyncio.sleep(gap)
        await table.wait_updates(pushes, timeout=600)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
        assert table.answers_version == str(pushes)
        table.close()
        return {
            "last_s": seconds,
            "cpu_s": cpu,
            "swaps": table.swaps,
            "superseded": float(getattr(table, "superseded", 0)),
        }

    return uvloop.run(run())


class BigTable:
    params: ClassVar = [HOSTS]
    param_names: ClassVar = ["hosts"]
    timeout = 600

    def setup(self, hosts: int) -> None:
        self.wire = name_table(hosts).SerializeToString()
        self.built = table_module.build(self.wire, RULES)
        self.hit = query("svc-00001.ns-01.svc.cluster.local.", 1)

    def track_build_seconds(self, hosts: int) -> float:
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            table_module.build(self.wire, RULES)
            best = min(best, time.perf_counter() - start)
        return best

    def track_table_mib(self, hosts: int) -> float:
        return float(self.built.nbytes) / 2**20

    def peakmem_build(self, hosts: int) -> None:
        table_module.build(self.wire, RULES)

    def time_fast_hit(self, hosts: int) -> None:
        self.built.fast(self.hit)

    def track_burst_seconds(self, hosts: int) -> float:
        """Four pushes back to back: seconds until the last is served."""
        return burst(self.wire)["last_s"]

    def track_burst_cpu_seconds(self, hosts: int) -> float:
        """Four pushes back to back: the process's CPU seconds until the last is served."""
        return burst(self.wire)["cpu_s"]

    track_build_seconds.unit = "seconds"  # type: ignore[attr-defined]
    track_table_mib.unit = "MiB"  # type: ignore[attr-defined]
    track_burst_seconds.unit = "seconds"  # type: ignore[attr-defined]
    track_burst_cpu_seconds.unit = "seconds"  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=HOSTS, help="NameTable hosts")
    parser.add_argument("--pushes", type=int, default=PUSHES, help="pushes per burst")
    parser.add_argument(
        "--gap-ms", type=float, default=50.0, help="the spaced burst's gap between pushes"
    )
    args = parser.parse_args()
    wire = name_table(args.hosts).SerializeToString()
    one = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        table_module.build(wire, RULES)
        one = min(one, time.perf_counter() - start)
    print(
        f"{args.hosts:,} hosts, {table_module.IMPLEMENTATION} table; "
        f"one build {one * 1000:.0f} ms (best of 3)"
    )
    for label, gap in (("back to back", 0.0), (f"{args.gap_ms:g} ms apart", args.gap_ms / 1000)):
        r = burst(wire, args.pushes, gap)
        print(
            f"  {args.pushes} pushes {label}: last served after {r['last_s'] * 1000:.0f} ms "
            f"({r['last_s'] / one:.2f} builds), CPU {r['cpu_s'] * 1000:.0f} ms "
            f"({r['cpu_s'] / one:.2f} builds); {r['swaps']:.0f} tables served, "
            f"{r['superseded']:.0f} builds superseded"
        )


if __name__ == "__main__":
    main()
