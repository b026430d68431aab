"""The oracle: the training loops of the reference written again as plain
numpy, independently of pipeline/ (only the initial weights and the random
streams are taken from it, so that both start alike). tests/test_reference.py
holds the reference to these loops."""
from __future__ import annotations

import numpy as np

from pipeline.data import arithmetic as data
from pipeline.config import Config
from pipeline.layers.build import layer_rng, make_hidden, make_output


def act(name, z):
    return 1.0 / (1.0 + np.exp(-z)) if name == "sigmoid" else np.maximum(z, 0.0)


def slope(name, h):
    return h * (1.0 - h) if name == "sigmoid" else (h > 0).astype(float)


def initial_weights(cfg: Config):
    """The run's initial weights, copied before any training."""
    hs = [make_hidden(cfg, k) for k in range(1, cfg.layers)]
    out = make_output(cfg)
    return [(h.w.copy(), h.b.copy()) for h in hs], (out.w.copy(), out.b.copy())


def batches(cfg: Config):
    """The addition task's batches, epoch after epoch, in order; the last batch of
    an epoch may be short."""
    x, y = data.addition(cfg.bits, cfg.examples, cfg.seed)
    for _ in range(cfg.epochs):
        for start in range(0, cfg.examples, cfg.batch_size):
            yield x[start:start + cfg.batch_size], y[start:start + cfg.batch_size]


def forward(cfg: Config, layers, wo, bo, xb):
    """Every hidden layer's output (after the input itself), and the output
    layer's probabilities."""
    hs = [xb]
    for w, b in layers:
        hs.append(act(cfg.activation, hs[-1] @ w + b))
    return hs, act("sigmoid", hs[-1] @ wo + bo)


def zero_sg_modules(cfg: Config, layers):
    """A linear SG module per hidden layer, zero as the notebook starts them; under
    cdni its input is [h, y]."""
    sgs = []
    for w, _ in layers:
        width = w.shape[1]
        rows = width + (cfg.bits if cfg.mode == "cdni" else 0)
        sgs.append((np.zeros((rows, width)), np.zeros(width)))
    return sgs


def plain_backprop(cfg: Config):
    """Mini-batch SGD on the batch-mean BCE, all gradients from one forward pass."""
    layers, (wo, bo) = initial_weights(cfg)
    for xb, yb in batches(cfg):
        n = len(xb)
        hs, p = forward(cfg, layers, wo, bo, xb)
        d = p - yb                                  # (n, bits) per-example dl/dz
        grads = [(hs[-1].T @ d / n, d.sum(0) / n)]
        dh = d @ wo.T
        for k in range(len(layers) - 1, -1, -1):
            dz = dh * slope(cfg.activation, hs[k + 1])
            grads.append((hs[k].T @ dz / n, dz.sum(0) / n))
            dh = dz @ layers[k][0].T
        grads.reverse()                             # hidden 1..L-1, then output
        params = layers + [(wo, bo)]
        for (w, b), (gw, gb) in zip(params, grads):
            w -= cfg.lr * gw
            b -= cfg.lr * gb
    return layers, (wo, bo)


def plain_dni(cfg: Config):
    """The notebook's DNI loop: per batch, every hidden layer updates at once with
    its SG prediction (from [h, y] under cdni) and passes (g*f') W^T down as
    the next-lower SG module's target; the output layer's true gradient is
    the top SG module's target."""
    layers, (wo, bo) = initial_weights(cfg)
    sgs = zero_sg_modules(cfg, layers)
    for xb, yb in batches(cfg):
        n = len(xb)
        h = xb
        cache = []                                  # (sg input, prediction, target sent down)
        for (w, b), (v, c) in zip(layers, sgs):
            h_in = h
            h = act(cfg.activation, h_in @ w + b)
            s_in = np.hstack([h, yb]) if cfg.mode == "cdni" else h
            g = s_in @ v + c
            dz = g * slope(cfg.activation, h)
            down = dz @ w.T
            w -= cfg.lr * h_in.T @ dz / n
            b -= cfg.lr * dz.sum(0) / n
            cache.append((s_in, g, down))
        p = act("sigmoid", h @ wo + bo)
        d = p - yb
        target = d @ wo.T
        wo -= cfg.lr * h.T @ d / n
        bo -= cfg.lr * d.sum(0) / n
        for k in range(len(layers) - 1, -1, -1):
            s_in, g, down = cache[k]
            v, c = sgs[k]
            err = g - target
            v -= cfg.sg_lr * s_in.T @ err / n
            c -= cfg.sg_lr * err.sum(0) / n
            target = down
    return layers, (wo, bo), sgs


