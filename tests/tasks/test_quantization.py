from __future__ import annotations

import pytest
import torch
from torch.ao.quantization import FakeQuantizeBase

from tasks.artifacts import load_model, save_model
from tasks.config import parse_config
from tasks.distillation import loss_config
from tasks.errors import ConfigError
from tasks.images.arch_config import MobileArch
from tasks.images.models import MobileStudent
from tasks.quantization import convert_int8, freeze_schedule, prepare_qat
from tests.conftest import imported_by

ARCH = MobileArch(stem=4, widths=[8, 16, 16], strides=[2, 2, 1])


def _qat(bits=8):
    torch.manual_seed(0)
    return prepare_qat(MobileStudent(ARCH), bits, torch.randn(2, 1, 28, 28))


def _fake_quants(model):
    return [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]


def test_weights_per_channel_int8_and_activations_n_bit():
    model = _qat(bits=4)
    weights = [fq for fq in _fake_quants(model) if fq.dtype == torch.qint8]
    acts = [fq for fq in _fake_quants(model) if fq.dtype == torch.quint8]
    assert weights and all(fq.qscheme == torch.per_channel_symmetric and fq.quant_max == 127 for fq in weights)
    assert acts and all(fq.quant_min == 0 and fq.quant_max == 15 for fq in acts)
    fused = [m for m in model.modules() if type(m).__name__ in ("ConvBn2d", "ConvBnReLU2d")]
    assert len(fused) == 1 + 2 * 3  # stem + depthwise + pointwise per block: batch norm folded into each conv


def test_freeze_schedule_fixes_ranges_and_bn_from_the_given_epoch():
    model = _qat()
    hook = freeze_schedule(model, freeze_observers_after=2, freeze_bn_after=3)
    hook(1)
    assert all(fq.observer_enabled.item() == 1 for fq in _fake_quants(model))
    hook(2)
    assert all(fq.observer_enabled.item() == 0 for fq in _fake_quants(model))
    assert not any(getattr(m, "freeze_bn", False) for m in model.modules())
    hook(3)
    assert all(m.freeze_bn for m in model.modules() if hasattr(m, "freeze_bn"))


def test_qat_model_round_trips_through_a_model_file_and_converts_to_int8(tmp_path):
    model = _qat()
    x = torch.randn(8, 1, 28, 28)
    model.train()
    for _ in range(3):  # let the observers see data
        model(x)
    model.eval()
    save_model(model, "mobile_student", ARCH, tmp_path / "qat.pt", activation_bits=8)
    again = load_model(tmp_path / "qat.pt")
    torch.testing.assert_close(again(x), model(x))
    int8 = convert_int8(again)
    assert any("Quantized" in type(m).__module__ or "quantized" in type(m).__module__ for m in int8.modules())
    assert (int8(x) - model(x)).abs().max() < 0.1


def test_float_modules_stay_float_through_qat_save_and_int8_conversion(tmp_path):
    torch.manual_seed(0)
    model = prepare_qat(MobileStudent(ARCH), 8, torch.randn(2, 1, 28, 28), float_modules=["stem"])
    stem_fakes = [fq for name, fq in model.named_modules() if isinstance(fq, FakeQuantizeBase) and ".stem" in name]
    assert not stem_fakes and _fake_quants(model)
    x = torch.randn(8, 1, 28, 28)
    for _ in range(3):
        model(x)
    model.eval()
    save_model(model, "mobile_student", ARCH, tmp_path / "qat.pt", activation_bits=8, float_modules=["stem"])
    again = load_model(tmp_path / "qat.pt")
    torch.testing.assert_close(again(x), model(x))
    int8 = convert_int8(again)
    stem = [m for name, m in int8.named_modules() if name.endswith("stem.0")]
    assert stem and "quantized" not in type(stem[0]).__module__.lower()
    assert (int8(x) - model(x)).abs().max() < 0.1


def test_training_without_kd_uses_ground_truth_only(config):
    plain = loss_config(config.distill.vision, distill=False, label_smoothing=0.1)
    assert plain.weights.ground_truth == 1 and plain.weights.target == 0 and plain.feature_pairs == []
    assert plain.label_smoothing == 0.1
    kd = loss_config(config.distill.vision, distill=True, label_smoothing=0.0)
    assert kd.weights == config.distill.vision.weights


