"""The image recipe's knobs beyond crop and flip (issue 19's teacher recipe): random erasing, a moving average of
the weights, and flip test-time averaging built into the teacher (its scores, soft targets and ONNX file)."""
from __future__ import annotations

import pytest
import torch

from tasks.artifacts import fingerprint
from tasks.config import parse_config
from tasks.errors import ConfigError
from tasks.image_training import augment, erase, evaluate, fit
from tasks.images.arch_config import ResNetArch
from tasks.images.config import Augmentation, Ema, Erasing
from tasks.images.models import ResNetTeacher
from tests.tasks.test_training import _data, _model, _spec


def test_random_erasing_blanks_one_seeded_rectangle_of_the_drawn_area_in_the_chosen_images():
    x = torch.ones(400, 1, 28, 28)
    cfg = Erasing(probability=0.5, area=[0.1, 0.2], max_aspect=2.0)
    out = erase(x, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(out, erase(x, cfg, torch.Generator().manual_seed(0)))   # seeded
    blank = (out == 0).float()
    share = blank.mean(dim=(1, 2, 3))
    chosen = share > 0
    assert 0.4 < chosen.float().mean() < 0.6
    # a rectangle (rows x columns) of about 10-20 % of the image: rounding sides to whole pixels moves it a little
    assert share[chosen].min() > 0.07 and share[chosen].max() < 0.24
    rows, cols = blank[chosen, 0].amax(2).sum(1), blank[chosen, 0].amax(1).sum(1)
    assert torch.equal(rows * cols, blank[chosen, 0].sum(dim=(1, 2)))
    assert (torch.maximum(rows / cols, cols / rows) <= 2.0 * 1.5).all()   # the aspect bound, up to rounding
    assert torch.equal(out[~chosen], x[~chosen])


def test_erasing_off_draws_nothing_so_earlier_recipes_augment_as_before():
    x = _data(16).inputs()
    plain = Augmentation(crop_padding=2, horizontal_flip=True)
    off = plain.model_copy(update={"erasing": Erasing(probability=0.0)})
    a = augment(x, plain, torch.Generator().manual_seed(3), _data(1).pixels)
    b = augment(x, off, torch.Generator().manual_seed(3), _data(1).pixels)
    assert torch.equal(a, b)


def test_the_kept_weights_are_the_moving_average_and_resume_exactly(tmp_path):
    train, val = _data(), _data(32, seed=1)
    spec = _spec(epochs=3).model_copy(update={"ema": Ema(decay=0.9)})
    averaged, live = _model(), _model()
    history = fit(averaged, train, val, spec, tmp_path / "a.pt", "fp")
    fit(live, train, val, _spec(epochs=3), tmp_path / "b.pt", "fp")
    # the same steps (the average does not draw from the generator), then the average kept instead of the last
    state = torch.load(tmp_path / "a.pt", weights_only=True)
    for name, value in live.state_dict().items():
        assert torch.equal(state["model"][name], value), name
    trained = [name for name, p in live.named_parameters() if not torch.equal(p, _model().state_dict()[name])]
    moved = [name for name in trained if not torch.equal(averaged.state_dict()[name], live.state_dict()[name])]
    # kept as their average instead (a weight that barely moved, as a residual branch's first batch-norm scale behind
    # its zero-initialised last one, can round to the live value)
    assert trained and len(moved) >= 0.8 * len(trained)
    assert evaluate(averaged, val, 64)["accuracy"] == history[-1]["val_accuracy"]   # the model scored each epoch

    class Stop(Exception):
        pass

    def stop(epoch, _metrics):
        if epoch == 0:
            raise Stop

    with pytest.raises(Stop):
        fit(_model(), train, val, spec, tmp_path / "c.pt", "fp", on_epoch=stop)
    resumed = _model()
    assert fit(resumed, train, val, spec, tmp_path / "c.pt", "fp") == history
    for (name, a), b in zip(averaged.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("stage", ["prune", "qat", "share"])
def test_compression_stages_refuse_a_moving_average(raw_params, stage):
    block = raw_params[stage]["vision"]
    raw = {**raw_params, stage: {**raw_params[stage], "vision": {**block, "ema": {"decay": 0.99}}}}
    with pytest.raises(ConfigError, match=rf"{stage}\.vision: .*ema must be unset"):
        parse_config(raw)


def test_a_flip_averaging_teacher_sees_both_mirrors_when_scoring_and_exports_so(tmp_path):
    from tasks.onnx_models import export_fp32, onnx_logits

    torch.manual_seed(0)
    teacher = ResNetTeacher(ResNetArch(stem=4, widths=[8, 16], blocks=[1, 1], flip_average=True)).eval()
    plain = ResNetTeacher(ResNetArch(stem=4, widths=[8, 16], blocks=[1, 1]))
    plain.load_state_dict(teacher.state_dict())
    plain.eval()
    x = _data(8).inputs()
    with torch.no_grad():
        logits, maps = teacher.forward_features(x)
        mirrored, mirror_maps = teacher.forward_features(x.flip(-1))
        torch.testing.assert_close(logits, (plain(x) + plain(x.flip(-1))) / 2)
        torch.testing.assert_close(logits, mirrored)   # a mirror-symmetric answer ...
        torch.testing.assert_close(maps[1], mirror_maps[1].flip(-1))   # ... and feature maps aligned with the image
        teacher.train()
        assert torch.equal(teacher(x), plain.train()(x))   # training sees one view
    teacher.eval()
    split = _data(32)
    path = export_fp32(teacher, tmp_path / "teacher.onnx", example=split.inputs(slice(2)))
    with torch.no_grad():
        expected = teacher(split.inputs()).numpy()
    assert abs(onnx_logits(path, split) - expected).max() < 1e-4


def test_a_checkpoint_resumes_on_another_device_and_after_a_knob_added_at_its_default():
    spec = _spec()
    assert fingerprint([spec], []) == fingerprint([spec.model_copy(update={"device": "cpu"})], [])
    assert fingerprint([spec], []) == fingerprint([spec.model_copy(update={"ema": None})], [])
    assert fingerprint([spec], []) != fingerprint([spec.model_copy(update={"ema": Ema(decay=0.99)})], [])
    assert fingerprint([spec], []) != fingerprint([spec.model_copy(update={"seed": 1})], [])


def test_teacher_recipe_knobs_are_checked_at_load(raw_params):
    teacher = raw_params["teacher"]
    digits = {**teacher["digits"], "arch": {**teacher["digits"]["arch"], "flip_average": True}}
    with pytest.raises(ConfigError, match=r"teacher\.digits: .*arch\.flip_average averages each image with its mirror"):
        parse_config({**raw_params, "teacher": {**teacher, "digits": digits}})   # a mirrored digit is another glyph
    for change, pattern in [({"ema": {"decay": 1.0}}, r"teacher\.vision\.ema\.decay"),
                            ({"augmentation": {"crop_padding": 2, "horizontal_flip": True,
                                               "erasing": {"probability": 0.5, "area": [0.4, 0.1]}}},
                             r"teacher\.vision\.augmentation\.erasing: .*area must be \[low, high\]")]:
        raw = {**raw_params, "teacher": {**teacher, "vision": {**teacher["vision"], **change}}}
        with pytest.raises(ConfigError, match=pattern):
            parse_config(raw)


def test_a_slow_average_still_follows_a_short_schedule(tmp_path):
    """The average's decay warms up: with 0.998 from the first step, 16 steps would keep ~97 % of the random start
    (the smoke profile trains one epoch; a Fashion-MNIST teacher's average scored 15 % after three full epochs)."""
    from tests.tasks.test_device import _separable

    data = _separable()
    model = _model()
    history = fit(model, data, data, _spec(epochs=2).model_copy(update={"ema": Ema(decay=0.998)}),
                  tmp_path / "ck.pt", "fp")
    assert history[-1]["val_accuracy"] > 0.8


def test_the_teacher_recipe_benchmarks_arms_checked_like_params(config):
    """Before: ``--epochs 0`` ran a table of untrained models and ``--ema 1.0`` ended in pydantic's traceback: the
    arms were made without the checks params.yaml gets."""
    from flows.teacher_recipe import arm_recipe

    teacher = config.teacher.vision
    assert arm_recipe(teacher, "erasing", 3, 0.5, 0.99).augmentation.erasing.probability == 0.5
    for epochs, ema, pattern in ((0, 0.99, r"epochs: Input should be greater than 0"),
                                 (3, 1.0, r"ema\.decay: Input should be less than 1")):
        with pytest.raises(ConfigError, match=rf"--epochs {epochs} --ema {ema} --erasing 0\.5: .*{pattern}"):
            arm_recipe(teacher, "erasing", epochs, 0.5, ema)
