"""The tower's private CA and its TLS server certificate.

Clients trust the tower through ``ca.pem`` (or the server certificate's
fingerprint), never through the system trust store, so the CA is private to one
tower.  The extensions are the ones OpenSSL 3 checks in strict mode
(``VERIFY_X509_STRICT``, the default from Python 3.13): a critical
BasicConstraints on both certificates, key usages, SKI on the CA and AKI on the
leaf, and the names in subjectAltName (the CN is not used for hostname checks).
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from supctl.errors import UsageError
from supctl.plainhttp import valid_hostname
from supctl.tower.store import atomic_write

CA_COMMON_NAME = "supctl control tower CA"
SERVER_COMMON_NAME = "supctl control tower"
#: The replicas' certificate (peering.py): the only one the peer listener accepts.
PEER_COMMON_NAME = "supctl control tower peer"
DEFAULT_NAMES = ("localhost", "127.0.0.1", "::1")

# Both live 10 years: there is no renewal command yet, and a private CA pinned
# by the clients gains little from short lifetimes.
VALIDITY = datetime.timedelta(days=3650)
# Backdate a little so a client whose clock lags the tower's still accepts a fresh cert.
CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class CertPaths:
    ca: Path
    ca_key: Path
    cert: Path
    key: Path
    peer_cert: Path
    peer_key: Path


def cert_paths(directory: str | os.PathLike[str]) -> CertPaths:
    """Where :func:`write_certs` puts its files inside ``directory``."""
    d = Path(directory)
    return CertPaths(
        d / "ca.pem",
        d / "ca-key.pem",
        d / "server.pem",
        d / "server-key.pem",
        d / "peer.pem",
        d / "peer-key.pem",
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted: the tower must start unattended; the file mode guards the key.
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not valid_hostname(name):
        raise UsageError(f"bad certificate name {name!r}: use a DNS name or an IP address")
    return x509.DNSName(name.lower())


def _make_ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + VALIDITY)
        # path_length=0: this CA signs server certificates only, never another CA.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: Sequence[x509.GeneralName],
    now: datetime.datetime,
    *,
    peer: bool = False,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The client-facing server certificate, or with ``peer`` the replicas' certificate:
    another name, and clientAuth besides serverAuth (each replica is both ends)."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] + ([ExtendedKeyUsageOID.CLIENT_AUTH] if peer else [])
    common_name = PEER_COMMON_NAME if peer else SERVER_COMMON_NAME
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(min(now + VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # ECDHE with an ECDSA key only ever signs, so digitalSignature is all it needs.
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def write_certs(directory: str | os.PathLike[str], names: Sequence[str] = DEFAULT_NAMES) -> CertPaths:
    """Create a new CA and a server certificate for ``names`` in ``directory``.

    Overwrites existing files; keys are written with mode 0600, certificates 0644.
    """
    if not names:
        raise UsageError("the server certificate needs at least one name")
    general_names = [_general_name(n) for n in names]  # bad names fail before any file is written
    paths = cert_paths(directory)
    now = datetime.datetime.now(datetime.UTC)
    ca_key, ca_cert = _make_ca(now)
    key, cert = _make_server_cert(ca_key, ca_cert, general_names, now)
    atomic_write(paths.ca_key, _key_pem(ca_key), 0o600)
    atomic_write(paths.ca, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    atomic_write(paths.key, _key_pem(key), 0o600)
    atomic_write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    _write_peer(paths, ca_key, ca_cert, general_names, now)
    return paths


def write_peer_cert(directory: str | os.PathLike[str], names: Sequence[str] = DEFAULT_NAMES) -> CertPaths:
    """A new replicas' certificate (``peer.pem``) from the CA in ``directory`` (for a tower
    directory made before replicas had one, or to replace it)."""
    general_names = [_general_name(n) for n in names]
    paths = cert_paths(directory)
    try:
        ca_cert = x509.load_pem_x509_certificate(paths.ca.read_bytes())
        ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise UsageError(
            f"{exc.filename} not found: the tower's CA is needed to sign the peer certificate"
        ) from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load the tower's CA from {paths.ca_key.parent}: {exc}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{paths.ca_key} is not the tower CA's key")
    _write_peer(paths, ca_key, ca_cert, general_names, datetime.datetime.now(datetime.UTC))
    return paths


def _write_peer(
    paths: CertPaths,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    names: Sequence[x509.GeneralName],
    now: datetime.datetime,
) -> None:
    key, cert = _make_server_cert(ca_key, ca_cert, names, now, peer=True)
    atomic_write(paths.peer_key, _key_pem(key), 0o600)
    atomic_write(paths.peer_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def fingerprint(pem_path: str | os.PathLike[str]) -> str:
    """SHA-256 of the (first) certificate's DER, as lowercase hex pairs joined by colons."""
    try:
        data = Path(pem_path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"certificate {pem_path} not found") from None
    except OSError as e:
        raise UsageError(f"cannot read certificate {pem_path}: {e.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise UsageError(f"{pem_path} is not a PEM certificate") from None
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))
