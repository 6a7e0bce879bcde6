"""The generation queue: one worker thread owns the model and answers every request.

Requests wait in a bounded FIFO (full: 429 with Retry-After). The worker admits them in
order while fewer than ``max_batch`` are running. Running requests form continuous
batches (``mlx_lm.generate.BatchGenerator``: rows join and leave between decode steps):
one batch for the base and every plain-LoRA adapter together, whose layers pick each
row's adapter (``mixing``: a per-row adapter index, one forward pass for all), and one
batch per adapter that cannot be mixed (DoRA). Each turn of the loop advances every
batch by one step, so no request waits for another to finish.

Sampling is mlx-lm's (``make_sampler``'s filters, ``make_logits_processors``); only the
final categorical draw takes a per-request key when the request has a ``seed``, so
the same seed and request give the same text whatever else is running.

Text goes out through ``TextStream``: the streaming detokenizer plus stop strings; text
that could be the start of a stop string is held back until it is known not to be,
so a stop string is never sent. End-of-sequence tokens end the answer without text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from mlx_tune.server.errors import ApiError
from mlx_tune.server.mixing import RowRoute, RowRouter, install_row_shim
from mlx_tune.server.prefix_cache import PrefixCache, prefill
from mlx_tune.server.sampling import make_request_processors, make_request_sampler, top_alternatives, vocab_size

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# What the routes hand over and get back
# ---------------------------------------------------------------------------


@dataclass
class GenRequest:
    prompt: list[int]
    adapter: str | None
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: chosen token plus the top k
    logit_bias: dict[int, float] | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    grammar: str | None = None  # llguidance grammar the answer must follow (structured output, tool calls)
    tools: Any = None  # the request's tools (the engine ignores them; responses parse calls)
    tool_syntax: Any = None
    n: int = 1  # answers to the same prompt: rows sharing one prefill (through the prefix cache)


@dataclass
class TokenInfo:
    """One generated token's log-probability and the top alternatives (when asked for)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    text: str
    logprobs: list[TokenInfo] = field(default_factory=list)
    index: int = 0  # which of the request's n answers


@dataclass
class Done:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    index: int = 0


@dataclass
class Failed:
    error: ApiError


Event = Delta | Done | Failed


class Job:
    """One request in the engine; ``emit`` receives its events from the worker thread."""

    def __init__(self, request: GenRequest, emit: Callable[[Event], None], *, parent: Job | None = None,
                 index: int = 0):
        self.request = request
        self.emit = emit
        self.parent = parent
        self.index = index
        self.warm = False  # the first row of n: computes the shared prompt prefix for the others
        self._cancelled = False
        self.finished = False
        self.uid: int | None = None
        self.text: TextStream | None = None
        self.completion_tokens = 0
        self.submitted = time.perf_counter()

    @property
    def cancelled(self) -> bool:
        return self._cancelled or (self.parent is not None and self.parent.cancelled)

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        self._cancelled = value

    def send(self, event: Event) -> None:
        if isinstance(event, (Delta, Done)):
            event.index = self.index
        try:
            self.emit(event)
        except Exception:  # the caller's loop is gone (client disconnected): nobody to tell
            log.debug("could not deliver an event", exc_info=True)

    def cancel(self) -> None:
        """The client went away: the worker drops the request at its next step."""
        self.cancelled = True


# ---------------------------------------------------------------------------
# Text: detokenizing and stop strings
# ---------------------------------------------------------------------------


