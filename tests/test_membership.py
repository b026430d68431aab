"""pipeline.coord.membership: who may speak on the control link, as an exact table."""
from __future__ import annotations

import pytest

from pipeline.coord.membership import Membership
from pipeline.wire.protocol import Speaker

pytestmark = pytest.mark.timeout(10)

ROLES = ["source", "layer1", "output"]
TOKEN = "s3cret"


def hello(role: str, token: str = "") -> object:
    return Speaker("", role).hello(token)


def heartbeat(role: str) -> object:
    return Speaker("run", role).heartbeat()


# (membership, connection, message, key's role) -> the role it speaks for, or the refusal
LOCAL, CURVE, OPEN = (dict(token=TOKEN, curve=False), dict(token=None, curve=True),
                      dict(token=None, curve=False))
TABLE = [
    (LOCAL, b"c1", hello("layer1", TOKEN), None, "layer1"),
    (LOCAL, b"c1", hello("layer1"), None, "without this run's secret"),
    (LOCAL, b"c1", hello("layer1", "guess"), None, "without this run's secret"),
    (LOCAL, b"c1", hello("layer9", TOKEN), None, "no role of this run"),
    (CURVE, b"c1", hello("layer1"), "layer1", "layer1"),
    (CURVE, b"c1", hello("layer1", TOKEN), "layer2", "holding layer2's key"),
    (CURVE, b"c1", hello("layer1"), None, "holding None's key"),
    (OPEN, b"c1", hello("layer1"), None, "layer1"),  # a cluster without keys proves nothing
    # c0 is tied to layer1 below
    (LOCAL, b"c0", heartbeat("layer1"), None, "layer1"),
    (LOCAL, b"c0", heartbeat("output"), None, "signed 'output' on layer1's connection"),
    (LOCAL, b"c9", heartbeat("layer1"), None, "has not said hello"),
    (CURVE, b"c0", heartbeat("layer1"), "layer1", "layer1"),
    (CURVE, b"c0", heartbeat("layer1"), "output", "with another key"),
]


@pytest.mark.parametrize("kind, conn, msg, key_role, want", TABLE)
def test_who_speaks(kind, conn, msg, key_role, want):
    m = Membership(ROLES, **kind)
    m.tie("layer1", b"c0")
    if want in ROLES:
        assert m.speaker(conn, msg, key_role) == want
    else:
        with pytest.raises(ValueError, match=want):
            m.speaker(conn, msg, key_role)


def test_a_role_that_says_hello_again_moves_to_its_new_connection():
    m = Membership(ROLES, TOKEN, curve=False)
    m.tie("layer1", b"old")
    m.tie("layer1", b"new")
    assert (m.conn("layer1"), m.role(b"new"), m.role(b"old")) == (b"new", "layer1", None)
    with pytest.raises(ValueError, match="has not said hello"):
        m.speaker(b"old", heartbeat("layer1"), None)
