"""Who may speak on the coordinator's control link, as a pure rule (no sockets).

The coordinator's ROUTER names each connection itself; a connection speaks
for a role only once a hello has proved that role: under CURVE with the
role's own key (the key's role, which the Guard hands each message as its
User-Id), in a local run with the secret the supervisor gave the processes
it started. Nothing else a connection says counts until then, and after
that only in the name of its role. A cluster run without keys proves
nothing: anyone who can reach the port can speak (docs/security.md).
"""
from __future__ import annotations

import secrets
from typing import Sequence

from pipeline.wire import protocol
from pipeline.wire.protocol import Message


class Membership:
    """``roles``: the run's worker roles; ``token``: the local run's secret
    (None: not a local run); ``curve``: the link is CURVE, so every message
    comes with its key's role."""

    def __init__(self, roles: Sequence[str], token: str | None, curve: bool):
        self.roles = frozenset(roles)
        self.token = token
        self.curve = curve
        self._conn: dict[str, bytes] = {}   # role -> its connection
        self._role: dict[bytes, str] = {}   # connection -> its role

    def speaker(self, conn: bytes, msg: Message, key_role: str | None) -> str:
        """The role ``msg`` speaks for, arriving on connection ``conn`` from a
        peer whose key is ``key_role``'s (None without CURVE); ValueError
        for a message that may not be taken."""
        if msg.kind == protocol.HELLO:
            role = msg.sender
            if role not in self.roles:
                raise ValueError(f"a hello from {role!r}, which is no role of this run")
            if self.curve:
                if key_role != role:
                    raise ValueError(f"a hello as {role} from a peer holding {key_role}'s key")
            elif self.token is not None and not secrets.compare_digest(
                    protocol.token(msg).encode(), self.token.encode()):
                raise ValueError(f"a hello as {role} without this run's secret")
            return role
        role = self._role.get(conn)
        if role is None:
            raise ValueError(f"a {msg.kind} from a connection that has not said hello")
        if msg.sender != role:
            raise ValueError(f"a {msg.kind} signed {msg.sender!r} on {role}'s connection")
        if self.curve and key_role != role:
            raise ValueError(f"a {msg.kind} on {role}'s connection with another key")
        return role

    def tie(self, role: str, conn: bytes) -> None:
        """A proven hello: ``conn`` now speaks for ``role`` (a role that says
        hello again, restarted before the start, moves to its new connection)."""
        old = self._conn.get(role)
        if old is not None:
            self._role.pop(old, None)
        self._conn[role], self._role[conn] = conn, role

    def conn(self, role: str) -> bytes | None:
        return self._conn.get(role)

    def role(self, conn: bytes) -> str | None:
        return self._role.get(conn)
