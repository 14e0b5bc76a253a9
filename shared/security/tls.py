"""A throwaway certificate authority and server certificates, so NATS can run over TLS without a PKI.

A demo or a test stack has no company CA to ask: `make_ca` makes a self-signed one (EC P-256)
in a folder, `make_server_cert` signs a certificate for the hosts the server listens on
(IP addresses as IPAddress SANs, names as DNSName SANs) and `client_context` gives the
`ssl.SSLContext` that trusts that CA alone and checks the host name. Private keys are
written with mode 0600 (signing.write_secret_file).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tierline_shared.security.signing import write_secret_file

CA_DAYS = 365  # days a throwaway CA stays valid
SERVER_DAYS = 90  # days a server certificate stays valid
CLOCK_SKEW = dt.timedelta(minutes=5)  # certificates start this long before now, for hosts with a slow clock
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_CERT_FILE, CA_KEY_FILE = "ca.pem", "ca-key.pem"
SERVER_CERT_FILE, SERVER_KEY_FILE = "server.pem", "server-key.pem"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    if not isinstance(days, int) or days <= 0:
        raise ValueError(f"days must be a positive number of days, got {days!r}")
    now = dt.datetime.now(dt.timezone.utc)
    return now - CLOCK_SKEW, now + dt.timedelta(days=days)


def _san(host: str) -> x509.GeneralName:
    if not isinstance(host, str) or not host.strip():
        raise ValueError(f"host {host!r} is not a host name or an IP address")
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_ca(directory: str | os.PathLike, name: str = "Tierline demo CA",
            days: int = CA_DAYS) -> tuple[Path, Path]:
    """A self-signed CA in `directory`: (ca.pem, ca-key.pem), the key with mode 0600."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    not_before, not_after = _validity(days)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(directory, cert, CA_CERT_FILE, key, CA_KEY_FILE)


def _key_usage(ca: bool) -> x509.KeyUsage:
    """A CA signs certificates (and CRLs); a server signs its TLS handshakes."""
    return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _write_pair(directory: Path, cert: x509.Certificate, cert_file: str, key: ec.EllipticCurvePrivateKey,
                key_file: str) -> tuple[Path, Path]:
    """The certificate (PEM, readable) and its key (PEM, 0600) in `directory`."""
    key_path = write_secret_file(directory / key_file, _key_pem(key))
    cert_path = directory / cert_file
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"CA certificate {cert_path} does not exist") from None
    except ValueError as e:
        raise ValueError(f"CA certificate {cert_path} is not a PEM certificate: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise FileNotFoundError(f"CA key {key_path} does not exist") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"CA key {key_path} is not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError(f"CA key {key_path} is a {type(key).__name__}; expected an EC or RSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ValueError(f"CA key {key_path} does not belong to the CA certificate {cert_path}")
    return cert, key


def make_server_cert(directory: str | os.PathLike, ca_cert_path: str | os.PathLike, ca_key_path: str | os.PathLike,
                     hosts: Sequence[str] = DEFAULT_HOSTS, days: int = SERVER_DAYS) -> tuple[Path, Path]:
    """A server certificate for `hosts` signed by the CA: (server.pem, server-key.pem), the key with mode 0600."""
    if isinstance(hosts, str):
        hosts = (hosts,)
    if not hosts:
        raise ValueError("a server certificate needs at least one host")
    sans = [_san(h) for h in hosts]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _load_ca(Path(ca_cert_path), Path(ca_key_path))
    not_before, not_after = _validity(days)
    key = _new_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _write_pair(directory, cert, SERVER_CERT_FILE, key, SERVER_KEY_FILE)


def client_context(ca_file: str | os.PathLike) -> ssl.SSLContext:
    """Trusts the CA in `ca_file` only (not the system's), checks the host name, TLS 1.2 at least."""
    ca_file = Path(ca_file)
    if not ca_file.is_file():
        raise FileNotFoundError(f"CA file {ca_file} does not exist")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))
    except ssl.SSLError as e:
        raise ValueError(f"CA file {ca_file} holds no usable PEM certificate: {e}") from None
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def server_context(cert_file: str | os.PathLike, key_file: str | os.PathLike) -> ssl.SSLContext:
    """A server-side context with this certificate and key, TLS 1.2 at least (for Python servers and tests)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx
