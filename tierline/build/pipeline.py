"""`tierline models build`: the whole family from scratch, deterministic for a seed.

tokenizer -> teacher (cloud, fp32 safetensors)
          -> student by soft-label distillation, and the same student without it (baseline)
          -> student to ONNX with a KV cache, int8 dynamic quantization (edge)
          -> student structurally pruned, fine-tuned, exported to .tflite (device)
          -> every tier evaluated per level, model cards, manifest.json
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from rich.console import Console

from tierline.build.engines import load_engine
from tierline.build.evaluate import evaluate, kv_agreement, summary
from tierline.build.progress import Steps
from tierline.build.train import TrainConfig, train
from tierline_cloud_node.engine import TorchEngine
from tierline_shared.models.artifacts import TIER_FORMATS, write_card, write_index
from tierline_shared.models.configs import DecoderConfig
from tierline_shared.models.llama import Decoder, save_decoder
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.runtime.engine import EngineInfo
from tierline_shared.tasks.problems import ANSWER_MARKER, generate

MODEL_NAME = "tierline-reasoner"
os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "0")  # our own progress bars instead


@dataclass
class FamilyConfig:
    name: str
    teacher: DecoderConfig  # cloud model
    student: DecoderConfig  # edge model, <= 1/3 of the teacher's parameters
    teacher_train: TrainConfig
    student_train: TrainConfig  # distill_alpha > 0; the baseline reuses it with alpha 0
    finetune: TrainConfig  # after pruning (distilled from the teacher)
    prune_ratio: float = 0.35  # device params / student params, at most
    eval_n: int = 1000  # test problems for the report (balanced over levels)
    kv_check_n: int = 200  # problems for the cached-vs-uncached check of the int8 model
    calib_n: int = 256  # calibration problems for pruning importance and int8 activation scales
    device_levels: tuple[int, ...] = (1, 2, 3)  # the device answers easy requests: fine-tune on these
    scorer_n: int = 1000  # calibration problems labelled for the router's scorer
    threads: int = 2  # torch / onnxruntime threads (the reference machine has 2 cores)
    # the distilled and the no-distillation student trained at once, each with half the threads (in a
    # second process); False: one after the other with all of them (other floats: not the same models)
    students_side_by_side: bool = True
    # the device model's prefill signatures (None: 32/64/128/256 below the context, and the context); each
    # one is a conversion of its own, most of a tiny build's time
    prefill_lens: tuple[int, ...] | None = None

    def __post_init__(self):
        ratio = self.student.num_params() / self.teacher.num_params()
        if ratio > 1 / 3:
            raise ValueError(f"family {self.name!r}: student has {ratio:.2f} of the teacher's parameters (max 1/3)")


def _decoder(tok: TextTokenizer, layers: int, heads: int, kv_heads: int, width: int, mlp: int,
             context: int = 256) -> DecoderConfig:
    """A Llama-architecture config for the family (untied embeddings, no biases, full attention)."""
    return DecoderConfig(vocab_size=tok.vocab_size, hidden_size=width, intermediate_size=mlp,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=width // heads, max_position_embeddings=context, rope_theta=10000.0,
                         bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)


def family(name: str, seed: int = 0) -> FamilyConfig:
    tok = TextTokenizer.default()
    if name == "tiny":  # the whole pipeline in well under 2 minutes, accuracy irrelevant
        return FamilyConfig(
            name="tiny",
            teacher=_decoder(tok, 4, 4, 2, 96, 256),
            student=_decoder(tok, 4, 2, 2, 48, 128),
            teacher_train=TrainConfig(steps=40, batch_size=16, lr=3e-3, warmup=5, seed=seed),
            student_train=TrainConfig(steps=30, batch_size=16, lr=3e-3, warmup=5, distill_alpha=0.5, seed=seed),
            finetune=TrainConfig(steps=10, batch_size=16, lr=2e-3, warmup=2, distill_alpha=0.5, seed=seed + 1),
            eval_n=40, kv_check_n=10, calib_n=32, scorer_n=60, prefill_lens=(32, 256),
        )
    if name == "default":  # built in 38 minutes on 2 CPU cores (README, "The model family")
        # Packed training, the two students side by side (one core each), a teacher 12 times its student
        # (the cloud's model is the expensive one) at lr 1e-3, and a light, early KL term:
        # docs/ARCHITECTURE.md, "The default recipe".
        return FamilyConfig(
            name="default",
            teacher=_decoder(tok, 4, 4, 2, 256, 768),
            student=_decoder(tok, 3, 2, 2, 80, 216),
            teacher_train=TrainConfig(steps=3000, batch_size=32, lr=1e-3, warmup=100, hard_share=2, seed=seed),
            student_train=TrainConfig(steps=6000, batch_size=32, lr=3e-3, warmup=100, hard_share=2, hard_from=2,
                                      distill_alpha=0.15, distill_alpha_end=0.0, distill_until=0.25,
                                      distill_temperature=1.0, seed=seed),
            finetune=TrainConfig(steps=5000, batch_size=32, lr=2e-3, warmup=50, distill_alpha=0.5, seed=seed + 1),
            device_levels=(1, 2),
        )
    raise ValueError(f"unknown family config {name!r}; expected 'tiny' or 'default'")


def build(cfg: FamilyConfig, out: Path, console: Console | None = None) -> dict:
    """Build every artifact into `out`; returns the report (also written as report.json)."""
    console = console or Console(stderr=True)
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_work"
    work.mkdir(exist_ok=True)
    tok = TextTokenizer.default()
    tok.save(out / "tokenizer.json")
    test = generate("test", cfg.eval_n, seed=cfg.teacher_train.seed)
    calib = generate("calib", cfg.calib_n, seed=cfg.teacher_train.seed)
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}
    steps = Steps(console)

    def torch_engine(model: Decoder, tier: str) -> TorchEngine:
        info = EngineInfo(tier, MODEL_NAME, cfg.name, model.num_params(), 0, model.cfg.context,
                          model.cfg.window_limit)
        return TorchEngine(model, tok, info)

    def fit(title: str, model: Decoder, tc: TrainConfig, teacher: Decoder | None = None, levels=(1, 2, 3, 4, 5),
            each_step: Callable[[], None] = lambda: None) -> dict:
        t0 = time.perf_counter()
        with steps.stage(title, tc.steps) as adv:
            def progress(s: int, loss: float) -> None:
                adv(1, f"loss {loss:.3f}")
                each_step()

            summary = train(model, tok, tc, teacher=teacher, levels=levels, progress=progress)
        timings[title] = round(time.perf_counter() - t0, 1)
        return summary

    def fit_beside(title: str, model: Decoder, tc: TrainConfig, teacher: Decoder,
                   b_title: str, b_model: Decoder, b_tc: TrainConfig) -> tuple[dict, dict]:
        """fit() here with half the threads while `b_model` (no teacher) trains in a second process
        with the other half."""
        from tierline.build.background import BackgroundTrain

        with steps.stage(b_title, b_tc.steps) as b_adv:
            other = BackgroundTrain(b_model, b_tc, (1, 2, 3, 4, 5), threads=cfg.threads // 2, work=work,
                                    on_step=lambda s, loss: b_adv(1, f"loss {loss:.3f}"))
            torch.set_num_threads(cfg.threads - cfg.threads // 2)
            try:
                summary = fit(title, model, tc, teacher=teacher, each_step=other.poll)
                b_summary = other.wait()
                timings[b_title] = round(other.seconds, 1)  # its own end, seen when the child reported it
            finally:
                other.close()
                torch.set_num_threads(cfg.threads)
        return summary, b_summary

    def score(title: str, engine) -> dict:
        with steps.stage(f"eval {title}", len(test)) as adv:
            r = summary(evaluate(engine, test, progress=adv))
        results[title] = r
        return r

    with steps.progress:
        torch.manual_seed(cfg.teacher_train.seed)
        teacher = Decoder(cfg.teacher)
        teacher_summary = fit("teacher (cloud)", teacher, cfg.teacher_train)
        save_decoder(teacher, out / "cloud")
        tok.save_pretrained(out / "cloud")  # the cloud tier is a checkpoint transformers loads as it is
        score("cloud", torch_engine(teacher, "cloud"))

        torch.manual_seed(cfg.student_train.seed + 1)
        student = Decoder(cfg.student)
        torch.manual_seed(cfg.student_train.seed + 1)
        baseline = Decoder(cfg.student)
        baseline_cfg = replace(cfg.student_train, distill_alpha=0.0, distill_alpha_end=None, distill_until=1.0)
        if cfg.students_side_by_side and cfg.threads >= 2:  # one core each
            student_summary, baseline_summary = fit_beside(
                "student, distilled", student, cfg.student_train, teacher,
                "student, no distillation", baseline, baseline_cfg)
        else:
            student_summary = fit("student, distilled", student, cfg.student_train, teacher=teacher)
            baseline_summary = fit("student, no distillation", baseline, baseline_cfg)
        score("student_fp32_torch", torch_engine(student, "edge"))
        score("student_no_distill", torch_engine(baseline, "edge"))

        from tierline.build.export_onnx import export_onnx, quantize_int8

        edge_dir = out / "edge"
        edge_dir.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        export_onnx(student, work / "model.fp32.onnx")
        # static activation scales from the calibration split: cached == uncached, row by row
        calib_ids = [tok.encode(p.text) for p in calib]
        quantize_int8(work / "model.fp32.onnx", edge_dir / "model.int8.onnx", calib_ids=calib_ids)
        student.cfg.write(edge_dir)
        student.cfg.write(work)
        timings["export + quantize (edge)"] = round(time.perf_counter() - t0, 1)

        from tierline.build.prune import prune

        t0 = time.perf_counter()
        device_model, prune_report = prune(student, tok, cfg.prune_ratio, calib)
        timings["prune"] = round(time.perf_counter() - t0, 1)
        finetune_summary = fit("device fine-tune", device_model, cfg.finetune, teacher=teacher,
                               levels=cfg.device_levels)

        from tierline.build.export_tflite import export_tflite

        device_dir = out / "device"
        device_dir.mkdir(exist_ok=True)
        t0 = time.perf_counter()
        tflite_report = export_tflite(device_model, device_dir / "model.tflite", cfg.prefill_lens)  # + config.json
        timings["export (device)"] = round(time.perf_counter() - t0, 1)

        manifest = _write_manifest(out, cfg)
        from tierline_edge_node.engine import OnnxEngine

        score("edge_fp32_onnx", OnnxEngine.load(work / "model.fp32.onnx", tok, "edge", threads=cfg.threads))
        edge = load_engine(out, "edge", threads=cfg.threads)
        score("edge", edge)
        score("device", load_engine(out, "device", threads=cfg.threads))
        with steps.stage("int8 KV-cache check", cfg.kv_check_n) as adv:
            kv_same = kv_agreement(edge, test[: cfg.kv_check_n], progress=adv)

    shutil.rmtree(work)
    params = {"cloud": teacher.num_params(), "edge": student.num_params(), "device": device_model.num_params()}
    trainings = {
        "cloud": {"train": asdict(cfg.teacher_train), "summary": teacher_summary},
        "edge": {"train": asdict(cfg.student_train), "summary": student_summary,
                 "baseline_no_distillation": {"train": asdict(baseline_cfg), "summary": baseline_summary}},
        "device": {"pruned_from": "edge student (fp32)", "prune": prune_report,
                   "finetune": asdict(cfg.finetune), "finetune_levels": list(cfg.device_levels),
                   "summary": finetune_summary, "export": tflite_report},
    }
    configs = {"cloud": cfg.teacher, "edge": cfg.student, "device": device_model.cfg}
    for tier in ("cloud", "edge", "device"):
        entry = manifest["artifacts"][tier]
        write_card(out / tier, {
            "tier": tier, "model": MODEL_NAME, "family": cfg.name, "format": TIER_FORMATS[tier],
            "params": params[tier], "bytes": entry["weights"]["bytes"], "sha256": entry["weights"]["sha256"],
            "quantization": "int8 static, per-channel weights (onnxruntime)" if tier == "edge" else "none (fp32)",
            "pruning": (f"structural, {params['device'] / params['edge']:.1%} of the student" if tier == "device"
                        else "none"),
            "config": configs[tier].to_hf(),
            "answer_marker": ANSWER_MARKER,
            "accuracy": results[tier],
            "training": trainings[tier],
        })
    report = {
        "family": cfg.name,
        "seed": cfg.teacher_train.seed,
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "threads": cfg.threads},
        "build_seconds": round(time.perf_counter() - t_start, 1),
        "timings": timings,
        "params": params,
        "ratios": {"student_over_teacher": round(params["edge"] / params["cloud"], 4),
                   "device_over_student": round(params["device"] / params["edge"], 4)},
        "accuracy": results,
        "int8_kv_cache_agreement": round(kv_same, 4),
        "distillation_gain": round(results["student_fp32_torch"]["accuracy"]
                                   - results["student_no_distill"]["accuracy"], 4),
    }
    # the manifest is rewritten last so it also lists the cards, then the router's scorer joins it
    _write_manifest(out, cfg)
    from tierline.build.scorer import train_scorer

    report["router_scorer"] = train_scorer(out, n=cfg.scorer_n, seed=cfg.teacher_train.seed, threads=cfg.threads)
    report["build_seconds"] = round(time.perf_counter() - t_start, 1)  # everything, the scorer included
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "REPORT.md").write_text(render_report(report))
    return report


def _write_manifest(out: Path, cfg: FamilyConfig) -> dict:
    return write_index(out, MODEL_NAME, f"{cfg.name}-seed{cfg.teacher_train.seed}", cfg.name,
                       answer_marker=ANSWER_MARKER)


def render_report(report: dict) -> str:
    acc = report["accuracy"]
    levels = list(next(iter(acc.values()))["by_level"])
    rows = ["| model | " + " | ".join(f"L{lv}" for lv in levels) + " | all | tokens/s |",
            "|---|" + "---|" * (len(levels) + 2)]
    for name, r in acc.items():
        rows.append(f"| {name} | " + " | ".join(f"{r['by_level'][lv]:.3f}" for lv in levels)
                    + f" | {r['accuracy']:.3f} | {r['tokens_per_s']} |")
    return "\n".join([
        f"# Model family `{report['family']}` (seed {report['seed']})", "",
        f"Built in {report['build_seconds']:.0f} s on {report['machine']['platform']} "
        f"({report['machine']['threads']} threads).", "",
        "## Exact-match accuracy on the test split, per level", "", *rows, "",
        f"- parameters: {report['params']} (student/teacher {report['ratios']['student_over_teacher']:.3f}, "
        f"device/student {report['ratios']['device_over_student']:.3f})",
        f"- distillation gain (student distilled minus the same student trained without it): "
        f"{report['distillation_gain']:+.3f}",
        f"- int8 edge model, greedy text identical with and without the KV cache: "
        f"{report['int8_kv_cache_agreement']:.1%}", "",
        "## Stage timings (s)", "", *[f"- {k}: {v}" for k, v in report["timings"].items()], "",
    ])
