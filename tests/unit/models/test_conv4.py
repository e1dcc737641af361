"""Conv-4: parameter layout for ANIL, generator-driven init, and behaviour under vmap + nested grad."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from fedmeta.config import config_from_dict
from fedmeta.errors import ConfigError
from fedmeta.models import build_model
from fedmeta.models.conv4 import NORMS, Conv4

SHAPE = (1, 16, 16)


def _model(norm: str = "batch", pool: str = "stride", channels: int = 8, outputs: int = 3) -> Conv4:
    return Conv4(SHAPE, outputs, channels=channels, norm=norm, pool=pool)


def _params(model: Conv4, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v.to(dtype) for k, v in model.init_params(gen).items()}


def test_parameters_split_into_body_and_head() -> None:
    model = _model()
    names = list(model.param_shapes)
    assert all(n.startswith(("body.", "head.")) for n in names)
    assert model.head_keys() == ["head.weight", "head.bias"]
    assert model.param_shapes["head.weight"] == (3, 8)
    # four conv blocks, each with a normalization affine (batch norm: conv has no bias)
    assert sum(n.endswith("conv.weight") for n in names) == 4
    assert sum(n.endswith("norm.weight") for n in names) == 4
    assert not any(n.endswith("conv.bias") for n in names)
    assert any(n.endswith("conv.bias") for n in _model(norm="none").param_shapes)


def test_init_comes_from_the_generator() -> None:
    model = _model()
    a, b, c = _params(model, 0), _params(model, 0), _params(model, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["body.0.conv.weight"], c["body.0.conv.weight"])
    state = torch.random.get_rng_state()
    _params(model, 2)
    assert torch.equal(state, torch.random.get_rng_state()), "init must not touch the global RNG"


@pytest.mark.parametrize("pool", ["stride", "max"])
def test_forward_features_and_head_agree(pool: str) -> None:
    model = _model(pool=pool)
    params = _params(model)
    x = torch.rand(6, *SHAPE)
    logits = model.forward(params, x)
    feats = model.features(params, x)
    assert logits.shape == (6, 3) and feats.shape == (6, 8)
    torch.testing.assert_close(model.head(params, feats), logits)


def test_per_task_batch_statistics_under_vmap() -> None:
    """With batch norm each task is normalized by its own statistics: no leakage across tasks."""
    model = _model("batch")
    params = _params(model)
    x = torch.rand(2, 5, *SHAPE)
    out = vmap(lambda xi: model.forward(params, xi))(x)
    torch.testing.assert_close(out[0], model.forward(params, x[0]))
    changed = x.clone()
    changed[1] = torch.rand(5, *SHAPE) * 3.0
    again = vmap(lambda xi: model.forward(params, xi))(changed)
    torch.testing.assert_close(again[0], out[0])


@pytest.mark.parametrize("norm", ["group", "layer", "none"])
def test_per_example_norms_do_not_depend_on_the_batch(norm: str) -> None:
    model = _model(norm, channels=16)
    params = _params(model)
    x = torch.rand(4, *SHAPE)
    alone = model.forward(params, x[:1])
    together = model.forward(params, x)
    torch.testing.assert_close(together[:1], alone)


def _maml_loss(
    model: Conv4,
    params: dict[str, torch.Tensor],
    sx: torch.Tensor,
    sy: torch.Tensor,
    qx: torch.Tensor,
    qy: torch.Tensor,
) -> torch.Tensor:
    inner = grad(lambda p: F.cross_entropy(model.forward(p, sx), sy))(params)
    adapted = {k: params[k] - 0.3 * inner[k] for k in params}
    return F.cross_entropy(model.forward(adapted, qx), qy)


@pytest.mark.parametrize("norm", NORMS)
def test_second_order_meta_gradient_matches_finite_differences(norm: str) -> None:
    """The vmapped second-order MAML gradient through Conv-4 against central differences (float64).

    The step is tiny because the loss is only piecewise smooth (ReLU kinks): a larger step
    straddles kinks and the difference quotient, not the gradient, goes wrong.
    """
    torch.manual_seed(0)
    shape = (1, 20, 20)  # 2x2 maps after four stride-2 blocks: group statistics stay well defined
    model = Conv4(shape, 3, channels=16, norm=norm)
    params = _params(model, 3, torch.float64)
    sx, qx = torch.rand(2, 6, *shape, dtype=torch.float64), torch.rand(2, 6, *shape, dtype=torch.float64)
    sy = qy = torch.tensor([0, 1, 2, 0, 1, 2]).expand(2, -1)
    grads = vmap(grad(lambda p, a, b, c, d: _maml_loss(model, p, a, b, c, d)), in_dims=(None, 0, 0, 0, 0))(
        params, sx, sy, qx, qy
    )
    direction = {k: torch.randn_like(v) for k, v in params.items()}
    eps = 1e-7
    for t in range(2):
        plus = _maml_loss(model, {k: v + eps * direction[k] for k, v in params.items()}, sx[t], sy[t], qx[t], qy[t])
        minus = _maml_loss(model, {k: v - eps * direction[k] for k, v in params.items()}, sx[t], sy[t], qx[t], qy[t])
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((grads[k][t] * direction[k]).sum() for k in params)
        assert abs(float(analytic) - float(numeric)) < 1e-6 * max(1.0, abs(float(numeric))), (
            float(analytic),
            float(numeric),
        )


def test_built_from_config_and_refuses_non_images() -> None:
    cfg = config_from_dict(
        {"task": {"name": "glyphs"}, "model": {"name": "conv4", "channels": 16, "norm": "group", "pool": "max"}}
    )
    model = build_model(cfg, (1, 28, 28), 5)
    assert isinstance(model, Conv4)
    assert (model.channels, model.norm, model.pool) == (16, "group", "max")
    assert model.describe()["norm"] == "group"
    with pytest.raises(ConfigError, match="image inputs"):
        build_model(cfg, (1,), 5)
    with pytest.raises(ConfigError, match="16x16"):
        build_model(cfg, (1, 8, 8), 5)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"channels": 0}, "model.channels"),
        ({"norm": "instance"}, "model.norm"),
        ({"pool": "avg"}, "model.pool"),
        ({"norm": "group", "channels": 12}, "multiple of 8"),
    ],
)
def test_config_validation_names_the_key(model: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_dict({"task": {"name": "glyphs"}, "model": {"name": "conv4", **model}})
