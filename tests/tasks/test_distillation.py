"""Distillation is done right: log-probabilities in the KL, a frozen teacher, gradients to the student only,
gradients zeroed every step."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tasks.config import parse_config
from tasks.distillation import (
    Distiller,
    FoldedTeacher,
    decoupled_kd,
    distillation_loss,
    hint_loss,
    inference_teacher,
    soft_target_kl,
    soft_target_mse,
)
from tasks.errors import ConfigError
from tasks.family_config import LossWeights, Optimizer, Schedule
from tasks.image_training import Split, fit
from tasks.images.arch_config import MobileArch, ResNetArch
from tasks.images.config import Augmentation, DistillImages, FeaturePair
from tasks.images.models import MobileStudent, ResNetTeacher
from tasks.training import train_step


def _kd_cfg(**weights) -> DistillImages:
    w = {"ground_truth": 0.3, "target": 0.7, "feature": 0.5, "label": 0.2, **weights}
    return DistillImages(student=MobileArch(stem=4, widths=[8, 16], strides=[2, 2]), temperature=4.0,
                         target_loss="kl", weights=LossWeights(**w), feature_pairs=[FeaturePair(teacher=1, student=1)],
                         epochs=1, batch_size=16, optimizer=Optimizer(name="sgd", lr=0.05, weight_decay=0.0),
                         schedule=Schedule(name="constant"), augmentation=Augmentation(crop_padding=0, horizontal_flip=False),
                         label_smoothing=0.0, seed=0, threads=2, bf16=False, teacher_bf16=False,
                         teacher_runtime="pytorch")   # a PyTorch teacher: what FrozenTeacher must freeze


def _pair(cfg: DistillImages, x: torch.Tensor) -> Distiller:
    torch.manual_seed(0)
    teacher = ResNetTeacher(ResNetArch(stem=4, widths=[8, 12], blocks=[1, 1]))
    teacher.train()  # a careless caller hands over a teacher in train mode; the Distiller must freeze it
    return Distiller(MobileStudent(cfg.student), teacher, cfg, x)


def _data(n=32):
    gen = torch.Generator().manual_seed(0)
    return Split(torch.randint(0, 256, (n, 28, 28), generator=gen, dtype=torch.uint8), torch.randint(0, 10, (n,), generator=gen))


def test_kl_compares_log_probabilities_and_scales_by_t_squared():
    s, t, temp = torch.randn(8, 10), torch.randn(8, 10), 3.0
    p_t = F.softmax(t / temp, 1)
    manual = (p_t * (F.log_softmax(t / temp, 1) - F.log_softmax(s / temp, 1))).sum(1).mean() * temp ** 2
    torch.testing.assert_close(soft_target_kl(s, t, temp), manual)
    assert soft_target_kl(t, t, temp).abs() < 1e-6 and soft_target_kl(s, t, temp) > 0
    # the article's bug, KLDivLoss on raw logits, gives a different (and meaningless) number
    assert not torch.isclose(F.kl_div(s, t, reduction="batchmean"), manual)


def test_probability_mse_variant():
    t = torch.randn(4, 10)
    assert soft_target_mse(t, t, 2.0) == 0 and soft_target_mse(torch.randn(4, 10), t, 2.0) > 0


def test_decoupled_kd_splits_kl_into_target_and_non_target_parts():
    """Per image, KL = TCKD + (1 − p_t)·NCKD (Zhao et al., eq. 1): with alpha 1 and beta 1 − p_t, DKD is the KL."""
    gen = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(5, 10, generator=gen), torch.randn(5, 10, generator=gen) * 3, torch.arange(5)
    for i in range(5):
        p_t = torch.softmax(t[i] / 4.0, 0)[y[i]].item()
        kl = soft_target_kl(s[i:i + 1], t[i:i + 1], 4.0)
        torch.testing.assert_close(decoupled_kd(s[i:i + 1], t[i:i + 1], y[i:i + 1], 4.0, 1.0, 1.0 - p_t), kl)
    assert decoupled_kd(t, t, y, 4.0, 1.0, 8.0).abs() < 1e-5 and decoupled_kd(s, t, y, 4.0, 1.0, 8.0) > 0
    # the weights decouple: beta 0 leaves the target-vs-rest part alone, alpha 0 the part among the non-targets
    parts = decoupled_kd(s, t, y, 4.0, 1.0, 0.0), decoupled_kd(s, t, y, 4.0, 0.0, 1.0)
    torch.testing.assert_close(decoupled_kd(s, t, y, 4.0, 2.0, 8.0), 2.0 * parts[0] + 8.0 * parts[1])


def test_decoupled_kd_keeps_pulling_a_student_far_more_confident_than_its_teacher():
    """Before: the student's non-target probability was floored at 1e-12 before its log, so once the student's gold
    logit stood ~30 T above the rest, TCKD stopped growing and gave that logit no gradient at all."""
    s = torch.zeros(1, 10, dtype=torch.float64)
    s[0, 3] = 35.0
    t = torch.zeros(1, 10)
    t[0, 3] = 2.0
    y = torch.tensor([3])

    def reference(z: torch.Tensor) -> torch.Tensor:   # TCKD in float64 log space
        def two_way(logits: torch.Tensor) -> torch.Tensor:
            lp = torch.log_softmax(logits.double(), dim=1)
            return torch.stack([lp[0, 3], torch.cat([lp[0, :3], lp[0, 4:]]).logsumexp(0)])
        p, q = two_way(t), two_way(z)
        return (p.exp() * (p - q)).sum()

    ours = s.clone().requires_grad_(True)
    loss = decoupled_kd(ours, t, y, 1.0, 1.0, 0.0)
    loss.backward()
    mirror = s.clone().requires_grad_(True)
    reference(mirror).backward()
    assert float(loss) == pytest.approx(17.3252, abs=1e-3)
    assert float(ours.grad[0, 3]) == pytest.approx(float(mirror.grad[0, 3]), rel=1e-4) and float(ours.grad[0, 3]) > 0.5


def test_distiller_trains_on_decoupled_kd():
    cfg, data = _kd_cfg().model_copy(update={"target_loss": "dkd"}), _data()
    model = _pair(cfg, data.inputs(slice(2)))
    total, _, parts = model.loss(data.inputs(), data.y)
    expected = decoupled_kd(model.student(data.inputs()), model.teacher_outputs(data.inputs())[0], data.y,
                            cfg.temperature, cfg.dkd.alpha, cfg.dkd.beta)
    torch.testing.assert_close(parts["target"], cfg.weights.target * expected)
    total.backward()
    assert all(p.grad is not None for p in model.student.parameters() if p.requires_grad)


def test_hint_loss_pools_to_the_smaller_map():
    assert hint_loss(torch.ones(2, 3, 8, 8), torch.ones(2, 3, 4, 4)) == 0


def _graph(loss: torch.Tensor) -> set[str]:
    """The names of the autograd nodes ``loss`` was computed through."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ for n in seen}


