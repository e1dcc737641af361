"""Test PKI for deployments: the certificates verify, the SAN matches 127.0.0.1, TLS handshakes work."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from cryptography.x509.oid import ExtendedKeyUsageOID

from fedmeta.errors import ConfigError
from fedmeta.flower.deploy.certs import load_tls, make_node_key, make_server_certificate, make_tls


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_signs_a_server_certificate_for_loopback(tmp_path: Path) -> None:
    files = make_tls(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.issuer == ca.subject
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    ca_key.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )  # raises if forged
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert _mode(files.ca_key) == 0o600 and _mode(files.server_key) == 0o600


def test_second_call_reuses_the_ca(tmp_path: Path) -> None:
    first = make_tls(tmp_path).ca_cert.read_bytes()
    again = make_tls(tmp_path, hosts=["10.1.2.3"])
    assert again.ca_cert.read_bytes() == first
    cert = x509.load_pem_x509_certificate(again.server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]


def _handshake(server_files: tuple[Path, Path], cafile: Path) -> None:
    """A real TLS handshake on 127.0.0.1 with hostname checking, as gRPC/HTTP clients do it."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(server_files[0]), str(server_files[1]))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_ctx = ssl.create_default_context(cafile=str(cafile))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"x")
    finally:
        thread.join(timeout=10)
        listener.close()


def test_tls_handshake_succeeds_with_the_ca_and_fails_with_another(tmp_path: Path) -> None:
    files = make_tls(tmp_path / "a")
    _handshake((files.server_cert, files.server_key), files.ca_cert)
    other = make_tls(tmp_path / "b")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake((files.server_cert, files.server_key), other.ca_cert)


def test_certificate_for_another_host_fails_hostname_check(tmp_path: Path) -> None:
    files = make_tls(tmp_path, hosts=["10.9.9.9"])
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake((files.server_cert, files.server_key), files.ca_cert)


def test_node_key_is_ecdsa_p384_in_openssh_format(tmp_path: Path) -> None:
    key = make_node_key(tmp_path / "keys" / "site-a", comment="site-a")
    private = load_ssh_private_key(key.private.read_bytes(), password=None)
    public = load_ssh_public_key(key.public.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    assert key.public.read_text().startswith("ecdsa-sha2-nistp384 ") and key.public.read_text().strip().endswith(
        "site-a"
    )
    assert _mode(key.private) == 0o600
    assert make_node_key(tmp_path / "keys" / "site-b").public.read_bytes() != key.public.read_bytes()


def test_missing_files_and_hosts_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ca.crt"):
        load_tls(tmp_path)
    files = make_tls(tmp_path)
    assert load_tls(tmp_path) == files
    with pytest.raises(ConfigError, match="at least one host"):
        make_server_certificate(files.ca_cert, files.ca_key, tmp_path / "x", hosts=[" "])
    with pytest.raises(ConfigError, match="cannot read"):
        make_server_certificate(tmp_path / "nope.crt", files.ca_key, tmp_path / "x")
