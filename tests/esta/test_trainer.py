"""ESTA training: the step, SNIP scores, accumulation, baselines, checkpoint/resume, evaluation."""
import pytest
import torch
import torch.nn.functional as F

from esta.sampling import snip_score
from esta.evaluate import evaluate
from esta.train import Trainer, TrainConfig

timm = pytest.importorskip("timm", reason="timm is not installed (pip install torchvision==0.29.1 timm)")

from tests.helpers.models import record_grads, tiny_model  # noqa: E402


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (n,), generator=g)
    return list(zip(x, y))


def _config(**kw):
    base = dict(epochs=2, batch_size=8, warmup_epochs=0.5, sampler_warmup_epochs=0.5, num_intervals=4, base_lr=0.02)
    base.update(kw)
    return TrainConfig(**base)


def _fresh(seed=0):
    torch.manual_seed(seed)
    model = tiny_model()
    model.init_stitching_layers(torch.stack([x for x, _ in _data(16, seed=9)]))
    return model


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("score", ["snip", "relative-snip"])
def test_step_trains_teacher_and_stitch_and_scores_snip(score):
    model = _fresh()
    trainer = Trainer(model, _data(), _config(score=score))
    assert trainer.lr == pytest.approx(0.02 * 8 / 256)
    before = _trainable(model)
    record = trainer.train_step()
    i = record["stitch"]
    assert record["phase"] == "stitch" and 0 <= i < len(model)
    after = _trainable(model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    head = "anchors.2.model.head.weight"
    assert head in changed  # the teacher (largest anchor) trained
    assert any(".lora_b" in n for n in changed)  # LoRA trained (B starts at zero, so its gradient is not)
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any("mlp.fc1" in n for n in frozen) and not any("mlp.fc1" in n for n in changed)
    # the SNIP score fed to the sampler equals a direct computation from the stitch-only gradient
    model2 = _fresh()
    model2.to_pst()
    model2.load_state_dict({**model2.state_dict(), **{n: before[n] for n in before}})
    x, y = next(Trainer(model2, _data(), _config())._batches(0))
    with torch.no_grad():
        hard = model2(x, stitch=len(model2.anchors) - 1).argmax(-1)
    model2.zero_grad(set_to_none=True)
    logits = model2(x, stitch=i)
    loss = 0.5 * F.cross_entropy(logits, y) + 0.5 * F.cross_entropy(logits, hard)
    loss.backward()
    assert record["loss_stitch"] == pytest.approx(float(loss.detach()), rel=1e-6)
    total, count = snip_score(model2.member_parameters(i))
    expected = total / count if score == "snip" else total / count / float(loss.detach())  # relative: SNIP of log L
    assert record["snip"] == pytest.approx(total / count, rel=1e-6)
    assert trainer.sampler.scores[i].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("score", ["snip", "relative-snip"])
def test_a_zero_loss_leaves_the_relative_score_alone(score):
    # the relative score divides by the stitch's loss: a step whose (global) loss is 0 carries no gradient to
    # learn from, so the sampler is not updated; the plain SNIP score is updated as usual
    trainer = Trainer(_fresh(), _data(), _config(score=score))
    trainer._mean_over_ranks = lambda **local: {k: 0.0 if k.startswith("loss") else v for k, v in local.items()}
    record = trainer.train_step()
    assert record["snip"] > 0
    assert int(trainer.sampler.num_updates.sum()) == (1 if score == "snip" else 0)


def test_drawn_teacher_is_trained_once_and_scored_on_its_own_loss():
    model = _fresh()
    trainer = Trainer(model, _data(), _config(batch_size=4, accum_steps=2))
    teacher = trainer.teacher
    assert teacher == len(model.anchors) - 1
    trainer.sampler.sample = lambda: teacher  # the sampler draws the largest anchor itself
    calls = []
    model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs.get("stitch")), with_kwargs=True)
    grads = record_grads(trainer)
    before = _trainable(model)
    record = trainer.train_step()
    assert calls == [teacher, teacher]  # one forward per micro-batch: no second, self-distilling pass
    assert record["stitch"] == teacher and record["loss_stitch"] == record["loss_teacher"]
    # the step's gradient is the teacher's cross-entropy on the whole batch, once
    model2 = _fresh()
    model2.to_pst()
    model2.load_state_dict({**model2.state_dict(), **before})
    x = torch.cat([b[0] for b in trainer._batches(0)])
    y = torch.cat([b[1] for b in trainer._batches(0)])
    model2.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model2(x, stitch=teacher), y)
    loss.backward()
    assert record["loss_teacher"] == pytest.approx(float(loss.detach()), rel=1e-5)
    expected = {n: p.grad for n, p in model2.named_parameters() if p.grad is not None}
    assert grads[0].keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(grads[0][n], expected[n], rtol=1e-4, atol=1e-7, msg=n)
    # ... and its score is the SNIP of that gradient
    total, count = snip_score(model2.member_parameters(teacher))
    assert trainer.sampler.scores[teacher].item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("score", ["snip", "relative-snip"])
