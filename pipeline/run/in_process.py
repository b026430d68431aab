"""``launch.py --in-process``: a run trained by the in-process reference
(``reference``), written up in the same run directory a pipeline run
writes: the baseline a pipeline run is timed against. ``--simulate`` runs
the same way, through the virtual-time scheduler (``virtual``)."""
from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from typing import Callable, TextIO

from pipeline.data import tasks
from pipeline.net import memory
from pipeline.wire import protocol
from pipeline.config import Config
from pipeline.layers.output import Diverged
from pipeline.nodes.reference import train_reference
from pipeline.nodes.timing import Timing, measured
from pipeline.nodes.virtual import simulate
from pipeline.run.rundir import RunDir, WriteError
from pipeline.coord.coordinator import Coordinator, Record
from pipeline.coord.sgwatch import SGWatch
from pipeline.run.summary import Progress, build_summary, close_run, layer_entry, save_weights


def _train(cfg: Config, rd: RunDir, run_id: str, emit, live: list, resume: dict | None,
           should_stop: Callable[[], bool] | None):
    """The reference's run, or under --simulate the virtual-time run, whose
    checkpoints go into the run directory as a process run's do."""
    if not cfg.simulate:
        return train_reference(cfg, tasks.load(cfg), emit, should_stop, layers=live)
    timing = Timing.of(cfg, measured(cfg.timing_from) if cfg.timing_from else None)
    return simulate(cfg, tasks.load(cfg), timing, emit, should_stop, layers=live,
                    checkpoint=_checkpoints(cfg, rd, run_id), states=resume)


def _checkpoints(cfg: Config, rd: RunDir, run_id: str) -> Callable:
    """Each layer's state message at a checkpoint barrier, taken by the
    coordinator's own rules (due, once per role, checked against the run's
    layers) and written and committed in the run directory as it says."""
    coord = Coordinator(cfg, run_id)

    def take(msg) -> None:
        for a in coord.take(msg, 0):
            if rd.take_checkpoint(a, coord.roles[1:], cfg.keep_checkpoints):
                continue
            if isinstance(a, Record):
                rd.metric(a.event)
            else:  # a state the rules refuse: the nodes' bug, not the user's input
                raise RuntimeError(f"checkpoint: {a}")
    return take


def run_in_process(cfg: Config, rd: RunDir, run_id: str, stream: TextIO,
                   shield: Callable[[], AbstractContextManager] = nullcontext,
                   resume: dict | None = None,
                   should_stop: Callable[[], bool] | None = None) -> int:
    """``launch.py --in-process``: train with the reference and write the
    same run directory a pipeline run writes; returns the exit code.
    ``shield()`` holds signals off while the results are written. Should the
    run directory fail (its disk full), the run stops and writes the layers
    as they are. ``resume``: each layer role's checkpointed (state, arrays)
    (--simulate only); ``should_stop``: asked before each training batch, True
    ends the run ``interrupted`` as a signal does."""
    progress = Progress(cfg, stream)
    watch = SGWatch(cfg)

    def emit(event: dict) -> None:
        rd.metric(event)
        if event["event"] == "epoch":
            progress.epoch(event)
        elif (warning := watch.add(event)) is not None:
            progress.warn(warning)

    start = time.perf_counter()
    status, final, layers, error = "completed", None, [], None
    live: list = []  # the layers as they train
    at_stop = False
    try:
        rd.write_config({"run_id": run_id, "config": cfg.to_dict(), "processes": {}})
        result = _train(cfg, rd, run_id, emit, live, resume, should_stop)
    except KeyboardInterrupt:
        status = "interrupted"
    except Diverged as exc:
        status, error = "failed", {"role": "reference", "message": f"Diverged: {exc}"}
    except WriteError as exc:
        status, error = "failed", {"role": "reference", "message": str(exc)}
        at_stop = True
    with shield():  # a signal now is noted and ends the command after the summary
        saved = None
        if status == "completed":
            final = {"final_loss": result.final_loss, "train_accuracy": result.train_accuracy,
                     "test_loss": result.test_loss, "test_accuracy": result.test_accuracy,
                     "batches": result.batches, "train_s": result.wall_s,
                     "virtual_s": getattr(result, "virtual_s", None)}
        if status == "completed" or at_stop:
            layers = [layer_entry(L.index, protocol.layer_role(L.index, cfg.layers),
                                  L.stats.as_dict(), 0) for L in live]
            saved, failed = save_weights(rd, {protocol.layer_role(L.index, cfg.layers):
                                              L.weights() for L in live}, status)
            if failed is not None and error is None:
                status, error = "failed", {"role": "reference", "message": str(failed)}
        progress.finish()
        summary = build_summary(cfg, status=status, run_id=run_id, final=final, layers=layers,
                                wall_s=time.perf_counter() - start,
                                epochs_done=progress.epochs_done, error=error,
                                peak_rss_mb={"reference": memory.peak_rss_mb()},
                                cpu_s={"reference": memory.cpu_s()}, watch=watch,
                                weights=saved)
        return close_run(rd, summary, stream)
