import pytest
import torch

from models import build_model
from models.wide_resnet import WideResNet

# Published counts: WRN-28-10 36.5M (Zagoruyko & Komodakis), CIFAR ResNet-18 11.17M; the SAM
# authors' WRN-28-10 has no 1x1 shortcut convolutions: 36,479,194 - (16*160 + 160*320 + 320*640).
COUNTS = {("wrn28_10", 10): 36_479_194, ("wrn28_10", 100): 36_536_884,
          ("sam_wrn28_10", 10): 36_220_634, ("sam_wrn28_10", 100): 36_278_324,
          ("resnet18", 10): 11_173_962, ("resnet18", 100): 11_220_132,
          ("wrn16_8", 10): 10_961_370}


@pytest.mark.parametrize("name, classes", sorted(COUNTS))
def test_parameter_counts(name, classes):
    model = build_model(name, num_classes=classes)
    assert sum(p.numel() for p in model.parameters()) == COUNTS[name, classes]


@pytest.mark.parametrize("name", ["resnet18", "wrn16_8", "wrn10_1", "wrn28_10", "sam_wrn28_10", "sam_wrn10_2"])
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
    plain = build_model("wrn22_2")  # what train.py builds when --dropout is 0
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in plain.modules())


def test_initialisation_follows_the_reference():
    model = build_model("wrn10_1")
    conv = model.blocks[0].conv1  # fan_out = 3*3*16
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 16)) ** 0.5, rel=0.15)
    assert torch.equal(model.bn.weight, torch.ones(64)) and torch.equal(model.bn.bias, torch.zeros(64))
    assert torch.equal(model.fc.bias, torch.zeros(10))


@pytest.mark.parametrize("name", ["unknown", "wrn27_10", "resnet50", "wrn28", "wrn4_2", "sam_wrn14_2", "wrn16_0"])
def test_unknown_or_invalid_names(name):
    with pytest.raises(ValueError, match="valid names|6n\\+4|width must be >= 1"):
        build_model(name)


@pytest.mark.parametrize("name", ["resnet18", "resnet32", "resnet32_jiang", "wrn16_2", "sam_wrn16_2"])
def test_every_convolution_is_kaiming_normal_fan_out(name):
    """Kaiming-normal with fan_out and ReLU's gain, sqrt(2 / (out x k x k)), in every convolution,
    the stem (3 -> 16/64 channels, where fan_in and fan_out differ most) included; BatchNorm 1 and 0."""
    torch.manual_seed(0)
    model = build_model(name)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].in_channels == 3
    for conv in convs:
        out, _, kh, kw = conv.weight.shape
        if conv.weight.numel() >= 400:
            assert conv.weight.std().item() == pytest.approx((2 / (out * kh * kw)) ** 0.5, rel=0.15), conv
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and torch.equal(bn.bias, torch.zeros_like(bn.bias))


def test_unknown_option_is_rejected():
    with pytest.raises(ValueError, match="option"):
        build_model("resnet18", dropout=0.1)
    with pytest.raises(ValueError, match="option"):
        build_model("wrn16_8", widht=3)


