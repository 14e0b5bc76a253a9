"""Text for models the project did not build: the user's corpus (`--corpus FILE`) or a small built-in one.

`tierline models import` calibrates int8 activation scales, ranks what pruning removes and (with a corpus)
fine-tunes the pruned model on plain text instead of the benchmark's problems. A corpus is a `.txt` file
(paragraphs split at blank lines) or a `.jsonl` file (one object per line with a `text` field, or `prompt`
and an optional `completion`). Every text becomes training rows of at most `max_len` tokens (longer ones
are cut into consecutive windows), batched like tierline.build.train's batches: (input_ids, targets, mask).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from tierline_shared.models.tokenizer import TextTokenizer

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

# Without a corpus: generic text in several registers, enough to set int8 scales and rank what pruning
# removes. It says nothing about the user's domain: the import says so and reports the device's agreement
# with the full model on it.
BUILTIN_TEXTS = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "Question: What is the capital of France?\nAnswer: The capital of France is Paris.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "In 1969, Apollo 11 landed on the Moon. Neil Armstrong and Buzz Aldrin walked on its surface.",
    "To make tea, boil water, pour it over the leaves, wait three minutes and remove the leaves.",
    "The invoice total is 1,240.50 EUR, due within 30 days of the date of issue.",
    "User: Can you summarise this paragraph?\nAssistant: Sure. It explains how the cache works.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen in plant cells.",
    "SELECT name, count(*) FROM orders WHERE status = 'open' GROUP BY name ORDER BY 2 DESC;",
    "Il pleut depuis ce matin, mais nous irons quand même au marché cet après-midi.",
    "1, 2, 3, 5, 8, 13, 21, 34: each number is the sum of the two before it.",
    "Dear team, the release is planned for Friday. Please finish your reviews by Thursday noon.",
    "The router sends easy requests to the device and hard ones to the cloud.",
    "A list: apples, pears, plums, cherries, grapes, lemons, oranges and figs.",
    "Warning: the battery is low. Connect the charger to continue working.",
    "She opened the door slowly, listened for a moment, and stepped into the dark hall.",
)


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file (and line)."""


def read_corpus(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"--corpus: {path}: not found")
    texts: list[str] = []
    if path.suffix == ".jsonl":
        for n, row in jsonl_rows(path, "--corpus"):
            text = row.get("text") if isinstance(row, dict) else None
            if text is None and isinstance(row, dict) and isinstance(row.get("prompt"), str):
                text = row["prompt"] + (row.get("completion") or "")
            if not isinstance(text, str):
                raise CorpusError(f"--corpus: {path}:{n}: needs a string 'text' (or 'prompt') field")
            texts.append(text)
    else:
        texts = [p.strip() for p in path.read_text(encoding="utf-8", errors="replace").split("\n\n")]
    texts = [t for t in texts if t.strip()]
    if len(texts) < 2:
        raise CorpusError(f"--corpus: {path}: needs at least 2 texts (one is held out to measure quality)")
    return texts


def jsonl_rows(path: Path, flag: str):
    """(line number, parsed object) of each non-blank line; CorpusError naming the flag, file and line."""
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{flag}: {path}:{n}: not valid JSON ({exc.msg})") from None


def split(texts: Sequence[str], held_out: int = 5) -> tuple[list[str], list[str]]:
    """(calibration/training texts, held-out texts): every `held_out`-th text is held out (at least one)."""
    test = [t for i, t in enumerate(texts) if i % held_out == held_out - 1] or [texts[-1]]
    train = [t for t in texts if t not in test] or list(texts)
    return train, test


def rows(texts: Sequence[str], tok: TextTokenizer, max_len: int) -> list[list[int]]:
    """Each text's tokens (BOS first, as served), cut into windows of at most max_len + 1 tokens."""
    out = []
    for text in texts:
        ids = tok.encode(text) + [tok.eos_id]
        for start in range(0, max(len(ids) - 1, 1), max_len):
            window = ids[start: start + max_len + 1]
            if len(window) >= 2:
                out.append(window)
    return out


def batches(texts: Sequence[str], tok: TextTokenizer, max_len: int = 128, batch_rows: int = 16) -> list[Batch]:
    """Right-padded (input_ids, targets, loss_mask) batches over every token of the texts."""
    all_rows = sorted(rows(texts, tok, max_len), key=len, reverse=True)
    out = []
    for i in range(0, len(all_rows), batch_rows):
        chunk = all_rows[i: i + batch_rows]
        T = len(chunk[0]) - 1
        x = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        y = torch.full((len(chunk), T), tok.pad_id, dtype=torch.long)
        m = torch.zeros((len(chunk), T), dtype=torch.bool)
        for r, ids in enumerate(chunk):
            n = len(ids) - 1
            x[r, :n], y[r, :n], m[r, :n] = torch.tensor(ids[:-1]), torch.tensor(ids[1:]), True
        out.append((x, y, m))
    return out


def prompts(texts: Sequence[str], tok: TextTokenizer, max_tokens: int = 32) -> list[str]:
    """The opening of each text (about half of it, at most max_tokens tokens): prompts to continue."""
    out = []
    for text in texts:
        ids = tok.encode(text, bos=False)
        keep = max(1, min(max_tokens, len(ids) // 2))
        out.append(tok.decode(ids[:keep]))
    return [p for p in out if p.strip()]
