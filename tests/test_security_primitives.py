"""The security primitives: Ed25519 signed envelopes and a throwaway CA for NATS over TLS."""

import asyncio
import json
import os
import socket
import ssl
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509

from tierline_shared.security import signing, tls
from tierline_shared.security.signing import (
    BAD_SIGNATURE,
    NO_TRUSTED_KEY,
    UNSIGNED,
    SignatureError,
    generate_key,
    key_id,
    parse_public_key,
    public_key_text,
    read_private_key,
    sign,
    verify,
    write_private_key,
)

ROOT = Path(__file__).resolve().parents[1]
NATS_SERVER = ROOT / ".venv" / "bin" / "nats-server"
PAYLOAD = {"version": 3, "model": "tiny", "sha256": "ab" * 32, "note": "héllo"}


def _reason(envelope: bytes, trusted) -> str:
    with pytest.raises(SignatureError) as e:
        verify(envelope, trusted)
    return e.value.reason


# --- signing --------------------------------------------------------------------------------------------------------

def test_sign_verify_round_trip():
    key = generate_key()
    envelope = sign(PAYLOAD, key)
    doc = json.loads(envelope)
    assert doc["signed"] == PAYLOAD
    assert doc["signatures"][0]["keyid"] == key_id(key.public_key())
    assert verify(envelope, [key.public_key()]) == PAYLOAD
    # the signature covers the payload, not the envelope's layout
    assert verify(json.dumps(doc, indent=2).encode(), [key.public_key()]) == PAYLOAD


def test_tampered_payload_is_a_bad_signature():
    key = generate_key()
    doc = json.loads(sign(PAYLOAD, key))
    doc["signed"]["version"] = 4
    assert _reason(json.dumps(doc).encode(), [key.public_key()]) == BAD_SIGNATURE
    doc = json.loads(sign(PAYLOAD, key))
    doc["signed"]["extra"] = True
    assert _reason(json.dumps(doc).encode(), [key.public_key()]) == BAD_SIGNATURE


def test_untrusted_signer_is_a_bad_signature():
    trusted, stranger = generate_key(), generate_key()
    assert _reason(sign(PAYLOAD, stranger), [trusted.public_key()]) == BAD_SIGNATURE
    # a stranger claiming the trusted key's id does not help
    doc = json.loads(sign(PAYLOAD, stranger))
    doc["signatures"][0]["keyid"] = key_id(trusted)
    assert _reason(json.dumps(doc).encode(), [trusted.public_key()]) == BAD_SIGNATURE


def test_unsigned_inputs():
    trusted = [generate_key().public_key()]
    assert _reason(json.dumps(PAYLOAD).encode(), trusted) == UNSIGNED  # plain JSON, no "signed"
    assert _reason(b"{not json", trusted) == UNSIGNED
    assert _reason(b"\xff\xfe", trusted) == UNSIGNED
    assert _reason(b"[1, 2]", trusted) == UNSIGNED
    assert _reason(json.dumps({"signed": PAYLOAD, "signatures": []}).encode(), trusted) == UNSIGNED
    assert _reason(json.dumps({"signed": PAYLOAD}).encode(), trusted) == UNSIGNED
    assert _reason(json.dumps({"signed": [1], "signatures": [{}]}).encode(), trusted) == UNSIGNED


def test_no_trusted_key():
    envelope = sign(PAYLOAD, generate_key())
    assert _reason(envelope, []) == NO_TRUSTED_KEY


def test_rotation():
    old, new = generate_key(), generate_key()
    trusted = [old.public_key(), new.public_key()]
    assert verify(sign(PAYLOAD, new), trusted) == PAYLOAD
    both = signing.sign_with(PAYLOAD, [old, new])
    assert len(json.loads(both)["signatures"]) == 2
    assert verify(both, trusted) == PAYLOAD
    assert verify(both, [new.public_key()]) == PAYLOAD  # old dropped: its signature is ignored
    # an unknown key's signature next to a trusted one is ignored
    assert verify(signing.sign_with(PAYLOAD, [generate_key(), new]), [new.public_key()]) == PAYLOAD


def test_private_key_file(tmp_path):
    key = generate_key()
    path = write_private_key(tmp_path / "signing.pem", key)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert key_id(read_private_key(path)) == key_id(key)
    write_private_key(path, generate_key())  # overwriting keeps the mode and leaves no temporary file
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["signing.pem"]
    with pytest.raises(FileNotFoundError, match="missing.pem"):
        read_private_key(tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ValueError, match="junk.pem"):
        read_private_key(tmp_path / "junk.pem")
    _, ca_key = tls.make_ca(tmp_path / "ca")  # a PEM key, but EC
    with pytest.raises(ValueError, match="not an Ed25519 key"):
        read_private_key(ca_key)


def test_public_key_text():
    key = generate_key()
    text = public_key_text(key)
    assert text.startswith("ed25519:") and "\n" not in text
    assert public_key_text(parse_public_key(text)) == text == public_key_text(key.public_key())
    assert len(key_id(key)) == 16 and key_id(parse_public_key(text)) == key_id(key)
    for bad in ("", "ed25519:", "rsa:AAAA", "ed25519:!!!notbase64", "ed25519:" + "QUJD" * 4):
        with pytest.raises(ValueError) as e:
            parse_public_key(bad)
        assert repr(bad) in str(e.value)


