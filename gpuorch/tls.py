"""TLS credentials from PEM files, for the coordinator's port, the agents and the SDK."""

from __future__ import annotations

import ipaddress
import os

import grpc


class TlsConfigError(ValueError):
    """A certificate or key file is missing, unreadable or not PEM; the message names the file and setting."""


def read_pem(path: str, setting: str) -> bytes:
    """The file's bytes. $VARIABLES in the path are expanded, so a unit can point at $CREDENTIALS_DIRECTORY."""
    path = os.path.expandvars(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise TlsConfigError(f"{setting} {path}: {error.strerror or error}") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{setting} {path} is not a PEM file (no -----BEGIN line)")
    return data


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """A port's credentials. With a client CA, every client must present a certificate signed by it
    (grpcio cannot ask for an optional one, which is why agents get a port of their own)."""
    certificate = read_pem(cert_file, "tls_cert")
    key = read_pem(key_file, "tls_key")
    client_ca = read_pem(client_ca_file, "tls_client_ca") if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, certificate)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(ca_file: str = "", cert_file: str = "", key_file: str = "") -> grpc.ChannelCredentials:
    """A client's credentials: trust `ca_file` (else the system's roots); present cert/key if both are given."""
    if bool(cert_file) != bool(key_file):
        raise TlsConfigError("tls_cert and tls_key go together: give both or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(ca_file, "tls_ca") if ca_file else None,
        private_key=read_pem(key_file, "tls_key") if key_file else None,
        certificate_chain=read_pem(cert_file, "tls_cert") if cert_file else None,
    )


def is_loopback_host(host: str) -> bool:
    """True for localhost and addresses in 127.0.0.0/8 or ::1: reachable only from this machine."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


NODE_URI_PREFIX = "spiffe://gpuorch/node/"


def peer_identities(auth_context: dict[str, list[bytes]]) -> list[str]:
    """The node ids a verified client certificate vouches for: the <id> of each URI subjectAltName
    spiffe://gpuorch/node/<id>, and nothing else.

    DNS names, the common name, email and IP entries are left out: the same CA may issue
    certificates to people and services (alice-laptop.corp), and holding one must not make
    its holder a node of that name. Only a certificate issued as a node's carries the URI.
    """
    names: list[str] = []
    for value in auth_context.get("peer_uri", ()):
        uri = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
        node_id = uri.removeprefix(NODE_URI_PREFIX) if uri.startswith(NODE_URI_PREFIX) else ""
        if node_id and "/" not in node_id and node_id not in names:
            names.append(node_id)
    return names
