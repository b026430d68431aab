"""A hidden layer's state and its updates: weights, SG module, in-flight
cache, counters (what it shares with the output layer: ``common``).

Pure numpy: no sockets, no clock (the time comes in as an argument, for the
staleness in seconds), and no callbacks: a layer returns what it computed
and its node sends it. A training step comes in phases so that the node can
send each result the moment it is known (h down before the layer's own
update, dx up before its weight gradient): ``begin`` (h), ``synthetic_dx``
(dx), ``end`` (the update); ``forward`` runs all three. A true gradient is
applied likewise: ``backward_dx`` (dx, backprop modes), then ``apply``.

The node drivers (``pipeline.nodes.driver``) call these classes in the workers and
in the in-process reference alike, so the same calls in the same order give
the same bits. A layer's *clock* counts the training batches it has
forwarded; a true gradient is applied once it has arrived and is *due*
(``staleness.is_due``), in batch order.
"""
from __future__ import annotations

import numpy as np

from pipeline.math import batchnorm as bn
from pipeline.math import layernorm as lnorm
from pipeline.math import nn, optim, staleness
from pipeline.layers.common import (Chance, LayerSpec, Mode, Pending, Step, descend, flat,
                                    rms_norm, since)
from pipeline.layers.sg_module import SGModule
from pipeline.layers.stats import Applied, InputApplied, LayerStats, sg_quality


