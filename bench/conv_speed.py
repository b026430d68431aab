"""A convolutional layer against plain matmuls of the same shapes:
``python bench/conv_speed.py [--quick] [--forms] [--cifar] [--out FILE]``.

For each layer (MNIST layer 1: 28x28x1 -> 16 channels, k=5; layer 2:
14x14x16 -> 32, k=5; the SG module of layer 2's output: 3x3 on 7x7x(32+10)
-> 32; batch 256, float32, one BLAS thread), the CPU time of

* conv: ``conv_forward``, ``conv_weight_grads`` (dW, db) and
  ``conv_input_grad`` (dx), on given arrays;
* layer: the same with what a convolutional layer does around it: batch norm
  per channel over the N*H*W rows (``batchnorm.bn_train``/``bn_backward``),
  ReLU and the 2x2 max-pool (``pool_forward``/``pool_backward``), forward
  and backward, each part timed on its own too (not for the SG module,
  which has none of them);
* GEMMs: the three matmuls of the same shapes on ready arrays, the same
  multiply-adds with nothing around them: (N*H*W, k*k*C) @ (k*k*C, K), its
  transpose times dz, and dz @ (K, k*k*C);

each the fastest of several rounds, the three taking turns (a neighbour's
burst on this shared machine slows one round, not all). The ratio is GEMMs'
time / conv's: the conv's rate of multiply-adds over the one-thread GEMM
rate, target >= 0.5 (judged in ``targets.py``). ``--forms`` also times the
input gradient's other forms: col2im of one matmul, and the flipped kernel
(im2col of dz, one matmul). ``bench.py --only conv`` runs this in a child
process with one BLAS thread (``measure_in_child``) and prints the same.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
if __name__ == "__main__":  # BLAS reads these once, when numpy is first imported
    os.environ.update(ONE_THREAD)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import targets  # noqa: E402
from pipeline.math import batchnorm, conv  # noqa: E402

# name -> (batch, height, width, channels in, kernel, channels out), and
# whether batch norm, ReLU and the pool follow (not in an SG module)
LAYERS = {"mnist layer 1": ((256, 28, 28, 1, 5, 16), True),
          "mnist layer 2": ((256, 14, 14, 16, 5, 32), True),
          "mnist layer 2 SG": ((256, 7, 7, 42, 3, 32), False)}
CIFAR = {"cifar layer 1": ((256, 32, 32, 3, 5, 64), True),  # with --cifar
         "cifar layer 2": ((256, 16, 16, 64, 5, 128), True)}
DTYPE = np.float32


def _cpu(fn) -> float:
    """CPU seconds of one call."""
    t = time.process_time()
    fn()
    return time.process_time() - t


class Layer:
    """One layer's arrays, and its steps as functions timed part by part."""

    def __init__(self, n: int, h: int, w: int, c: int, k: int, out: int):
        rng = np.random.default_rng(0)
        self.shape, self.k = (n, h, w, c), k
        self.x = rng.standard_normal(self.shape).astype(DTYPE)
        self.w, self.b = conv.init_conv(rng, k, c, out, DTYPE)
        self.gamma, self.beta, _, _ = batchnorm.init_bn(out, DTYPE)
        self.dz = rng.standard_normal((n * h * w, out)).astype(DTYPE)
        ho, wo = conv.pooled(h, w)
        self.g = rng.standard_normal((n, ho, wo, out)).astype(DTYPE)  # at the pool's output
        rows, depth = n * h * w, k * k * c
        self.macs = 3 * rows * depth * out  # forward, dW and dx alike
        # The GEMMs' operands: random, C-ordered, as a dense layer's would be.
        self.a = rng.standard_normal((rows, depth)).astype(DTYPE)
        self.wm = self.w.reshape(depth, out)

    def gemms(self, t: dict) -> None:
        t["gemm forward"] = _cpu(lambda: self.a @ self.wm)
        t["gemm dW"] = _cpu(lambda: self.a.T @ self.dz)
        t["gemm dx"] = _cpu(lambda: self.dz @ self.wm.T)

    def conv(self, t: dict) -> None:
        n = self.shape[0]
        box = {}
        t["conv forward"] = _cpu(lambda: box.update(fc=conv.conv_forward(self.x, self.w, self.b)))
        cols = box["fc"][1]
        t["conv dW, db"] = _cpu(lambda: conv.conv_weight_grads(cols, self.dz, n))
        t["conv dx"] = _cpu(lambda: conv.conv_input_grad(self.dz, self.w, self.shape))

    def layer(self, t: dict) -> None:
        """conv -> batch norm -> ReLU -> pool, and back."""
        n, h, w, _ = self.shape
        out = self.w.shape[3]
        s: dict = {}

        def bn():
            s["y"], s["cache"] = batchnorm.bn_train(s["z"], self.gamma, self.beta)

        def bn_back():
            s["dz"] = batchnorm.bn_backward(s["dy"], s["cache"], self.gamma)[0]

        t["conv forward"] = _cpu(lambda: s.update(zip(
            ("z", "cols"), conv.conv_forward(self.x, self.w, self.b))))
        t["batch norm forward"] = _cpu(bn)
        t["relu forward"] = _cpu(lambda: s.update(a=np.maximum(s["y"], 0)))
        t["pool forward"] = _cpu(lambda: s.update(zip(
            ("p", "idx"), conv.pool_forward(s["a"].reshape(n, h, w, out)))))
        t["pool backward"] = _cpu(lambda: s.update(
            da=conv.pool_backward(self.g, s["idx"], (n, h, w, out))))
        t["relu backward"] = _cpu(lambda: s.update(dy=s["da"].reshape(-1, out) * (s["y"] > 0)))
        t["batch norm backward"] = _cpu(bn_back)
        t["conv dW, db"] = _cpu(lambda: conv.conv_weight_grads(s["cols"], s["dz"], n))
        t["conv dx"] = _cpu(lambda: conv.conv_input_grad(s["dz"], self.w, self.shape))

    def forms(self, t: dict) -> None:
        """The input gradient's forms: ours, col2im of one matmul, the flipped kernel."""
        n, h, w, c = self.shape
        k, out = self.k, self.w.shape[3]
        flipped = self.w[::-1, ::-1].transpose(0, 1, 3, 2).reshape(k * k * out, c)
        t["dx ours"] = _cpu(lambda: conv.conv_input_grad(self.dz, self.w, self.shape))
        t["dx col2im"] = _cpu(lambda: conv.col2im(self.dz @ self.wm.T, self.shape, k))
        t["dx flipped kernel"] = _cpu(
            lambda: conv.im2col(self.dz.reshape(n, h, w, out), k) @ flipped)


