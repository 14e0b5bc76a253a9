"""Training details: the packed batch is the padded batch without padding; weight averaging."""

import pytest
import torch

from tierline.build import train as train_module
from tierline.build.train import TrainConfig, distill_alpha_at, encode_batch, level_schedule, pack_batch, train
from tierline_shared.models.configs import DecoderConfig
from tierline_shared.models.llama import Decoder
from tierline_shared.models.tokenizer import TextTokenizer
from tierline_shared.tasks.problems import generate

TOK = TextTokenizer.default()


def small_config(layers: int) -> DecoderConfig:
    return DecoderConfig(vocab_size=TOK.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=256)


def test_pack_batch_is_the_padded_batch_without_padding():
    problems = generate("train", 12, seed=4)
    ids, targets, select, packing = pack_batch(problems, TOK, 256, group_rows=4)
    x, y, m = encode_batch(problems, TOK, 256)
    real = x != TOK.pad_id
    lengths = real.sum(1)
    order = sorted(range(len(problems)), key=lambda i: -int(lengths[i]))  # longest first, stable
    assert torch.equal(ids, torch.cat([x[i][real[i]] for i in order]))
    assert torch.equal(targets, torch.cat([y[i][m[i]] for i in order]))
    assert torch.equal(select, torch.cat([m[i][real[i]] for i in order]))
    assert [g.rows for g in packing.groups] == [4, 4, 4]
    assert [g.width for g in packing.groups] == [int(lengths[order[k]]) for k in (0, 4, 8)]


def test_ema_weights_are_the_average_of_the_steps():
    cfg = small_config(1)
    torch.manual_seed(0)
    model = Decoder(cfg)
    seen = []
    tc = TrainConfig(steps=6, batch_size=4, warmup=1, ema_decay=0.5, token_factors=False)
    up = model.model.layers[0].mlp.up_proj
    train(model, TOK, tc, progress=lambda step, loss: seen.append(up.weight.detach().clone()))
    expected = seen[0]
    for w in seen[1:]:
        expected = 0.5 * expected + 0.5 * w
    torch.testing.assert_close(up.weight, expected)
    assert not torch.allclose(up.weight, seen[-1])


def test_ema_decay_is_validated():
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)


def test_packed_and_padded_training_take_the_same_steps():
    """Packing changes the work, not the training: same losses step by step (up to float rounding)."""
    cfg = small_config(2)
    losses = {}
    for packed in (True, False):
        torch.manual_seed(0)
        teacher = Decoder(cfg)
        model = Decoder(cfg)
        seen = []
        tc = TrainConfig(steps=8, batch_size=8, warmup=2, distill_alpha=0.5, packed=packed)
        train(model, TOK, tc, teacher=teacher, progress=lambda step, loss: seen.append(loss))
        losses[packed] = seen
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), atol=1e-4, rtol=1e-4)


def test_distill_weight_moves_to_its_end_value():
    tc = TrainConfig(steps=5, distill_alpha=0.5, distill_alpha_end=0.0)
    assert [distill_alpha_at(s, tc) for s in range(5)] == [0.5, 0.375, 0.25, 0.125, 0.0]
    assert distill_alpha_at(3, TrainConfig(steps=5, distill_alpha=0.5)) == 0.5
    half = TrainConfig(steps=9, distill_alpha=0.5, distill_alpha_end=0.0, distill_until=0.5)
    assert [distill_alpha_at(s, half) for s in range(9)] == [0.5, 0.375, 0.25, 0.125, 0.0, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="distill_alpha_end"):
        TrainConfig(distill_alpha=0.3, distill_alpha_end=0.5)
    with pytest.raises(ValueError, match="distill_until"):
        TrainConfig(distill_alpha=0.5, distill_alpha_end=0.0, distill_until=0.0)
    # in training: the first step is the constant weight's, the last one is the hard labels' only
    cfg = small_config(1)
    runs = {}
    for end in (None, 0.0):
        torch.manual_seed(0)
        teacher, model, seen = Decoder(cfg), Decoder(cfg), []
        tc = TrainConfig(steps=3, batch_size=4, warmup=1, distill_alpha=0.5, distill_alpha_end=end)
        train(model, TOK, tc, teacher=teacher, progress=lambda step, loss: seen.append(loss))
        runs[end] = seen
    assert runs[None][0] == pytest.approx(runs[0.0][0])
    assert runs[None][2] != pytest.approx(runs[0.0][2])