def test_hint_loss_pools_no_map_that_already_has_the_size():
    # The vision pair (student block 2, teacher stage 1) is 7x7 on both sides: pooling both to 7x7 was an identity
    # computed forward and backward in every distillation step.
    student = torch.randn(4, 3, 7, 7, requires_grad=True)
    teacher = torch.randn(4, 3, 7, 7).bfloat16()   # as a bf16 teacher computes it
    loss = hint_loss(student, teacher)
    assert not any("Pool" in name for name in _graph(loss))
    torch.testing.assert_close(loss, F.mse_loss(student, teacher.float()), rtol=0, atol=0)
    pooled = hint_loss(torch.randn(4, 3, 14, 14, requires_grad=True), teacher)   # the larger map is still pooled
    assert any("AdaptiveAvgPool2D" in name for name in _graph(pooled))



def test_hint_loss_keeps_a_non_square_maps_aspect():
    """Maps of an image folder's non-square images (32x48: 8x12 at stride 4). Before: both were pooled to a square the
    width's size, 12x12, stretching the height 8 -> 12 (even maps already alike were resampled)."""
    student, teacher = torch.randn(2, 3, 8, 12), torch.randn(2, 3, 8, 12)
    torch.testing.assert_close(hint_loss(student, teacher), F.mse_loss(student, teacher), rtol=0, atol=0)
    larger = torch.randn(2, 3, 16, 24)   # a map of twice the resolution: each 2x2 block against the teacher's cell
    torch.testing.assert_close(hint_loss(larger, teacher), F.mse_loss(F.avg_pool2d(larger, 2), teacher))
    tall = torch.randn(2, 3, 12, 6)   # smaller on one side each: pooled to the smaller of each side, 8x6
    torch.testing.assert_close(hint_loss(tall, teacher),
                               F.mse_loss(F.adaptive_avg_pool2d(tall, (8, 6)), F.adaptive_avg_pool2d(teacher, (8, 6))))

