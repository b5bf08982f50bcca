"""Convolution weight gradients by matmul (``tasks.conv_grad``): the same gradients as autograd's convolution, taken
only by small plain convolutions training in bf16 on a CPU with AMX, and the model left as it was."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flows.step_profile import part
from tasks import conv_grad, training
from tasks.conv_grad import WEIGHT_GRAD, _Conv2d, _ConvWeightGradByMatmul, matmul_weight_grads

GEOMETRIES = [  # (in, out, size, kernel, stride, padding, bias)
    (8, 6, 4, 3, 1, 1, False),   # the teacher's last stage: 3x3 at 4x4
    (8, 6, 7, 3, 2, 1, True),    # its stride-2 entry into 4x4
    (8, 6, 7, 1, 2, 0, False),   # its 1x1 shortcut
    (5, 4, 6, (3, 1), (2, 1), (0, 1), True),   # uneven kernel, stride and padding
]
MATMUL = "_ConvWeightGradByMatmulBackward"


def pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return v if isinstance(v, tuple) else (v, v)


@pytest.mark.parametrize(("cin", "cout", "size", "kernel", "stride", "padding", "bias"), GEOMETRIES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_gradients_are_autograds(cin, cout, size, kernel, stride, padding, bias, layout):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, cin, size, size + 1, dtype=torch.float64, generator=gen).contiguous(memory_format=layout)
    w = torch.randn(cout, cin, *pair(kernel), dtype=torch.float64, generator=gen)
    b = torch.randn(cout, dtype=torch.float64, generator=gen) if bias else None
    inputs = tuple(t.requires_grad_() for t in (x, w, b) if t is not None)

    def conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return _ConvWeightGradByMatmul.apply(x, w, b, pair(stride), pair(padding))

    assert torch.autograd.gradcheck(conv, inputs)


def _grads(conv: nn.Conv2d, size: int, dtype: torch.dtype | None = torch.bfloat16
           ) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """The gradients of ``conv``'s input and weight on a random batch (under ``dtype`` autocast unless None): as
    nn.Conv2d, then as ``_Conv2d``, and the latter's autograd node."""
    x = torch.randn(4, conv.in_channels, size, size, generator=torch.Generator().manual_seed(1))
    grads, node = [], ""
    for cls in (nn.Conv2d, _Conv2d):
        conv.__class__ = cls
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            y = conv(xi)
        node = type(y.grad_fn).__name__
        y.float().square().sum().backward()
        grads.append([xi.grad, conv.weight.grad.clone()])
    conv.__class__ = nn.Conv2d
    return grads[0], grads[1], node


def test_in_bf16_the_weight_gradient_is_onednns_up_to_rounding():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, 1, 1, bias=False).to(memory_format=torch.channels_last)
    (gx, gw), (mx, mw), node = _grads(conv, 4)
    assert node == MATMUL
    assert torch.equal(mx, gx)   # the input gradient is oneDNN's own
    # both round fp32 sums to bf16 (8 bits of mantissa), in a different order
    assert ((mw - gw).abs().max() / gw.abs().max()).item() < 2 ** -6


@pytest.mark.parametrize(("size", "dtype", "training"), [(7, torch.bfloat16, True), (4, None, True),
                                                         (4, torch.float16, True), (4, torch.bfloat16, False)])
def test_larger_outputs_other_precisions_and_evaluation_stay_autograds_convolution(size, dtype, training):
    """7x7 outputs (oneDNN as fast), fp32 and fp16 (not measured) and evaluation mode keep PyTorch's convolution,
    bit for bit."""
    conv = nn.Conv2d(8, 8, 3, 1, 1).train(training)
    (gx, gw), (mx, mw), node = _grads(conv, size, dtype)
    assert node == "ConvolutionBackward0" and torch.equal(gx, mx) and torch.equal(gw, mw)


