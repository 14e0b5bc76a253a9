"""A model's config.json: a Llama-family decoder's (Llama, Qwen2, Mistral), in Hugging Face's format.

DecoderConfig exposes what the engines and exports read: `layers`, `kv_heads`, `head_dim`, `vocab_size`,
`context`, `window_limit`, `num_params()`. Importable without torch: the edge and device tiers have none
(an import-linter contract in pyproject.toml keeps it so); the model itself is shared/models/llama.py.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# config.json's architectures value -> its model_type
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
ACTIVATIONS = ("silu", "swish")  # hidden_act values that are SiLU (transformers' ACT2FN maps both to it)
QWEN2_MAX_WINDOW_LAYERS = 28  # transformers' default: Qwen2 layers below this index never slide
MISTRAL_SLIDING_WINDOW = 4096  # transformers' MistralConfig default: a config.json without the key has this window
# keys of the project's own config.json before its family moved to the Llama format (a GPT of its own, removed)
PRE_LLAMA_KEYS = {"n_layer", "n_head", "n_embd", "block_size", "ffn_hidden"}
# rope_type values served: transformers' own inverse frequencies for each (shared/models/llama.py:rope_frequencies);
# yarn, dynamic and longrope are refused by name
ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json Tierline cannot serve; the message names the file and the field."""