def test_teacher_frozen_and_only_student_and_adapters_learn():
    cfg, data = _kd_cfg(), _data()
    model = _pair(cfg, data.inputs(slice(2)))
    teacher_before = copy.deepcopy(model.teacher.state_dict())  # weights and batch-norm statistics
    student_before = copy.deepcopy(model.student.state_dict())
    adapter_before = copy.deepcopy(model.adapters.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    x = data.inputs()
    loss, _ = train_step(model, x, data.y, opt, distillation_loss, bf16=False)
    assert loss > 0 and not model.teacher.training
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    for k, v in model.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert any(not torch.equal(v, student_before[k]) for k, v in model.student.state_dict().items())
    assert any(not torch.equal(v, adapter_before[k]) for k, v in model.adapters.state_dict().items())
    assert not any(k.startswith("teacher") for k in model.state_dict())
    assert all(p.grad is not None for p in model.student.parameters())  # the student's forward ran with autograd


def _trained_like(teacher: ResNetTeacher) -> ResNetTeacher:
    """Batch-norm statistics and scales of a trained teacher, not the near identity of a fresh one (where a norm
    folded twice would go unseen)."""
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.2, 3), m.weight.data.uniform_(0.3, 2)
    return teacher


def test_the_frozen_teacher_infers_with_its_batch_norms_folded(capsys):
    """The distiller's teacher is a copy without batch norms that computes what the teacher does (channels_last, as
    the stages run it); the teacher handed over is left as it was (its mode, its weights)."""
    cfg, data = _kd_cfg(), _data()
    torch.manual_seed(0)
    arch = ResNetArch(stem=4, widths=[8, 12], blocks=[1, 1])
    teacher = _trained_like(ResNetTeacher(arch)).to(memory_format=torch.channels_last)
    before = copy.deepcopy(teacher.state_dict())
    model = Distiller(MobileStudent(cfg.student), teacher.train(), cfg, data.inputs(slice(2)))
    assert isinstance(model.teacher, FoldedTeacher) and teacher.training and capsys.readouterr().err == ""
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.teacher.modules())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    with torch.no_grad():
        logits, maps = teacher.eval().forward_features(data.inputs())
        folded_logits, folded_maps = model.teacher_outputs(data.inputs())
    for want, got in zip([logits, *maps], [folded_logits, *folded_maps], strict=True):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


class _Branchy(ResNetTeacher):
    def forward_features(self, x):
        return super().forward_features(x if x.sum() > 0 else -x)   # control flow on the data: TraceError


class _Noisy(ResNetTeacher):
    def forward_features(self, x):
        return super().forward_features(x + 0.5 * torch.randn_like(x))   # random at inference: no copy matches it


class _Sized(ResNetTeacher):
    def forward_features(self, x):
        return super().forward_features(x[:len(x)])   # len() of a traced tensor: RuntimeError


@pytest.mark.parametrize(("kind", "why"), [
    (_Branchy, "it cannot be copied and traced by torch.fx (TraceError"),
    (_Sized, "it cannot be copied and traced by torch.fx (RuntimeError"),
    ("flip", "convolutions or batch norms run more than once in one forward: model.stem.0 (2 times)"),
    (_Noisy, "the folded copy's logits differ from the teacher's on the sample"),
    ("uncopyable", "it cannot be copied and traced by torch.fx (RuntimeError")])
def test_a_teacher_that_cannot_be_folded_runs_as_it_is_and_says_why(capsys, kind, why):
    """A forward torch.fx cannot trace; a flip-averaged teacher, whose every module runs twice (fx's fuse would fold
    each batch norm twice); a copy that does not compute what the teacher does on the sample; a teacher that cannot
    be copied."""
    arch = ResNetArch(stem=4, widths=[8, 12], blocks=[1, 1], flip_average=kind == "flip")
    teacher = _trained_like((kind if isinstance(kind, type) else ResNetTeacher)(arch)).eval()
    if kind == "uncopyable":   # the legacy weight norm's computed weight refuses deepcopy
        torch.nn.utils.weight_norm(teacher.head)
        teacher(torch.zeros(1, 1, 28, 28))
    x = _data().inputs(slice(4))
    assert inference_teacher(teacher, x[:2]) is teacher
    err = capsys.readouterr().err
    assert err.startswith("note: the frozen teacher runs with its batch norms unfolded: ") and why in err


