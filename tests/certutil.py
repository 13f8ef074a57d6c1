"""Self-signed TLS certificates for tests (a helper module, not a conftest: two conftest
modules in different folders share the module name `conftest`, so importing from one breaks
when pytest collects both)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def write_cert(d: pathlib.Path) -> tuple[str, str]:
  """A fresh self-signed certificate for 127.0.0.1 and localhost, and its key, as PEM files in
  `d` (cert.pem, key.pem; replaced atomically when they exist)."""
  key = ec.generate_private_key(ec.SECP256R1())
  name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
  now = datetime.datetime.now(datetime.timezone.utc)
  cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.SubjectAlternativeName([
              x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
              critical=False)
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(key, hashes.SHA256()))
  d.mkdir(parents=True, exist_ok=True)
  for name, data in (("key.pem", key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption())),
                     ("cert.pem", cert.public_bytes(serialization.Encoding.PEM))):
    (d / f"{name}.tmp").write_bytes(data)
    os.replace(d / f"{name}.tmp", d / name)
  return str(d / "cert.pem"), str(d / "key.pem")
