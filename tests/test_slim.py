"""Slimmable widths: channel groups, slicing == masking == torch-pruning, private BatchNorm, SlimCLR's loss terms."""

import copy

import pytest
import torch
from torch import nn

from edgessl.errors import UserError
from edgessl.method.losses import active_widths, slimmable_loss, soft_cross_entropy, width_loss_weights
from edgessl.models.backbone import create_backbone, output_dim
from edgessl.models.channels import channel_groups, group_counts, parse_widths, width_channels, width_plan
from edgessl.models.head import Encoder, ProjectionHead
from edgessl.models.prune import count_params_macs, prune_to_counts
from edgessl.models.slicing import WidthView
from edgessl.models.slimmable import SlimmableEncoder

ARCHS = [("resnet18", True), ("mobilenetv3_small_100", True), ("efficientnet_b0", False)]


def randomise_bn(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) * 0.6 - 0.3)


def masked_copy(model: nn.Module, plan: dict) -> nn.Module:
    """The full model with every channel the plan drops zeroed at its source: the rows of conv/linear weights and
    biases, and BatchNorm's weight and bias (so BN outputs exactly 0 there). Same shapes, full cost."""
    m = copy.deepcopy(model)
    modules = dict(m.named_modules())
    with torch.no_grad():
        for name, p in plan.items():
            k = p.get("out")
            if k is None:
                continue
            layer = modules[name]
            for attr in ("weight", "bias"):
                t = getattr(layer, attr, None)
                if t is not None:
                    t[k:] = 0
    return m.eval()


def test_width_channels_closed_form():
    assert [width_channels(576, w) for w in (1.0, 0.75, 0.5, 0.25)] == [576, 432, 288, 144]
    assert width_channels(16, 0.25) == 4  # fewer than 8 kept: no rounding up to 8
    assert width_channels(72, 0.3) == 24  # 21.6 -> 22 -> nearest multiple of 8
    assert width_channels(20, 0.5) == 10  # not a multiple of 8: plain rounding
    assert width_channels(3, 0.1) == 1  # never zero
    assert parse_widths("0.5, 0.25") == [1.0, 0.5, 0.25]
    assert parse_widths([0.25, 1.0, 0.25]) == [1.0, 0.25]


@pytest.mark.parametrize("width", [1.5, 0.0, -0.5])
def test_width_outside_unit_interval_is_refused(width):
    with pytest.raises(UserError, match=rf"^a width must be in \(0, 1\], not {width:g}\.$"):
        width_channels(64, width)
    with pytest.raises(UserError, match="a width must be in"):
        parse_widths(f"1.0,{width}")


def test_widths_that_are_not_numbers_are_refused():
    with pytest.raises(UserError, match="--widths must be comma-separated numbers"):
        parse_widths("1.0,half")
    assert parse_widths(0.5) == [1.0, 0.5]  # a config file's `widths: 0.5`
    for full in ("1.0", "1", [1.0]):  # the full width alone was a traceback after the run folder was made
        with pytest.raises(UserError, match=r"^--widths needs a width below 1\.0, e\.g\. 1\.0,0\.5 \(got '.*'\): the "
                                            r"full width alone is a plain run, so leave --widths out\.$"):
            parse_widths(full)


@pytest.mark.slow
@pytest.mark.parametrize("name,small", ARCHS)
def test_sliced_equals_masked_equals_pruned(name, small):
    torch.manual_seed(0)
    model, _ = create_backbone(name, small_input=small)
    randomise_bn(model)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    groups = channel_groups(model, x)
    assert groups and all(g.members for g in groups)
    for width in (0.75, 0.5, 0.25):
        plan = width_plan(groups, width)
        with torch.no_grad():
            sliced = WidthView(model, plan)(x)
            full = masked_copy(model, plan)(x)
            pruned_model = prune_to_counts(copy.deepcopy(model), x, group_counts(groups, width)).eval()
            pruned = pruned_model(x)
        k = sliced.shape[1]
        assert k == width_channels(full.shape[1], width) < full.shape[1]
        torch.testing.assert_close(sliced, full[:, :k], rtol=1e-5, atol=1e-5)
        assert full[:, k:].abs().max() == 0  # the masked model's dropped features are exactly zero
        torch.testing.assert_close(pruned, sliced, rtol=1e-5, atol=1e-5)
        # a sub-network costs less when run: the pruned model has fewer parameters and MACs
        p_full, m_full = count_params_macs(model, x)
        p_sub, m_sub = count_params_macs(pruned_model, x)
        assert p_sub < p_full and m_sub < m_full


@pytest.mark.slow
def test_sliced_weights_are_views_that_train_the_shared_tensor():
    torch.manual_seed(0)
    model, _ = create_backbone("resnet18", small_input=True)
    x = torch.randn(4, 3, 32, 32)
    plan = width_plan(channel_groups(model, x), 0.5)
    WidthView(model, plan)(x).square().mean().backward()
    w = model.conv1.weight  # stem: 64 output channels, 3 input channels (never sliced)
    k = plan["conv1"]["out"]
    assert k == 32 and w.grad.shape == w.shape
    assert w.grad[:k].abs().sum() > 0 and w.grad[k:].abs().sum() == 0
    assert model.conv1.groups == 1  # restored after the call


