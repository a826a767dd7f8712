"""What ``xdsfast status`` shows: a running agent's state from its status server, as text or JSON.

One :func:`gather` reads ``/healthz/ready``, ``/debug/xds``, ``/stats/prometheus`` and
``/debug/ndsz`` (the NameTable's host count: no metric holds it), and :func:`render`
turns the snapshot into plain text that fits 100 columns.  Everything shown comes from
another process, so every string is cleaned of control characters before it reaches
the terminal, and every field is type-checked (a wrong or hostile server gives blanks
and notes, never a traceback).
"""

from __future__ import annotations

import datetime
import re
import time
from typing import Any

from xdsfast.agentclient import AgentError, Endpoint, get
from xdsfast.typeurls import NAME_TABLE

WIDTH = 100
MAX_JSON = 16 * 1024 * 1024  # /debug/xds and the metrics are kilobytes; a cap all the same
MAX_NDSZ = 1 << 30  # /debug/ndsz is counted as it streams: ~35 MiB for 200 000 hosts

SHORT_TYPES = {
    "envoy.config.cluster.v3.Cluster": "CDS",
    "envoy.config.endpoint.v3.ClusterLoadAssignment": "EDS",
    "envoy.config.listener.v3.Listener": "LDS",
    "envoy.config.route.v3.RouteConfiguration": "RDS",
    "envoy.config.route.v3.ScopedRouteConfiguration": "SRDS",
    "envoy.config.route.v3.VirtualHost": "VHDS",
    "envoy.config.core.v3.TypedExtensionConfig": "ECDS",
    "envoy.extensions.transport_sockets.tls.v3.Secret": "SDS",
    "envoy.service.runtime.v3.Runtime": "RTDS",
    "istio.networking.nds.v1.NameTable": "NDS",
    "istio.mesh.v1alpha1.ProxyConfig": "PCDS",
}
_ORDER = ["CDS", "EDS", "LDS", "RDS", "SRDS", "VHDS", "ECDS", "SDS", "RTDS", "NDS", "PCDS", "WDS"]

# Counters shown on the summary lines: Prometheus name -> key in the snapshot.
COUNTERS = {
    "istio_agent_xds_proxy_requests": "xds_requests",
    "istio_agent_xds_proxy_responses": "xds_responses",
    "istio_agent_istiod_connection_failures": "istiod_connection_failures",
    "istio_agent_istiod_connection_terminations": "istiod_connection_terminations",
    "istio_agent_envoy_connection_terminations": "envoy_connection_terminations",
    "xdsfast_xds_dropped_responses_total": "dropped_responses",
    "istio_agent_dns_requests_total": "dns_requests",
    "istio_agent_dns_upstream_requests_total": "dns_upstream_requests",
    "istio_agent_dns_upstream_failures_total": "dns_upstream_failures",
}
_SAMPLE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? +(\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?Z")


def short_type(type_url: str) -> str:
    """CDS, EDS, ... for the well-known types; WDS for ``istio.workload.*``; else the
    message's own name (the type URL's last dotted part)."""
    name = type_url.rpartition("/")[2]
    if name in SHORT_TYPES:
        return SHORT_TYPES[name]
    if name.startswith("istio.workload."):
        return "WDS"
    return name.rpartition(".")[2] or name or "?"


def clean(value: object, width: int | None = None) -> str:
    """A string from the agent, safe for a terminal: control characters become ``?``,
    and it is cut to ``width`` with ``...``."""
    text = _UNPRINTABLE.sub("?", value if isinstance(value, str) else str(value))
    if width is not None and len(text) > width:
        text = text[: max(width - 3, 0)] + "..."
    return text


def parse_time(value: object) -> float | None:
    """Unix time of an RFC 3339 UTC timestamp as ``/debug/xds`` writes them; None if not one."""
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction = match.groups()
    try:
        moment = datetime.datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            tzinfo=datetime.timezone.utc,
        )
    except ValueError:
        return None
    return moment.timestamp() + (int(fraction) / 10 ** len(fraction) if fraction else 0.0)