@dataclass
class DecoderConfig:
    vocab_size: int
    hidden_size: int  # the residual stream's width
    intermediate_size: int  # the MLP's width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads: grouped-query attention
    head_dim: int  # need not be hidden_size / num_attention_heads
    max_position_embeddings: int  # the context: prompt + completion tokens at most
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # rope scaling, as transformers' rope_parameters says it: "default" (none), "linear" (every frequency / factor)
    # or "llama3" (Llama 3.1/3.2: long wavelengths / factor, short ones kept, a smooth ramp between)
    rope_type: str = "default"
    rope_factor: float = 1.0  # linear, llama3: how many times the positions are stretched
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original / this are divided by the factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original / this are kept as they are
    rope_original_max_position_embeddings: int = 0  # llama3: the context the model was pretrained with
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # biases on q, k, v (Llama's attention_bias, Qwen2 always)
    o_bias: bool = False  # a bias on the output projection (Llama's attention_bias)
    mlp_bias: bool = False
    sliding_window: int = 0  # 0 = full causal attention; N = a query sees the last N positions, on every layer
    architecture: str = "LlamaForCausalLM"
    bos_token_id: int | None = None
    eos_token_id: int | None = None  # the first end token (what files that take one id get)
    pad_token_id: int | None = None
    # every token that ends generation: eos_token_id as generation_config.json lists it (Llama-3-Instruct,
    # Qwen2-Instruct list several), else as config.json does; () = none listed, only the tokenizer's
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{f}: must be a positive integer, got {v!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim: must be even (rotary embeddings rotate pairs), got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                             f"num_attention_heads {self.num_attention_heads}")
        if not 0 <= self.sliding_window <= self.max_position_embeddings:
            raise ValueError(f"sliding_window: must be in [0, {self.max_position_embeddings}], "
                             f"got {self.sliding_window}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_type: {self.rope_type!r} rope scaling is not implemented (served: "
                             f"{', '.join(ROPE_TYPES)})")
        if self.rope_type != "default" and not self.rope_factor > 0:
            raise ValueError(f"rope_factor: must be positive, got {self.rope_factor!r}")
        if self.rope_type == "llama3":
            if not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
                raise ValueError(f"rope_low_freq_factor, rope_high_freq_factor: must be 0 < low < high, got "
                                 f"{self.rope_low_freq_factor!r}, {self.rope_high_freq_factor!r}")
            if self.rope_original_max_position_embeddings <= 0:
                raise ValueError(f"rope_original_max_position_embeddings: must be a positive integer, got "
                                 f"{self.rope_original_max_position_embeddings!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architectures: {self.architecture!r} is not served; Tierline serves "
                             f"{', '.join(ARCHITECTURES)}")
        self.eos_token_ids = tuple(self.eos_token_ids)
        if self.eos_token_id is not None and not self.eos_token_ids:
            self.eos_token_ids = (self.eos_token_id,)

    @property
    def window_limit(self) -> int:
        """The widest attention window the model supports."""
        return self.sliding_window or self.max_position_embeddings

    # the short names the engines and exports read
    @property
    def layers(self) -> int:
        return self.num_hidden_layers

    @property
    def kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def context(self) -> int:
        return self.max_position_embeddings

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    def num_params(self) -> int:
        """The model's parameter count without building it (pruning searches; tiers without torch)."""
        h, v = self.hidden_size, self.vocab_size
        embeddings = v * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_hidden_layers * self.layer_params() + h  # the final norm

    def layer_params(self, num_key_value_heads: int | None = None, intermediate_size: int | None = None) -> int:
        """One decoder layer's parameters with the given KV-head count and MLP width (default: this config's);
        the query heads go with their KV heads (num_attention_heads / num_key_value_heads each)."""
        kv = self.num_key_value_heads if num_key_value_heads is None else num_key_value_heads
        heads = kv * (self.num_attention_heads // self.num_key_value_heads)
        f = self.intermediate_size if intermediate_size is None else intermediate_size
        h, d = self.hidden_size, self.head_dim
        qkv = h * (heads + 2 * kv) * d + (heads + 2 * kv) * d * self.qkv_bias
        o = heads * d * h + h * self.o_bias
        mlp = 3 * h * f + (2 * f + h) * self.mlp_bias
        return qkv + o + mlp + 2 * h  # + the two norms

    # -- Hugging Face's config.json ---------------------------------------------------------------
    @classmethod
    def from_hf(cls, data: dict, where: str | Path = CONFIG_FILE) -> "DecoderConfig":
        """From a config.json's contents; ConfigError naming `where` and the field for what is not served."""
        def field(name: str, default=None):
            value = data.get(name, default)
            if value is None:
                raise ConfigError(f"{where}: {name}: required")
            return value

        def number(name: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}: {name}: must be a number, got {value!r}")
            return float(value)

        if "architectures" not in data and "model_type" not in data and PRE_LLAMA_KEYS & data.keys():
            raise ConfigError(f"{where}: the old pre-Llama config format, no longer served; rebuild the family with "
                              f"`tierline models build` or import a Hugging Face checkpoint (`tierline models import`)")
        archs = data.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            raise ConfigError(f"{where}: architectures: {archs!r} is not served; Tierline serves "
                              f"{', '.join(ARCHITECTURES)} (the Llama family)")
        if data.get("hidden_act", "silu") not in ACTIVATIONS:
            raise ConfigError(f"{where}: hidden_act: {data['hidden_act']!r}; only silu (SwiGLU) is implemented")
        rope = data.get("rope_parameters") or {}  # transformers 5; older files say rope_theta and rope_scaling
        scaling = _rope_scaling(data, rope, where)
        heads = field("num_attention_heads")
        hidden = field("hidden_size")
        layers = field("num_hidden_layers")
        window = _sliding_window(data, arch, layers, where)
        attention_bias = bool(data.get("attention_bias", False))
        eos = data.get("eos_token_id")
        if not all(_is_id(i) for i in _ids(eos)):
            raise ConfigError(f"{where}: eos_token_id: {eos!r} is not a token id or a list of them")
        values = dict(
            vocab_size=field("vocab_size"), hidden_size=hidden, intermediate_size=field("intermediate_size"),
            num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=data.get("num_key_value_heads") or heads,
            head_dim=data.get("head_dim") or hidden // heads,
            max_position_embeddings=field("max_position_embeddings"),
            rms_norm_eps=number("rms_norm_eps", data.get("rms_norm_eps", 1e-6)),
            rope_theta=number("rope_theta", rope.get("rope_theta", data.get("rope_theta", 10000.0))), **scaling,
            tie_word_embeddings=bool(data.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or arch == "Qwen2ForCausalLM",
            o_bias=attention_bias and arch != "Qwen2ForCausalLM",
            mlp_bias=bool(data.get("mlp_bias", False)), sliding_window=int(window), architecture=arch,
            bos_token_id=data.get("bos_token_id"), eos_token_id=_first(eos), eos_token_ids=_ids(eos),
            pad_token_id=data.get("pad_token_id"))
        try:  # every required field is there (ConfigError above, naming `where` once): now the values
            return cls(**values)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_hf(self) -> dict:
        """config.json as Hugging Face writes it for this architecture (transformers' AutoConfig reads it)."""
        out = {"architectures": [self.architecture], "model_type": self.model_type,
               "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
               "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
               "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
               "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
               "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
               "rope_parameters": {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                                   **self._rope_scaling_hf()},
               "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
               "eos_token_id": self._eos_value(), "pad_token_id": self.pad_token_id, "torch_dtype": "float32"}
        if self.rope_type != "default":  # transformers < 5 reads the scaling from here
            out["rope_scaling"] = self._rope_scaling_hf()
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ValueError("LlamaForCausalLM has one attention_bias for q, k, v and o")
            out.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "qwen2":
            if not self.qkv_bias or self.o_bias or self.mlp_bias:
                raise ValueError("Qwen2ForCausalLM has biases on q, k, v only")
            # transformers slides Qwen2's layers from index max_window_layers on: 0 = every layer, as here
            out.update(use_sliding_window=bool(self.sliding_window), sliding_window=self.sliding_window or None,
                       max_window_layers=0 if self.sliding_window else self.num_hidden_layers)
        else:
            if self.qkv_bias or self.o_bias or self.mlp_bias:
                raise ValueError("MistralForCausalLM has no biases")
            out.update(sliding_window=self.sliding_window or None)
        return out

    @classmethod
    def read(cls, directory: str | Path) -> "DecoderConfig":
        """A checkpoint directory's config.json (read_config; ConfigError when it is missing)."""
        path = Path(directory) / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{path}: missing")
        return read_config(path)

    def write(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(self.to_hf(), indent=2) + "\n")
        generation = {"bos_token_id": self.bos_token_id, "eos_token_id": self._eos_value(),
                      "pad_token_id": self.pad_token_id, "do_sample": False}
        (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(generation, indent=2) + "\n")

    def replace(self, **changes) -> "DecoderConfig":
        return DecoderConfig(**{**asdict(self), **changes})

    def _rope_scaling_hf(self) -> dict:
        """The scaling in transformers' rope_parameters keys (rope_type first, then what that type reads)."""
        out = {"rope_type": self.rope_type}
        if self.rope_type != "default":
            out["factor"] = self.rope_factor
        if self.rope_type == "llama3":
            out.update(low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
                       original_max_position_embeddings=self.rope_original_max_position_embeddings)
        return out

    def _eos_value(self) -> int | list[int] | None:
        """eos_token_id as Hugging Face writes it: one id, or the list when there are several."""
        return list(self.eos_token_ids) if len(self.eos_token_ids) > 1 else self.eos_token_id


def _first(value):
    """eos_token_id may be a list (several end tokens): the first, for the fields that take one."""
    return value[0] if isinstance(value, list) and value else value


def _is_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _ids(value) -> tuple[int, ...]:
    """eos_token_id (one id, a list, or null) as a tuple of ids."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _rope_scaling(data: dict, rope: dict, where) -> dict:
    """The DecoderConfig rope_* fields from `rope_scaling` (older files; transformers prefers it when both are
    there) or `rope_parameters`; ConfigError naming the field for a type not served or a value that is not a
    number. llama3's original_max_position_embeddings defaults to max_position_embeddings, as in transformers."""
    name, params = ("rope_scaling", data["rope_scaling"]) if data.get("rope_scaling") else ("rope_parameters", rope)
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: {name}: {params!r} is not an object")
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{where}: {name}.rope_type: {kind!r} rope scaling is not implemented "
                          f"(served: {', '.join(ROPE_TYPES)})")
    out = {"rope_type": kind}

    def value(key: str, default=None):
        v = params.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{where}: {name}.{key}: must be a number, got {v!r}")
        return v

    if kind != "default":
        out["rope_factor"] = float(value("factor"))
    if kind == "llama3":
        original = value("original_max_position_embeddings", data.get("max_position_embeddings"))
        if not isinstance(original, int):
            raise ConfigError(f"{where}: {name}.original_max_position_embeddings: must be an integer, got "
                              f"{original!r}")
        out.update(rope_low_freq_factor=float(value("low_freq_factor")),
                   rope_high_freq_factor=float(value("high_freq_factor")),
                   rope_original_max_position_embeddings=original)
    return out


def _sliding_window(data: dict, arch: str, layers: int, where) -> int:
    """The window every layer slides over (0: none), by transformers' rules for the architecture: Llama has
    none; Mistral's is `sliding_window` on every layer (MISTRAL_SLIDING_WINDOW where the key is absent, none
    where it is null); Qwen2's is `sliding_window` with `use_sliding_window`, on the layers `layer_types` says
    "sliding_attention" or, without it, layers >= `max_window_layers` only. A window on some layers only is
    refused (ConfigError naming the field that says so). A window as long as the model's positions hides
    nothing: none."""
    window = _declared_window(data, arch, layers, where)
    positions = data.get("max_position_embeddings")
    return 0 if isinstance(positions, int) and window >= positions else window


def _declared_window(data: dict, arch: str, layers: int, where) -> int:
    if arch == "MistralForCausalLM":
        return data.get("sliding_window", MISTRAL_SLIDING_WINDOW) or 0
    if arch != "Qwen2ForCausalLM" or not data.get("use_sliding_window") or not data.get("sliding_window"):
        return 0
    types = data.get("layer_types")
    if types is not None:
        name, value, slides = "layer_types", types, [t == "sliding_attention" for t in types]
    else:
        value = data.get("max_window_layers", QWEN2_MAX_WINDOW_LAYERS)
        name, slides = "max_window_layers", [i >= value for i in range(layers)]
    if all(slides):
        return data["sliding_window"]
    if any(slides):
        raise ConfigError(f"{where}: {name}: {value!r} slides {sum(slides)} of {layers} layers; a sliding "
                          f"window on some layers only is not implemented (all or none)")
    return 0


def config_from_dict(data: dict, where: str | Path) -> DecoderConfig:
    """A Hugging Face config's contents; ConfigError (a ValueError) naming `where`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: not a JSON object")
    return DecoderConfig.from_hf(data, where)


def read_config(path: str | Path) -> DecoderConfig:
    """A config.json, with the end tokens of the generation_config.json beside it when there is one (as
    transformers' generate reads them: that file's eos_token_id, else config.json's)."""
    path = Path(path)
    cfg = config_from_dict(_read_json(path), path)
    generation = path.parent / GENERATION_CONFIG_FILE
    if generation.is_file():
        data = _read_json(generation)
        eos = data.get("eos_token_id") if isinstance(data, dict) else None
        if _ids(eos):
            if not all(_is_id(i) for i in _ids(eos)):
                raise ConfigError(f"{generation}: eos_token_id: {eos!r} is not a token id or a list of them")
            cfg = cfg.replace(eos_token_id=_first(eos), eos_token_ids=_ids(eos))
    return cfg


def _read_json(path: Path):
    try:
        return json.loads(path.read_bytes())  # JSON is UTF-8 (json detects UTF-16 and -32 too)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
