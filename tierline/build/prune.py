"""Structural pruning: a trained GPT becomes a smaller GPTConfig with weights really removed.

The device tier needs a model a fraction of the student's size. Rather than masking
weights (which saves nothing on disk or in compute), whole transformer blocks,
attention heads and FFN channels are cut out and the surviving rows/columns are
copied exactly into a fresh, smaller `GPT`. `GPTConfig` is uniform across layers, so
every kept block keeps the same number of heads and channels; *which* ones each
block keeps is decided by that block's own importance scores.

Importance is measured on a calibration batch with the training loss (completion
tokens only):

* layer: increase of calibration loss when the block is skipped (greedy: the block
  whose removal hurts least goes first, then the next one given that removal);
* head: mean norm over completion tokens of the head's contribution to the residual
  stream, ``||y_h @ W_proj[:, h]^T||`` (exact, not a bound);
* FFN channel: mean ``|gelu activation|`` times ``||W_out[:, j]||``.

The combination (layers, heads per layer, ffn width) is chosen by evaluating every
candidate that fits the parameter budget and keeping the one with the lowest
one-shot calibration loss. Embeddings, ``ln_f`` and ``lm_head`` are never touched.
"""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from typing import Iterable, Sequence

import torch
from torch.nn import functional as F

from tierline.build.train import encode_batch
from tierline_shared.models.gpt import GPT, GPTConfig
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.tasks.problems import Problem

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (input_ids, targets, loss_mask)

_CHUNK = 64  # calibration problems per forward pass: bounds activation memory


# ---------------------------------------------------------------- parameter counts


def fixed_params(cfg: GPTConfig) -> int:
    """Parameters pruning never removes: wte, wpe, ln_f, lm_head (no bias, untied)."""
    return cfg.num_params() - cfg.n_layer * cfg.block_params()


# ---------------------------------------------------------------- surgery


def build_pruned(
    model: GPT,
    layers: Sequence[int],
    heads: Sequence[Sequence[int]],
    channels: Sequence[Sequence[int]],
) -> GPT:
    """A new, smaller GPT holding exactly the kept blocks / heads / FFN channels of `model`.

    `layers` are original block indices (in the order they will run); `heads[i]` and
    `channels[i]` are the head and FFN-channel indices kept in `layers[i]`. Every
    kept layer must keep the same number of heads and channels (GPTConfig is uniform).
    """
    cfg = model.cfg
    layers = list(layers)
    if not layers:
        raise ValueError("at least one layer must be kept")
    if len(heads) != len(layers) or len(channels) != len(layers):
        raise ValueError(
            f"need one head list and one channel list per kept layer: "
            f"{len(layers)} layers, {len(heads)} head lists, {len(channels)} channel lists"
        )
    for j in layers:
        if not 0 <= j < cfg.n_layer:
            raise ValueError(f"layer index {j} out of range [0, {cfg.n_layer})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer indices repeat: {layers}")
    n_head, ffn = {len(h) for h in heads}, {len(c) for c in channels}
    if len(n_head) != 1 or len(ffn) != 1:
        raise ValueError(f"every kept layer must keep as many heads and channels: heads {n_head}, channels {ffn}")
    for hs, cs in zip(heads, channels):
        if len(set(hs)) != len(hs) or any(not 0 <= h < cfg.n_head for h in hs):
            raise ValueError(f"bad head indices {list(hs)} for n_head={cfg.n_head}")
        if len(set(cs)) != len(cs) or any(not 0 <= c < cfg.ffn_hidden for c in cs):
            raise ValueError(f"bad channel indices for ffn_hidden={cfg.ffn_hidden}")

    new_cfg = replace(cfg, n_layer=len(layers), n_head=n_head.pop(), ffn_hidden=ffn.pop())
    old = model.state_dict()
    new_state: dict[str, torch.Tensor] = {}
    for name in ("wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"):
        new_state[name] = old[name].clone()
    d = cfg.head_dim
    for i, (j, hs, cs) in enumerate(zip(layers, heads, channels)):
        src, dst = f"blocks.{j}.", f"blocks.{i}."
        dev = old[src + "attn.q.weight"].device
        rows = torch.tensor([h * d + t for h in hs for t in range(d)], dtype=torch.long, device=dev)
        ch = torch.tensor(list(cs), dtype=torch.long, device=dev)
        for ln in ("ln1", "ln2"):
            for p in ("weight", "bias"):
                new_state[f"{dst}{ln}.{p}"] = old[f"{src}{ln}.{p}"].clone()
        for lin in ("q", "k", "v"):
            new_state[f"{dst}attn.{lin}.weight"] = old[f"{src}attn.{lin}.weight"][rows].clone()
            new_state[f"{dst}attn.{lin}.bias"] = old[f"{src}attn.{lin}.bias"][rows].clone()
        new_state[f"{dst}attn.proj.weight"] = old[f"{src}attn.proj.weight"][:, rows].clone()
        new_state[f"{dst}attn.proj.bias"] = old[f"{src}attn.proj.bias"].clone()
        new_state[f"{dst}mlp.fc.weight"] = old[f"{src}mlp.fc.weight"][ch].clone()
        new_state[f"{dst}mlp.fc.bias"] = old[f"{src}mlp.fc.bias"][ch].clone()
        new_state[f"{dst}mlp.out.weight"] = old[f"{src}mlp.out.weight"][:, ch].clone()
        new_state[f"{dst}mlp.out.bias"] = old[f"{src}mlp.out.bias"].clone()

    ref = old["wte.weight"]
    new = GPT(new_cfg).to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(new_state, strict=True)
    new.train(model.training)
    return new


