"""Continuous batching: requests join the running batch between decode steps, not after it.

With static batching, a request that arrives while a batch decodes waits for the whole batch,
and under a closed-loop load the batches split into two alternating halves. Here every decode
step serves whatever is running: new requests are prefilled and join at the next step, finished
or abandoned ones leave at once. Each sequence hands its new tokens to its own `TokenStream`
after every step, so an answer can be streamed as it is made. Because the generators compute
every row independently, a request's tokens are the same whoever it shares steps with.

Steps run on the event loop itself, which takes in new requests and writes streamed chunks
between them: handing each step to a worker thread cost more per token (thread wake-ups and
GIL hand-offs, ~0.8 ms on 2 cores) than a small model's step itself.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

from shipyard.models.family import Generator
from shipyard.models.sampling import GenerationRequest


@dataclass(frozen=True)
class Finished:
    """The end of a stream: whether the model ended it with its end token (else it reached
    its token limit), and the most sequences it shared a step with."""

    stopped: bool
    batch_size: int


class TokenStream:
    """One request's tokens as the batcher makes them: iterate for each step's new tokens;
    `cancel()` makes it leave the batch at the next step (a client gone, a stop string)."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.finished: Finished | None = None
        self.cancelled = False
        self._queue: asyncio.Queue[list[int] | Finished | BaseException] = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled = True

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> list[int]:
        if self.finished is not None:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, Finished):
            self.finished = item
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def _put(self, item: list[int] | Finished | BaseException) -> None:
        self._queue.put_nowait(item)


@dataclass
class _Running:
    sequence: Any  # the generator's own Sequence
    stream: TokenStream
    sent: int = 0  # tokens already handed to the stream
    batch_size: int = 1


@dataclass
class BatcherStats:
    """What the replica's batch has done, for /v1/health and for tests."""

    decoded_tokens: int = 0  # every token every sequence was given
    abandoned: int = 0  # sequences that left the batch before their end (cancelled)
    steps: int = 0


class ContinuousBatcher:
    """Decodes up to `max_batch_size` sequences at a time, admitting new ones between steps."""

    def __init__(self, generator: Generator, max_batch_size: int, wait_s: float = 0.0):
        self.generator = generator
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.stats = BatcherStats()
        self._waiting: deque[TokenStream] = deque()
        self._running: list[_Running] = []
        self._loop_task: asyncio.Task | None = None

    @property
    def waiting(self) -> int:
        """Requests waiting for a place in the batch (not counting abandoned ones)."""
        return sum(not stream.cancelled for stream in self._waiting)

    @property
    def running(self) -> int:
        """Sequences in the batch (not counting those leaving at the next step)."""
        return sum(not running.stream.cancelled for running in self._running)

    @property
    def idle(self) -> bool:
        """No decode loop is running (the next request starts one, after `wait_s`)."""
        return self._loop_task is None or self._loop_task.done()

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a request; its stream gives its tokens step by step."""
        stream = TokenStream(request)
        self._waiting.append(stream)
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._decode_loop())
        return stream

    async def _decode_loop(self) -> None:
        if self.wait_s:
            await asyncio.sleep(self.wait_s)  # let company arrive before the first step
        while self._waiting or self._running:
            self._admit()
            if self._running:
                self._step()
            await asyncio.sleep(0)  # let new requests in before the next step

    def _admit(self) -> None:
        """Prefill waiting requests (one by one) while there is room in the batch."""
        while self._waiting and len(self._running) < self.max_batch_size:
            stream = self._waiting.popleft()
            if stream.cancelled:
                continue
            try:
                sequence = self.generator.start(stream.request)
            except Exception as error:  # a broken model, reported to this request alone
                stream._put(error)
                continue
            self._running.append(_Running(sequence, stream))
        self._hand_out()

    def _step(self) -> None:
        batch = [running for running in self._running if not running.stream.cancelled]
        for running in batch:
            running.batch_size = max(running.batch_size, len(batch))
        try:
            self.generator.step([r.sequence for r in batch])
        except Exception as error:  # the weights broke mid-flight: every sequence is affected
            for running in self._running:
                running.stream._put(error)
            self._running.clear()
            return
        self.stats.steps += 1
        self._hand_out()

    def _hand_out(self) -> None:
        """Give every stream its new tokens; finished and cancelled sequences leave."""
        still_running = []
        for running in self._running:
            sequence, stream = running.sequence, running.stream
            if stream.cancelled:
                self.stats.abandoned += 1
                continue
            new = sequence.produced[running.sent :]
            running.sent = len(sequence.produced)
            self.stats.decoded_tokens += len(new) + int(sequence.stopped and sequence.done)
            if new:
                stream._put(new)
            if sequence.done:
                stream._put(Finished(sequence.stopped, running.batch_size))
            else:
                still_running.append(running)
        self._running = still_running
