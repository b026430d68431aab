"""The CNN study (docs/cnn.md): every finished run under STUDY_DIR (one sweep
directory per group of points) as a row of runs.csv, and table.md, the means
and sample standard deviations over seeds.

    python docs/results/cnn/collect.py STUDY_DIR [OUT_DIR]
"""
import csv, glob, json, statistics, sys
from pathlib import Path

rows = []
for path in sorted(glob.glob(f"{sys.argv[1]}/*/runs/*/summary.json")):
    run = Path(path).parent
    s = json.loads(Path(path).read_text())
    if s.get("status") != "completed":
        continue
    cfg = json.loads((run / "config.json").read_text())
    cfg = cfg.get("config", cfg)
    setting = ("frozen conv" if cfg.get("freeze") else "") or (
        f"lockstep K={cfg['grad_delay']}" if cfg["lockstep"] else "free-running")
    layers = {L["role"]: L for L in s["layers"]}
    def cos(role):
        t = (layers.get(role) or {}).get("sg_tracking") or {}
        return t.get("last_cosine")
    def stale(role):
        return (layers.get(role) or {}).get("staleness_steps", {}).get("mean")
    rows.append({"setting": setting, "mode": cfg["mode"], "seed": cfg["seed"],
                 "test_accuracy": s["test_accuracy"], "train_accuracy": s["train_accuracy"],
                 "final_loss": s["final_loss"], "wall_s": round(s["wall_s"], 1),
                 "cos_layer1": cos("layer1"), "cos_layer2": cos("layer2"), "cos_layer3": cos("layer3"),
                 "stale_layer1": stale("layer1"), "stale_layer2": stale("layer2"),
                 "stale_layer3": stale("layer3"), "run": "/".join(run.parts[-3:])})
out = Path(sys.argv[2]) if len(sys.argv) > 2 else None
if out:
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader(); w.writerows(rows)
groups = {}
for r in rows:
    groups.setdefault((r["setting"], r["mode"]), []).append(r)
def fmt(v):
    return "" if v is None else f"{v:.2f}"
lines = ["| setting | mode | seeds | test accuracy % (mean ± sd) | each seed | SG cos, last epoch (conv1 / conv2 / dense) | mean staleness, steps (l1 / l2 / l3) |",
         "|---|---|---|---|---|---|---|"]
order = lambda k: (["lockstep K=0", "frozen conv", "free-running", "lockstep K=4", "lockstep K=16"].index(k[0]) if k[0] in ["lockstep K=0", "frozen conv", "free-running", "lockstep K=4", "lockstep K=16"] else 9, ["backprop", "cdni", "dni", "async-backprop"].index(k[1]))
for key in sorted(groups, key=order):
    g = sorted(groups[key], key=lambda r: r["seed"])
    acc = [r["test_accuracy"] * 100 for r in g]
    sd = f" ± {statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
    mean = lambda k: (statistics.mean([r[k] for r in g if r[k] is not None]) if any(r[k] is not None for r in g) else None)
    coss = " / ".join(fmt(mean(k)) for k in ("cos_layer1", "cos_layer2", "cos_layer3"))
    st = " / ".join(fmt(mean(k)) for k in ("stale_layer1", "stale_layer2", "stale_layer3"))
    lines.append(f"| {key[0]} | {key[1]} | {','.join(str(r['seed']) for r in g)} | {statistics.mean(acc):.2f}{sd} | "
                 f"{', '.join(f'{a:.2f}' for a in acc)} | {coss if key[1] in ('cdni','dni') else ''} | {st} |")
print("\n".join(lines))
if out:
    (out / "table.md").write_text("\n".join(lines) + "\n")