def test_accumulation_matches_one_big_batch(score):
    a, b = _fresh(), _fresh()
    ta = Trainer(a, _data(), _config(batch_size=8, accum_steps=2, score=score))
    tb = Trainer(b, _data(), _config(batch_size=16, accum_steps=1, score=score))
    assert ta.global_batch == tb.global_batch == 16 and ta.lr == tb.lr
    ga, gb = record_grads(ta), record_grads(tb)
    ra, rb = ta.train_step(), tb.train_step()
    assert ra["stitch"] == rb["stitch"]
    assert ra["loss_stitch"] == pytest.approx(rb["loss_stitch"], rel=1e-5)
    assert ra["loss_teacher"] == pytest.approx(rb["loss_teacher"], rel=1e-5)
    assert ga[0].keys() == gb[0].keys() and len(ga[0]) > 0
    for n in ga[0]:
        torch.testing.assert_close(ga[0][n], gb[0][n], rtol=1e-4, atol=1e-7, msg=n)
    # the SNIP score of the accumulated (stitch-only) gradient is the big batch's
    torch.testing.assert_close(ta.sampler.scores, tb.sampler.scores, rtol=1e-4, atol=0, equal_nan=True)


def test_resume_continues_exactly(tmp_path):
    config = _config(epochs=2, clip_grad=1.0)
    straight = Trainer(_fresh(), _data(), config)
    straight.fit()
    first = Trainer(_fresh(), _data(), config)
    first.fit(steps=5, checkpoint=str(tmp_path / "ck.pt"))
    torch.manual_seed(1234)  # a resumed process starts from other RNG states
    resumed = Trainer(_fresh(), _data(), config)
    resumed.load(str(tmp_path / "ck.pt"))
    assert resumed.step == 5
    assert resumed.history == first.history  # the history travels with the checkpoint
    resumed.fit()
    assert resumed.history == straight.history  # every step since the start, bit for bit
    for (n, p), q in zip(_trainable(straight.model).items(), _trainable(resumed.model).values()):
        assert torch.equal(p, q), n
    assert torch.equal(straight.sampler.scores.nan_to_num(-1), resumed.sampler.scores.nan_to_num(-1))


def test_schedule_warmup_cosine_and_lr_scaling():
    trainer = Trainer(_fresh(), _data(), _config(epochs=4, warmup_epochs=1))
    spe = trainer.steps_per_epoch
    lrs = [r["lr"] for r in trainer.fit()]
    peak = trainer.lr
    assert lrs[spe - 2] == pytest.approx(peak)  # end of the linear warm-up (lr after step spe-1)
    assert all(x <= peak * (1 + 1e-9) for x in lrs)
    assert lrs[-2] < 0.1 * peak  # cosine towards zero
    assert lrs[: spe - 1] == sorted(lrs[: spe - 1])


@pytest.mark.parametrize("kw", [dict(sampling="uniform"), dict(stitch_bias=False), dict(finetune="full"),
                                dict(method="adapt-then-stitch", adapt_epochs=1), dict(bf16=True)])
