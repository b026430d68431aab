"""The performance targets (the pipeline's speed against the in-process
reference, the wire's cost against raw pyzmq, a 16-layer run, memory
growth, the convolution's speed: docs/performance.md), judged from one
``bench.py`` run's results.

``judge(results, cores)`` is pure: it takes the results dict that
``bench.py`` writes and returns one row per target (what, the threshold, the
measured ratio, met or not, and for a target not met the bound the run's own
CPU accounting puts on it, or the run's split of a small message, and where
the profile of its time is). Parts of the benchmark that were not run give
rows with ``measured`` None.
"""
from __future__ import annotations

WIRE_CASE, SMALL_CASE = "64x256 f32", "10x128 f64"
# Data messages a batch of the addition task (3 weight layers) takes: an
# activation into each weight layer, a gradient out of each above the first.
SEED_MESSAGES = 5
# Where a missed target's time goes, beyond what one run's figures say.
HEAVY_PROFILE = ("by layer and function: docs/profile-compute.md "
                 "(python bench/threads.py, py-spy)")
ADDITION_PROFILE = "by thread and function: docs/profile-addition.md (python bench/threads.py, py-spy)"
# The convolution's target: a conv layer's forward and backward run at no less
# than half the rate of one-thread matmuls of the same shapes (bench/conv_speed.py).
CONV_TARGET = 0.5
CONV_LAYERS = {"mnist layer 1": "MNIST layer 1 (28x28x1 -> 16, k=5, batch 256)",
               "mnist layer 2": "MNIST layer 2 (14x14x16 -> 32, k=5, batch 256)"}


