"""The model runner: one decoder step for a set of sequences (vLLM's model runner, scaled down).

A `Sequence` is one request's decoding state: its prompt ids, how many of them have KV
(`computed`, vLLM's `num_computed_tokens`), the tokens sampled so far, stop strings, the
text a stream may already send. `ModelRunner.step(chunks)` runs one iteration: the given
prompt chunks are prefilled (new sequences batched together; one that hit the
prefix cache prefills only its suffix, in the same forward as the others), every sequence
whose prompt is complete samples its first token and joins the running batch, and every
running sequence decodes one token. The scheduler (shared/runtime/scheduler.py) decides
between steps which chunks run.

The running batch keeps one KV cache for all its rows, as TGI's Prefill/Decode/FilterBatch
do: rows are right-aligned and left-padded (`mask` marks real positions), joining rows are
written into the slot of a finished row (only their own positions are copied) or, when none is
free, concatenated on with the finished rows filtered out in the same copy (a finished row
stays, masked, until then, or until half the batch has finished), and a row's sliding window is applied by
masking its oldest positions, so rows with different windows share one batch. A backend
that takes one row at a time (`supports_batch_prefill` False: LiteRT) keeps each sequence's
KV apart and runs the same step row by row.

A forward that raises is run again row by row, so a row that breaks the backend fails
alone (`Sequence.error`) and the others go on.

A greedy sequence may come with a draft of its answer (`GenerationParams.draft`: the answer a
lower tier gave before the router escalated; speculative decoding, Leviathan et al. 2023, with a
draft that cost nothing here): its last prompt chunk is prefilled with the draft after it, in
one forward with the step's other verifying rows (apart from the rest, which are not padded to
prompt + draft), which returns the logits of the draft's positions too; the
draft's longest prefix the model's own argmax agrees with is taken, then the model's token where
they part (or the one after a draft taken whole), and the rejected positions' KV is left out when
the row joins the batch. Its tokens are the ones it would decode without a draft, in fewer steps
(docs/design/DRAFT_ESCALATION.md). Backends without `supports_draft` ignore drafts.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Collection, Iterator
from typing import Sequence as Seq

import numpy as np

from tierline_shared.runtime.engine import (
    GenerationParams,
    GenerationResult,
    TokenLogprob,
    _find_stop,
    _pick,
    _stream_safe_len,
    prompt_ids,
    top_logprobs,
)

if TYPE_CHECKING:
    from tierline_shared.runtime.engine import Engine, Past

TRIM_DEAD_COLUMNS = 32  # leading KV columns no row uses any more, beyond which they are dropped between steps
# after a draft's first disagreement, the rest of it is proposed again where the sequence's last LOOKUP_TOKENS
# tokens appear in it (prompt lookup decoding, on the draft), while the running batch has at most this many live
# rows: a step of a few rows is bound by reading the weights, so verifying a few tokens costs about one decode
# (vLLM turns speculation off above a batch size too: speculative_disable_by_batch_size)
SPECULATE_MAX_BATCH = 2
LOOKUP_TOKENS = 2
PROPOSAL_MAX_TOKENS = 16  # proposed at most (a forward of 16 tokens costs about 1.8 of one; of 64, 3.5)


class Sequence:
    """One request's decoding state, from its prompt ids to its GenerationResult."""

    def __init__(self, ids: list[int], params: GenerationParams, window: int, eos_ids: Collection[int], decode):
        self.ids, self.params, self.window = ids, params, window
        self._eos, self._decode = frozenset(eos_ids), decode  # any of them ends the sequence
        # a greedy pick draws nothing: only a sampled request pays for a generator (and, unseeded, OS entropy)
        self.rng = None if params.greedy else np.random.default_rng(params.seed)
        self.computed = 0  # prompt tokens whose KV exists: the position of the next prompt token
        self.cached = 0  # of those, tokens whose KV came from the prefix cache
        self.kv: Past | None = None  # its own KV (a batch of one) while it prefills, or always (row-by-row backends)
        self.kv_len = 0  # positions held in its KV (fewer than it has seen once its window evicts)
        self.token: int | None = None  # the last sampled token, fed at the next decode step
        self.gen: list[int] = []
        self.probs: list[float] = []
        self.tops: list[list[tuple[int, float]]] = []  # with params.top_logprobs: each position's likeliest tokens
        self._text = ""  # the decoding of gen[:_text_of] (cut at a stop string once one appeared)
        self._text_of = 0
        self.emitted = 0  # characters of text already handed out by take_text
        self.done = False
        self.reason = "length"
        self.error: Exception | None = None  # the backend raised on this row alone
        self.draft: list[int] = []  # tokens to verify with its last prompt chunk (a greedy row's draft)
        self.source: list[int] = []  # that draft, kept after a disagreement: where later proposals come from
        self.t0 = time.perf_counter()
        self.first_token_s = 0.0
        self.last_token_at = 0.0  # perf_counter of the last sample (inter-token latency)

    @property
    def prefilled(self) -> bool:
        return self.computed >= len(self.ids)

    @property
    def whole(self) -> bool:
        """Its KV holds every position it has seen (no window evicted any): plain causal KV, reusable."""
        return len(self.ids) + len(self.gen) <= self.window

    @property
    def draft_room(self) -> int:
        """Draft tokens it could verify now: what max_tokens leaves after the token the verification itself
        gives, and its window (the draft's KV must not evict any position)."""
        return min(self.params.max_tokens - len(self.gen) - 1, self.window - len(self.ids) - len(self.gen))

    def verifies(self, n: int) -> bool:
        """A chunk of `n` prompt tokens completes its prompt, and it has a draft to verify with it."""
        return bool(self.draft) and self.computed + n == len(self.ids)

    @property
    def position(self) -> int:
        """The position of `token`, the next one fed."""
        return len(self.ids) + len(self.gen) - 1

    @property
    def text(self) -> str:
        """The generated text, decoded when asked for (a stream, a stop string, the result) rather than at every
        token: a decode is of all the tokens (a tokenizer's text is not the sum of its tokens' texts), so a
        request no one reads until it ends decodes once instead of once per token."""
        if self._text_of != len(self.gen):
            self._text, self._text_of = self._decode(self.gen), len(self.gen)
        return self._text

    def accept(self, logits: np.ndarray) -> None:
        """Sample the next token from its logits (V,) and apply eos, stop strings and max_tokens."""
        self.push(*_pick(logits, self.params, self.rng), logits)

    def push(self, t: int, p: float, logits: np.ndarray | None = None) -> None:
        """Take token `t`, to which the model gave probability `p` (its `logits` (V,): needed when the request
        asks for top_logprobs)."""
        now = time.perf_counter()
        if not self.last_token_at:
            self.first_token_s = now - self.t0
        self.last_token_at = now
        if t in self._eos:
            self.finish("stop")
            return
        self.gen.append(t)
        self.probs.append(p)
        if self.params.top_logprobs:
            self.tops.append(top_logprobs(logits, self.params.top_logprobs))
        self.token = t
        cut = _find_stop(self.text, self.params.stop) if self.params.stop else None
        if cut is not None:
            self._text = self._text[:cut]
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
        """Text not yet handed out that no stop string or later token can still change ('' when none)."""
        safe = _stream_safe_len(self.text, self.params.stop, self.done)
        if safe <= self.emitted:
            return ""
        chunk, self.emitted = self.text[self.emitted:safe], safe
        return chunk

    def result(self) -> GenerationResult:
        lp = [math.log(max(p, 1e-12)) for p in self.probs]
        return GenerationResult(
            text=self.text, finish_reason=self.reason, prompt_tokens=len(self.ids), completion_tokens=len(self.gen),
            confidence=min(self.probs) if self.probs else 0.0, mean_logprob=sum(lp) / len(lp) if lp else 0.0,
            first_token_s=self.first_token_s,
            total_s=time.perf_counter() - self.t0,
            token_ids=list(self.gen), cached_tokens=self.cached,
            logprobs=self._logprobs() if self.params.logprobs else None,
        )

    def _logprobs(self) -> list[TokenLogprob]:
        """One entry per token of the text (tokens past a stop string's cut left out); a token's text is what
        it adds to the decoding of the tokens before it (a tokenizer's text is not the sum of its tokens')."""
        out, before = [], ""
        for i, t in enumerate(self.gen):
            if len(before) >= len(self.text):
                break
            now = self._decode(self.gen[:i + 1])
            token = now[len(before):] if now.startswith(before) else self._decode([t])
            top = [(self._decode([a]), lp) for a, lp in self.tops[i]] if self.tops else []
            out.append(TokenLogprob(token, _log(self.probs[i]), top))
            before = now
        return out


