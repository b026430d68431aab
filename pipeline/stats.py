"""Per-epoch accumulators that turn a stream of batches into metric events."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EpochStats:
    loss_sum: float = 0.0     # sum over batches of batch-mean loss * batch size
    correct: int = 0
    examples: int = 0
    batches: int = 0
    last_elapsed: float = 0.0  # when the previous epoch ended, for throughput

    def add(self, batch_loss: float, correct: int, n: int) -> None:
        self.loss_sum += batch_loss * n
        self.correct += correct
        self.examples += n
        self.batches += 1

    def _take(self) -> tuple[float, float, int]:
        n = max(self.examples, 1)
        out = (self.loss_sum / n, self.correct / n, self.batches)
        self.loss_sum, self.correct, self.examples, self.batches = 0.0, 0, 0, 0
        return out

    def epoch_event(self, role: str, epoch: int, elapsed: float) -> dict:
        """The output layer's epoch: mean training loss and exact-match rate
        over the batches as they were trained (weights moving)."""
        loss, acc, batches = self._take()
        span, self.last_elapsed = elapsed - self.last_elapsed, elapsed
        return {"event": "epoch", "role": role, "epoch": epoch, "loss": loss,
                "accuracy": acc, "batches": batches, "elapsed_s": elapsed,
                "batches_per_s": batches / span if span > 0 else None}

    def sg_event(self, role: str, epoch: int, elapsed: float) -> dict:
        loss, _, batches = self._take()
        return {"event": "sg", "role": role, "epoch": epoch, "sg_loss": loss,
                "gradients": batches, "elapsed_s": elapsed}