def encoder_at(name="mobilenetv3_small_100", widths=(1.0, 0.5, 0.25)):
    torch.manual_seed(0)
    backbone, _ = create_backbone(name, small_input=True)
    enc = Encoder(backbone, ProjectionHead(output_dim(backbone, 32), 16, kind="linear"))
    return SlimmableEncoder(enc, list(widths), torch.zeros(2, 3, 32, 32))


def test_head_output_fixed_and_head_input_follows_the_backbone():
    slim = encoder_at()
    x = torch.randn(4, 3, 32, 32)
    outs = slim(x)
    assert [o.shape for o in outs] == [torch.Size([4, 16])] * 3  # the projection output is shared by every width
    assert slim.features(x, 0.5).shape[1] == 512 and slim.features(x, 1.0).shape[1] == 1024


@pytest.mark.slow
def test_private_batchnorm_per_width():
    slim = encoder_at()
    slim.train()
    x = torch.randn(8, 3, 32, 32)
    full_bn = slim.encoder.backbone.bn1
    private = slim.bn["w0500"]["backbone__bn1"]
    full_before, private_before = full_bn.running_mean.clone(), private.running_mean.clone()
    quarter_before = slim.bn["w0250"]["backbone__bn1"].running_mean.clone()
    assert torch.equal(private_before, full_before[: private_before.shape[0]])  # initialised from the full BN
    slim.forward_width(x, 0.5)  # only the width-0.5 statistics move
    assert torch.equal(full_bn.running_mean, full_before)
    assert not torch.equal(private.running_mean, private_before)
    assert torch.equal(slim.bn["w0250"]["backbone__bn1"].running_mean, quarter_before)
    moved = private.running_mean.clone()
    slim.forward_width(x, 1.0)  # the full width leaves the private statistics alone
    assert not torch.equal(full_bn.running_mean, full_before)
    assert torch.equal(private.running_mean, moved)
    # affine parameters are private too: a gradient at width 0.5 reaches its own BN, not the full one's
    slim.zero_grad()
    slim.forward_width(x, 0.5).sum().backward()
    assert private.weight.grad is not None and private.weight.grad.abs().sum() > 0
    assert full_bn.weight.grad is None or full_bn.weight.grad.abs().sum() == 0


def test_slow_start():
    widths = [1.0, 0.5, 0.25]
    assert [len(active_widths(widths, e, 10, 0.5)) for e in range(10)] == [1] * 5 + [3] * 5
    assert active_widths(widths, 0, 10, 0.0) == widths
    assert active_widths(widths, 2, 5, 0.5) == widths  # round(2.5) = 2


def test_loss_weights():
    assert width_loss_weights([1.0, 0.75, 0.5, 0.25]) == [2.5, 1.0, 1.0, 1.0]
    assert width_loss_weights([1.0, 0.5], reweight=False) == [1.0, 1.0]
    assert width_loss_weights([1.0]) == [1.0]


def test_soft_cross_entropy_gradient_and_identity():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, requires_grad=True)
    q = torch.softmax(torch.randn(5, 7), dim=1)
    loss = soft_cross_entropy(logits, q)
    (g,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(g, (torch.softmax(logits, 1) - q).detach() / 5)
    p = torch.log_softmax(logits, 1)
    kl_plus_h = (q * (q.log() - p)).sum(1).mean() - (q * q.log()).sum(1).mean()
    torch.testing.assert_close(loss, kl_plus_h)


def test_slimmable_loss_closed_form():
    full, own = torch.tensor(2.0), [torch.tensor(3.0), torch.tensor(5.0)]
    logits = [torch.zeros(2, 4), torch.zeros(2, 4)]  # uniform student: CE to any teacher = log 4
    teacher = torch.softmax(torch.randn(2, 4), dim=1)
    ce = torch.log(torch.tensor(4.0))
    total = slimmable_loss(full, own, logits, teacher, [2.5, 1.0, 1.0], distill=0.5)
    torch.testing.assert_close(total, 2.5 * 2 + (0.5 * 3 + 0.5 * ce) + (0.5 * 5 + 0.5 * ce))
    torch.testing.assert_close(slimmable_loss(full, own, logits, teacher, [1.0, 1.0, 1.0], distill=0.0),
                               torch.tensor(10.0))


def test_untraceable_or_unsliceable_models_are_refused():
    class TwoInputs(nn.Module):  # torch-pruning's trace calls forward(example) and fails
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x, y):
            return self.conv(x) + y

    with pytest.raises(UserError, match=r"^torch-pruning cannot trace TwoInputs .*--widths, slim and prune need"):
        channel_groups(TwoInputs(), torch.zeros(1, 3, 8, 8))
    grouped = nn.Sequential(nn.Conv2d(3, 16, 3), nn.Conv2d(16, 16, 3, groups=4), nn.Conv2d(16, 8, 1))
    with pytest.raises(UserError, match="is a grouped convolution"):
        channel_groups(grouped, torch.zeros(1, 3, 16, 16))
    with pytest.raises(UserError, match="a width must be in"):
        encoder_at(widths=(1.0, 1.5))