class ModelRunner:
    """The running batch of one engine and the step that advances it. Not thread-safe: the caller holds
    the engine's lock around `step`."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.batched = engine.supports_batch_prefill
        # rows of different prefill lengths leave holes between past and new tokens; a model whose own
        # sliding window counts columns, not positions, must not see them: its warm rows prefill alone
        self._holes_ok = engine.info.window_limit >= engine.info.max_context
        # the batch KV's rows, in order; a finished row stays (masked, fed padding) until the batch is next
        # rebuilt, so that a row leaving costs no copy of the whole cache
        self._rows: list[Sequence] = []
        self._past: Past | None = None  # (B, kv_heads, W, head_dim) per layer, rows right-aligned
        self._mask = np.zeros((0, 0), np.int64)  # (B, W): 1 where a row has a real position
        # prompts' KV for the prefix cache, kept after the step's first tokens went out: (ids, present, row, cols)
        self._to_store: list[tuple[list[int], Past, int, object]] = []
        self.decoded: list[Sequence] = []  # the sequences that decoded a token in the last step (its metrics)
        self.drafted = 0  # draft tokens the last step verified (vLLM: spec_decode_num_draft_tokens)
        self.accepted = 0  # of those, the ones the model's own choice agreed with (spec_decode_num_accepted_tokens)

    # -- what the scheduler asks -----------------------------------------------------------------------
    def sequence(self, prompt: str, params: GenerationParams, ids=None) -> Sequence:
        """A new sequence, started from the prefix cache's KV when its prompt hits (the caller holds the
        engine's lock: the cache is the engine's); `ids`: the prompt's tokens, when the caller has them."""
        eng = self.engine
        ids = prompt_ids(eng.tokenizer, prompt, params.add_special_tokens) if ids is None else list(ids)
        seq = Sequence(ids, params, params.attention_window or eng.info.window_limit,
                       eng.eos_ids, eng.tokenizer.decode)
        if params.draft and params.greedy and eng.supports_draft and self.batched and seq.draft_room > 0:
            seq.draft = eng.tokenizer.encode(params.draft, bos=False)[:seq.draft_room]
        cache = self._prefix_cache()
        if cache is None or not self.batched or not seq.whole:
            return seq  # a prompt wider than its window is not plain causal attention: its KV is not reusable
        h, stored = cache.lookup(seq.ids)
        if stored is not None:  # a view: the first copy is the one that feeds it to the model
            seq.kv, seq.kv_len, seq.computed, seq.cached = [(k[:, :, :h], v[:, :, :h]) for k, v in stored], h, h, h
        return seq

    def _prefix_cache(self):
        return self.engine.prefix_cache if self.engine.supports_prefix_cache else None

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

    def step(self, chunks: Seq[tuple[Sequence, int]], keep_slots: bool = False,
             prefilled: Callable[[], None] | None = None) -> None:
        """Prefill `chunks` ((sequence, tokens)): a sequence whose prompt completes samples its first token and
        joins the running batch; then decode one token for every running sequence (the new ones included).

        `keep_slots`: more sequences will come (a server's scheduler), so finished rows stay in the batch KV
        for new ones to take their place (no copy of the batch) until half the batch has finished; without
        it (a static batch) they leave at once. `prefilled()` is called between the prefill and the decode:
        first tokens go out before the batch decodes."""
        self._release(keep_slots)
        self.decoded, self.drafted, self.accepted = [], 0, 0
        if chunks and not self.batched:
            for c in chunks:
                self._prefill_alone(*c)
        elif chunks:
            warm = [c for c in chunks if c[0].kv is not None]  # sorted first: a fresh row's first chunk gives it a kv
            # rows verifying a draft in a forward of their own: the others are not padded to prompt + draft
            fresh = [c for c in chunks if c[0].kv is None]
            for group in _by_draft(fresh):
                self._prefill(group, warm=False)
            if self._holes_ok:
                for group in _by_draft(warm):
                    self._prefill(group, warm=True)
            else:
                for c in warm:
                    self._prefill([c], warm=True)
        if chunks and prefilled is not None:
            prefilled()
        self._store_prompts()
        if self.batched:
            self._speculate()
        if any(not s.done for s in self._rows):
            self._decode() if self.batched else self._decode_alone()

    def _release(self, keep_slots: bool) -> None:
        """Finished rows leave: at once for row-by-row backends and static batches; with `keep_slots`, from
        the batch KV when half of it has finished (or all), else when a new sequence takes the slot."""
        live = sum(1 for s in self._rows if not s.done)
        if not self.batched or not live:
            self._rows = [s for s in self._rows if not s.done]
            if not self._rows:
                self._past, self._mask = None, np.zeros((0, 0), np.int64)
        elif live < len(self._rows) and (not keep_slots or 2 * live <= len(self._rows)):
            self._join([], [])  # stop computing finished rows

    # -- batched backends ----------------------------------------------------------------------------
    def _prefill(self, chunks: list[tuple[Sequence, int]], warm: bool) -> None:
        """One forward for these chunks; rows that raise are run again alone, and fail alone."""
        if not chunks:
            return
        try:
            self._prefill_forward(chunks, warm)
        except _ForwardError as exc:  # one bad row must not fail the others: each again, alone
            if len(chunks) == 1:
                if chunks[0][0].verifies(chunks[0][1]):  # a draft is only a hint: without it, before the row fails
                    chunks[0][0].draft = []
                    self._prefill(chunks, warm)
                    return
                chunks[0][0].fail(exc.__cause__)
                return
            for c in chunks:
                self._prefill([c], warm)

    def _prefill_forward(self, chunks: list[tuple[Sequence, int]], warm: bool) -> None:
        eng, B = self.engine, len(chunks)
        for s, n in chunks:  # a token past the window: evict the oldest positions first
            if warm and s.kv_len > s.window - 1:
                s.kv, s.kv_len = eng._trim_past(s.kv, s.window - 1), s.window - 1
        # a row whose chunk completes its prompt verifies its draft: the draft's tokens follow the prompt's
        drafts = [s.draft if s.verifies(n) else [] for s, n in chunks]
        K = 1 + max(len(d) for d in drafts)  # positions whose logits the forward returns, the last one's for all
        P = max(s.kv_len for s, _ in chunks) if warm else 0
        T = max(n + len(d) for (_, n), d in zip(chunks, drafts))
        input_ids = np.full((B, T), eng.tokenizer.pad_id, np.int64)
        mask = np.zeros((B, P + T), np.int64)
        positions = np.zeros((B, T), np.int64)
        for j, ((s, n), d) in enumerate(zip(chunks, drafts)):
            m = n + len(d)
            input_ids[j, T - m:T - len(d)] = s.ids[s.computed:s.computed + n]
            input_ids[j, T - len(d):] = d
            mask[j, P - s.kv_len:P] = 1
            mask[j, P + T - m:] = 1
            positions[j, T - m:] = np.arange(s.computed, s.computed + m)
        past = eng._past_join([(s.kv, None, 0) for s, _ in chunks], P) if warm else None
        try:
            if K > 1:
                logits, present = eng._forward(input_ids, mask, positions, past, K)  # (B, K, V)
            else:
                logits, present = eng._forward(input_ids, mask, positions, past)
        except Exception as exc:  # noqa: BLE001 - nothing has changed yet: the caller may run the rows again
            raise _ForwardError() from exc
        cache = self._prefix_cache()
        joining, sources = [], []
        for j, ((s, n), d) in enumerate(zip(chunks, drafts)):
            first, m, D = P - s.kv_len, n + len(d), len(d)  # first: its first real column (no hole when m == T)
            if m == T or not warm:
                cols = slice(first if m == T else T - m, P + T)
            else:
                cols = np.r_[first:P, P + T - m:P + T]
            s.computed += n
            s.kv_len += n
            if not s.prefilled:
                s.kv = eng._past_take(present, j, cols)
                continue
            prompt = _first(cols, s.kv_len) if D else cols  # the draft's columns are the row's last
            if cache is not None and s.whole:  # stored once the first tokens are out (`present` is never written)
                self._to_store.append((s.ids, present, j, prompt))
            s.kv = None
            if D:
                taken = self._verify(s, logits[j, K - 1 - D:], d)
            else:
                _sample(s, logits[j, -1])
            if s.done:
                continue
            joining.append(s)
            if D:  # the prompt and the draft tokens taken; the rejected ones' columns left out
                s.kv_len += taken
                sources.append((eng._past_take(present, j, _first(cols, s.kv_len)), 0, 0))
            else:  # rows with holes between past and suffix join compacted; the others are right-aligned already
                sources.append((present, j, cols.start) if isinstance(cols, slice)
                               else (eng._past_take(present, j, cols), 0, 0))
        if joining:
            self._join(joining, sources)

    def _verify(self, s: Sequence, logits: np.ndarray, draft: list[int]) -> int:
        """`s` takes its draft's longest prefix its own greedy choice agrees with (`logits` (D + 1, V): at its
        prompt's last position and at each draft token), then its own token where they part, or the one after
        a draft taken whole; eos, stop strings and max_tokens apply to each token as in decoding. Returns the
        draft tokens taken (their KV is kept; the last token taken is fed at the next decode)."""
        s.draft = []
        top, p, finite = _greedy_picks(logits)
        taken = 0
        for i in range(len(draft) + 1):
            _sample(s, logits[i], (top[i], p[i]), finite[i])
            if s.done or i == len(draft) or top[i] != draft[i]:
                break
            taken += 1
        self.drafted += len(draft)
        self.accepted += taken
        # parted from the draft before its end: its rest may match again further on (proposed by _speculate)
        s.source = s.source or (draft if taken < len(draft) else [])
        return taken

    def _speculate(self) -> None:
        """Running rows whose draft parted from their own tokens propose its rest again where their last tokens
        appear in it: while the batch is small, such rows leave it, verify [their next token] + the proposal in
        one forward, take what their own choice agrees with and join again (then decode with the others)."""
        live = [b for b, s in enumerate(self._rows) if not s.done]
        if not live or len(live) > SPECULATE_MAX_BATCH:
            return
        rows = [(b, self._rows[b], prop) for b in live if (prop := _proposal(self._rows[b]))]
        if not rows:
            return
        # rows of different lengths leave holes between past and new tokens: a model whose window counts
        # columns verifies them one at a time (as its warm prefills)
        joining, sources = [], []
        for group in [rows] if self._holes_ok else [[r] for r in rows]:
            for s, source in self._verify_proposals(group):
                joining.append(s)
                sources.append(source)
        if joining:
            self._join(joining, sources)

    def _verify_proposals(self, rows: list[tuple[int, Sequence, list[int]]]) -> list[tuple[Sequence, tuple]]:
        """One forward for these running rows (batch slot, sequence, proposal): each feeds its next token and its
        proposal after its KV in the batch, takes what its own choice agrees with, and leaves its slot. Returns
        the rows to join again, each with the KV of what it took (the batch itself is not changed until then)."""
        eng, W = self.engine, self._mask.shape[1]
        P = max(s.kv_len for _, s, _ in rows)
        T = 1 + max(len(prop) for *_, prop in rows)
        n = len(rows)
        input_ids = np.full((n, T), eng.tokenizer.pad_id, np.int64)
        mask = np.zeros((n, P + T), np.int64)
        positions = np.zeros((n, T), np.int64)
        for j, (b, s, prop) in enumerate(rows):
            m = 1 + len(prop)
            input_ids[j, T - m:] = [s.token, *prop]
            mask[j, :P] = self._mask[b, W - P:]
            mask[j, P + T - m:] = 1
            positions[j, T - m:] = np.arange(s.position, s.position + m)
        try:
            logits, present = eng._forward(input_ids, mask, positions,
                                           eng._past_rows(self._past, np.array([b for b, *_ in rows]), W - P), T)
        except Exception:  # noqa: BLE001 - nothing has changed: they decode as usual (a row at fault fails there)
            return []
        out = []
        for j, (b, s, prop) in enumerate(rows):
            m = 1 + len(prop)
            before = s.kv_len
            taken = self._verify(s, logits[j, T - m:], prop)
            self._rows[b] = _LEFT  # its slot is free; it joins again with the KV of what it took
            if s.done:
                continue
            s.kv_len += 1 + taken
            out.append((s, (eng._past_take(present, j, np.r_[P - before:P, P + T - m:P + T - m + 1 + taken]), 0, 0)))
        return out

    def _store_prompts(self) -> None:
        """The prefix cache takes the KV of the prompts this step prefilled (after their first tokens: the copy
        is not on their path)."""
        if not self._to_store:
            return
        cache, pending, self._to_store = self._prefix_cache(), self._to_store, []
        for ids, present, j, cols in pending:
            cache.store(ids, self.engine._past_take(present, j, cols))

    def _join(self, seqs: list[Sequence], sources: list[tuple[Past, int, int]]) -> None:
        """Add `seqs` to the batch; seq i's KV is sources[i] = (past, row, first column), kv_len positions.

        Each goes into a finished row's slot when one is free and it fits the batch's width: only its own
        positions are copied. Otherwise the batch is rebuilt in one copy (finished rows dropped, columns no row
        uses any more cut)."""
        free = [b for b, s in enumerate(self._rows) if s.done]
        W = self._mask.shape[1]
        if seqs and self._past is not None and len(free) >= len(seqs) and all(s.kv_len <= W for s in seqs):
            for b, s, (src, row, start) in zip(free, seqs, sources):
                self.engine._past_put(self._past, b, src, row, start, s.kv_len)
                self._mask[b] = 0
                self._mask[b, W - s.kv_len:] = 1
                self._rows[b] = s
            return
        keep = [b for b, s in enumerate(self._rows) if not s.done]
        parts = [(src, np.array([row]), start) for src, row, start in sources]
        lead = _dead_columns(self._mask[keep]) if keep else 0
        if keep:
            parts = [(self._past, np.array(keep), lead)] + parts
        if not parts:
            self._rows, self._past, self._mask = [], None, np.zeros((0, 0), np.int64)
            return
        width = max([W - lead if keep else 0] + [s.kv_len for s in seqs])
        mask = np.zeros((len(keep) + len(seqs), width), np.int64)
        if keep:
            mask[:len(keep), width - (W - lead):] = self._mask[keep, lead:]
        for i, s in enumerate(seqs):
            mask[len(keep) + i, width - s.kv_len:] = 1
        self._past = self.engine._past_join(parts, width)
        self._mask = mask
        self._rows = [self._rows[b] for b in keep] + list(seqs)

    def _decode(self) -> None:
        rows, pad = self._rows, self.engine.tokenizer.pad_id
        B, W = self._mask.shape
        tokens, positions, widest = [], [], 0
        for b, s in enumerate(rows):
            if s.done:  # a finished row waiting to be dropped: it sees only its own padding
                self._mask[b] = 0
                tokens.append(pad)
                positions.append(0)
                continue
            if s.kv_len >= s.window:  # its own sliding window: mask its oldest positions
                self._mask[b, :W - (s.window - 1)] = 0
                s.kv_len = s.window - 1
            tokens.append(s.token)
            positions.append(s.position)
            widest = max(widest, s.kv_len)
        # a running row's mask is ones on its last kv_len columns (joined right-aligned, one more each step,
        # its window masking the oldest): the columns before the widest row's are dead, no scan of the mask needed
        if W - widest >= TRIM_DEAD_COLUMNS:
            self._past, self._mask = self.engine._trim_past(self._past, widest), self._mask[:, W - widest:]
        mask = np.concatenate([self._mask, np.ones((B, 1), np.int64)], axis=1)
        try:
            logits, past = self.engine._forward(np.array(tokens, np.int64)[:, None], mask,
                                                np.array(positions, np.int64)[:, None], self._past)
        except Exception:  # noqa: BLE001 - find the row at fault: every row again, alone
            self._split()
            self._decode_alone()
            self._rejoin()
            return
        self._past, self._mask = past, mask
        live = [b for b, s in enumerate(rows) if not s.done]
        self.decoded = [rows[b] for b in live]
        # argmax and the chosen token's probability for every row at once (rows are independent: a sampled or
        # finished row's are computed and unused, cheaper than picking the greedy rows out first)
        top, p, finite = _greedy_picks(logits[:, -1])
        for b in live:
            s = rows[b]
            s.kv_len += 1
            _sample(s, logits[b, -1], (top[b], p[b]) if s.params.greedy else None, finite[b])
        cache = self._prefix_cache()
        if cache is not None:  # as vLLM's prefix caching: a finished answer's KV serves the dialogue's next turn
            W = mask.shape[1]
            for b in live:
                s = rows[b]
                if s.done and s.error is None and s.whole:
                    cache.store((s.ids + s.gen)[:s.kv_len], self.engine._past_take(past, b, slice(W - s.kv_len, W)))

    def _split(self) -> None:
        """Each running row's KV apart (for the row-by-row step)."""
        W = self._mask.shape[1]
        rows = [s for s in self._rows if not s.done]
        for b, s in enumerate(self._rows):
            if not s.done:
                s.kv = self.engine._past_rows(self._past, np.array([b]), W - s.kv_len)
        self._rows, self._past, self._mask = rows, None, np.zeros((0, 0), np.int64)

    def _rejoin(self) -> None:
        rows = [s for s in self._rows if not s.done]
        self._rows = []
        if rows:
            self._join(rows, [(s.kv, 0, 0) for s in rows])
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
            _sample(s, logits[0, -1])
            if not s.done:
                self._rows.append(s)

    def _decode_alone(self) -> None:
        eng = self.engine
        for s in self._rows:
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
            self.decoded.append(s)
            _sample(s, logits[0, -1])


