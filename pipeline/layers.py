"""A hidden layer's state and its updates: weights, SG module, in-flight
cache, counters; and what it shares with the output layer (``output_layer``).

Pure numpy: no sockets, no clock (the time comes in as an argument, for the
staleness in seconds). The node drivers (``pipeline.driver``) call these
classes in the workers and in the in-process reference alike, so the same
calls in the same order give the same bits. A layer's *clock* counts the
training batches it has forwarded; a true gradient is applied once it has
arrived and is *due* (``schedule.is_due``), in batch order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline import batchnorm as bn
from pipeline import layernorm as lnorm
from pipeline import nn, optim, schedule, staleness
from pipeline.stats import Applied, LayerStats
from pipeline.synthetic import SGModule

Send = Callable[[np.ndarray], None] | None  # takes an array as soon as it is computed


@dataclass
class _Pending:
    """What a hidden layer keeps for a batch until its true gradient is applied."""
    clock: int                       # the layer's clock right after this batch's forward
    sent_at: float | None            # time of the forward pass (the caller's clock); None:
                                     # restored from a checkpoint
    act_norm: float = 0.0            # RMS over the batch of the per-example L2 norm of h
    x: np.ndarray | None = None      # backprop modes: input, for the weight gradient
    h: np.ndarray | None = None      # backprop modes: output, for f'(z)
    norm: tuple | None = None        # backprop modes with --batchnorm: the batch statistics
    sg_in: np.ndarray | None = None  # DNI: SG module input
    sg_pred: np.ndarray | None = None  # DNI: the synthetic gradient used
    sg_acts: list | None = None      # DNI: the SG module's layer inputs for that prediction
    sg_version: int = 0              # SG module version that made sg_pred; -1: the
                                     # extrapolated module made it (--sg-lookahead)
    then: dict | None = None         # --delay-comp: the weights the forward pass used

    @property
    def rows(self) -> int:
        return (self.h if self.h is not None else self.sg_in).shape[0]


def _since(now: float, then: float | None) -> float | None:
    """Seconds from ``then`` to ``now``; None where ``then`` is unknown (a
    batch restored from a checkpoint, whose forward pass ran before it)."""
    return None if then is None else now - then


class Chance:
    """Yes with probability p, from the layer's own stream (so enabling one
    kind of chance never shifts another's draws); no draw when p is 0 or 1."""

    def __init__(self, p: float, rng: np.random.Generator):
        self.p = p
        self.rng = rng

    def __call__(self) -> bool:
        if self.p >= 1.0:
            return True
        if self.p <= 0.0:
            return False
        return bool(self.rng.random() < self.p)


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(a * a)))


def _rms_norm(h: np.ndarray) -> float:
    """Root mean square over the batch of each example's L2 norm: how large
    the layer's activations are (they grow without bound when stale feedback
    destabilises a layer and its SG module). One dot product."""
    return float(np.sqrt(np.vdot(h, h) / h.shape[0]))


def sg_quality(pred: np.ndarray, true: np.ndarray) -> tuple[float | None, float | None]:
    """Cosine similarity and relative L2 error of a synthetic gradient against
    the true one (None where a norm is zero and the figure is undefined)."""
    np_, nt = _norm(pred), _norm(true)
    cosine = float(np.sum(pred * true)) / (np_ * nt) if np_ > 0 and nt > 0 else None
    rel = _norm(pred - true) / nt if nt > 0 else None
    return cosine, rel


def _descend(layer: "HiddenLayer | OutputLayer", grads: dict[str, np.ndarray],
             scale: float = 1.0) -> None:
    """One optimiser step on the layer's parameters (its step size times
    ``scale``), if its update chance says yes."""
    if layer.update():
        layer.opt.step(grads, scale)
        layer.step += 1
        layer.stats.weight_updates += 1
    else:
        layer.stats.skipped_updates += 1


