"""Pipelined FedGKT rounds: the server trains round t in the background while the
nodes evaluate round t and train round t+1.

Round t+1's nodes get the newest server logits that are ready (one round older),
and round t is scored and recorded (log line, ``on_round_end``, checkpoint) once
its server training has finished, when round t+1's uploads arrive (the last round
at once). A schedule over the same round engine as :class:`~flwr_fedgkt.strategy.FedGKT`:
only ``aggregate_train``, ``aggregate_evaluate`` and ``start`` differ. ``start``
notes the last round, runs Flower's own loop, then completes the returned
``Result`` with each round's metrics and the final model, which Flower's loop
cannot know in time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result
from flwr.supercore import log

from .budget import complete_result
from .server_step import TrainingJob
from .strategy import FedGKT
from .validation import AcceptedReply

__all__ = ["PipelinedFedGKT"]


class PipelinedFedGKT(FedGKT):
    """FedGKT with pipelined rounds (the run config's ``pipeline = true``).

    Takes the arguments of :class:`~flwr_fedgkt.strategy.FedGKT`. Nodes distil
    from server logits one round older; ``evaluate_fn`` needs each round's model
    in turn, so it is refused here.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._training: tuple[TrainingJob, Future[None]] | None = None
        self._to_score: list[AcceptedReply] = []  # the open round's test replies
        self._last_round = 0

    def summary(self) -> None:
        """Log FedGKT's settings, and that rounds are pipelined."""
        super().summary()
        log(INFO, "\t└──> Pipelined rounds: the server trains round t during round t+1")

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Close the round before (its training, then its scores), so that these
        replies are validated against the store as that training left it; then
        start this round's server training in the background."""
        server_round += self.engine.round_offset
        self._received(server_round, "train")
        self._close_pending()
        replies = self._keep_test_uploads(replies)
        accepted = self._accept(replies, server_round, training=True)
        job = self.engine.start_training(server_round, accepted)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedgkt-server")
        self._training = (job, executor.submit(self.engine.run_training, job))
        executor.shutdown(wait=False)
        return None, None  # this round's model and metrics are not ready yet

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Keep the test replies until the round's server training is done (the
        last round: wait for it now)."""
        server_round += self.engine.round_offset
        self._received(server_round, "evaluate")
        tested, self._tested = self._tested.values(), {}
        self._to_score = self._accept(replies, server_round, training=False, tested=tested)
        if server_round < self._last_round:
            return None  # scored once the round's server training is done
        metrics = self._close_pending()
        return None if metrics is None else MetricRecord(dict(metrics))

    def budget_spent(self) -> None:
        """Finish the round whose server training is under way."""
        self._close_pending()

    def _close_pending(self) -> dict[str, float] | None:
        """Wait for the pending server training, then finish it and score and
        close its round; that round's evaluation metrics."""
        if self._training is None:
            return None
        job, future = self._training
        self._training = None
        future.result()  # re-raises what the training raised
        self.engine.finish_training(job)
        return self.engine.close_round(job.server_round, self._to_score)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Flower's loop, with the last round noted before and the ``Result``
        completed after (each round's metrics, the final server model)."""
        if evaluate_fn is not None:
            raise ValueError(
                "evaluate_fn needs each round's model in turn: not with pipelined rounds "
                "(use FedGKT)"
            )
        self._last_round = self.engine.round_offset + num_rounds
        first = len(self.engine.history)
        try:
            result = super().start(
                grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config
            )
        finally:
            if self._training is not None:  # a round failed: let its training end
                self._training[1].exception()
                self._training = None
        complete_result(result, self, first)
        return result
