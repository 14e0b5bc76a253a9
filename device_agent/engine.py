"""The device backend: the pruned model as .tflite, run by LiteRT with a KV cache.

The file (see tierline/build/export_tflite.py) has `prefill_{len}` signatures for
a few fixed prompt lengths and a `decode` signature, all over fixed-size caches of
shape (1, context, kv_heads, head_dim) where slot == absolute position. This module
maps the base engine's optimum-style calls onto them: `past=None` starts a fresh
cache and prefills, anything else decodes at `position_ids`. The sliding window is
exact: `_trim_past` raises the `kv_start` input, which masks the evicted positions,
since a fixed-size cache cannot drop rows.

No prefix cache here (`supports_prefix_cache` stays False; `tiers.device.prefix_cache_tokens`
is ignored): the signatures prefill whole prompts of fixed lengths into a fresh cache, so
there is no entry point that starts from a stored prompt's KV.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:  # the slim runtime some devices ship instead
    from tflite_runtime.interpreter import Interpreter  # type: ignore[no-redef]

from tierline_shared.models.artifacts import TierFiles, load_with
from tierline_shared.models.configs import DecoderConfig, read_config
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.runtime.engine import Engine, EngineInfo, check_vocab

_PREFILL = re.compile(r"^prefill_(\d+)$")


@dataclass(frozen=True)
class LiteRTPast:
    """The cache arrays of one sequence and which of their positions are live."""

    caches: dict[str, np.ndarray]  # kv_cache_{k,v}_{i} -> (1, context, kv_heads, head_dim)
    length: int  # positions 0..length-1 have been written
    start: int  # positions < start were evicted by the sliding window (masked, not erased)


class LiteRTEngine(Engine):
    supports_batch_prefill = False  # the signatures are batch 1

    def __init__(self, interpreter: Interpreter, cfg: DecoderConfig, tokenizer: TextTokenizer, info: EngineInfo,
                 path: Path):
        super().__init__(tokenizer, info, cfg.eos_token_ids)  # the checkpoint's end tokens stop it too
        self.cfg = cfg
        self.path = path
        self._interpreter = interpreter  # the runners below need it alive
        sigs = interpreter.get_signature_list()
        self.prefill_lens = sorted(int(m.group(1)) for s in sigs if (m := _PREFILL.match(s)))
        self._prefill = {n: interpreter.get_signature_runner(f"prefill_{n}") for n in self.prefill_lens}
        self._decode_runner = interpreter.get_signature_runner("decode")
        self.cache_names = [f"kv_cache_{kv}_{i}" for i in range(cfg.layers) for kv in ("k", "v")]
        self.cache_shape = (1, cfg.context, cfg.kv_heads, cfg.head_dim)

    @classmethod
    def load(cls, path: str | Path, tokenizer: TextTokenizer, tier: str = "device", model_name: str = "tierline",
             version: str = "0", threads: int | None = None) -> "LiteRTEngine":
        """Open `path` and the config.json beside it; every mismatch names the file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such .tflite file")
        cfg = _load_config(path.parent / "config.json")
        check_vocab(cfg.vocab_size, tokenizer, path)
        try:
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            sigs = interpreter.get_signature_list()
        except Exception as exc:  # the runtime raises ValueError/RuntimeError with no file name
            raise ValueError(f"{path}: not a readable .tflite model ({exc})") from exc
        _check_signatures(interpreter, sigs, cfg, path)
        info = EngineInfo(tier, model_name, version, cfg.num_params(), path.stat().st_size,
                          cfg.context, cfg.window_limit)
        return cls(interpreter, cfg, tokenizer, info, path)

    def close(self) -> None:
        """Drop the interpreter and its runners: LiteRT frees its tensors and unmaps the .tflite now (an update's
        old model, device_agent/agent.py: swap_engine). A forward after it fails, naming the file."""
        with self._lock:
            self._prefill, self._decode_runner, self._interpreter = {}, None, None

    # -- the backend --------------------------------------------------------------------------
    def _forward(self, input_ids, attention_mask, position_ids, past):
        if self._interpreter is None:
            raise RuntimeError(f"{self.path}: this engine was closed (its model replaced)")
        if input_ids.shape[0] != 1:
            raise ValueError(f"{self.path}: LiteRT signatures take one sequence, got a batch of {input_ids.shape[0]}")
        tokens = input_ids[0].astype(np.int32)
        pos0 = int(position_ids[0, 0])
        if pos0 + len(tokens) > self.cfg.context:
            raise ValueError(f"{self.path}: positions up to {pos0 + len(tokens) - 1} exceed the cache "
                             f"({self.cfg.context} positions)")
        if past is None:
            past = LiteRTPast({n: np.zeros(self.cache_shape, np.float32) for n in self.cache_names}, 0, 0)
        caches, last = past.caches, None
        i = 0
        while i < len(tokens):  # prefill in as few fixed-length calls as fit; single tokens decode
            p, rest = pos0 + i, len(tokens) - i
            n = self._chunk_len(p, rest)
            take = min(n, rest)
            chunk = np.full(n, self.tokenizer.pad_id, np.int32)
            chunk[:take] = tokens[i:i + take]
            runner = self._decode_runner if n == 1 else self._prefill[n]
            out = runner(tokens=chunk[None], input_pos=np.arange(p, p + n, dtype=np.int32),
                         kv_start=np.array([past.start], np.int32), **caches)
            caches = {name: out[name] for name in self.cache_names}
            last = out["logits"][0, take - 1]
            i += take
        logits = np.array(last, dtype=np.float32)[None, None, :]
        return logits, replace(past, caches=caches, length=pos0 + len(tokens))

    def _chunk_len(self, pos: int, rest: int) -> int:
        """The signature length for the next `rest` tokens at `pos`: padding must stay inside the cache."""
        if rest == 1:
            return 1
        room = self.cfg.context - pos
        fits = [n for n in self.prefill_lens if n <= room]
        covering = [n for n in fits if n >= rest]
        if covering:
            return covering[0]
        full = [n for n in fits if n <= rest]
        return full[-1] if full else 1

    def _trim_past(self, past: LiteRTPast, keep: int) -> LiteRTPast:
        return replace(past, start=max(past.start, past.length - keep))