def test_gradients_are_zeroed_every_step():
    cfg, data = _kd_cfg(), _data()
    model = _pair(cfg, data.inputs(slice(2))).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: the same batch must give the same gradient
    x = data.inputs()
    train_step(model, x, data.y, opt, distillation_loss, bf16=False)
    first = [p.grad.clone() for p in model.student.parameters()]
    train_step(model, x, data.y, opt, distillation_loss, bf16=False)
    for g, p in zip(first, model.student.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)  # accumulated gradients would be twice as large


def test_every_term_contributes_and_weights_switch_terms_off():
    cfg, data = _kd_cfg(), _data()
    model = _pair(cfg, data.inputs(slice(2)))
    _, _, parts = model.loss(data.inputs(), data.y)
    assert set(parts) == {"ground_truth", "target", "feature", "label"}
    only_ce = _pair(_kd_cfg(target=0, feature=0, label=0) .model_copy(update={"feature_pairs": []}), data.inputs(slice(2)))
    _, _, parts = only_ce.loss(data.inputs(), data.y)
    assert set(parts) == {"ground_truth"}


def test_fit_trains_a_distiller_end_to_end(tmp_path):
    cfg, data = _kd_cfg(), _data(64)
    model = _pair(cfg, data.inputs(slice(2)))
    history = fit(model, data, data, cfg, tmp_path / "ck.pt", "fp", loss_fn=distillation_loss)
    assert len(history) == 1 and history[0]["train_loss"] > 0


@pytest.mark.parametrize("change,pattern", [
    ({"feature_pairs": [{"teacher": 7, "student": 1}]}, r"feature_pairs\.0\.teacher: teacher stage 7 does not exist"),
    ({"feature_pairs": [{"teacher": 0, "student": 99}]}, r"feature_pairs\.0\.student: student block 99 does not exist"),
    ({"weights": {"ground_truth": 0, "target": 0, "feature": 0, "label": 0}}, r"distill\.vision\.weights: .*at least one"),
    ({"feature_pairs": []}, r"weights\.feature > 0 needs at least one"),
    ({"temperature": 0}, r"distill\.vision\.temperature"),
    ({"target_loss": "kld"}, r"distill\.vision\.target_loss"),
    ({"target_loss": "dkd", "dkd": {"alpha": 0.0, "beta": 0.0}}, r"distill\.vision\.dkd: .*alpha and beta are both 0"),
])
def test_bad_distillation_params_are_rejected_at_load(raw_params, change, pattern):
    raw = {**raw_params, "distill": {**raw_params["distill"], "vision": {**raw_params["distill"]["vision"], **change}}}
    with pytest.raises(ConfigError, match=pattern):
        parse_config(raw)


def test_building_the_distiller_moves_no_quantization_range_or_batch_norm_statistic():
    """Before: the Distiller ran the student on its two-image sample to read its feature maps' widths, in train mode
    with observers on: every activation range of a QAT student started from two un-augmented images (~53 % of the
    shipped range of the digits' INT8 student, whose ranges freeze after 63 steps), and each batch norm counted a
    batch. Now it reads them in eval mode with the observers off, and hands the student back in its mode."""
    from tasks.observers import fake_quantizers
    from tasks.quantization import prepare_qat

    cfg = _kd_cfg()
    torch.backends.quantized.engine = "x86"
    x = _data().inputs(slice(2))
    student = prepare_qat(MobileStudent(cfg.student), 8, x, [], 8).train()
    before = copy.deepcopy(student.state_dict())
    teacher = ResNetTeacher(ResNetArch(stem=4, widths=[8, 12], blocks=[1, 1]))
    Distiller(student, teacher, cfg, x)
    after = student.state_dict()
    moved = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not moved and student.training and fake_quantizers(student)
    assert all(bool(q.observer_enabled) and bool(q.fake_quant_enabled) for q in fake_quantizers(student))
