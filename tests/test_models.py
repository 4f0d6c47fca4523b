"""timm backbones: aliases, small-input stems, encoder files round trip, head sizing."""

import json

import pytest
import torch

from edgessl.errors import UserError
from edgessl.models.backbone import (
    create_backbone,
    load_encoder,
    output_dim,
    resolve_name,
    save_encoder,
    want_small_input,
)
from edgessl.models.head import ProjectionHead


def test_aliases_and_unknown_names():
    assert resolve_name("mobilenetv3_small") == "mobilenetv3_small_100"
    assert resolve_name("mobilenetv3_large") == "mobilenetv3_large_100"
    assert resolve_name("resnet18") == "resnet18"
    with pytest.raises(UserError, match=r"^Unknown backbone 'resnet19'\. Closest timm names: .*resnet18"):
        resolve_name("resnet19")


def test_small_input_option():
    assert want_small_input("auto", 32) and not want_small_input("auto", 33)
    assert want_small_input("on", 224) and not want_small_input("off", 16)
    with pytest.raises(UserError, match="--small-input must be auto, on or off"):
        want_small_input("maybe", 32)


def feature_map(model, size):
    with torch.no_grad():
        return model.eval().forward_features(torch.zeros(1, 3, size, size)).shape[-1]


@pytest.mark.parametrize("size", [32, 64])
def test_resnet_cifar_stem(size):
    plain, _ = create_backbone("resnet18", small_input=False)
    small, arch = create_backbone("resnet18", small_input=True)
    assert arch == {"timm_name": "resnet18", "stem": "resnet"}
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, torch.nn.Identity)
    assert feature_map(plain, size) == size // 32  # 1 at 32 px: the image is reduced to 1x1
    assert feature_map(small, size) == size // 8


@pytest.mark.parametrize("size", [32, 64])
def test_mobilenet_stride1_stem(size):
    plain, _ = create_backbone("mobilenetv3_small", small_input=False)
    small, arch = create_backbone("mobilenetv3_small", small_input=True)
    assert arch == {"timm_name": "mobilenetv3_small_100", "stem": "stride1"}
    assert small.conv_stem.stride == (1, 1)
    assert feature_map(plain, size) == size // 32
    assert feature_map(small, size) == size // 16


def test_efficientnet_stem_and_unknown_rule():
    model, arch = create_backbone("efficientnet_b0", small_input=True)
    assert arch["stem"] == "stride1" and model.conv_stem.stride == (1, 1)
    with pytest.raises(UserError, match="no small-input stem rule for 'vit_tiny_patch16_224'"):
        create_backbone("vit_tiny_patch16_224", small_input=True)


@pytest.mark.parametrize("name,stem", [("resnet18", True), ("mobilenetv3_small", True), ("mobilenetv3_small", False)])
def test_encoder_round_trip_from_files_alone(tmp_path, name, stem):
    torch.manual_seed(0)
    model, arch = create_backbone(name, small_input=stem)
    with torch.no_grad():  # non-trivial BN statistics
        model.train()(torch.randn(4, 3, 32, 32))
    dim = output_dim(model, 32)
    meta = {**arch, "input_size": [3, 32, 32], "image_size": 32, "mean": [0.5] * 3, "std": [0.2] * 3,
            "feature_dim": dim}
    save_encoder(model, tmp_path, meta)
    assert json.loads((tmp_path / "encoder.json").read_text())["feature_dim"] == dim
    loaded = load_encoder(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.eval()(x), atol=1e-6)
    assert loaded.edgessl_meta["timm_name"] == arch["timm_name"]
    assert not loaded.training


def test_load_encoder_missing_files(tmp_path):
    with pytest.raises(UserError, match=r"No encoder in '.*': expected encoder.safetensors and encoder.json"):
        load_encoder(tmp_path)


def test_no_encoder_says_what_the_folder_holds_instead(tmp_path):
    """A fine-tune folder or a run stopped before its first epoch had got the bare 'No encoder' line."""
    import json

    head = "No encoder in '{}': expected encoder.safetensors and encoder.json (a run directory of `edgessl pretrain`)."
    tuned = tmp_path / "finetune-lpc10"
    tuned.mkdir()
    (tuned / "classifier.json").write_text(json.dumps({"finetune": {"encoder_run": "/runs/a"}}))
    with pytest.raises(UserError) as e:
        load_encoder(tuned)
    assert str(e.value) == (head.format(tuned) + " It holds a fine-tuned classifier: pass the run it came from "
                            f"(/runs/a), or export the classifier with: edgessl export /runs/a --classifier {tuned}")
    (tuned / "classifier.json").write_text("[]")
    with pytest.raises(UserError, match=r"came from \(<run>\), or export the classifier with: edgessl export <run>"):
        load_encoder(tuned)
    stopped = tmp_path / "run"
    stopped.mkdir()
    (stopped / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(UserError) as e:
        load_encoder(stopped)
    assert str(e.value) == (head.format(stopped) + " It holds a run stopped before its first epoch ended "
                            f"(checkpoint.pt only): continue it with edgessl pretrain --resume {stopped}")
    (stopped / "encoder.safetensors").write_bytes(b"")  # a finished run whose encoder.json was deleted
    with pytest.raises(UserError) as e:
        load_encoder(stopped)
    assert str(e.value) == (head.format(stopped) + " Its encoder.json is missing while checkpoint.pt holds the "
                            f"trained weights: edgessl pretrain --resume {stopped} with a larger --epochs trains on "
                            "and writes it again.")  # had said the run stopped before its first epoch ended


def test_head_sized_from_dummy_forward():
    model, _ = create_backbone("mobilenetv3_small")
    dim = output_dim(model, 64)
    assert dim == 1024  # timm's MobileNetV3 has a 576 -> 1024 conv head before pooling output
    head = ProjectionHead(dim, 128, 2048, "mlp")
    assert head(torch.randn(3, dim)).shape == (3, 128)
    assert ProjectionHead(dim, 64, kind="linear")(torch.randn(2, dim)).shape == (2, 64)
