"""Continuous batching: requests join the running batch between decode steps, not after it.

With plain static batching, a request that arrives while a batch is decoding waits for the whole
batch to finish, and under a closed-loop load the batches split into two alternating halves.
Here every decode step serves whatever is running, new requests are prefilled and join at the
next step, and finished ones leave at once. Because the generators compute every row
independently, a request's tokens are the same whoever it shares steps with.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

from shipyard.models.family import Generator
from shipyard.models.sampling import GenerationRequest


@dataclass(frozen=True)
class Generated:
    """A finished request: its new tokens, the most sequences it shared a step with, and
    whether it stopped at the model's end token (else at its token limit)."""

    tokens: list[int]
    batch_size: int
    stopped: bool = False


@dataclass
class _Running:
    sequence: Any  # the generator's own Sequence
    result: asyncio.Future[Generated]
    batch_size: int = 1


class ContinuousBatcher:
    """Runs a decode loop on the event loop for up to `max_batch_size` sequences at a time.

    Each step runs synchronously on the loop; between steps the loop takes in new requests.
    """

    def __init__(self, generator: Generator, max_batch_size: int):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self._waiting: deque[tuple[GenerationRequest, asyncio.Future[Generated]]] = deque()
        self._running: list[_Running] = []
        self._loop_task: asyncio.Task | None = None

    def submit(self, requests: list[GenerationRequest]) -> list[asyncio.Future[Generated]]:
        """Queue requests; each future resolves when its request has all its tokens."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self._waiting.extend(zip(requests, futures, strict=True))
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = loop.create_task(self._decode_loop())
        return futures

    async def _decode_loop(self) -> None:
        while self._waiting or self._running:
            self._admit()
            if self._running:
                self._step()
            await asyncio.sleep(0)  # let new requests in before the next step

    def _admit(self) -> None:
        """Prefill waiting requests (one by one) while there is room in the batch."""
        while self._waiting and len(self._running) < self.max_batch_size:
            request, result = self._waiting.popleft()
            if result.cancelled():
                continue
            try:
                running = _Running(self.generator.start(request), result)
            except Exception as error:  # a broken model, reported to this request alone
                result.set_exception(error)
                continue
            self._running.append(running)
        self._finish()

    def _step(self) -> None:
        batch_size = len(self._running)
        for running in self._running:
            running.batch_size = max(running.batch_size, batch_size)
        try:
            self.generator.step([running.sequence for running in self._running])
        except Exception as error:  # the weights broke mid-flight: every sequence is affected
            for running in self._running:
                running.result.set_exception(error)
            self._running.clear()
            return
        self._finish()

    def _finish(self) -> None:
        still_running = []
        for running in self._running:
            if running.result.cancelled():
                continue  # the client went away
            if running.sequence.done:
                sequence = running.sequence
                generated = Generated(sequence.produced, running.batch_size, sequence.stopped)
                running.result.set_result(generated)
            else:
                still_running.append(running)
        self._running = still_running
