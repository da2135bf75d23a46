"""Coordinator addresses as people write them: one, or a comma-separated list (agents, gpuctl, the SDK).

An entry is HOST[:PORT] (port 50051 when it names none), [IPv6][:PORT] or a bare IPv6 address, with
an optional grpc scheme (dns:///, ipv4:, ipv6:), or a local socket (unix:PATH, unix-abstract:NAME,
vsock:CID:PORT). Each is checked on its own, and a bad one is named in the error.
"""

from __future__ import annotations

import ipaddress
import re

from gpuorch import tls

DEFAULT_PORT = 50051
LOCAL_SOCKET_SCHEMES = ("unix:", "unix-abstract:", "vsock:")
NAME_SCHEMES = ("dns:///", "ipv4:", "ipv6:")
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9._-]*[A-Za-z0-9_])?")


class AddressError(ValueError):
    """A coordinator address (or one entry of a list) is not one gpuorch can dial; the message names it."""


def _split_scheme(address: str) -> tuple[str, str]:
    """(scheme, rest) for dns:///, dns://AUTHORITY/, ipv4: and ipv6:; ("", address) otherwise."""
    if address.startswith("dns://") and not address.startswith("dns:///"):
        authority, slash, rest = address[len("dns://") :].partition("/")
        if slash and authority:
            return f"dns://{authority}/", rest
    for prefix in NAME_SCHEMES:
        if address.startswith(prefix):
            return prefix, address[len(prefix) :]
    return "", address


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def with_default_port(address: str) -> str:
    """HOST (or [IPv6], or a bare IPv6 address) without a port gets :50051; anything else is left as it is.

    grpc itself would take port 443 for a bare host name, which no gpuorch coordinator listens on."""
    if address.startswith(LOCAL_SOCKET_SCHEMES):
        return address
    scheme, address = _split_scheme(address)
    if address.startswith("["):
        has_port = "]:" in address
    elif address.count(":") > 1 and _is_ipv6(address):  # a bare IPv6 address such as ::1
        return f"{scheme}[{address}]:{DEFAULT_PORT}"
    else:
        has_port = ":" in address
    return scheme + (address if has_port else f"{address}:{DEFAULT_PORT}")


def address_problem(address: str) -> str:
    """Why `address` (already with its port) cannot be dialled; "" when it can."""
    for prefix in LOCAL_SOCKET_SCHEMES:
        if address.startswith(prefix):
            return "" if address[len(prefix) :].strip() else f"{prefix} names no socket"
    _, rest = _split_scheme(address)
    if rest.startswith("["):
        host, _, port = rest[1:].partition("]:")
        if not _is_ipv6(host):
            return f"[{host}] is not an IPv6 address"
    else:
        host, _, port = rest.rpartition(":")
        if not _HOST_NAME.fullmatch(host):
            return f"{host!r} is not a host name or IP address" if host else "it names no host"
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        return f"port {port!r} is not a number from 1 to 65535"
    return ""


def parse_address(text: str, *, setting: str = "coordinator") -> str:
    """One address, stripped and with its default port; AddressError naming it and `setting` otherwise."""
    entry = text.strip()
    if not entry:
        raise AddressError(f"{setting}: an address is empty")
    address = with_default_port(entry)
    problem = address_problem(address)
    if problem:
        raise AddressError(f"{setting}: {entry!r} is not HOST[:PORT] or unix:PATH ({problem})")
    return address


def parse_address_list(text: str, *, setting: str = "coordinator") -> tuple[str, ...]:
    """A comma-separated list of addresses, each checked and given its default port, in order, without repeats.

    Raises AddressError naming the first bad entry (an empty one included: "a,,b", a trailing comma)."""
    if not text.strip():
        raise AddressError(f"{setting}: no address given")
    addresses: list[str] = []
    for position, entry in enumerate(text.split(","), start=1):
        if not entry.strip():
            raise AddressError(f"{setting}: entry {position} of {text!r} is empty")
        address = parse_address(entry, setting=setting)
        if address not in addresses:
            addresses.append(address)
    return tuple(addresses)


def is_local_address(address: str) -> bool:
    """True for a unix socket or a loopback HOST:PORT: where plaintext stays on this machine."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    _, rest = _split_scheme(address)
    return tls.is_loopback_host(rest.rsplit(":", 1)[0])
