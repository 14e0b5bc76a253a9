"""One engine interface for every tier, and the decoding loop they share.

A backend (torch, onnxruntime, LiteRT) only implements `_forward`, one step of the
decoder in the optimum convention on numpy arrays. Everything else (left padding,
sampling, stop strings, the KV cache's sliding window, confidence, timings) lives
here once, so the three tiers generate exactly the same way.

The prefix cache (`PrefixCache`, vLLM's automatic prefix caching scaled down) lives
here too: a backend that can slice and join its KV arrays (`supports_prefix_cache`)
gets prompt KV reuse across requests for free.
"""

from __future__ import annotations

import abc
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from tierline_shared.models.tokenizer import TextTokenizer

Past = list  # backend-specific KV cache (list of per-layer arrays)
# The sampler's range. Below MIN_TEMPERATURE (but 0, greedy) a distribution is an argmax in all but name,
# and logits / temperature overflow to NaN; the seed is numpy's, which takes no negative numbers.
# 0.01 as the wire's float32 carries it (0.0099999998): a request that asks for exactly 0.01 gets it
MIN_TEMPERATURE = float(np.float32(0.01))
MAX_TEMPERATURE = 2.0  # what a request may ask (OpenAI's bound: servicer.validate_request); the sampler takes more
MAX_SEED = 2**63 - 1  # the wire's int64
MAX_TOP_LOGPROBS = 20  # alternatives per position at most (OpenAI's bound)
INCOMPLETE_CHAR = "\ufffd"  # what a tokenizer decodes the first bytes of a character split across tokens to


