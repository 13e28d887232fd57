"""Stop cleanly on SIGTERM: finish the step, save and push a checkpoint, then end training."""

import logging
import signal
import threading
import time

import pytorch_lightning as pl

from fashion_gan.callbacks.checkpoints import CheckpointPushCallback

log = logging.getLogger(__name__)


class PreemptionSignal:
    """Records SIGTERM (a spot reclaim, `docker stop`, `fashion-gan stop`) or a first Ctrl-C for the whole job.

    The handler only sets a flag. During `fit` it also replaces Lightning's SIGTERM handler, whose flag
    makes the fit loop raise SIGTERMException (a SystemExit) without a checkpoint.
    """

    def __init__(self) -> None:
        self.received = threading.Event()
        self.received_at: float | None = None
        self._previous = None
        self._previous_interrupt = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._previous_interrupt = signal.signal(signal.SIGINT, self._handle)

    def take_over_from_lightning(self) -> None:
        """Replace the handler the Trainer registered at the start of `fit` (it restores it at teardown)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._handle)
            signal.signal(signal.SIGINT, self._handle)

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._previous_interrupt is not None:
            signal.signal(signal.SIGINT, self._previous_interrupt)
            self._previous_interrupt = None

    def seconds_left(self, grace_period_s: float) -> float:
        if self.received_at is None:
            return grace_period_s
        return max(0.0, grace_period_s - (time.monotonic() - self.received_at))

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received.is_set():
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop at once, without the checkpoint
            return
        self.received_at = time.monotonic()
        self.received.set()
        hint = " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        log.warning("Received %s: saving a checkpoint after the current step, then stopping%s", name, hint)


class PreemptionCallback(pl.Callback):
    """After each step, stop training when SIGTERM arrived, saving and pushing a checkpoint first."""

    def __init__(self, preemption: PreemptionSignal, checkpoints: CheckpointPushCallback) -> None:
        self.preemption = preemption
        self.checkpoints = checkpoints
        self.stopped_at_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.preemption.take_over_from_lightning()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        requested = self.preemption.received.is_set()
        if trainer.world_size > 1:
            # Every rank must agree, or one would wait forever in the next collective.
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        self.checkpoints.save(trainer, pl_module)
        self.stopped_at_step = trainer.global_step
        trainer.should_stop = True
        log.warning("Stopping after step %d because of SIGTERM", trainer.global_step)
