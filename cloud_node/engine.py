"""The cloud backend: the full-precision PyTorch model.

The KV cache is the model's own list of (key, value) tensors of shape (B, kv_heads, P, hd); the model is a
Llama-family decoder in Hugging Face's format.
`_past_take` / `_past_join` slice and left-pad it for the base engine's prefix cache.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tierline_shared.config.manifest import ManifestError
from tierline_shared.models.artifacts import TierFiles, load_with
from tierline_shared.models.llama import Decoder, load_decoder, weight_files
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.runtime.engine import Engine, EngineInfo, Past, check_vocab


class TorchEngine(Engine):
    supports_prefix_cache = True
    supports_draft = True

    def __init__(self, model: Decoder, tokenizer: TextTokenizer, info: EngineInfo, device: str = "cpu",
                 threads: int | None = None):
        super().__init__(tokenizer, info, model.cfg.eos_token_ids)  # the checkpoint's end tokens stop it too
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()

    @classmethod
    def load(cls, directory: str | Path, tokenizer: TextTokenizer, tier: str = "cloud",
             model_name: str = "tierline", version: str = "0", device: str = "cpu",
             threads: int | None = None) -> "TorchEngine":
        directory = Path(directory)
        model = load_decoder(directory)
        check_vocab(model.cfg.vocab_size, tokenizer, directory)
        size = sum(f.stat().st_size for f in weight_files(directory))
        info = EngineInfo(tier, model_name, version, model.num_params(), size,
                          model.cfg.context, model.cfg.window_limit)
        return cls(model, tokenizer, info, device, threads)

    @torch.inference_mode()
    def _forward(self, input_ids, attention_mask, position_ids, past, last: int = 1):
        d = self.device
        logits, present = self.model(
            torch.from_numpy(input_ids).to(d),
            torch.from_numpy(attention_mask).to(d),
            torch.from_numpy(position_ids).to(d),
            past,
        )
        return logits[:, -last:, :].float().cpu().numpy(), present

    def _trim_past(self, past: Past, keep: int) -> Past:
        return [(k[:, :, k.shape[2] - keep:], v[:, :, v.shape[2] - keep:]) for k, v in past]  # keep 0: none

    @torch.inference_mode()
    def _past_take(self, past: Past, row: int, cols) -> Past:
        # clones: a view would keep the whole batch's cache alive in the prefix cache
        idx = cols if isinstance(cols, slice) else torch.as_tensor(cols, device=self.device)
        return [(k[row:row + 1, :, idx].clone(), v[row:row + 1, :, idx].clone()) for k, v in past]

    @torch.inference_mode()
    def _past_join(self, parts, width: int) -> Past:
        def pad(t: torch.Tensor, rows, start: int) -> torch.Tensor:
            t = t[:, :, start:] if rows is None else t[torch.as_tensor(rows, device=self.device), :, start:]
            return torch.nn.functional.pad(t, (0, 0, width - t.shape[2], 0))  # zeros on the left of positions

        return [(torch.cat([pad(p[i][0], rows, start) for p, rows, start in parts]),
                 torch.cat([pad(p[i][1], rows, start) for p, rows, start in parts]))
                for i in range(len(parts[0][0]))]

    @torch.inference_mode()
    def _past_put(self, past: Past, slot: int, src: Past, row: int, start: int, n: int) -> None:
        super()._past_put(past, slot, src, row, start, n)  # the model's tensors change only in inference mode

    @torch.inference_mode()
    def _past_rows(self, past: Past, rows, start: int) -> Past:
        idx = torch.as_tensor(rows, device=self.device)
        return [(k[idx, :, start:], v[idx, :, start:]) for k, v in past]


def torch_device(accelerator: str) -> str:
    """The torch device for tiers.cloud.accelerator: "cpu", "cuda" (ValueError when torch sees none), or "auto"."""
    if accelerator == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if accelerator == "auto":
        return "cpu"
    raise ValueError(f"{accelerator!r}, but torch sees no CUDA device here (use 'auto' to fall back to the CPU)")


FORMATS = ("safetensors",)


def load_on(models_dir: str | Path, threads: int | None, accelerator: str,
            where: str = "tiers.cloud.accelerator") -> TorchEngine:
    """The cloud model where tiers.cloud.accelerator says (ManifestError naming `where` when there is no such
    device): what the tier's engine core calls, so that the tier's own process never imports torch."""
    try:
        device = torch_device(accelerator)
    except ValueError as exc:
        raise ManifestError(f"{where}: {exc}") from None
    return load_engine(models_dir, threads=threads, device=device)


def load_engine(models_dir: str | Path, tier: str = "cloud", threads: int | None = None,
                device: str = "cpu") -> TorchEngine:
    """The cloud model of a models directory, every file sha256-checked first (ArtifactError otherwise)."""
    def backend(f: TierFiles) -> TorchEngine:
        return TorchEngine.load(f.weights.parent, f.tokenizer, f.tier, f.model_name, f.version, device=device,
                                threads=threads)

    return load_with(models_dir, tier, FORMATS, backend)
