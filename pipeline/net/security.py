"""CURVE keys, encrypted and authenticated sockets, and the rule for when a run may go unencrypted."""
from __future__ import annotations

import ipaddress
import os
import re
import shutil
import stat
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Sequence

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from pipeline.files import make_private_dirs

PUBLIC_SUFFIX = ".key"            # czmq/pyzmq convention: the ZAP handler loads every *.key
SECRET_SUFFIX = ".key_secret"
_ROLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # becomes a file name: no paths

# The running Guard of each context. Without a ZAP handler libzmq lets a
# CURVE server accept *any* client keypair, so make_server refuses an
# unguarded one.
_guards: "weakref.WeakKeyDictionary[zmq.Context, Guard]" = weakref.WeakKeyDictionary()


# -- keys ---------------------------------------------------------------------

def _check_role(role: str) -> None:
    if not isinstance(role, str) or not _ROLE_NAME.fullmatch(role):
        raise ValueError(f"bad role name {role!r}: letters, digits, '-' and '_' only")


def generate_keys(out_dir: str | os.PathLike, roles: list[str]) -> list[Path]:
    """One CURVE keypair per role in ``out_dir``: ``<role>.key`` (public) and
    ``<role>.key_secret`` (mode 0600). Returns the files written, per role
    public then secret. Never replaces an existing key file."""
    out = Path(out_dir)
    for role in roles:
        _check_role(role)
    if len(set(roles)) != len(roles):
        raise ValueError(f"duplicate role names in {roles}")
    names = [role + suffix for role in roles for suffix in (PUBLIC_SUFFIX, SECRET_SUFFIX)]
    for name in names:
        if (out / name).exists():
            raise ValueError(f"{out / name} exists: refusing to replace a key "
                             "(remove it or choose another directory)")
    try:
        if not out.exists():
            make_private_dirs(out)  # its parents too: mkdir's parents get the default mode
        elif not out.is_dir():
            raise ValueError(f"{out} is not a directory")
        # pyzmq writes the secret file with the umask's mode and we can only
        # chmod it afterwards; writing into a fresh 0700 directory first means
        # nobody else can open it in between, even when out_dir is shared.
        stage = Path(tempfile.mkdtemp(prefix=".keys-", dir=out))
    except OSError as exc:
        raise ValueError(f"cannot write keys in {out}: {exc.strerror or exc}") from None
    written: list[Path] = []
    try:
        for role in roles:
            _, secret = zmq.auth.create_certificates(stage, role)
            os.chmod(secret, 0o600)
        for name in names:
            try:
                os.link(stage / name, out / name)  # unlike rename, fails if the target exists
            except FileExistsError:
                raise ValueError(f"{out / name} appeared while writing keys: refusing to "
                                 "replace it") from None
            written.append(out / name)
    except BaseException:
        for path in written:  # all or nothing: a half set of keys only confuses
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return written


@dataclass(frozen=True)
class Keys:
    """One role's keypair and every role's public key (z85, 40 bytes each)."""
    role: str
    public: bytes
    secret: bytes = field(repr=False)  # never in a log line or a traceback
    peers: dict[str, bytes]            # role -> public key, every *.key of the directory
    directory: Path | None             # None: keys made for one run, held in memory (memory_keys)


