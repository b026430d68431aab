"""What a worker process does around its role (workers/serve.py): a
SIGTERM that comes once the role has ended, while the process cleans up (an
engine tearing the job down, the supervisor after a stop), ends it quietly."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from pipeline.config import Config
from tests.test_control import BOSS, heard, tell

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


def test_a_sigterm_in_the_clean_up_ends_the_worker_quietly(tmp_path):
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    handshake = tmp_path / "cleaning-up"
    proc = subprocess.Popen([sys.executable, "-m", "tests.cleanup_worker", endpoint,
                             str(handshake)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert router.poll(30_000), "no hello from the worker"
        assert heard(router).kind == "hello"
        tell(router, BOSS.config(Config().to_dict()))
        tell(router, BOSS.stop())  # the role ends; the clean-up begins
        deadline = time.monotonic() + 30
        while not handshake.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the worker never reached its clean-up"
            time.sleep(0.01)  # polling interval of the handshake file, not a wait
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert err == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        router.close()
        ctx.term()
