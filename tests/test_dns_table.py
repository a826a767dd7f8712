"""The DNS proxy's pieces on their own: naming rules, the compiled table's answers, the
table's build-and-swap, truncation, resolv.conf and the listen plan."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import dns.flags
import dns.message
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest
from twins import Cores

from xdsfast import _dnstable_py, _ext, nds_pb2
from xdsfast.dns import proxy, resolvconf
from xdsfast.dns import table as table_module
from xdsfast.dns.forward import Forwarder
from xdsfast.dns.handler import Handler
from xdsfast.dns.metrics import DnsMetrics, register_table_builds
from xdsfast.dns.names import CANCEL_EVERY, Cancelled, NameRules, build_lookup, entry_names
from xdsfast.dns.table import A_IN, AAAA_IN, ROTATIONS, CompiledTable, DnsTable
from xdsfast.dns.wire import TC, encode_name, truncate
from xdsfast.metrics import Metrics

Info = nds_pb2.NameTable.NameInfo
RULES = NameRules("default", "", ("default.svc.cluster.local", "svc.cluster.local"))


def k8s(short: str, ns: str, *ips: str, alt: tuple[str, ...] = ()) -> Info:
    return Info(ips=list(ips), registry="Kubernetes", shortname=short, namespace=ns,
                alt_hosts=list(alt))  # fmt: skip


def table_of(entries: dict[str, Info]) -> nds_pb2.NameTable:
    table = nds_pb2.NameTable()
    for host, info in entries.items():
        table.table[host].CopyFrom(info)
    return table


# -- naming rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("namespace", "domain", "expected"),
    [
        ("default", "", "svc.cluster.local"),  # <ns>.svc.cluster.local, namespace stripped
        ("default", "default.svc.corp", "svc.corp"),
        ("default", "svc.corp", "svc.corp"),  # no leading namespace label: kept whole
        ("", "", "svc.cluster.local"),
    ],
)
def test_proxy_domain(namespace: str, domain: str, expected: str) -> None:
    assert NameRules(namespace, domain).proxy_domain == expected


def test_kubernetes_names_in_the_proxys_namespace() -> None:
    names = entry_names("Backend.default.svc.cluster.local", k8s("backend", "default"), RULES)
    assert names == [
        "backend.default.svc.cluster.local.",
        "backend.default.",
        "backend.",
        "backend.default.svc.",
    ]


def test_kubernetes_names_in_another_namespace_have_no_short_name() -> None:
    names = entry_names("db.other.svc.cluster.local", k8s("db", "other", alt=("db-x.io",)), RULES)
    assert names == ["db.other.svc.cluster.local.", "db.other.", "db.other.svc.", "db-x.io."]


def test_kubernetes_names_outside_the_proxy_domain_are_the_fqdn_only() -> None:
    info = k8s("r", "ns2", alt=("r-alias.io",))
    assert entry_names("r.ns2.svc.cluster.remote", info, RULES) == ["r.ns2.svc.cluster.remote."]
    assert entry_names("r.ns2.svc.cluster.local.", info, RULES) == []  # ends in ".": none


def test_other_registries_get_the_hostname_with_a_dot() -> None:
    info = Info(registry="External", shortname="x", namespace="default")
    assert entry_names("API.example.com", info, RULES) == ["api.example.com."]
    assert entry_names("api.example.com.", info, RULES) == ["api.example.com."]


def test_lookup_splits_families_and_skips_unparseable_entries() -> None:
    lookup = build_lookup(
        table_of({
            "a.example": Info(ips=["10.0.0.1", "2001:db8::1", "nonsense"], registry="External"),
            "b.example": Info(ips=["nonsense"], registry="External"),
        }).table,
        RULES,
    )  # fmt: skip
    assert set(lookup.addresses) == {"a.example."}
    entry = lookup.addresses["a.example."]
    assert len(entry.v4) == 1 and len(entry.v4[0]) == 4
    assert len(entry.v6) == 1 and len(entry.v6[0]) == 16


def test_an_entrys_own_hostname_wins_over_a_derived_name() -> None:
    lookup = build_lookup(
        table_of({
            "backend.default.svc.cluster.local": k8s("backend", "default", "10.0.0.1"),
            "backend": Info(ips=["10.9.9.9"], registry="External"),
        }).table,
        RULES,
    )  # fmt: skip
    assert lookup.addresses["backend."].v4 == (bytes([10, 9, 9, 9]),)
    assert lookup.addresses["backend.default."].v4 == (bytes([10, 0, 0, 1]),)


def test_search_domain_cnames() -> None:
    lookup = build_lookup(
        table_of({
            "backend.default.svc.cluster.local": k8s("backend", "default", "10.0.0.1"),
            "db.other.svc.cluster.local": k8s("db", "other", "10.0.1.1"),
        }).table,
        RULES,
    )  # fmt: skip
    s = "default.svc.cluster.local."
    assert lookup.cnames == {
        f"backend.default.{s}": "backend.default.",
        f"backend.default.svc.{s}": "backend.default.svc.",
        f"db.other.svc.cluster.local.{s}": "db.other.svc.cluster.local.",
        f"db.other.{s}": "db.other.",
        f"db.other.svc.{s}": "db.other.svc.",
    }  # not for names ending in the search domain, nor "backend." (its own FQDN)
    assert build_lookup(table_of({}).table, NameRules("default")).cnames == {}


def test_answers_cover_every_name_and_both_families() -> None:
    lookup = build_lookup(
        table_of({
            "backend.default.svc.cluster.local": k8s("backend", "default", "10.0.0.1"),
            ("x" * 64) + ".example": Info(ips=["10.0.0.2"], registry="External"),
        }).table,
        RULES,
    )  # fmt: skip
    answers = table_module.build(
        table_of({
            "backend.default.svc.cluster.local": k8s("backend", "default", "10.0.0.1"),
            ("x" * 64) + ".example": Info(ips=["10.0.0.2"], registry="External"),
        }),
        RULES,
    )  # fmt: skip
    bad = ("x" * 64) + ".example."  # a label over 63 bytes is no DNS name
    names = set(lookup.addresses) | {n for n, target in lookup.cnames.items() if target != bad}
    names.discard(bad)
    wires = {encode_name(n) for n in names}
    assert None not in wires
    assert set(answers) == {w + t for w in wires if w for t in (A_IN, AAAA_IN)}


def test_round_robin_rotations() -> None:
    ips = [f"10.0.0.{i}" for i in range(1, 4)]
    many = [f"10.1.0.{i}" for i in range(1, 21)]
    answers = table_module.build(
        table_of({
            "three.example": Info(ips=ips, registry="External"),
            "many.example": Info(ips=many, registry="External"),
        }),
        RULES,
    )  # fmt: skip
    three = answers.sections(b"\x05three\x07example\x00", 1)
    assert three is not None and len(set(three)) == 3
    twenty = answers.sections(b"\x04many\x07example\x00", 1)
    assert twenty is not None and len(set(twenty)) == ROTATIONS
    firsts = {section[12:16] for section in twenty}  # the first record's address
    assert len(firsts) == ROTATIONS


# -- the table: build off the loop, swap whole --------------------------------------------------


def test_update_without_an_event_loop_builds_at_once() -> None:
    t = DnsTable(RULES)
    assert not t.ready
    t.update(table_of({"a.example": Info(ips=["10.0.0.1"], registry="External")}), "1")
    assert t.ready and t.answers_version == "1" and t.updates == 1
    assert t.hosts() == {"a.example": ["10.0.0.1"]}


def test_fields_protobuf_keeps_as_unknown_do_not_stop_the_build() -> None:
    """Top-level fields protobuf keeps as unknown (a field a newer istiod may add; field 1
    with a wire type that is not the map's) are left to protobuf by the compiled parser,
    and dropped for the build: the table is served.  The fuzz harness found the build
    failing on them, so DNS never answered from such a table."""
    table = table_of({"a.example": Info(ips=["10.0.0.1"], registry="External")})
    wire = table.SerializeToString() + b"\x30\x01" + b"\x08\x05"  # field 6 = 1; field 1 = 5
    assert nds_pb2.NameTable.FromString(wire).table["a.example"].ips == ["10.0.0.1"]
    t = DnsTable(RULES)
    t.update(wire, "1")
    assert t.ready and t.answers is not None and t.answers.hosts == 1


async def test_tables_arriving_during_a_build_are_coalesced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    built: list[str] = []
    gate = threading.Event()
    real = table_module.build

    def slow_build(
        table: nds_pb2.NameTable | bytes, rules: NameRules, cancel: bytearray | None = None
    ) -> CompiledTable:
        gate.wait(30)
        assert isinstance(table, nds_pb2.NameTable)
        built.append(next(iter(table.table)))
        return real(table, rules)  # the flag ignored: finished, so served (then the latest)

    monkeypatch.setattr(table_module, "build", slow_build)
    t = DnsTable(NameRules("default"))
    for i in range(3):
        t.update(table_of({f"h{i}.example": Info(ips=["10.0.0.1"], registry="External")}), f"{i}")
    assert t.version == "2" and t.updates == 3 and not t.ready
    gate.set()
    await t.wait_updates(3)
    assert built == ["h0.example", "h2.example"]  # the first, then only the latest
    assert t.answers_version == "2"
    assert t.answers is not None and set(t.answers) == {
        b"\x02h2\x07example\x00" + A_IN,
        b"\x02h2\x07example\x00" + AAAA_IN,
    }
    t.close()


async def test_a_failing_build_keeps_the_previous_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = DnsTable(RULES)
    t.update(table_of({"a.example": Info(ips=["10.0.0.1"], registry="External")}), "1")
    await t.wait_updates(1)
    before = t.answers

    def broken(*args: Any) -> CompiledTable:
        raise RuntimeError("bug")

    monkeypatch.setattr(table_module, "build", broken)
    t.update(table_of({"b.example": Info(ips=["10.0.0.2"], registry="External")}), "2")
    await t.wait_updates(2)
    assert t.answers is before and t.answers_version == "1"
    t.close()


async def test_configure_rebuilds_with_the_new_search_domain() -> None:
    t = DnsTable(NameRules("default"))
    t.update(table_of({"db.other.svc.cluster.local": k8s("db", "other", "10.0.1.1")}), "1")
    await t.wait_updates(1)
    key = encode_name("db.other.default.svc.cluster.local.")
    assert key is not None and t.answers is not None and key + A_IN not in t.answers
    t.configure(RULES)
    await t.wait_updates(1)
    assert t.answers is not None and key + A_IN in t.answers
    t.close()


def test_table_gauges_report_the_served_table() -> None:
    """hosts, names and bytes of the compiled table, read when scraped; zeros before one."""
    from xdsfast.dns.metrics import register_table_gauges

    metrics = Metrics()
    t = DnsTable(RULES)
    register_table_gauges(metrics, t.stats)
    assert metrics.sample("xdsfast_dns_table_names", None) == 0
    t.update(table_of({"backend.default.svc.cluster.local": k8s("backend", "default",
                                                                "10.0.0.1")}), "1")  # fmt: skip
    assert t.answers is not None
    assert metrics.sample("xdsfast_dns_table_hosts", None) == 1
    assert metrics.sample("xdsfast_dns_table_names", None) == t.answers.names == 6
    assert metrics.sample("xdsfast_dns_table_bytes", None) == t.answers.nbytes > 0
    assert b"# TYPE xdsfast_dns_table_bytes gauge" in metrics.exposition()


# -- superseded builds stop early ---------------------------------------------------------------


def services(hosts: int, extra: str = "") -> bytes:
    """The wire bytes of ``hosts`` Kubernetes services in 10 namespaces (and ``extra``)."""
    entries = {f"s{i}.n{i % 10}.svc.cluster.local": k8s(f"s{i}", f"n{i % 10}", "10.1.0.1")
               for i in range(hosts)}  # fmt: skip
    if extra:
        entries[extra] = Info(ips=["10.2.0.1"], registry="External")
    return table_of(entries).SerializeToString()


def test_a_set_cancel_flag_stops_the_build(twins: Cores) -> None:
    wire = services(3 * CANCEL_EVERY)
    assert twins.dnstable.build(wire, RULES, bytearray(b"\x01")) is None
    built = twins.dnstable.build(wire, RULES, bytearray(1))
    assert built is not None and built.hosts == 3 * CANCEL_EVERY
    with pytest.raises(Cancelled):
        table_module.build(wire, RULES, bytearray(b"\x01"))


def test_the_twin_looks_at_the_flag_every_1024_hosts() -> None:
    """Set midway through the hosts (by the rules, which the build reads once per
    Kubernetes entry), the flag stops the twin's build at its next look: bounded work,
    not the rest of the table."""
    cancel = bytearray(1)

    class SettingRules:  # the 1500th read of proxy_domain sets the flag
        namespace = "n0"
        search_suffix = "n0.svc.cluster.local."
        reads = 0

        @property
        def proxy_domain(self) -> str:
            self.reads += 1
            if self.reads == 1500:
                cancel[0] = 1
            return "svc.cluster.local"

    rules = SettingRules()
    assert _dnstable_py.build(services(10 * CANCEL_EVERY), rules, cancel) is None
    assert rules.reads == 2 * CANCEL_EVERY  # the look at host 2048 saw it: 8k hosts skipped


class GatedBuilds:
    """Hold the first build of the core serving ``dns.table`` until ``gate`` is set;
    ``finished`` gets, per build, whether it built a table (False: it stopped, its flag
    set); ``returned`` is set when a build returns."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.gate = threading.Event()
        self.returned = threading.Event()
        self.finished: list[bool] = []
        core = _ext.load("_dnstable")  # the module table.build calls
        self.real = core.build
        monkeypatch.setattr(core, "build", self.build)

    def build(self, wire: bytes, rules: Any, cancel: bytearray | None = None) -> Any:
        if not self.finished:
            assert self.gate.wait(30)
        built = self.real(wire, rules, cancel)
        self.finished.append(built is not None)
        self.returned.set()
        return built


async def test_a_newer_table_stops_the_running_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of pushes costs one full build: the running build is told to stop when a
    newer table arrives (nothing of it is served; it is counted), the latest is built."""
    builds = GatedBuilds(monkeypatch)
    metrics = Metrics()
    t = DnsTable(RULES)
    register_table_builds(metrics, lambda: t.superseded)
    for k in (1, 2, 3):
        t.update(services(2 * CANCEL_EVERY, extra=f"push{k}.example"), str(k))
    builds.gate.set()  # the first build starts now, its flag already set by push 2
    await t.wait_updates(3)
    assert builds.finished == [False, True]  # one stopped, one full build (push 2 was never built)
    assert t.superseded == 1
    assert metrics.sample("xdsfast_dns_table_builds_superseded_total", None) == 1
    assert t.answers_version == "3" and t.answers is not None
    assert t.answers.hosts == 2 * CANCEL_EVERY + 1
    assert b"\x05push3\x07example\x00" + A_IN in t.answers
    assert b"\x05push1\x07example\x00" + A_IN not in t.answers
    t.close()


async def test_new_rules_stop_the_running_build(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = GatedBuilds(monkeypatch)
    t = DnsTable(NameRules("default"))
    t.update(table_of({"db.other.svc.cluster.local": k8s("db", "other", "10.0.1.1")}), "1")
    t.configure(RULES)
    builds.gate.set()
    await t.wait_updates(1)
    assert builds.finished == [False, True] and t.superseded == 1
    key = encode_name("db.other.default.svc.cluster.local.")  # the new search domain's CNAME
    assert key is not None and t.answers is not None and key + A_IN in t.answers
    t.close()


async def test_close_stops_the_running_build(monkeypatch: pytest.MonkeyPatch) -> None:
    builds = GatedBuilds(monkeypatch)
    t = DnsTable(RULES)
    t.update(services(2 * CANCEL_EVERY), "1")
    t.close()
    builds.gate.set()
    assert await asyncio.to_thread(builds.returned.wait, 30)
    assert builds.finished == [False] and not t.ready


# -- the handler, straight on bytes -------------------------------------------------------------


def test_fast_path_reply() -> None:
    t = DnsTable(RULES)
    t.update(table_of({"a.example": Info(ips=["10.0.0.1"], registry="External")}), "1")
    h = Handler(t, DnsMetrics(Metrics()))
    q = dns.message.make_query("A.Example.", "A")
    q.flags |= dns.flags.CD
    reply = h.fast(q.to_wire())
    assert reply is not None
    msg = dns.message.from_wire(reply)
    assert msg.id == q.id and msg.flags & dns.flags.CD and msg.flags & dns.flags.AA
    assert msg.question[0].name.to_text() == "A.Example."
    assert msg.answer[0][0].to_text() == "10.0.0.1"
    assert h.fast(dns.message.make_query("a.example.", "TXT").to_wire()) is None
    assert h.fast(dns.message.make_query("b.example.", "A").to_wire()) is None
    assert h.fast(b"\x00" * 11) is None


# -- wire helpers ---------------------------------------------------------------------------------


def test_truncate_keeps_whole_records_and_the_opt_record() -> None:
    q = dns.message.make_query("big.example.", "A", use_edns=0)
    r = dns.message.make_response(q)
    a, inet = dns.rdatatype.A, dns.rdataclass.IN
    rrset = r.find_rrset(r.answer, q.question[0].name, inet, a, create=True)
    for i in range(100):
        rrset.add(dns.rdata.from_text(inet, a, f"198.51.100.{i}"), ttl=60)
    wire = r.to_wire(max_size=65535)
    assert len(wire) > 512
    cut = truncate(wire, 512)
    assert len(cut) <= 512 and cut[2:4] != wire[2:4]
    msg = dns.message.from_wire(cut)
    assert msg.flags & TC and msg.edns == 0  # the OPT record survives the cut
    assert 0 < len(msg.answer[0]) < 100
    assert truncate(wire, len(wire)) == wire
    garbage = wire[:12] + b"\xff" * 600
    header_only = dns.message.from_wire(truncate(garbage, 512))
    assert header_only.flags & TC and not header_only.question


def test_encode_name() -> None:
    assert encode_name("a.b.") == b"\x01a\x01b\x00"
    assert encode_name(".") == b"\x00"
    for bad in ("a.b", "a..b.", "é.x.", "x" * 64 + ".", ("x" * 60 + ".") * 5):
        assert encode_name(bad) is None


# -- resolv.conf and the listen plan ------------------------------------------------------------


def test_resolv_conf_parsing() -> None:
    conf = resolvconf.parse(
        "# comment\nnameserver 10.0.0.10\nnameserver fd00::10 ; x\nnameserver dns.example\n"
        "domain old.example\nsearch default.svc.cluster.local svc.cluster.local\n"
        "options ndots:5\n"
    )
    assert conf.nameservers == ("10.0.0.10", "fd00::10")
    assert conf.search == ("default.svc.cluster.local", "svc.cluster.local")
    assert conf.upstreams == (("10.0.0.10", 53), ("fd00::10", 53))
    assert resolvconf.parse("search a b\ndomain c\n").search == ("c",)


@pytest.mark.parametrize(
    ("nameservers", "hosts"),
    [
        (("10.0.0.10",), ["127.0.0.1"]),
        (("fd00::10",), ["::1"]),
        (("10.0.0.10", "fd00::10"), ["127.0.0.1", "::1"]),
        ((), ["127.0.0.1"]),
    ],
)
def test_localhost_follows_the_nameserver_families(
    nameservers: tuple[str, ...], hosts: list[str]
) -> None:
    conf = resolvconf.ResolvConf(nameservers)
    assert proxy.listen_hosts("localhost", conf) == hosts
    assert proxy.listen_hosts("0.0.0.0", conf) == ["0.0.0.0"]


def test_port_53_mode() -> None:
    assert proxy.port53_mode("localhost:15053", 0) == ("localhost:15053", False)
    assert proxy.port53_mode("0.0.0.0:53", 0) == ("0.0.0.0:53", True)
    assert proxy.port53_mode("0.0.0.0:53", 1337) == ("localhost:15053", False)
    assert proxy.resolv_conf_path("/etc/resolv.conf", False) == "/etc/resolv.conf"
    assert proxy.resolv_conf_path("/tmp/other.conf", True) == "/tmp/other.conf"


async def test_parallel_forwarder_with_no_answer_returns_none() -> None:
    metrics = DnsMetrics(Metrics())
    forwarder = Forwarder([("127.0.0.1", 9), ("127.0.0.1", 9)], metrics, parallel=True)
    query = dns.message.make_query("x.example.", "A").to_wire()
    for tcp in (False, True):
        assert await asyncio.wait_for(forwarder.forward(query, tcp), 30) is None
    assert metrics.upstream_requests == 2 and metrics.upstream_failures == 2


def test_rdatatype_constants_match() -> None:
    assert A_IN[:2] == dns.rdatatype.A.to_bytes(2, "big")
    assert AAAA_IN[:2] == dns.rdatatype.AAAA.to_bytes(2, "big")
