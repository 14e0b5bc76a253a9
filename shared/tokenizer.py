"""The character-level tokenizer all tiers share, in Hugging Face `tokenizers` JSON.

Characters keep arithmetic learnable for small models: every digit is a token.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# Every character the benchmark can produce, plus common punctuation for clients.
ALPHABET = (
    "0123456789"
    "abcdefghijklmnopqrstuvwxyz"
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    " \n+-*/=?;:.,#()<>!'\"%&_[]"
)


def build_tokenizer(alphabet: str = ALPHABET) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return tok


class CharTokenizer:
    """Thin wrapper with the ids the engines need."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self.pad_id = tok.token_to_id(PAD)
        self.bos_id = tok.token_to_id(BOS)
        self.eos_id = tok.token_to_id(EOS)
        self.unk_id = tok.token_to_id(UNK)
        if None in (self.pad_id, self.bos_id, self.eos_id, self.unk_id):
            raise ValueError(f"tokenizer lacks one of the special tokens {SPECIALS}")
        self.vocab_size = tok.get_vocab_size()

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        path = Path(path)
        try:
            return cls(Tokenizer.from_file(str(path)))
        except FileNotFoundError:
            raise
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{path}: not a valid tokenizer file ({exc})") from exc

    @classmethod
    def default(cls) -> "CharTokenizer":
        return cls(build_tokenizer())

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(json.loads(self._tok.to_str()), indent=1))

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def unknown_count(self, text: str) -> int:
        return sum(1 for i in self.encode(text, bos=False) if i == self.unk_id)