def _get(d: dict | None, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


def _row(target: str, measured: float | None, threshold: float, higher: bool,
         bound: str = "", note: str = "") -> dict:
    met = None if measured is None else (measured >= threshold if higher
                                         else measured <= threshold)
    return {"target": target, "threshold": threshold, "at_least": higher,
            "measured": measured, "met": met, "bound": bound if met is False else "",
            "note": note if measured is not None else ""}


def _runs(results: dict, task: str) -> dict:
    return _get(results, task, "runs") or {}


def judge(results: dict, cores: int) -> list[dict]:
    rows = []
    heavy = _runs(results, "compute-heavy")
    ratio = _get(results, "compute-heavy", "ratios", "pipeline dni / reference dni")
    cpu = _get(results, "compute-heavy", "ratios", "cpu per batch, pipeline dni / reference dni")
    # The pipeline keeps at most every core busy: it can gain at most
    # cores / (its CPU per batch over the reference's).
    cap = f"{cores} cores / CPU per batch {cpu:.2f}x the reference's = {cores / cpu:.2f}x" \
        if cpu else ""
    rows.append(_row("compute-heavy: pipeline DNI / one-thread reference", ratio, 1.85, True,
                     f"bound from this run's CPU: {cap}; {HEAVY_PROFILE}" if cap else ""))
    one = _get(heavy, "reference dni (1 thread)", "batches_per_s")
    every = _get(heavy, "reference dni (all threads)", "batches_per_s")
    gain = every / one if one and every else None
    rows.append(_row("compute-heavy: pipeline DNI / reference with all BLAS threads",
                     _get(results, "compute-heavy", "ratios",
                          "pipeline dni / reference dni with all BLAS threads"), 1.3, True,
                     f"bound from this run's CPU: {cap} / the reference's own gain from all "
                     f"threads {gain:.2f}x = {cores / cpu / gain:.2f}x; {HEAVY_PROFILE}"
                     if cpu and gain else ""))
    addition_cpu = _get(results, "addition task", "ratios", "cpu per batch, pipeline dni / reference dni")
    bound = (f"{cores} cores / CPU per batch {addition_cpu:.2f}x the reference's = "
             f"{cores / addition_cpu:.2f}x" if addition_cpu else "")
    ref_ms = _get(results, "addition task", "runs", "reference dni (1 thread)", "cpu_ms_per_batch")
    pipe_ms = _get(results, "addition task", "runs", "pipeline dni", "cpu_ms_per_batch")
    sup_ms = _get(results, "addition task", "runs", "pipeline dni", "cpu_ms_per_batch_by_role",
                  "supervisor")
    if bound and ref_ms and pipe_ms and sup_ms:
        # CPU per batch leaves the supervisor out; it runs on the same cores.
        bound += (f"; with the supervisor's {sup_ms:.2f} ms a batch on the same cores, "
                  f"{cores * ref_ms / (pipe_ms + sup_ms):.2f}x")
    message_us = results.get("message_cpu_us")
    if bound and ref_ms and message_us:
        # Its messages alone, at raw pyzmq's cost, with the reference's arithmetic:
        floor = ref_ms + SEED_MESSAGES * message_us / 1e3
        bound += (f"; with no cost of ours at all, the reference's {ref_ms:.2f} ms of "
                  f"arithmetic + {SEED_MESSAGES} messages x {message_us:.0f} us of raw pyzmq "
                  f"streamed = {floor:.2f} ms a batch, at most {cores * ref_ms / floor:.2f}x")
    if bound:
        bound = f"bound from this run's CPU: {bound}; {ADDITION_PROFILE}"
    rows.append(_row("addition task: pipeline DNI / reference", _get(
        results, "addition task", "ratios", "pipeline dni / reference dni"), 1.0, True, bound))
    # The wire against raw pyzmq sending the same bytes as we do, header and
    # arrays in frames of their own (the baseline the target was set against); raw pyzmq's send of
    # the bytes joined into one frame beforehand beside it.
    wire = {r["case"]: r for r in results.get("wire") or []}

    def one_frame(case: str) -> str:
        r = _get(wire, case, "ratio_to_one_frame")
        return f"{r:.2f}x raw pyzmq's send of the same bytes as one frame" if r else ""

    rows.append(_row(f"wire {WIRE_CASE} (64 KiB) / raw pyzmq, the faster of its multipart ways",
                     _get(wire, WIRE_CASE, "ratio_to_three_frames"), 1.2, False,
                     note=one_frame(WIRE_CASE)))
    parts = results.get("wire_parts")
    split = (f"where it goes, one in flight: our encode {parts['encode']:.1f} us and decode "
             f"{parts['decode']:.1f} us (warm: {parts['warm_encode']:.1f} and "
             f"{parts['warm_decode']:.1f}); send and receive of our one frame "
             f"{parts['send'] + parts['receive']:.1f} us against raw pyzmq's three copied "
             f"frames {parts['raw_send'] + parts['raw_receive']:.1f} us" if parts else "")
    rows.append(_row(f"wire {SMALL_CASE} / raw pyzmq's copying multipart send",
                     _get(wire, SMALL_CASE, "ratio_to_copying"), 1.0, False, split,
                     note=one_frame(SMALL_CASE)))
    deep = [r for r in results.get("scaling") or []
            if r["task"] == "addition task" and r["layers"] == 16]
    rows.append(_row("addition task with --layers 16 runs (1 = it did)",
                     (1.0 if deep[0]["ratio"] is not None else 0.0) if deep else None, 1.0, True))
    growth = [p["growth_mb"] for p in (_get(results, "memory", "processes") or {}).values()]
    rows.append(_row("memory: largest growth of a layer's resident size over the run, MiB",
                     max(growth) if growth else None, 5.0, False))
    return rows + conv_rows(results) + [cnn_row(results, cores)]


CNN_TARGET = 1.6  # a 4-layer conv pipeline's batches/s over the one-thread reference's


def cnn_row(results: dict, cores: int) -> dict:
    """The convolutional pipeline against the one-thread reference, with the
    bound its CPU per batch puts on it (as for the dense net)."""
    cpu = _get(results, "cnn", "ratios", "cpu per batch, pipeline / reference")
    bound = (f"bound from this run's CPU: {cores} cores / CPU per batch {cpu:.2f}x the "
             f"reference's = {cores / cpu:.2f}x" if cpu else "")
    return _row("4-layer conv pipeline, free-running cDNI / one-thread reference",
                _get(results, "cnn", "ratios", "pipeline cdni / reference cdni"), CNN_TARGET,
                True, bound, note=bound.removeprefix("bound from this run's CPU: "))


def conv_rows(results: dict) -> list[dict]:
    """The convolution's target, one row per MNIST layer: its conv's rate of
    multiply-adds (forward, dW and db, dx) over the same shapes' GEMMs'; the
    whole layer's ratio (batch norm, ReLU, pool too) beside it, and for a
    missed target where the conv's time goes."""
    measured = {r["layer"]: r for r in _get(results, "conv", "layers") or []}
    rows = []
    for name, label in CONV_LAYERS.items():
        r = measured.get(name)
        where = note = ""
        if r:
            c, g = r["parts_ms"]["conv"], r["parts_ms"]["gemms"]
            where = (f"where it goes: forward {c['conv forward']:.1f}, dW and db "
                     f"{c['conv dW, db']:.1f}, dx {c['conv dx']:.1f} ms against the GEMMs' "
                     f"{g['gemm forward']:.1f}, {g['gemm dW']:.1f}, {g['gemm dx']:.1f} ms")
            note = f"GEMMs {r['gemm_ms']:.1f} ms, conv {r['conv_ms']:.1f} ms" + (
                f"; with batch norm, ReLU and the pool {r['layer_ms']:.1f} ms, ratio "
                f"{r['layer_ratio']:.2f}, of which batch norm {r['batch_norm_ms']:.1f} ms"
                if r.get("layer_ratio") else "")
        rows.append(_row(f"conv {label}: conv fwd+bwd rate / one-thread GEMM rate",
                         r["ratio"] if r else None, CONV_TARGET, True, where, note))
    return rows


def show(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r["measured"] is None:
            out.append(f"  {r['target']}: not measured in this run")
            continue
        sign = ">=" if r["at_least"] else "<="
        verdict = "met" if r["met"] else "NOT MET"
        out.append(f"  {r['target']}: {r['measured']:.2f} (target {sign} {r['threshold']:g}) "
                   f"{verdict}" + (f"; {r['bound']}" if r["bound"] else "")
                   + (f" ({r['note']})" if r["note"] else ""))
    return out


if __name__ == "__main__":  # the verdicts on a results file: python bench/targets.py FILE
    import json
    import os
    import sys
    print("\n".join(show(judge(json.loads(open(sys.argv[1]).read()), os.cpu_count() or 1))))
