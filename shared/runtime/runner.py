"""The model runner: one decoder step for a set of sequences (vLLM's model runner, scaled down).

A `Sequence` is one request's decoding state: its prompt ids, how many of them have KV
(`computed`, vLLM's `num_computed_tokens`), the tokens sampled so far, stop strings, the
text a stream may already send. `ModelRunner.step(chunks)` runs one iteration: the given
running sequence decodes one token, then the given prompt chunks are prefilled (new
sequences batched together; one that hit the prefix cache prefills only its suffix, in the
same forward as the others) and every sequence whose prompt is complete samples its first
token and joins the running batch. Finished sequences leave the batch at once; the scheduler
(shared/runtime/scheduler.py) decides between steps which chunks run.

The running batch keeps one KV cache for all its rows, as TGI's Prefill/Decode/FilterBatch
do: rows are right-aligned and left-padded (`mask` marks real positions), joining rows are
concatenated on, leaving rows are filtered out, and a row's sliding window is applied by
masking its oldest positions, so rows with different windows share one batch. A backend
that takes one row at a time (`supports_batch_prefill` False: LiteRT) keeps each sequence's
KV apart and runs the same step row by row.

A forward that raises is run again row by row, so a row that breaks the backend fails
alone (`Sequence.error`) and the others go on.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Iterator
from typing import Sequence as Seq

import numpy as np

from tierline_shared.runtime.engine import (
    GenerationParams,
    GenerationResult,
    _find_stop,
    _pick,
    _stream_safe_len,
)

if TYPE_CHECKING:
    from tierline_shared.runtime.engine import Engine, Past

TRIM_DEAD_COLUMNS = 32  # leading KV columns no row uses any more, beyond which they are dropped between steps


class Sequence:
    """One request's decoding state, from its prompt ids to its GenerationResult."""

    def __init__(self, ids: list[int], params: GenerationParams, window: int, eos_id: int, decode):
        self.ids, self.params, self.window = ids, params, window
        self._eos, self._decode = eos_id, decode
        self.rng = np.random.default_rng(params.seed)
        self.computed = 0  # prompt tokens whose KV exists: the position of the next prompt token
        self.kv: Past | None = None  # its own KV (a batch of one) while it prefills, or always (row-by-row backends)
        self.kv_len = 0  # positions held in its KV (fewer than it has seen once its window evicts)
        self.token: int | None = None  # the last sampled token, fed at the next decode step
        self.gen: list[int] = []
        self.probs: list[float] = []
        self.text = ""
        self.emitted = 0  # characters of text already handed out by take_text
        self.done = False
        self.reason = "length"
        self.error: Exception | None = None  # the backend raised on this row alone
        self.t0 = time.perf_counter()
        self.first_token_s = 0.0
        self.last_token_at = 0.0  # perf_counter of the last sample (inter-token latency)

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.ids)

    @property
    def position(self) -> int:
        """The position of `token`, the next one fed."""
        return len(self.ids) + len(self.gen) - 1

    def accept(self, logits: np.ndarray) -> None:
        """Sample the next token from its logits (V,) and apply eos, stop strings and max_tokens."""
        t, p = _pick(logits, self.params, self.rng)
        now = time.perf_counter()
        if not self.last_token_at:
            self.first_token_s = now - self.t0
        self.last_token_at = now
        if t == self._eos:
            self.finish("stop")
            return
        self.gen.append(t)
        self.probs.append(p)
        self.token = t
        self.text = self._decode(self.gen)
        cut = _find_stop(self.text, self.params.stop)
        if cut is not None:
            self.text = self.text[:cut]
            self.finish("stop")
        elif len(self.gen) >= self.params.max_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if not self.done:
            self.done, self.reason, self.kv = True, reason, None

    def fail(self, exc: Exception) -> None:
        self.finish("error")
        self.error = exc

    def take_text(self) -> str:
        """Text not yet handed out that no stop string can still take back ('' when none)."""
        safe = _stream_safe_len(self.text, self.params.stop, self.done)
        if safe <= self.emitted:
            return ""
        chunk, self.emitted = self.text[self.emitted:safe], safe
        return chunk

    def result(self, total_s: float | None = None) -> GenerationResult:
        lp = [math.log(max(p, 1e-12)) for p in self.probs]
        return GenerationResult(
            text=self.text, finish_reason=self.reason, prompt_tokens=len(self.ids), completion_tokens=len(self.gen),
            confidence=min(self.probs) if self.probs else 0.0, mean_logprob=sum(lp) / len(lp) if lp else 0.0,
            first_token_s=self.first_token_s,
            total_s=time.perf_counter() - self.t0 if total_s is None else total_s,
            token_ids=list(self.gen),
        )


