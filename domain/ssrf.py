"""Refusing webhook URLs that point inside our network (SSRF).

A URL's host is resolved and every address checked; the sender then connects to the
checked address itself, so a second DNS answer (rebinding) cannot change the target.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from domain.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: host, port -> addresses. Injectable, so tests never need real DNS.
Resolver = Callable[[str, int], list[str]]

_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
             ipaddress.ip_address("100.100.100.200")}


class UnsafeTarget(InvalidInput):
    """The URL resolves to an address webhooks may not reach."""


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True)
class Target:
    """A checked destination: connect to `ip`, but speak to `host` (Host header, TLS SNI)."""

    scheme: str
    host: str
    port: int
    ip: str
    path: str


def _parse_ip(text: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    return ip


def check_address(ip: IPAddress, allow_loopback: bool) -> None:
    if ip.is_loopback:
        if allow_loopback:
            return
        raise UnsafeTarget(f"{ip} is a loopback address", field="url")
    if ip in _METADATA:
        raise UnsafeTarget(f"{ip} is a cloud metadata address", field="url")
    if (ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
            or ip.is_unspecified or not ip.is_global):
        raise UnsafeTarget(f"{ip} is not a public address", field="url")


def check_url_syntax(url: str, *, require_https: bool) -> tuple[str, str, int, str]:
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http"):
        raise InvalidInput("the URL must start with https://", field="url")
    if require_https and parts.scheme != "https":
        raise InvalidInput("webhook URLs must use https", field="url")
    if parts.username or parts.password:
        raise InvalidInput("the URL must not carry credentials", field="url")
    if not parts.hostname:
        raise InvalidInput("the URL has no host", field="url")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise InvalidInput("the URL's port is not valid", field="url") from exc
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, parts.hostname, port, path


def resolve_target(url: str, *, allow_loopback: bool, require_https: bool,
                   resolver: Resolver = system_resolver) -> Target:
    """Check a URL and answer the one address to connect to; raise UnsafeTarget if any
    address it resolves to is off limits (all must pass: an attacker may list several)."""
    scheme, host, port, path = check_url_syntax(url, require_https=require_https)
    literal = _literal_ip(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            resolved = resolver(host, port)
        except OSError as exc:
            raise InvalidInput(f"the host {host!r} does not resolve", field="url") from exc
        addresses = [ip for ip in (_parse_ip(a) for a in resolved) if ip is not None]
        if not addresses:
            raise InvalidInput(f"the host {host!r} does not resolve", field="url")
    for ip in addresses:
        check_address(ip, allow_loopback)
    return Target(scheme, host, port, str(addresses[0]), path)


def names_an_address(url: str) -> bool:
    """Whether the URL's host is an IP address (in any spelling): checking it then needs
    no DNS lookup, so a sender can do it inline instead of in a thread."""
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    return host is not None and _literal_ip(host) is not None


def _literal_ip(host: str) -> IPAddress | None:
    """An address written as the host, in any spelling the C library would accept:
    dotted, decimal (2130706433), hex (0x7f000001), octal, shortened (127.1), IPv6."""
    direct = _parse_ip(host.strip("[]"))
    if direct is not None:
        return direct
    try:
        packed = socket.inet_aton(host)  # accepts the legacy numeric spellings
    except OSError:
        return None
    return ipaddress.IPv4Address(packed)
