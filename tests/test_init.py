"""--init: timm / file / run weights for the backbone (edgessl.models.init), recorded in encoder.json."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import edgessl
from edgessl.config import resolve
from edgessl.errors import UserError
from edgessl.models.backbone import create_backbone, load_encoder
from edgessl.models.head import build_encoder
from edgessl.models.init import load_matching
from edgessl.train.run import pretrain as loop_pretrain
from edgessl.train.types import WarmStart

TINY = dict(image_size=32, batch_size=8, head_hidden=64, feature_dim=16, eval_every=0, quiet=True, workers=1,
            epochs=1, negatives=10, seed=4, deterministic=True)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A mobilenetv3_small state dict that is not the seed's random initialisation, with a classifier as timm's."""
    torch.manual_seed(123)
    model = timm.create_model("mobilenetv3_small_100", pretrained=False, num_classes=7)
    path = tmp_path_factory.mktemp("weights") / "pretrained.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_init_from_a_file_gives_the_first_step_of_the_model_loaded_by_hand(weights, tiny_data, tmp_path, capsys):
    losses = {"init": [], "hand": []}
    edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "init"), init=str(weights),
                     on_step=lambda i: losses["init"].append(i.loss), **TINY)
    out = " ".join(capsys.readouterr().out.split())
    assert "2 key(s) not used (classifier.bias, classifier.weight), 0 missing." in out  # one warning
    # by hand: the same seed and build, then the file loaded into the backbone (its classifier dropped)
    cfg = resolve(dict(TINY, data=str(tiny_data), out=str(tmp_path / "hand")))
    torch.manual_seed(cfg.seed)
    model, _, _ = build_encoder(cfg)
    model.backbone.load_state_dict({k: v for k, v in load_file(str(weights)).items()
                                    if not k.startswith("classifier.")})
    loop_pretrain(cfg, warm=WarmStart(model), on_step=lambda i: losses["hand"].append(i.loss))
    assert losses["init"][0] == losses["hand"][0]
    record = json.loads((tmp_path / "init" / "encoder.json").read_text())["init"]
    assert record["kind"] == "file" and record["source"] == str(weights) and len(record["sha256"]) == 64
    assert (record["missing"], record["unexpected"]) == (0, 2)
    assert "init: " in (tmp_path / "init" / "config.yaml").read_text()


@pytest.mark.slow
def test_init_from_a_run_continues_its_encoder_on_another_folder(demo_run, tiny_data, tmp_path):
    opts = dict(TINY, data=str(tiny_data), init=str(demo_run))
    model, arch, _ = build_encoder(resolve(opts))
    want = load_encoder(demo_run).state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.backbone.state_dict().items())
    assert arch["init"]["kind"] == "run" and arch["init"]["head"] == "from the run"
    run = edgessl.pretrain(out=str(tmp_path / "next"), **opts)  # a new folder, a new bank: trains
    assert run.history[-1]["epoch"] == 1
    assert json.loads((tmp_path / "next" / "encoder.json").read_text())["init"]["source"] == str(demo_run)
    with pytest.raises(UserError, match="holds a mobilenetv3_small_100 encoder, not --backbone resnet18"):
        build_encoder(resolve(dict(opts, backbone="resnet18")))


