"""A convolutional pipeline against the in-process reference: 2 conv layers
(16 and 32 channels, 5 x 5), a dense layer of 256 and the output layer, on
MNIST-shaped images, free-running cDNI, every process with one BLAS thread.

The images are generated (random pixels, random labels): the time a batch
takes does not depend on what the pixels show, and the benchmark then needs
no data files.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

NET = ["--conv", "16,32", "--layers", "4", "--batch-size", "256", "--mode", "cdni"]
RUNS = [("reference cdni (1 thread)", ["--in-process"]),
        ("pipeline cdni", [])]


def images(path: Path, examples: int, seed: int = 0) -> str:
    """An npz of ``examples`` random 28 x 28 x 1 images in ten classes, and
    a test split of a tenth as many."""
    rng = np.random.default_rng(seed)
    test = max(1, examples // 10)
    np.savez(path, x_train=rng.random((examples, 28, 28, 1), dtype=np.float32),
             y_train=rng.integers(0, 10, examples),
             x_test=rng.random((test, 28, 28, 1), dtype=np.float32),
             y_test=rng.integers(0, 10, test))
    return f"npz:{path}"


def bench_cnn(run: Callable[[list[str]], dict], show: Callable[[str, str, dict], None],
              cpu_ms: Callable[[dict], float | None], examples: int, rounds: int) -> dict:
    """Each run ``rounds`` times, taking turns, each keeping its fastest
    round; the ratio of batches per second, and the bound the runs' own CPU
    per batch puts on it on this machine's cores."""
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = images(Path(tmp) / "images.npz", examples)
        task = ["--dataset", data, *NET, "--epochs", "1"]
        for _ in range(rounds):
            for label, extra in RUNS:
                s = run(task + extra)
                show("cnn", label, s)
                ok = s["status"] == "completed"
                if label not in rows or (ok and (rows[label]["batches_per_s"] or 0)
                                         < s["batches_per_s"]):
                    rows[label] = {"batches_per_s": s["batches_per_s"] if ok else None,
                                   "cpu_ms_per_batch": cpu_ms(s) if ok else None,
                                   "status": s["status"],
                                   # where a batch's CPU goes, process by process (with
                                   # each process's start-up, over the run's batches)
                                   "cpu_ms_per_batch_by_role": {
                                       role: t / s["batches"] * 1e3
                                       for role, t in s["cpu_s"].items()} if ok else {}}
    ref, pipe = rows["reference cdni (1 thread)"], rows["pipeline cdni"]
    ratio = (pipe["batches_per_s"] / ref["batches_per_s"]
             if pipe["batches_per_s"] and ref["batches_per_s"] else None)
    cpu = (pipe["cpu_ms_per_batch"] / ref["cpu_ms_per_batch"]
           if pipe["cpu_ms_per_batch"] and ref["cpu_ms_per_batch"] else None)
    cores = os.cpu_count() or 1
    return {"runs": rows, "ratios": {"pipeline cdni / reference cdni": ratio,
                                     "cpu per batch, pipeline / reference": cpu},
            "cores": cores, "bound": cores / cpu if cpu else None}
