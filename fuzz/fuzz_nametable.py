"""Fuzz the NameTable consume path: ``intercept.consume`` with a ``NameTableInterceptor``.

The first input byte picks the shape: a whole (SotW or delta) response as raw bytes, or
raw bytes as the NameTable inside a well-formed response (so decoding reaches the table and
the DNS answers are built). Nothing may raise; the reply is always a well-formed ACK or
NACK for the NameTable; a NACK leaves the served table alone; an applied table's answers
build without error.

    python fuzz/fuzz_nametable.py -runs=1000000
"""

from __future__ import annotations

import logging
import sys

from _driver import instrumented, main

with instrumented():
    from xdsfast import intercept, nds_pb2, wire, xds_pb2
    from xdsfast.dns.names import NameRules
    from xdsfast.dns.table import DnsTable, build
    from xdsfast.dns.wiretable import WireNameTable
    from xdsfast.engines import Mode

logging.disable(logging.CRITICAL)  # "DNS table applied" per input would dominate

RULES = (
    NameRules(),
    NameRules(namespace="default", search=("default.svc.cluster.local", "svc.cluster.local")),
    NameRules(namespace="ns", domain="ns.svc.example", search=(".", " ", "a..b")),
)


def _response(mode: Mode, value: bytes, type_url: str) -> bytes:
    if mode is Mode.SOTW:
        sotw = xds_pb2.DiscoveryResponse(version_info="1", type_url=intercept.NAME_TABLE)
        sotw.resources.add(type_url=type_url, value=value)
        return sotw.SerializeToString()
    delta = xds_pb2.DeltaDiscoveryResponse(system_version_info="1", type_url=intercept.NAME_TABLE)
    resource = delta.resources.add(name="", version="1")
    resource.resource.type_url = type_url
    resource.resource.value = value
    return delta.SerializeToString()


def test_one_input(data: bytes) -> None:
    if not data:
        return
    shape, body = data[0], data[1:]
    mode = Mode.SOTW if shape & 1 else Mode.DELTA
    if shape & 2:
        message = body  # the whole response, as istiod might (not) send it
    else:
        type_url = intercept.NAME_TABLE if shape & 4 else "type.googleapis.com/x.Other"
        message = _response(mode, body, type_url)
    table = DnsTable(RULES[shape % 3])
    reply, error = intercept.consume(
        intercept.NameTableInterceptor(table), mode, message, "v", "nonce"
    )
    if reply is None:
        assert error is None and table.table is None, (reply, error)
        return
    peek = (wire.peek_request if mode is Mode.SOTW else wire.peek_delta_request)(reply)
    assert peek.type_url == intercept.NAME_TABLE and peek.response_nonce == "nonce"
    assert peek.has_error_detail == (error is not None), (peek, error)
    if error is not None:
        assert table.table is None, "a NACKed table was applied"
        return
    assert table.table is not None and table.answers is not None, "applied but not built"
    kept = table.table  # the relay keeps the NameTable as its wire bytes
    assert isinstance(kept, WireNameTable), type(kept)
    for rules in RULES:  # the build itself must not fail on any table (no loop: inline)
        build(kept.wire, rules)


def seeds() -> list[bytes]:
    name_table = nds_pb2.NameTable()
    name_table.table["backend.default.svc.cluster.local"].CopyFrom(
        nds_pb2.NameTable.NameInfo(
            ips=["10.0.0.1", "2001:db8::1"],
            registry="Kubernetes",
            shortname="backend",
            namespace="default",
        )
    )
    name_table.table["*.wild.example.com"].CopyFrom(
        nds_pb2.NameTable.NameInfo(ips=["240.240.0.1"], registry="External")
    )
    name_table.table["api.example.com"].CopyFrom(
        nds_pb2.NameTable.NameInfo(
            ips=["240.240.0.2"], registry="External", alt_hosts=["api", "api.other"]
        )
    )
    value = name_table.SerializeToString()
    out = [bytes([shape]) + value for shape in (0, 1, 4, 5)]
    out += [bytes([shape]) + _response(Mode.SOTW, value, intercept.NAME_TABLE) for shape in (3,)]
    out += [bytes([shape]) + _response(Mode.DELTA, value, intercept.NAME_TABLE) for shape in (2,)]
    return out


if __name__ == "__main__":
    sys.exit(main(test_one_input, seeds()))
