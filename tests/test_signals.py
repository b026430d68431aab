"""The command's signal rule (commands/spawn.py Signals), driven by a signal
this process sends itself: the first raises KeyboardInterrupt, later ones
are noted only, nothing inside the clean-up; and a first one whose exception
Python could only print (raised in a destructor) is not lost."""
from __future__ import annotations

import gc
import signal

import pytest

from commands.spawn import Signals

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def signals():
    s = Signals()
    old = signal.signal(signal.SIGUSR1, s._handle)
    yield s
    signal.signal(signal.SIGUSR1, old)


def test_the_first_signal_raises_and_a_second_is_only_noted(signals):
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGUSR1)
    assert signals.first == signal.SIGUSR1
    signal.raise_signal(signal.SIGUSR1)  # noted already: nothing raised
    assert signals.exit_code(0) == 128 + signal.SIGUSR1


def test_inside_the_clean_up_the_first_signal_is_only_noted(signals):
    with signals.shielded():
        signal.raise_signal(signal.SIGUSR1)
        signals.raise_if_noted()  # shielded: nothing raised
    assert signals.first == signal.SIGUSR1
    with pytest.raises(KeyboardInterrupt):
        signals.raise_if_noted()


class SignalsOnDeletion:
    def __del__(self):
        signal.raise_signal(signal.SIGUSR1)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_first_signal_swallowed_in_a_destructor_is_raised_by_the_loop(signals):
    # Python can only print an exception raised in __del__ ("Exception
    # ignored"): the handler's KeyboardInterrupt is gone, the signal noted.
    x = SignalsOnDeletion()
    del x
    gc.collect()
    assert signals.first == signal.SIGUSR1
    with pytest.raises(KeyboardInterrupt):
        signals.raise_if_noted()
