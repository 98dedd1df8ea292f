"""The cluster's certificates: CAs, serving and client certs, the service-account key."""

from __future__ import annotations

import base64
import datetime
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICE_IP = "10.96.0.1"


@dataclass(frozen=True)
class Pki:
    dir: Path

    def crt(self, name: str) -> Path:
        return self.dir / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.dir / f"{name}.key"

    @property
    def ca(self) -> Path:
        return self.crt("ca")

    @property
    def sa_key(self) -> Path:
        return self.dir / "sa.key"

    @property
    def sa_pub(self) -> Path:
        return self.dir / "sa.pub"


_NOW_SKEW = datetime.timedelta(minutes=5)
_VALIDITY = datetime.timedelta(days=3650)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=ca,
        crl_sign=ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def _x509_name(cn: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    if org:
        attrs.insert(0, x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    return x509.Name(attrs)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def ensure_ca(pki: Pki, file: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Load CA ``file`` or make it; a new CA invalidates what it had signed."""
    if not (pki.crt(file).exists() and pki.key(file).exists()):
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC) - _NOW_SKEW
        cert = (
            x509.CertificateBuilder()
            .subject_name(_x509_name(f"berth-local-{file}"))
            .issuer_name(_x509_name(f"berth-local-{file}"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + _VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write_key(pki.key(file), key)
        pki.crt(file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        for issued in ISSUED_BY[file]:
            pki.crt(issued).unlink(missing_ok=True)
    cert = x509.load_pem_x509_certificate(pki.crt(file).read_bytes())
    loaded = serialization.load_pem_private_key(pki.key(file).read_bytes(), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    return cert, loaded


def ensure_cert(
    pki: Pki,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    file: str,
    cn: str,
    org: str | None,
    *,
    server: bool = False,
    sans: Sequence[x509.GeneralName] = (),
) -> None:
    if pki.crt(file).exists() and pki.key(file).exists():
        return
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC) - _NOW_SKEW
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_x509_name(cn, org))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(pki.key(file), key)
    pki.crt(file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


# Client identities signed by the cluster CA: (file, CN, O). The scheduler
# uses its bootstrap RBAC identity; the controller manager authenticates as
# itself and runs each controller under its own service account
# (--use-service-account-credentials, as kubeadm does); kwok and the admin
# kubeconfig are cluster admins (system:masters).
CLIENTS = (
    ("admin", "berth-admin", "system:masters"),
    ("kube-controller-manager", "system:kube-controller-manager", None),
    ("kube-scheduler", "system:kube-scheduler", None),
    ("kwok", "kwok", "system:masters"),
)
ISSUED_BY = {
    "ca": ["kube-apiserver", *(c[0] for c in CLIENTS)],
    # The aggregation layer's request-header CA: without it every component
    # logs "missing content for CA bundle ... requestheader-client-ca-file".
    "front-proxy-ca": ["front-proxy-client"],
}


def make_pki(pki: Pki) -> None:
    """CAs, API server serving cert, client certs, service-account key pair.

    Kept across ``down``/``up`` of one DIR (only missing files are made), so a
    copied kubeconfig's credentials stay valid; its server address changes.
    """
    pki.dir.mkdir(parents=True, exist_ok=True)
    ca = ensure_ca(pki, "ca")
    ensure_cert(
        pki,
        ca,
        "kube-apiserver",
        "kube-apiserver",
        None,
        server=True,
        sans=[
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes"),
            x509.DNSName("kubernetes.default"),
            x509.DNSName("kubernetes.default.svc"),
            x509.DNSName("kubernetes.default.svc.cluster.local"),
            x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
            x509.IPAddress(ipaddress.IPv4Address(SERVICE_IP)),
        ],
    )
    for file, cn, org in CLIENTS:
        ensure_cert(pki, ca, file, cn, org)
    front_proxy = ensure_ca(pki, "front-proxy-ca")
    ensure_cert(pki, front_proxy, "front-proxy-client", "front-proxy-client", None)

    if not (pki.sa_key.exists() and pki.sa_pub.exists()):
        sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        _write_key(pki.sa_key, sa)
        pki.sa_pub.write_bytes(
            sa.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def client_cert(pki: Pki, file: str, cn: str, org: str | None) -> None:
    """A client certificate issued now by the cluster CA (replacing any older one)."""
    pki.crt(file).unlink(missing_ok=True)
    ensure_cert(pki, ensure_ca(pki, "ca"), file, cn, org)


def kubeconfig_text(server: str, pki: Pki, client: str, *, embed: bool) -> str:
    """A kubeconfig (YAML) for one client identity of this cluster."""

    def ref(field: str, path: Path) -> str:
        if embed:
            data = base64.b64encode(path.read_bytes()).decode()
            return f"{field}-data: {data}"
        return f"{field}: {path}"

    return (
        "apiVersion: v1\n"
        "kind: Config\n"
        "clusters:\n"
        "- name: berth-local\n"
        "  cluster:\n"
        f"    server: {server}\n"
        f"    {ref('certificate-authority', pki.ca)}\n"
        "users:\n"
        f"- name: {client}\n"
        "  user:\n"
        f"    {ref('client-certificate', pki.crt(client))}\n"
        f"    {ref('client-key', pki.key(client))}\n"
        "contexts:\n"
        "- name: berth-local\n"
        "  context:\n"
        "    cluster: berth-local\n"
        f"    user: {client}\n"
        "current-context: berth-local\n"
    )
