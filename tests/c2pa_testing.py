"""Test credentials for C2PA, made here with ``cryptography``: a root CA and a signing certificate with the profile
C2PA requires (v3, not a CA, digitalSignature as a critical key usage, an allowed extended key usage, subject and
authority key identifiers, within its validity), and a time-stamping authority (RFC 3161) on the loopback
interface, built with ``asn1crypto``. Nothing here is a stand-in: the C2PA library signs, timestamps and
validates with them exactly as with a commercial chain."""

from __future__ import annotations

import datetime as dt
import hashlib
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class Chain:
    cert: Path
    """The signing certificate, then the CA (as ``SDXL_BENTO_C2PA_CERT`` takes them)."""
    key: Path
    root: Path
    """The CA alone: a trust anchor for verifying."""
    ca_key: object
    ca_cert: x509.Certificate


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sdxl-bento tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _usage(*, signer: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=signer, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=not signer, crl_sign=not signer,
                         encipher_only=False, decipher_only=False)


def issue(ca_cert: x509.Certificate, ca_key, public_key, common_name: str, eku, *, eku_critical: bool = False,
          days: int = 30) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    return (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_usage(signer=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=eku_critical)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))


def make_chain(folder: Path, alg: str = "es256", name: str = "sdxl-bento test signer") -> Chain:
    """A CA and a signing certificate (``es256``: EC P-256, ``ed25519``), as PEM files in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name(f"{name} root CA")).issuer_name(_name(f"{name} root CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(_usage(signer=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1()) if alg == "es256" else ed25519.Ed25519PrivateKey.generate()
    leaf = issue(ca, ca_key, key.public_key(), name, ExtendedKeyUsageOID.EMAIL_PROTECTION)
    chain = Chain(cert=folder / f"{alg}-chain.pem", key=folder / f"{alg}-key.pem", root=folder / f"{alg}-root.pem",
                  ca_key=ca_key, ca_cert=ca)
    chain.cert.write_bytes(leaf.public_bytes(PEM) + ca.public_bytes(PEM))
    chain.key.write_bytes(key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    chain.key.chmod(0o600)
    chain.root.write_bytes(ca.public_bytes(PEM))
    return chain


@contextmanager
def time_stamping_authority(chain: Chain) -> Iterator[str]:
    """An RFC 3161 TSA on 127.0.0.1 whose certificate (EKU timeStamping, critical) the chain's CA issued; yields
    its URL. Answers each request with a granted TimeStampResp (a CMS SignedData over a TSTInfo)."""
    from asn1crypto import cms, core, tsp
    from asn1crypto import x509 as ax509

    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue(chain.ca_cert, chain.ca_key, key.public_key(), "sdxl-bento test TSA",
                 ExtendedKeyUsageOID.TIME_STAMPING, eku_critical=True)
    der = cert.public_bytes(serialization.Encoding.DER)
    tsa_cert = ax509.Certificate.load(der)
    serial = iter(range(1, 1 << 30))

    def answer(body: bytes) -> bytes:
        request = tsp.TimeStampReq.load(body)
        info = {"version": "v1", "policy": "1.3.6.1.4.1.99999.1", "message_imprint": request["message_imprint"],
                "serial_number": next(serial), "gen_time": dt.datetime.now(dt.timezone.utc)}
        if request["nonce"].native is not None:
            info["nonce"] = request["nonce"]
        content = tsp.TSTInfo(info).dump()
        attrs = cms.CMSAttributes([
            cms.CMSAttribute({"type": "content_type", "values": ["tst_info"]}),
            cms.CMSAttribute({"type": "message_digest", "values": [hashlib.sha256(content).digest()]}),
            cms.CMSAttribute({"type": "signing_certificate_v2",
                              "values": [{"certs": [{"cert_hash": hashlib.sha256(der).digest()}]}]}),
        ])
        signer = cms.SignerInfo({
            "version": "v1", "digest_algorithm": {"algorithm": "sha256"}, "signed_attrs": attrs,
            "sid": cms.SignerIdentifier({"issuer_and_serial_number": {"issuer": tsa_cert.issuer,
                                                                      "serial_number": tsa_cert.serial_number}}),
            "signature_algorithm": {"algorithm": "sha256_ecdsa"},
            "signature": key.sign(attrs.dump(), ec.ECDSA(hashes.SHA256()))})
        signed = cms.SignedData({
            "version": "v3", "digest_algorithms": [{"algorithm": "sha256"}],
            "encap_content_info": {"content_type": "tst_info", "content": core.ParsableOctetString(content)},
            "certificates": [tsa_cert] if request["cert_req"].native else [], "signer_infos": [signer]})
        token = cms.ContentInfo({"content_type": "signed_data", "content": signed})
        return tsp.TimeStampResp({"status": {"status": "granted"}, "time_stamp_token": token}).dump()

    class Handler(BaseHTTPRequestHandler):
        requests = 0

        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            reply = answer(self.rfile.read(int(self.headers["content-length"])))
            Handler.requests += 1
            self.send_response(200)
            self.send_header("content-type", "application/timestamp-reply")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()
