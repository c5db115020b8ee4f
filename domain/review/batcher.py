"""One generation batch for many concurrent review jobs.

The review worker runs its queue with Celery's threads pool (concurrency N = ``review_batch_size``).
Each job thread calls ``Batcher.submit`` and waits on the returned future; one batcher thread per
resident runtime takes the first waiting request, collects more for up to ``wait_s`` (or until N are
waiting), and runs them as one batch (``Runtime.generate``: each prompt prefilled alone, then all rows
decoded together) with one adapter per row. A batch holds at most the runtime's ``max_adapters``
distinct adapters; requests beyond that wait for the next batch, in order.

Failures stay with the requests they belong to: an adapter that cannot be loaded fails only its
requests; out of memory splits the batch in halves and, for a single row, raises ``TransientError``.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from domain.device import oom_code
from domain.errors import TransientError, is_out_of_memory

log = logging.getLogger(__name__)


@dataclass
class AdapterHandle:
    """What a request needs to find its adapter: the version id and how to get its verified folder
    (called only when the adapter is not resident already)."""

    version_id: str
    locate: Callable[[], Path]


class BatchModel(Protocol):
    """What the batcher needs of a resident model (``domain.review.runtime.Runtime``)."""

    max_adapters: int
    device: torch.device

    def ensure_adapter(self, handle: AdapterHandle, pinned: set[str] = ...) -> str: ...

    def generate(self, prompts: list[list[int]], slots: list[str | None], max_new_tokens: list[int],
                 prefix_lens: list[int]) -> list[list[int]]: ...

    def decode(self, token_ids: list[int]) -> str: ...


@dataclass
class GenerationRequest:
    input_ids: list[int]
    max_new_tokens: int
    adapter: AdapterHandle | None = None  # None: the bare base model
    prefix_len: int = 0  # leading tokens shared by all reviews (system prompt): their KV cache is reused
    control: Any = None  # domain.review.decoding.DecodeControl: repetition control and stop rule, or None
    future: Future = field(default_factory=Future)
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass
class Generation:
    token_ids: list[int]
    text: str
    prompt_tokens: int
    completion_tokens: int  # real generated tokens (up to and including the end token), never padding
    batch_size: int
    batch_adapters: int  # distinct adapters (base counts as one) in the batch
    generate_seconds: float  # the whole batch's generation time
    gpu_seconds: float  # this row's share of the batch's GPU time (by tokens); 0 on CPU
    queue_seconds: float


@dataclass
class _Call:
    """Other work on the model, run on the batcher's thread between batches (``Batcher.call``)."""

    fn: Callable[[], Any]
    future: Future = field(default_factory=Future)


