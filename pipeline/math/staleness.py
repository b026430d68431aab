"""Staleness-aware training rules, as pure functions of numbers and arrays.

A layer's *staleness* tau for one true gradient is the number of its own
steps between the batch's forward pass and the gradient's application
(``nodes``). A layer keeps a running staleness tau_bar of the gradients it
has applied, which is what it knows about the feedback it will get next, in
a free-running pipeline as under ``--grad-delay``. Each remedy below is off at
its default of 0 and then leaves the arithmetic exactly as without it; every
one is also exactly the unremedied step when the staleness is 0.

* ``sg_step_scale`` (``--sg-boost A``): two timescales. The synthetic-gradient
  module regressing a target tau steps stale steps ``1 + A*tau`` times its
  ``--sg-lr``: the module must follow a target that moved while its feedback
  was in flight, and the margin it needs grows with the delay.
* ``layer_step_scale`` (``--lr-staleness B``): a staleness-aware layer step,
  in the family of staleness-scaled asynchronous SGD (Zhang, Gupta, Lian and
  Liu, "Staleness-aware Async-SGD for Distributed Deep Learning", IJCAI 2016,
  who divide the step by the staleness): the layer steps ``1 / (1 + B*tau)``
  of its ``--lr``, with tau the gradient's own staleness where the layer
  applies a true gradient (async-backprop) and tau_bar where it steps on a
  synthetic one (whose module learns from feedback tau_bar steps stale).
* ``lookahead`` (``--sg-lookahead S``): weight prediction (as in SpecTrain,
  Chen et al. 2018, arXiv 1809.02839, which predicts a pipeline stage's
  weights the delay ahead along its smoothed update). A layer steps on the
  prediction of its SG module extrapolated ``S*tau_bar`` of the module's own
  steps ahead along its recent drift: where the module will be once the
  feedback for this batch has come back.
* ``compensate`` (``--delay-comp L``): delay compensation (Zheng et al.,
  "Asynchronous Stochastic Gradient Descent with Delay Compensation",
  ICML 2017): a gradient computed at weights w_then and applied at w_now is
  corrected by the first-order term ``L * g*g*(w_now - w_then)``, the
  diagonal outer-product approximation of the Hessian. It applies where a
  stale gradient was computed at older weights: the true gradients of
  async-backprop.
"""
from __future__ import annotations

from typing import Container, Mapping, Protocol

import numpy as np

# Weight of each new gradient in the running staleness: about the last ten.
TRACK_WEIGHT = 0.1
# Weight of each new SG update in the module's drift (its smoothed velocity).
DRIFT_WEIGHT = 0.1


def track(tau_bar: float, tau: int) -> float:
    """The running staleness after one more gradient ``tau`` steps stale
    (an exponential moving average; 0 stays 0 while every tau is 0)."""
    return tau_bar + TRACK_WEIGHT * (tau - tau_bar)


def sg_step_scale(tau: float, boost: float) -> float:
    """Step-size factor of an SG regression onto a target ``tau`` steps stale."""
    return 1.0 + boost * tau


def layer_step_scale(tau: float, damping: float) -> float:
    """Step-size factor of a layer update whose feedback is ``tau`` steps stale."""
    return 1.0 / (1.0 + damping * tau)


def drift(previous: np.ndarray, update: np.ndarray) -> np.ndarray:
    """The module's drift after one more update (in place on ``previous``)."""
    previous += DRIFT_WEIGHT * (update - previous)
    return previous


def lookahead(param: np.ndarray, drift_: np.ndarray, steps: float) -> np.ndarray:
    """The parameter extrapolated ``steps`` updates ahead along its drift."""
    return param + steps * drift_


def compensate(grad: np.ndarray, now: np.ndarray, then: np.ndarray, lam: float) -> np.ndarray:
    """DC-ASGD: the gradient computed at ``then`` carried to ``now``."""
    return grad + lam * grad * grad * (now - then)


# --- when a true gradient is due ----------------------------------------------------------

class _Forwarded(Protocol):
    clock: int  # the layer's clock right after the batch's forward pass


def is_due(clock: int, batch_clock: int, grad_delay: int) -> bool:
    """Is the gradient of a batch forwarded at ``batch_clock`` due, the
    layer's clock being at ``clock``? (K = ``grad_delay`` steps later.)"""
    return clock - batch_clock >= grad_delay


def due_outstanding(clock: int, pending: Mapping[int, _Forwarded], arrived: Container[int],
                    grad_delay: int) -> int:
    """Batches ``pending`` (batch -> what the layer keeps of it, with the
    clock of its forward pass) whose gradient is due but has not ``arrived``."""
    due_clock = clock - grad_delay  # is_due, for every batch at once
    return sum(1 for b, p in pending.items() if b not in arrived and p.clock <= due_clock)