def _read_key_file(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read key file {path}: {exc}") from None
    for key in (public, secret):
        if key is None:
            continue
        try:  # a damaged key would otherwise surface later as EINVAL from setsockopt
            ok = len(key) == 40 and len(z85.decode(key)) == 32
        except Exception:  # z85.decode raises assorted errors on bad characters
            ok = False
        if not ok:
            raise ValueError(f"key file {path} holds a malformed key (want 40 z85 characters)")
    return public, secret


def load_keys(key_dir: str | os.PathLike, role: str) -> Keys:
    """``role``'s keypair from ``<role>.key_secret`` and every peer's public key
    from the ``*.key`` files of ``key_dir`` (peer role = file stem)."""
    _check_role(role)
    directory = Path(key_dir)
    if not directory.is_dir():
        raise ValueError(f"key directory {directory} does not exist "
                         f"(create it with 'python launch.py keys --out {directory}')")
    secret_file = directory / (role + SECRET_SUFFIX)
    if not secret_file.is_file():
        raise ValueError(f"no secret key for role {role!r}: {secret_file} is missing")
    mode = secret_file.stat().st_mode
    if os.name == "posix" and mode & 0o077:
        # as ssh does: a secret others can read is no longer a secret
        raise ValueError(f"secret key file {secret_file} is accessible by other users "
                         f"(mode {stat.S_IMODE(mode):04o}): chmod 600 {secret_file}")
    public, secret = _read_key_file(secret_file)
    if secret is None:
        raise ValueError(f"{secret_file} holds no secret key")
    peers = {p.stem: _read_key_file(p)[0] for p in sorted(directory.glob("*" + PUBLIC_SUFFIX))}
    if not peers:
        raise ValueError(f"no public keys (*{PUBLIC_SUFFIX}) in {directory}")
    if role in peers and peers[role] != public:
        # peers would check us against the .key file, so a mismatch locks us out
        raise ValueError(f"{directory / (role + PUBLIC_SUFFIX)} does not match {secret_file}")
    shared = [r for r in peers if list(peers.values()).count(peers[r]) > 1]
    if shared:
        # a key is a role: one key for two roles could speak as either
        raise ValueError(f"roles {', '.join(shared)} share one public key in {directory}: "
                         "each role needs a keypair of its own")
    return Keys(role, public, secret, peers, directory)


# -- sockets ------------------------------------------------------------------

def make_server(sock: zmq.Socket, keys: Keys, domain: str, admit: Sequence[str]) -> None:
    """Make ``sock`` a CURVE server that admits the keys of the roles in
    ``admit`` and no other; call before bind(), with a Guard running on the
    socket's context. ``domain``: the socket's name for the Guard, one per
    bound socket of the process."""
    guard = _guards.get(sock.context)
    if guard is None:
        raise RuntimeError("start a security.Guard on this socket's context before "
                           "make_server: without one, libzmq admits any client keypair")
    guard.admit(domain, admit)
    sock.zap_domain = domain.encode()
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True


def make_client(sock: zmq.Socket, keys: Keys, server_role: str) -> None:
    """Make ``sock`` a CURVE client of ``server_role``; call before connect()."""
    if server_role not in keys.peers:
        raise ValueError(f"no public key for role {server_role!r} in "
                         f"{keys.directory or 'the run' + chr(39) + 's keys'} "
                         f"(have: {', '.join(sorted(keys.peers))})")
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.curve_serverkey = keys.peers[server_role]


class _RoleAuthenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler, with the client's role (not its key) as the
    User-Id a receiver sees on each message (``frame.get("User-Id")``)."""

    def __init__(self, ctx: zmq.Context, role_of: dict[bytes, str]):
        super().__init__(ctx)
        self.role_of = role_of

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self.role_of[z85.encode(client_public_key)]


class Guard:
    """The ZAP handler of a context: a CURVE server socket admits only the
    keys of the roles named for it (``admit``, called by ``make_server``),
    and each message it receives carries the sender's role as its User-Id.
    A key not named for a socket gets no further than the handshake.

    One per context (libzmq allows one ZAP handler, and frees its endpoint
    only some time after the Guard exits). Leave the Guard before destroying
    the context: its thread holds sockets of it.
    """

    def __init__(self, ctx: zmq.Context, keys: Keys):
        self.ctx = ctx
        self.keys = keys
        self._auth: _RoleAuthenticator | None = None

    def __enter__(self) -> "Guard":
        auth = _RoleAuthenticator(self.ctx, {pub: role for role, pub in self.keys.peers.items()})
        try:
            auth.start()
        except zmq.ZMQError as exc:
            # pyzmq leaves the unbound ZAP socket open, and an open socket
            # makes ctx.term() hang: stop() closes it
            auth.stop()
            if exc.errno == zmq.EADDRINUSE:
                raise RuntimeError("this context's ZAP endpoint is taken: a Guard already "
                                   "runs on it (or has only just stopped)") from None
            raise
        self._auth = auth
        _guards[self.ctx] = self
        return self

    def admit(self, domain: str, roles: Sequence[str]) -> None:
        """The sockets of ``domain`` admit the keys of ``roles`` and no other."""
        missing = [r for r in roles if r not in self.keys.peers]
        if missing:
            where = self.keys.directory or "the run's keys"
            raise ValueError(f"no public key for role {missing[0]!r} in {where} "
                             f"(have: {', '.join(sorted(self.keys.peers))})")
        if self._auth is None:
            raise RuntimeError("the Guard is not running")
        # one assignment: the ZAP thread sees the old set or the new one
        self._auth.certs[domain] = {self.keys.peers[r]: True for r in roles}

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if _guards.get(self.ctx) is self:
            del _guards[self.ctx]
        auth, self._auth = self._auth, None
        if auth is None:
            return
        if self.ctx.closed:
            # its sockets are gone with the context; the daemon thread cannot be
            # told to stop and ends with the process
            return
        auth.stop()


def user_id(frame: zmq.Frame) -> str | None:
    """The role of the peer that sent ``frame`` on a CURVE socket (None
    where no Guard vouched for it: a socket without CURVE)."""
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:
        return None


def memory_keys(role: str) -> Keys:
    """A fresh CURVE keypair for ``role``, held in memory only (no files):
    its peers are filled in once the others' public keys are known."""
    _check_role(role)
    public, secret = zmq.curve_keypair()
    return Keys(role, public, secret, {role: public}, None)


# -- observing refusals -------------------------------------------------------

_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
           | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_PROTOCOL_REASONS = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "peer does not use CURVE (mechanism mismatch)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "CURVE decryption failed (client has a wrong server key?)",
    zmq.PROTOCOL_ERROR_ZMTP_KEY_EXCHANGE: "CURVE key exchange failed",
}


