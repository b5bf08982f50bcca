"""The teacher benchmark compares like with like: the ONNX twin computes what the PyTorch teacher computes, and the
command times both and prints their ratio."""
from __future__ import annotations

import pytest
import torch

from flows.teacher_benchmark import measure, table
from tasks.config import parse_config
from tasks.images.models import ResNetTeacher
from tasks.imported_teacher import onnx_twin


def test_the_onnx_twin_computes_the_teachers_logits_and_maps(config, tmp_path):
    torch.manual_seed(0)
    teacher = ResNetTeacher(config.teacher.vision.arch).eval()
    twin = onnx_twin(teacher, (torch.zeros(2, 1, 28, 28),), feature_rank=4)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        (logits, maps), (t_logits, t_maps) = twin.forward_features(x), teacher.forward_features(x)
    assert not teacher.training   # exporting it left it as it was
    torch.testing.assert_close(logits, t_logits, atol=1e-4, rtol=1e-4)
    for got, want in zip(maps, t_maps, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("native_bf16", [False, True])
def test_the_benchmark_times_the_teachers_and_prints_their_ratios(raw_params, native_bf16, monkeypatch):
    """PyTorch fp32 and onnxruntime everywhere; PyTorch under bf16 autocast too where the CPU has native bf16 (what
    ``teacher_runtime: auto`` weighs the twin against there). Any image family, in its own data's shape (before:
    Fashion-MNIST's, hard-coded): here the digits' 8x8 images."""
    import flows.teacher_benchmark

    monkeypatch.setattr(flows.teacher_benchmark, "native_bf16", lambda: native_bf16)
    shape = {"num_classes": 10, "input_shape": [1, 8, 8]}
    result = measure(parse_config(raw_params), "digits", shape, batch=8, steps=1, repeats=1)
    assert set(result) == {"pytorch", "onnxruntime"} | ({"pytorch bf16"} if native_bf16 else set())
    assert all(r["forward"] > 0 and r["step"] > 0 for r in result.values())
    printed = table(result, "digits", 8, 1)
    assert "| onnxruntime / pytorch |" in printed
    assert ("| onnxruntime / pytorch bf16 |" in printed) is native_bf16


@pytest.mark.fault("params", "a benchmark of the image teacher (the teacher benchmark, the training-step profile) "
                   "asked for a family that is no image family (recsys) or none of params.yaml",
                   "ConfigError naming the family and the families there; nothing timed")
@pytest.mark.parametrize("family", ["recsys", "audio"])
@pytest.mark.parametrize("command", ["teacher_benchmark", "step_profile"])
def test_the_benchmarks_refuse_a_family_without_an_image_teacher(command, family, monkeypatch):
    import importlib
    import sys

    from tasks.errors import ConfigError

    main = importlib.import_module(f"flows.{command}").main
    monkeypatch.setattr(sys, "argv", [command, "--family", family])
    with pytest.raises(ConfigError, match=rf"--family {family} is no image family .*families: vision, recsys"):
        main()


def test_a_batch_of_one_is_timed_like_any_other(raw_params):
    """Before: the ONNX twin was exported from the first two images of the batch, and a batch of one was refused as
    a teacher that cannot run on a batch of 2."""
    shape = {"num_classes": 10, "input_shape": [1, 8, 8]}
    result = measure(parse_config(raw_params), "digits", shape, batch=1, steps=1, repeats=1)
    assert all(r["forward"] > 0 and r["step"] > 0 for r in result.values())


@pytest.mark.fault("params", "a benchmark asked for no batch, no step or no repeat (`--batch 0`, `--steps 0`, "
                   "`--repeats 0`, or negative)",
                   "a usage error naming the option, exit 2, before anything is read or timed (before: "
                   "ZeroDivisionError, statistics' or numpy's traceback, or a misleading refusal of the teacher)")
@pytest.mark.parametrize("option", ["--batch", "--steps", "--repeats"])
def test_the_benchmark_refuses_non_positive_counts_as_a_usage_error(option, monkeypatch, capsys):
    import sys

    from flows.teacher_benchmark import main

    monkeypatch.setattr(sys, "argv", ["teacher_benchmark", "--family", "vision", option, "0"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert f"{option} must be at least 1, got 0" in capsys.readouterr().err
