"""One run's report as text: its outcome, each layer's staleness, histogram and
SG quality, read from a finished run directory (``commands/report.py`` prints
it and has ``plots`` draw report.png)."""
from __future__ import annotations

HIST_WIDTH = 30  # characters of the longest bar in the text histogram


def _f(value, fmt: str, scale: float = 1.0, unit: str = "") -> str:
    """A number from the run's files as text; null is "n/a", and a value of
    the wrong type is shown as it is rather than crashing the report."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if fmt.endswith("d"):
        return f"{int(value):{fmt}}{unit}"
    return f"{value * scale:{fmt}}{unit}"


def _histogram(hist: dict) -> list[str]:
    counts = sorted((int(k), int(v)) for k, v in hist.items())
    if not counts:
        return []
    top = max(v for _, v in counts) or 1
    kw = max(len(str(k)) for k, _ in counts)
    return [f"{k:>{kw}} | {'#' * max(1 if v else 0, round(v / top * HIST_WIDTH)):<{HIST_WIDTH}} {v}"
            for k, v in counts]


def _layer_lines(L: dict) -> list[str]:
    lines = [f"  layer {L.get('index', '?')} {L.get('role', '?')}"]
    lines.append(f"    gradients applied {L.get('true_gradients', 'n/a')}   "
                 f"dropped {L.get('dropped_gradients', 0)}   lost {L.get('lost_gradients', 0)}   "
                 f"expired {L.get('expired_gradients', 0)}   "
                 f"bad msgs {L.get('decode_errors', 0)}")
    steps = L.get("staleness_steps") or {}
    secs = L.get("staleness_s") or {}
    lines.append(f"    staleness {_f(steps.get('mean'), '.2f')} mean, {_f(steps.get('max'), 'd')} max "
                 f"(layer steps);  {_f(secs.get('mean'), '.2f', 1e3, ' ms')} mean, "
                 f"{_f(secs.get('max'), '.2f', 1e3, ' ms')} max")
    lines += ["      " + h for h in _histogram(L.get("staleness_hist") or {})]
    lines += _quality("    SG ", L.get("sg_quality"), "sg_loss")
    if "input_staleness_steps" in L:  # --unlock: the layer's true inputs
        steps = L["input_staleness_steps"]
        lines.append(f"    true inputs {L.get('true_inputs', 'n/a')}   expired "
                     f"{L.get('expired_inputs', 0)}   forward staleness "
                     f"{_f(steps.get('mean'), '.2f')} mean, {_f(steps.get('max'), 'd')} max "
                     "(layer steps)")
        lines += ["      " + h for h in _histogram(L.get("input_staleness_hist") or {})]
        lines += _quality("    synthetic input ", L.get("si_quality"), "si_loss")
    return lines


def _quality(head: str, q: dict | None, loss: str) -> list[str]:
    """One line of a module's quality figures (mean and median of each)."""
    parts = [f"{name} mean {_f(d.get('mean'), '.3f')} p50 {_f(d.get('p50'), '.3f')}"
             for name in ("cosine", "rel_err", loss) if (d := (q or {}).get(name))]
    return [head + "   ".join(parts)] if parts else []


def text_report(run: dict) -> str:
    """The run as a few lines for the terminal."""
    s = run["summary"]
    lines = [f"run {s.get('status', '?')}: {run.get('path', '')}"]
    err = s.get("error")
    if err:
        lines.append(f"  failed role {err.get('role')}: {err.get('message')}")
    where = "in-process reference" if s.get("in_process") else "pipeline"
    rate = s.get("batches_per_s")
    lines.append(f"  {s.get('mode', '?')} ({where}{', lockstep' if s.get('lockstep') else ''}), "
                 f"{s.get('epochs_done', '?')}/{s.get('epochs', '?')} epochs, "
                 f"{s.get('batches', '?')} batches, {_f(s.get('wall_s'), '.1f')} s wall"
                 + (f", {rate:.0f} batches/s" if rate else ""))
    what = "exact sums" if s.get("dataset", "addition") == "addition" else "train accuracy"
    test = (f"   test accuracy {_f(s.get('test_accuracy'), '.2f', 100, ' %')}"
            if s.get("test_accuracy") is not None else "")
    lines.append(f"  final loss {_f(s.get('final_loss'), '.4f')}   "
                 f"{what} {_f(s.get('train_accuracy'), '.1f', 100, ' %')}{test}")
    kinds: dict[str, int] = {}
    for e in run["events"]:
        kinds[str(e.get("event"))] = kinds.get(str(e.get("event")), 0) + 1
    line = (f"  metrics.jsonl: {len(run['events'])} events ("
            + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + ")")
    if run.get("bad_lines"):
        line += f"; {run['bad_lines']} line(s) not valid JSON, skipped"
    lines.append(line)
    for L in s.get("layers") or []:
        lines += _layer_lines(L)
    return "\n".join(lines)