def test_without_grad_it_is_the_plain_convolution():
    conv, x = nn.Conv2d(8, 8, 3, 1, 1), torch.randn(2, 8, 4, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = conv(x)
        conv.__class__ = _Conv2d
        assert torch.equal(conv(x), expected)


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Conv2d(8, 8, 3, 1, 1, groups=8),   # depthwise: not plain
                         nn.Conv2d(8, 8, 3, 1, 1, padding_mode="reflect"), nn.Conv2d(8, 8, 3, 1, 2, dilation=2),
                         nn.Conv2d(8, 8, 1),
                         torch.ao.nn.qat.Conv2d(8, 8, 1, qconfig=torch.ao.quantization.get_default_qat_qconfig()))


def test_only_plain_convolutions_switch_and_switch_back(monkeypatch):
    monkeypatch.setattr(conv_grad, "native_amx", lambda: True)   # which CPU this runs on: the switch is what's tested
    model = _model()
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match="inside"), matmul_weight_grads(model, True, torch.device("cpu")) as n:
        assert n == 2 and [type(m) is _Conv2d for m in model] == [True, False, False, False, True, False]
        assert list(model.state_dict()) == keys
        raise RuntimeError("inside")
    assert [type(m).__name__ for m in model] == ["Conv2d"] * 6 and type(model[-1]) is torch.ao.nn.qat.Conv2d


def test_a_class_given_inside_is_kept(monkeypatch):
    """A parametrization registered inside gives the module a class of its own, which stays: it still computes."""
    monkeypatch.setattr(conv_grad, "native_amx", lambda: True)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1))
    with matmul_weight_grads(model, True, torch.device("cpu")):
        torch.nn.utils.parametrizations.weight_norm(model[0])
    assert type(model[0]).__name__.startswith("Parametrized") and model(torch.randn(1, 3, 4, 4)).shape == (1, 4, 4, 4)


@pytest.mark.parametrize(("bf16", "device", "amx"), [(False, "cpu", True), (True, "cpu", False), (True, "meta", True)])
def test_nothing_switches_without_bf16_on_a_cpu_with_amx(monkeypatch, bf16, device, amx):
    monkeypatch.setattr(conv_grad, "native_amx", lambda: amx)
    model = _model()
    with matmul_weight_grads(model, bf16, torch.device(device)) as n:
        assert n == 0 and not any(type(m) is _Conv2d for m in model)


def test_the_image_training_loop_takes_it_where_the_cpu_has_amx(monkeypatch, smoke_config):
    """``train_epoch`` in bf16 on a CPU with AMX (the probes say so, whatever this CPU is): the teacher's 4x4 stage
    takes the matmul, and every convolution is plain ``nn.Conv2d`` again after the epoch."""
    from tasks.image_training import Split, train_epoch
    from tasks.images.models import ResNetTeacher
    from tasks.training import cross_entropy_loss, make_optimizer, make_scheduler

    monkeypatch.setattr(conv_grad, "native_amx", lambda: True)
    monkeypatch.setattr(training, "native_bf16", lambda device_type="cpu": True)
    spec = smoke_config.teacher.vision.model_copy(update={"bf16": True, "batch_size": 4})
    model = ResNetTeacher(spec.arch)
    train = Split(torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8), torch.arange(4))
    opt = make_optimizer(model, spec.optimizer)
    with torch.profiler.profile() as prof:
        train_epoch(model, train, spec, opt, make_scheduler(opt, spec.schedule, 1), torch.Generator(),
                    cross_entropy_loss(0.0), "test", torch.device("cpu"))
    assert any(e.name == WEIGHT_GRAD for e in prof.events())
    assert not any(type(m) is _Conv2d for m in model.modules())


def test_the_step_profile_counts_the_whole_backward_as_the_convolutions():
    conv = _Conv2d(8, 8, 3, 1, 1)
    x = torch.randn(2, 8, 4, 4, requires_grad=True)
    with torch.profiler.profile() as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(x)
        y.float().sum().backward()
    region = next(e for e in prof.events() if e.name == WEIGHT_GRAD)
    inside = [e for e in prof.events() if e.cpu_parent is region]
    names = {e.name for e in inside}
    assert "aten::convolution_backward" in names and "aten::sum" in names and names & {"aten::mm", "aten::matmul"}
    assert {part(e) for e in inside} == {"backward: convolutions"}
