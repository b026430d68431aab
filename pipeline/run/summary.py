"""The run's summary (summary.json) and what the user reads on the terminal:
the progress line and the closing table."""
from __future__ import annotations

import shlex
import sys
import time
from typing import TextIO

from pipeline.config import Config
from pipeline.run import learned, runfiles
from pipeline.run.rundir import WriteError
from pipeline.coord.sgwatch import SGWatch


def layer_entry(index: int, role: str, counters: dict, decode_errors: int) -> dict:
    """One layer's line in summary.json: its LayerStats plus decode errors."""
    return {"index": index, "role": role, **counters, "decode_errors": decode_errors}


def build_summary(cfg: Config, *, status: str, run_id: str, wall_s: float,
                  final: dict | None, layers: list[dict], error: dict | None = None,
                  epochs_done: int = 0, peak_rss_mb: dict | None = None,
                  cpu_s: dict | None = None, watch: SGWatch | None = None,
                  weights: str | None = None) -> dict:
    """``watch``: what the run's layer events said of each layer's synthetic
    gradients, added to its entry as ``sg_tracking``, and its warnings;
    ``weights``: what weights/ holds ("final", "at stop": as they were when
    a failed run stopped; None: nothing written)."""
    final = final or {}
    tracking = watch.tracking() if watch else {}
    layers = [{**L, "sg_tracking": tracking.get(L["role"])} for L in layers]
    train_s = final.get("train_s") or 0.0
    # "batches" counts the whole run, before a resume too, as the layers'
    # counters do (they come back from the checkpoint); the rate counts what
    # this process trained, in the time it took. Without the final
    # evaluation (a run cut short), the finished epochs tell the batches.
    before = cfg.start_epoch * cfg.batches_per_epoch
    here = final.get("batches", max(0, epochs_done * cfg.batches_per_epoch - before))
    summary = {
        "status": status,
        "mode": cfg.mode,
        "in_process": cfg.in_process,
        "simulate": cfg.simulate,
        "lockstep": cfg.lockstep,
        "epochs": cfg.epochs,
        "epochs_done": epochs_done,
        "start_epoch": cfg.start_epoch,
        "batches": before + here,
        "process_batches": here,
        "final_loss": final.get("final_loss"),
        "train_accuracy": final.get("train_accuracy"),
        "test_loss": final.get("test_loss"),
        "test_accuracy": final.get("test_accuracy"),
        "dataset": cfg.dataset,
        "batches_per_s": here / train_s if train_s > 0 else None,
        "wall_s": wall_s,
        "virtual_s": final.get("virtual_s"),
        "run_id": run_id,
        "peak_rss_mb": peak_rss_mb or {},
        "cpu_s": cpu_s or {},
        "layers": layers,
        "warnings": list(watch.warnings) if watch else [],
        "weights": weights,
    }
    summary["warnings"] += learned.warnings(cfg, summary)
    if error:
        summary["error"] = error
    return summary


def progress_line(epoch: int, epochs: int, loss: float, accuracy: float, elapsed: float,
                  batches: int, test_accuracy: float | None = None,
                  what: str = "exact") -> str:
    """The line of ``epoch`` (counted from 1, as its event counts) of ``epochs``."""
    rate = batches / elapsed if elapsed > 0 else 0.0
    test = f"  test {test_accuracy * 100:5.1f} %" if test_accuracy is not None else ""
    return (f"epoch {epoch:>{len(str(epochs))}}/{epochs}  loss {loss:8.4f}  "
            f"{what} {accuracy * 100:5.1f} %{test}  {rate:7.0f} batches/s  {elapsed:6.1f} s")


def table(summary: dict, run_dir: str) -> str:
    s = summary
    lines = [f"run {s['status']}: {run_dir}"]
    if s.get("error"):
        e = s["error"]
        lines.append(f"  failed role {e.get('role')}: {e.get('message')}")
    where = ("virtual time" if s.get("simulate") else
             "in-process reference" if s["in_process"] else "pipeline")
    start = s.get("start_epoch") or 0
    # After a resume the wall time and the rate are this process's alone.
    resumed = (f" ({s.get('process_batches')} since the resume at epoch {start + 1})"
               if start else "")
    lines.append(f"  {s['mode']} ({where}{', lockstep' if s['lockstep'] else ''}), "
                 f"{s['epochs_done']}/{s['epochs']} epochs, {s['batches']} batches{resumed}, "
                 f"{s['wall_s']:.1f} s wall"
                 + (f", {s['virtual_s']:.1f} s virtual" if s.get("virtual_s") is not None else "")
                 + (f", {s['batches_per_s']:.0f} batches/s" if s["batches_per_s"] else ""))
    if s["final_loss"] is not None:
        what = "exact sums" if s.get("dataset", "addition") == "addition" else "train accuracy"
        test = (f"   test accuracy {s['test_accuracy'] * 100:.2f} %"
                if s.get("test_accuracy") is not None else "")
        lines.append(f"  final loss {s['final_loss']:.4f}   "
                     f"{what} {s['train_accuracy'] * 100:.1f} %{test}")
    if s["layers"]:
        # The staleness a layer saw, against how well its SG module tracked
        # the true gradients (mean cosine in the first and in the last epoch).
        lines.append(f"  {'layer':>5} {'role':<8} {'forward':>8} {'sg_upd':>8} {'true_grad':>9} "
                     f"{'stale mean':>10} {'stale max':>9} {'sg cos 1st':>10} "
                     f"{'sg cos last':>11} {'bad msgs':>8}")
        for L in s["layers"]:
            st = L["staleness_steps"]
            tr = L.get("sg_tracking") or {}
            first, last = (f"{tr[k]:.2f}" if tr.get(k) is not None else ""
                           for k in ("first_cosine", "last_cosine"))
            lines.append(f"  {L['index']:>5} {L['role']:<8} {L['forward_batches']:>8} "
                         f"{L['sg_updates']:>8} {L['true_gradients']:>9} {st['mean']:>10.2f} "
                         f"{st['max']:>9} {first:>10} {last:>11} {L['decode_errors']:>8}")
    unlocked = [L for L in s["layers"] if L.get("si_quality")]
    if unlocked:  # --unlock forward: how close each layer's synthetic inputs came
        lines.append("  synthetic inputs (mean over training): " + ", ".join(
            f"{L['role']} cos {L['si_quality']['cosine']['mean']:.2f} rel err "
            f"{L['si_quality']['rel_err']['mean']:.2f} stale "
            f"{L['input_staleness_steps']['mean']:.1f}"
            for L in unlocked if L["si_quality"]["cosine"]))
    lines.extend(f"  {w}" for w in s.get("warnings", []))
    return "\n".join(lines)