def _square_gflops(rounds: int) -> float:
    """A 1024 x 1024 x 1024 float32 matmul's rate: the one-thread BLAS at its best."""
    a = np.random.default_rng(1).standard_normal((1024, 1024)).astype(DTYPE)
    return 2 * 1024 ** 3 / min(_cpu(lambda: a @ a) for _ in range(rounds)) / 1e9


def measure(quick: bool = False, forms: bool = False, cifar: bool = False) -> dict:
    """Every layer's fastest-round CPU times (ms) and ratios; the results'
    ``conv`` part."""
    rounds = 3 if quick else 7
    wall, cpu = time.perf_counter(), time.process_time()
    rows = []
    for name, (dims, whole) in {**LAYERS, **(CIFAR if cifar else {})}.items():
        layer = Layer(*dims)
        parts = ["gemms", "conv"] + (["layer"] if whole else []) + (["forms"] if forms else [])
        best: dict[str, dict[str, float]] = {p: {} for p in parts}
        for r in range(rounds + 1):  # the first round warms up and is dropped
            for p in parts:
                t: dict = {}
                getattr(layer, p)(t)
                if r and (not best[p] or sum(t.values()) < sum(best[p].values())):
                    best[p] = t
        ms = {p: {k: v * 1e3 for k, v in best[p].items()} for p in parts}
        gemm, cv = sum(ms["gemms"].values()), sum(ms["conv"].values())
        lay = sum(ms["layer"].values()) if whole else None
        norm = ms["layer"]["batch norm forward"] + ms["layer"]["batch norm backward"] \
            if whole else None
        rows.append({"layer": name, "batch": dims[0], "input": list(dims[1:4]), "k": dims[4],
                     "channels_out": dims[5], "macs": layer.macs, "gemm_ms": gemm,
                     "conv_ms": cv, "layer_ms": lay, "ratio": gemm / cv,
                     "layer_ratio": gemm / lay if whole else None, "batch_norm_ms": norm,
                     "gemm_gflops": 2 * layer.macs / gemm / 1e6, "parts_ms": ms})
        del layer
    square = _square_gflops(rounds)
    return {"dtype": np.dtype(DTYPE).name, "rounds": rounds, "square_gemm_gflops": square,
            # about 1 with one BLAS thread; well above it, BLAS ran more threads
            "cpu_over_wall": (time.process_time() - cpu) / (time.perf_counter() - wall),
            "layers": rows}


def measure_in_child(quick: bool = False) -> dict:
    """``measure`` in a fresh interpreter whose BLAS has one thread, whatever
    the caller's numpy was started with."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json"]
                          + (["--quick"] if quick else []), env=dict(os.environ, **ONE_THREAD),
                          capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(proc.stdout)


def show(r: dict) -> list[str]:
    out = [f"  {r['dtype']}, one BLAS thread (CPU / wall {r['cpu_over_wall']:.2f}), fastest "
           f"of {r['rounds']} rounds; a 1024^3 matmul runs {r['square_gemm_gflops']:.0f} GFLOP/s"]
    for row in r["layers"]:
        n, (h, w, c), k, o = row["batch"], row["input"], row["k"], row["channels_out"]
        out.append(f"  {row['layer']:>16} ({h}x{w}x{c} -> {o}, k={k}, batch {n}): GEMMs "
                   f"{row['gemm_ms']:6.1f} ms ({row['gemm_gflops']:.0f} GFLOP/s), conv "
                   f"{row['conv_ms']:6.1f} ms: ratio {row['ratio']:.2f}" + (
                       f"; with batch norm, ReLU and pool {row['layer_ms']:6.1f} ms: ratio "
                       f"{row['layer_ratio']:.2f} (batch norm {row['batch_norm_ms']:.1f} ms)"
                       if row["layer_ms"] else ""))
        for part in ("gemms", "layer", "forms"):
            if part in row["parts_ms"]:
                out.append(f"  {'':>16} {part}: " + ", ".join(
                    f"{k} {v:.1f}" for k, v in row["parts_ms"][part].items()) + " ms")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    p.add_argument("--forms", action="store_true", help="time the input gradient's forms too")
    p.add_argument("--cifar", action="store_true",
                   help="CIFAR-10's layers too (32x32x3 -> 64, 16x16x64 -> 128, k=5)")
    p.add_argument("--json", action="store_true", help="print the results as JSON only")
    p.add_argument("--out", help="also write the results to this JSON file")
    a = p.parse_args()
    r = measure(a.quick, a.forms, a.cifar)
    if a.json:
        print(json.dumps(r))
        return 0
    if a.out:
        Path(a.out).write_text(json.dumps({"conv": r}, indent=2) + "\n")
    print("\n".join(show(r) + targets.show(targets.conv_rows({"conv": r}))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
