"""The CNN study's plot (docs/cnn.md): test accuracy by setting and mode,
bars at the mean over seeds, whiskers one sample standard deviation, each
seed a dot, read from runs.csv (written by collect.py).

    python docs/results/cnn/plot.py [DIR]      # DIR holds runs.csv; default: here
"""
import csv, statistics, sys
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

here = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
rows = list(csv.DictReader(open(here / "runs.csv")))
settings = ["lockstep K=0", "frozen conv", "free-running", "lockstep K=4", "lockstep K=16"]
modes = ["backprop", "async-backprop", "cdni", "dni"]
colours = {"backprop": "tab:gray", "async-backprop": "tab:olive", "cdni": "tab:blue", "dni": "tab:orange"}
fig, ax = plt.subplots(figsize=(9, 4.2))
width = 0.2
for j, mode in enumerate(modes):
    for i, setting in enumerate(settings):
        acc = [float(r["test_accuracy"]) * 100 for r in rows
               if r["setting"] == setting and r["mode"] == mode]
        if not acc:
            continue
        x = i + (j - 1.5) * width
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        ax.bar(x, statistics.mean(acc), width, yerr=sd, capsize=2, color=colours[mode],
               label=mode if i == next(k for k, s in enumerate(settings) if any(
                   r["setting"] == s and r["mode"] == mode for r in rows)) else None)
        ax.plot([x] * len(acc), acc, "k.", markersize=3)
        if statistics.mean(acc) < 96.5:  # off the scale: say so on the plot
            ax.annotate(f"{mode}\n{statistics.mean(acc):.1f}\n±{sd:.1f}", (x, 96.55),
                        ha="center", va="bottom", fontsize=7)
ax.set_xticks(range(len(settings)), settings)
ax.set_ylim(96.5, 99.5)
ax.set_ylabel("test accuracy % (MNIST, 5 epochs)")
ax.set_title("2 conv (16, 32 channels) + 256 dense + output, MNIST, seeds 1-3")
ax.legend(loc="lower left", fontsize=8)
ax.grid(axis="y", alpha=0.3)
fig.tight_layout()
fig.savefig(here / "accuracy.png", dpi=110)
print(f"wrote {here / 'accuracy.png'}")
