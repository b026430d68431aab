"""Tests for pipeline.reference: equal to plain numpy loops written here; learns the seed task as measured."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline import data
from pipeline.config import Config
from pipeline.model import make_hidden, make_output
from pipeline.reference import train_reference

pytestmark = pytest.mark.timeout(60)


def act(name, z):
    return 1.0 / (1.0 + np.exp(-z)) if name == "sigmoid" else np.maximum(z, 0.0)


def slope(name, h):
    return h * (1.0 - h) if name == "sigmoid" else (h > 0).astype(float)


def initial_weights(cfg: Config):
    """The run's initial weights, copied before any training."""
    hs = [make_hidden(cfg, k) for k in range(1, cfg.layers)]
    out = make_output(cfg)
    return [(h.w.copy(), h.b.copy()) for h in hs], (out.w.copy(), out.b.copy())


def plain_backprop(cfg: Config):
    """Mini-batch SGD on the batch-mean BCE, all gradients from one forward pass."""
    x, y = data.addition(cfg.bits, cfg.examples, cfg.seed)
    layers, (wo, bo) = initial_weights(cfg)
    for _ in range(cfg.epochs):
        for start in range(0, cfg.examples, cfg.batch_size):
            xb, yb = x[start:start + cfg.batch_size], y[start:start + cfg.batch_size]
            n = len(xb)
            hs = [xb]
            for w, b in layers:
                hs.append(act(cfg.activation, hs[-1] @ w + b))
            p = act("sigmoid", hs[-1] @ wo + bo)
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
    """The seed's DNI loop: per batch, every hidden layer updates at once with
    its SG prediction (from [h, y] under cdni) and passes (g*f') W^T down as
    the next-lower SG module's target; the output layer's true gradient is
    the top SG module's target."""
    x, y = data.addition(cfg.bits, cfg.examples, cfg.seed)
    layers, (wo, bo) = initial_weights(cfg)
    sgs = []
    for w, _ in layers:
        width = w.shape[1]
        rows = width + (cfg.bits if cfg.mode == "cdni" else 0)
        sgs.append((np.zeros((rows, width)), np.zeros(width)))
    for _ in range(cfg.epochs):
        for start in range(0, cfg.examples, cfg.batch_size):
            xb, yb = x[start:start + cfg.batch_size], y[start:start + cfg.batch_size]
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


def max_diff(a, b) -> float:
    return float(np.max(np.abs(a - b)))


CASES = [
    dict(epochs=5),
    dict(epochs=4, activation="relu", lr=0.1),
    dict(epochs=3, layers=4, hidden=(16, 12, 8), examples=25),   # short last batch
    dict(epochs=3, layers=2, hidden=(20,), batch_size=7, bits=5, examples=30, seed=4),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_backprop_reference_equals_plain_numpy_loop(kw):
    cfg = Config(mode="backprop", quiet=True, **kw)
    layers, (wo, bo) = plain_backprop(cfg)
    res = train_reference(cfg)
    assert res.batches == cfg.total_batches
    assert len(res.hidden) == cfg.layers - 1
    for (w, b), layer in zip(layers, res.hidden):
        assert max_diff(layer.w, w) <= 1e-12
        assert max_diff(layer.b, b) <= 1e-12
    assert max_diff(res.output.w, wo) <= 1e-12
    assert max_diff(res.output.b, bo) <= 1e-12
    # and the training has moved the weights at all
    assert max_diff(res.output.w, initial_weights(cfg)[1][0]) > 1e-3

    # final evaluation: loss and exact-match rate of the trained weights, computed here
    x, y = data.addition(cfg.bits, cfg.examples, cfg.seed)
    h = x
    for w, b in layers:
        h = act(cfg.activation, h @ w + b)
    z = h @ wo + bo
    want_loss = np.mean(np.sum(np.logaddexp(0.0, z) - y * z, axis=1))
    want_acc = np.mean(np.all((z > 0) == (y == 1), axis=1))
    assert res.final_loss == pytest.approx(want_loss, rel=1e-9)
    assert res.train_accuracy == want_acc


@pytest.mark.parametrize("mode", ["dni", "cdni"])
@pytest.mark.parametrize("kw", [dict(epochs=5), dict(epochs=3, layers=4, hidden=(16, 12, 8),
                                                      examples=25, activation="relu", lr=0.1)],
                         ids=["seed-shape", "deep-relu-short-batch"])
def test_dni_reference_equals_plain_numpy_loop(mode, kw):
    cfg = Config(mode=mode, quiet=True, **kw)
    layers, (wo, bo), sgs = plain_dni(cfg)
    res = train_reference(cfg)
    for (w, b), (v, c), layer in zip(layers, sgs, res.hidden):
        assert max_diff(layer.w, w) <= 1e-12
        assert max_diff(layer.b, b) <= 1e-12
        assert max_diff(layer.v, v) <= 1e-12
        assert max_diff(layer.c, c) <= 1e-12
        assert np.abs(v).max() > 0  # the SG modules did learn
    assert max_diff(res.output.w, wo) <= 1e-12
    assert max_diff(res.output.b, bo) <= 1e-12


def test_emitted_events_per_epoch():
    cfg = Config(mode="cdni", epochs=3, examples=25, quiet=True)
    events = []
    res = train_reference(cfg, emit=events.append)
    epochs = [e for e in events if e["event"] == "epoch"]
    sg = [e for e in events if e["event"] == "sg"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2]
    assert all(e["role"] == "output" and e["batches"] == 3 for e in epochs)
    assert sorted((e["role"], e["epoch"]) for e in sg) == \
        [(r, ep) for r in ("layer1", "layer2") for ep in range(3)]
    assert all(e["gradients"] == 3 for e in sg)
    assert res.batches == 9


def test_should_stop_interrupts():
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 4

    with pytest.raises(KeyboardInterrupt):
        train_reference(Config(mode="backprop", epochs=2, quiet=True), should_stop=stop)
    assert len(calls) == 5


# --- behaviour on the seed task (Config defaults: 8 bits, 100 examples, batch 10,
# --- hidden 128/64, sigmoid, lr 0.5, sg-lr 0.03, 800 epochs). Measured with seeds 1-3:
# --- cdni 100 %, backprop 100 %, dni 1-3 % (its loss falls slowly: 6.5 -> 5.2).

def _run(**kw):
    events = []
    res = train_reference(Config(quiet=True, **kw), emit=events.append)
    losses = [e["loss"] for e in events if e["event"] == "epoch"]
    return res, losses


def test_cdni_solves_the_seed_task():
    res, _ = _run()
    assert res.train_accuracy == 1.0
    assert res.final_loss < 0.1


def test_backprop_solves_the_seed_task():
    res, _ = _run(mode="backprop")
    assert res.train_accuracy >= 0.95
    assert res.final_loss < 0.1


def test_plain_dni_learns_the_seed_task_slowly():
    res, losses = _run(mode="dni")
    assert res.train_accuracy <= 0.1        # far from cdni's 100 % in the same epochs
    assert res.final_loss < losses[0] - 0.5  # but it does learn
    assert np.isfinite(res.final_loss)


@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_sg_lr_equal_to_layer_lr_diverges(mode):
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        res, _ = _run(mode=mode, sg_lr=0.5, epochs=40)
    assert not np.isfinite(res.final_loss)
    assert res.train_accuracy == 0.0
