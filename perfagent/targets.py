"""Which hosts the agent may fetch from.

Targets are fetched by the server on a client's behalf, so an open fetcher would let any API user
probe the agent's network (SSRF). `allowed_targets` lists hostnames and IP networks; `*` or dev
mode allows everything. A hostname entry matches that name exactly (no DNS resolution is done,
so an allowed name cannot be re-pointed at an address the operator did not list).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from perfagent.errors import TargetNotAllowedError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    allow_any: bool
    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def from_entries(cls, entries: Iterable[str], *, allow_any: bool = False) -> TargetPolicy:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            if entry == "*":
                allow_any = True
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(allow_any=allow_any, hosts=frozenset(hosts), networks=tuple(networks))

    def allows(self, url: str) -> bool:
        if self.allow_any:
            return True
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        if not host:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host in self.hosts
        return any(address in network for network in self.networks)

    def check(self, url: str, *, field: str) -> None:
        """Raise a VALIDATION_ERROR naming the field when `url` is not allowed."""
        if not self.allows(url):
            host = urlsplit(url).hostname
            raise TargetNotAllowedError(
                f"{field} host {host!r} is not in allowed_targets",
                {"field": field, "host": host, "setting": "allowed_targets"},
            )

    def describe(self) -> list[str]:
        if self.allow_any:
            return ["*"]
        return sorted(self.hosts) + [str(n) for n in self.networks]
