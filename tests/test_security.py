"""CURVE keys on disk, who gets through a guarded socket and why not, and the
rule for when a run may listen unencrypted."""
from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import replace

import pytest
import zmq
import zmq.auth

from pipeline.net import security
from pipeline.wire import protocol
from pipeline.net.security import Guard, Refusals
from pipeline.net.transport import LOCAL_IPC
from tests.conftest import error_line, run_launch

REFUSAL_WAIT_MS = 5000   # a refusal is a local handshake: it comes in milliseconds
SILENCE_MS = 1500        # how long a refused client's message must stay away

needs_curve = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class Sockets:
    """Sockets and monitors of one test, all closed at its end."""

    def __init__(self, ctx: zmq.Context):
        self.ctx = ctx
        self.closers: list = []

    def socket(self, kind: int) -> zmq.Socket:
        s = self.ctx.socket(kind)
        s.linger = 0
        s.rcvtimeo = s.sndtimeo = REFUSAL_WAIT_MS  # fail, never hang
        self.closers.append(s.close)
        return s

    def refusals(self, sock: zmq.Socket) -> Refusals:
        r = Refusals(sock)
        self.closers.insert(0, r.close)  # before its socket
        return r


@pytest.fixture
def keydir(tmp_path):
    out = tmp_path / "run-keys"
    security.generate_keys(out, protocol.all_roles(2))
    return out


def term(ctx: zmq.Context, timeout_s: float = 5.0) -> None:
    """ctx.term() blocks in C while a socket is open, where pytest-timeout's
    signal cannot reach it: a leaked socket fails the test instead."""
    t = threading.Thread(target=ctx.term, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), "a socket of this context was left open"


@pytest.fixture
def ctx():
    ctx = zmq.Context()
    yield ctx
    term(ctx)


@pytest.fixture
def sockets(ctx):
    s = Sockets(ctx)
    yield s
    for close in s.closers:
        close()


@pytest.fixture
def server(ctx, keydir, sockets):
    """layer1's guarded activation inbox, which admits the source's key
    alone: (socket, endpoint, its refusals)."""
    with Guard(ctx, security.load_keys(keydir, "layer1")) as guard:
        s = sockets.socket(zmq.PULL)
        security.make_server(s, guard.keys, "act", ["source"])
        refusals = sockets.refusals(s)
        port = s.bind_to_random_port("tcp://127.0.0.1")
        yield s, f"tcp://127.0.0.1:{port}", refusals


def connect_and_send(sockets: Sockets, endpoint: str, secure,
                     refused: bool = False) -> Refusals:
    """``refused``: the server will refuse the handshake."""
    c = sockets.socket(zmq.PUSH)
    secure(c)
    refusals = sockets.refusals(c)
    c.connect(endpoint)
    # Queued whether or not the server will take it: the pipe exists from
    # connect() on, the handshake runs later, and ZeroMQ never tells the
    # sender. Unless the refusal came first (the I/O thread may finish the
    # handshake before this line runs, as on a busy machine): libzmq then
    # sometimes ends the client's session, pipe and all, and the send has
    # nowhere to go (Again). Nothing went through either way.
    try:
        c.send(b"weights", zmq.NOBLOCK)
    except zmq.Again:
        if not refused:
            raise
    return refusals


# -- keys on disk ------------------------------------------------------------

def test_generate_keys_writes_a_private_pair_per_role(tmp_path):
    out = tmp_path / "keys"
    roles = protocol.all_roles(3)
    written = security.generate_keys(out, roles)
    assert written == [out / f"{r}{s}" for r in roles for s in (".key", ".key_secret")]
    assert sorted(os.listdir(out)) == sorted(p.name for p in written)  # no staging left over
    assert mode(out) == 0o700
    for role in roles:
        assert mode(out / f"{role}.key_secret") == 0o600
        public, secret = zmq.auth.load_certificate(out / f"{role}.key_secret")
        assert secret is not None
        assert zmq.auth.load_certificate(out / f"{role}.key") == (public, None)


def test_generate_keys_never_replaces_a_key(tmp_path):
    out = tmp_path / "keys"
    security.generate_keys(out, ["source"])
    before = (out / "source.key_secret").read_bytes()
    with pytest.raises(ValueError, match=r"source\.key exists"):
        security.generate_keys(out, ["layer1", "source"])
    (out / "source.key").unlink()  # a lone secret is guarded too
    with pytest.raises(ValueError, match=r"source\.key_secret exists"):
        security.generate_keys(out, ["layer1", "source"])
    assert (out / "source.key_secret").read_bytes() == before
    assert not (out / "layer1.key").exists()  # all or nothing
    security.generate_keys(out, ["layer1"])   # a new role in the same directory is fine
    with pytest.raises(ValueError, match="bad role name"):
        security.generate_keys(out, ["../evil"])


@pytest.mark.slow
def test_keys_where_they_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot write keys in .*file/keys: Not a directory"):
        security.generate_keys(tmp_path / "file" / "keys", ["source"])
    done = run_launch("keys", "--out", str(tmp_path / "file" / "keys"))
    assert done.returncode == 2
    assert error_line(done).startswith("launch.py: error: cannot write keys in ")


