"""The virtual-time run against real ones (docs/simulate.md#validation):
for each setting, REPEATS real free-running runs, then the virtual twin of
the first with --timing-from it (sharing the machine's cores in slices,
its links delayed as this tool emulates them); each layer's mean staleness
and the accuracy, side by side, in validation.csv and validation.md.

    python docs/results/simulate/validate.py WORK_DIR OUT_DIR [--cores N] [--quantum MS]
                                             [--only NAME]

WORK_DIR holds the run directories (kept, so a row can be looked at again;
a setting whose runs are there already is not run again). MNIST rows need
the files in data/mnist (python launch.py data mnist data/mnist) or
MNIST_DIR.
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MNIST = os.environ.get("MNIST_DIR", str(ROOT / "data" / "mnist"))
ADD = ["--epochs", "400"]
MN = ["--dataset", "mnist", "--data-dir", MNIST, "--examples", "10000", "--epochs", "2"]
SETTINGS = {  # name: the options of the real run and of its twin
    "addition-3": ADD + ["--layers", "3"],
    "addition-3-slow": ADD + ["--layers", "3", "--slow", "2:3"],
    "addition-3-link": ADD + ["--layers", "3", "--link-delay", "2", "--delay-activations"],
    "addition-6": ADD + ["--layers", "6"],
    "addition-6-slow": ADD + ["--layers", "6", "--slow", "3:3"],
    "addition-6-link": ADD + ["--layers", "6", "--link-delay", "2", "--delay-activations"],
    "mnist-3": MN + ["--layers", "3"],
    "mnist-3-slow": MN + ["--layers", "3", "--slow", "2:3"],
    "mnist-3-link": MN + ["--layers", "3", "--link-delay", "2", "--delay-activations"],
    "mnist-6": MN + ["--layers", "6"],
    "mnist-6-slow": MN + ["--layers", "6", "--slow", "3:3"],
    "mnist-6-link": MN + ["--layers", "6", "--link-delay", "2", "--delay-activations"],
}
REPEATS = 3


def launch(args: list[str], run_dir: Path) -> dict:
    summary = run_dir / "summary.json"
    if not summary.exists():
        subprocess.run([sys.executable, str(ROOT / "launch.py"), *args, "--quiet",
                        "--run-dir", str(run_dir)], check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())


def accuracy(s: dict) -> float:
    """The test split's accuracy, else (the addition task) the exact-sum rate."""
    return s["test_accuracy"] if s.get("test_accuracy") is not None else s["train_accuracy"]


def stale(s: dict) -> list[float]:
    return [L["staleness_steps"]["mean"] for L in s["layers"] if L["role"] != "output"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("work")
    p.add_argument("out")
    p.add_argument("--cores", default="2")
    p.add_argument("--quantum", default="3")
    p.add_argument("--only", default="")
    a = p.parse_args()
    work, out = Path(a.work), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, args in SETTINGS.items():
        if a.only and not name.startswith(a.only):
            continue
        real = [launch(args, work / f"{name}-real{i}") for i in range(1, REPEATS + 1)]
        twin = launch([*args, "--simulate", "--cores", a.cores, "--quantum", a.quantum,
                       "--emulated-links", "--timing-from", str(work / f"{name}-real1")],
                      work / f"{name}-virtual-c{a.cores}-q{a.quantum}-emulated")
        per_layer = list(zip(*[stale(s) for s in real]))
        want = [statistics.mean(v) for v in per_layer]
        got = stale(twin)
        within = all(abs(g - w) <= max(0.2 * w, 0.5) for g, w in zip(got, want))
        in_range = all(min(v) <= g <= max(v) for g, v in zip(got, per_layer))
        accs = [accuracy(s) for s in real]
        rows.append({
            "setting": name,
            "real_staleness": " ".join(f"{w:.2f}" for w in want),
            "real_staleness_sd": " ".join(f"{statistics.stdev(v):.2f}" for v in per_layer),
            "virtual_staleness": " ".join(f"{g:.2f}" for g in got),
            "staleness_within": within,
            "real_staleness_range": " ".join(f"{min(v):.2f}-{max(v):.2f}" for v in per_layer),
            "staleness_in_range": in_range,
            "real_accuracy": " ".join(f"{x * 100:.2f}" for x in accs),
            "virtual_accuracy": f"{accuracy(twin) * 100:.2f}",
            "accuracy_within": min(accs) <= accuracy(twin) <= max(accs),
            "real_wall_s": f"{statistics.mean(s['wall_s'] for s in real):.1f}",
            "virtual_s": f"{twin['virtual_s']:.1f}",
        })
        print(rows[-1], flush=True)
    if not rows:
        return
    with open(out / "validation.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    lines = ["| setting | real staleness by layer, mean of 3 (sd) | virtual | within 20 % "
             "or 0.5 | within the 3 runs' range | real accuracy % (3 runs) | virtual | "
             "within | real wall s | virtual s |", "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['real_staleness']} ({r['real_staleness_sd']}) | "
                     f"{r['virtual_staleness']} | {'yes' if r['staleness_within'] else 'no'} | "
                     f"{'yes' if r['staleness_in_range'] else 'no'} | "
                     f"{r['real_accuracy']} | {r['virtual_accuracy']} | "
                     f"{'yes' if r['accuracy_within'] else 'no'} | {r['real_wall_s']} | "
                     f"{r['virtual_s']} |")
    (out / "validation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