def describe_failure(event: int, value: int) -> str:
    """A handshake-failure monitor event as one line."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return f"refused by the key check (ZAP status {value}: client key not in the key directory)"
    if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
        return _PROTOCOL_REASONS.get(value, f"handshake protocol error 0x{value:x}")
    # no detail: the peer just hung up, as a CURVE server does on a client
    # that encrypted for the wrong server key
    return f"peer closed the connection during the handshake ({os.strerror(value)})"


class Refusals:
    """Failed handshakes of one socket, from its monitor. ZeroMQ never tells
    a sender its messages go nowhere (a refused PUSH still queues them), so
    this is how either side can learn why. Create before bind()/connect()."""

    def __init__(self, sock: zmq.Socket):
        self._sock = sock
        self._monitor: zmq.Socket | None = sock.get_monitor_socket(_FAILED)
        self.reasons: list[str] = []

    def poll(self, timeout_ms: int = 0) -> list[str]:
        """The failures reported since the last call, waiting up to
        ``timeout_ms`` for the first one."""
        new: list[str] = []
        if self._monitor is None:
            return new
        wait = timeout_ms
        while self._monitor.poll(wait):
            event = recv_monitor_message(self._monitor)
            # pyzmq tries to read `value` as an Event flag; the number is what counts
            new.append(describe_failure(int(event["event"]), int(event["value"])))
            wait = 0
        self.reasons.extend(new)
        return new

    @property
    def count(self) -> int:
        return len(self.reasons)

    def close(self) -> None:
        if self._monitor is None:
            return
        if not self._sock.closed:
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._monitor = None


# -- policy -------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach: 127.0.0.0/8, ::1
    (also IPv4-mapped) and "localhost". Other names may resolve to anything,
    so they count as exposed."""
    h = host.strip().lower()
    if h.startswith("[") and h.endswith("]"):  # IPv6 as written in an endpoint
        h = h[1:-1]
    if h == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(h)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def check_policy(hosts: list[str], key_dir: str | None, insecure: bool) -> str:
    """How a run's sockets are secured: "curve" (keys given), "plain" (every
    host is loopback, no keys) or "insecure" (exposed hosts, no keys, and the
    user said --insecure; the caller warns loudly). Otherwise ValueError."""
    if key_dir is not None:
        if not str(key_dir).strip():
            raise ValueError("the key directory is an empty string")
        return "curve"
    exposed = [h for h in hosts if not is_loopback(h)]
    if not exposed:
        return "plain"
    if insecure:
        return "insecure"
    raise ValueError(f"refusing to listen on {exposed[0]} without encryption: generate keys "
                     "with 'python launch.py keys --out DIR' and name them in the cluster "
                     "file, or pass --insecure")