@pytest.mark.slow
def test_training_loop_slow_start_and_flags(labelled_demo, tmp_path):
    """Before the slow start only the full width trains (the sub-width's private BN does not move), after it every
    width does; --no-width-reweight reaches the config."""
    from typer.testing import CliRunner

    import edgessl
    from edgessl.cli import app

    seen = []

    def on_step(info):
        bn = info.model.bn["w0500"]["backbone__bn1"]
        seen.append((info.epoch, bn.weight.detach().clone(), bn.running_mean.detach().clone()))

    edgessl.pretrain(data=str(labelled_demo / "train"), out=str(tmp_path / "r"), epochs=4, image_size=32,
                     batch_size=8, feature_dim=16, eval_every=0, quiet=True, workers=1, widths="1.0,0.5",
                     slow_start=0.5, on_step=on_step)
    first = [s for s in seen if s[0] < 2]  # round(0.5 * 4) = 2 epochs at full width only
    second = [s for s in seen if s[0] >= 2]
    assert len(first) > 1 and len(second) > 1
    assert all(torch.equal(s[1], first[0][1]) and torch.equal(s[2], first[0][2]) for s in first)
    assert not torch.equal(second[-1][1], first[-1][1]) and not torch.equal(second[-1][2], first[-1][2])
    res = CliRunner().invoke(app, ["pretrain", "--data", str(labelled_demo / "train"), "--widths", "0.5",
                                   "--no-width-reweight", "--slow-start", "0", "--epochs", "1", "--image-size", "32",
                                   "--batch-size", "8", "--eval-every", "0", "--out", str(tmp_path / "c"), "--quiet"])
    assert res.exit_code == 0, res.output
    text = (tmp_path / "c" / "config.yaml").read_text()
    assert "widths: 1,0.5" in text and "width_reweight: false" in text and "slow_start: 0.0" in text
    res = CliRunner().invoke(app, ["pretrain", "--widths", "1.0,2", "--epochs", "1"])
    assert res.exit_code == 2 and res.output.strip() == "error: a width must be in (0, 1], not 2."


@pytest.mark.parametrize("ratio", [1e-9, 0.1, 0.3, 0.8])
def test_prune_keeps_what_a_width_of_one_minus_the_ratio_keeps(ratio):
    """torch-pruning's round_to floors the kept count to a multiple of 8: --ratio 0.1 had kept 8 of 16 channels and
    1e-9 took 8 off every group (7 % of MobileNetV3-Small's parameters for a ratio of nothing)."""
    from edgessl.models.prune import prune_by_importance

    torch.manual_seed(0)
    backbone, _ = create_backbone("mobilenetv3_small_100", small_input=True)
    model = Encoder(backbone, ProjectionHead(output_dim(backbone, 32), 16, kind="linear")).eval()
    example = torch.randn(2, 3, 32, 32)
    keep = [model.head.net]
    before = {g.root: g.channels for g in channel_groups(model, example, keep)}
    after = {**before, **prune_by_importance(model, example, ratio, keep_outputs=keep)}
    assert after == {root: width_channels(c, 1 - ratio) for root, c in before.items()}
    assert (after == before) == (ratio < 1e-6) and model(example).shape == (2, 16)  # 1e-9 removes nothing
    sixteen = [after[root] for root, c in before.items() if c == 16]
    assert sixteen and set(sixteen) == {{1e-9: 16, 0.1: 16, 0.3: 8, 0.8: 3}[ratio]}  # 14.4 is nearer 16; 3.2 -> 3


def test_a_width_near_a_trained_one_is_named_as_given():
    """--width 0.50000001 had been refused as "width 0.5 was not trained ... its widths are 1, 0.5"."""
    from pathlib import Path

    from edgessl.models.widths import match_width

    assert match_width(Path("r"), {"widths": [1.0, 0.5]}, 0.5 + 1e-12) == 0.5
    with pytest.raises(UserError, match=r"^width 0\.50000001 was not trained in 'r': its widths are 1, 0\.5\.$"):
        match_width(Path("r"), {"widths": [1.0, 0.5]}, 0.50000001)



def test_the_width_reports_leave_one_out_knn_takes_k_below_the_smallest_class():
    """The report's kNN among the labelled images had used k = 20 on a folder of 6 images per class."""
    from pathlib import Path

    from edgessl.data.folder import ImageSet
    from edgessl.deploy.widths import Accuracy

    rows = torch.zeros(12, 3, 8, 8, dtype=torch.uint8)
    labelled = ImageSet(Path("."), [Path(f"{i}.png") for i in range(12)], 8, rows, torch.arange(2).repeat(6),
                        ["a", "b"])
    assert Accuracy(labelled, None).k == 5 and Accuracy(None, None).k == 20
    assert Accuracy(labelled, labelled).k == 20  # a held-out split: no image leaves its own vote