class Draws:
    """Yes with probability p from layer ``index``'s own stream ``purpose``
    (1: weight updates, 2: arriving gradients lost); no draw at p = 0 or 1."""

    def __init__(self, cfg: Config, index: int, purpose: int, p: float):
        self.rng, self.p = layer_rng(cfg, index, purpose), p

    def __call__(self) -> bool:
        if self.p in (0.0, 1.0):
            return self.p == 1.0
        return bool(self.rng.random() < self.p)


class Step:
    """SGD on a list of arrays, written out: ``p -= lr * g``, or with
    momentum mu ``buf = mu * buf + g; p -= lr * buf``."""

    def __init__(self, arrays, lr: float, momentum: float):
        self.arrays, self.lr, self.mu = arrays, lr, momentum
        self.bufs = [np.zeros_like(a) for a in arrays]

    def __call__(self, grads, scale: float = 1.0) -> None:
        for a, g, buf in zip(self.arrays, grads, self.bufs):
            if self.mu:
                buf *= self.mu
                buf += g
                g = buf
            a -= self.lr * scale * g


def plain_stale_backprop(cfg: Config):
    """async-backprop under the reference's rules, written as a queue: the
    gradient of batch t is computed by the output layer at step t and flows
    down through the hidden layers at step t + K, each using the activations
    cached at step t and its weights as they are at t + K. A gradient lost on
    its way to a layer never reaches the layers below it. The remedies:
    momentum; --lr-staleness steps lr / (1 + B*K); --delay-comp adds
    lambda * g * g * (w_now - w_then), w_then the weights of step t."""
    layers, (wo, bo) = initial_weights(cfg)
    n_hidden = len(layers)
    update = [Draws(cfg, k + 1, 1, cfg.update_prob) for k in range(n_hidden)]
    drop = [Draws(cfg, k + 1, 2, cfg.drop_prob) for k in range(n_hidden)]
    out_update = Draws(cfg, cfg.layers, 1, cfg.update_prob)
    steps = [Step([w, b], cfg.lr, cfg.momentum) for w, b in layers]
    out_step = Step([wo, bo], cfg.lr, cfg.momentum)
    scale = 1.0 / (1.0 + cfg.lr_staleness * cfg.grad_delay)
    queue = []                        # (activations, gradient for the top, weights then)
    for xb, yb in batches(cfg):
        n = len(xb)
        hs, p = forward(cfg, layers, wo, bo, xb)
        d = p - yb
        top = d @ wo.T
        if out_update():
            out_step([hs[-1].T @ d / n, d.sum(0) / n])
        then = [(w.copy(), b.copy()) for w, b in layers]
        queue.append((hs, None if drop[-1]() else top, then))
        if len(queue) <= cfg.grad_delay:
            continue
        hs, dh, then = queue.pop(0)
        n = len(hs[0])
        for k in range(n_hidden - 1, -1, -1):
            if dh is None:
                break
            w, b = layers[k]
            dz = dh * slope(cfg.activation, hs[k + 1])
            down = dz @ w.T                         # the weights before this update
            gw, gb = hs[k].T @ dz / n, dz.sum(0) / n
            if cfg.delay_comp:
                gw = gw + cfg.delay_comp * gw * gw * (w - then[k][0])
                gb = gb + cfg.delay_comp * gb * gb * (b - then[k][1])
            if update[k]():
                steps[k]([gw, gb], scale)
            dh = None if k > 0 and drop[k - 1]() else down
    return layers, (wo, bo)


