"""Model zoo: parameter counts, shapes, no BatchNorm, deterministic init, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsqueeze.errors import ConfigError
from fedsqueeze.models import MODELS, build_model, count_parameters

# (name, input_shape, num_classes, options, exact parameter count)
CASES: list[tuple[str, tuple[int, ...], int, dict[str, object], int]] = [
    ("logreg", (1, 28, 28), 10, {}, 7_850),
    ("mlp", (1, 28, 28), 10, {}, 199_210),
    ("cnn", (1, 28, 28), 10, {}, 1_663_370),  # McMahan et al. 2017 report 1,663,370
    ("cifar_cnn", (3, 32, 32), 10, {}, 122_570),
    ("cifar_cnn", (1, 28, 28), 10, {}, 93_322),
    ("resnet18_gn", (3, 32, 32), 10, {}, 11_173_962),
    ("lstm", (80,), 80, {}, 819_920),
]


def _example(name: str, shape: tuple[int, ...], n: int = 2) -> torch.Tensor:
    if name == "lstm":
        return torch.randint(0, 80, (n, *shape))
    return torch.randn(n, *shape)


@pytest.mark.parametrize(("name", "shape", "classes", "opts", "count"), CASES)
def test_parameter_count(name: str, shape: tuple[int, ...], classes: int, opts: dict, count: int) -> None:
    assert count_parameters(build_model(name, shape, classes, **opts)) == count


def test_fedavg_cnn_count_is_the_papers() -> None:
    model = build_model("cnn", (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) == 1_663_370


@pytest.mark.parametrize(("name", "shape", "classes", "opts", "count"), CASES)
def test_forward_shape(name: str, shape: tuple[int, ...], classes: int, opts: dict, count: int) -> None:
    model = build_model(name, shape, classes, **opts)
    out = model(_example(name, shape, 3))
    assert out.shape == (3, classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_registry_lists_every_model() -> None:
    assert set(MODELS) == {"logreg", "mlp", "cnn", "cifar_cnn", "resnet18_gn", "lstm"}


@pytest.mark.parametrize(("name", "shape", "classes", "opts", "count"), CASES)
def test_no_batchnorm_no_dropout_no_buffers(
    name: str, shape: tuple[int, ...], classes: int, opts: dict, count: int
) -> None:
    model = build_model(name, shape, classes, **opts)
    bad = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Dropout2d)
    assert not [m for m in model.modules() if isinstance(m, bad)]
    assert list(model.buffers()) == []


def test_resnet_uses_groupnorm() -> None:
    model = build_model("resnet18_gn", (3, 32, 32), 10, groups=32)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 1 + 4 * 2 * 2 + 3  # stem, two per block, three projection shortcuts
    assert all(m.num_groups == 32 for m in norms)
    default = build_model("resnet18_gn", (3, 32, 32), 10)
    assert all(m.num_groups == 2 for m in default.modules() if isinstance(m, nn.GroupNorm))


@pytest.mark.parametrize(("name", "shape", "classes", "opts", "count"), CASES)
def test_deterministic_init(name: str, shape: tuple[int, ...], classes: int, opts: dict, count: int) -> None:
    torch.manual_seed(123)
    a = build_model(name, shape, classes, **opts).state_dict()
    torch.manual_seed(123)
    b = build_model(name, shape, classes, **opts).state_dict()
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(124)
    c = build_model(name, shape, classes, **opts).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_image_models_accept_flat_and_hw_inputs() -> None:
    torch.manual_seed(0)
    cnn = build_model("cnn", (1, 28, 28), 10)
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(cnn(x.reshape(4, 784)), cnn(x))
    assert build_model("cifar_cnn", (28, 28), 10)(torch.randn(2, 28, 28)).shape == (2, 10)
    assert build_model("mlp", (784,), 62, hidden=[64])(torch.randn(2, 784)).shape == (2, 62)


def test_mlp_hidden_option() -> None:
    model = build_model("mlp", (1, 28, 28), 10, hidden=(100,))
    assert count_parameters(model) == 784 * 100 + 100 + 100 * 10 + 10


def test_lstm_options_and_dtype() -> None:
    model = build_model("lstm", (20,), 80, hidden_size=32, embed_dim=4)
    assert model(torch.randint(0, 80, (5, 20))).shape == (5, 80)


def test_unknown_model_suggests_nearest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'mlp'"):
        build_model("mpl", (1, 28, 28), 10)
    with pytest.raises(ConfigError, match="resnet18_gn"):
        build_model("resnet18", (3, 32, 32), 10)


def test_bad_arguments_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="groups"):
        build_model("resnet18_gn", (3, 32, 32), 10, groups=3)
    with pytest.raises(ConfigError, match="bad options"):
        build_model("mlp", (1, 28, 28), 10, width=5)
    with pytest.raises(ConfigError, match="image input_shape"):
        build_model("cnn", (784,), 10)
    with pytest.raises(ConfigError, match="18x18"):
        build_model("cifar_cnn", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="num_classes"):
        build_model("logreg", (4,), 0)
    with pytest.raises(ConfigError, match="input_shape"):
        build_model("logreg", (), 10)
