"""The training-step profile accounts for a step's time by part: the teacher's own step and a distillation step, with
the frozen teacher's forward apart (run by PyTorch or by onnxruntime, whose work PyTorch's profiler cannot see
inside)."""
from __future__ import annotations

import copy

import pytest
import torch

from flows.step_profile import BATCH, PARTS, TEACHER, measure, table
from tasks.config import parse_config
from tasks.distillation import Distiller
from tasks.image_training import Pixels, Split
from tasks.images.models import MobileStudent, ResNetTeacher


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["pytorch", "onnxruntime"])
def test_the_profile_splits_both_steps_into_their_parts(raw_params, runtime):
    raw = copy.deepcopy(raw_params)
    raw["profile"] = "smoke"
    raw["distill"]["vision"]["teacher_runtime"] = runtime
    gen = torch.Generator().manual_seed(0)
    train = Split(torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8, generator=gen),
                  torch.randint(0, 10, (64,), generator=gen), Pixels((0.3,), (0.35,)), tuple("abcdefghij"))
    top = 3 if runtime == "pytorch" else 0   # the operator list, and without it
    result = measure(parse_config(raw), "vision", train, steps=2, top=top)
    teacher, kd = result["teacher"], result["distillation"]
    assert kd["teacher_runtime"] == runtime
    for r in (teacher, kd):
        assert set(r["parts"]) == set(PARTS)
        # every event's own time in exactly one part: the parts add up to the top-level events' whole time
        assert r["steps"] == 1 and r["wall"] > 0 and sum(r["parts"].values()) == pytest.approx(r["profiled"], rel=1e-9)
        for name in (BATCH, "forward: convolutions", "backward: convolutions", "backward: batch norm", "optimizer"):
            assert r["parts"][name] > 0, name
        ms = [op["ms"] for op in r["operators"]]   # the slowest operators first, each with its input shapes
        assert len(ms) == top and ms == sorted(ms, reverse=True) and all(op["input_shapes"] for op in r["operators"])
    # the teacher's step has no frozen teacher; distillation's has one, whoever runs it: onnxruntime's work is no
    # PyTorch operator, so it counts only as the teacher region's own time (15-25 % of the step here; 0.05 % when
    # only operators were counted)
    assert teacher["parts"][TEACHER] == 0 and kd["parts"][TEACHER] > 0.01 * kd["profiled"]
    printed = table(result, "vision")
    assert f"| {TEACHER} | 0.0 | 0 |" in printed and "| **profiled step** |" in printed
    assert ("Slowest operators of the teacher step" in printed) is (top > 0)


def test_a_distillers_teacher_forward_is_a_region_of_its_own(smoke_config):
    kd = smoke_config.distill.vision.model_copy(update={"teacher_runtime": "pytorch"})
    distiller = Distiller(MobileStudent(kd.student), ResNetTeacher(smoke_config.teacher.vision.arch).eval(), kd,
                          torch.zeros(2, 1, 28, 28))
    with torch.profiler.profile() as prof:
        distiller.loss(torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.long))
    region = next(e for e in prof.events() if e.name == TEACHER)
    assert any(e.name.startswith("aten::conv") for e in region.cpu_children)   # the teacher's work inside it


def test_the_profile_takes_whole_batches_only(smoke_config):
    """300 images in batches of 128: two whole batches profiled, not a third of 44 images of another shape."""
    from flows.step_profile import profile_step
    from tasks.training import cross_entropy_loss

    spec = smoke_config.teacher.vision
    train = Split(torch.zeros(300, 28, 28, dtype=torch.uint8), torch.zeros(300, dtype=torch.long))
    result = profile_step(ResNetTeacher(spec.arch), train, spec, cross_entropy_loss(0.0), steps=5)
    assert spec.batch_size == 128 and result["steps"] == 2