def test_load_keys_round_trip(tmp_path):
    security.generate_keys(tmp_path, protocol.all_roles(2))
    keys = security.load_keys(tmp_path, "layer1")
    public, secret = zmq.auth.load_certificate(tmp_path / "layer1.key_secret")
    assert (keys.role, keys.public, keys.secret, keys.directory) == ("layer1", public, secret,
                                                                     tmp_path)
    assert keys.public == zmq.auth.load_certificate(tmp_path / "layer1.key")[0]
    assert set(keys.peers) == {"coordinator", "source", "layer1", "output"}
    assert keys.peers["output"] == zmq.auth.load_certificate(tmp_path / "output.key")[0]
    assert secret.decode() not in repr(keys)


def test_load_keys_names_what_is_missing_or_wrong(tmp_path):
    with pytest.raises(ValueError, match="nowhere"):
        security.load_keys(tmp_path / "nowhere", "source")
    security.generate_keys(tmp_path, ["source", "output"])
    with pytest.raises(ValueError, match="layer7.key_secret"):
        security.load_keys(tmp_path, "layer7")
    os.chmod(tmp_path / "source.key_secret", 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        security.load_keys(tmp_path, "source")
    (tmp_path / "output.key").write_text('curve\n    public-key = "short"\n')
    with pytest.raises(ValueError, match="output.key"):
        security.load_keys(tmp_path, "output")


def test_a_host_needs_only_its_own_secret_and_the_public_keys(tmp_path):
    security.generate_keys(tmp_path / "all", protocol.all_roles(2))
    host = tmp_path / "host-of-layer1"
    host.mkdir()
    for f in (tmp_path / "all").iterdir():
        if f.suffix == ".key" or f.name == "layer1.key_secret":
            (host / f.name).write_bytes(f.read_bytes())
            os.chmod(host / f.name, 0o600)
    keys = security.load_keys(host, "layer1")
    assert set(keys.peers) == set(protocol.all_roles(2))
    with pytest.raises(ValueError, match="no secret key for role 'layer2'|layer2.key_secret"):
        security.load_keys(host, "layer2")


def test_two_roles_may_not_share_a_key(tmp_path):
    security.generate_keys(tmp_path, ["source", "layer1"])
    (tmp_path / "output.key").write_bytes((tmp_path / "layer1.key").read_bytes())
    with pytest.raises(ValueError, match="layer1, output share one public key"):
        security.load_keys(tmp_path, "source")


def test_make_client_needs_a_known_server_role(tmp_path, sockets):
    security.generate_keys(tmp_path, ["source"])
    keys = security.load_keys(tmp_path, "source")
    with pytest.raises(ValueError, match="layer9"):
        security.make_client(sockets.socket(zmq.PUSH), keys, "layer9")


# -- who gets through --------------------------------------------------------

@needs_curve
@pytest.mark.timeout(30)
def test_known_keys_get_through(server, sockets, keydir):
    s, endpoint, refusals = server
    keys = security.load_keys(keydir, "source")
    connect_and_send(sockets, endpoint, lambda c: security.make_client(c, keys, "layer1"))
    assert s.poll(REFUSAL_WAIT_MS), "nothing arrived"
    frame = s.recv(copy=False)
    assert frame.bytes == b"weights"
    assert security.user_id(frame) == "source"  # the key's role, vouched for by the Guard
    assert refusals.poll() == []


def unknown_client_key(tmp_path, keydir):
    """Its own keypair, not in the key directory, and the right server key."""
    security.generate_keys(tmp_path / "elsewhere", ["source"])
    own = security.load_keys(tmp_path / "elsewhere", "source")
    knows = replace(own, peers=security.load_keys(keydir, "source").peers)
    return lambda c: security.make_client(c, knows, "layer1")


def wrong_server_key(tmp_path, keydir):
    """A run member that encrypts for the wrong server (its own public key)."""
    keys = security.load_keys(keydir, "source")
    return lambda c: security.make_client(c, keys, "source")


def no_curve(tmp_path, keydir):
    return lambda c: None


def another_roles_key(tmp_path, keydir):
    """A member of the run, but not the role this socket admits: the
    output's key on layer1's activation inbox (only the source's opens it)."""
    keys = security.load_keys(keydir, "output")
    return lambda c: security.make_client(c, keys, "layer1")


@needs_curve
@pytest.mark.timeout(30)
@pytest.mark.parametrize("client, server_sees, client_sees", [
    (unknown_client_key, "ZAP status 400", "ZAP status 400"),
    (wrong_server_key, "decryption failed", "closed the connection"),
    (no_curve, "mechanism mismatch", "mechanism mismatch"),
    (another_roles_key, "ZAP status 400", "ZAP status 400"),
], ids=["unknown-client-key", "wrong-server-key", "no-curve", "another-roles-key"])
def test_bad_clients_get_nothing_through(server, sockets, keydir, tmp_path,
                                         client, server_sees, client_sees):
    s, endpoint, server_refusals = server
    client_refusals = connect_and_send(sockets, endpoint, client(tmp_path, keydir), refused=True)
    # wait for the refusal itself (a handshake, not a sleep), then make sure
    # nothing slips through afterwards either
    assert server_sees in " | ".join(server_refusals.poll(REFUSAL_WAIT_MS))
    assert client_sees in " | ".join(client_refusals.poll(REFUSAL_WAIT_MS))
    assert s.poll(SILENCE_MS) == 0
    assert server_refusals.count >= 1


@needs_curve
@pytest.mark.timeout(30)
def test_unguarded_curve_server_is_refused(ctx, sockets, keydir):
    s = sockets.socket(zmq.PULL)
    with pytest.raises(RuntimeError, match="Guard"):
        security.make_server(s, security.load_keys(keydir, "layer1"), "act", ["source"])


@needs_curve
@pytest.mark.timeout(30)
def test_without_a_guard_libzmq_admits_any_client_key(ctx, sockets, keydir, tmp_path):
    """Why make_server insists on a Guard: a CURVE server with no ZAP handler
    encrypts, but lets every keypair in."""
    keys = security.load_keys(keydir, "layer1")
    s = sockets.socket(zmq.PULL)
    s.curve_secretkey, s.curve_publickey, s.curve_server = keys.secret, keys.public, True
    port = s.bind_to_random_port("tcp://127.0.0.1")
    connect_and_send(sockets, f"tcp://127.0.0.1:{port}", unknown_client_key(tmp_path, keydir))
    assert s.poll(REFUSAL_WAIT_MS) and s.recv() == b"weights"


@needs_curve
@pytest.mark.timeout(30)
def test_one_guard_per_context(ctx, keydir):
    keys = security.load_keys(keydir, "layer1")
    with Guard(ctx, keys):
        with pytest.raises(RuntimeError, match="already"):
            Guard(ctx, keys).__enter__()  # and leaks no socket: ctx's teardown checks


# -- when a run may go unencrypted --------------------------------------------

@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LocalHost", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.2", False), ("0.0.0.0", False), ("*", False), ("::", False),
    ("192.168.1.5", False), ("node7.cluster", False), ("128.0.0.1", False), ("", False),
])
def test_is_loopback(host, loopback):
    assert security.is_loopback(host) is loopback


