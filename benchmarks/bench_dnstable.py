"""asv: the compiled DNS name table for a 100k-host NameTable (issue 22's scale).

``track_build_seconds``: ``table.build`` from the NameTable's wire bytes (best of 3);
``track_table_mib``: the table's own accounting (``nbytes``); ``peakmem_build``: the
process's peak memory around one build.  ``time_fast_hit``: one local hit.
"""

from __future__ import annotations

import time
from typing import ClassVar

from xdsfast.dns import table as table_module

from .bench_dns import RULES, name_table, query

HOSTS = 100_000


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

    track_build_seconds.unit = "seconds"  # type: ignore[attr-defined]
    track_table_mib.unit = "MiB"  # type: ignore[attr-defined]