class Batcher:
    """Batches the requests submitted from many job threads onto one model, on one thread of its own."""

    def __init__(self, runtime: BatchModel, max_batch: int = 8, wait_s: float = 0.02):
        self.runtime = runtime
        self.max_batch = max(1, int(max_batch))
        self.wait_s = max(0.0, float(wait_s))
        self._queue: queue.Queue[GenerationRequest] = queue.Queue()
        self._held: deque[GenerationRequest] = deque()  # taken from the queue, left for the next batch
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stop = threading.Event()
        self.batch_sizes: list[int] = []  # sizes of the batches run (tests, benchmarks)

    def submit(self, request: GenerationRequest) -> Future:
        self._ensure_thread()
        self._queue.put(request)
        return request.future

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the batcher's thread, between batches; its result or exception in the future.

        All model work of a runtime belongs on that one thread: PyTorch's CPU kernels run on an OpenMP team
        per calling thread, and a second thread doing heavy model work leaves the machine with more OpenMP
        threads than cores, which throttles every team's hand-offs (measured: batched decoding 1.7x slower)."""
        self._ensure_thread()
        item = _Call(fn)
        self._queue.put(item)  # type: ignore[arg-type]
        return item.future

    def stop(self) -> None:
        self._stop.set()

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name="foundry-review-batcher", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if batch:
                self.run_batch(batch)

    def _next(self, timeout: float) -> GenerationRequest | None:
        if self._held:
            return self._held.popleft()
        try:
            return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _collect(self) -> list[GenerationRequest]:
        first = self._next(0.5)
        if first is None:
            return []
        if isinstance(first, _Call):
            _run_call(first)
            return []
        batch, adapters, left = [first], {_adapter_id(first)}, []
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            req = self._next(deadline - time.monotonic())
            if req is None:
                break
            if isinstance(req, _Call):  # after this batch
                left.append(req)
                continue
            aid = _adapter_id(req)
            if aid is not None and aid not in adapters and len(adapters - {None}) >= self.runtime.max_adapters:
                left.append(req)  # would need one adapter too many: next batch
                continue
            adapters.add(aid)
            batch.append(req)
        self._held.extendleft(reversed(left))
        return batch

    def run_batch(self, batch: list[GenerationRequest]) -> None:
        """Run these requests as one batch and settle their futures (never raises)."""
        try:
            ready = self._load_adapters(batch)
            if ready:
                self._generate(ready)
        except BaseException as exc:  # noqa: BLE001 - the batcher thread must survive anything
            log.exception("review batch failed")
            for req in batch:
                _settle(req.future, exc=exc)

    def _load_adapters(self, batch: list[GenerationRequest]) -> list[tuple[GenerationRequest, str | None]]:
        pinned = {r.adapter.version_id for r in batch if r.adapter is not None}
        ready, failed = [], {}
        for req in batch:
            if req.future.cancelled():  # its job gave up waiting (time limit)
                continue
            if req.adapter is None:
                ready.append((req, None))
                continue
            vid = req.adapter.version_id
            if vid in failed:
                _settle(req.future, exc=failed[vid])
                continue
            try:
                ready.append((req, self.runtime.ensure_adapter(req.adapter, pinned)))
            except Exception as exc:  # noqa: BLE001 - one bad adapter fails only its own requests
                log.warning("adapter %s could not be loaded: %s", vid, exc)
                failed[vid] = exc
                _settle(req.future, exc=exc)
        return ready

    def _generate(self, rows: list[tuple[GenerationRequest, str | None]]) -> None:
        rt = self.runtime
        t0 = time.perf_counter()
        try:
            outputs = rt.generate([r.input_ids for r, _ in rows], [s for _, s in rows],
                                  [r.max_new_tokens for r, _ in rows], [r.prefix_len for r, _ in rows],
                                  [r.control for r, _ in rows])
            if rt.device.type == "cuda":
                torch.cuda.synchronize(rt.device)
        except Exception as exc:  # noqa: BLE001
            if not is_out_of_memory(exc):
                raise
            if rt.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(rows) == 1:
                _settle(rows[0][0].future, exc=TransientError(f"out of memory generating a review: {exc}", code=oom_code(exc)))
                return
            half = len(rows) // 2
            self._generate(rows[:half])
            self._generate(rows[half:])
            return
        seconds = time.perf_counter() - t0
        self.batch_sizes.append(len(rows))
        tokens = [len(r.input_ids) + len(out) for (r, _), out in zip(rows, outputs)]
        total = sum(tokens) or 1
        n_adapters = len({s for _, s in rows})
        now = time.monotonic()
        for (req, _), out, tok in zip(rows, outputs, tokens):
            gen = Generation(token_ids=out, text=rt.decode(out), prompt_tokens=len(req.input_ids),
                             completion_tokens=len(out), batch_size=len(rows), batch_adapters=n_adapters,
                             generate_seconds=seconds,
                             gpu_seconds=seconds * tok / total if rt.device.type == "cuda" else 0.0,
                             queue_seconds=max(0.0, now - req.submitted_at - seconds))
            _settle(req.future, result=gen)


def _run_call(call: _Call) -> None:
    if not call.future.set_running_or_notify_cancel():
        return
    try:
        result = call.fn()
    except BaseException as exc:  # noqa: BLE001 - handed to the caller
        _settle(call.future, exc=exc)
    else:
        _settle(call.future, result=result)


def _settle(future: Future, result=None, exc: BaseException | None = None) -> None:
    """Set a future's outcome unless it is already settled or cancelled (its job stopped waiting)."""
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _adapter_id(req: GenerationRequest) -> str | None:
    return req.adapter.version_id if req.adapter is not None else None