def test_key_mismatches_warn_or_refuse():
    model, _ = create_backbone("mobilenetv3_small", small_input=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    warned = []
    extra = dict(state, **{"fc.weight": torch.zeros(3, 3)})
    assert load_matching(model, extra, "x.pth", warned.append) == {"missing": [], "unexpected": ["fc.weight"]}
    assert warned == ["--init x.pth: 1 key(s) not used (fc.weight), 0 missing."]
    gone = dict(state)
    gone.pop("conv_stem.weight")
    with pytest.raises(UserError, match=r"--init x.pth: 1 of the model's \d+ weights are not in it, e.g. "
                                        r"conv_stem.weight. Is it the same --backbone\?"):
        load_matching(model, gone, "x.pth", warned.append)
    wrong = dict(state, **{"conv_stem.weight": torch.zeros(1, 1, 1, 1)})
    with pytest.raises(UserError, match="1 weight\\(s\\) have another shape than the model's, e.g. 'conv_stem.weight' "
                                        "\\(1, 1, 1, 1\\) vs \\(16, 3, 3, 3\\)\\. Only the stem differs \\(a "
                                        "small-input stem\\?\\): for an edgessl run's encoder pass its run directory "
                                        "as --init, which rebuilds its stem\\.$"):
        load_matching(model, wrong, "x.pth", warned.append)
    wrong["blocks.0.0.conv_dw.weight"] = torch.zeros(1)  # more than the stem: another network
    with pytest.raises(UserError, match="Is it the same --backbone\\?$"):
        load_matching(model, wrong, "x.pth", warned.append)


def test_init_timm_offline_is_one_line_saying_how_to_pass_a_file(timm_offline):
    with pytest.raises(UserError) as err:
        build_encoder(resolve(dict(TINY, init="timm")))
    msg = str(err.value)
    assert msg.startswith("--init timm: timm could not get the pretrained weights of 'mobilenetv3_small_100' (OSError;")
    assert "--init path/to/weights.safetensors (or .pth)" in msg and "\n" not in msg


def test_an_unreachable_hub_is_tried_from_the_cache_alone_without_its_retries(monkeypatch):
    import logging

    import timm
    from huggingface_hub import constants

    from edgessl.models import hub

    seen, real = [], timm.create_model

    def create_model(name, pretrained=False, **kw):  # what the hub client is set to while timm fetches
        if not pretrained:
            return real(name, pretrained=False, **kw)
        seen.append((constants.is_offline_mode(), logging.getLogger("huggingface_hub").level))
        raise OSError("cannot reach the hub")

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)
    before = (constants.HF_HUB_OFFLINE, logging.getLogger("huggingface_hub").level)
    with pytest.raises(UserError) as err:
        build_encoder(resolve(dict(TINY, init="timm")))
    assert seen == [(True, logging.ERROR)]  # the local cache only, and no retry lines
    assert (constants.HF_HUB_OFFLINE, logging.getLogger("huggingface_hub").level) == before
    assert str(err.value).startswith("--init timm: timm could not get the pretrained weights of "
                                     "'mobilenetv3_small_100' (offline: huggingface.co cannot be reached, and they "
                                     "are not in timm's cache). Where you are online")
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: "cached model")
    assert hub.create_pretrained("resnet18") == "cached model"  # found in the cache: used


def test_the_hub_probe(monkeypatch):
    import socket

    from huggingface_hub import constants

    from edgessl import network
    from edgessl.models import hub

    for v in network.PROXY_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "")  # read at import: the constant decides
    monkeypatch.setattr(constants, "ENDPOINT", "https://mirror.example:8443")
    assert hub.hub_host() == ("mirror.example", 8443)
    tried = []

    def refuse(address, timeout):
        tried.append((address, timeout))
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", refuse)
    assert hub.hub_reachable() is False and tried == [(("mirror.example", 8443), hub.PROBE_SECONDS)]
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # only the proxy can tell: try the hub
    assert hub.hub_reachable() is True
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the user asked for offline
    assert hub.hub_reachable() is False and len(tried) == 1


@pytest.mark.slow
def test_a_small_input_resnet_keeps_the_pretrained_stem_and_bad_paths_are_refused(tmp_path):
    model, arch = create_backbone("resnet18", small_input=True, keep_stem_weights=True)
    assert arch["stem"] == "resnet_stride1" and model.conv1.weight.shape == (64, 3, 7, 7)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    pretrained = timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict()
    assert load_matching(model, pretrained, "timm", lambda m: None) == {"missing": [], "unexpected": []}
    with pytest.raises(UserError, match="does not exist: pass timm, a weights file"):
        build_encoder(resolve(dict(TINY, init=str(tmp_path / "nope.pth"))))
    (tmp_path / "junk.pth").write_text("not weights")
    with pytest.raises(UserError, match=r"could not be read as weights \(.*\): it takes a \.safetensors file or a "
                                        r"PyTorch state dict / checkpoint \(\.pth, \.pt\)\.$"):
        build_encoder(resolve(dict(TINY, init=str(tmp_path / "junk.pth"))))


@pytest.mark.slow
def test_finetune_init_starts_the_run_architecture_from_other_weights(demo_run, labelled_demo, tmp_path):
    torch.manual_seed(7)
    other = tmp_path / "other.safetensors"
    model = load_encoder(demo_run)
    save_file({k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()},
              str(other))
    res = edgessl.finetune(demo_run, labelled_demo / "train", labelled_demo / "test", labels_per_class="all",
                           epochs=1, init=str(other), out=str(tmp_path / "ft"), quiet=True, workers=1)
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["init"]["kind"] == "file" and metrics["init"]["source"] == str(other)
    assert res.out_dir == tmp_path / "ft"
    from edgessl.evaluate.finetune import finetune_tag

    assert finetune_tag(10, False, "timm") == "lpc10-init-timm"
    assert finetune_tag(None, True, str(other)) == "all-frozen-init-other"