def test_baselines_run(kw):
    model = _fresh()
    weights_before = [l.weight.clone() for g in model.stitching_layers for l in g]
    trainer = Trainer(model, _data(), _config(**kw))
    records = trainer.fit()
    assert len(records) == trainer.total_steps
    assert all(torch.isfinite(torch.tensor(r["loss_teacher"])) for r in records)
    if kw.get("finetune") == "full":
        assert all(p.requires_grad for p in model.parameters())
    if kw.get("stitch_bias") is False:
        assert trainer.model.trainable_report()["attention stitch bias"] == 0
    if kw.get("method") == "adapt-then-stitch":
        spe = trainer.steps_per_epoch
        assert [r["phase"] for r in records[: 3 * spe]] == ["adapt"] * (3 * spe)
        assert [r["stitch"] for r in records[: 3 * spe]] == [0] * spe + [1] * spe + [2] * spe
        weights_after = [l.weight for g in model.stitching_layers for l in g]
        assert any(not torch.equal(a, b) for a, b in zip(weights_before, weights_after))  # re-solved
    deployed = trainer.sampler.deploy()
    acc = evaluate(model, _data(16, seed=3), deployed)
    assert set(acc) == set(deployed) and all(0 <= v <= 1 for v in acc.values())


def test_evaluate_counts_correctly():
    model = _fresh().eval()
    data = _data(20, seed=5)
    acc = evaluate(model, data, [0, 4], batch_size=7)
    x = torch.stack([x for x, _ in data])
    y = torch.stack([y for _, y in data])
    with torch.no_grad():
        for i in (0, 4):
            assert acc[i] == pytest.approx(float((model(x, stitch=i).argmax(-1) == y).float().mean()))
    grad_mode = []
    hook = model.register_forward_hook(lambda m, args, out: grad_mode.append(torch.is_grad_enabled()))
    acc2, correct = evaluate(model, data, [0, 4], batch_size=7, per_example=True)
    hook.remove()
    assert grad_mode and not any(grad_mode)  # evaluation builds no autograd graph
    assert acc2 == acc
    with torch.no_grad():
        for i in (0, 4):
            assert correct[i].dtype == torch.bool and correct[i].shape == (20,)
            assert torch.equal(correct[i], model(x, stitch=i).argmax(-1) == y)  # in data order, across batches


def test_config_errors():
    with pytest.raises(ValueError, match="unknown key.*learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1.0})
    for kw, match in [(dict(epochs=0), "epochs"), (dict(sampling="best"), "sampling"),
                      (dict(distill_weight=2.0), "distill_weight"), (dict(momentum=1.0), "momentum"),
                      (dict(method="adapt-then-stitch"), "adapt_epochs"), (dict(base_lr=0), "base_lr"),
                      (dict(score="grasp"), "score: must be one of 'snip', 'relative-snip'")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig.from_dict(kw)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        Trainer(_fresh(), _data(4), _config())
    trainer = Trainer(_fresh(), _data(), _config())
    from esta.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint at /nonexistent/ck.pt"):
        trainer.load("/nonexistent/ck.pt")
    other = Trainer(_fresh(), _data(), _config(seed=3))
    state = other.state_dict()
    with pytest.raises(ValueError, match="seed"):
        trainer.load_state_dict(state)


def test_a_task_object_decides_loss_distillation_and_collation():
    """The Trainer asks its task for everything task-specific: a task whose distillation target is the
    labels themselves (no teacher signal) trains exactly like distill_weight=0."""
    from esta.tasks import ClassificationTask

    class LabelsAsTarget(ClassificationTask):
        name = "labels-as-target"

        def distill_target(self, output, batch):
            return batch[1]

    a = Trainer(_fresh(), _data(), _config(), task=LabelsAsTarget())
    b = Trainer(_fresh(), _data(), _config(distill_weight=0.0))
    ra, rb = a.fit(steps=3), b.fit(steps=3)
    assert [r["stitch"] for r in ra] == [r["stitch"] for r in rb]
    for (n, p), q in zip(_trainable(a.model).items(), _trainable(b.model).values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(TypeError, match="task must be an esta.tasks.Task"):
        Trainer(_fresh(), _data(), _config(), task="classification")


def test_resume_with_another_task_is_refused(tmp_path):
    from esta.tasks import ClassificationTask

    class Other(ClassificationTask):
        name = "other"

    trainer = Trainer(_fresh(), _data(), _config())
    trainer.fit(steps=1, checkpoint=str(tmp_path / "ck.pt"))
    with pytest.raises(ValueError, match="trained on the task 'classification', this trainer's task is 'other'"):
        Trainer(_fresh(), _data(), _config(), task=Other()).load(str(tmp_path / "ck.pt"))
