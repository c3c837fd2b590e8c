"""TLS for MaaS's gRPC servers and clients: credentials from PEM files, and a local certificate maker.

A server serves TLS when its settings name a certificate chain and key (``tls_cert_file``,
``tls_key_file``) and mutual TLS when they also name ``tls_client_ca_file``: clients must then
present a certificate that CA signed. Clients (gateway and workers to the registry, the CLI,
``services.client``) get ``grpc.ChannelCredentials`` from a CA file and an optional client
certificate and key.

Files are read once, when a server or channel is built: a new certificate is served after a
restart (``maas up`` restarts a child that exits), not picked up while running.

``make_certificates`` writes a local CA, one server certificate per service and a client
certificate into a directory (``maas up --tls``, tests). It is for one machine and for tests;
production certificates come from your own CA (cert-manager, Vault, ...).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = structlog.get_logger(__name__)

SERVICES = ("registry", "gateway", "inference")
"""The services ``make_certificates`` makes a server certificate for."""

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Names every made server certificate is valid for, besides the hosts passed in."""

_CA_DAYS = 3650
_LEAF_DAYS = 825
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}


class TlsConfigError(ValueError):
    """TLS settings that cannot work: a key without a certificate, an unreadable file, ..."""


class ServerTlsSettings(Protocol):
    """The settings fields ``server_credentials`` reads (``ServiceSettings`` has them)."""

    tls_cert_file: Path | None
    tls_key_file: Path | None
    tls_client_ca_file: Path | None


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def server_credentials(settings: ServerTlsSettings) -> grpc.ServerCredentials | None:
    """Return the server's TLS credentials, or None when it serves plaintext (no certificate set).

    Args:
        settings: ``tls_cert_file`` (PEM chain) with ``tls_key_file``; ``tls_client_ca_file`` too
            turns on mutual TLS (a client certificate signed by that CA is required).

    Raises:
        TlsConfigError: Only one of certificate and key is set, the client CA is set without
            them, or a file cannot be read.
    """
    cert, key, client_ca = settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
    if cert is None and key is None:
        if client_ca is not None:
            raise TlsConfigError("tls_client_ca_file needs tls_cert_file and tls_key_file (mutual TLS is TLS)")
        return None
    if cert is None or key is None:
        raise TlsConfigError("tls_cert_file and tls_key_file must be set together")
    pair = (_read(key, "tls_key_file"), _read(cert, "tls_cert_file"))
    roots = None if client_ca is None else _read(client_ca, "tls_client_ca_file")
    log.info("tls_server", cert_file=str(cert), is_mutual=roots is not None)
    return grpc.ssl_server_credentials([pair], root_certificates=roots, require_client_auth=roots is not None)


def channel_credentials(
    ca: Path | None = None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials | None:
    """Return TLS credentials for a client channel, or None (plaintext) when nothing is set.

    Args:
        ca: PEM file of the CA(s) that signed the server's certificate; None trusts the
            system's roots (with ``cert``/``key`` set).
        cert: PEM client certificate chain, for servers that require mutual TLS.
        key: PEM private key of ``cert``.

    Raises:
        TlsConfigError: Only one of ``cert`` and ``key`` is set, or a file cannot be read.
    """
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        raise TlsConfigError("a client certificate and its key must be given together")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else _read(ca, "CA file"),
        private_key=None if key is None else _read(key, "client key file"),
        certificate_chain=None if cert is None else _read(cert, "client certificate file"),
    )


class RegistryClientTlsSettings(Protocol):
    """The settings fields ``registry_channel_credentials`` reads (gateway and worker settings have them)."""

    registry_tls_ca_file: Path | None
    registry_tls_cert_file: Path | None
    registry_tls_key_file: Path | None


def registry_channel_credentials(settings: RegistryClientTlsSettings) -> grpc.ChannelCredentials | None:
    """Return the credentials of a service's channel to the registry (None: plaintext).

    Raises:
        TlsConfigError: See ``channel_credentials``.
    """
    return channel_credentials(
        settings.registry_tls_ca_file, settings.registry_tls_cert_file, settings.registry_tls_key_file
    )


@dataclass(frozen=True)
class CertificateFiles:
    """Where ``make_certificates`` keeps a local CA, the services' certificates and a client's."""

    directory: Path

    @property
    def ca_cert(self) -> Path:
        """The CA certificate: what clients trust (``-cacert``, ``root_certificates``)."""
        return self.directory / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """The CA's private key (mode 0600)."""
        return self.directory / "ca-key.pem"

    def server_cert(self, service: str) -> Path:
        """The server certificate of ``service`` (one of ``SERVICES``)."""
        return self.directory / f"{service}.pem"

    def server_key(self, service: str) -> Path:
        """The private key of ``service``'s certificate (mode 0600)."""
        return self.directory / f"{service}-key.pem"

    @property
    def client_cert(self) -> Path:
        """A client certificate for mutual TLS (CLI, tritonclient, services calling the registry)."""
        return self.directory / "client.pem"

    @property
    def client_key(self) -> Path:
        """The client certificate's private key (mode 0600)."""
        return self.directory / "client-key.pem"


def make_certificates(directory: Path, *, hosts: Iterable[str] = ()) -> CertificateFiles:
    """Write a local CA, a server certificate per service and a client certificate, unless present.

    Files that exist are reused, so a restart serves the same CA; a missing CA makes every file
    anew. Server certificates are valid for ``LOCAL_HOSTS`` plus ``hosts`` (a wildcard bind
    address adds this machine's hostname instead). Keys are EC P-256, written with mode 0600.

    Args:
        directory: Where to write (created, mode 0700).
        hosts: Host names or IP addresses the services bind or are called by.

    Returns:
        The files' paths.
    """
    files = CertificateFiles(directory)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if files.ca_cert.exists() and files.ca_key.exists():
        ca_key = serialization.load_pem_private_key(files.ca_key.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            raise TlsConfigError(f"{files.ca_key}: not an EC private key (delete {directory} to make new files)")
        is_new_ca = False
    else:
        ca_key, ca_cert = _make_ca(files)
        is_new_ca = True
    names = _san_names(hosts)
    for service in SERVICES:
        cert, key = files.server_cert(service), files.server_key(service)
        if is_new_ca or not (cert.exists() and key.exists()):
            _make_leaf(ca_key, ca_cert, f"maas-{service}", names, cert, key, is_server=True)
    if is_new_ca or not (files.client_cert.exists() and files.client_key.exists()):
        _make_leaf(ca_key, ca_cert, "maas-client", [], files.client_cert, files.client_key, is_server=False)
    log.info("tls_certificates", directory=str(directory), is_new_ca=is_new_ca)
    return files


def _san_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    wanted: list[str] = list(LOCAL_HOSTS)
    for host in hosts:
        wanted.append(socket.gethostname() if host in _WILDCARD_HOSTS else host.strip("[]"))
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(wanted):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    tmp.replace(path)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write_private(path, pem)


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _make_ca(files: CertificateFiles) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "MaaS local CA")])
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    cert = (
        _builder("MaaS local CA", name, key.public_key(), _CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .sign(key, hashes.SHA256())
    )
    _write_key(files.ca_key, key)
    files.ca_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _make_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: str,
    names: list[x509.GeneralName],
    cert_path: Path,
    key_path: Path,
    *,
    is_server: bool,
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False,
    )  # fmt: skip
    # Server certificates may also serve as client certificates (a gateway calling the registry).
    purposes = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if is_server
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    builder = (
        _builder(subject, ca_cert.subject, key.public_key(), _LEAF_DAYS)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