def _greedy_picks(logits: np.ndarray) -> tuple[list[int], list[float], list[bool]]:
    """For each row of logits (N, V): its argmax, the probability the model gave it (softmax in float64, as
    `Sequence.accept` computes it: exp(x[top] - max) is 1), and whether the row is finite. The greedy pick of N
    rows in a few numpy calls."""
    x = logits.astype(np.float64)
    top = x.argmax(axis=1).tolist()
    p = (1.0 / np.exp(x - x.max(axis=1, keepdims=True)).sum(axis=1)).tolist()
    return top, p, np.isfinite(x).all(axis=1).tolist()


def _sample(s: Sequence, logits: np.ndarray, greedy: tuple[int, float] | None = None,
            finite: bool | None = None) -> None:
    """`s` takes its next token from its logits (V,) (`greedy`: the batch's argmax and its probability, and
    `finite`, already computed for the batch; a greedy row alone has them computed here); a row whose logits are
    not finite (a model broken on that input) or cannot be sampled fails alone."""
    if greedy is None and s.params.greedy:
        (t,), (pt,), (finite,) = _greedy_picks(logits[None])
        greedy = (t, pt)
    if not (np.isfinite(logits).all() if finite is None else finite):
        s.fail(ValueError("the model's logits for this sequence are not finite"))
        return
    try:
        s.push(*greedy, logits) if greedy is not None else s.accept(logits)
    except Exception as exc:  # noqa: BLE001 - this row's own failure, not the step's
        s.fail(exc)