def age(seconds: float) -> str:
    """``12s``, ``3m04s``, ``2h05m``, ``3d04h``."""
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(count: int) -> str:
    """``171 B``, ``1.2 KiB``, ``5.0 MiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def counters(text: str) -> dict[str, Any]:
    """The :data:`COUNTERS` samples of a Prometheus exposition: a number, or per label value."""
    found: dict[str, Any] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line.strip())
        if match is None or match.group(1) not in COUNTERS:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        number: int | float = int(value) if value.is_integer() else value
        key = COUNTERS[match.group(1)]
        labels = _LABEL.findall(match.group(2) or "")
        if labels:
            found.setdefault(key, {})
            if isinstance(found[key], dict):
                found[key][clean(labels[0][1], 40)] = number
        else:
            found[key] = number
    return found


def core_in_use(text: str) -> str | None:
    """``xdsfast_core_info{implementation="..."}``: cython or python."""
    for line in text.splitlines():
        if line.startswith("xdsfast_core_info{"):
            match = re.search(r'implementation="([^"]*)"', line)
            if match:
                return clean(match.group(1), 20)
    return None


class HostCounter:
    """Counts the hosts of a streamed ``/debug/ndsz`` body with bounded memory.

    The status server writes the table indented by two (``name_table_pieces``), so
    each host's key is the only line that starts with exactly four spaces and a
    quote; JSON strings hold no raw newline, so the count is exact."""

    _MARK = b'\n    "'

    def __init__(self) -> None:
        self.hosts = 0
        self._tail = b""

    def __call__(self, chunk: bytes) -> None:
        data = self._tail + chunk
        self.hosts += data.count(self._MARK)
        self._tail = data[-(len(self._MARK) - 1) :]


class NameTableCache:
    """The last host count, by the NDS response it came from: ``--watch`` counts a
    table once, not at every refresh."""

    def __init__(self) -> None:
        self.key: tuple[str, str] | None = None
        self.hosts: int | None = None


def _ask(endpoint: Endpoint, path: str, timeout: float, notes: list[str]) -> bytes | None:
    """The body of a 200 answer; anything else is a note and None."""
    try:
        answer = get(endpoint, path, timeout=timeout, limit=MAX_JSON)
    except AgentError as exc:
        notes.append(str(exc))
        return None
    if answer.status == 403:
        notes.append(f"{path}: 403, the debug endpoints answer loopback clients only")
        return None
    if answer.status != 200:
        notes.append(f"{path}: HTTP {answer.status}")
        return None
    return answer.body


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _type_row(type_url: str, state: dict[str, Any], now: float) -> dict[str, Any]:
    pushed = parse_time(state.get("last_push"))
    error = _dict(state.get("error_detail"))
    return {
        "type": short_type(type_url),
        "type_url": type_url,
        "version": _text(state.get("version")),
        "nonce": _text(state.get("nonce")),
        "ack": state.get("ack") if state.get("ack") in ("ACK", "NACK") else None,
        "ack_nonce": _text(state.get("ack_nonce")),
        "error_detail": {"code": _count(error.get("code")), "message": _text(error.get("message"))}
        if error
        else None,
        "responses": _count(state.get("responses")),
        "bytes": _count(state.get("bytes")),
        "last_push": _text(state.get("last_push")) or None,
        "last_push_age_seconds": None if pushed is None else round(max(now - pushed, 0.0), 3),
    }


def _streams(document: object, now: float) -> list[dict[str, Any]]:
    streams = []
    raw = _dict(document).get("streams")
    for stream in raw if isinstance(raw, list) else []:
        stream = _dict(stream)
        types = _dict(stream.get("types"))
        rows = [_type_row(url, _dict(s), now) for url, s in types.items() if isinstance(url, str)]
        rows.sort(key=lambda r: (_ORDER.index(r["type"]) if r["type"] in _ORDER else 99, r["type"]))
        connected = parse_time(stream.get("connected"))
        streams.append(
            {
                "id": _count(stream.get("id")),
                "mode": _text(stream.get("mode")),
                "peer": _text(stream.get("peer")),
                "connected": _text(stream.get("connected")) or None,
                "connected_seconds": None if connected is None else round(now - connected, 3),
                "types": rows,
            }
        )
    return streams


def gather(
    endpoint: Endpoint, *, timeout: float, cache: NameTableCache | None = None
) -> dict[str, Any]:
    """A snapshot of the agent at ``endpoint`` (the JSON of ``xdsfast status --json``).

    Raises :class:`AgentError` only when the agent cannot be reached at all; a part
    that cannot be read is left empty and said in ``notes``."""
    import orjson

    notes: list[str] = []
    ready = get(endpoint, "/healthz/ready", timeout=timeout, limit=64 * 1024)
    reason = _first_line(ready.body)
    snapshot: dict[str, Any] = {
        "agent": endpoint.url,
        "ready": ready.status == 200,
        "readiness": reason or f"HTTP {ready.status}",
        "core": None,
        "name_table": None,
        "streams": [],
        "counters": {},
        "notes": notes,
    }
    now = time.time()
    body = _ask(endpoint, "/debug/xds", timeout, notes)
    nds: dict[str, Any] | None = None
    if body is not None:
        try:
            snapshot["streams"] = _streams(orjson.loads(body), now)
        except orjson.JSONDecodeError as exc:
            notes.append(f"/debug/xds: not JSON ({clean(exc, 60)})")
        for stream in snapshot["streams"]:
            for row in stream["types"]:
                if row["type_url"] == NAME_TABLE:
                    nds = row
    metrics = _ask(endpoint, "/stats/prometheus", timeout, notes)
    if metrics is not None:
        text = metrics.decode("utf-8", "replace")
        snapshot["core"] = core_in_use(text)
        snapshot["counters"] = counters(text)
    if body is not None:
        snapshot["name_table"] = _name_table(endpoint, timeout, nds, cache, notes)
    return snapshot


def _first_line(body: bytes) -> str:
    lines = body.decode("utf-8", "replace").strip().splitlines()
    return clean(lines[0], 200) if lines else ""


def _name_table(
    endpoint: Endpoint,
    timeout: float,
    nds: dict[str, Any] | None,
    cache: NameTableCache | None,
    notes: list[str],
) -> dict[str, Any] | None:
    """``{"hosts": N, "version": V}`` of the agent's NameTable; None while it has none."""
    version = None if nds is None else nds["version"]
    key = None if nds is None else (nds["version"], nds["nonce"])
    if cache is not None and key is not None and cache.key == key and cache.hosts is not None:
        return {"hosts": cache.hosts, "version": version}
    counter = HostCounter()
    try:
        answer = get(endpoint, "/debug/ndsz", timeout=timeout, limit=MAX_NDSZ, consume=counter)
    except AgentError as exc:
        notes.append(str(exc))
        return None
    if answer.status == 404:
        return None
    if answer.status != 200:
        notes.append(f"/debug/ndsz: HTTP {answer.status}")
        return None
    if cache is not None:
        cache.key, cache.hosts = key, counter.hosts
    return {"hosts": counter.hosts, "version": version}


# -- text ----------------------------------------------------------------------------------

_COLUMNS = "  {:<5} {:<22} {:<16} {:<7} {:>9} {:>10}  {}"


def render(snapshot: dict[str, Any]) -> str:
    """The snapshot as plain text, no line over :data:`WIDTH` columns."""
    s = snapshot
    core = f" (core: {s['core']})" if s.get("core") else ""
    lines = [f"xdsfast agent at {clean(s['agent'], 60)}{core}"]
    if s["ready"]:
        lines.append("ready      yes")
    else:
        reason = clean(s["readiness"]).removeprefix("not ready: ")
        lines.append(clean(f"ready      no: {reason}", WIDTH))
    table = s.get("name_table")
    if table is not None:
        version = f" (NDS version {clean(table['version'], 30)})" if table.get("version") else ""
        lines.append(f"NameTable  {table['hosts']} hosts{version}")
    elif not any("debug" in n or "ndsz" in n or "xds" in n for n in s["notes"]):
        lines.append("NameTable  none received (DNS off, or istiod has not sent one yet)")
    lines += _counter_lines(s.get("counters") or {})
    if not s["streams"] and not any("/debug/xds" in n for n in s["notes"]):
        lines.append("streams    no Envoy stream is connected")
    for stream in s["streams"]:
        lines.append("")
        lines += _stream_lines(stream)
    for note in s["notes"]:
        lines.append(clean(f"note       {note}", WIDTH))
    return "\n".join(lines) + "\n"


def _counter_lines(c: dict[str, Any]) -> list[str]:
    """Totals since the agent started, from its metrics."""
    lines = []
    if "xds_requests" in c or "xds_responses" in c:
        parts = [
            f"requests to istiod {c.get('xds_requests', 0)}",
            f"responses {c.get('xds_responses', 0)}",
            f"failed connections {c.get('istiod_connection_failures', 0)}",
        ]
        ended = _by_label(c.get("istiod_connection_terminations"))
        if ended:
            parts.append(f"istiod streams ended: {ended}")
        dropped = _by_label(c.get("dropped_responses"))
        if dropped:
            parts.append(f"dropped: {dropped}")
        lines.append(clean("xds        " + ", ".join(parts), WIDTH))
    if "dns_requests" in c:
        parts = [
            f"queries {c['dns_requests']}",
            f"forwarded {c.get('dns_upstream_requests', 0)}",
            f"no upstream answer {c.get('dns_upstream_failures', 0)}",
        ]
        lines.append(clean("dns        " + ", ".join(parts), WIDTH))
    return lines


def _by_label(value: object) -> str:
    if not isinstance(value, dict):
        return ""
    return ", ".join(f"{k} {v}" for k, v in sorted(value.items()))


def _stream_lines(stream: dict[str, Any]) -> list[str]:
    mode = {"sotw": "state-of-the-world", "delta": "delta"}.get(stream["mode"], stream["mode"])
    since = ""
    if stream["connected_seconds"] is not None:
        since = f", connected {age(stream['connected_seconds'])} ago"
    head = f"stream {stream['id']} ({clean(mode, 20)} ADS) from {clean(stream['peer'], 40)}{since}"
    lines = [clean(head, WIDTH)]
    if not stream["types"]:
        lines.append("  no responses yet")
        return lines
    lines.append(
        _COLUMNS.format("TYPE", "VERSION", "NONCE", "STATE", "RESPONSES", "BYTES", "LAST PUSH")
    )
    for row in stream["types"]:
        pushed = row["last_push_age_seconds"]
        lines.append(
            _COLUMNS.format(
                clean(row["type"], 5),
                clean(row["version"], 22) or "-",
                clean(row["nonce"], 16) or "-",
                _state(row),
                row["responses"],
                size(row["bytes"]),
                "-" if pushed is None else f"{age(pushed)} ago",
            ).rstrip()
        )
        error = row["error_detail"]
        if error is not None:
            which = "NACK" if row["ack"] == "NACK" else "last NACK"
            message = clean(" ".join(error["message"].split()))
            lines.append(clean(f"        {which} (code {error['code']}): {message}", WIDTH))
    return lines


def _state(row: dict[str, Any]) -> str:
    """ACK or NACK of the last response; ``waiting`` when Envoy has not answered it yet."""
    if not row["responses"]:
        return "-"
    if row["ack"] is None or (row["nonce"] and row["ack_nonce"] != row["nonce"]):
        return "waiting"
    return str(row["ack"])
