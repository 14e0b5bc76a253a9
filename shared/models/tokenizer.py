"""The tokenizer all tiers share, in Hugging Face `tokenizers` JSON.

Numbers from 0 to 99 are one token each, so every worked step of the benchmark
(`12+7=19`, `max(28,20)=28`) is a fact about whole tokens and copying a number
is copying one token. The benchmark's words are one token each, with and without
their leading space, and so are a variable's fact key and read (`p:`, `p?`).
Everything else falls back to single characters, so any text is encoded without
loss (characters outside the alphabet become `<unk>`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

ENCODE_CACHE = 256  # texts whose ids a tokenizer remembers

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"  # older checkpoints' special tokens (transformers still reads it)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# the family's special tokens as tokenizer_config.json and a chat template name them
FAMILY_SPECIALS = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
SPECIALS = (PAD, BOS, EOS, UNK)
# Every character the benchmark can produce, plus common punctuation for clients.
ALPHABET = (
    "0123456789"
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    " \n+-*/=?;:.,#()<>!'\"%&_[]"
)


# Whole-word tokens: the words the benchmark's prompts are made of (see shared/problems.py).
WORDS = (
    "Tom", "Ann", "Bob", "Eva", "Max", "Sue", "Leo", "Mia",
    "apples", "pens", "cards", "coins", "books", "eggs",
    "has", "gets", "gives", "How", "many", "max", "min",
)
# A variable's value is stored as a fact `r:16` and read back as `r?16`, each key one token:
# writing `r:` always copies the number just written, reading `r?` always looks up the
# earlier `r:` (or `r?`) and copies what follows it, so the two never look alike.
LETTERS = "abcdefghijklmnopqrstuvwxyz"
FACT_KEYS = tuple(f"{c}:" for c in LETTERS)
FACT_QUERIES = tuple(f"{c}?" for c in LETTERS)
NUMBERS = tuple(str(n) for n in range(100))  # what `[1-9]\d|\d` can match
# The family's conversation format, as a Hugging Face chat template: each user turn `Q:<text>\nA:` (as the
# benchmark's prompts), each answer after it on its own line; system turns are dropped (no system prompt).
# A user turn already in that format is kept as it is. It starts with the BOS it wants, as Llama's templates
# (transformers' apply_chat_template gives one BOS; the router leaves it to the tiers' tokenizer: router/chat.py).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'user' %}{% set q = m['content'] | trim %}"
    "{% if q.startswith('Q:') and q.endswith('\nA:') %}{{ q }}{% else %}Q:{{ q }}\nA:{% endif %}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}\n{% endif %}"
    "{% endfor %}"
)


def build_tokenizer(alphabet: str = ALPHABET, words: tuple[str, ...] = WORDS, numbers: bool = True,
                    fact_keys: bool = True) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    pieces = list(alphabet)
    if numbers:
        pieces += NUMBERS
    if fact_keys:
        pieces += FACT_KEYS + FACT_QUERIES
    for w in words:
        pieces += [w, " " + w]
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    # a word only when no letter follows (`Tomato` stays characters), numbers of up to two digits
    # (`123` is `12`, `3`; `05` is `0`, `5`), every other character on its own
    alternatives = []
    if words:
        alternatives.append(r" ?(?:" + "|".join(sorted(words, key=len, reverse=True)) + r")(?![A-Za-z])")
    if numbers:
        alternatives.append(r"[1-9]\d|\d")
    if fact_keys:
        alternatives.append(r"[a-z][:?]")
    alternatives.append(r"[\s\S]")
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("|".join(alternatives)), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, {"content": ...} (AddedToken) or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def read_tokenizer_config(path: Path) -> dict:
    """A tokenizer_config.json's contents; ValueError naming the file when it is not a JSON object."""
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a JSON object")
    return config


def read_checkpoint_specials(directory: Path) -> tuple[dict, dict[str, Path]]:
    """A checkpoint's tokenizer_config.json as transformers' AutoTokenizer reads it, and the file each key came from:
    special_tokens_map.json's keys (where older checkpoints keep the special tokens) over the config's, unless the
    config has `added_tokens_decoder` (then transformers does not read the map); ({}, {}) with neither file.
    ValueError naming the file when one is not a JSON object."""
    config_file, map_file = directory / TOKENIZER_CONFIG_FILE, directory / SPECIAL_TOKENS_MAP_FILE
    config = read_tokenizer_config(config_file) if config_file.is_file() else {}
    origin = dict.fromkeys(config, config_file)
    if map_file.is_file() and "added_tokens_decoder" not in config:
        tokens = read_tokenizer_config(map_file)
        config = {**config, **tokens}
        origin.update(dict.fromkeys(tokens, map_file))
    return config, origin


def special_tokens(config: dict) -> dict[str, str]:
    """The special tokens a tokenizer_config.json names (bos_token, eos_token, pad_token, unk_token), as text: what
    transformers gives a chat template (its special_tokens_map)."""
    names = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return {k: v for k, v in names.items() if v is not None}


