"""resolv.conf as Istio's agent reads it: nameservers (port 53) and the search list.

``options`` (ndots and the rest) are ignored, as Istio does.  A ``domain``
line is a one-entry search list; the last ``search``/``domain`` line wins.
Nameserver entries that are not IP literals are skipped.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

PORT = 53


@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()

    @property
    def upstreams(self) -> tuple[tuple[str, int], ...]:
        return tuple((ns, PORT) for ns in self.nameservers)


def parse(text: str) -> ResolvConf:
    nameservers: list[str] = []
    search: list[str] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) < 2:
            continue
        key, values = fields[0], fields[1:]
        if key == "nameserver":
            if is_ip(values[0]):
                nameservers.append(values[0])
        elif key == "search":
            search = values
        elif key == "domain":
            search = values[:1]
    return ResolvConf(tuple(nameservers), tuple(search))


def read(path: str) -> ResolvConf:
    """Parse the file; raises OSError (naming the file) if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse(f.read())
    except OSError as exc:
        raise OSError(f"cannot read resolv.conf {path}: {exc.strerror or exc}") from exc


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False
