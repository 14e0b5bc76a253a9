"""How `tierline models import` scales: `tierline bench --import-scaling` (docs/IMPORT.md).

Random Llama checkpoints of about 10M and 50M parameters, built by transformers itself with the shapes of
small real models (tied embeddings, grouped-query attention, SwiGLU about 2.7x the width) and a byte-level
BPE tokenizer, are imported one after the other, each in its own process; the import's report gives its
wall time per stage and its peak resident memory (getrusage), next to the checkpoint's size.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> LlamaConfig fields (the parameter count is the model's own, reported as measured)
SIZES = {
    "10M": dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=10,
                num_attention_heads=4, num_key_value_heads=2),
    "50M": dict(vocab_size=16384, hidden_size=512, intermediate_size=1376, num_hidden_layers=14,
                num_attention_heads=8, num_key_value_heads=4),
}


def make_checkpoint(directory: Path, shape: dict, seed: int = 0) -> int:
    """A random LlamaForCausalLM of `shape` saved with its tokenizer; returns its parameter count."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from tierline_shared.tasks.problems import generate

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.text for p in generate("train", 2000, seed)], trainer)
    tok.post_processor = processors.TemplateProcessing(  # Llama's: BOS first
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                  unk_token="<unk>")
    # as many tokens as the model has rows (a real tokenizer's size; the merges learnt here are few)
    hf_tok.add_tokens([f"<extra_{i}>" for i in range(shape["vocab_size"] - len(hf_tok))])
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=True,
                                   bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="50MB")
    hf_tok.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def import_scaling(sizes=tuple(SIZES), threads: int = 2, log=print) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="tierline-import-") as tmp:
        for name in sizes:
            src, out = Path(tmp) / f"llama-{name}", Path(tmp) / f"models-{name}"
            params = make_checkpoint(src, SIZES[name])
            size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            log(f"import {name}: {params:,} parameters, {size / 2**20:.1f} MiB of safetensors")
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "tierline", "models", "import", str(src), "--out", str(out),
                                   "--threads", str(threads)], capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"import {name} failed: {proc.stderr[-2000:]}")
            report = json.loads((out / "report.json").read_text())
            results[name] = {"params": params, "checkpoint_mib": round(size / 2**20, 1),
                             "wall_s": round(time.perf_counter() - t0, 1), "import_s": report["import_seconds"],
                             "peak_rss_mib": report["peak_rss_mib"], "stages_s": report["timings"],
                             "device_params": report["params"]["device"],
                             "quality_vs_cloud": report["quality_vs_cloud"]}
            log(json.dumps(results[name]))
    return results
