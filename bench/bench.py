"""Side-by-side measurements, printed as ratios and written as JSON:
``python bench/bench.py [--quick] [--only wire,pipeline,scaling,memory,protection,conv,cnn]
[--out FILE]``.

1. wire: one message (encode + send + receive + decode) over our sockets
   against raw pyzmq sending the same bytes (three frames zero-copy and
   copying, and one frame joined beforehand), per size, and what a message
   costs raw pyzmq in CPU between two processes (``message_cost.py``);
2. pipeline throughput: the in-process reference against the process
   pipeline (locked backprop, free-running DNI/cDNI) on the addition task and on
   a compute-heavy configuration, every process with one BLAS thread (the
   reference with all threads too);
3. scaling: pipeline DNI against reference DNI, throughput and CPU per
   batch, for 2, 4, 8 and 16 layers on the addition task and on the
   compute-heavy widths (with the reference's time per batch against its
   2-layer time), and for several batch sizes;
4. memory: every process's resident size over a long run, first epoch to last;
5. protection: what the local runs' protection costs: every socket in the
   run's private 0700 directory (the default) against abstract-namespace
   Unix sockets that any process of the machine can reach
   (``DNI_BENCH_UNPROTECTED=1``, a switch for this benchmark only), on the
   addition task and the compute-heavy configuration;
6. conv: a convolutional layer's forward and backward (MNIST layers 1 and 2,
   batch 256, float32) against matmuls of the same shapes, one BLAS thread,
   in a child process (``conv_speed.py``);
7. cnn: a 4-layer convolutional pipeline (free-running cDNI) against the
   one-thread in-process reference (``cnn_pipeline.py``).
Not a test: the machine is shared and noisy; compare the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import cnn_pipeline, conv_speed, message_cost, targets, wire_parts  # noqa: E402
from bench.wire_hops import bench_wire  # noqa: E402

# The compute-heavy configuration, with steps at which 1024-wide sigmoid layers
# train (the addition task's 0.5 and 0.03 diverge there, and inf/NaN arithmetic
# would time something else).
HEAVY = ["--layers", "4", "--hidden", "1024", "--batch-size", "256", "--lr", "0.1",
         "--sg-lr", "0.003"]


# --- runs of launch.py -----------------------------------------------------------------

def _run(args: list[str], blas_threads: int = 1, env_extra: dict | None = None) -> dict:
    """One run; its summary, and its metrics events."""
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS=str(blas_threads),
                   OPENBLAS_NUM_THREADS=str(blas_threads), MKL_NUM_THREADS=str(blas_threads),
                   **(env_extra or {}))
        # A run that fails (diverges) still has a summary: its row says so.
        subprocess.run([sys.executable, str(ROOT / "launch.py"), *args, "--quiet",
                        "--blas-threads", "1", "--run-dir", f"{tmp}/run"], env=env,
                       cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        summary = json.loads(Path(f"{tmp}/run/summary.json").read_text())
        lines = Path(f"{tmp}/run/metrics.jsonl").read_text().splitlines()
        summary["events"] = [json.loads(line) for line in lines]
        return summary


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _show(name: str, label: str, s: dict) -> None:
    if s["status"] != "completed":
        print(f"  {name:>14} {label:<34} {s['status']}: "
              f"{s.get('error', {}).get('message', '')}", flush=True)
        return
    print(f"  {name:>14} {label:<34} {s['batches_per_s']:9.1f} batches/s "
          f"({s['wall_s']:.1f} s wall, {_cpu_ms_per_batch(s):.2f} ms CPU per batch)", flush=True)


# --- 2. pipeline throughput --------------------------------------------------------------

PIPELINE_RUNS = [("reference dni (1 thread)", ["--mode", "dni", "--in-process"], 1),
                 ("reference dni (all threads)", ["--mode", "dni", "--in-process"], 0),
                 ("reference backprop", ["--mode", "backprop", "--in-process"], 1),
                 ("pipeline backprop (locked)", ["--mode", "backprop"], 1),
                 ("pipeline dni", ["--mode", "dni"], 1),
                 ("pipeline dni, no SG refresh", ["--mode", "dni", "--no-sg-refresh"], 1),
                 ("pipeline cdni", ["--mode", "cdni"], 1)]


def _cpu_ms_per_batch(s: dict) -> float | None:
    """CPU time of every process that trains (not the supervisor) per batch:
    the arithmetic and messaging a batch costs, whatever the schedule."""
    if not s["batches"]:
        return None
    return sum(t for role, t in s["cpu_s"].items() if role != "supervisor") / s["batches"] * 1e3


def bench_pipeline(name: str, task: list[str], rounds: int) -> dict:
    """Every run ``rounds`` times, the runs taking turns; each keeps its
    fastest round (a burst from a neighbour on this shared machine slows
    one run of one round, not all)."""
    rows: dict[str, dict] = {}
    for _ in range(rounds):
        for label, extra, threads in PIPELINE_RUNS:
            s = _run(task + extra, threads or os.cpu_count() or 1)
            _show(name, label, s)
            if s["status"] != "completed":
                rows.setdefault(label, {"batches_per_s": None, "wall_s": s["wall_s"],
                                        "cpu_ms_per_batch": None, "status": s["status"]})
            elif label not in rows or (rows[label]["batches_per_s"] or 0) < s["batches_per_s"]:
                rows[label] = {"batches_per_s": s["batches_per_s"], "wall_s": s["wall_s"],
                               "cpu_ms_per_batch": _cpu_ms_per_batch(s),
                               # where a batch's CPU goes, process by process
                               "cpu_ms_per_batch_by_role": {
                                   role: t / s["batches"] * 1e3
                                   for role, t in s["cpu_s"].items()}}
    bps = {k: v["batches_per_s"] for k, v in rows.items()}
    cpu = {k: v["cpu_ms_per_batch"] for k, v in rows.items()}
    ref = bps["reference dni (1 thread)"]
    ratios = {"pipeline dni / reference dni": _div(bps["pipeline dni"], ref),
              # what a user would run instead on the same cores: one process, every BLAS thread
              "pipeline dni / reference dni with all BLAS threads":
                  _div(bps["pipeline dni"], bps["reference dni (all threads)"]),
              "pipeline dni without SG refresh / reference dni":
                  _div(bps["pipeline dni, no SG refresh"], ref),
              "pipeline backprop / reference backprop":
                  _div(bps["pipeline backprop (locked)"], bps["reference backprop"]),
              "pipeline dni / pipeline backprop":
                  _div(bps["pipeline dni"], bps["pipeline backprop (locked)"]),
              "reference dni / reference backprop": _div(ref, bps["reference backprop"]),
              # How much more CPU a batch costs in the pipeline than in the
              # reference; with n cores, n over it bounds the speed-up.
              "cpu per batch, pipeline dni / reference dni":
                  _div(cpu["pipeline dni"], cpu["reference dni (1 thread)"]),
              "cpu per batch, pipeline dni without SG refresh / reference dni":
                  _div(cpu["pipeline dni, no SG refresh"], cpu["reference dni (1 thread)"])}
    return {"runs": rows, "ratios": ratios}


# --- 3. scaling -------------------------------------------------------------------------

LAYER_COUNTS = (2, 4, 8, 16)


def _point(task: list[str]) -> dict:
    """The reference and the pipeline (DNI, one BLAS thread each) on one task:
    batches/s and CPU per batch of each."""
    ref, pipe = _run(task + ["--mode", "dni", "--in-process"]), _run(task + ["--mode", "dni"])
    ok = ref["status"] == pipe["status"] == "completed"
    return {"reference_batches_per_s": ref["batches_per_s"] if ok else None,
            "pipeline_batches_per_s": pipe["batches_per_s"] if ok else None,
            "reference_cpu_ms": _cpu_ms_per_batch(ref) if ok else None,
            "pipeline_cpu_ms": _cpu_ms_per_batch(pipe) if ok else None,
            "ratio": _div(pipe["batches_per_s"], ref["batches_per_s"]) if ok else None,
            "status": f"{ref['status']}/{pipe['status']}"}


def bench_scaling(batches: int, addition_epochs: int) -> list[dict]:
    """By layer count (2 to 16), on the addition task and on the compute-heavy
    widths: throughput and CPU per batch of the pipeline and of the
    reference, and how the reference's time per batch grows with depth (what
    one process pays for each layer added); then by batch size at 4 layers."""
    rows = []
    tasks = {"addition task": lambda L: ["--layers", str(L), "--epochs", str(addition_epochs)],
             "compute-heavy": lambda L: ["--layers", str(L), "--hidden", "1024",
                                         "--batch-size", "256", "--examples",
                                         str(256 * batches), "--epochs", "1",
                                         "--lr", "0.1", "--sg-lr", "0.003"]}
    for name, task in tasks.items():
        base = None
        for layers in LAYER_COUNTS:
            row = {"task": name, "layers": layers, "batch_size": 256 if "heavy" in name else 10,
                   **_point(task(layers))}
            ref = row["reference_batches_per_s"]
            base = base or ref
            row["reference_time_growth"] = _div(base, ref)  # its time per batch, over 2 layers'
            rows.append(row)
            _show_point(row)
    for batch in (64, 1024):
        row = {"task": "compute-heavy", "layers": 4, "batch_size": batch,
               **_point(["--layers", "4", "--hidden", "1024", "--batch-size", str(batch),
                         "--examples", str(batch * batches), "--epochs", "1",
                         "--lr", "0.1", "--sg-lr", "0.003"])}
        rows.append(row)
        _show_point(row)
    return rows


def _show_point(r: dict) -> None:
    if r["ratio"] is None:
        print(f"  {r['task']:>14} layers {r['layers']:>2} batch {r['batch_size']:>4}: "
              f"{r['status']}", flush=True)
        return
    growth = r.get("reference_time_growth")
    print(f"  {r['task']:>14} layers {r['layers']:>2} batch {r['batch_size']:>4}: reference "
          f"{r['reference_batches_per_s']:8.1f} batches/s ({r['reference_cpu_ms']:7.2f} ms CPU"
          + (f", x{growth:.2f} the 2-layer time" if growth else "") + "), pipeline "
          f"{r['pipeline_batches_per_s']:8.1f} ({r['pipeline_cpu_ms']:7.2f} ms CPU): "
          f"ratio {r['ratio']:.2f}", flush=True)


# --- 4. memory --------------------------------------------------------------------------

def bench_memory(epochs: int) -> dict:
    """A long addition-task run: each process's resident size at its first and
    last per-epoch event, and its peak."""
    s = _run(["--epochs", str(epochs), "--mode", "cdni"])
    out = {"batches": s["batches"], "peak_rss_mb": s["peak_rss_mb"], "processes": {}}
    for role in sorted({e["role"] for e in s["events"] if "rss_mb" in e}):
        sizes = [e["rss_mb"] for e in s["events"] if e.get("role") == role and "rss_mb" in e]
        first, last = sizes[min(len(sizes) - 1, len(sizes) // 10)], sizes[-1]
        out["processes"][role] = {"rss_mb_at_10pct": first, "rss_mb_at_end": last,
                                  "growth_mb": last - first, "samples": len(sizes)}
        print(f"  {role:>8}: {first:7.1f} MiB after 10 % of the run, {last:7.1f} MiB at the "
              f"end ({last - first:+.1f}), peak {s['peak_rss_mb'][role]:.1f}", flush=True)
    for role in ("source", "supervisor"):
        print(f"  {role:>8}: peak {s['peak_rss_mb'][role]:.1f} MiB", flush=True)
    return out


# --- 5. the cost of the local protection ---------------------------------------------------

UNPROTECTED = {"DNI_BENCH_UNPROTECTED": "1"}  # abstract-namespace sockets; never for real runs


def bench_protection(tasks: dict[str, list[str]], repeats: int) -> dict:
    """Batches per second of each task's pipeline with its sockets in the
    private directory (protected) and as abstract-namespace sockets
    (unprotected), ``repeats`` pairs interleaved, the order alternating from
    pair to pair so that a drift of the machine's speed hits both ways
    alike. The ratio protected/unprotected is taken within each pair."""
    out = {}
    for name, task in tasks.items():
        runs: dict[str, list[float]] = {"protected": [], "unprotected": []}
        cpu: dict[str, list[float]] = {"protected": [], "unprotected": []}
        ratios, cpu_ratios = [], []
        for i in range(repeats):
            pair, cpu_pair = {}, {}
            for way in (("protected", "unprotected") if i % 2 == 0
                        else ("unprotected", "protected")):
                s = _run(task, env_extra=UNPROTECTED if way == "unprotected" else None)
                _show(name, way, s)
                if s["status"] != "completed":
                    raise SystemExit(f"protection bench: a {way} run of {name} "
                                     f"ended {s['status']}")
                pair[way], cpu_pair[way] = s["batches_per_s"], _cpu_ms_per_batch(s)
                runs[way].append(pair[way])
                cpu[way].append(cpu_pair[way])
            ratios.append(pair["protected"] / pair["unprotected"])
            # CPU per batch does not count time lost to a neighbour's load
            cpu_ratios.append(cpu_pair["protected"] / cpu_pair["unprotected"])
        r, c = np.array(ratios), np.array(cpu_ratios)
        out[name] = {"args": task, "batches_per_s": runs, "cpu_ms_per_batch": cpu,
                     "ratios": ratios, "median_ratio": float(np.median(r)),
                     "min_ratio": float(r.min()), "max_ratio": float(r.max()),
                     "cpu_ratios": cpu_ratios, "median_cpu_ratio": float(np.median(c)),
                     "min_cpu_ratio": float(c.min()), "max_cpu_ratio": float(c.max())}
        print(f"  {name:>14}: batches/s protected / unprotected {np.median(r):.3f} "
              f"(median of {repeats} pairs, range {r.min():.3f}-{r.max():.3f}; "
              f"{np.median(runs['protected']):.1f} against "
              f"{np.median(runs['unprotected']):.1f}); CPU per batch "
              f"{np.median(c):.3f} (range {c.min():.3f}-{c.max():.3f})", flush=True)
    return out


def _get_roles(results: dict, name: str) -> dict | None:
    run = results.get(name, {}).get("runs", {}).get("pipeline dni") or {}
    return run.get("cpu_ms_per_batch_by_role")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions and batches")
    p.add_argument("--only", default="wire,pipeline,scaling,memory,protection,conv,cnn",
                   help="comma-separated parts to run")
    p.add_argument("--out", default="bench-results.json")
    a = p.parse_args()
    parts = set(a.only.split(","))
    results: dict = {"cpus": os.cpu_count(), "quick": a.quick}
    if "wire" in parts:
        print("wire: one message, encode + send + receive + decode, one in flight", flush=True)
        results["wire"] = bench_wire(500 if a.quick else 3000)
        for r in results["wire"]:
            print(f"  {r['case']:>14}: ours {r['ours_us']:7.1f} us; raw pyzmq, three frames "
                  f"zero-copy {r['raw_zero_copy_us']:7.1f}, copying {r['raw_copy_us']:7.1f}, "
                  f"one frame {r['raw_one_frame_us']:7.1f} us: ratio {r['ratio']:.2f} to the "
                  f"fastest, {r['ratio_to_copying']:.2f} to three copied frames (median "
                  f"round), {r['ours_MBps']:.0f} MB/s")
        print("  10x128 f64, part by part (wire_parts.py), median us a message:", flush=True)
        results["wire_parts"] = wire_parts.measure(10, 128, 2000 if a.quick else 20000)
        print("\n".join(wire_parts.show(results["wire_parts"])))
    if "pipeline" in parts:
        print("pipeline throughput", flush=True)
        heavy = HEAVY + ["--examples", "25600", "--epochs", "1" if a.quick else "2"]
        addition = ["--epochs", "200" if a.quick else "800"]
        results["addition task"] = bench_pipeline("addition task", addition, 1 if a.quick else 2)
        # What a message costs with nothing of ours around it, streamed (the
        # cheapest it gets): the addition task's bound with no cost of ours.
        results["message_cpu_us"] = message_cost.cpu_per_message(
            5000 if a.quick else 20000, in_flight=64) * 1e6
        print(f"  raw pyzmq between two processes, streamed: "
              f"{results['message_cpu_us']:.1f} us of CPU per message", flush=True)
        results["compute-heavy"] = bench_pipeline("heavy", heavy, 1 if a.quick else 2)
        for name in ("addition task", "compute-heavy"):
            for k, v in results[name]["ratios"].items():
                print(f"  {name:>14}: {k} = " + ("n/a (a run failed)" if v is None else f"{v:.2f}"))
    if "scaling" in parts:
        print("scaling: pipeline dni / reference dni by layers and batch size", flush=True)
        results["scaling"] = bench_scaling(8 if a.quick else 24, 100 if a.quick else 300)
    if "memory" in parts:
        print("memory over a long run (addition task, cdni)", flush=True)
        results["memory"] = bench_memory(2000 if a.quick else 8000)
    if "protection" in parts:
        print("protection: private socket directory / abstract-namespace sockets", flush=True)
        results["protection"] = bench_protection(
            {"addition task": ["--epochs", "200" if a.quick else "800"],
             "heavy": HEAVY + ["--mode", "dni", "--examples", "25600", "--epochs", "1"]},
            2 if a.quick else 6)
    if "conv" in parts:
        print("conv: a conv layer's forward and backward / matmuls of the same shapes, "
              "one BLAS thread", flush=True)
        results["conv"] = conv_speed.measure_in_child(a.quick)
        print("\n".join(conv_speed.show(results["conv"])))
    if "cnn" in parts:
        print("cnn: a 4-layer convolutional pipeline / the in-process reference", flush=True)
        results["cnn"] = cnn_pipeline.bench_cnn(_run, _show, _cpu_ms_per_batch,
                                                5120 if a.quick else 20480, 1 if a.quick else 2)
    results["targets"] = targets.judge(results, os.cpu_count() or 1)
    print("targets, from this run: the pipeline's speed against the in-process reference, "
          "the wire's cost against raw pyzmq, a 16-layer run, memory growth and the "
          "convolution's speed (docs/performance.md)", flush=True)
    print("\n".join(targets.show(results["targets"])))
    for name in ("addition task", "compute-heavy"):
        roles = _get_roles(results, name)
        if roles:
            print(f"  where a batch's CPU goes, {name}, pipeline dni: " + ", ".join(
                f"{role} {ms:.2f}" for role, ms in roles.items()) + " ms; reference "
                f"{results[name]['runs']['reference dni (1 thread)']['cpu_ms_per_batch']:.2f} ms")
    Path(a.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