@pytest.mark.parametrize("change,pattern", [
    ({"activation_bits": 9}, r"qat\.vision\.activation_bits"),
    ({"activation_bits": 1}, r"qat\.vision\.activation_bits"),
    ({"bf16": True}, r"qat\.vision: .*bf16 must be false"),
    ({"float_modules": ["stem", "stem"]}, r"qat\.vision\.float_modules: .*lists a module twice"),
    ({"float_modules": ["blocks"]}, r"qat\.vision\.float_modules\.0: String should match pattern"),
    ({"float_modules": ["blocks.9"]}, r"qat\.vision\.float_modules\.0: blocks\.9 does not exist"),
])
def test_bad_qat_params_are_rejected_at_load(raw_params, change, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config({**raw_params, "qat": {**raw_params["qat"], "vision": {**raw_params["qat"]["vision"], **change}}})



@pytest.mark.slow
def test_the_int8_model_computes_with_the_weights_that_were_trained(real_splits):
    """Before: convert_fx re-quantized each folded weight on its own — with the observer's scales where the fused
    fake-quant op had trained on others, an affine zero point for a channel whose weights share a sign, and no clamp
    to the narrower 7-bit range of a weight that outgrew its observed range — so the INT8 model was not the model
    trained (seen: 3 % to 87 % of test images changing class)."""
    from tasks.image_training import to_input
    from tasks.observers import freeze_observers
    from tests.conftest import briefly_trained, fashion_pixels

    torch.backends.quantized.engine = "x86"
    images = to_input(torch.from_numpy(real_splits["val"][0].copy()), fashion_pixels())
    labels = torch.from_numpy(real_splits["val"][1].astype("int64"))
    torch.manual_seed(0)
    student = briefly_trained(MobileStudent(ARCH), images, labels, steps=100)
    qat = prepare_qat(student, 8, images[:2], weight_bits=7).train()
    with torch.no_grad():
        for i in range(0, 256, 64):  # observers and batch-norm statistics both move, as in a first QAT epoch
            qat(images[i:i + 64])
    freeze_observers(qat)
    qat.eval()
    test = to_input(torch.from_numpy(real_splits["test"][0].copy()), fashion_pixels())
    converted = convert_int8(qat)
    with torch.no_grad():
        trained, int8 = qat(test), converted(test)
    assert (trained.argmax(1) == int8.argmax(1)).float().mean() == 1.0
    # both answers lie on the logits' INT8 grid: where they differ, by one step of it (a rounding tie the CPU's INT8
    # kernels break otherwise: seen on a CPU with AMX, 4 of 4,000 logits), and rarely
    (step,) = [float(m.scale) for name, m in converted.named_modules() if name.endswith("head")]
    gap = (trained - int8).abs()
    assert gap.max() <= 1.01 * step and (gap > 1e-6).float().mean() < 0.005, (float(gap.max()), step)


@pytest.mark.slow
def test_fx_quantization_of_either_family_imports_no_compiler_and_keeps_the_fx_setting():
    """FX tracing captured a Python stack trace for every node, and symbolizing the first one imported
    torch._dynamo and torch._inductor: ~2.5 s at the start of every QAT, export and evaluation stage process."""
    code = (
        "import torch, torch.fx.config\n"
        "from tasks.images.arch_config import MobileArch\nfrom tasks.images.models import MobileStudent\n"
        "from tasks.quantization import convert_int8, prepare_qat\nfrom tasks.ctr.config import RecArch\n"
        "from tasks.ctr.models import CtrModel, convert_ctr_int8, prepare_ctr_qat\n"
        "qat = prepare_qat(MobileStudent(MobileArch(stem=4, widths=[8], strides=[2])), 8, torch.randn(2, 1, 28, 28))\n"
        "convert_int8(qat)\n"
        "ctr = CtrModel(RecArch(dim=4, fm=True, mlp=[8]), vocabulary=10, fields=2, genres=3)\n"
        "convert_ctr_int8(prepare_ctr_qat(ctr, 8, False))\n"
        "assert torch.fx.config.do_not_emit_stack_traces is False\n")
    assert imported_by(code, ("torch._dynamo", "torch._inductor")) == []
