"""Structural pruning: a trained Llama-family decoder becomes a smaller config with weights really removed.

The device tier needs a model a fraction of the student's size. Rather than masking
weights (which saves nothing on disk or in compute), whole decoder layers, key/value
head groups and MLP channels are cut out and the surviving rows/columns are copied
exactly into a fresh, smaller `Decoder`. The config is uniform across layers, so
every kept layer keeps the same number of groups and channels; *which* ones each
layer keeps is decided by that layer's own importance scores.

A group is one key/value head and the query heads that read it (grouped-query
attention: num_attention_heads / num_key_value_heads of them); removing a group
removes its rows of k_proj and v_proj, its query heads' rows of q_proj and their
columns of o_proj, so the head ratio, and the checkpoint's format, stay as they were.

Importance is measured on a calibration batch with the training loss (completion
tokens only):

* layer: increase of calibration loss when the layer is skipped (greedy: the layer
  whose removal hurts least goes first, then the next one given that removal);
* group: mean norm over completion tokens of its query heads' contribution to the
  residual stream, ``||y_h @ W_o[:, h]^T||`` summed over the group (exact, not a bound);
* MLP channel: mean ``|silu(gate) * up|`` times ``||W_down[:, j]||``.

The combination (layers, groups per layer, MLP width) is chosen by evaluating every
candidate that fits the parameter budget and keeping the one with the lowest
one-shot calibration loss. Embeddings, the final norm and lm_head are never touched.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch
from torch.nn import functional as F

from tierline.build.train import encode_batch
from tierline_shared.models.configs import DecoderConfig
from tierline_shared.models.llama import Decoder, rotary
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.tasks.problems import Problem

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (input_ids, targets, loss_mask)

_CHUNK = 64  # calibration problems per forward pass: bounds activation memory


def fixed_params(cfg: DecoderConfig) -> int:
    """Parameters pruning never removes: the embeddings, the final norm, lm_head."""
    return cfg.num_params() - cfg.num_hidden_layers * cfg.layer_params()


def check_reachable(cfg: DecoderConfig, target_ratio: float, min_layers: int = 1) -> None:
    """ValueError unless some pruned model of `cfg` fits target_ratio of its parameters."""
    before, fixed = cfg.num_params(), fixed_params(cfg)
    smallest = fixed + min_layers * cfg.layer_params(1, 1)
    if smallest > math.floor(target_ratio * before):
        raise ValueError(
            f"target_ratio {target_ratio} is unreachable: the embeddings, the final norm and lm_head alone are "
            f"{fixed} of {before} parameters ({fixed / before:.3f}) and the smallest model with {min_layers} "
            f"layer(s) of 1 key/value group and 1 MLP channel has {smallest} ({smallest / before:.3f}); "
            f"pruning never removes embeddings")


# ---------------------------------------------------------------- surgery


def build_pruned(
    model: Decoder,
    layers: Sequence[int],
    groups: Sequence[Sequence[int]],
    channels: Sequence[Sequence[int]],
) -> Decoder:
    """A new, smaller Decoder holding exactly the kept layers / KV-head groups / MLP channels of `model`.

    `layers` are original layer indices (in the order they will run); `groups[i]` and
    `channels[i]` are the key/value head and MLP-channel indices kept in `layers[i]`. Every
    kept layer must keep as many groups and channels (the config is uniform).
    """
    cfg = model.cfg
    layers = list(layers)
    if not layers:
        raise ValueError("at least one layer must be kept")
    if len(groups) != len(layers) or len(channels) != len(layers):
        raise ValueError(f"need one group list and one channel list per kept layer: {len(layers)} layers, "
                         f"{len(groups)} group lists, {len(channels)} channel lists")
    for j in layers:
        if not 0 <= j < cfg.num_hidden_layers:
            raise ValueError(f"layer index {j} out of range [0, {cfg.num_hidden_layers})")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer indices repeat: {layers}")
    n_groups, width = {len(g) for g in groups}, {len(c) for c in channels}
    if len(n_groups) != 1 or len(width) != 1:
        raise ValueError(f"every kept layer must keep as many groups and channels: groups {n_groups}, "
                         f"channels {width}")
    for gs, cs in zip(groups, channels):
        if len(set(gs)) != len(gs) or any(not 0 <= g < cfg.num_key_value_heads for g in gs):
            raise ValueError(f"bad group indices {list(gs)} for num_key_value_heads={cfg.num_key_value_heads}")
        if len(set(cs)) != len(cs) or any(not 0 <= c < cfg.intermediate_size for c in cs):
            raise ValueError(f"bad channel indices for intermediate_size={cfg.intermediate_size}")

    per = cfg.num_attention_heads // cfg.num_key_value_heads  # query heads per group
    kv = n_groups.pop()
    new_cfg = cfg.replace(num_hidden_layers=len(layers), num_key_value_heads=kv, num_attention_heads=kv * per,
                          intermediate_size=width.pop())
    old = model.state_dict()
    new_state = {k: v.clone() for k, v in old.items() if not k.startswith("model.layers.")}
    d = cfg.head_dim
    for i, (j, gs, cs) in enumerate(zip(layers, groups, channels)):
        src, dst = f"model.layers.{j}.", f"model.layers.{i}."
        dev = old[src + "self_attn.q_proj.weight"].device
        kv_rows = torch.tensor([g * d + t for g in gs for t in range(d)], dtype=torch.long, device=dev)
        q_rows = torch.tensor([(g * per + h) * d + t for g in gs for h in range(per) for t in range(d)],
                              dtype=torch.long, device=dev)
        ch = torch.tensor(list(cs), dtype=torch.long, device=dev)
        picks = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
                 "mlp.gate_proj": ch, "mlp.up_proj": ch}
        for name, value in old.items():
            if not name.startswith(src):
                continue
            part = name[len(src):]
            module, kind = part.rsplit(".", 1)
            if module in picks:  # output rows (and their biases)
                value = value[picks[module]]
            elif module == "self_attn.o_proj" and kind == "weight":
                value = value[:, q_rows]
            elif module == "mlp.down_proj" and kind == "weight":
                value = value[:, ch]
            new_state[dst + part] = value.clone()
    ref = old["model.embed_tokens.weight"]
    new = Decoder(new_cfg).to(device=ref.device, dtype=ref.dtype)
    if new_cfg.tie_word_embeddings:
        new_state.pop("lm_head.weight", None)
    new.load_state_dict(new_state, strict=not new_cfg.tie_word_embeddings)
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


def prune_mlp(model: Decoder, keep: Sequence[int] | Sequence[Sequence[int]]) -> Decoder:
    """Only remove MLP channels: `keep` is the kept channel indices (shared, or one list per layer)."""
    cfg = model.cfg
    groups = [list(range(cfg.num_key_value_heads))] * cfg.num_hidden_layers
    return build_pruned(model, range(cfg.num_hidden_layers), groups, _per_layer(keep, cfg.num_hidden_layers, "keep"))


def prune_groups(model: Decoder, keep: Sequence[int] | Sequence[Sequence[int]]) -> Decoder:
    """Only remove key/value head groups: `keep` is the kept KV-head indices (shared, or one list per layer)."""
    cfg = model.cfg
    channels = [list(range(cfg.intermediate_size))] * cfg.num_hidden_layers
    return build_pruned(model, range(cfg.num_hidden_layers), _per_layer(keep, cfg.num_hidden_layers, "keep"),
                        channels)


def drop_layers(model: Decoder, drop: Iterable[int]) -> Decoder:
    """Only remove whole layers (the residual stream simply skips them)."""
    cfg = model.cfg
    drop = set(drop)
    layers = [j for j in range(cfg.num_hidden_layers) if j not in drop]
    return build_pruned(model, layers, [list(range(cfg.num_key_value_heads))] * len(layers),
                        [list(range(cfg.intermediate_size))] * len(layers))


# ---------------------------------------------------------------- importance


def calib_batches(problems: Sequence[Problem], tok: TextTokenizer, context: int) -> list[Batch]:
    """Calibration problems encoded like training batches, in chunks to bound memory."""
    if not problems:
        raise ValueError("calib_problems is empty: importance needs a calibration batch")
    return [encode_batch(list(problems[i: i + _CHUNK]), tok, context) for i in range(0, len(problems), _CHUNK)]


def _layers(model: Decoder, x: torch.Tensor, skip: set[int]):
    """Run the layers on a right-padded batch (causal attention), yielding (layer index, hidden) after each."""
    T = x.shape[1]
    cos, sin = rotary(torch.arange(T, device=x.device)[None], model.cfg)
    h = model.model.embed_tokens(x)
    for j, layer in enumerate(model.model.layers):
        if j not in skip:
            h, _ = layer(h, cos, sin, None, None)
        yield j, h


@torch.no_grad()
def calib_loss(model: Decoder, batches: Sequence[Batch], skip: Iterable[int] = ()) -> float:
    """Mean completion-token cross-entropy, optionally running with some layers skipped."""
    skip = set(skip)
    dev = model.lm_head.weight.device
    total, count = 0.0, 0
    for x, y, m in batches:
        x, y, m = x.to(dev), y.to(dev), m.to(dev)
        for _, h in _layers(model, x, skip):
            pass
        logits = model.lm_head(model.model.norm(h))
        total += float(F.cross_entropy(logits[m].float(), y[m], reduction="sum"))
        count += int(m.sum())
    return total / max(count, 1)


@torch.no_grad()
def layer_drop_order(model: Decoder, batches: Sequence[Batch]) -> tuple[list[dict], dict[int, float], float]:
    """Greedy order in which to drop layers (least harmful first), each layer's importance, baseline loss.

    Greedy rather than one-shot ranking because layers interact: once one is gone the
    next cheapest may change. Each entry: layer, importance (loss increase when
    skipped alone), loss_after_drop (loss with it and every earlier entry skipped).
    The layer that survives longest is never listed.
    """
    n = model.cfg.num_hidden_layers
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
    model: Decoder, batches: Sequence[Batch], skip: Iterable[int] = ()
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Per kept layer: group scores (num_key_value_heads,) and MLP channel scores (intermediate_size,).

    Measured with `skip` layers already removed, so the scores reflect the residual
    stream the pruned model will really see.
    """
    cfg = model.cfg
    skip = set(skip)
    H, d, G = cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
    group_sum = {j: torch.zeros(G, dtype=torch.float64) for j in range(cfg.num_hidden_layers) if j not in skip}
    ch_sum = {j: torch.zeros(cfg.intermediate_size, dtype=torch.float64) for j in group_sum}
    n_tok = 0
    current: dict[str, torch.Tensor] = {}

    def _grab(key: str):
        def hook(_mod, args):
            current[key] = args[0]
        return hook

    handles = []
    for j in group_sum:
        layer = model.model.layers[j]
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(_grab(f"a{j}")))
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(_grab(f"f{j}")))
    try:
        dev = model.lm_head.weight.device
        for x, _, m in batches:
            x, m = x.to(dev), m.to(dev)
            for j, _h in _layers(model, x, skip):
                if j in skip:
                    continue
                layer = model.model.layers[j]
                ya = current.pop(f"a{j}")[m].float()  # (N, H*d) head outputs before o_proj
                w = layer.self_attn.o_proj.weight.float().view(cfg.hidden_size, H, d)
                contrib = torch.einsum("nhd,ehd->nhe", ya.view(-1, H, d), w)  # each head's residual write
                per_head = contrib.norm(dim=-1).sum(0).double().cpu()  # (H,)
                group_sum[j] += per_head.view(G, H // G).sum(1)
                act = current.pop(f"f{j}")[m].float()  # (N, intermediate) silu(gate) * up
                w_down = layer.mlp.down_proj.weight.float().norm(dim=0)  # (intermediate,)
                ch_sum[j] += (act.abs().sum(0) * w_down).double().cpu()
            n_tok += int(m.sum())
    finally:
        for hd in handles:
            hd.remove()
    n_tok = max(n_tok, 1)
    return {j: s / n_tok for j, s in group_sum.items()}, {j: s / n_tok for j, s in ch_sum.items()}


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, in original order (ties: lower index first)."""
    idx = torch.argsort(-scores, stable=True)[:k]
    return sorted(int(i) for i in idx)


# ---------------------------------------------------------------- the search


def prune(
    model: Decoder,
    tok: TextTokenizer,
    target_ratio: float,
    calib_problems: list[Problem] | None,
    keep_layers: int | None = None,
    batches: Sequence[Batch] | None = None,
) -> tuple[Decoder, dict]:
    """A new Decoder with at most `target_ratio` of `model`'s parameters, and a report.

    Every (kept layers, groups per layer) combination is tried with the widest MLP that
    still fits; the one with the lowest calibration loss wins (ties: more parameters).
    `keep_layers` fixes the number of layers kept. `model` is not modified. Calibration is on the
    problems, or on ready `batches` (an imported model's text: tierline.build.corpus).
    """
    cfg = model.cfg
    n_layer, G = cfg.num_hidden_layers, cfg.num_key_value_heads
    if not (isinstance(target_ratio, (int, float)) and 0.0 < target_ratio < 1.0):
        raise ValueError(f"target_ratio must be in (0, 1) to get a strictly smaller model, got {target_ratio!r}")
    if keep_layers is not None and not (isinstance(keep_layers, int) and 1 <= keep_layers <= n_layer):
        raise ValueError(f"keep_layers must be an int in [1, {n_layer}], got {keep_layers!r}")
    before = model.num_params()
    if cfg.num_params() != before:
        raise ValueError(f"model has {before} parameters but its config implies {cfg.num_params()}")
    budget = math.floor(target_ratio * before)
    fixed = fixed_params(cfg)
    min_layers = keep_layers or 1
    check_reachable(cfg, target_ratio, min_layers)

    was_training = model.training
    model.eval()
    try:
        batches = batches or calib_batches(calib_problems or [], tok, cfg.context)
        order, alone, base_loss = layer_drop_order(model, batches)
        per_group = cfg.layer_params(1, 0) - cfg.layer_params(0, 0)
        per_ch = cfg.layer_params(0, 1) - cfg.layer_params(0, 0)
        layer_counts = [keep_layers] if keep_layers else range(n_layer, 0, -1)
        candidates: list[dict] = []
        best: tuple | None = None
        for L in layer_counts:
            dropped = [o["layer"] for o in order[: n_layer - L]]
            kept = [j for j in range(n_layer) if j not in dropped]
            per_layer = (budget - fixed) // L - cfg.layer_params(0, 0)
            if per_layer < per_group + per_ch:
                continue
            group_s, ch_s = unit_importance(model, batches, skip=dropped)
            for g in range(G, 0, -1):
                width = min(cfg.intermediate_size, (per_layer - g * per_group) // per_ch)
                if width < 1:
                    continue
                groups = [_top(group_s[j], g) for j in kept]
                chans = [_top(ch_s[j], width) for j in kept]
                small = build_pruned(model, kept, groups, chans)
                small.eval()
                loss = calib_loss(small, batches)
                n = small.num_params()
                candidates.append({"num_hidden_layers": L, "num_key_value_heads": g, "intermediate_size": width,
                                   "params": n, "calib_loss": round(loss, 6)})
                key = (loss, -n)
                if best is None or key < best[0]:
                    best = (key, small, kept, dropped, groups, chans, group_s)
        if best is None:
            raise ValueError(f"no configuration fits {budget} parameters")
    finally:
        model.train(was_training)

    (loss, _), new, kept, dropped, groups, chans, group_s = best
    after = new.num_params()
    if after > target_ratio * before or after >= before:
        raise AssertionError(f"internal error: pruned model has {after} params, budget {budget}")
    new.train(was_training)
    report = {
        "params_before": before,
        "params_after": after,
        "ratio": round(after / before, 6),
        "target_ratio": target_ratio,
        "config_before": cfg.to_hf(),
        "config_after": new.cfg.to_hf(),
        "calib_loss_before": round(base_loss, 6),
        "calib_loss_after": round(loss, 6),
        "layers_kept": kept,
        "layers_dropped": [o for o in order if o["layer"] in dropped],
        "layer_importance": {j: round(v, 6) for j, v in alone.items()},  # loss increase if skipped alone
        "groups_kept": {j: g for j, g in zip(kept, groups)},
        "group_importance": {j: [round(float(s), 6) for s in group_s[j]] for j in kept},
        "mlp_kept": {j: c for j, c in zip(kept, chans)},
        "intermediate_size_kept": new.cfg.intermediate_size,
        "candidates": candidates,
    }
    return new, report
