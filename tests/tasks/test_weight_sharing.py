from __future__ import annotations

import pytest
import torch
from torch import nn

from tasks.config import parse_config
from tasks.errors import ConfigError
from tasks.images.arch_config import MobileArch
from tasks.images.models import MobileStudent
from tasks.images.share import fix_quantization
from tasks.quantization import convert_int8, prepare_qat
from tasks.weight_sharing import bake, kmeans_1d, share_weights, shared_layers


def test_kmeans_finds_separated_clusters():
    values = torch.cat([torch.full((50,), -1.0), torch.full((30,), 0.5), torch.full((20,), 2.0)])
    centroids, index = kmeans_1d(values + 0.01 * torch.randn(100), 3)
    torch.testing.assert_close(centroids.sort().values, torch.tensor([-1.0, 0.5, 2.0]), atol=0.02, rtol=0)
    assert torch.bincount(index).sort().values.tolist() == [20, 30, 50]


def test_shared_layer_has_k_values_keeps_zeros_and_pools_gradients():
    torch.manual_seed(0)
    layer = nn.Linear(40, 12)
    with torch.no_grad():
        layer.weight[:, :8] = 0
    share_weights(layer, 4)
    assert torch.unique(layer.weight).numel() == 5 and bool((layer.weight[:, :8] == 0).all())
    x = torch.randn(6, 40)
    layer(x).sum().backward()
    shared = layer.parametrizations.weight[0]
    weight_grad = x.sum(0).expand(12, 40)  # d sum(Wx) / dW
    pooled = torch.zeros(5).index_add_(0, shared.index.flatten(), weight_grad.flatten())[1:]
    torch.testing.assert_close(shared.centroids.grad, pooled, atol=1e-4, rtol=1e-4)


def test_a_layer_pruned_to_all_zeros_is_shared_as_its_fixed_zero():
    """Before: k-means of no values (``min()`` of an empty tensor) stopped the share stage with a traceback."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    nn.init.zeros_(model[0].weight)
    assert share_weights(model, 4) == 2
    assert (model[0].weight == 0).all() and len(model[0].parametrizations.weight[0].centroids) == 0
    model(torch.randn(5, 4)).sum().backward()   # it trains (nothing to learn in the empty layer) and bakes
    assert bake(model)[0][1] == 1 and (model[0].weight == 0).all()


def test_bake_leaves_plain_parameters_holding_the_shared_values():
    torch.manual_seed(0)
    layer = nn.Linear(64, 16)
    share_weights(layer, 16)
    shared = layer.weight.detach().clone()
    codes = bake(layer)
    assert [size for _, size in codes] == [16]
    assert not hasattr(layer, "parametrizations") and isinstance(layer.weight, nn.Parameter)
    assert torch.equal(layer.weight.detach(), shared) and torch.unique(layer.weight).numel() == 16


def test_sharing_a_qat_student_keeps_it_convertible_to_int8():
    torch.manual_seed(0)
    qat = prepare_qat(MobileStudent(MobileArch(stem=4, widths=[8, 16], strides=[2, 2])), 8, torch.randn(2, 1, 28, 28))
    qat.train()
    x = torch.randn(8, 1, 28, 28)
    qat(x)  # observers see data
    layers = share_weights(qat, 4)
    assert layers == len(shared_layers(qat)) and layers > 0
    fix_quantization(qat)
    qat.eval()
    before = qat(x)
    bake(qat)
    torch.testing.assert_close(qat(x), before)
    assert (convert_int8(qat)(x) - before).abs().max() < 0.1


@pytest.mark.parametrize("change,pattern", [
    ({"clusters": 1}, r"share\.vision\.clusters"),
    ({"clusters": 1024}, r"share\.vision\.clusters"),
    ({"bf16": True}, r"share\.vision: .*bf16 must be false"),
])
def test_bad_sharing_params_are_rejected_at_load(raw_params, change, pattern):
    with pytest.raises(ConfigError, match=pattern):
        parse_config({**raw_params, "share": {"vision": {**raw_params["share"]["vision"], **change}}})