@pytest.mark.parametrize("hosts, key_dir, insecure, policy", [
    (["127.0.0.1", "localhost", "::1"], None, False, "plain"),
    (["127.0.0.1"], None, True, "plain"),
    ([], None, False, "plain"),
    (["127.0.0.1", "10.0.0.2"], None, True, "insecure"),
    (["127.0.0.1", "10.0.0.2"], "keys", False, "curve"),
    (["127.0.0.1"], "keys", False, "curve"),
    (["10.0.0.2"], "keys", True, "curve"),
])
def test_check_policy(hosts, key_dir, insecure, policy):
    assert security.check_policy(hosts, key_dir, insecure) == policy


def test_check_policy_refuses_exposed_hosts_without_keys():
    with pytest.raises(ValueError) as err:
        security.check_policy(["127.0.0.1", "10.0.0.2", "10.0.0.3"], None, False)
    msg = str(err.value)
    assert "10.0.0.2" in msg and "keys" in msg and "--insecure" in msg
    with pytest.raises(ValueError, match="empty"):
        security.check_policy(["10.0.0.2"], "", False)


# --- local runs: another user of the machine -----------------------------------------

def try_as(uid: int | None, endpoints: list[str], files: list[str]) -> dict[str, str]:
    """In a forked child running as ``uid`` (None: as we are): connect to each
    Unix-socket endpoint and read each file; what happened to each."""
    import socket
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            out = {}
            for ep in endpoints:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    try:
                        s.connect(ep[len("ipc://"):])
                        out[ep] = "connected"
                    except OSError as exc:
                        out[ep] = type(exc).__name__
            for f in files:
                try:
                    with open(f) as fh:
                        fh.read()
                    out[f] = "read"
                except OSError as exc:
                    out[f] = type(exc).__name__
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        text = fh.read()
    os.waitpid(pid, 0)
    return json.loads(text)


@pytest.mark.slow
@pytest.mark.skipif(not LOCAL_IPC or os.geteuid() != 0,
                    reason="needs Unix sockets and root, to act as another user")
def test_another_user_can_neither_connect_nor_read_the_run(launch):
    """Everything another user of the machine could try, from a process
    running as 'nobody': connect to the control socket and every data socket,
    read config.json (run id, endpoints) and the metrics."""
    run = launch("--epochs", "100000", "--quiet")
    config = run.wait_started()
    run.wait_training()
    endpoints = [config["supervisor"]["control"]] + [
        ep for p in config["processes"].values() for ep in p["endpoints"].values()]
    assert len(endpoints) == 1 + 2 + 2 + 1  # control; act and grad of 2 hidden layers; output act
    files = [str(run.run_dir / "config.json"), str(run.run_dir / "metrics.jsonl")]
    assert try_as(65534, endpoints, files) == {x: "PermissionError" for x in endpoints + files}
    # The same attempt as the run's own user gets through: the test can tell.
    assert set(try_as(None, endpoints[:1], files).values()) == {"connected", "read"}
