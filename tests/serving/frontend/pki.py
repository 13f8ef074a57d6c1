"""A tiny PKI for mutual-TLS tests: a CA, and server or client certificates it signs (PEM files)."""

from __future__ import annotations

import datetime
import ipaddress
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn: str) -> x509.Name:
  return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class Ca:
  """A certificate authority whose certificate is `cert_file`."""

  def __init__(self, d: pathlib.Path, cn: str = "test CA"):
    self.dir = d
    d.mkdir(parents=True, exist_ok=True)
    self.key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    self.cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
                 .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                 .not_valid_before(now - datetime.timedelta(minutes=5))
                 .not_valid_after(now + datetime.timedelta(days=1))
                 .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                 .sign(self.key, hashes.SHA256()))
    self.cert_file = str(d / f"{cn.replace(' ', '_')}.pem")
    pathlib.Path(self.cert_file).write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

  def issue(self, cn: str, *, sans: tuple[str, ...] = (), server: bool = False
            ) -> tuple[str, str]:
    """A certificate for `cn` (DNS or URI SANs; a server one is for localhost and 127.0.0.1)
    and its key, as PEM files: (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(s) if "://" in s
                                     else x509.DNSName(s) for s in sans]
    if server:
      names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    b = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(self.cert.subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]),
                        critical=False))
    if names:
      b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = b.sign(self.key, hashes.SHA256())
    stem = self.dir / cn.replace(" ", "_").replace("/", "_").replace(":", "_")
    pathlib.Path(f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pathlib.Path(f"{stem}.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return f"{stem}.crt", f"{stem}.key"