@dataclass
class GenerationParams:
    max_tokens: int = 64  # completion tokens at most
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    stop: tuple[str, ...] = ()  # stop strings (not included in the text)
    seed: int | None = None  # sampling seed; None = nondeterministic
    attention_window: int = 0  # 0 = the model's own window
    logprobs: bool = False  # report each generated token's log-probability
    top_logprobs: int = 0  # with logprobs: the most likely tokens at each position, this many
    # a proposed answer (the one a lower tier gave before the request was escalated): a greedy request verifies
    # it in one forward and decodes on from where the model parts from it; its tokens are the model's own either
    # way (shared/runtime/runner.py). Ignored by sampled requests and by backends without `supports_draft`
    draft: str = ""
    # False: the prompt's text carries the model's special tokens already (a chat template's BOS): none is added
    # (vLLM's and transformers' add_special_tokens); `prompt_ids` encodes it so
    add_special_tokens: bool = True

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int, got {self.max_tokens!r}")
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature < math.inf):
            raise ValueError(f"temperature must be 0 or at least {MIN_TEMPERATURE:g}, got {self.temperature!r}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.attention_window < 0:
            raise ValueError(f"attention_window must be >= 0, got {self.attention_window!r}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        self.stop = tuple(self.stop)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def prompt_ids(tokenizer, prompt: str, add_special_tokens: bool = True) -> list[int]:
    """A request's prompt as the model reads it: its tokens, after the BOS the tokenizer adds unless the prompt
    carries its special tokens itself (`add_special_tokens` False: `GenerationParams`'). Every tier encodes
    prompts here."""
    return tokenizer.encode(prompt, bos=add_special_tokens)


@dataclass
class TokenLogprob:
    """A generated token and its log-probability under the model (before temperature and top_p)."""

    token: str  # what it adds to the text
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)  # the most likely tokens here, most likely first


@dataclass
class GenerationResult:
    text: str
    finish_reason: str  # "stop" (eos or a stop string), "length", or "cancelled"
    prompt_tokens: int
    completion_tokens: int
    confidence: float  # lowest probability among the chosen tokens (1.0 = sure)
    mean_logprob: float  # mean log-probability of the chosen tokens
    first_token_s: float  # prefill + first token, seconds
    total_s: float
    token_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache
    logprobs: list[TokenLogprob] | None = None  # one per token of text, when params.logprobs asked


@dataclass
class EngineInfo:
    tier: str
    model: str
    version: str
    params: int
    bytes: int
    max_context: int  # prompt + completion tokens at most
    window_limit: int  # widest attention window supported


class EngineError(ValueError):
    """A request the engine cannot serve (too long, window too wide...); `field` names the request field."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field

    def __reduce__(self):  # pickled whole (from a tier's engine core): the field too
        return type(self), (str(self), self.field)


VOCAB_PADDING = 0.9  # a tokenizer covering less of the model's rows than this is not the model's


def check_vocab(model_vocab: int, tokenizer: TextTokenizer, where) -> None:
    """A tokenizer that does not fit the model would decode nonsense: refuse it. A model vocabulary somewhat
    larger than the tokenizer's is common (rows padded to a multiple of 64 or 128, as Qwen2's) and served
    as transformers serves it (an id past the tokenizer decodes to nothing)."""
    if not tokenizer.vocab_size <= model_vocab <= tokenizer.vocab_size / VOCAB_PADDING:
        raise ValueError(
            f"{where}: model vocabulary ({model_vocab}) does not match the tokenizer's ({tokenizer.vocab_size})"
        )


class PrefixCache:
    """A bounded LRU of prompts' KV caches keyed by their token ids, for reuse by later prompts.

    After a prefill the engine stores each prompt's keys/values (real tokens only, no
    padding); a later prompt that shares a prefix of at least `min_match` tokens with a
    stored one (the longest such prefix over all entries, capped one short of the whole
    prompt so that its last token is always computed) starts from that KV and prefills
    only the rest. Causal attention makes a position's KV depend on the tokens up to it
    alone, so any prefix of a stored prompt is reusable, including a prompt shorter than
    it. `max_tokens` bounds the positions held (least recently used entries go first).
    Counters follow vLLM (`prefix_cache_queries` / `prefix_cache_hits`, in tokens).
    Not thread-safe on its own: the engine uses it under its decode lock.
    """

    def __init__(self, max_tokens: int, min_match: int = 16,
                 on_lookup: Callable[[int, int], None] | None = None):
        if max_tokens < 1 or min_match < 1:
            raise ValueError(f"max_tokens and min_match must be >= 1, got {max_tokens}, {min_match}")
        self.max_tokens, self.min_match, self.on_lookup = max_tokens, min_match, on_lookup
        self._entries: OrderedDict[tuple[int, ...], tuple[np.ndarray, Past]] = OrderedDict()
        # entries by their first min_match tokens: only those can share min_match tokens with a prompt
        self._by_head: dict[tuple[int, ...], set[tuple[int, ...]]] = {}
        self.tokens = 0  # positions held
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of those, tokens whose KV was reused

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int]) -> tuple[int, Past | None]:
        """(h, KV of a stored prompt whose first h positions are ids[:h]); (0, None) for a miss."""
        a = np.asarray(ids, dtype=np.int64)
        best, best_key = 0, None
        for key in self._by_head.get(tuple(ids[:self.min_match]), ()):
            arr = self._entries[key][0]
            m = min(len(arr), len(a))
            same = arr[:m] == a[:m]
            n = m if same.all() else int(np.argmin(same))
            if n > best:
                best, best_key = n, key
        best = min(best, len(a) - 1)  # the last prompt token is always computed: its logits pick the first token
        if best < self.min_match:
            best, best_key = 0, None
        self.queries += len(a)
        self.hits += best
        if self.on_lookup:
            self.on_lookup(len(a), best)
        if best_key is None:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, self._entries[best_key][1]

    def store(self, ids: Sequence[int], past: Past) -> None:
        """Keep `past` (one row, exactly len(ids) positions) unless a stored prompt already covers ids."""
        key = tuple(ids)
        if len(key) < self.min_match or len(key) > self.max_tokens:
            return
        head = self._by_head.setdefault(key[:self.min_match], set())
        for other in head:
            if len(other) >= len(key) and other[:len(key)] == key:  # already reusable as it is
                self._entries.move_to_end(other)
                return
        for other in [o for o in head if o == key[:len(o)]]:  # prefixes of the new one: redundant
            self._drop(other)
        self._entries[key] = (np.asarray(key, dtype=np.int64), past)
        self._by_head.setdefault(key[:self.min_match], set()).add(key)
        self.tokens += len(key)
        while self.tokens > self.max_tokens:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        del self._entries[key]
        self.tokens -= len(key)
        head = self._by_head[key[:self.min_match]]
        head.discard(key)
        if not head:
            del self._by_head[key[:self.min_match]]

    def clear(self) -> None:
        self._entries.clear()
        self._by_head.clear()
        self.tokens = 0


class Engine(abc.ABC):
    """Load once, then generate for batches of prompts with a KV cache."""

    supports_batch_prefill = True  # False: the backend takes one row at a time
    supports_prefix_cache = False  # True: the backend implements _past_take, _past_join and _past_rows
    supports_draft = False  # True: _forward returns the logits of the last `last` positions (draft verification)

    def __init__(self, tokenizer: TextTokenizer, info: EngineInfo, eos_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.info = info
        # the tokens that end generation: the tokenizer's eos_token and every end token the model's config lists
        # (generation_config.json's eos_token_id, a list for Llama-3-Instruct and Qwen2-Instruct)
        self.eos_ids = frozenset({tokenizer.eos_id, *eos_ids})
        # one decode at a time per engine: runtimes such as LiteRT's interpreter are not thread-safe
        self._lock = threading.RLock()
        self.prefix_cache: PrefixCache | None = None  # off until enable_prefix_cache

    def close(self) -> None:
        """Free what the backend holds (a runtime, a mapped model file) now, not when the engine is collected; the
        engine is not used after (a board's model replaced by an update). Nothing to free by default."""

    def enable_prefix_cache(self, max_tokens: int, min_match: int = 16,
                            on_lookup: Callable[[int, int], None] | None = None) -> bool:
        """Reuse prompts' KV across requests (max_tokens 0 = off); False where the backend cannot."""
        with self._lock:
            self.prefix_cache = None
            if max_tokens > 0 and self.supports_prefix_cache:
                self.prefix_cache = PrefixCache(max_tokens, min_match, on_lookup)
            return self.prefix_cache is not None

    # -- the one thing a backend implements --------------------------------------------
    @abc.abstractmethod
    def _forward(
        self,
        input_ids: np.ndarray,  # (B, T) int64
        attention_mask: np.ndarray,  # (B, P+T) int64
        position_ids: np.ndarray,  # (B, T) int64
        past: Past | None,
    ) -> tuple[np.ndarray, Past]:
        """The logits of the last position (B, 1, V) float32 and the new cache; a backend that
        `supports_draft` takes `last=k` and returns the last k positions' (B, k, V)."""

    @abc.abstractmethod
    def _trim_past(self, past: Past, keep: int) -> Past:
        """Keep the last `keep` positions of every cache entry (sliding window); `keep` may be 0."""

    def _past_take(self, past: Past, row: int, cols: slice | np.ndarray) -> Past:
        """A copy of one row's positions `cols` (a slice or an index array) as a batch of one."""
        raise NotImplementedError

    def _past_join(self, parts: Sequence[tuple[Past, np.ndarray | None, int]], width: int) -> Past:
        """Caches stacked in order, each left-padded with zeros to `width` positions; a part is (past, the rows
        to take or None for all, its first position to take)."""
        raise NotImplementedError

    def _past_put(self, past: Past, slot: int, src: Past, row: int, start: int, n: int) -> None:
        """Write src's row `row`, positions [start, start + n), into row `slot` of `past`, right-aligned, in
        place (the rest of that row zeroed): a sequence taking a finished one's place in the batch. Written
        for arrays indexed as numpy's are (numpy, torch)."""
        for dst, new in zip(past, src):
            for d, s in zip(dst, new):
                w = d.shape[2]
                d[slot, :, :w - n] = 0
                d[slot, :, w - n:] = s[row, :, start:start + n]

    def _past_rows(self, past: Past, rows: np.ndarray, start: int) -> Past:
        """A copy of rows `rows`, positions from `start` on (a batch leaving rows and unused columns)."""
        raise NotImplementedError

    # -- shared decoding ---------------------------------------------------------------------
    def teacher_forced_hits(self, prompt: str, target: str) -> tuple[int, int]:
        """(tokens of `target` the greedy choice gets right given the true text before each, tokens).

        A health check that needs no whole right answer: a corrupted model scores near 1/vocabulary."""
        ids, want = self.tokenizer.encode(prompt), self.tokenizer.encode(target, bos=False)
        with self._lock:
            logits, past = self._forward(np.array([ids], np.int64), np.ones((1, len(ids)), np.int64),
                                         np.arange(len(ids), dtype=np.int64)[None], None)
            hits = 0
            for k, t in enumerate(want):
                hits += int(np.argmax(logits[0, -1]) == t)
                if k + 1 < len(want):
                    pos = len(ids) + k
                    logits, past = self._forward(np.array([[t]], np.int64), np.ones((1, pos + 1), np.int64),
                                                 np.array([[pos]], np.int64), past)
        return hits, len(want)

    def check(self, prompt: str, params: GenerationParams, ids=None) -> int:
        """Validate one request against the model's limits; returns its prompt length (`ids`: the prompt's tokens,
        when the caller has them)."""
        if params.attention_window > self.info.window_limit:
            raise EngineError(
                f"attention_window {params.attention_window} exceeds the model's limit {self.info.window_limit}",
                "parameters.attention_window",
            )
        n = len(prompt_ids(self.tokenizer, prompt, params.add_special_tokens) if ids is None else ids)
        if n >= self.info.max_context:  # the prompt alone fills the context: its fault, whatever max_tokens asks
            raise EngineError(f"{n} tokens; this model's maximum context length is {self.info.max_context} tokens, "
                              "which leaves no room for an answer: reduce the prompt", "prompt")
        if n + params.max_tokens > self.info.max_context:
            raise EngineError(  # OpenAI's words, so that clients and people recognise it
                f"this model's maximum context length is {self.info.max_context} tokens; you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion): "
                f"reduce the prompt or max_tokens to at most {self.info.max_context - n}",
                "parameters.max_tokens",
            )
        return n

    def generate(self, prompt: str, params: GenerationParams | None = None) -> GenerationResult:
        return self.generate_batch([prompt], [params or GenerationParams()])[0]

    def generate_batch(
        self, prompts: Sequence[str], params: Sequence[GenerationParams],
        cancelled: Sequence[Callable[[], bool]] | None = None,
    ) -> list[GenerationResult]:
        """Decode a batch together (every row admitted at once, each leaving when it finishes); rows may
        differ in every parameter. The first row the backend fails on raises, after the others finished.

        `cancelled[i]()` is asked before every decode step: once it says True, row i
        stops (finish_reason "cancelled") and costs nothing more.
        """
        if len(prompts) != len(params):
            raise ValueError("one GenerationParams per prompt")
        for p, g in zip(prompts, params):
            self.check(p, g)
        with self._lock:
            runner = self.runner()
            seqs = [runner.sequence(p, g) for p, g in zip(prompts, params)]
            for _ in runner.run(seqs, cancelled):
                pass
        errors = [s.error for s in seqs if s.error is not None]
        if errors:
            raise errors[0]
        return [s.result() for s in seqs]

    def runner(self):
        """A model runner (shared/runtime/runner.py) over this engine: the running batch and its step."""
        from tierline_shared.runtime.runner import ModelRunner

        return ModelRunner(self)

    def generate_uncached(self, prompt: str, max_tokens: int = 64) -> str:
        """Greedy decoding that recomputes the whole sequence each step (no KV cache).

        Slow on purpose: the reference the cached path must reproduce token for token.
        """
        ids = self.tokenizer.encode(prompt)
        out: list[int] = []
        for _ in range(max_tokens):
            seq = np.array([ids + out], dtype=np.int64)
            mask = np.ones_like(seq)
            pos = np.arange(seq.shape[1], dtype=np.int64)[None]
            logits, _ = self._forward(seq, mask, pos, None)
            t = int(np.argmax(logits[0, -1]))
            if t in self.eos_ids:
                break
            out.append(t)
        return self.tokenizer.decode(out)

    def stream(self, prompt: str, params: GenerationParams | None = None) -> Iterator[str]:
        """Text chunks as tokens are generated (stop strings held back until resolved)."""
        for item in self.stream_with_result(prompt, params):
            if isinstance(item, str):
                yield item

    def stream_with_result(self, prompt: str, params: GenerationParams | None = None) -> Iterator:
        """Text chunks (str) as they are generated, then the GenerationResult (holds the engine throughout:
        servers stream through their scheduler instead)."""
        params = params or GenerationParams()
        self.check(prompt, params)
        with self._lock:
            runner = self.runner()
            seq = runner.sequence(prompt, params)
            for _ in runner.run([seq]):
                chunk = seq.take_text()
                if chunk:
                    yield chunk
        if seq.error is not None:
            raise seq.error
        yield seq.result()


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


def _pick(logits: np.ndarray, g: GenerationParams, rng: np.random.Generator | None) -> tuple[int, float]:
    """The next token and the probability the model gave it (`rng` is drawn from only when `g` samples)."""
    probs = _softmax(logits)
    if g.greedy:
        t = int(np.argmax(logits))
        return t, float(probs[t])
    scaled = _softmax(logits / g.temperature)
    if g.top_p < 1.0:
        order = np.argsort(-scaled)
        cum = np.cumsum(scaled[order])
        keep = order[: int(np.searchsorted(cum, g.top_p) + 1)]
        filtered = np.zeros_like(scaled)
        filtered[keep] = scaled[keep]
        scaled = filtered / filtered.sum()
    t = int(rng.choice(len(scaled), p=scaled))
    return t, float(probs[t])


def top_logprobs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of logits (V,) and their log-probabilities, most likely first."""
    x = logits.astype(np.float64)
    lse = x.max() + math.log(np.exp(x - x.max()).sum())
    idx = np.argpartition(-x, k - 1)[:k] if k < len(x) else np.arange(len(x))
    idx = idx[np.argsort(-x[idx], kind="stable")]
    return [(int(i), float(x[i] - lse)) for i in idx]


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None


def _stream_safe_len(text: str, stops: tuple[str, ...], done: bool) -> int:
    """How much of text can be sent without risking a partial stop string, or a character whose bytes are split
    across tokens (a byte-level tokenizer decodes the first part to U+FFFD until the next token completes it)."""
    if done:
        return len(text)
    end = len(text.rstrip(INCOMPLETE_CHAR))
    if not stops:
        return end
    hold = len(text) - end
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold
