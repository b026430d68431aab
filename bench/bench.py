"""Side-by-side measurements, printed as ratios and written as JSON:
``python bench/bench.py [--quick] [--out bench-results.json]``.

1. wire: one message (encode + send + receive + decode) over our sockets
   against raw pyzmq sending the same bytes, per message size;
2. pipeline throughput: the in-process reference against the process
   pipeline (locked backprop, free-running DNI/cDNI) on the seed task and on
   a compute-heavy configuration, every process with one BLAS thread.
Not a test: the machine is shared and noisy; compare the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from pipeline import wire  # noqa: E402

WIRE_CASES = [("10x128 f64", (10, 128), np.float64),
              ("256x1024 f32", (256, 1024), np.float32),
              ("256x4096 f32", (256, 4096), np.float32)]


def _pair(ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    a, b = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    a.linger = b.linger = 0
    port = b.bind_to_random_port("tcp://127.0.0.1")
    a.connect(f"tcp://127.0.0.1:{port}")
    return a, b


def _time_hops(send, recv, n: int) -> float:
    """Seconds per message, sender and receiver alternating (one in flight)."""
    for _ in range(min(n, 50)):  # warm up the connection and the allocator
        send()
        recv()
    start = time.perf_counter()
    for _ in range(n):
        send()
        recv()
    return (time.perf_counter() - start) / n


def bench_wire(n: int) -> list[dict]:
    ctx = zmq.Context()
    rows = []
    try:
        for name, shape, dtype in WIRE_CASES:
            arr = np.random.default_rng(0).standard_normal(shape).astype(dtype)
            labels = np.zeros((shape[0], 8))
            msg = wire.Message(wire.ACT, "bench", batch=1, sender="layer1", arrays=(arr, labels))
            raw = [bytes(wire.encode(msg)[0]), arr.tobytes(), labels.tobytes()]
            a, b = _pair(ctx)
            ours = _time_hops(lambda: a.send_multipart(wire.encode(msg), copy=False),
                              lambda: wire.decode(b.recv_multipart(copy=False), run_id="bench"), n)
            base = _time_hops(lambda: a.send_multipart(raw, copy=False),
                              lambda: b.recv_multipart(copy=False), n)
            a.close()
            b.close()
            nbytes = arr.nbytes + labels.nbytes
            rows.append({"case": name, "bytes": nbytes, "ours_us": ours * 1e6,
                         "raw_us": base * 1e6, "ratio": ours / base,
                         "ours_MBps": nbytes / ours / 1e6})
    finally:
        ctx.term()
    return rows


def _run(args: list[str], blas_threads: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=str(blas_threads),
                   OPENBLAS_NUM_THREADS=str(blas_threads), MKL_NUM_THREADS=str(blas_threads))
        subprocess.run([sys.executable, str(ROOT / "launch.py"), *args, "--quiet",
                        "--run-dir", f"{tmp}/run"], check=True, env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        return json.loads(Path(f"{tmp}/run/summary.json").read_text())


def bench_pipeline(name: str, task: list[str]) -> dict:
    rows = {}
    for label, extra, threads in [("reference dni (1 thread)", ["--mode", "dni", "--in-process"], 1),
                                  ("reference dni (all threads)", ["--mode", "dni", "--in-process"], os.cpu_count() or 1),
                                  ("reference backprop", ["--mode", "backprop", "--in-process"], 1),
                                  ("pipeline backprop (locked)", ["--mode", "backprop"], 1),
                                  ("pipeline dni", ["--mode", "dni"], 1),
                                  ("pipeline cdni", ["--mode", "cdni"], 1)]:
        s = _run(task + extra, threads)
        rows[label] = {"batches_per_s": s["batches_per_s"], "wall_s": s["wall_s"]}
        print(f"  {name:>12} {label:<30} {s['batches_per_s']:9.1f} batches/s "
              f"({s['wall_s']:.1f} s wall)", flush=True)
    bps = {k: v["batches_per_s"] for k, v in rows.items()}
    ratios = {"pipeline dni / reference dni": bps["pipeline dni"] / bps["reference dni (1 thread)"],
              "pipeline backprop / reference backprop":
                  bps["pipeline backprop (locked)"] / bps["reference backprop"],
              "pipeline dni / pipeline backprop":
                  bps["pipeline dni"] / bps["pipeline backprop (locked)"]}
    return {"runs": rows, "ratios": ratios}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and batches")
    p.add_argument("--out", default="bench-results.json")
    a = p.parse_args()
    results: dict = {"cpus": os.cpu_count()}
    print("wire: one message, send + receive + decode, one in flight", flush=True)
    results["wire"] = bench_wire(200 if a.quick else 2000)
    for r in results["wire"]:
        print(f"  {r['case']:>14}: ours {r['ours_us']:8.1f} us, raw pyzmq {r['raw_us']:8.1f} us, "
              f"ratio {r['ratio']:.2f}, {r['ours_MBps']:.0f} MB/s")
    print("pipeline throughput", flush=True)
    heavy = ["--layers", "4", "--hidden", "1024", "--batch-size", "256", "--examples", "25600",
             "--epochs", "1" if a.quick else "2"]
    seed = ["--epochs", "100" if a.quick else "800"]
    results["seed task"] = bench_pipeline("seed task", seed)
    results["compute-heavy"] = bench_pipeline("heavy", heavy)
    for name in ("seed task", "compute-heavy"):
        for k, v in results[name]["ratios"].items():
            print(f"  {name:>14}: {k} = {v:.2f}")
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