def plain_stale_dni(cfg: Config):
    """The notebook's DNI loop with each SG module trained K steps late (on its
    input cached at step t, with the module as it is at t + K; with
    --no-sg-refresh on the prediction it made at step t), updates and
    arriving targets subject to their chances. The remedies: momentum;
    --sg-boost A steps the SG module (1 + A*K) x sg_lr; --lr-staleness B
    steps the layer lr / (1 + B*r), r its running staleness (r += 0.1 (K - r)
    per gradient applied); --sg-lookahead S predicts with the module moved
    S*r times its drift (drift += 0.1 (update - drift) per SG step), and such
    a prediction is always made again by the module itself for its
    regression."""
    layers, (wo, bo) = initial_weights(cfg)
    n_hidden = len(layers)
    sgs = zero_sg_modules(cfg, layers)
    update = [Draws(cfg, k + 1, 1, cfg.update_prob) for k in range(n_hidden)]
    drop = [Draws(cfg, k + 1, 2, cfg.drop_prob) for k in range(n_hidden)]
    out_update = Draws(cfg, cfg.layers, 1, cfg.update_prob)
    steps = [Step([w, b], cfg.lr, cfg.momentum) for w, b in layers]
    sg_steps = [Step([v, c], cfg.sg_lr, cfg.momentum) for v, c in sgs]
    out_step = Step([wo, bo], cfg.lr, cfg.momentum)
    running = [0.0] * n_hidden
    drifts = [(np.zeros_like(v), np.zeros_like(c)) for v, c in sgs]
    queue = []                              # per batch: [sg input, target, pred, own] per layer
    for xb, yb in batches(cfg):
        n = len(xb)
        h = xb
        cache = []
        for k, ((w, b), (v, c)) in enumerate(zip(layers, sgs)):
            h_in = h
            h = act(cfg.activation, h_in @ w + b)
            s_in = np.hstack([h, yb]) if cfg.mode == "cdni" else h
            ahead = cfg.sg_lookahead * running[k]
            dv, dc = drifts[k]
            pred = s_in @ (v + ahead * dv) + (c + ahead * dc) if ahead else s_in @ v + c
            dz = pred * slope(cfg.activation, h)
            down = dz @ w.T
            if update[k]():
                steps[k]([h_in.T @ dz / n, dz.sum(0) / n],
                         1.0 / (1.0 + cfg.lr_staleness * running[k]))
            cache.append([s_in, None, pred, not ahead])
            if k > 0:
                cache[k - 1][1] = None if drop[k - 1]() else down
        p = act("sigmoid", h @ wo + bo)
        d = p - yb
        target = d @ wo.T
        if out_update():
            out_step([h.T @ d / n, d.sum(0) / n])
        cache[-1][1] = None if drop[-1]() else target
        queue.append(cache)
        if len(queue) <= cfg.grad_delay:
            continue
        for k, ((s_in, target, pred, own), (v, c)) in enumerate(zip(queue.pop(0), sgs)):
            if target is None:
                continue
            fresh = cfg.sg_refresh or not own
            err = (s_in @ v + c if fresh else pred) - target
            v0, c0 = v.copy(), c.copy()
            sg_steps[k]([s_in.T @ err / len(s_in), err.sum(0) / len(s_in)],
                        1.0 + cfg.sg_boost * cfg.grad_delay)
            dv, dc = drifts[k]
            dv += 0.1 * ((v - v0) - dv)
            dc += 0.1 * ((c - c0) - dc)
            running[k] += 0.1 * (cfg.grad_delay - running[k])
    return layers, (wo, bo), sgs


def max_diff(a, b) -> float:
    return float(np.max(np.abs(a - b)))


