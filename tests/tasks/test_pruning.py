from __future__ import annotations

import pytest
import torch

from tasks.artifacts import count_parameters, derived_extra, load_model, model_meta, qat_extra, save_model
from tasks.channel_pruning import channel_groups, prune_channels, shrink
from tasks.config import parse_config
from tasks.errors import ConfigError
from tasks.images.arch_config import MobileArch, ResNetArch
from tasks.images.models import MobileStudent, ResNetTeacher
from tasks.images.prune import pruning_schedule
from tasks.layer_widths import channel_widths
from tasks.pruning import (
    attach_masks,
    bake,
    enforce_masks,
    keep_pruned_zeros,
    prune_unstructured,
    sparsity_report,
)
from tasks.quantization import prepare_qat

ARCH = MobileArch(stem=8, widths=[16, 32, 32, 64], strides=[1, 2, 1, 2])
MIXED = MobileArch(stem=8, stem_stride=2, widths=[16, 32, 32, 64], strides=[1, 2, 1, 2],
                   kinds=["fused", "fused", "fused", "separable"])


def _student(arch: MobileArch | ResNetArch = ARCH):
    torch.manual_seed(0)
    model = (MobileStudent(arch) if isinstance(arch, MobileArch) else ResNetTeacher(arch)).eval()
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


@pytest.mark.slow
def test_masks_hold_through_training_and_bake_into_a_plain_model():
    model = _student().train()
    prune_unstructured(model, 0.5, "global")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 1, 28, 28)).sum().backward()
        opt.step()
    enforce_masks(model)
    plain = bake(model)
    assert not any(hasattr(m, "weight_mask") for m in plain.modules()) and not plain._forward_pre_hooks
    assert not any(m._forward_pre_hooks for m in plain.modules())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model.eval()(x))
    assert sparsity_report(plain)["overall"] == pytest.approx(sparsity_report(model)["overall"])


def _pruned_and_shrunk(model, fraction):
    """Prune ``fraction`` of every channel group in two steps, shrink, and check the narrower model computes what the
    masked one did; return the small model, the input and the reference output."""
    x = torch.randn(4, 1, 28, 28)
    groups = channel_groups(model, x[:1])
    prune_channels(groups, fraction / 2, min_channels=4)
    prune_channels(groups, fraction, min_channels=4)   # what the first step dropped stays dropped
    with torch.no_grad():
        reference = model(x)
        small = shrink(model, x[:1])
        torch.testing.assert_close(small(x), reference, rtol=1e-4, atol=1e-5)
    return small, x, reference


RESNET = ResNetArch(stem=8, widths=[16, 32], blocks=[2, 1])


@pytest.mark.slow
@pytest.mark.parametrize("arch", [ARCH, MIXED, RESNET], ids=["separable", "fused+separable", "resnet"])
def test_structured_pruning_removes_channels_of_any_cnn_and_keeps_the_function(arch, tmp_path):
    """Before: channel pruning knew one class (MobileStudent: its blocks, producers and readers named in code); the
    dependency graph finds the coupled channels of any traced CNN, the ResNet teacher's residual stages included."""
    model = _student(arch)
    small, x, reference = _pruned_and_shrunk(model, 0.5)
    assert count_parameters(small) < count_parameters(model) / 2.5
    widths, full = channel_widths(small), channel_widths(model)
    assert widths["head"][0] == 10   # the classifier keeps its classes
    assert widths.keys() == full.keys() and all(w[0] <= full[name][0] for name, w in widths.items())
    assert sum(w[0] for w in widths.values()) < 0.6 * sum(w[0] for w in full.values())
    if isinstance(model, MobileStudent):
        assert [b.residual for b in small.blocks] == [b.residual for b in model.blocks]   # shortcuts survive
    # the model file: the unpruned architecture and the pruned layer widths; load_model conforms, then loads
    path = tmp_path / "pruned.pt"
    save_model(small, "pruned", arch, path, channels=widths)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(x), reference, rtol=1e-4, atol=1e-5)


