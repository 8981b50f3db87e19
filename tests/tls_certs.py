"""Self-signed test certificates made with the openssl CLI: a CA, a server cert for 127.0.0.1 and
localhost, a client cert, and a client cert from an unrelated (rogue) CA."""

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    rogue_cert: str
    rogue_key: str


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(name: str, cwd: Path) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
             "-days", "2", "-subj", f"/CN=kvcluster test {name}", cwd=cwd)


def _signed(name: str, ca: str, extensions: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(extensions + "\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=cwd)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=cwd)


def make_certs(directory: Path) -> Certs:
    _ca("ca", directory)
    _ca("rogue-ca", directory)
    _signed("server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth", directory)
    _signed("client", "ca", "extendedKeyUsage=clientAuth", directory)
    _signed("rogue", "rogue-ca", "extendedKeyUsage=clientAuth", directory)
    path = lambda name: str(directory / name)  # noqa: E731
    return Certs(path("ca.pem"), path("server.pem"), path("server.key"), path("client.pem"), path("client.key"),
                 path("rogue.pem"), path("rogue.key"))
