import pytest
import torch

from models import available_models, build_model
from models.wide_resnet import WideResNet

# Published counts: WRN-28-10 36.5M (Zagoruyko & Komodakis), CIFAR ResNet-18 11.17M.
COUNTS = {("wrn28_10", 10): 36_479_194, ("wrn28_10", 100): 36_536_884,
          ("resnet18", 10): 11_173_962, ("resnet18", 100): 11_220_132,
          ("wrn16_8", 10): 10_961_370}


@pytest.mark.parametrize("name, classes", sorted(COUNTS))
def test_parameter_counts(name, classes):
    model = build_model(name, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == COUNTS[name, classes]


@pytest.mark.parametrize("name", ["resnet18", "wrn16_8", "wrn10_1", "wrn28_10"])
def test_forward_backward_and_shape(name):
    model = build_model(name, num_classes=7)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_generic_wrn_names_and_dropout():
    model = build_model("wrn22_2", num_classes=10, dropout=0.3)
    assert isinstance(model, WideResNet) and len(model.blocks) == 9
    assert model.blocks[0].dropout.p == 0.3


def test_initialisation_follows_the_reference():
    model = build_model("wrn10_1")
    conv = model.blocks[0].conv1  # fan_out = 3*3*16
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 16)) ** 0.5, rel=0.15)
    assert torch.equal(model.bn.weight, torch.ones(64)) and torch.equal(model.bn.bias, torch.zeros(64))
    assert torch.equal(model.fc.bias, torch.zeros(10))


@pytest.mark.parametrize("name", ["unknown", "wrn27_10", "resnet50", "wrn28"])
def test_unknown_or_invalid_names(name):
    with pytest.raises(ValueError, match="valid names|6n\\+4"):
        build_model(name)


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="option"):
        build_model("resnet18", dropout=0.1)
    with pytest.raises(ValueError, match="option"):
        build_model("wrn16_8", widht=3)


def test_available_models_lists_the_named_ones():
    assert {"wrn28_10", "wrn16_8", "resnet18"} <= set(available_models())


@pytest.mark.parametrize("name", ["resnet18", "wrn16_2"])
def test_channels_last_matches_contiguous(name):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(4, 3, 32, 32)
    expected = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    got = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_forward():
    model = build_model("wrn10_1")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = build_model("wrn10_1").eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: no Python-side graph breaks
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
