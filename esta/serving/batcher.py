"""`Batcher`: forms mixed-stitch batches from concurrent requests and runs them through a `Palette`.

    batcher = Batcher(palette, max_batch_size=32, max_wait_ms=2.0)
    batcher.start()
    future = batcher.submit(inputs, member)        # inputs: (n, *example_shape); a concurrent.futures.Future
    outputs = future.result()                      # (n, ...) on the CPU
    batcher.stop()                                 # runs what is queued, then the worker ends

One worker thread owns the palette. It waits for a first request, then collects more until the batch holds
`max_batch_size` rows or `max_wait_ms` have passed since that first request arrived (requests already
queued join at once), and runs every collected request, whatever its member, in one palette forward.
A request is never split: one that does not fit the current batch starts the next one. Requests larger than
`max_batch_size` rows are refused at submit. The queue is bounded (`max_queue` requests): a full queue
refuses new work (`QueueFull`) instead of growing without limit. `stop()` refuses new work (`ShuttingDown`)
and finishes everything already queued before the worker ends.
"""
from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Deque, List, Optional

import torch
from torch import Tensor

__all__ = ["Batcher", "QueueFull", "ShuttingDown", "BatchStats"]


class QueueFull(RuntimeError):
    """The batcher's queue is full; try again later."""


class ShuttingDown(RuntimeError):
    """The batcher is stopping and takes no new work."""


@dataclass
class _Request:
    inputs: Tensor
    member: int
    arrived: float
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    batches: int = 0
    rows: int = 0
    requests: int = 0
    max_rows: int = 0
    members_per_batch: float = 0.0   # running mean of distinct members per batch

    def as_dict(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "requests": self.requests, "max_rows": self.max_rows,
                "mean_rows": self.rows / self.batches if self.batches else 0.0,
                "mean_members": self.members_per_batch}


class Batcher:
    def __init__(self, palette, *, max_batch_size: int = 32, max_wait_ms: float = 2.0, max_queue: int = 1024) -> None:
        for name, value, low in (("max_batch_size", max_batch_size, 1), ("max_queue", max_queue, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"Batcher: {name} must be an int >= {low}, got {value!r}")
        if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, (int, float)) or not 0 <= max_wait_ms < 1e6:
            raise ValueError(f"Batcher: max_wait_ms must be a number in [0, 1e6), got {max_wait_ms!r}")
        self.palette = palette
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.stats = BatchStats()
        self._queue: Deque[_Request] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------------------------ clients
    def submit(self, inputs: Tensor, member: int) -> Future:
        """Queues `inputs` (n rows, already checked against the palette) for `member`; a Future of the outputs."""
        n = inputs.shape[0]
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"a request holds 1 to {self.max_batch_size} inputs (the batcher's max batch size), "
                             f"got {n}")
        request = _Request(inputs, member, time.perf_counter())
        with self._cond:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(request)
            self._cond.notify()
        return request.future

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    # ------------------------------------------------------------------------------------ lifecycle
    def start(self) -> "Batcher":
        if self._thread is not None:
            raise RuntimeError("Batcher.start: already started")
        self._thread = threading.Thread(target=self._loop, name="esta-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: Optional[float] = None) -> None:
        """Refuses new work, finishes what is queued, and ends the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------------------------ the worker
    def _next_batch(self) -> List[_Request]:
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return []
                self._cond.wait()
            batch = [self._queue.popleft()]
            rows = batch[0].inputs.shape[0]
            deadline = batch[0].arrived + self.max_wait
            while rows < self.max_batch_size:
                if self._queue:
                    if rows + self._queue[0].inputs.shape[0] > self.max_batch_size:
                        break  # it starts the next batch
                    request = self._queue.popleft()
                    batch.append(request)
                    rows += request.inputs.shape[0]
                    continue
                remaining = deadline - time.perf_counter()
                if remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                inputs = torch.cat([r.inputs for r in batch]) if len(batch) > 1 else batch[0].inputs
                members = [r.member for r in batch for _ in range(r.inputs.shape[0])]
                outputs = self.palette(inputs.to(self.palette.device), members).cpu()
            except Exception as e:  # every request of the batch learns why; the worker keeps serving
                for r in batch:
                    r.future.set_exception(e)
                continue
            s = self.stats
            s.members_per_batch = (s.members_per_batch * s.batches + len({r.member for r in batch})) / (s.batches + 1)
            s.batches += 1
            s.rows += len(members)
            s.requests += len(batch)
            s.max_rows = max(s.max_rows, len(members))
            k = 0
            for r in batch:
                n = r.inputs.shape[0]
                r.future.set_result(outputs[k: k + n])
                k += n