def _load_config(path: Path) -> DecoderConfig:
    try:
        return read_config(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config.json missing beside the .tflite") from None
    except (ValueError, TypeError) as exc:
        msg = str(exc)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: not a valid model config ({msg})") from exc


def _check_signatures(interpreter: Interpreter, sigs: dict, cfg: DecoderConfig, path: Path) -> None:
    """The file must have decode + prefill_* over caches shaped like config.json says."""
    prefills = [s for s in sigs if _PREFILL.match(s)]
    if "decode" not in sigs or not prefills:
        raise ValueError(f"{path}: expected signatures decode and prefill_*, found {sorted(sigs)}")
    caches = {f"kv_cache_{kv}_{i}" for i in range(cfg.layers) for kv in ("k", "v")}
    want_in = {"tokens", "input_pos", "kv_start"} | caches
    shape = [1, cfg.context, cfg.kv_heads, cfg.head_dim]
    for name in ("decode", *prefills):
        if set(sigs[name]["inputs"]) != want_in or set(sigs[name]["outputs"]) != caches | {"logits"}:
            raise ValueError(f"{path}: signature {name} has inputs {sorted(sigs[name]['inputs'])}, "
                             f"expected {sorted(want_in)} (config.json: {cfg.layers} layers)")
        details = interpreter.get_signature_runner(name).get_input_details()
        for c in caches:
            if list(details[c]["shape"]) != shape:
                raise ValueError(f"{path}: {name}/{c} has shape {list(details[c]['shape'])}, "
                                 f"config.json implies {shape}")


FORMATS = ("tflite",)  # what this backend reads (the models index's format of the tier)


def load_engine(models_dir: str | Path, tier: str = "device", threads: int | None = None) -> LiteRTEngine:
    """The device model of a models directory, every file sha256-checked first (ArtifactError otherwise)."""
    def backend(f: TierFiles) -> LiteRTEngine:
        return LiteRTEngine.load(f.weights, f.tokenizer, f.tier, f.model_name, f.version, threads=threads)

    return load_with(models_dir, tier, FORMATS, backend)
