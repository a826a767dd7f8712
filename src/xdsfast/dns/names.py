"""Istio's rules for the names a NameTable answers to, as a plain lookup model.

For each entry of the NameTable: its IPs split into IPv4 and IPv6 (an entry
with no parseable IP is skipped), and the names it answers to:

* registry ``Kubernetes``: the hostname with a trailing dot; and, when the
  hostname ends with the proxy's domain (a plain string suffix, as Istio),
  ``short.ns.``, ``short.`` (only in the proxy's own namespace),
  ``short.ns.<first label of the domain>.`` (``.svc.``) and every ``alt_hosts``
  entry.  A hostname that already ends in "." gives no names at all.
* any other registry: only the hostname (a trailing dot added if missing).

Then the first resolv.conf search domain ``S`` adds, for every such name ``h``
not already ending in ``S.``, a CNAME ``h + S.`` -> ``h`` (unless that name is
one of the entry's own names), which is how ``curl backend`` still hits the
table when the resolver appended the search domain first.

Names are lowercased (ASCII only: a name with any other character is no DNS
name and never answers).  A name ending in ``..`` stands for the name with one
dot less (``alt_hosts`` entry ``x.`` is ``x.``, as Istio's ``dns.Fqdn``), so each
DNS name has one spelling.  When two entries claim the same name, an entry's own
hostname wins over a derived name, and otherwise the entry whose hostname
sorts first wins; a name with addresses never becomes a CNAME, and the root
name ``.`` (an empty hostname) gets no search-domain CNAME.

``xdsfast._dnstable`` compiles the same rules straight from the NameTable's
wire bytes; this module is the reference its pure-Python twin is built on.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # protobuf loads with the first table, not at start
    from xdsfast.nds_pb2 import NameTable

    NameInfo = NameTable.NameInfo

KUBERNETES = "Kubernetes"
CANCEL_EVERY = 1024  # hosts between two looks at a build's cancel flag


class Cancelled(Exception):
    """A build stopped early: its cancel flag was set (a newer table supersedes it)."""


@dataclass(frozen=True)
class NameRules:
    """The proxy's side of the rules: its namespace, domain and resolv.conf search list."""

    namespace: str = ""  # POD_NAMESPACE
    domain: str = ""  # --domain; empty means "<namespace>.svc.cluster.local", as Istio
    search: tuple[str, ...] = ()

    @property
    def proxy_domain(self) -> str:
        """The domain without a leading label equal to the namespace (``svc.cluster.local``)."""
        labels = (self.domain or f"{self.namespace}.svc.cluster.local").split(".")
        if labels and labels[0] == self.namespace:
            labels = labels[1:]
        return ".".join(labels)

    @property
    def search_suffix(self) -> str:
        """The first search domain as ``default.svc.cluster.local.``; empty if none."""
        for domain in self.search[:1]:
            domain = domain.strip().rstrip(".").lower()
            if domain:
                return domain + "."
        return ""


class Addresses(NamedTuple):
    """One entry's addresses, packed (4 or 16 bytes each), in the table's order."""

    v4: tuple[bytes, ...]
    v6: tuple[bytes, ...]


@dataclass
class Lookup:
    """Every name the table answers to: addresses, or a CNAME to such a name."""

    addresses: dict[str, Addresses] = field(default_factory=dict)
    cnames: dict[str, str] = field(default_factory=dict)  # name + suffix -> name
    suffix: str = ""  # the first search domain, ``default.svc.cluster.local.``

    def names(self) -> set[str]:
        return set(self.addresses) | set(self.cnames)


def split_ips(ips: Sequence[str]) -> Addresses | None:
    """IPv4 and IPv6 literals, packed; unparseable ones dropped; None if none parse."""
    v4: list[bytes] = []
    v6: list[bytes] = []
    for ip in ips:
        try:
            v4.append(socket.inet_pton(socket.AF_INET, ip))
            continue
        except (OSError, ValueError):  # ValueError: a NUL inside the string
            pass
        try:
            v6.append(socket.inet_pton(socket.AF_INET6, ip))
        except (OSError, ValueError):
            continue
    if not v4 and not v6:
        return None
    return Addresses(tuple(v4), tuple(v6))


def entry_names(hostname: str, info: NameInfo, rules: NameRules) -> list[str]:
    """The names (lowercase, trailing dot) one NameTable entry answers to; own name first."""
    if info.registry != KUBERNETES:
        name = hostname if hostname.endswith(".") else hostname + "."
        return [canonical(name)]
    if hostname.endswith("."):
        return []
    names = [hostname + "."]
    proxy_domain = rules.proxy_domain
    if proxy_domain and hostname.endswith(proxy_domain):
        short, ns = info.shortname, info.namespace
        if short and ns:
            names.append(f"{short}.{ns}.")
            if ns == rules.namespace:
                names.append(f"{short}.")
            names.append(f"{short}.{ns}.{proxy_domain.split('.')[0]}.")
        names.extend(alt + "." for alt in info.alt_hosts)
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(canonical(name))
    return list(seen)


def canonical(name: str) -> str:
    """``name`` lowercased (if ASCII; else left as is: never a DNS name), with a
    trailing ``..`` made ``.``: the one spelling of its DNS name."""
    if name.isascii():
        name = name.lower()
    if len(name) > 2 and name.endswith(".."):
        name = name[:-1]
    return name


def build_lookup(
    table: Mapping[str, NameInfo], rules: NameRules, cancel: bytearray | None = None
) -> Lookup:
    """Apply the rules to a whole NameTable (``NameTable.table``).

    Raises :class:`Cancelled` once ``cancel[0]`` is set (by another thread: it is
    looked at every ``CANCEL_EVERY`` hosts of each pass)."""
    lookup = Lookup(suffix=rules.search_suffix)
    # Tuples, not lists: the garbage collector stops tracking tuples of strings and bytes,
    # so a big table does not set off full collections (which hold the GIL) while it is
    # built.  Keys are listed by a Python loop and sorted as a list for the same reason:
    # sorted() straight over the protobuf map is one long call that never lets go of it.
    hostnames = [hostname for hostname in table]
    hostnames.sort()
    entries: list[tuple[tuple[str, ...], Addresses]] = []
    for count, hostname in enumerate(hostnames):
        if cancel is not None and count % CANCEL_EVERY == 0 and cancel[0]:
            raise Cancelled
        info = table[hostname]
        addresses = split_ips(info.ips)
        if addresses is None:
            continue
        found = entry_names(hostname, info, rules)
        if found:
            entries.append((tuple(found), addresses))
    for names, addresses in entries:  # own hostnames first: they win over derived names
        lookup.addresses.setdefault(names[0], addresses)
    if cancel is not None and cancel[0]:
        raise Cancelled
    for names, addresses in entries:
        for name in names[1:]:
            lookup.addresses.setdefault(name, addresses)
    suffix = lookup.suffix
    if suffix:
        for count, (names, _) in enumerate(entries):
            if cancel is not None and count % CANCEL_EVERY == 0 and cancel[0]:
                raise Cancelled
            own = set(names)
            for name in names:
                if name == "." or name.endswith(suffix):
                    continue
                expanded = name + suffix
                if expanded in own or expanded in lookup.addresses:
                    continue
                lookup.cnames.setdefault(expanded, name)
    return lookup