def test_blocks_residual_on_the_stem_are_pruned_with_it():
    """Block 0 (and residual blocks after it) add the stem's output: one channel space, pruned as one group. Before:
    block 0 formed a group of its own, was pruned, and shrink failed (16 -> 12 residual); then the stem and the blocks
    on it were never pruned at all."""
    arch = MobileArch(stem=16, widths=[16, 16, 32], strides=[1, 1, 2])
    model = _student(arch)
    assert model.blocks[0].residual and model.blocks[1].residual
    small, _, _ = _pruned_and_shrunk(model, 0.25)
    widths = channel_widths(small)
    assert widths["stem.0"][0] == widths["blocks.0.pointwise.0"][0] == widths["blocks.1.pointwise.0"][0] == 12
    assert [b.residual for b in small.blocks] == [True, True, False]


def test_a_qat_student_of_a_structurally_pruned_one_is_rebuilt_from_its_file(tmp_path):
    """QAT trains the narrower student; its file carries the pruned widths (derived_extra) beside the QAT settings,
    so load_model conforms the float model before preparing it for QAT and loading the weights."""
    from tasks.images.config import QatImages

    small, x, _ = _pruned_and_shrunk(_student(MIXED), 0.5)
    pruned = tmp_path / "pruned.pt"
    save_model(small, "mobile_student", MIXED, pruned, channels=channel_widths(small))
    qat = prepare_qat(load_model(pruned), 8, x[:2])
    qat(x)   # observers see data
    cfg = QatImages.model_construct(activation_bits=8, weight_bits=8, float_modules=[])
    save_model(qat, "mobile_student", MIXED, tmp_path / "qat.pt", **qat_extra(cfg),
               **derived_extra(model_meta(pruned)))
    rebuilt = load_model(tmp_path / "qat.pt")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), qat.eval()(x))


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
    qat = prepare_qat(bake(model), 8, torch.randn(2, 1, 28, 28))
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


class _GroupNormNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(1, 8, 3), torch.nn.GroupNorm(2, 8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x)).mean(dim=(2, 3)))


class _ConvClassifier(torch.nn.Module):
    """Its classifier is a 1x1 convolution whose output is averaged: no layer makes the output itself."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.classify = torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(torch.relu(self.conv(x))).mean(dim=(2, 3))


@pytest.mark.fault("data", "structured pruning asked of a CNN it cannot rebuild or whose classifier it cannot find "
                   "(a GroupNorm in a channel group; a 1x1-conv classifier averaged into the output)",
                   "one line (exit 2) naming the layer, or saying the shrunk model computes something else; no "
                   "model written (before: a ValueError's traceback)")
def test_a_model_structured_pruning_cannot_keep_whole_is_refused_not_changed(capsys):
    """Review finding: a GroupNorm's statistics mix kept and dropped channels and its width is not in the model file;
    a classifier that is no output layer was pruned too, silently turning 10 logits into 5."""
    from tasks.errors import EXIT_USER_ERROR, run_cli

    x = torch.randn(2, 1, 12, 12)
    with pytest.raises(ValueError, match=r"norm: a GroupNorm shares channels with conv; structured pruning rebuilds "
                                         r"only Conv2d, Linear and BatchNorm"):
        channel_groups(_GroupNormNet(), x)
    with pytest.raises(SystemExit) as stopped:   # a stage's command line: one line, a user error
        run_cli(lambda: channel_groups(_GroupNormNet(), x))
    assert stopped.value.code == EXIT_USER_ERROR
    assert capsys.readouterr().err.startswith("error: StructuredPruningError: norm: a GroupNorm shares channels")
    model = _ConvClassifier()
    attach_masks(model)
    prune_channels(channel_groups(model, x), 0.5, min_channels=1)
    with pytest.raises(ValueError, match=r"changed what the model computes \(output \(2, 10\) -> \(2, 5\)\)"):
        shrink(model, x)
