"""`tierline models import SRC --out DIR`: a user's own Llama-family checkpoint as a complete models directory.

SRC is a local Hugging Face checkpoint (config.json naming a served architecture, model.safetensors or its
shards, tokenizer.json and usually tokenizer_config.json). What comes out is what `make models` writes for
the project's family, ready for `tierline up --models DIR`:

    cloud/   the checkpoint as it is (files copied byte for byte; the cloud tier serves it with torch)
    edge/    the same model exported to ONNX with a KV cache, int8 with static activation scales (onnxruntime)
    device/  the model structurally pruned to --device-ratio of its parameters (layers, key/value-head groups,
             SwiGLU channels; tierline.build.prune), optionally recovered by distillation from the full model
             on --corpus, exported to .tflite with prefill/decode signatures (LiteRT)
    tokenizer.json + tokenizer_config.json (the special tokens), cards, manifest.json with every sha256

The weights are read tensor by tensor into one fp32 model (never twice in memory). Calibration (int8
scales, pruning importance) uses the corpus if one is given, else a small built-in text
(tierline.build.corpus.BUILTIN_TEXTS). Quality is measured, not assumed: each lower tier's greedy
continuations of held-out text compared with the cloud's (identical share, matched prefix), in the cards.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from rich.console import Console

from tierline.build import corpus as corpora
from tierline.build.evaluate import agreement, continuations
from tierline.build.progress import Steps
from tierline_shared.models.artifacts import TIER_FORMATS, write_card, write_index
from tierline_shared.models.configs import CONFIG_FILE, GENERATION_CONFIG_FILE, ConfigError, DecoderConfig
from tierline_shared.models.llama import WEIGHTS_INDEX, check_weights, load_decoder, weight_files
from tierline_shared.models.names import ModelNameError, check_model_name
from tierline_shared.models.tokenizer import (
    SPECIAL_TOKENS_MAP_FILE,
    TOKENIZER_CONFIG_FILE,
    TextTokenizer,
    read_checkpoint_specials,
    special_tokens,
)
from tierline_shared.runtime.engine import check_vocab

# the tokenizer's files as save_pretrained writes them (transformers 5: the chat template in chat_template.jinja)
TOKENIZER_FILES = ("tokenizer.json", TOKENIZER_CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, "chat_template.jinja")
DEFAULT_DEVICE_RATIO = 0.35
DEFAULT_DEVICE_CONTEXT = 512  # the device's KV cache (fixed size in the .tflite) holds this many positions
CALIB_MAX_LEN = 128  # tokens per calibration row
QUALITY_TOKENS = 16  # tokens generated per held-out prompt when comparing a tier with the cloud


class ImportFailure(ValueError):
    """Input that cannot be imported; the message names the file or the flag (the CLI exits 2)."""


def _check_text(flag: str, value: str) -> None:
    """A path or name the import hands to tokenizers, safetensors and the exporters and writes into its cards,
    all of which take UTF-8 text only: a name with other bytes (Python's surrogate escapes) would fail one of
    them late, with a message about codecs."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ImportFailure(f"{flag}: {ascii(value)} is not UTF-8 text; rename it"
                            + (" or give --name" if flag == "--name" else "")) from None


def _check_name(name: str, given: bool) -> None:
    """The model name is what requests, `GET /v1/models/{name}` and the boards' signed updates name: refused here
    by their one rule (`check_model_name`), not when the model is asked for or pushed to the boards."""
    try:
        check_model_name(name)
    except ModelNameError as exc:
        raise ImportFailure(f"--name: {name!r}{'' if given else ' (SRC folder name)'} {exc}") from None