@pytest.mark.parametrize("name", ["resnet18", "wrn16_2", "sam_wrn16_2"])
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


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = build_model("wrn10_1").eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: no Python-side graph breaks
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_sam_wrn_blocks_follow_the_official_shortcuts():
    """google-research/sam wide_resnet.py: the first block activates before it branches (its
    shortcut is BN-ReLU of the input, zero-padded to the new width); a block that halves the
    resolution pools its raw input by 2 and zero-pads the channels; the others add their input."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    model = build_model("sam_wrn10_2").eval()
    first, second, third = model.blocks
    x = torch.randn(2, 16, 8, 8)

    def branch(block, inp):
        return block.conv2(F.relu(block.bn2(block.conv1(F.relu(block.bn1(inp))))))

    activated = F.relu(first.bn1(x))
    torch.testing.assert_close(first(x), branch(first, x) + F.pad(activated, (0, 0, 0, 0, 0, 16)))
    y = torch.randn(2, 32, 8, 8)
    pooled = F.avg_pool2d(y, 2)
    torch.testing.assert_close(second(y), branch(second, y) + torch.cat([pooled, torch.zeros_like(pooled)], 1))
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())


def test_sam_wrn_final_layer_is_uniform_over_one_over_sqrt_classes():
    torch.manual_seed(0)
    fc = build_model("sam_wrn28_10", num_classes=100).fc  # 64,000 weights
    bound = 1 / 100 ** 0.5
    assert fc.weight.abs().max().item() <= bound and fc.weight.abs().max().item() > 0.99 * bound
    assert fc.weight.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.02)
    assert torch.equal(fc.bias, torch.zeros(100))


@pytest.mark.parametrize("name", ["wrn10_2", "sam_wrn10_2"])
def test_norm_none_removes_every_batchnorm(name):
    model = build_model(name, norm="none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="takes only the options norm; got dropout"):
        build_model("sam_wrn10_2", dropout=0.1)


def test_jiang_resnet_head_is_leaky_relu_then_pooling_then_linear():
    """mentormix resnet_model.py: after the last unit, BatchNorm, leaky ReLU (slope 0.1), global
    average pooling, the logits layer."""
    torch.manual_seed(0)
    model = build_model("resnet32_jiang").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.bn(model.blocks(model.conv1(x)))
        assert (features < 0).any()  # the slope matters
        want = model.fc(torch.nn.functional.leaky_relu(features, 0.1).mean((2, 3)))
        torch.testing.assert_close(model(x), want)


def test_jiang_resnet_first_block_alone_activates_before_it_branches():
    """mentormix resnet_model.py _residual: unit 0 of the first stage applies BatchNorm(leaky ReLU)
    to the input and branches from that; every other unit branches from the raw input. Written out
    for units 0 and 1 (the shortcut of unit 0 zero-pads 64 -> 128 channels, 32 on each side)."""
    from torch.nn.functional import conv2d, leaky_relu, pad
    torch.manual_seed(0)
    model = build_model("resnet32_jiang").eval()
    assert [b.activate_before_residual for b in model.blocks] == [True] + [False] * 14
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        for block, x_in in ((model.blocks[0], x), (model.blocks[1], torch.randn(2, 128, 8, 8))):
            if block.activate_before_residual:
                shortcut = out = block.bn1(leaky_relu(x_in, 0.1))
                shortcut = pad(shortcut, (0, 0, 0, 0, 32, 32))
            else:
                shortcut, out = x_in, leaky_relu(block.bn1(x_in), 0.1)
            out = leaky_relu(block.bn2(conv2d(out, block.conv1.weight, padding=1)), 0.1)
            want = conv2d(out, block.conv2.weight, padding=1) + shortcut
            torch.testing.assert_close(block(x_in), want)


@pytest.mark.parametrize("name", ["wrn27_10", "sam_wrn16_0"])
def test_model_spec_refuses_invalid_wide_resnets_without_building(name):
    from models import model_spec
    with pytest.raises(ValueError, match="6n\\+4|width must be >= 1"):
        model_spec(name)


@pytest.mark.parametrize("cls", ["WideResNet", "SamWideResNet"])
@pytest.mark.parametrize("depth, width, norm", [(27, 10, "batch"), (16, 0, "batch"), (16, 2, "layer")])
def test_a_wide_resnet_built_directly_refuses_what_it_cannot_be(cls, depth, width, norm):
    """A forked script that builds the class itself (not through model_spec) gets the same refusal."""
    import models.wide_resnet as wrn
    with pytest.raises(ValueError, match="6n\\+4|width must be >= 1|norm must be one of"):
        getattr(wrn, cls)(depth=depth, width=width, norm=norm)
