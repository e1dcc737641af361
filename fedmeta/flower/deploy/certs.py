"""Certificates and node keys for a Flower deployment, made with the ``cryptography`` package.

A deployment needs two kinds of key material (see ``docs/deployment.md``):

* **TLS** between SuperNodes / the ``flwr`` CLI and the SuperLink: a certificate authority
  (``ca.crt``, ``ca.key``) and a server certificate it signs (``server.pem``, ``server.key``)
  whose subject alternative names list every address clients use to reach the SuperLink
  (``IP:127.0.0.1`` for a deployment on one machine). Clients trust ``ca.crt`` only.
* **SuperNode authentication**: one ECDSA key pair on the NIST P-384 curve per site, in OpenSSH
  format (what ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register``
  read). The private key never leaves the site; the server operator registers the public key,
  and the SuperLink (``--enable-supernode-auth``) then refuses every node whose key it does not
  know.

These are test-deployment helpers: the CA key is written unencrypted (``0600``), certificates
are valid for ``days`` days. A production CA belongs in the operator's own PKI. No
cryptography is implemented here; everything is delegated to ``cryptography``'s primitives.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmeta.errors import ConfigError

__all__ = [
    "TlsFiles",
    "NodeKey",
    "make_ca",
    "make_server_certificate",
    "make_tls",
    "make_node_key",
    "load_tls",
]

log = logging.getLogger(__name__)

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"


@dataclass(frozen=True)
class TlsFiles:
    """The files of a test PKI: the CA (certificate and key) and the SuperLink's certificate."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's authentication key pair (OpenSSH format, ECDSA P-384)."""

    private: Path
    public: Path


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(out: str | Path, *, name: str = "fedmeta test CA", days: int = 365) -> tuple[Path, Path]:
    """Create a self-signed certificate authority: ``out/ca.crt`` and ``out/ca.key`` (0600).

    Returns:
        The certificate and key paths.
    """
    root = Path(out)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    root.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = root / CA_CERT, root / CA_KEY
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, _pem_key(key))
    return cert_path, key_path


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_server_certificate(
    ca_cert: str | Path,
    ca_key: str | Path,
    out: str | Path,
    *,
    hosts: list[str] | tuple[str, ...] = ("127.0.0.1", "localhost"),
    days: int = 365,
) -> tuple[Path, Path]:
    """Issue the SuperLink's TLS certificate: ``out/server.pem`` and ``out/server.key`` (0600).

    Args:
        ca_cert: the CA certificate (PEM).
        ca_key: the CA private key (PEM, unencrypted).
        out: output folder.
        hosts: every IP address or DNS name clients use to reach the SuperLink; each becomes a
            subject alternative name (gRPC checks the address against them, not the common name).
        days: validity.

    Raises:
        ConfigError: if ``hosts`` is empty or the CA files cannot be read.
    """
    hosts = [h.strip() for h in hosts if h.strip()]
    if not hosts:
        raise ConfigError(
            "a server certificate needs at least one host (IP address or DNS name) for its subject alternative names"
        )
    try:
        ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
        signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CA certificate '{ca_cert}' or key '{ca_key}': {exc}") from exc
    if not isinstance(signer, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"CA key '{ca_key}' is not an elliptic-curve key")
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
        .sign(signer, hashes.SHA384())
    )
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = root / SERVER_CERT, root / SERVER_KEY
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, _pem_key(key))
    return cert_path, key_path


def make_tls(
    out: str | Path, *, hosts: list[str] | tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365
) -> TlsFiles:
    """A CA and a SuperLink certificate for ``hosts`` in ``out`` (an existing CA there is reused).

    Returns:
        The four files.
    """
    root = Path(out)
    ca_cert, ca_key = root / CA_CERT, root / CA_KEY
    if ca_cert.is_file() and ca_key.is_file():
        log.info("reusing the CA in %s", root)
    else:
        ca_cert, ca_key = make_ca(root, days=days)
    server_cert, server_key = make_server_certificate(ca_cert, ca_key, root, hosts=hosts, days=days)
    return TlsFiles(ca_cert, ca_key, server_cert, server_key)


def load_tls(folder: str | Path) -> TlsFiles:
    """The TLS files of ``folder`` (as :func:`make_tls` writes them).

    Raises:
        ConfigError: naming the first file that is missing.
    """
    root = Path(folder)
    files = TlsFiles(root / CA_CERT, root / CA_KEY, root / SERVER_CERT, root / SERVER_KEY)
    for path in (files.ca_cert, files.server_cert, files.server_key):
        if not path.is_file():
            raise ConfigError(f"TLS file '{path}' is missing (create it with `fedmeta make-certs --out {root}`)")
    return files


def make_node_key(path: str | Path, *, comment: str | None = None) -> NodeKey:
    """Create a SuperNode's ECDSA P-384 key pair: ``PATH`` (private, 0600) and ``PATH.pub``.

    Both are in OpenSSH format, as ``ssh-keygen -t ecdsa -b 384`` writes them.

    Args:
        path: the private key file; the public key goes next to it with ``.pub`` appended.
        comment: text after the public key (e.g. the site name).
    """
    private = Path(path)
    key = _new_key()
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = private.with_name(private.name + ".pub")
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        line += b" " + comment.encode()
    public.write_bytes(line + b"\n")
    return NodeKey(private, public)