class HiddenLayer:
    """h = f(x W + b), or f(N(x W + b)) with batch or layer normalisation N,
    and a synthetic-gradient module in the DNI modes.

    * ``Synthetic`` (dni/cdni): a training step updates the layer at once
      with the synthetic gradient; a true gradient later trains the SG module;
    * ``TrueGradients`` (backprop/async-backprop): a training step only
      caches; a true gradient updates the layer (with the weights as they
      are then: stale in async-backprop).
    """

    def __init__(self, index: int, fan_in: int, fan_out: int, *, spec: LayerSpec,
                 mode: Mode, label_dim: int, rng: np.random.Generator,
                 update: Chance | None = None, drop: Chance | None = None):
        self._setup(index, spec, mode, rng, update, drop)
        self.w, self.b = nn.init_dense(rng, fan_in, fan_out, spec.dtype)
        self.out_shape: tuple[int, ...] = (fan_out,)   # h of one example
        self._normalise(fan_out)
        sg_in = fan_out + (label_dim if self.conditioned else 0)
        self.sg = (SGModule(rng, sg_in, fan_out, mode.hidden, spec.dtype, spec.optimizer,
                            mode.lr, spec.momentum, track_drift=mode.lookahead > 0)
                   if self.uses_sg else None)
        self.opt = optim.make(spec.optimizer, self._trainable(), spec.lr, spec.momentum)

    def _setup(self, index: int, spec: LayerSpec, mode: Mode, rng: np.random.Generator,
               update: Chance | None, drop: Chance | None) -> None:
        """What every hidden layer starts with besides its arrays: its
        mode, chances, counters and batches in flight."""
        self.index, self.spec, self.mode = index, spec, mode
        self.update = update or Chance(1.0, rng)
        self.drop = drop or Chance(0.0, rng)
        self.uses_sg = mode.uses_sg
        self.conditioned = self.uses_sg and mode.conditioned
        self.tau_bar = 0.0     # running staleness of the gradients applied
        self.clock = 0         # training batches forwarded
        self.step = 0          # weight updates applied
        self.pending: dict[int, Pending] = {}
        self.arrived: dict[int, np.ndarray] = {}   # true gradients not yet due
        self.stats = LayerStats(seed=index)
        self.si = None  # --unlock forward: its InputPredictor (model.make_hidden)
        self._open: Step | None = None  # a training step between its phases
        self._back: tuple | None = None   # a true gradient between backward_dx and apply

    def _normalise(self, features: int) -> None:
        """The normalisation's parameters over ``features`` (``spec.norm``)."""
        if self.spec.norm not in ("", "batch", "layer"):
            raise ValueError(f"unknown normalisation {self.spec.norm!r}")
        dtype = self.spec.dtype
        self.norm = bn.init_bn(features, dtype) if self.spec.norm == "batch" else None
        self.ln = lnorm.init_ln(features, dtype) if self.spec.norm == "layer" else None

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

    def _step_scale(self, tau: float) -> float:
        return staleness.layer_step_scale(tau, self.spec.lr_staleness)

    # -- the layer's own math ----------------------------------------------------
    def _forward(self, x: np.ndarray, train: bool, track: bool = True
                 ) -> tuple[np.ndarray, tuple | None]:
        """(h, normalisation cache): with batch norm, training batches
        normalise with their own statistics (and track them, unless ``track``
        is False: a batch of synthetic inputs), evaluation with the tracked
        ones; layer norm is the same function in both. An image batch from a
        convolutional layer above is taken as rows of its numbers."""
        z = flat(x) @ self.w + self.b
        cache = None
        if self.ln is not None:
            z, cache = lnorm.ln_forward(z, *self.ln)
        if self.norm is not None:
            z, cache = self._batch_norm(z, train, track)
        return nn.activate(self.spec.activation, z), cache

    def _batch_norm(self, z: np.ndarray, train: bool, track: bool) -> tuple[np.ndarray, tuple | None]:
        """z's rows batch-normalised: with their own statistics in training
        (tracked unless ``track`` is False), with the tracked ones otherwise."""
        gamma, beta, mean, var = self.norm
        if not train:
            return bn.bn_eval(z, gamma, beta, mean, var), None
        z, cache = bn.bn_train(z, gamma, beta)
        if track:
            bn.bn_track(mean, var, cache[2], cache[3], rows=z.shape[0])
        return z, cache

    def _dz(self, h: np.ndarray, cache: tuple | None, dh: np.ndarray
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The per-example gradient at z = x W + b from dh at h, and the
        normalisation's own parameter gradients (none without one)."""
        dz = dh * nn.activation_slope(self.spec.activation, h)
        if cache is None:
            return dz, {}
        backward, gamma = ((bn.bn_backward, self.norm[0]) if self.norm is not None
                           else (lnorm.ln_backward, self.ln[0]))
        dz, dgamma, dbeta = backward(dz, cache, gamma)
        return dz, {"gamma": dgamma, "beta": dbeta}

    def _weight_grads(self, x: np.ndarray, dz: np.ndarray, extra: dict, cache: tuple | None
                      ) -> dict[str, np.ndarray]:
        """Parameter gradients of the batch-mean loss, from the per-example dz
        (``cache``: the forward pass's, for layers that reuse it)."""
        dw, db, _ = nn.dense_grads(flat(x), dz, self.w, need_dx=False)
        return {"w": dw, "b": db, **extra}

    def _input_grad(self, dz: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The per-example gradient at the input x, shaped as x came (an
        image batch from a convolutional layer above gets its gradient as one)."""
        return nn.input_grad(dz, self.w).reshape(x.shape)

    def _sg_input(self, h: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """What the SG module sees: h, with the labels under cDNI."""
        return nn.sg_input(h, y)

    def _kept(self, cache: tuple | None) -> tuple | None:
        """What of the forward pass's cache a backprop-mode batch keeps in
        flight until its true gradient (all of it here)."""
        return cache

    # -- a training step, in phases ------------------------------------------------
    def begin(self, batch: int, x: np.ndarray, y: np.ndarray | None, now: float = 0.0
              ) -> np.ndarray:
        """The training forward pass of ``batch`` at time ``now``: returns h
        (for the layer below to take at once). In the backprop modes this
        is the whole step: the batch is cached for its true gradient."""
        assert self._open is None, "a training step began before the last one ended"
        assert batch not in self.pending, f"batch {batch} forwarded twice"
        # an unlocked layer's x is a synthetic input: batch norm normalises it
        # with its own statistics but tracks only true batches (begin_true)
        h, cache = self._forward(x, train=True, track=self.si is None)
        act_norm = rms_norm(h)
        self.clock += 1
        self.stats.forward_batches += 1
        if not self.uses_sg:
            then = ({k: v.copy() for k, v in self._trainable().items()}
                    if self.mode.delay_comp else None)
            self.pending[batch] = Pending(self.clock, now, act_norm, x=x, h=h,
                                          norm=self._kept(cache), then=then)
            return h
        self.pending[batch] = Pending(self.clock, now, act_norm)
        self._open = Step(batch, x, h, cache, y, now)
        return h

    def synthetic_dx(self, need_dx: bool) -> np.ndarray | None:
        """DNI, after ``begin``: the SG module's prediction of dL/dh and the
        gradient at the layer's input from it, with the weights as they are
        (for the layer above, sent before this layer updates): dx, or None
        where no layer above wants one."""
        s = self._open
        sg_in = self._sg_input(s.h, s.y if self.conditioned else None)
        ahead = self.mode.lookahead * self.tau_bar if not s.true_input else 0.0
        s.sg_in = sg_in
        s.pred, s.acts = self.sg.predict(sg_in, ahead)
        s.version = -1 if ahead else self.sg.version
        s.dz, s.extra = self._dz(s.h, s.cache, s.pred)
        s.dx = self._input_grad(s.dz, s.x) if need_dx else None
        return s.dx

    def end(self, update: bool = True) -> None:
        """DNI, after ``synthetic_dx``: the weight gradient and the layer's
        update with it (``update`` False: a true input's step without the
        second step, which only records the batch's SG prediction)."""
        s, self._open = self._open, None
        p = self.pending[s.batch]
        p.sg_in, p.sg_pred, p.sg_acts, p.sg_version = s.sg_in, s.pred, s.acts, s.version
        if s.true_input:
            p.act_norm = rms_norm(s.h)
        if update:
            descend(self, self._weight_grads(s.x, s.dz, s.extra, s.cache),
                    self._step_scale(self.tau_bar))

    def forward(self, batch: int, x: np.ndarray, y: np.ndarray | None, need_dx: bool,
                now: float = 0.0) -> tuple[np.ndarray, np.ndarray | None]:
        """A whole training step (``begin``, ``synthetic_dx``, ``end``):
        returns (h, dx); dx is None in the backprop modes or without
        ``need_dx``."""
        h = self.begin(batch, x, y, now)
        if not self.uses_sg:
            return h, None
        dx = self.synthetic_dx(need_dx)
        self.end()
        return h, dx

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        return self._forward(x, train=False)[0]

    # -- complete unlock (--unlock forward) ------------------------------------------
    def synthetic_step(self, batch: int, x_net: np.ndarray, y: np.ndarray | None,
                       now: float = 0.0) -> np.ndarray:
        """The source's batch (network input ``x_net``, labels y) reaches an
        unlocked layer: it forwards the input its model predicts and updates
        at once with its SG module, a whole training step. Nothing is sent:
        the synthetic h is no one's input, and a dx at the synthetic input is
        not a gradient of the layer below's true output. Returns that h."""
        x_hat = self.si.guess(batch, x_net, y, self.clock + 1)  # the clock the step moves to
        h, _ = self.forward(batch, x_hat, y, need_dx=False, now=now)
        return h

    def begin_true(self, batch: int, x: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """The true input x of ``batch`` arrived after the layer had stepped
        on a synthetic one (``synthetic_step``). The true chain goes on from
        here, with the weights as they are now: returns h = f(x W + b), for
        the layer below; ``synthetic_dx`` then gives dx, the SG module's
        prediction at h carried back through the layer (the target of the
        layer below's SG module, at its real output), and ``end_true`` ends
        the step. The batch's cache then holds this SG input and prediction,
        so the true gradient that comes back (computed from this h) trains
        the SG module at the activation it belongs to. With batch norm this
        batch's statistics normalise it and are the ones tracked for
        evaluation (the synthetic batch's never are)."""
        if not self.uses_sg:
            raise ValueError("--unlock forward needs an SG module; this layer's mode has none")
        assert self._open is None, "a true input came between a step's phases"
        assert batch not in self.arrived, f"gradient of batch {batch} came before its h"
        h, cache = self._forward(x, train=True)
        self._open = Step(batch, x, h, cache, y, 0.0, true_input=True)
        return h

    def end_true(self, second_step: bool = False) -> InputApplied:
        """After ``begin_true`` and ``synthetic_dx``: with ``second_step`` the
        layer also updates on the true input with that synthetic gradient (a
        weight update, not a forward batch: the clock stays); then the
        synthetic-input model regresses onto the true input. The layer's
        math first, so h and dx left before the regression; the two touch
        disjoint arrays, so the order changes no bits."""
        s = self._open
        self.end(update=second_step)
        return self.si.learn(s.batch, s.x, self.clock)

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
        return staleness.is_due(self.clock, self.pending[batch].clock, self.spec.grad_delay)

    def due_outstanding(self) -> int:
        """Batches whose gradient is due but has not arrived yet."""
        return staleness.due_outstanding(self.clock, self.pending, self.arrived,
                                        self.spec.grad_delay)

    def next_due(self) -> int | None:
        """The oldest batch whose true gradient has arrived and is due, or
        None (gradients are applied in batch order)."""
        for batch in sorted(self.arrived):
            return batch if self.is_due(batch) else None
        return None

    def backward_dx(self, batch: int, need_dx: bool) -> np.ndarray | None:
        """Backprop modes, before ``apply``: the gradient at the layer's
        input for ``batch``, from its true gradient and the forward pass's
        cache, with the weights that pass used (for the layer above, sent
        before the weight gradient and the update)."""
        p = self.pending[batch]
        dz, extra = self._dz(p.h, p.norm, self.arrived[batch])
        self._back = (batch, dz, extra)  # for ``apply``: the same dz, computed once
        return self._input_grad(dz, p.x) if need_dx else None

    def apply(self, batch: int, now: float = 0.0, dx: np.ndarray | None = None) -> Applied:
        """Apply the due true gradient of ``batch`` at time ``now``: train
        the SG module on it (DNI), or update the layer with it (backprop
        modes, after ``backward_dx``; ``dx``: what that returned, kept in
        the record)."""
        grad = self.arrived.pop(batch)
        p = self.pending.pop(batch)
        a = (self._train_sg(batch, p, grad, now) if self.uses_sg
             else self._backward(batch, p, grad, now, dx))
        self.tau_bar = staleness.track(self.tau_bar, a.staleness)
        self.stats.record(a)
        return a

    def apply_ready(self, need_dx: bool, now: float = 0.0) -> list[Applied]:
        """Apply every arrived gradient that is due, oldest batch first (each
        backprop-mode dx in its record): what a node does, without the sends."""
        done = []
        while (batch := self.next_due()) is not None:
            dx = None if self.uses_sg else self.backward_dx(batch, need_dx)
            done.append(self.apply(batch, now, dx))
        return done

    def expire(self) -> int:
        """Training is over: gradients still waiting to become due never will."""
        n = len(self.pending)
        self.pending.clear()
        self.arrived.clear()
        self.stats.expired_gradients += n
        return n

    def _backward(self, batch: int, p: Pending, dh: np.ndarray, now: float,
                  dx: np.ndarray | None) -> Applied:
        """The true gradient's update: computed from what the forward pass
        cached (so at the weights it used), applied to the weights as they
        are now; ``--delay-comp`` carries it across the difference."""
        back, self._back = self._back, None
        dz, extra = back[1:] if back is not None and back[0] == batch else self._dz(p.h, p.norm, dh)
        grads = self._weight_grads(p.x, dz, extra, p.norm)
        tau = self.clock - p.clock
        if p.then is not None:
            live = self._trainable()
            grads = {k: staleness.compensate(g, live[k], p.then[k], self.mode.delay_comp)
                     for k, g in grads.items()}
        descend(self, grads, self._step_scale(tau))
        return Applied(batch, dx, tau, since(now, p.sent_at), act_norm=p.act_norm)

    def _train_sg(self, batch: int, p: Pending, target: np.ndarray, now: float) -> Applied:
        """Regress the SG module onto the true gradient. With ``refresh``
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
        if p.sg_version != self.sg.version and (self.mode.refresh or p.sg_version < 0):
            pred, acts = self.sg.predict(p.sg_in)
        tau = self.clock - p.clock
        loss = self.sg.train(acts, pred, target, staleness.sg_step_scale(tau, self.mode.boost))
        self.stats.sg_updates += 1
        cosine, rel = sg_quality(p.sg_pred, target)
        return Applied(batch, None, tau, since(now, p.sent_at),
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