class _Left:
    """A batch slot whose sequence left to verify a proposal (it joins again elsewhere): free, as a finished
    row's."""

    done = True


_LEFT = _Left()


def _proposal(s: Sequence) -> list[int]:
    """The rest of `s`'s draft after the last place its last LOOKUP_TOKENS tokens appear in it (none when they
    do not), cut to what max_tokens and its window leave room for."""
    src, n = s.source, LOOKUP_TOKENS
    if not src or len(s.gen) < n:
        return []
    room = min(s.draft_room, PROPOSAL_MAX_TOKENS)
    if room <= 0:
        return []
    tail = s.gen[-n:]
    for j in range(len(src) - n - 1, -1, -1):  # a match with nothing after it proposes nothing
        if src[j:j + n] == tail:
            return src[j + n:j + n + room]
    return []


def _by_draft(chunks: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
    """The chunks that verify no draft, then those that do, each group only when it has any: a forward each, so
    that the others are not padded to prompt + draft."""
    verifying = [c for c in chunks if c[0].verifies(c[1])]
    return [g for g in ([c for c in chunks if not c[0].verifies(c[1])], verifying) if g]


def _first(cols: slice | np.ndarray, n: int) -> slice | np.ndarray:
    """The first `n` of a row's columns (a slice or an index array)."""
    return slice(cols.start, cols.start + n) if isinstance(cols, slice) else cols[:n]


def _log(p: float) -> float:
    """A probability's natural log; -9999.0 (OpenAI's floor) for one that underflowed to 0."""
    return math.log(p) if p > 0 else -9999.0


class _ForwardError(Exception):
    """The backend raised in a forward (its cause); no sequence's state has changed."""


def _dead_columns(mask: np.ndarray) -> int:
    """Leading columns that no row uses."""
    used = mask.any(axis=0)
    return int(np.argmax(used)) if used.any() else mask.shape[1]