# --- TLS ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA with a server certificate for 127.0.0.1/localhost, and a second, unrelated CA."""
    root = tmp_path_factory.mktemp("pki")
    ca, ca_key = tls.make_ca(root / "ca")
    cert, key = tls.make_server_cert(root / "server", ca, ca_key)
    other_ca, _ = tls.make_ca(root / "other", name="Someone else's CA")
    return {"ca": ca, "ca_key": ca_key, "cert": cert, "key": key, "other_ca": other_ca}


def test_certificate_files(pki):
    for key in (pki["ca_key"], pki["key"]):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    ca = x509.load_pem_x509_certificate(pki["ca"].read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server = x509.load_pem_x509_certificate(pki["cert"].read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert server.issuer == ca.subject
    with pytest.raises(ValueError, match="days"):
        tls.make_ca(pki["ca"].parent / "bad", days=0)


@pytest.fixture
def tls_server(pki):
    """A TLS echo-nothing server on 127.0.0.1: completes handshakes and sends b"ok" until the test ends."""
    ctx = tls.server_context(pki["cert"], pki["key"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with ctx.wrap_socket(conn, server_side=True) as s:
                    s.sendall(b"ok")
            except (ssl.SSLError, OSError):
                pass  # the client refused our certificate: expected in the negative tests

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join(timeout=5)
        listener.close()


def _handshake(port: int, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with ctx.wrap_socket(sock, server_hostname=server_hostname) as s:
            return s.recv(2)


def test_client_context_trusts_its_ca_only(pki, tls_server):
    ctx = tls.client_context(pki["ca"])
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert _handshake(tls_server, ctx) == b"ok"
    assert _handshake(tls_server, ctx, "localhost") == b"ok"
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls_server, tls.client_context(pki["other_ca"]))
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(tls_server, ctx, "evil.example")
    with pytest.raises(FileNotFoundError, match="nope.pem"):
        tls.client_context(pki["ca"].parent / "nope.pem")


def _start_nats_tls(workdir: Path, cert: Path, key: Path) -> tuple[subprocess.Popen, int]:
    conf = workdir / "nats.conf"
    conf.write_text(f'listen: 127.0.0.1:-1\ntls {{ cert_file: "{cert}", key_file: "{key}" }}\n')
    ports = workdir / "ports"
    ports.mkdir()
    proc = subprocess.Popen([str(NATS_SERVER), "-c", str(conf), "--ports_file_dir", str(ports)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for f in ports.glob(f"*_{proc.pid}.ports"):
            try:
                return proc, int(json.loads(f.read_text())["nats"][0].rsplit(":", 1)[1])
            except (ValueError, KeyError, IndexError):
                pass  # written but not whole yet
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError("nats-server did not report its port in 10 s")


@pytest.mark.skipif(not NATS_SERVER.exists(), reason="no nats-server binary in .venv/bin")
def test_nats_over_tls(pki, tmp_path):
    import nats

    proc, port = _start_nats_tls(tmp_path, pki["cert"], pki["key"])

    async def main():
        nc = await nats.connect(f"tls://127.0.0.1:{port}", tls=tls.client_context(pki["ca"]), connect_timeout=5,
                                allow_reconnect=False)
        try:
            sub = await nc.subscribe("tierline.test")
            await nc.publish("tierline.test", b"over tls")
            assert (await sub.next_msg(timeout=5)).data == b"over tls"
        finally:
            await nc.close()

        async def quiet(_e):
            pass

        # allow_reconnect=False: by default nats-py retries a failed first connection for about two minutes
        with pytest.raises(ssl.SSLCertVerificationError):
            await nats.connect(f"tls://127.0.0.1:{port}", tls=tls.client_context(pki["other_ca"]), connect_timeout=5,
                               allow_reconnect=False, error_cb=quiet)

    try:
        asyncio.run(asyncio.wait_for(main(), 20))
    finally:
        proc.kill()
        proc.wait(timeout=5)


def test_creds_init_brings_the_servers_permissions_up_to_this_version(tmp_path):
    """`nats-auth.conf` is derived from the registry: running `creds init` again (an upgrade) rewrites it with each
    role's permissions as this version gives them, keeping every identity; an unchanged one is left untouched."""
    from tierline_shared.security.credentials import init_credentials
    from tierline_shared.security.identities import AUTH_CONF, IdentityStore, auth_config, device_identity

    init_credentials(tmp_path, tls_hosts=())
    store = IdentityStore(tmp_path)
    store.create(device_identity("pi-1"))
    users, conf = store.users(), tmp_path / AUTH_CONF
    current = conf.read_text()
    assert current == auth_config(users)
    # as an older version wrote it: the board's model store read by message gets, not direct gets
    older = current.replace("$JS.API.DIRECT.GET.OBJ_", "$JS.API.STREAM.MSG.GET.OBJ_")
    assert older != current
    conf.write_text(older)
    init_credentials(tmp_path, tls_hosts=())
    assert conf.read_text() == current and store.users() == users  # the same identities, today's permissions
    before = conf.stat().st_mtime_ns
    init_credentials(tmp_path, tls_hosts=())
    assert conf.stat().st_mtime_ns == before  # nothing to change: not written
