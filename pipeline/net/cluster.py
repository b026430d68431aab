"""A cluster file: which host and port each role listens on, the run's
settings, and where the keys are. TOML or JSON, checked on load."""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.wire import protocol
from pipeline.config import Config, defaults_for

if TYPE_CHECKING:
    from pipeline.net.security import Keys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: JSON cluster files only
    tomllib = None


@dataclass(frozen=True)
class Placement:
    role: str
    host: str
    port: int   # activations here, gradients on port + 1; 0: the OS picks (local runs)

    def endpoint(self, offset: int = 0) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port + offset if self.port else 0}"


@dataclass(frozen=True)
class Cluster:
    path: Path
    run: dict                       # Config fields from the [run] table
    roles: dict[str, Placement]     # every role of the run
    keys: Path | None               # CURVE key directory, None: no encryption

    def config(self, **overrides) -> Config:
        run = {**self.run, **overrides}
        return Config.from_dict({**defaults_for(run.get("dataset", "addition"),
                                                run.get("unlock", "none")), **run})

    def policy(self, insecure: bool) -> str:
        """"curve", "plain" (loopback only) or "insecure"; ValueError for a
        non-loopback address without keys and without --insecure."""
        from pipeline.net import security
        return security.check_policy([p.host for p in self.roles.values()],
                                     str(self.keys) if self.keys else None, insecure)

    def keys_for(self, role: str, insecure: bool) -> "Keys | None":
        """``role``'s CURVE keys, or None where the policy is not CURVE."""
        from pipeline.net import security
        return security.load_keys(self.keys, role) if self.policy(insecure) == "curve" else None

    def local_roles(self) -> list[str]:
        """The roles this machine is to run: those whose host is one of its addresses."""
        return [r for r, p in self.roles.items() if is_local(p.host)]


def is_local(host: str) -> bool:
    """Can this machine listen on ``host``? (Binding a UDP socket answers
    that without sending anything.)"""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.bind((addr[0], 0))
            return True
        except OSError:
            continue
    return False


def _fail(path: Path, message: str) -> ValueError:
    return ValueError(f"cluster file {path}: {message}")


def _placement(path: Path, role: str, value: object) -> Placement:
    if not isinstance(value, str) or not value:
        raise _fail(path, f"roles.{role} must be \"HOST:PORT\", got {value!r}")
    host, sep, port = value.rpartition(":")
    if not sep or host.count(":") and not host.startswith("["):
        host, port = value, ""  # no port given (fine for the source, which only connects)
    host = host.strip("[]")
    if port == "":
        if role != "source":
            raise _fail(path, f"roles.{role} needs a port: \"{host}:PORT\"")
        return Placement(role, host, 0)
    if not port.isdigit() or not 1 <= int(port) <= 65534:
        raise _fail(path, f"roles.{role}: port must be 1..65534, got {port!r}")
    return Placement(role, host, int(port))


def load(path: str | Path) -> Cluster:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise _fail(path, f"cannot read it ({exc.strerror})") from None
    try:
        if path.suffix == ".json":
            doc = json.loads(raw)
        elif tomllib is None:
            raise _fail(path, "TOML needs Python 3.11; write the cluster file as .json")
        else:
            doc = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(path, f"not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {exc}") from None
    if not isinstance(doc, dict):
        raise _fail(path, "must be a table")
    unknown = set(doc) - {"run", "roles", "keys"}
    if unknown:
        raise _fail(path, f"unknown keys {sorted(unknown)}; expected run, roles, keys")
    run = doc.get("run", {})
    names = {f.name for f in fields(Config)} - {"in_process"}
    if not isinstance(run, dict) or set(run) - names:
        raise _fail(path, f"[run] may only set run options, not {sorted(set(run) - names)}")
    try:
        cfg = Config.from_dict({**defaults_for(run.get("dataset", "addition"),
                                               run.get("unlock", "none")), **run})
    except ValueError as exc:
        raise _fail(path, f"[run]: {exc}") from None
    roles_doc = doc.get("roles")
    if not isinstance(roles_doc, dict):
        raise _fail(path, "needs a [roles] table naming where each role listens")
    need = protocol.all_roles(cfg.layers)
    missing = [r for r in need if r not in roles_doc]
    extra = sorted(set(roles_doc) - set(need))
    if missing or extra:
        raise _fail(path, f"--layers {cfg.layers} needs roles {need}; "
                          f"missing {missing}, not part of this run {extra}")
    roles = {r: _placement(path, r, roles_doc[r]) for r in need}
    taken: dict[tuple[str, int], str] = {}
    for p in roles.values():
        if p.role in ("coordinator", "source"):
            ports = [p.port] if p.role == "coordinator" else [p.port, p.port + 1]
        else:  # PORT, PORT+1, ...: one per data inbox
            index = cfg.layers if p.role == "output" else int(p.role.removeprefix("layer"))
            inboxes = protocol.data_inboxes(index, cfg.layers, cfg.unlocks(index))
            ports = [p.port + i for i in range(len(inboxes))]
        for port in ports if p.port else []:
            other = taken.setdefault((p.host, port), p.role)
            if other != p.role:
                raise _fail(path, f"{p.role} and {other} both listen on {p.host}:{port} "
                                  "(a hidden layer uses PORT and PORT+1, and PORT+2 "
                                  "under --unlock forward)")
    keys = doc.get("keys")
    if keys is not None and (not isinstance(keys, str) or not keys):
        raise _fail(path, f"keys must be a directory name, got {keys!r}")
    key_dir = (path.parent / keys) if keys else None
    return Cluster(path, run, roles, key_dir)