def _special_tokens(src: Path, cfg: DecoderConfig) -> tuple[dict, dict[str, Path]]:
    """The checkpoint's special tokens, found where transformers finds them: tokenizer_config.json with
    special_tokens_map.json over it, as AutoTokenizer reads them (`read_checkpoint_specials`); a BOS or end token
    neither file names is the one config.json's id names (the end token: generation_config.json's first), which
    is where transformers' generate finds its end tokens; whether a prompt starts with BOS stays the
    post-processor's to say, and a bos_token set to null (Qwen2's) is none. Also the file each key came from.
    ImportFailure naming the files and fields when no end token is found (generation would never stop)."""
    from tokenizers import Tokenizer

    tokenizer, config_file = src / "tokenizer.json", src / TOKENIZER_CONFIG_FILE
    try:
        specials, origin = read_checkpoint_specials(src)
    except ValueError as exc:
        raise ImportFailure(str(exc)) from None
    named = special_tokens(specials)
    eos_ids = f"the eos_token_id of {src / GENERATION_CONFIG_FILE} or {src / CONFIG_FILE}"
    if "eos_token" not in named and cfg.eos_token_id is None:
        raise ImportFailure(f"{config_file}: eos_token: missing, and neither {src / SPECIAL_TOKENS_MAP_FILE}'s "
                            f"eos_token nor {eos_ids} names one (generation would never stop)")
    try:
        vocab = Tokenizer.from_file(str(tokenizer))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise ImportFailure(f"{tokenizer}: not a valid tokenizer file ({exc})") from None
    for field, i, ids in (("bos_token", cfg.bos_token_id, f"{src / CONFIG_FILE}'s bos_token_id"),
                          ("eos_token", cfg.eos_token_id, eos_ids)):
        if field in named or i is None or (field == "bos_token" and field in specials):
            continue
        text = vocab.id_to_token(i) if isinstance(i, int) and not isinstance(i, bool) and i >= 0 else None
        if text is None:
            raise ImportFailure(f"{config_file}: {field}: missing, and {ids} {i!r} is not a token of {tokenizer}")
        specials[field], origin[field] = text, src / CONFIG_FILE
    for field, text in special_tokens(specials).items():  # the file that named a token the vocabulary lacks
        if vocab.token_to_id(text) is None:
            raise ImportFailure(f"{origin[field]}: {field} {text!r} is not in the vocabulary")
    return specials, origin


def _check_source(src: Path) -> tuple[DecoderConfig, TextTokenizer, dict | None]:
    """The checkpoint's config, its tokenizer, and the tokenizer_config.json to write for the tiers when the
    checkpoint's own does not name every special token they serve with (None when it does); ImportFailure naming
    the file for what cannot be served."""
    if not src.is_dir():
        raise ImportFailure(f"{src}: not a checkpoint directory")
    if not (src / CONFIG_FILE).is_file():
        raise ImportFailure(f"{src / CONFIG_FILE}: missing (a Hugging Face checkpoint has one)")
    try:
        cfg = DecoderConfig.read(src)
    except (ConfigError, ValueError) as exc:
        raise ImportFailure(str(exc)) from None
    if not (src / "tokenizer.json").is_file():
        raise ImportFailure(f"{src / 'tokenizer.json'}: missing (the tiers need the model's tokenizer.json; "
                           f"a checkpoint with only a slow tokenizer can be converted with transformers' "
                           f"AutoTokenizer(...).save_pretrained)")
    specials, origin = _special_tokens(src, cfg)
    try:
        tok = TextTokenizer.load(src / "tokenizer.json", beside=False, specials=specials)
    except ValueError as exc:
        raise ImportFailure(str(exc)) from None
    try:  # the engines' own rule, before anything is built: they would refuse the result at the end
        check_vocab(cfg.vocab_size, tok, src / CONFIG_FILE)
    except ValueError as exc:
        raise ImportFailure(str(exc)) from None
    try:
        check_weights(src)  # names and shapes, from the headers: before anything is written
    except (FileNotFoundError, ValueError) as exc:
        raise ImportFailure(str(exc)) from None
    own = set(origin.values()) == {src / TOKENIZER_CONFIG_FILE}  # all from tokenizer_config.json: copied as it is
    return cfg, tok, (None if own else specials)