def _per_layer(keep: Sequence[int] | Sequence[Sequence[int]], n_layer: int, name: str) -> list[list[int]]:
    """Accept one index list for every layer, or one list per layer."""
    keep = list(keep)
    if keep and all(isinstance(k, int) for k in keep):
        return [list(keep) for _ in range(n_layer)]
    if len(keep) != n_layer:
        raise ValueError(f"{name}: need one index list per layer ({n_layer}), got {len(keep)}")
    return [list(k) for k in keep]


def prune_ffn(model: GPT, keep: Sequence[int] | Sequence[Sequence[int]]) -> GPT:
    """Only remove FFN channels: `keep` is the kept channel indices (shared, or one list per layer)."""
    cfg = model.cfg
    all_heads = [list(range(cfg.n_head))] * cfg.n_layer
    return build_pruned(model, range(cfg.n_layer), all_heads, _per_layer(keep, cfg.n_layer, "keep"))


def prune_heads(model: GPT, keep: Sequence[int] | Sequence[Sequence[int]]) -> GPT:
    """Only remove attention heads: `keep` is the kept head indices (shared, or one list per layer)."""
    cfg = model.cfg
    all_ch = [list(range(cfg.ffn_hidden))] * cfg.n_layer
    return build_pruned(model, range(cfg.n_layer), _per_layer(keep, cfg.n_layer, "keep"), all_ch)


def drop_layers(model: GPT, drop: Iterable[int]) -> GPT:
    """Only remove whole blocks (the residual stream simply skips them)."""
    cfg = model.cfg
    drop = set(drop)
    layers = [j for j in range(cfg.n_layer) if j not in drop]
    return build_pruned(
        model, layers, [list(range(cfg.n_head))] * len(layers), [list(range(cfg.ffn_hidden))] * len(layers)
    )


# ---------------------------------------------------------------- importance


def calib_batches(problems: Sequence[Problem], tok: TextTokenizer, block_size: int) -> list[Batch]:
    """Calibration problems encoded like training batches, in chunks to bound memory."""
    if not problems:
        raise ValueError("calib_problems is empty: importance needs a calibration batch")
    return [encode_batch(list(problems[i: i + _CHUNK]), tok, block_size) for i in range(0, len(problems), _CHUNK)]


@torch.no_grad()
def calib_loss(model: GPT, batches: Sequence[Batch], skip: Iterable[int] = ()) -> float:
    """Mean completion-token cross-entropy, optionally running with some blocks skipped."""
    skip = set(skip)
    dev = model.wte.weight.device
    total, count = 0.0, 0
    for x, y, m in batches:
        x, y, m = x.to(dev), y.to(dev), m.to(dev)
        T = x.shape[1]
        h = model.wte(x) + model.wpe(torch.arange(T, device=dev))
        for j, block in enumerate(model.blocks):
            if j not in skip:
                h, _ = block(h, None, None)
        logits = model.lm_head(model.ln_f(h))
        total += float(F.cross_entropy(logits[m].float(), y[m], reduction="sum"))
        count += int(m.sum())
    return total / max(count, 1)


