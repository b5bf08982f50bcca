"""Knowledge-distillation losses and the wrapper that trains a student against a frozen teacher.

total = ground_truth·CE(student, y) + target·soft-target + feature·hint + label·CE(student, argmax teacher), the
soft target being KL, probability MSE or decoupled KD (``target_loss``).

Done right where the source article's sample code was not: the soft-target KL compares *log-probabilities*
(``log_softmax``), never raw logits; only the teacher runs under ``no_grad``; the training loop zeroes
gradients every step (``tasks.training.train_step``).
"""
from __future__ import annotations

import collections
import copy
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tasks.family_config import LossWeights
from tasks.imported_teacher import onnx_twin
from tasks.onnx_teacher import OnnxTeacher
from tasks.training import autocast

if TYPE_CHECKING:  # annotations only: the recommender runs this code without the vision config
    from tasks.images.config import DistillImages


# The frozen teacher's forward as a profiler region (``flows.step_profile``); without a profiler it costs ~5 µs a step
TEACHER = "frozen teacher forward"


def soft_target_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher_T || student_T) on temperature-softened log-probabilities, scaled by T² (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * t * t


def soft_target_mse(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Squared error between temperature-softened probabilities (summed over classes, averaged over the batch)."""
    t = temperature
    diff = F.softmax(student_logits.float() / t, dim=1) - F.softmax(teacher_logits.float() / t, dim=1)
    return diff.pow(2).sum(dim=1).mean() * t * t


def decoupled_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                 temperature: float, alpha: float, beta: float) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): KL splits into TCKD, the binary target-vs-rest KL, plus (1 − p_t)·NCKD, the
    KL among the non-target classes; DKD weighs them alpha and beta (no longer coupled by the teacher's confidence).
    Both scaled by T², averaged over the batch."""
    t = temperature
    s, te = student_logits.float() / t, teacher_logits.float() / t
    target = F.one_hot(labels, s.shape[1]).bool()

    def target_and_rest(z: torch.Tensor) -> torch.Tensor:   # log p(target), log p(rest): in log space, so a student
        log_p = F.log_softmax(z, dim=1)                      # far surer than its teacher keeps its gradient
        return torch.stack([log_p[target], log_p.masked_fill(target, float("-inf")).logsumexp(dim=1)], dim=1)

    tckd = F.kl_div(target_and_rest(s), target_and_rest(te), reduction="batchmean", log_target=True)
    hidden = 1000.0 * target   # the target class out of both softmaxes: exp(-1000) is 0 in float32
    nckd = F.kl_div(F.log_softmax(s - hidden, dim=1), F.log_softmax(te - hidden, dim=1), reduction="batchmean",
                    log_target=True)
    return (alpha * tckd + beta * nckd) * t * t


def hint_loss(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """MSE in fp32 between an adapted student map and the teacher's, pooled to the smaller height and the smaller
    width (a non-square image's maps keep their aspect)."""
    size = tuple(min(s, t) for s, t in zip(student_map.shape[-2:], teacher_map.shape[-2:], strict=True))
    return F.mse_loss(_pooled(student_map.float(), size), _pooled(teacher_map.float(), size))


def _pooled(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``x`` average-pooled to ``size`` (height, width); as it is when already that size, where pooling is an
    identity computed forward and backward for nothing."""
    return x if tuple(x.shape[-2:]) == size else F.adaptive_avg_pool2d(x, size)


def loss_config(kd: DistillImages, distill: bool, label_smoothing: float) -> DistillImages:
    """The loss of a training stage: the distillation loss of ``kd``, or the ground truth alone."""
    if distill:
        return kd.model_copy(update={"label_smoothing": label_smoothing})
    only_ce = LossWeights(ground_truth=1.0, target=0.0, feature=0.0, label=0.0)
    return kd.model_copy(update={"weights": only_ce, "feature_pairs": [], "label_smoothing": label_smoothing})


class FrozenTeacher(nn.Module):
    """A student trained against a teacher that is held frozen and is not a submodule (both families' distillers).

    ``forward`` is the student's, so evaluation and export see only the student. The teacher is kept out of
    ``state_dict`` and ``parameters`` so that no optimizer can touch it and checkpoints hold the student only.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__()
        self.student = student
        teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)

    def _apply(self, fn: Callable, recurse: bool = True) -> FrozenTeacher:
        """``to``, ``cuda``, ``cpu``, ... move the teacher along with the student: it computes on the same batches."""
        super()._apply(fn, recurse)
        self.teacher._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(mode)
        self.teacher.eval()  # batch-norm statistics and dropout of the teacher never move
        return self

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.student(*inputs)


class _Outputs(nn.Module):
    """``forward_features`` of a one-input model as one tuple, ``(logits, *feature maps)``: what torch.fx traces
    (``tasks.imported_teacher``'s wrapper for the exporter takes ``*inputs``, which torch.fx cannot trace)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, maps = self.model.forward_features(x)
        return (logits, *maps)


class FoldedTeacher(nn.Module):
    """A teacher for inference as a torch.fx graph of its ``forward_features`` whose batch norms are folded into
    the convolutions before them (``inference_teacher`` makes one and checks it)."""

    def __init__(self, folded: torch.fx.GraphModule) -> None:
        super().__init__()
        self.folded = folded

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits, *maps = self.folded(x)
        return logits, maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]


def inference_teacher(teacher: nn.Module, sample: torch.Tensor) -> nn.Module:
    """A copy of ``teacher`` with each batch norm folded into the convolution that alone feeds it
    (``torch.fx.experimental.optimization.fuse``): the same ``forward_features`` without the batch norms' passes,
    checked on ``sample`` without autocast. ``teacher`` itself is left as it is; it is returned instead, with a note
    on stderr saying why, where it cannot be copied or torch.fx cannot trace its forward, where a convolution or
    batch norm runs more than once in it (a flip-averaged teacher: ``fuse`` would fold a batch norm into a
    convolution once per call) or where the copy computes something else on ``sample``; and an ``OnnxTeacher``
    without a note (onnxruntime folds them itself)."""
    if isinstance(teacher, OnnxTeacher):
        return teacher
    try:
        folded = _fold(teacher, sample)
    except Exception as err:  # noqa: BLE001 (deepcopy and torch.fx refuse with TraceError, RuntimeError, TypeError)
        first = str(err).splitlines()[0] if str(err) else ""
        return _unfolded(teacher, f"it cannot be copied and traced by torch.fx ({type(err).__name__}: {first})")
    return _unfolded(teacher, folded) if isinstance(folded, str) else folded


def _fold(teacher: nn.Module, sample: torch.Tensor) -> FoldedTeacher | str:
    """``inference_teacher``'s copy, or why it is refused."""
    from torch.fx.experimental.optimization import fuse

    reference = copy.deepcopy(teacher).eval()
    # the graph shares reference's modules; fuse puts new, folded convolutions in the graph's own containers and
    # changes none of reference's, which the check below compares against
    traced = torch.fx.symbolic_trace(_Outputs(reference))
    modules = dict(traced.named_modules())
    folds = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
    calls = collections.Counter(n.target for n in traced.graph.nodes
                                if n.op == "call_module" and isinstance(modules[n.target], folds))
    if again := [f"{name} ({count} times)" for name, count in calls.items() if count > 1]:
        return f"convolutions or batch norms run more than once in one forward: {', '.join(again[:3])}"
    folded = FoldedTeacher(fuse(traced, inplace=True, no_trace=True))
    with torch.no_grad():
        logits, maps = reference.forward_features(sample)
        for name, want, got in zip(["logits", *(f"map {i}" for i in range(len(maps)))], [logits, *maps],
                                   [*folded.folded(sample)], strict=True):
            if not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * max(1.0, want.abs().max().item())):
                return f"the folded copy's {name} differ from the teacher's on the sample"
    return folded


def _unfolded(teacher: nn.Module, why: str) -> nn.Module:
    print(f"note: the frozen teacher runs with its batch norms unfolded: {why}", file=sys.stderr)
    return teacher


class Distiller(FrozenTeacher):
    """Student plus feature adapters (FitNets hints) against a frozen vision teacher: the teacher's ONNX twin where
    onnxruntime runs it, else its copy with the batch norms folded (``inference_teacher``), which is what gets
    frozen; the teacher handed over is then left in its mode (unfolded, it is frozen itself)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillImages, sample: torch.Tensor) -> None:
        if cfg.teacher_in_onnxruntime() and not isinstance(teacher, OnnxTeacher):
            teacher = onnx_twin(teacher, (sample,), feature_rank=4)
        teacher = inference_teacher(teacher, sample)
        super().__init__(student, teacher)
        self.cfg = cfg
        # the maps' widths only: read in eval mode without fake quantization, so that no quantization range starts
        # from the two-image sample and no batch norm counts it as a batch
        from tasks.observers import float_pass

        training = student.training
        try:
            with torch.no_grad(), float_pass(student):
                _, s_maps = student.eval().forward_features(sample)
                _, t_maps = teacher.forward_features(sample)
        finally:
            student.train(training)
        self.adapters = nn.ModuleList(nn.Conv2d(s_maps[p.student].shape[1], t_maps[p.teacher].shape[1], 1)
                                      for p in cfg.feature_pairs)

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The frozen teacher's logits (fp32) and feature maps, computed in bf16 when ``teacher_bf16`` and the CPU has
        it natively: it is inference only, and there bf16 inference is faster than fp32 (~1.3x on AVX512-BF16, ~2.7x
        on AMX: make benchmark-teacher) while the student may train in fp32 (faster for depthwise convs). The maps
        stay as computed: ``hint_loss`` reads the ones it pairs in fp32; the others need no cast."""
        with torch.profiler.record_function(TEACHER), autocast(self.cfg.teacher_bf16, x.device.type):
            logits, maps = self.teacher.forward_features(x)
        return logits.float(), maps

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, student logits, each weighted term) for one batch."""
        cfg, w = self.cfg, self.cfg.weights
        t_logits, t_maps = self.teacher_outputs(x) if (w.target or w.feature or w.label) else (None, [])
        s_logits, s_maps = self.student.forward_features(x)
        parts: dict[str, torch.Tensor] = {}
        if w.ground_truth:
            parts["ground_truth"] = w.ground_truth * F.cross_entropy(s_logits.float(), y, label_smoothing=cfg.label_smoothing)
        if w.target and cfg.target_loss == "dkd":
            parts["target"] = w.target * decoupled_kd(s_logits, t_logits, y, cfg.temperature, cfg.dkd.alpha, cfg.dkd.beta)
        elif w.target:
            soft = soft_target_kl if cfg.target_loss == "kl" else soft_target_mse
            parts["target"] = w.target * soft(s_logits, t_logits, cfg.temperature)
        if w.feature:
            hints = [hint_loss(a(s_maps[p.student]), t_maps[p.teacher]) for a, p in zip(self.adapters, cfg.feature_pairs, strict=True)]
            parts["feature"] = w.feature * torch.stack(hints).mean()
        if w.label:
            parts["label"] = w.label * F.cross_entropy(s_logits.float(), t_logits.argmax(dim=1))
        return sum(parts.values()), s_logits, parts


def distillation_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``LossFn`` for ``tasks.image_training.fit`` when ``model`` is a Distiller."""
    total, logits, _ = model.loss(x, y)
    return total, logits
