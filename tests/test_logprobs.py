"""Token log-probabilities (OpenAI's `logprobs`): what each tier reports is log_softmax of the model's logits.

The cloud tier against a reference nobody here wrote (transformers' Llama on the committed checkpoint,
teacher-forced over the prompt and the tokens generated); the int8 ONNX and LiteRT tiers against their
own forward, one row fed a token at a time. Greedy and sampled rows in one batch, so both of the runner's
paths (the batched argmax and the sampler) are covered; a stop string's cut leaves no token out or over.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from tests.conftest import COMMITTED_MODELS
from tierline.build.engines import load_engine
from tierline_api.v1 import inference_pb2 as pb
from tierline_shared.config.manifest import LimitsConfig
from tierline_shared.runtime.engine import GenerationParams
from tierline_shared.serving.servicer import TierServicer
from tierline_shared.tasks.problems import generate

TOP = 5
TOL = 2e-4  # float32 logits, log_softmax in float64 on both sides
PROMPTS = [p.prompt for p in generate("test", 3, seed=5)] + ["Q:what is 7*8?\nA:"]
PARAMS = [GenerationParams(max_tokens=24, logprobs=True, top_logprobs=TOP),
          GenerationParams(max_tokens=24, temperature=1.3, seed=3, logprobs=True, top_logprobs=TOP),
          GenerationParams(max_tokens=24, temperature=0.7, top_p=0.9, seed=8, logprobs=True),
          GenerationParams(max_tokens=24, temperature=2.0, seed=1, logprobs=True, top_logprobs=1)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def check_against(engine, reference, params=PARAMS) -> None:
    """Every generated token's logprob and top alternatives equal log_softmax(reference(prompt + tokens))."""
    results = engine.generate_batch(PROMPTS, params)
    tok = engine.tokenizer
    for prompt, g, r in zip(PROMPTS, params, results):
        ids = tok.encode(prompt)
        assert len(r.logprobs) == len(r.token_ids) > 0, (prompt, r.text)
        assert "".join(t.token for t in r.logprobs) == r.text
        lp = log_softmax(reference(ids + r.token_ids))  # (T, V): row i predicts token i + 1
        for i, (t, entry) in enumerate(zip(r.token_ids, r.logprobs)):
            row = lp[len(ids) - 1 + i]
            assert entry.logprob == pytest.approx(row[t], abs=TOL), (prompt, i)
            assert len(entry.top) == g.top_logprobs
            best = np.argsort(-row)[:g.top_logprobs]
            assert [v for _, v in entry.top] == pytest.approx(row[best].tolist(), abs=TOL)
            assert [a for a, _ in entry.top][:1] == [tok.decode([int(b)]) for b in best[:1]]


def test_the_cloud_tiers_logprobs_are_transformers_log_softmax(one_torch_thread):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    ref = transformers.AutoModelForCausalLM.from_pretrained(COMMITTED_MODELS / "cloud", local_files_only=True).eval()

    def reference(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return ref(torch.tensor([ids])).logits[0].numpy()

    engine = load_engine(COMMITTED_MODELS, "cloud", threads=1)
    check_against(engine, reference)
    # an escalated request's tokens taken from its draft (the lower tier's answer) report the same logprobs
    answers = [r.text for r in engine.generate_batch(PROMPTS, [PARAMS[0]] * len(PROMPTS))]
    drafts = [a + "Q:1+1=?" if i == 3 else a[:len(a) // (i + 1)] + "#" * (i == 2) for i, a in enumerate(answers)]
    check_against(engine, reference, [replace(PARAMS[0], draft=d) for d in drafts])


@pytest.mark.parametrize("tier", ["edge", "device"])
def test_the_int8_and_litert_tiers_report_their_own_models_log_softmax(tier):
    engine = load_engine(COMMITTED_MODELS, tier, threads=1)

    def reference(ids: list[int]) -> np.ndarray:
        """The engine's own logits for one row fed a token at a time (the ONNX graph gives the last position's
        logits only; LiteRT's signatures take one sequence): no batch, no padding, no scheduler."""
        rows, past = [], None
        for pos, t in enumerate(ids):
            logits, past = engine._forward(np.array([[t]], np.int64), np.ones((1, pos + 1), np.int64),
                                           np.array([[pos]], np.int64), past)
            rows.append(logits[0, -1])
        return np.stack(rows)

    check_against(engine, reference)


def test_a_stop_string_cut_keeps_exactly_the_texts_tokens():
    engine = load_engine(COMMITTED_MODELS, "edge", threads=1)
    full = engine.generate(PROMPTS[0], GenerationParams(max_tokens=24)).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    r = engine.generate(PROMPTS[0], GenerationParams(max_tokens=24, stop=(stop,), logprobs=True))
    assert r.finish_reason == "stop" and r.text == full[:full.index(stop)]
    assert "".join(t.token for t in r.logprobs) == r.text
    assert engine.generate(PROMPTS[0], GenerationParams(max_tokens=8)).logprobs is None  # not asked: none


def test_the_result_cache_does_not_answer_a_logprobs_request_with_an_answer_without_them():
    servicer = TierServicer(load_engine(COMMITTED_MODELS, "edge", threads=1), limits=LimitsConfig())
    try:
        req = pb.InferRequest(prompt=PROMPTS[1], parameters=pb.Parameters(max_tokens=8))
        assert not servicer.handle(req, 60).choices[0].logprobs
        req.parameters.logprobs, req.parameters.top_logprobs = True, 2
        again = servicer.handle(req, 60)
        assert not again.cached and len(again.choices[0].logprobs) == again.usage.completion_tokens
        assert all(len(t.top_logprobs) == 2 for t in again.choices[0].logprobs)
        assert servicer.handle(req, 60).cached  # the same question again: cached, logprobs and all
    finally:
        servicer.scheduler.close()