def resume_command(run_dir: str, how: str = "local", cluster_file: str = "") -> str:
    """The command that goes on with the run in ``run_dir``: started here
    (``local``), by an engine (the same engine command, with this), or on a
    cluster file's coordinator host (``cluster``)."""
    if how == "cluster":
        return (f"python launch.py --cluster {shlex.quote(cluster_file)} --resume "
                f"{shlex.quote(run_dir)}")
    command = f"python launch.py --resume {shlex.quote(run_dir)}"
    return f"{command} (under the same engine: mpiexec -n N ..., srun ...)" if how == "engine" \
        else command


def resume_hint(status: str, command: str, checkpointed: bool,
                in_process: bool = False) -> str | None:
    """What to do with a run that did not finish: the ``command`` that goes
    on from its last checkpoint, or why it cannot (None for a completed run)."""
    if status == "completed":
        return None
    if in_process:
        return "  it cannot be resumed: the in-process reference keeps no checkpoints"
    if checkpointed:
        return f"  to go on from its last checkpoint: {command}"
    return ("  it cannot be resumed: it has no checkpoint (--checkpoint-every N saves one "
            "every N epochs)")


def save_weights(rd, weights: dict[str, dict], status: str) -> tuple[str | None,
                                                                   WriteError | None]:
    """Write each layer's weights (role -> arrays) into the run directory,
    the space kept for them given back first: (what weights/ now holds for
    the summary, the write that failed or None)."""
    rd.release()
    try:
        for role, arrays in weights.items():
            rd.write_weights(role, arrays)
    except WriteError as exc:
        return None, exc
    if not weights:
        return None, None
    return ("final" if status == "completed" else "at stop"), None


def close_run(rd, summary: dict, stream: TextIO, resume: str | None = None) -> int:
    """Write ``summary.json`` into the run directory, close it, print the
    closing table, and for a run that did not finish how to go on with it
    (``resume``: the command, if not ``python launch.py --resume RUN_DIR``);
    the run's exit code (0 completed, 130 interrupted, 1 failed).
    A summary the disk has no room for, even in the space kept for it, is
    one line on stderr."""
    rd.release()
    written = True
    try:
        rd.write_json("summary.json", summary)
    except WriteError as exc:
        print(f"launch.py: error: {exc}: the summary is not written", file=sys.stderr,
              flush=True)
        written = False
    finally:
        rd.close()
    print(table(summary, str(rd.path)), file=stream, flush=True)
    hint = resume_hint(summary["status"], resume or resume_command(str(rd.path)),
                       (rd.path / runfiles.CHECKPOINTS / runfiles.LATEST).is_file(),
                       bool(summary.get("in_process")))
    if hint:
        print(hint, file=stream, flush=True)
    code = {"completed": 0, "interrupted": 130}.get(summary["status"], 1)
    return code if written or code else 1


class Progress:
    """One line, redrawn in place on the user's terminal; a line every tenth
    of the run otherwise. ``terminal``: whether ``stream`` is the user's
    terminal (default: whether it is a terminal at all). Under an engine it
    is not, whatever isatty says: Open MPI gives each rank a pseudo-terminal
    of its own, also when mpiexec's output goes to a file, and a line
    redrawn with \\r there makes the log one long line."""

    def __init__(self, cfg: Config, stream: TextIO, terminal: bool | None = None):
        self.cfg = cfg
        self.stream = stream
        self.tty = stream.isatty() if terminal is None else terminal
        self.last = 0.0
        self.epochs_done = cfg.start_epoch  # a resumed run goes on from its checkpoint
        self.step = max(1, cfg.epochs // 10)

    def epoch(self, event: dict) -> None:
        self.epochs_done = event["epoch"]  # counted from 1: the epochs done
        if self.cfg.quiet:
            return
        now = time.monotonic()
        last_epoch = self.epochs_done == self.cfg.epochs
        line = progress_line(event["epoch"], self.cfg.epochs, event["loss"], event["accuracy"],
                             # the rate: this process's batches in its own time
                             event["elapsed_s"],
                             (self.epochs_done - self.cfg.start_epoch) * self.cfg.batches_per_epoch,
                             event.get("test_accuracy"),
                             "acc" if self.cfg.classification else "exact")
        if self.tty:
            if now - self.last >= 0.2 or last_epoch:
                self.stream.write("\r" + line + ("\n" if last_epoch else ""))
                self.stream.flush()
                self.last = now
        elif self.epochs_done % self.step == 0 or last_epoch:
            print(line, file=self.stream, flush=True)

    def warn(self, text: str) -> None:
        """A warning on its own line (the progress line is redrawn below it)."""
        if self.cfg.quiet:
            return
        self.stream.write(("\n" if self.tty else "") + text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and not self.cfg.quiet and 0 < self.epochs_done < self.cfg.epochs:
            self.stream.write("\n")
