from __future__ import annotations

import pytest
import torch

from tasks.artifacts import count_parameters
from tasks.config import parse_config
from tasks.errors import ConfigError
from tasks.images.arch_config import MobileArch
from tasks.images.models import MobileStudent
from tasks.images.prune import pruning_schedule
from tasks.pruning import (
    attach_masks,
    bake,
    channel_groups,
    enforce_masks,
    keep_pruned_zeros,
    prune_channels,
    prune_unstructured,
    shrink,
    sparsity_report,
)
from tasks.quantization import prepare_qat

ARCH = MobileArch(stem=8, widths=[16, 32, 32, 64], strides=[1, 2, 1, 2])
MIXED = MobileArch(stem=8, stem_stride=2, widths=[16, 32, 32, 64], strides=[1, 2, 1, 2],
                   kinds=["fused", "fused", "fused", "separable"])


def _student(arch: MobileArch = ARCH):
    torch.manual_seed(0)
    model = MobileStudent(arch).eval()
    for m in model.modules():  # non-trivial batch-norm state, as after training
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    attach_masks(model)
    return model


def test_cubic_schedule_ramps_to_the_final_sparsity(config):
    schedule = config.prune.vision.model_copy(update={"steps": 4, "final_sparsity": 0.8})
    values = [schedule.sparsity_after(k) for k in range(1, 5)]
    assert values == sorted(values) and values[0] > 0.3 and values[-1] == pytest.approx(0.8)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_unstructured_pruning_hits_the_target(scope):
    model = _student()
    prune_unstructured(model, 0.6, scope)
    report = sparsity_report(model)
    assert report["overall"] == pytest.approx(0.6, abs=0.02)
    if scope == "layer":
        assert all(v == pytest.approx(0.6, abs=0.1) for k, v in report.items() if k != "overall")


def test_masks_hold_through_training_and_bake_into_a_plain_model():
    model = _student().train()
    prune_unstructured(model, 0.5, "global")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 1, 28, 28)).sum().backward()
        opt.step()
    enforce_masks(model)
    plain = bake(model, ARCH)
    assert not any(hasattr(m, "weight_mask") for m in plain.modules())
    assert sparsity_report(plain)["overall"] == pytest.approx(sparsity_report(model)["overall"])


def _pruned_and_shrunk(model, arch, fraction):
    """Prune ``fraction`` of the channels, shrink, and check the narrower model computes what the masked one did;
    return the small model, its arch, the input and the reference output."""
    prune_channels(model, fraction, min_channels=4)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        reference = model(x)
        small, small_arch = shrink(model, arch)
        torch.testing.assert_close(small(x), reference, rtol=1e-3, atol=1e-3)
    return small, small_arch, x, reference


@pytest.mark.parametrize("arch", [ARCH, MIXED], ids=["separable", "fused+separable"])
def test_structured_pruning_removes_channels_and_keeps_the_function(arch):
    model = _student(arch)
    assert channel_groups(model) == [[0], [1, 2], [3]]
    small, small_arch, x, reference = _pruned_and_shrunk(model, arch, 0.5)
    assert small_arch.widths == [8, 16, 16, 32] and count_parameters(small) < count_parameters(model) / 2
    assert small_arch.kinds == arch.kinds and small_arch.stem_stride == arch.stem_stride
    assert small.blocks[2].residual  # the residual group was pruned jointly, so the shortcut survives
    # block 0 shrinks to the stem's width at stride 1, yet must not gain a shortcut the trained model never had
    assert not small.blocks[0].residual and small_arch.residual == [False, False, True, False]
    rebuilt = MobileStudent(small_arch).eval()
    rebuilt.load_state_dict(small.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), reference, rtol=1e-3, atol=1e-3)


def test_blocks_residual_on_the_unpruned_stem_keep_their_channels():
    """Block 0 (and residual blocks after it) add the stem's output, which is never pruned: their channels must
    stay. Before: block 0 formed a group of its own, was pruned, and shrink failed (16 -> 12 residual)."""
    arch = MobileArch(stem=16, widths=[16, 16, 32], strides=[1, 1, 2])
    model = _student(arch)
    assert model.blocks[0].residual and model.blocks[1].residual
    assert channel_groups(model) == [[2]]
    _, small_arch, _, _ = _pruned_and_shrunk(model, arch, 0.25)
    assert small_arch.widths == [16, 16, 24] and small_arch.residual == [True, True, False]


def test_pruning_schedule_prunes_only_at_step_boundaries(config):
    cfg = config.prune.vision.model_copy(update={"steps": 2, "epochs_per_step": 2, "epochs": 5, "final_sparsity": 0.5})
    model = _student()
    hook = pruning_schedule(model, cfg)
    seen = []
    for epoch in range(5):
        hook(epoch)
        seen.append(round(sparsity_report(model)["overall"], 2))
    assert seen[0] == seen[1] > 0 and seen[2] == seen[3] == seen[4] == pytest.approx(0.5, abs=0.02)


def test_pruned_zeros_survive_qat_training():
    model = _student()
    prune_unstructured(model, 0.5, "global")
    qat = prepare_qat(bake(model, ARCH), 8, torch.randn(2, 1, 28, 28))
    assert keep_pruned_zeros(qat, min_sparsity=0.01) > 0
    opt = torch.optim.SGD(qat.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        qat(torch.randn(4, 1, 28, 28)).sum().backward()
        opt.step()
    enforce_masks(qat)
    zeros = sum(int((m.weight == 0).sum()) for m in qat.modules() if hasattr(m, "weight_mask"))
    masked = sum(int((m.weight_mask == 0).sum()) for m in qat.modules() if hasattr(m, "weight_mask"))
    assert zeros >= masked > 0
    assert not any("weight_mask" in k for k in qat.state_dict())


@pytest.mark.parametrize("section,change,pattern", [
    ("prune", {"final_sparsity": 1.0}, r"prune\.vision\.final_sparsity"),
    ("prune", {"final_sparsity": -0.1}, r"prune\.vision\.final_sparsity"),
    ("prune", {"epochs": 2, "steps": 4, "epochs_per_step": 1}, r"prune\.vision: .*must cover steps"),
    ("prune", {"mode": "channels"}, r"prune\.vision\.mode"),
])
def test_bad_pruning_params_are_rejected_at_load(raw_params, section, change, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config({**raw_params, section: {"vision": {**raw_params[section]["vision"], **change}}})


@pytest.mark.parametrize("stages,pattern", [
    pytest.param(["distill", "sparsify"],
                 r"recipe\.vision\.1: Input should be 'distill', 'prune', 'qat' or 'share' .*'sparsify'",
                 marks=pytest.mark.fault("params", "a recipe naming a stage that does not exist",
                                         "ConfigError at load naming recipe.vision.1, the value and the stages "
                                         "there are")),
    (["qat", "qat"], r"recipe\.vision: .*lists a stage twice"),
])
def test_bad_recipes_are_rejected_at_load(raw_params, stages, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config({**raw_params, "recipe": {"vision": stages}})
