"""Did the run learn? Rules read off a finished run's summary, each a
warning of one sentence that names what to try, kept in ``summary.json``'s
``warnings`` and printed under the closing table. Pure: no I/O.

Three things are judged once the run has completed:

* **near chance**: the final training accuracy is no better than guessing.
  On a classification dataset chance is 1 / classes, and a run counts as
  near it while it has come less than a tenth of the way from chance to
  every example right (10 classes: below 19 %; 2 classes: below 55 %). On
  the addition task a guess gets an 8-bit sum (9 output bits) right with
  probability 2**-9, 0.2 %, so chance there is about none of the 100 sums;
  below ``ADDITION_NONE`` (5 %: five sums, more than a few lucky examples
  give) the run learned nothing of the carry.
* **learned in part**: on the addition task, whose default run reaches
  100 % exact sums, a run that ends between that and ``ADDITION_PART``
  (90 %) has stopped short (``--unlock forward`` without its second step
  ends there).
* **pointing against**: a layer whose synthetic gradients' mean cosine with
  the true ones in the last epoch is below 0 (``sg_tracking.last_cosine``):
  a step along them then climbs the loss.
"""
from __future__ import annotations

ADDITION_NONE = 0.05   # exact sums below this: the addition task was not learned
ADDITION_PART = 0.90   # exact sums below this (and above the last): learned in part
CHANCE_MARGIN = 0.1    # near chance: less than this fraction of the way from chance to 1


def chance(cfg) -> float:
    """The accuracy of guessing: 1 / classes, or for the addition task (one
    exact sum of ``bits + 1`` output bits) 2 ** -(bits + 1)."""
    return 1.0 / cfg.classes if cfg.classification else 2.0 ** -(cfg.bits + 1)


def near_chance(accuracy: float, cfg) -> bool:
    """Is a final training accuracy of ``accuracy`` no better than guessing?"""
    if not cfg.classification:
        return accuracy < ADDITION_NONE
    if cfg.classes < 2:  # a dataset not yet read: nothing to judge against
        return False
    c = chance(cfg)
    return accuracy < c + CHANCE_MARGIN * (1.0 - c)


def in_part(accuracy: float, cfg) -> bool:
    """Did an addition-task run stop short of the exact sums its default reaches?"""
    return not cfg.classification and ADDITION_NONE <= accuracy < ADDITION_PART


def against(layers: list[dict]) -> list[tuple[str, float]]:
    """(role, last-epoch mean cosine) of each layer whose synthetic gradients
    pointed against the true ones at the end."""
    out = []
    for L in layers:
        last = (L.get("sg_tracking") or {}).get("last_cosine")
        if last is not None and last < 0:
            out.append((L["role"], last))
    return out


def tries(cfg, sg_against: bool) -> list[str]:
    """The options to try, most likely first, given what the run used."""
    out = []
    if cfg.unlock == "forward" and not cfg.si_second_step:
        out.append("--si-second-step")
    if cfg.mode == "dni":
        out.append("--mode cdni")
    if cfg.mode in ("dni", "cdni") and (sg_against or cfg.mode == "dni"):
        out.append(f"a smaller --sg-lr (now {cfg.sg_lr:g})")
    if not out:  # nothing in the method to blame: the training itself
        out.append(f"more --epochs (now {cfg.epochs})")
        out.append(f"a smaller --lr (now {cfg.lr:g})")
    return out


def _try(options: list[str]) -> str:
    return "try " + ", ".join(options[:-1]) + (" or " if len(options) > 1 else "") + options[-1]


def _percent(x: float) -> str:
    return f"{x * 100:.1f} %"


def warnings(cfg, summary: dict) -> list[str]:
    """The sentences to add to a completed run's warnings (none for a run
    that did not complete, whose figures are not final)."""
    accuracy = summary.get("train_accuracy")
    if summary.get("status") != "completed" or accuracy is None:
        return []
    bad = against(summary.get("layers") or [])
    advice = _try(tries(cfg, bool(bad)))
    out = []
    what = "train accuracy" if cfg.classification else "exact sums"
    if near_chance(accuracy, cfg):
        base = (f"chance, {_percent(chance(cfg))} for {cfg.classes} classes"
                if cfg.classification else "none of the sums")
        out.append(f"warning: {what} ended at {_percent(accuracy)}, near {base}: "
                   f"this run did not learn; {advice}")
    elif in_part(accuracy, cfg):
        out.append(f"warning: {what} ended at {_percent(accuracy)}, where the addition "
                   f"task's default run reaches 100 %: this run learned it only in part; "
                   f"{advice}")
    if bad:
        who = " and ".join(f"{role}'s" for role, _ in bad)
        cos = ", ".join(f"{c:.2f}" for _, c in bad)
        out.append(f"warning: {who} synthetic gradients pointed against the true ones in "
                   f"the last epoch (mean cosine {cos}): a step along them climbs the loss; "
                   f"{advice}")
    return out
