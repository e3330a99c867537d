"""`Scheduler`: continuous batching of many requests over one session's `SlotBatch`.

One thread owns the session and N slots (`slots.py`). Requests (`Job`s: one prompt, one output) wait in
a bounded FIFO queue, take a slot between model calls, and leave it when they finish, are cancelled or
time out. Each loop iteration:

1. Admit: every waiting job that finds a free slot takes one. Slot choice: the free slot whose cached
   tokens share the longest prefix with the job's prompt (the next turn of a chat, a shared system prompt);
   that prefix is kept and only the rest is fed. With no shared prefix, the lowest free slot is evicted:
   busy slots stay packed at the bottom, and a decode call runs rows [0, highest busy slot], so a freed
   high slot keeps its cache longest while the calls stay as small as the load allows.
2. Prefill one chunk: the oldest job still feeding its prompt gets at most `chunk` tokens (one batch-1
   call on its slot; the CPU kernel takes a multi-token chunk after a past only at batch 1). A long prompt
   thus costs every other stream at most one chunk's time per token, not its whole prefill.
3. Decode: every slot that has its first token advances one token in one batched call.

Each job's tokens go through its own `Completion` (sampler, text, stop strings, finish reason), so a job's
output is the one `Generator.generate` gives for the same prompt and sampling config: greedy token for token
where batching keeps rows independent (fp32, fp16 and int8, whose activations are quantized per row; not int4
at a near tie, nor the older `int8_kernel="dynamic"` bundles: see `Generator.generate_batch`). Events reach the
caller through `Job.sink`, called on this thread.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from edgegpt.errors import ContextLengthError, QueueFullError
from edgegpt.runtime.generation.budget import token_budget
from edgegpt.runtime.generation.completion import Completion
from edgegpt.runtime.engine.state import reusable_prefix
from edgegpt.runtime.generation.generator import Generator

__all__ = ["Job", "QueueFullError", "Scheduler"]


@dataclass(eq=False)
class Job:
    """One prompt to continue: its `Completion` (`Generator.new_completion`: prompt, sampler, constraint,
    max_new); `sink(kind, job)` hears "token" (job.last_piece is new text) and "done".

    After "done": `completion` holds tokens, text and finish_reason ("eos", "stop", "length", or
    "cancelled" / "timeout" when it ended early); `cached_tokens` counts prompt tokens a slot already held.
    """

    completion: Completion
    sink: Callable[[str, "Job"], None] | None = None
    timeout_s: float | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)
    last_piece: str = ""
    cached_tokens: int = 0
    slot: int | None = None
    fed: int = 0
    cancelled: bool = False

    def cancel(self) -> None:
        """Stop at the next step (thread-safe: a flag the scheduler reads); its slot is freed."""
        self.cancelled = True

    @property
    def prompt(self) -> list[int]:
        return self.completion.prompt

    @property
    def first_token_at(self) -> float | None:
        """When the first token came (perf_counter seconds), None before it."""
        return self.token_times[0] if self.token_times else None


class Scheduler:
    """Continuous batching on one `Generator`; see the module docstring. Start with `start()`.

    Args:
        gen: the model (its session and bundle; a "shared_buffer" graph).
        slots: sequences decoded together at most.
        capacity: positions per slot (default: the model's context).
        chunk: prompt tokens fed per prefill call at most.
        queue_limit: jobs that may wait for a slot; `submit` raises QueueFullError beyond it.
    """

    def __init__(
        self, gen: Generator, slots: int = 4, capacity: int | None = None, chunk: int = 128, queue_limit: int = 64
    ):
        self.gen = gen
        self.batch = gen.new_slots(slots, capacity)
        self.capacity, self.chunk, self.queue_limit = self.batch.capacity, chunk, queue_limit
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job | None] = [None] * slots  # the job in each slot
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="edgegpt-scheduler", daemon=True)

    # ------------------------------------------------------------------ caller side (any thread)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what waits or runs, finish the loop, join the thread."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def busy_slots(self) -> int:
        return sum(job is not None for job in self._running)

    def check_fits(self, prompt_tokens: int, max_new: int | None) -> int:
        """The max_new a prompt of this length gets: at most what fits in a slot (None: all that fits).

        Raises ContextLengthError when the prompt alone leaves no room for a token (`token_budget` with fit).
        """
        return token_budget(prompt_tokens, max_new, self.capacity, fit=True)

    def submit(self, job: Job) -> None:
        """Queue a job (its prompt and max_new must fit a slot: `check_fits`); QueueFullError when full."""
        prompt, max_new = job.prompt, job.completion.max_new
        if not prompt or max_new < 1 or token_budget(len(prompt), max_new, self.capacity, fit=True) < max_new:
            raise ContextLengthError(
                f"{len(prompt)} prompt tokens + {max_new} new do not fit a slot's {self.capacity} positions"
            )
        with self._wake:
            if self._stopping:
                raise QueueFullError("the server is shutting down")
            if len(self._waiting) >= self.queue_limit:
                raise QueueFullError(
                    f"{len(self._waiting)} requests are already waiting (the queue limit); retry shortly"
                )
            self._waiting.append(job)
            self._wake.notify()

    # ------------------------------------------------------------------ the scheduler thread

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._waiting and self.busy_slots == 0:
                    self._wake.wait()
                if self._stopping:
                    break
                self._admit()
            self._drop_ended()
            try:
                self._prefill_one()
                self._decode()
            except Exception as exc:  # a model failure ends the running jobs, not the server
                for job in self._running:
                    if job is not None:
                        self._end(job, f"error: {exc}")
        with self._wake:
            ended, self._waiting = list(self._waiting), collections.deque()
        for job in ended + [job for job in self._running if job is not None]:
            self._end(job, "cancelled")

    def _admit(self) -> None:
        """Give waiting jobs free slots (under the lock)."""
        while self._waiting:
            free = [s for s, job in enumerate(self._running) if job is None]
            if not free:
                return
            job = self._waiting.popleft()
            if job.cancelled:
                self._end(job, "cancelled")
                continue
            shared = {s: reusable_prefix(self.batch.tokens[s], job.prompt) for s in free}
            # The longest shared prefix (ties: the lowest slot); without one, the lowest free slot, which keeps
            # the batched rows [0, k) few: every slot below k rides along in each decode call.
            slot = max(free, key=lambda s: (shared[s], -s)) if max(shared.values()) else free[0]
            kept = shared[slot]
            self.batch.rewind(slot, kept)
            job.slot, job.fed, job.cached_tokens = slot, kept, kept
            self._running[slot] = job

    def _drop_ended(self) -> None:
        now = time.perf_counter()
        for job in self._running:
            if job is None:
                continue
            if job.cancelled:
                self._end(job, "cancelled")
            elif job.timeout_s is not None and now - job.submitted_at > job.timeout_s:
                self._end(job, "timeout")

    def _prefill_one(self) -> None:
        feeding = [job for job in self._running if job is not None and job.fed < len(job.prompt)]
        if not feeding:
            return
        job = min(feeding, key=lambda j: j.submitted_at)
        piece = job.prompt[job.fed : job.fed + self.chunk]
        logits = self.batch.prefill(job.slot, piece)
        job.fed += len(piece)
        if job.fed == len(job.prompt):
            self._emit(job, job.completion.sample(logits))

    def _decode(self) -> None:
        ready = {job.slot: job for job in self._running if job is not None and job.fed == len(job.prompt)}
        if not ready:
            return
        logits = self.batch.step({slot: job.completion.tokens[-1] for slot, job in ready.items()})
        for slot, job in ready.items():
            self._emit(job, job.completion.sample(logits[slot]))

    def _emit(self, job: Job, piece: str) -> None:
        now = time.perf_counter()
        job.token_times.append(now)
        job.last_piece = piece
        if job.completion.finish_reason is not None:
            self._release(job)
            job.sink("done", job)
        else:
            job.sink("token", job)

    def _end(self, job: Job, reason: str) -> None:
        """Finish a job early (cancelled, timeout, error) and free its slot."""
        job.last_piece = job.completion.finish(reason) if job.completion.finish_reason is None else ""
        self._release(job)
        job.sink("done", job)

    def _release(self, job: Job) -> None:
        if job.slot is not None and self._running[job.slot] is job:
            self._running[job.slot] = None