def plain_unlocked_dni(cfg: Config):
    """--unlock forward or hidden under the --lockstep schedule, as one loop
    over steps (SGD, linear SG modules, every update applied, no drops).
    At step t every unlocked layer steps on its synthetic input of batch t
    (zero-started linear model of [x, y], or x alone at the output layer);
    then, bottom up, the true inputs of batch t - K (all of the last K at
    the final step) carry the true chain on: the output layer's loss
    gradient and each layer's SG prediction at its true h, carried back
    through its current weights, become the targets of the SG module below,
    a second step on the true input by option, the input model regressed
    onto the true input; then every SG module takes the targets K_grad
    steps old. Returns (hidden (w, b), output (w, b), SG modules (v, c),
    input models (u, b) by layer index)."""
    layers, (wo, bo) = initial_weights(cfg)
    sgs = zero_sg_modules(cfg, layers)
    n_hidden, kin, kgrad, lr = len(layers), cfg.input_delay, cfg.grad_delay, cfg.lr
    cond = cfg.mode == "cdni"
    unlocked = [k for k in range(2, cfg.layers + 1) if cfg.unlocks(k)]  # 1-based indices
    d = [cfg.dims[k - 1] for k in range(1, cfg.layers + 1)]            # input width of layer k
    si = {k: (np.zeros((d[0] + (cfg.bits if cond and k < cfg.layers else 0), d[k - 1])),
              np.zeros(d[k - 1])) for k in unlocked}
    every = list(batches(cfg))
    sg_in = {}       # (layer, batch) -> SG input at the true h
    targets = {}     # (layer, batch) -> target for its SG module

    def model_in(k, xb, yb):
        return np.hstack([xb, yb]) if cond and k < cfg.layers else xb

    h1 = {}          # batch -> layer 1's output, sent down as it forwarded it

    def true_step(s, xb, yb):
        """Batch s down the true chain from layer 1's output, each layer above
        with its weights as they are now."""
        h, n = h1.pop(s), len(xb)
        for k in range(2, n_hidden + 1):
            w, b = layers[k - 1]
            v, c = sgs[k - 1]
            h_in = h
            h = act(cfg.activation, h_in @ w + b)
            s_in = np.hstack([h, yb]) if cond else h
            g = s_in @ v + c
            dz = g * slope(cfg.activation, h)
            targets[(k - 1, s)] = dz @ w.T          # with the weights before a second step
            if cfg.si_second_step:
                w -= lr * h_in.T @ dz / n
                b -= lr * dz.sum(0) / n
            u, ub = si[k]
            inp = model_in(k, xb, yb)
            err = inp @ u + ub - h_in
            u -= cfg.si_step * inp.T @ err / n
            ub -= cfg.si_step * err.sum(0) / n
            sg_in[(k, s)] = s_in
        dlt = act("sigmoid", h @ wo + bo) - yb
        targets[(n_hidden, s)] = dlt @ wo.T
        if cfg.layers not in unlocked or cfg.si_second_step:   # locked: its only step
            wo[...] -= lr * h.T @ dlt / n
            bo[...] -= lr * dlt.sum(0) / n
        if cfg.layers in unlocked:
            u, ub = si[cfg.layers]
            err = xb @ u + ub - h
            u -= cfg.si_step * xb.T @ err / n
            ub -= cfg.si_step * err.sum(0) / n

    for t, (xb, yb) in enumerate(every):
        n = len(xb)
        h = xb
        for k in range(1, n_hidden + 1):              # the steps each layer takes at once
            w, b = layers[k - 1]
            v, c = sgs[k - 1]
            if k in unlocked:
                u, ub = si[k]
                h_in = model_in(k, xb, yb) @ u + ub
            elif k == 1:
                h_in = xb
            else:                                     # locked above the first: not here
                raise AssertionError("a locked layer above the first")
            hk = act(cfg.activation, h_in @ w + b)
            s_in = np.hstack([hk, yb]) if cond else hk
            dz = (s_in @ v + c) * slope(cfg.activation, hk)
            if k == 1:
                sg_in[(1, t)], h1[t] = s_in, hk
            w -= lr * h_in.T @ dz / n
            b -= lr * dz.sum(0) / n
        if cfg.layers in unlocked:
            u, ub = si[cfg.layers]
            x_hat = xb @ u + ub
            dlt = act("sigmoid", x_hat @ wo + bo) - yb
            wo -= lr * cfg.si_output_scale * x_hat.T @ dlt / n   # --si-output-scale
            bo -= lr * cfg.si_output_scale * dlt.sum(0) / n
        last = t == len(every) - 1
        for s in (range(max(0, t - kin), t + 1) if last else [t - kin] if t >= kin else []):
            true_step(s, *every[s])
        for k in range(1, n_hidden + 1):              # every SG module's due targets
            s = t - kgrad
            if s >= 0:
                v, c = sgs[k - 1]
                s_in = sg_in.pop((k, s))
                err = s_in @ v + c - targets.pop((k, s))
                v -= cfg.sg_lr * s_in.T @ err / len(s_in)
                c -= cfg.sg_lr * err.sum(0) / len(s_in)
    return layers, (wo, bo), sgs, si