class TextStream:
    """Detokenizes one answer, cutting it before the first stop string."""

    def __init__(self, tokenizer, stops: list[str]):
        self.detokenizer = tokenizer.detokenizer
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0  # characters of ``text`` already handed out

    def add(self, token: int) -> tuple[str, bool]:
        """(text now safe to send, whether a stop string was reached)."""
        self.detokenizer.add_token(token)
        self.text += self.detokenizer.last_segment
        return self._release(final=False)

    def finish(self) -> tuple[str, bool]:
        self.detokenizer.finalize()
        self.text += self.detokenizer.last_segment
        return self._release(final=True)

    def _release(self, final: bool) -> tuple[str, bool]:
        # Text before ``sent`` never holds the start of a stop string (it was held back
        # while it could), so searching from ``sent`` finds the first one.
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.text, self.sent = self.text[self.sent:cut], self.text[:cut], cut
            return out, True
        hold = 0 if final else self._pending_prefix()
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent:end], end
        return out, False

    def _pending_prefix(self) -> int:
        """Length of the longest end of ``text`` that begins some stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text) - self.sent), best, -1):
                if self.text.endswith(s[:k]):
                    best = k
                    break
        return best


# ---------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------


MIXED = ("mixed",)  # the group key of the batch whose rows each pick their adapter


@dataclass
class _Group:
    """Running requests on one adapter, or on any mixable adapters: one continuous batch."""

    adapter: str | None
    mixed: bool = False
    generator: object = None
    jobs: dict[int, Job] = field(default_factory=dict)


class Engine:
    """Owns the model on one worker thread; ``submit`` is safe from any thread."""

    def __init__(self, registry, *, max_queue: int = 64, max_batch: int = 16, prefill_step_size: int = 512,
                 retry_after_s: int = 1, mix_adapters: bool = True, prefix_cache_bytes: int = 512 * 2**20):
        self.registry = registry
        self.tokenizer = registry.tokenizer
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.prefill_step_size = prefill_step_size
        self.retry_after_s = retry_after_s
        self.eos_ids = set(self.tokenizer.eos_token_ids or ())
        self.vocab_size = vocab_size(registry.model, self.tokenizer)
        self._pending: deque[Job] = deque()
        self._calls: deque[tuple[Callable, tuple, Future]] = deque()
        self._groups: dict[str | None, _Group] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.completed = 0
        # One forward pass for rows on different LoRA adapters when mlx-lm allows it;
        # otherwise one batch per adapter, taking turns step by step.
        self.mixing = mix_adapters and install_row_shim()
        self.route = RowRoute()
        self.prefix = PrefixCache(prefix_cache_bytes)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mlx_tune-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # -- from the routes --------------------------------------------------------------
    def submit(self, request: GenRequest, emit: Callable[[Event], None]) -> Job:
        """Queue a request; ApiError 429 (with Retry-After) when the queue is full."""
        job = Job(request, emit)
        rows = [job]
        if request.n > 1:
            from dataclasses import replace

            rows = [Job(replace(request, n=1, seed=None if request.seed is None else request.seed + i), emit,
                        parent=job, index=i) for i in range(request.n)]
            rows[0].warm = True
        with self._cv:
            if self._stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            if len(self._pending) + len(rows) > self.max_queue:
                raise ApiError(429, f"the server is busy: {len(self._pending)} requests are waiting (max_queue); "
                               f"retry after {self.retry_after_s} s", code="queue_full",
                               headers={"Retry-After": str(self.retry_after_s)})
            self._pending.extend(rows)
            self._cv.notify_all()
        return job

    def stats(self) -> dict:
        with self._cv:
            return {"queued": len(self._pending), "running": sum(len(g.jobs) for g in self._groups.values())}

    def call(self, fn: Callable, *args, timeout: float | None = None):
        """Run ``fn(*args)`` on the worker thread between steps and return its result.

        MLX arrays are tied to the thread (stream) that created them, so anything that
        loads or changes model arrays (adapter loads) must happen where the model runs.
        """
        if self._thread is None or not self._thread.is_alive():
            return fn(*args)
        future: Future = Future()
        with self._cv:
            self._calls.append((fn, args, future))
            self._cv.notify_all()
        return future.result(timeout)

    def run_pending(self) -> None:
        """Answer every queued request on the calling thread, then return (no worker thread).

        In-process evaluation (``evaluation.live``) uses the same decoder and batching as the
        server this way, on the thread that owns the model's arrays.
        """
        if self._thread is not None:
            raise RuntimeError("run_pending: the engine's worker thread is running")
        self._stream = mx.default_stream(mx.default_device())
        while self._pending or self._groups:
            self._admit()
            self._step_all()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify_all()

    # -- the worker -------------------------------------------------------------------
    def _running(self) -> int:
        return sum(len(g.jobs) for g in self._groups.values())

    def _run(self) -> None:
        # MLX streams belong to the thread that made them: compute on this thread's own.
        self._stream = mx.default_stream(mx.default_device())
        while True:
            with self._cv:
                while not self._stopping and not self._pending and not self._groups and not self._calls:
                    self._cv.wait()
                if self._stopping:
                    break
                calls, self._calls = list(self._calls), deque()
            for fn, args, future in calls:
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:  # handed to the caller, who raises it
                    future.set_exception(exc)
            try:
                self._admit()
                self._step_all()
            except Exception as exc:  # a bug, not a client's mistake: fail what runs, keep serving
                log.exception("engine step failed")
                self._fail_all(ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", code="engine_error"))
        self._fail_all(ApiError(503, "the server is shutting down", code="shutting_down"))
        with self._cv:
            calls, self._calls = list(self._calls), deque()
        for _, _, future in calls:
            future.set_exception(ApiError(503, "the server is shutting down", code="shutting_down"))

    def _admit(self) -> None:
        while self._running() < self.max_batch:
            with self._cv:
                if not self._pending:
                    return
                job = self._pending.popleft()
            if job.cancelled:
                continue
            req = job.request
            try:
                self.registry.acquire(req.adapter)
            except ApiError as exc:
                if exc.status == 429 and self._running():
                    with self._cv:  # every resident adapter is busy: wait for one to finish
                        self._pending.appendleft(job)
                    return
                self._finish(job, Failed(exc))
                continue
            except Exception as exc:  # e.g. the adapter's files vanished since it was evicted
                log.exception("could not load adapter %r", req.adapter)
                self._finish(job, Failed(ApiError(500, f"could not load adapter '{req.adapter}': {exc}",
                                                  code="adapter_load_failed")))
                continue
            mixed = self.mixing and self.registry.mixable(req.adapter)
            key = MIXED if mixed else req.adapter
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(req.adapter, mixed)
                group.generator = self._new_generator(group)
            if job.warm and len(req.prompt) > 1:
                self._share_prefix(req)
            cache, cached = self.prefix.lookup(self._cache_key(req.adapter), req.prompt)
            reuse = {"caches": [cache], "all_tokens": [req.prompt[:cached]]} if cache is not None else {}
            try:
                (uid,) = group.generator.insert(
                    [req.prompt[cached:]], max_tokens=[req.max_tokens], samplers=[make_request_sampler(req)],
                    logits_processors=[make_request_processors(req, self.tokenizer, self.vocab_size)], **reuse,
                )
            except Exception:
                self.registry.release(req.adapter)
                raise
            job.uid = uid
            job.text = TextStream(self.tokenizer, req.stop)
            group.jobs[uid] = job

    def _new_generator(self, group: _Group):
        from mlx_lm.generate import BatchGenerator

        model = self.registry.model
        if group.mixed:
            model = RowRouter(model, self.route, lambda uid: group.jobs[uid].request.adapter)
        return BatchGenerator(
            model,
            stop_tokens=[[t] for t in sorted(self.eos_ids)],
            completion_batch_size=self.max_batch,
            prefill_batch_size=min(8, self.max_batch),
            prefill_step_size=self.prefill_step_size,
            stream=self._stream,
        )

    def _step_all(self) -> None:
        for key, group in list(self._groups.items()):
            dropped = [uid for uid, job in group.jobs.items() if job.cancelled]
            if dropped:
                group.generator.remove(dropped)
                for uid in dropped:
                    self._close(group, uid)
            if group.jobs:
                with self.registry.lock:
                    # The graph is built inside next() with this adapter's layers; what is
                    # evaluated later is arrays only, so the next group may switch freely.
                    if group.mixed:
                        self.registry.activate_rows(self.route)
                    else:
                        self.registry.activate(group.adapter)
                    _, responses = group.generator.next()
                for r in responses:
                    job = group.jobs.get(r.uid)
                    if job is not None:
                        self._on_token(group, job, r)
            if not group.jobs:
                group.generator.close()
                del self._groups[key]

    def _share_prefix(self, req: GenRequest) -> None:
        """Compute the prompt (all but its last token) once, into the prefix cache the n rows read."""
        key = self._cache_key(req.adapter)
        if self.prefix.peek(key, req.prompt) == len(req.prompt) - 1:
            return
        with self.registry.lock:
            self.registry.activate(req.adapter)
            cache = prefill(self.registry.model, req.prompt[:-1], self.prefill_step_size)
        self.prefix.store(key, req.prompt[:-1], cache)

    def forget_prefixes(self, adapter: str | None) -> None:
        """Drop the prefix cache's entries for ``adapter`` (None: the base): its weights changed
        in place (an adapter, or a full fine-tune, being trained in this process)."""
        self.prefix.drop_adapter(self._cache_key(adapter))

    def _cache_key(self, adapter: str | None) -> tuple:
        # A reloaded adapter of the same name is another adapter: its creation time tells them apart.
        entry = self.registry.entries.get(adapter) if adapter is not None else None
        return (adapter, id(entry) if entry is not None else None)

    def _on_token(self, group: _Group, job: Job, r) -> None:
        job.completion_tokens += 1
        req = job.request
        if r.finish_reason is not None and getattr(r, "prompt_cache", None) is not None and r.all_tokens:
            self.prefix.store(self._cache_key(req.adapter), list(r.all_tokens), r.prompt_cache)
        if r.finish_reason == "stop" and r.token in self.eos_ids:
            text, _ = job.text.finish()
            return self._end(group, job, text, [], "stop", removed=True)
        infos = [self._token_info(r.token, r.logprobs, req.logprobs)] if req.logprobs is not None else []
        text, hit_stop = job.text.add(r.token)
        if hit_stop:
            return self._end(group, job, text, infos, "stop", removed=r.finish_reason is not None)
        if r.finish_reason is not None:  # length (or a token-level stop that is not eos)
            tail, hit_stop = job.text.finish()
            return self._end(group, job, text + tail, infos, "stop" if hit_stop else r.finish_reason, removed=True)
        if text or infos:
            job.send(Delta(text, infos))

    def _end(self, group: _Group, job: Job, text: str, infos: list, reason: str, removed: bool) -> None:
        if not removed:
            group.generator.remove([job.uid])
        if text or infos:
            job.send(Delta(text, infos))
        self._close(group, job.uid)
        self._finish(job, Done(reason, len(job.request.prompt), job.completion_tokens))

    def _close(self, group: _Group, uid: int) -> None:
        job = group.jobs.pop(uid)
        self.registry.release(job.request.adapter)
        if job.cancelled and not job.finished:
            job.finished = True

    def _finish(self, job: Job, event: Event) -> None:
        if job.finished:
            return
        job.finished = True
        self.completed += 1
        job.send(event)

    def _token_info(self, token: int, logprobs: mx.array, top: int) -> TokenInfo:
        lp = logprobs.astype(mx.float32)
        decode = self.tokenizer.decode
        return TokenInfo(decode([token]), float(lp[token].item()), top_alternatives(lp, top, decode))

    def _fail_all(self, error: ApiError) -> None:
        for key, group in list(self._groups.items()):
            for uid, job in list(group.jobs.items()):
                self._close(group, uid)
                self._finish(job, Failed(error))
            try:
                group.generator.close()
            except Exception:
                pass
            del self._groups[key]
        with self._cv:
            pending, self._pending = list(self._pending), deque()
        for job in pending:
            self._finish(job, Failed(error))