class TextTokenizer:
    """Thin wrapper with the ids the engines need.

    Any Hugging Face `tokenizer.json` works: the special tokens are the family's (`<pad>`, `<bos>`, `<eos>`,
    `<unk>`) unless a tokenizer_config.json names others (`Tokenizer.load` reads the one beside the file).
    A tokenizer without a BOS token (Qwen2) or with `add_bos_token: false` starts prompts with none; one
    without a pad token pads with EOS (padding is always masked); one without `<unk>` encodes everything.
    """

    def __init__(self, tok: Tokenizer, specials: dict | None = None, where: str = "tokenizer"):
        self._tok = tok
        # a served prompt is encoded where it is validated and again where it is scheduled: remember the last few
        self._encoded = functools.lru_cache(maxsize=ENCODE_CACHE)(self._encode)
        names = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
        if specials is not None:
            names = {k: _token_text(specials.get(k)) for k in names}

        def token_id(field: str) -> int | None:
            if names[field] is None:
                return None
            i = tok.token_to_id(names[field])
            if i is None:
                raise ValueError(f"{where}: {field} {names[field]!r} is not in the vocabulary")
            return i

        self.eos_id = token_id("eos_token")
        if self.eos_id is None:
            raise ValueError(f"{where}: eos_token: missing (generation stops at it)")
        self.bos_id, self.unk_id = token_id("bos_token"), token_id("unk_token")
        self.pad_id = token_id("pad_token")
        self.pad_id = self.eos_id if self.pad_id is None else self.pad_id
        if specials is None:  # the family's own: prompts start with <bos>
            add_bos = True
        elif "add_bos_token" in specials:  # the config says
            add_bos = bool(specials["add_bos_token"])
        else:  # as transformers encodes: whatever the tokenizer's post-processor puts first
            add_bos = tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]
        self.add_bos = add_bos and self.bos_id is not None
        self.specials = {k: v for k, v in names.items() if v is not None}
        self.vocab_size = tok.get_vocab_size()

    def __getstate__(self) -> dict:  # pickled (to a tier's engine core and back): the encode cache stays behind
        return {k: v for k, v in self.__dict__.items() if k != "_encoded"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._encoded = functools.lru_cache(maxsize=ENCODE_CACHE)(self._encode)

    @classmethod
    def load(cls, path: str | Path, config: str | Path | None = None, beside: bool = True,
             specials: dict | None = None) -> "TextTokenizer":
        """A tokenizer.json; its special tokens from `config` (a tokenizer_config.json), else (`beside`) from
        the tokenizer_config.json beside it if there is one, else `specials` (tokenizer_config.json's keys), else
        the family's."""
        path = Path(path)
        try:
            tok = Tokenizer.from_file(str(path))
        except FileNotFoundError:
            raise
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizer file ({exc})") from exc
        config = Path(config) if config else (path.parent / TOKENIZER_CONFIG_FILE if beside else None)
        if config is not None and config.is_file():
            return cls(tok, read_tokenizer_config(config), str(config))
        return cls(tok, specials, str(path))

    @classmethod
    def default(cls) -> "TextTokenizer":
        return cls(build_tokenizer())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(json.loads(self._tok.to_str()), indent=1))

    def save_pretrained(self, directory: str | Path, model_max_length: int = 256) -> None:
        """tokenizer.json and tokenizer_config.json as Hugging Face writes them, so `AutoTokenizer.from_pretrained`
        loads this tokenizer (a PreTrainedTokenizerFast) with its special tokens and the chat template."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # as Llama's tokenizer.json: the post-processor starts every text with <bos>, so transformers (and
        # servers built on it, `transformers serve`) encode a prompt exactly as the tiers do
        tok = Tokenizer.from_str(self._tok.to_str())
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, self.bos_id)])
        (directory / "tokenizer.json").write_text(json.dumps(json.loads(tok.to_str()), indent=1))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **FAMILY_SPECIALS, "add_bos_token": True,
                  "model_max_length": model_max_length,
                  "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return list(self._encoded(text, bos))

    def _encode(self, text: str, bos: bool) -> tuple[int, ...]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return (self.bos_id, *ids) if bos and self.add_bos else tuple(ids)

    def decode(self, ids) -> str:
        """The text of `ids`: a list as it is (the runner's are ints, and `tokenizers` takes numpy's too), any
        other iterable (an array, a tensor) as a list of ints."""
        return self._tok.decode(ids if isinstance(ids, list) else [int(i) for i in ids], skip_special_tokens=True)

    def number_ids(self) -> dict[int, int]:
        """Token id -> the number it spells, for every number token (`"7"`, `"07"`, `"42"`)."""
        out = {}
        for piece, i in self._tok.get_vocab().items():
            if piece.isascii() and piece.isdigit() and len(piece) <= 2:
                out[i] = int(piece)
        return out

    def shared_parts(self) -> dict[int, tuple[str, ...]]:
        """Token id -> the parts it shares with other tokens, for tokens that share any.

        A number shares its tens and its units digit (`tens:4`, `units:2` for `42`); a
        variable letter, its fact key and its read share the letter (`letter:p` for `p`,
        `p:` and `p?`); a word shares itself with its spaced form (`word:Tom` for `Tom`
        and ` Tom`). Training ties these parts (`TokenFactors`), so what is learnt
        about one form is learnt about the others.
        """
        out: dict[int, tuple[str, ...]] = {}
        for i, n in self.number_ids().items():
            out[i] = (f"tens:{n // 10}", f"units:{n % 10}")
        for piece, i in self._tok.get_vocab().items():
            if len(piece) in (1, 2) and piece[0] in LETTERS and piece[1:] in ("", ":", "?"):
                out[i] = (f"letter:{piece[0]}",)
            elif piece.strip() in WORDS:
                out[i] = (f"word:{piece.strip()}",)
        return out

    def unknown_count(self, text: str) -> int:
        if self.unk_id is None:  # a byte-level tokenizer encodes everything
            return 0
        # the encoding the engine uses (validation and scheduling share one encode), less its <bos>
        ids = self._encoded(text, True)
        return ids[1 if self.add_bos else 0:].count(self.unk_id)