class ModelRunner:
    """The running batch of one engine and the step that advances it. Not thread-safe: the caller holds
    the engine's lock around `step`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.batched = engine.supports_batch_prefill
        # rows of different prefill lengths leave holes between past and new tokens; a model whose own
        # sliding window counts columns, not positions, must not see them: its warm rows prefill alone
        self._holes_ok = engine.info.window_limit >= engine.info.max_context
        self.running: list[Sequence] = []  # decoding, in the order of the batch KV's rows
        self._past: Past | None = None  # (B, kv_heads, W, head_dim) per layer, rows right-aligned
        self._mask = np.zeros((0, 0), np.int64)  # (B, W): 1 where a row has a real position

    def sequence(self, prompt: str, params: GenerationParams) -> Sequence:
        eng = self.engine
        return Sequence(eng.tokenizer.encode(prompt), params, params.attention_window or eng.info.window_limit,
                        eng.tokenizer.eos_id, eng.tokenizer.decode)

    # -- what the scheduler asks -----------------------------------------------------------------------
    def begin(self, seq: Sequence) -> None:
        """Look a new sequence's prompt up in the prefix cache: a hit starts it from the stored KV."""
        cache = self.engine.prefix_cache if self.engine.supports_prefix_cache else None
        if cache is None or not self.batched or len(seq.ids) > seq.window:
            return  # a prompt wider than its window is not plain causal attention: its KV is not reusable
        h, stored = cache.lookup(seq.ids)
        if stored is not None:
            seq.kv, seq.kv_len, seq.computed = self.engine._past_take(stored, 0, slice(0, h)), h, h

    @staticmethod
    def chunk_limit(seq: Sequence) -> int:
        """Prompt tokens `seq` may prefill in one step: all of them while they fit its window, then one
        at a time (each new token's window evicts the oldest position)."""
        rest, w = len(seq.ids) - seq.computed, seq.window
        if seq.computed + rest <= w:
            return rest
        return w - seq.computed if seq.computed < w else 1

    def run(self, seqs: list[Sequence], cancelled: Seq[Callable[[], bool]] | None = None) -> Iterator[None]:
        """Step until every sequence is done, all admitted at once with no token budget (`generate_batch`);
        yields after each step. `cancelled[i]()` True before a step stops sequence i."""
        while not all(s.done for s in seqs):
            if cancelled:
                for s, stop in zip(seqs, cancelled):
                    if not s.done and stop():
                        s.finish("cancelled")
            self.step([(s, self.chunk_limit(s)) for s in seqs if not s.done and not s.prefilled])
            yield

    def step(self, chunks: Seq[tuple[Sequence, int]]) -> None:
        """Decode one token for every running sequence, then prefill `chunks` ((sequence, tokens)): a
        sequence whose prompt completes samples its first token and decodes from the next step on."""
        self.release()
        if self.running:
            self._decode() if self.batched else self._decode_alone()
            self.release()
        if not chunks:
            return
        if not self.batched:
            for c in chunks:
                self._prefill_alone(*c)
            return
        warm = [c for c in chunks if c[0].kv is not None]  # sorted first: a fresh row's first chunk gives it a kv
        self._prefill([c for c in chunks if c[0].kv is None], warm=False)
        if self._holes_ok:
            self._prefill(warm, warm=True)
        else:
            for c in warm:
                self._prefill([c], warm=True)

    def release(self) -> None:
        """Finished or cancelled rows leave the batch; columns no row needs any more are dropped."""
        if not any(s.done for s in self.running):
            return
        keep = [b for b, s in enumerate(self.running) if not s.done]
        self.running = [self.running[b] for b in keep]
        if not self.batched:
            return
        if not keep:
            self._past, self._mask = None, np.zeros((0, 0), np.int64)
            return
        mask = self._mask[keep]
        lead = _dead_columns(mask)
        self._past, self._mask = self.engine._past_rows(self._past, np.array(keep), lead), mask[:, lead:]

    # -- batched backends ----------------------------------------------------------------------------
    def _prefill(self, chunks: list[tuple[Sequence, int]], warm: bool) -> None:
        """One forward for these chunks; rows that raise are run again alone, and fail alone."""
        if not chunks:
            return
        try:
            self._prefill_forward(chunks, warm)
        except Exception as exc:  # noqa: BLE001 - one bad row must not fail the others
            if len(chunks) == 1:
                chunks[0][0].fail(exc)
                return
            for c in chunks:
                self._prefill([c], warm)

    def _prefill_forward(self, chunks: list[tuple[Sequence, int]], warm: bool) -> None:
        eng, B = self.engine, len(chunks)
        for s, n in chunks:  # a token past the window: evict the oldest positions first
            if warm and s.kv_len > s.window - 1:
                s.kv, s.kv_len = eng._trim_past(s.kv, s.window - 1), s.window - 1
        P = max(s.kv_len for s, _ in chunks) if warm else 0
        T = max(n for _, n in chunks)
        input_ids = np.full((B, T), eng.tokenizer.pad_id, np.int64)
        mask = np.zeros((B, P + T), np.int64)
        positions = np.zeros((B, T), np.int64)
        for j, (s, n) in enumerate(chunks):
            input_ids[j, T - n:] = s.ids[s.computed:s.computed + n]
            mask[j, P - s.kv_len:P] = 1
            mask[j, P + T - n:] = 1
            positions[j, T - n:] = np.arange(s.computed, s.computed + n)
        past = eng._past_join([s.kv for s, _ in chunks], P) if warm else None
        logits, present = eng._forward(input_ids, mask, positions, past)
        cache = eng.prefix_cache if eng.supports_prefix_cache else None
        joining, parts = [], []
        for j, (s, n) in enumerate(chunks):
            cols = np.r_[P - s.kv_len:P, P + T - n:P + T] if warm else slice(T - n, T)
            s.computed += n
            s.kv_len += n
            if not s.prefilled:
                s.kv = eng._past_take(present, j, cols)
                continue
            if cache is not None and s.kv_len == len(s.ids):  # never evicted: plain causal KV, reusable
                kv = eng._past_take(present, j, cols)
                cache.store(s.ids, kv)
            else:
                kv = None
            s.kv = None
            s.accept(logits[j, -1])
            if s.done:
                continue
            if warm or kv is not None:  # warm rows hold holes: join their compacted KV
                parts.append((kv if kv is not None else eng._past_take(present, j, cols), s.kv_len))
            else:
                parts.append((eng._past_rows(present, np.array([j]), T - n), n))
            joining.append(s)
        if joining:
            self._join(joining, parts)

    def _join(self, seqs: list[Sequence], parts: list[tuple[Past, int]]) -> None:
        """Concatenate rows (each a batch-of-one KV holding `length` real positions) onto the running batch."""
        width = max([self._mask.shape[1]] + [n for _, n in parts])
        pasts = ([self._past] if self.running else []) + [kv for kv, _ in parts]
        mask = np.zeros((len(self.running) + len(parts), width), np.int64)
        mask[:len(self.running), width - self._mask.shape[1]:] = self._mask
        for i, (_, n) in enumerate(parts):
            mask[len(self.running) + i, width - n:] = 1
        self._past = self.engine._past_join(pasts, width)
        self._mask = mask
        self.running.extend(seqs)

    def _decode(self) -> None:
        rows = self.running
        B, W = self._mask.shape
        for b, s in enumerate(rows):  # each row's own sliding window: mask its oldest positions
            if s.kv_len >= s.window:
                self._mask[b, :W - (s.window - 1)] = 0
                s.kv_len = s.window - 1
        lead = _dead_columns(self._mask)
        if lead >= TRIM_DEAD_COLUMNS:
            self._past, self._mask = self.engine._past_rows(self._past, np.arange(B), lead), self._mask[:, lead:]
        tokens = np.array([[s.token] for s in rows], np.int64)
        positions = np.array([[s.position] for s in rows], np.int64)
        mask = np.concatenate([self._mask, np.ones((B, 1), np.int64)], axis=1)
        try:
            logits, past = self.engine._forward(tokens, mask, positions, self._past)
        except Exception:  # noqa: BLE001 - find the row at fault: every row again, alone
            self._split()
            self._decode_alone()
            self._rejoin()
            return
        self._past, self._mask = past, mask
        for b, s in enumerate(rows):
            s.kv_len += 1
            s.accept(logits[b, -1])

    def _split(self) -> None:
        """Each running row's KV apart (for the row-by-row step)."""
        W = self._mask.shape[1]
        for b, s in enumerate(self.running):
            s.kv = self.engine._past_rows(self._past, np.array([b]), W - s.kv_len)
        self._past, self._mask = None, np.zeros((0, 0), np.int64)

    def _rejoin(self) -> None:
        rows = [s for s in self.running if not s.done]
        self.running = []
        if rows:
            self._join(rows, [(s.kv, s.kv_len) for s in rows])
            for s in rows:
                s.kv = None

    # -- row-by-row backends ---------------------------------------------------------------------------
    def _prefill_alone(self, s: Sequence, n: int) -> None:
        eng = self.engine
        try:
            if s.kv is not None and s.kv_len > s.window - 1:
                s.kv, s.kv_len = eng._trim_past(s.kv, s.window - 1), s.window - 1
            logits, s.kv = eng._forward(np.array([s.ids[s.computed:s.computed + n]], np.int64),
                                        np.ones((1, s.kv_len + n), np.int64),
                                        np.arange(s.computed, s.computed + n, dtype=np.int64)[None], s.kv)
        except Exception as exc:  # noqa: BLE001 - fails this row alone
            s.fail(exc)
            return
        s.computed += n
        s.kv_len += n
        if s.prefilled:
            s.accept(logits[0, -1])
            if not s.done:
                self.running.append(s)

    def _decode_alone(self) -> None:
        eng = self.engine
        for s in self.running:
            if s.done:
                continue
            try:
                if s.kv_len >= s.window:
                    s.kv, s.kv_len = eng._trim_past(s.kv, s.window - 1), s.window - 1
                logits, s.kv = eng._forward(np.array([[s.token]], np.int64), np.ones((1, s.kv_len + 1), np.int64),
                                            np.array([[s.position]], np.int64), s.kv)
            except Exception as exc:  # noqa: BLE001 - fails this row alone
                s.fail(exc)
                continue
            s.kv_len += 1
            s.accept(logits[0, -1])


def _dead_columns(mask: np.ndarray) -> int:
    """Leading columns that no row uses."""
    used = mask.any(axis=0)
    return int(np.argmax(used)) if used.any() else mask.shape[1]
