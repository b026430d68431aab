"""The depth x link-time study in virtual time (docs/simulate.md#the-study):
every finished run of the sweep as a row of depth.csv; depth.md, the means
and sample standard deviations over seeds; depth.png, staleness and accuracy
against depth.

    python docs/results/simulate/collect.py SWEEP_DIR OUT_DIR [TARGET [CONTROL_DIR]]

TARGET (default 0.9): the test accuracy whose first epoch gives the virtual
time to it ("-" where no seed's run reached it). CONTROL_DIR: the control
sweep (the same nets under --lockstep, K = 0, named layersN-MODE-delay0-seedS):
its accuracies go in control.md and as dashed lines in the plot.
"""
import csv
import json
import re
import statistics
import sys
from pathlib import Path

sweep, out = Path(sys.argv[1]), Path(sys.argv[2])
target = float(sys.argv[3]) if len(sys.argv) > 3 else 0.9
control_dir = Path(sys.argv[4]) if len(sys.argv) > 4 else None
MODES = ["backprop", "async-backprop", "dni", "cdni"]
rows = []
for path in sorted(sweep.glob("runs/*/summary.json")):
    s = json.loads(path.read_text())
    if s.get("status") != "completed":
        continue
    m = re.match(r"L(\d+)-link(\d+)-(.+)-delay0-seed(\d+)$", path.parent.name)
    depth, link, mode, seed = int(m[1]), int(m[2]), m[3], int(m[4])
    stale = [L["staleness_steps"]["mean"] for L in s["layers"] if L["role"] != "output"]
    epochs = [json.loads(line) for line in (path.parent / "metrics.jsonl").open()]
    epochs = sorted((e for e in epochs if e.get("event") == "epoch"),
                    key=lambda e: e["elapsed_s"])
    reached = next((e["elapsed_s"] for e in epochs if e.get("test_accuracy", 0) >= target),
                   None)
    rows.append({"depth": depth, "link_ms": link, "mode": mode, "seed": seed,
                 "test_accuracy": s["test_accuracy"], "virtual_s": s["virtual_s"],
                 "virtual_s_to_target": reached, "stale_first": stale[0],
                 "stale_middle": stale[len(stale) // 2], "stale_last": stale[-1],
                 "stale_by_layer": " ".join(f"{x:.2f}" for x in stale)})
out.mkdir(parents=True, exist_ok=True)
with open(out / "depth.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)

groups: dict = {}
for r in rows:
    groups.setdefault((r["depth"], r["link_ms"], r["mode"]), []).append(r)


def ms(values, scale=1.0, digits=2):
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


lines = [f"| depth | link ms | mode | seeds | test accuracy % | staleness: layer 1 | middle | "
         f"last hidden | virtual s | virtual s to {target * 100:.0f} % |", "|" + "---|" * 10]
for (d, link, mode), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                   MODES.index(kv[0][2]))):
    hit = [r["virtual_s_to_target"] for r in g if r["virtual_s_to_target"] is not None]
    lines.append(f"| {d} | {link} | {mode} | {len(g)} | "
                 f"{ms([r['test_accuracy'] for r in g], 100)} | "
                 f"{ms([r['stale_first'] for r in g], digits=1)} | "
                 f"{ms([r['stale_middle'] for r in g], digits=1)} | "
                 f"{ms([r['stale_last'] for r in g], digits=1)} | "
                 f"{ms([r['virtual_s'] for r in g])} | "
                 f"{(ms(hit) + ('' if len(hit) == len(g) else f' ({len(hit)} of {len(g)})')) if hit else '-'} |")
(out / "depth.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))

control: dict = {}  # (depth, mode) -> test accuracies under --lockstep, K = 0
if control_dir:
    for path in sorted(control_dir.glob("runs/*/summary.json")):
        s = json.loads(path.read_text())
        m = re.match(r"layers(\d+)-(.+)-delay0-seed(\d+)$", path.parent.name)
        if s.get("status") == "completed" and m:
            control.setdefault((int(m[1]), m[2]), []).append(s["test_accuracy"])
    lines = ["| depth | mode | seeds | test accuracy % under --lockstep, K = 0 |", "|---|---|---|---|"]
    for (d, mode), accs in sorted(control.items(), key=lambda kv: (kv[0][0], MODES.index(kv[0][1]))):
        lines.append(f"| {d} | {mode} | {len(accs)} | {ms(accs, 100)} |")
    (out / "control.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
links = sorted({r["link_ms"] for r in rows})
fig, axes = plt.subplots(2, len(links), figsize=(4 * len(links), 7), sharey="row")
for j, link in enumerate(links):
    for mode in MODES:
        pts = sorted((d, g) for (d, lk, md), g in groups.items() if lk == link and md == mode)
        if not pts:
            continue
        xs = [d for d, _ in pts]
        axes[0][j].plot(xs, [statistics.mean(r["stale_first"] for r in g) for _, g in pts],
                        marker="o", label=mode)
        axes[1][j].plot(xs, [100 * statistics.mean(r["test_accuracy"] for r in g)
                             for _, g in pts], marker="o", label=mode)
        lock = sorted((d, accs) for (d, md), accs in control.items() if md == mode)
        if lock:
            colour = axes[1][j].get_lines()[-1].get_color()
            axes[1][j].plot([d for d, _ in lock], [100 * statistics.mean(a) for _, a in lock],
                            ls="--", color=colour, label=f"{mode}, --lockstep K=0")
    axes[0][j].set_title(f"links {link} ms, steps 2 ms")
    axes[1][j].set_xlabel("layers")
    for ax in (axes[0][j], axes[1][j]):
        ax.set_xscale("log", base=2)
        ax.set_xticks([3, 6, 12, 24], ["3", "6", "12", "24"])
axes[0][0].set_ylabel("layer 1's mean staleness (steps)")
axes[1][0].set_ylabel("test accuracy % (mean of seeds)")
axes[0][0].legend()
if control:
    axes[1][0].legend(fontsize=7)
fig.tight_layout()
fig.savefig(out / "depth.png", dpi=110)