class HiddenLayer:
    """h = f(x W + b), or f(N(x W + b)) with batch or layer normalisation N,
    and a synthetic-gradient module in the DNI modes.

    * dni/cdni: ``forward`` updates the layer at once with the synthetic
      gradient; a true gradient later trains the SG module;
    * backprop/async-backprop: ``forward`` only caches; a true gradient
      updates the layer (with the weights as they are then: stale in
      async-backprop).
    """

    def __init__(self, index: int, fan_in: int, fan_out: int, *, mode: str,
                 activation: str, lr: float, sg_lr: float, label_dim: int,
                 rng: np.random.Generator, grad_delay: int = 0,
                 update: Chance | None = None, drop: Chance | None = None,
                 dtype: np.dtype = np.float64, optimizer: str = "sgd",
                 sg_hidden: tuple[int, ...] = (), batchnorm: bool = False,
                 layernorm: bool = False, sg_refresh: bool = True, momentum: float = 0.0,
                 sg_boost: float = 0.0, lr_staleness: float = 0.0, sg_lookahead: float = 0.0,
                 delay_comp: float = 0.0):
        self.index = index
        self.mode = mode
        self.activation = activation
        self.grad_delay = grad_delay
        self.sg_refresh = sg_refresh
        self.update = update or Chance(1.0, rng)
        self.drop = drop or Chance(0.0, rng)
        self.w, self.b = nn.init_dense(rng, fan_in, fan_out, dtype)
        if batchnorm and layernorm:
            raise ValueError("batch norm and layer norm are exclusive")
        self.norm = bn.init_bn(fan_out, dtype) if batchnorm else None
        self.ln = lnorm.init_ln(fan_out, dtype) if layernorm else None
        self.conditioned = mode == "cdni"
        self.uses_sg = mode in ("dni", "cdni")
        sg_in = fan_out + (label_dim if self.conditioned else 0)
        self.sg = (SGModule(rng, sg_in, fan_out, sg_hidden, dtype, optimizer, sg_lr,
                            momentum, track_drift=sg_lookahead > 0)
                   if self.uses_sg else None)
        self.opt = optim.make(optimizer, self._trainable(), lr, momentum)
        # staleness remedies (pipeline.staleness), each off at 0
        self.sg_boost, self.lr_staleness = sg_boost, lr_staleness
        self.sg_lookahead, self.delay_comp = sg_lookahead, delay_comp
        self.tau_bar = 0.0     # running staleness of the gradients applied
        self.clock = 0         # training batches forwarded
        self.step = 0          # weight updates applied
        self.pending: dict[int, _Pending] = {}
        self.arrived: dict[int, np.ndarray] = {}   # true gradients not yet due
        self.stats = LayerStats(seed=index)
        self.si = None  # --unlock forward: its InputPredictor (model.make_hidden)

    @property
    def v(self) -> np.ndarray | None:
        """The SG module's (last) weight matrix; None without one."""
        return self.sg.v if self.sg else None

    @property
    def c(self) -> np.ndarray | None:
        return self.sg.c if self.sg else None

    @property
    def sg_version(self) -> int:
        return self.sg.version if self.sg else 0

    def _trainable(self) -> dict[str, np.ndarray]:
        out = {"w": self.w, "b": self.b}
        if self.norm is not None:
            out.update(gamma=self.norm[0], beta=self.norm[1])
        if self.ln is not None:
            out.update(gamma=self.ln[0], beta=self.ln[1])
        return out

    # -- the layer's own math ----------------------------------------------------
    def _forward(self, x: np.ndarray, train: bool, track: bool = True
                 ) -> tuple[np.ndarray, tuple | None]:
        """(h, normalisation cache): with batch norm, training batches
        normalise with their own statistics (and track them, unless ``track``
        is False: a batch of synthetic inputs), evaluation with the tracked
        ones; layer norm is the same function in both."""
        z = x @ self.w + self.b
        cache = None
        if self.ln is not None:
            z, cache = lnorm.ln_forward(z, *self.ln)
        if self.norm is not None:
            gamma, beta, mean, var = self.norm
            if train:
                z, cache = bn.bn_train(z, gamma, beta)
                if track:
                    bn.bn_track(mean, var, cache[2], cache[3], rows=x.shape[0])
            else:
                z = bn.bn_eval(z, gamma, beta, mean, var)
        return nn.activate(self.activation, z), cache

    def _dz(self, h: np.ndarray, cache: tuple | None, dh: np.ndarray
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The per-example gradient at z = x W + b from dh at h, and the
        normalisation's own parameter gradients (none without one)."""
        dz = dh * nn.activation_slope(self.activation, h)
        if cache is None:
            return dz, {}
        backward, gamma = ((bn.bn_backward, self.norm[0]) if self.norm is not None
                           else (lnorm.ln_backward, self.ln[0]))
        dz, dgamma, dbeta = backward(dz, cache, gamma)
        return dz, {"gamma": dgamma, "beta": dbeta}

    def _grads(self, x: np.ndarray, h: np.ndarray, cache: tuple | None, dh: np.ndarray,
               need_dx: bool, send_dx: Send = None
               ) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Parameter gradients (batch-mean loss) and the per-example dx, from
        the per-example gradient dh at the output, with the current weights.
        dx comes first, handed to ``send_dx`` before the weight gradient is
        computed: the layer above can start on it meanwhile."""
        dz, extra = self._dz(h, cache, dh)
        dx = nn.input_grad(dz, self.w) if need_dx else None
        if send_dx is not None and dx is not None:
            send_dx(dx)
        dw, db, _ = nn.dense_grads(x, dz, self.w, need_dx=False)
        return {"w": dw, "b": db, **extra}, dx

    # -- forward --------------------------------------------------------------
    def forward(self, batch: int, x: np.ndarray, y: np.ndarray | None, need_dx: bool,
                now: float = 0.0, send_h: Send = None, send_dx: Send = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Training forward pass of ``batch`` at time ``now``. Returns (h, dx):
        dx is the gradient to send upstream now (DNI), or None (backprop
        modes). ``send_h`` and ``send_dx`` get each as soon as it is known,
        before the rest of the step (a worker sends them on at once)."""
        assert batch not in self.pending, f"batch {batch} forwarded twice"
        # an unlocked layer's x is a synthetic input: batch norm normalises it
        # with its own statistics but tracks only true batches (forward_true)
        h, cache = self._forward(x, train=True, track=self.si is None)
        if send_h is not None:
            send_h(h)
        act_norm = _rms_norm(h)
        self.clock += 1
        self.stats.forward_batches += 1
        if not self.uses_sg:
            then = ({k: v.copy() for k, v in self._trainable().items()}
                    if self.delay_comp else None)
            self.pending[batch] = _Pending(self.clock, now, act_norm, x=x, h=h, norm=cache,
                                           then=then)
            return h, None
        sg_in = nn.sg_input(h, y if self.conditioned else None)
        ahead = self.sg_lookahead * self.tau_bar
        g, acts = self.sg.predict(sg_in, ahead)
        grads, dx = self._grads(x, h, cache, g, need_dx, send_dx)
        _descend(self, grads, staleness.layer_step_scale(self.tau_bar, self.lr_staleness))
        self.pending[batch] = _Pending(self.clock, now, act_norm, sg_in=sg_in, sg_pred=g,
                                       sg_acts=acts,
                                       sg_version=-1 if ahead else self.sg.version)
        return h, dx

    def forward_true(self, batch: int, x: np.ndarray, y: np.ndarray | None, need_dx: bool,
                     second_step: bool = False, send_h: Send = None, send_dx: Send = None
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """``--unlock forward``: the true input x of ``batch`` arrived after
        the layer had forwarded and stepped on a synthetic one (``forward``).
        The true chain goes on from here, with the weights as they are now:
        h = f(x W + b) goes down (``send_h``) and dx, the SG module's
        prediction at h carried back through the layer, goes up (``send_dx``):
        the target of the layer below's SG module, at that layer's real
        output. The batch's cache now holds this SG input and prediction, so
        the true gradient that comes back (computed from this h) trains the
        SG module at the activation it belongs to. With ``second_step`` the
        layer also updates on the true input with that synthetic gradient
        (a weight update, not a forward batch: the clock stays). With batch
        norm this batch's statistics normalise it and are the ones tracked
        for evaluation (the synthetic batch's never are). Returns (h, dx)."""
        if not self.uses_sg:
            raise ValueError(f"--unlock forward needs an SG module; mode {self.mode!r} has none")
        p = self.pending[batch]
        assert batch not in self.arrived, f"gradient of batch {batch} came before its h"
        h, cache = self._forward(x, train=True)
        if send_h is not None:
            send_h(h)
        sg_in = nn.sg_input(h, y if self.conditioned else None)
        g, acts = self.sg.predict(sg_in)
        if second_step:
            grads, dx = self._grads(x, h, cache, g, need_dx, send_dx)
            _descend(self, grads, staleness.layer_step_scale(self.tau_bar, self.lr_staleness))
        else:  # _grads's dx alone, same bits, without the weight gradient
            dx = nn.input_grad(self._dz(h, cache, g)[0], self.w) if need_dx else None
            if send_dx is not None and dx is not None:
                send_dx(dx)
        p.sg_in, p.sg_pred, p.sg_acts, p.sg_version = sg_in, g, acts, self.sg.version
        p.act_norm = _rms_norm(h)
        return h, dx

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        return self._forward(x, train=False)[0]

    # -- true gradients --------------------------------------------------------
    def receive(self, batch: int, grad: np.ndarray) -> bool:
        """A true gradient came in. False if the link lost it (--drop-prob):
        the batch is evicted and will never be applied."""
        assert batch in self.pending and batch not in self.arrived
        if self.drop():
            del self.pending[batch]
            self.stats.dropped_gradients += 1
            return False
        self.arrived[batch] = grad
        return True

    def lose(self, batch: int) -> None:
        """The gradient of ``batch`` will never come (dropped downstream)."""
        del self.pending[batch]
        self.stats.lost_gradients += 1

    def is_due(self, batch: int) -> bool:
        return schedule.is_due(self.clock, self.pending[batch].clock, self.grad_delay)

    def due_outstanding(self) -> int:
        """Batches whose gradient is due but has not arrived yet."""
        return schedule.due_outstanding(self.clock, self.pending, self.arrived, self.grad_delay)

    def apply_ready(self, need_dx: bool, now: float = 0.0,
                    send_dx: Callable[[int, np.ndarray], None] | None = None) -> list[Applied]:
        """Apply every arrived gradient that is due, oldest batch first, at
        time ``now``; backprop modes hand each dx to ``send_dx(batch, dx)`` as
        soon as it is known, before the weight gradient and update."""
        done = []
        for batch in sorted(self.arrived):
            if not self.is_due(batch):
                break  # later batches are due later still
            grad = self.arrived.pop(batch)
            p = self.pending.pop(batch)
            if self.uses_sg:
                a = self._train_sg(batch, p, grad, now)
            else:
                early = None if send_dx is None else (lambda dx, b=batch: send_dx(b, dx))
                a = self._backward(batch, p, grad, need_dx, now, early)
            self.tau_bar = staleness.track(self.tau_bar, a.staleness)
            self.stats.record(a)
            done.append(a)
        return done

    def expire(self) -> int:
        """Training is over: gradients still waiting to become due never will."""
        n = len(self.pending)
        self.pending.clear()
        self.arrived.clear()
        self.stats.expired_gradients += n
        return n

    def _backward(self, batch: int, p: _Pending, dh: np.ndarray, need_dx: bool, now: float,
                  send_dx: Send = None) -> Applied:
        """The true gradient's update: computed from what the forward pass
        cached (so at the weights it used), applied to the weights as they
        are now; ``--delay-comp`` carries it across the difference."""
        grads, dx = self._grads(p.x, p.h, p.norm, dh, need_dx, send_dx)
        tau = self.clock - p.clock
        if p.then is not None:
            live = self._trainable()
            grads = {k: staleness.compensate(g, live[k], p.then[k], self.delay_comp)
                     for k, g in grads.items()}
        _descend(self, grads, staleness.layer_step_scale(tau, self.lr_staleness))
        return Applied(batch, dx, tau, _since(now, p.sent_at), act_norm=p.act_norm)

    def _train_sg(self, batch: int, p: _Pending, target: np.ndarray, now: float) -> Applied:
        """Regress the SG module onto the true gradient. With ``sg_refresh``
        (the default) the prediction is recomputed from the cached input by
        the module as it is now, when it changed since the forward pass (one
        more matmul per batch), so the step is the gradient at the current
        module; without, the module learns from the prediction it made, a
        gradient at parameters some updates old (delayed feedback, which
        measurably destabilises free-running runs). Quality is measured on
        the synthetic gradient that was actually used."""
        pred, acts = p.sg_pred, p.sg_acts
        # A prediction of the extrapolated module (--sg-lookahead) is never
        # the module's own: it is always recomputed.
        if p.sg_version != self.sg.version and (self.sg_refresh or p.sg_version < 0):
            pred, acts = self.sg.predict(p.sg_in)
        tau = self.clock - p.clock
        loss = self.sg.train(acts, pred, target, staleness.sg_step_scale(tau, self.sg_boost))
        self.stats.sg_updates += 1
        cosine, rel = sg_quality(p.sg_pred, target)
        return Applied(batch, None, tau, _since(now, p.sent_at),
                       sg_loss=loss, cosine=cosine, rel_err=rel, act_norm=p.act_norm)

    def weights(self) -> dict[str, np.ndarray]:
        """Every array of the layer's state, by name (live, not copies)."""
        out = self._trainable()
        if self.norm is not None:
            out.update(bn_mean=self.norm[2], bn_var=self.norm[3])
        if self.uses_sg:
            out.update(self.sg.params())
        if self.si is not None:
            out.update(self.si.model.params())
        return out