@torch.no_grad()
def layer_drop_order(model: GPT, batches: Sequence[Batch]) -> tuple[list[dict], dict[int, float], float]:
    """Greedy order in which to drop blocks (least harmful first), each block's importance, baseline loss.

    Greedy rather than one-shot ranking because blocks interact: once one is gone the
    next cheapest may change. Each entry: layer, importance (loss increase when
    skipped alone), loss_after_drop (loss with it and every earlier entry skipped).
    The block that survives longest is never listed.
    """
    n = model.cfg.n_layer
    base = calib_loss(model, batches)
    alone = {j: calib_loss(model, batches, skip={j}) - base for j in range(n)}
    order: list[dict] = []
    dropped: set[int] = set()
    while len(dropped) < n - 1:
        trial = {j: calib_loss(model, batches, skip=dropped | {j}) for j in range(n) if j not in dropped}
        j = min(trial, key=lambda k: (trial[k], alone[k]))
        dropped.add(j)
        order.append({"layer": j, "importance": round(alone[j], 6), "loss_after_drop": round(trial[j], 6)})
    return order, alone, base


@torch.no_grad()
def unit_importance(
    model: GPT, batches: Sequence[Batch], skip: Iterable[int] = ()
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per kept block: head scores (n_head,) and FFN channel scores (ffn_hidden,).

    Measured with `skip` blocks already removed, so the scores reflect the residual
    stream the pruned model will really see.
    """
    cfg = model.cfg
    skip = set(skip)
    H, d = cfg.n_head, cfg.head_dim
    head_sum = {j: torch.zeros(H, dtype=torch.float64) for j in range(cfg.n_layer) if j not in skip}
    ch_sum = {j: torch.zeros(cfg.ffn_hidden, dtype=torch.float64) for j in head_sum}
    n_tok = 0
    current: dict[str, torch.Tensor] = {}

    def _grab(key: str):
        def hook(_mod, args):
            current[key] = args[0]
        return hook

    handles = []
    for j in head_sum:
        handles.append(model.blocks[j].attn.proj.register_forward_pre_hook(_grab(f"a{j}")))
        handles.append(model.blocks[j].mlp.out.register_forward_pre_hook(_grab(f"f{j}")))
    try:
        dev = model.wte.weight.device
        for x, y, m in batches:
            x, m = x.to(dev), m.to(dev)
            T = x.shape[1]
            h = model.wte(x) + model.wpe(torch.arange(T, device=dev))
            for j, block in enumerate(model.blocks):
                if j in skip:
                    continue
                h, _ = block(h, None, None)
                ya = current.pop(f"a{j}")[m].float()  # (N, H*d) head outputs before proj
                w = model.blocks[j].attn.proj.weight.float().view(cfg.n_embd, H, d)
                contrib = torch.einsum("nhd,ehd->nhe", ya.view(-1, H, d), w)  # each head's residual write
                head_sum[j] += contrib.norm(dim=-1).sum(0).double().cpu()
                act = current.pop(f"f{j}")[m].float()  # (N, ffn) gelu activations
                w_out = model.blocks[j].mlp.out.weight.float().norm(dim=0)  # (ffn,)
                ch_sum[j] += (act.abs().sum(0) * w_out).double().cpu()
            n_tok += int(m.sum())
    finally:
        for hd in handles:
            hd.remove()
    n_tok = max(n_tok, 1)
    return {j: s / n_tok for j, s in head_sum.items()}, {j: s / n_tok for j, s in ch_sum.items()}


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in original order (ties: lower index first)."""
    idx = torch.argsort(-scores, stable=True)[:k]
    return sorted(int(i) for i in idx)


# ---------------------------------------------------------------- the search


def prune(
    model: GPT,
    tok: TextTokenizer,
    target_ratio: float,
    calib_problems: list[Problem],
    keep_layers: int | None = None,
) -> tuple[GPT, dict]:
    """A new GPT with at most `target_ratio` of `model`'s parameters, and a report.

    Every (kept layers, heads per layer) combination is tried with the widest FFN
    that still fits; the one with the lowest calibration loss wins (ties: more
    parameters). `keep_layers` fixes the number of blocks kept. `model` is not modified.
    """
    cfg = model.cfg
    if not (isinstance(target_ratio, (int, float)) and 0.0 < target_ratio < 1.0):
        raise ValueError(f"target_ratio must be in (0, 1) to get a strictly smaller model, got {target_ratio!r}")
    if keep_layers is not None and not (isinstance(keep_layers, int) and 1 <= keep_layers <= cfg.n_layer):
        raise ValueError(f"keep_layers must be an int in [1, {cfg.n_layer}], got {keep_layers!r}")
    before = model.num_params()
    if cfg.num_params() != before:
        raise ValueError(f"model has {before} parameters but its config implies {cfg.num_params()}: "
                         "pruning only knows the standard GPT layout")
    budget = math.floor(target_ratio * before)
    fixed = fixed_params(cfg)
    min_layers = keep_layers or 1
    smallest = fixed + min_layers * cfg.block_params(1, 1)
    if smallest > budget:
        raise ValueError(
            f"target_ratio {target_ratio} is unreachable: embeddings, ln_f and lm_head alone are "
            f"{fixed} of {before} parameters ({fixed / before:.3f}) and the smallest model with {min_layers} "
            f"block(s) of 1 head and 1 FFN channel has {smallest} ({smallest / before:.3f}); "
            f"pruning never removes embeddings"
        )

    was_training = model.training
    model.eval()
    try:
        batches = calib_batches(calib_problems, tok, cfg.block_size)
        order, alone, base_loss = layer_drop_order(model, batches)
        per_head = cfg.block_params(1, 0) - cfg.block_params(0, 0)
        per_ch = cfg.block_params(0, 1) - cfg.block_params(0, 0)
        layer_counts = [keep_layers] if keep_layers else range(cfg.n_layer, 0, -1)
        candidates: list[dict] = []
        best: tuple | None = None
        for L in layer_counts:
            dropped = [o["layer"] for o in order[: cfg.n_layer - L]]
            kept = [j for j in range(cfg.n_layer) if j not in dropped]
            per_layer = (budget - fixed) // L - cfg.block_params(0, 0)
            if per_layer < per_head + per_ch:
                continue
            head_s, ch_s = unit_importance(model, batches, skip=dropped)
            for H in range(cfg.n_head, 0, -1):
                Fw = min(cfg.ffn_hidden, (per_layer - H * per_head) // per_ch)
                if Fw < 1:
                    continue
                heads = [_top(head_s[j], H) for j in kept]
                chans = [_top(ch_s[j], Fw) for j in kept]
                small = build_pruned(model, kept, heads, chans)
                small.eval()
                loss = calib_loss(small, batches)
                n = small.num_params()
                candidates.append({"n_layer": L, "n_head": H, "ffn_hidden": Fw, "params": n,
                                   "calib_loss": round(loss, 6)})
                key = (loss, -n)
                if best is None or key < best[0]:
                    best = (key, small, kept, dropped, heads, chans, head_s, ch_s)
        if best is None:  # only reachable with keep_layers, guarded above; kept for safety
            raise ValueError(f"no configuration fits {budget} parameters")
    finally:
        model.train(was_training)

    (loss, _), new, kept, dropped, heads, chans, head_s, ch_s = best
    after = new.num_params()
    if after > target_ratio * before or after >= before:
        raise AssertionError(f"internal error: pruned model has {after} params, budget {budget}")
    new.train(was_training)
    report = {
        "params_before": before,
        "params_after": after,
        "ratio": round(after / before, 6),
        "target_ratio": target_ratio,
        "config_before": asdict(cfg),
        "config_after": asdict(new.cfg),
        "calib_loss_before": round(base_loss, 6),
        "calib_loss_after": round(loss, 6),
        "layers_kept": kept,
        "layers_dropped": [o for o in order if o["layer"] in dropped],
        "layer_importance": {j: round(v, 6) for j, v in alone.items()},  # loss increase if skipped alone
        "heads_kept": {j: h for j, h in zip(kept, heads)},
        "head_importance": {j: [round(float(s), 6) for s in head_s[j]] for j in kept},
        "ffn_kept": {j: c for j, c in zip(kept, chans)},
        "ffn_hidden_kept": new.cfg.ffn_hidden,
        "candidates": candidates,
    }
    return new, report