def test_a_zero_distill_weight_skips_the_teacher(monkeypatch):
    """Once the KL weight reaches 0 the teacher is not run, and the steps are the hard labels' alone."""
    cfg = small_config(1)
    torch.manual_seed(0)
    teacher = Decoder(cfg)
    calls, packed_forward = [], train_module.forward_packed

    def counted(net, *args):
        if net is teacher:
            calls.append(1)
        return packed_forward(net, *args)
    monkeypatch.setattr(train_module, "forward_packed", counted)
    runs = {}
    for name, alpha in (("distilled", 0.5), ("hard", 0.0)):
        torch.manual_seed(1)
        model, seen = Decoder(cfg), []
        tc = TrainConfig(steps=6, batch_size=4, warmup=1, distill_alpha=alpha,
                         distill_alpha_end=0.0 if alpha else None, distill_until=0.4)
        calls.clear()
        train(model, TOK, tc, teacher=teacher if alpha else None, progress=lambda step, loss: seen.append(loss))
        runs[name] = (seen, len(calls))
    # steps 0 and 1 have a weight above 0 (0.5, 0.25); from step 2 (weight 0) the teacher is skipped
    assert runs["distilled"][1] == 2
    assert runs["distilled"][0][0] != pytest.approx(runs["hard"][0][0])


def test_hard_levels_get_their_share_of_the_batches():
    levels = (1, 2, 3, 4, 5)
    assert level_schedule(TrainConfig(), levels) == [1, 2, 3, 4, 5]
    assert level_schedule(TrainConfig(hard_share=2), levels) == [1, 2, 3, 3, 4, 4, 5, 5]
    assert level_schedule(TrainConfig(hard_share=2, hard_from=2), levels) == [1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert level_schedule(TrainConfig(hard_share=2, hard_from=2), (1, 2)) == [1, 2, 2]
    with pytest.raises(ValueError, match="hard_from"):
        TrainConfig(hard_from=0)


def _small(seed: int = 0) -> Decoder:
    torch.manual_seed(seed)
    return Decoder(small_config(1))


def test_a_background_training_gives_the_weights_of_one_here(tmp_path):
    from tierline.build.background import BackgroundTrain

    tc = TrainConfig(steps=5, batch_size=4, warmup=1)
    here, there = _small(), _small()
    torch.set_num_threads(1)  # the background process trains with one thread too
    try:
        expected_summary = train(here, TOK, tc)
    finally:
        torch.set_num_threads(2)
    steps = []
    job = BackgroundTrain(there, tc, (1, 2, 3, 4, 5), threads=1, work=tmp_path,
                          on_step=lambda step, loss: steps.append(step))
    try:
        summary = job.wait()
    finally:
        job.close()
    assert steps == [1, 2, 3, 4, 5]
    assert job.seconds > 0 and job.seconds + 0.1 >= summary["seconds"]  # spawn and import included
    assert summary["final_loss"] == expected_summary["final_loss"]
    for (name, a), (_, b) in zip(here.state_dict().items(), there.state_dict().items()):
        assert torch.equal(a, b), name
    assert not list(tmp_path.iterdir())  # its weights file is consumed


def test_a_failing_background_training_raises_its_error(tmp_path):
    from tierline.build.background import BackgroundTrain

    job = BackgroundTrain(_small(), TrainConfig(steps=2, batch_size=4, warmup=1), (7,), threads=1, work=tmp_path,
                          on_step=lambda step, loss: None)
    try:
        with pytest.raises(RuntimeError, match="background training failed: .*7"):
            job.wait()
    finally:
        job.close()


def test_a_background_training_needs_no_teacher(tmp_path):
    from tierline.build.background import BackgroundTrain

    with pytest.raises(ValueError, match="distill_alpha"):
        BackgroundTrain(_small(), TrainConfig(steps=2, distill_alpha=0.5), (1,), threads=1, work=tmp_path,
                        on_step=lambda step, loss: None)