def import_checkpoint(src: str | Path, out: str | Path, device_ratio: float = DEFAULT_DEVICE_RATIO,
                      corpus: str | Path | None = None, recover_steps: int = 200,
                      device_context: int = DEFAULT_DEVICE_CONTEXT, threads: int = 2,
                      name: str | None = None, console: Console | None = None) -> dict:
    """Build the models directory `out` from the checkpoint `src`; returns the report (also report.json)."""
    src, out = Path(src), Path(out)
    console = console or Console(stderr=True)
    model_name = name or src.resolve().name
    for flag, text in (("SRC", str(src.resolve())), ("--out", str(out.resolve())), ("--name", model_name)):
        _check_text(flag, text)
    _check_name(model_name, given=bool(name))
    if not 0.0 < device_ratio < 1.0:
        raise ImportFailure(f"--device-ratio: {device_ratio} must be in (0, 1)")
    if device_context < 2:
        raise ImportFailure(f"--device-context: {device_context} must be at least 2")
    if out.exists() and not out.is_dir():
        raise ImportFailure(f"--out: {out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        raise ImportFailure(f"--out: {out} exists and is not empty")
    cfg, tok, specials = _check_source(src)
    from tierline.build.prune import check_reachable

    try:
        check_reachable(cfg, device_ratio)
    except ValueError as exc:
        raise ImportFailure(f"--device-ratio: {exc}") from None
    texts = corpora.read_corpus(corpus) if corpus else list(corpora.BUILTIN_TEXTS)
    train_texts, held_out = corpora.split(texts)
    torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _build(src, out, cfg, tok, specials, corpus, train_texts, held_out, device_ratio, recover_steps,
                      device_context, threads, model_name, console)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # nothing half-written is left to be served
        raise


def _build(src, out, cfg, tok, specials, corpus, train_texts, held_out, device_ratio, recover_steps, device_context,
           threads, model_name, console) -> dict:
    t_start, timings = time.perf_counter(), {}
    steps = Steps(console)
    work = out / "_work"
    work.mkdir()

    with steps.progress:
        t0 = time.perf_counter()
        files = [src / f for f in (CONFIG_FILE, "generation_config.json", WEIGHTS_INDEX, *TOKENIZER_FILES)
                 if (src / f).is_file()] + weight_files(src)
        with steps.stage("copy checkpoint (cloud)", sum(f.stat().st_size for f in files) >> 20 or 1) as adv:
            (out / "cloud").mkdir()
            for f in files:
                shutil.copyfile(f, out / "cloud" / f.name)
                adv(f.stat().st_size >> 20)
        if not (out / "cloud" / "generation_config.json").is_file():  # what save_pretrained writes beside it
            cfg.write(work)
            shutil.copyfile(work / "generation_config.json", out / "cloud" / "generation_config.json")
        for f in ("tokenizer.json", "tokenizer_config.json"):  # the tiers' shared tokenizer, at the top
            if (src / f).is_file():
                shutil.copyfile(src / f, out / f)
        if specials is not None:  # not all in tokenizer_config.json: the tiers' names the ones found elsewhere
            (out / "tokenizer_config.json").write_text(json.dumps(specials, indent=2) + "\n")
        timings["copy (cloud)"] = round(time.perf_counter() - t0, 1)

        t0 = time.perf_counter()
        with steps.stage("load weights", _tensor_count(src)) as adv:
            try:
                model = load_decoder(src, progress=adv)
            except (ValueError, FileNotFoundError) as exc:
                raise ImportFailure(str(exc)) from None
        timings["load"] = round(time.perf_counter() - t0, 1)

        from tierline.build.export_onnx import export_onnx, quantize_int8

        t0 = time.perf_counter()
        calib_rows = corpora.rows(train_texts, tok, CALIB_MAX_LEN)
        with steps.stage("edge: ONNX + int8", 2) as adv:
            export_onnx(model, work / "model.fp32.onnx")
            adv(1)
            (out / "edge").mkdir()
            quantize_int8(work / "model.fp32.onnx", out / "edge" / "model.int8.onnx", calib_ids=calib_rows)
            model.cfg.write(out / "edge")
            adv(1)
        (work / "model.fp32.onnx").unlink()
        for extra in work.glob("*.onnx*"):
            extra.unlink()
        timings["export + quantize (edge)"] = round(time.perf_counter() - t0, 1)

        from tierline.build.prune import prune

        t0 = time.perf_counter()
        calib = corpora.batches(train_texts, tok, CALIB_MAX_LEN)
        with steps.stage("device: prune", 1) as adv:
            try:
                small, prune_report = prune(model, tok, device_ratio, None, batches=calib)
            except ValueError as exc:
                raise ImportFailure(f"--device-ratio: {exc}") from None
            adv(1)
        timings["prune"] = round(time.perf_counter() - t0, 1)
        recovery = None
        if corpus and recover_steps > 0:
            from tierline.build.train import recover

            t0 = time.perf_counter()
            with steps.stage("device: recover (distill)", recover_steps) as adv:
                recovery = recover(small, model, calib, recover_steps,
                                   progress=lambda s, loss: adv(1, f"loss {loss:.3f}"))
            timings["recover"] = round(time.perf_counter() - t0, 1)

        from tierline.build.export_tflite import export_tflite

        t0 = time.perf_counter()
        context = min(device_context, small.cfg.context)  # a window wider than the context is no window
        window = small.cfg.sliding_window if small.cfg.sliding_window <= context else 0
        small.cfg = small.cfg.replace(max_position_embeddings=context, sliding_window=window)
        with steps.stage("device: LiteRT export", 1) as adv:
            tflite_report = export_tflite(small, out / "device" / "model.tflite")
            adv(1)
        timings["export (device)"] = round(time.perf_counter() - t0, 1)
        shutil.rmtree(work)
        write_index(out, model_name, f"imported-{time.strftime('%Y%m%d')}", "imported")

        # quality: each tier's greedy continuations of held-out text against the cloud's
        from tierline.build.engines import load_engine

        t0 = time.perf_counter()
        prompts = corpora.prompts(held_out, tok)
        engines = {tier: load_engine(out, tier, threads=threads) for tier in ("cloud", "edge", "device")}
        said = {}
        for tier, engine in engines.items():
            with steps.stage(f"quality: {tier}", len(prompts)) as adv:
                said[tier] = continuations(engine, prompts, QUALITY_TOKENS, progress=adv)
        quality = {tier: agreement(said[tier], said["cloud"]) for tier in ("edge", "device")}
        timings["quality"] = round(time.perf_counter() - t0, 1)

    params = {"cloud": model.num_params(), "edge": model.num_params(), "device": small.num_params()}
    source = "your corpus" if corpus else "the built-in text (no --corpus: nothing about your domain)"
    notes = {
        "cloud": "the checkpoint as it is (fp32 on the CPU)",
        "edge": "the full model, int8 static quantization calibrated on " + source,
        "device": (f"structurally pruned to {prune_report['ratio']:.1%} of the parameters on {source}; "
                   + (f"recovered by distillation from the full model ({recover_steps} steps on the corpus)"
                      if recovery else "NOT recovered (give --corpus to fine-tune it): expect it to disagree "
                      "with the full model often; its measured agreement is below")),
    }
    for tier in ("cloud", "edge", "device"):
        index = json.loads((out / "manifest.json").read_text())["artifacts"][tier]
        write_card(out / tier, {
            "tier": tier, "model": model_name, "family": "imported", "source": str(src.resolve()),
            "format": TIER_FORMATS[tier], "params": params[tier],
            "bytes": sum(f["bytes"] for f in index.get("shards") or [index["weights"]]),  # a sharded one: its shards
            "sha256": index["weights"]["sha256"], "notes": notes[tier],
            "quality": (quality.get(tier) and {**quality[tier], "measured": (
                f"greedy continuations ({QUALITY_TOKENS} tokens) of {len(prompts)} held-out prompts from "
                f"{source}, compared with the cloud tier's")}) or "the reference (the full model)",
            "config": (small if tier == "device" else model).cfg.to_hf(),
            "training": ({"prune": {k: v for k, v in prune_report.items() if k != "candidates"},
                          "recovery": recovery, "export": tflite_report} if tier == "device" else None),
        })
    index = write_index(out, model_name, f"imported-{time.strftime('%Y%m%d')}", "imported")
    report = {"source": str(src.resolve()), "architecture": cfg.architecture, "params": params,
              "device_ratio": prune_report["ratio"], "corpus": str(corpus) if corpus else None,
              "recovery": recovery, "quality_vs_cloud": quality, "timings": timings,
              "import_seconds": round(time.perf_counter() - t_start, 1), "peak_rss_mib": _peak_rss_mib(),
              "version": index["version"]}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _tensor_count(src: Path) -> int:
    """How many tensors the checkpoint holds (the load's progress), read from the safetensors headers."""
    from safetensors import safe_open

    total = 0
    for path in weight_files(src):
        try:
            with safe_open(str(path), framework="pt") as f:
                total += len(list(f.keys()))
        except Exception as exc:  # safetensors raises its own types for a damaged file
            raise ImportFailure(f"{path}: not a readable safetensors file ({exc})") from None
    return total


def _peak_rss_mib() -> float:
    """This process's peak resident memory (and its children's, if larger), in MiB (Linux: ru_maxrss in KiB)."""
    import resource

    peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return round(peak / 1024, 1)
