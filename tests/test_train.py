"""The training loop end to end on tiny data: outputs, bank initialisation, resume equivalence, divergence."""

import json
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

import edgessl
from edgessl.cli import app
from edgessl.config import resolve
from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD
from edgessl.data.folder import load_image_folder
from edgessl.demo import demo_images
from edgessl.errors import TrainingDiverged
from edgessl.method.instance import InstanceDiscrimination
from edgessl.models.backbone import create_backbone, output_dim
from edgessl.models.head import Encoder, ProjectionHead
from edgessl.train.checkpoint import load_checkpoint
from edgessl.train.prepare import bank_batch_cap, bank_init_order, forward_init_bank

TINY = dict(image_size=32, batch_size=8, epochs=2, head_hidden=64, feature_dim=16, quiet=True, workers=1)


@pytest.mark.slow
def test_outputs_metrics_and_reloadable_config(tiny_data, tmp_path):
    out = tmp_path / "run"
    result = edgessl.pretrain(data=str(tiny_data), out=str(out), labels_from_folders=True, **TINY)
    assert result.run_dir == out
    for name in ("config.yaml", "metrics.jsonl", "checkpoint.pt", "encoder.safetensors", "encoder.json", "curves.png"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("epoch", "loss", "lr", "images_per_s", "seconds", "knn_top1"):
        assert all(key in r for r in rows), key
    assert all(0 <= r["knn_top1"] <= 1 for r in rows)
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["timm_name"] == "mobilenetv3_small_100" and meta["stem"] == "stride1"  # auto: on at 32 px
    assert meta["input_size"] == [3, 32, 32] and len(meta["mean"]) == 3 and meta["feature_dim"] == 1024
    # config.yaml is complete and reloads to the same options
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert resolve(config=str(out / "config.yaml")).to_dict() == cfg
    # the encoder file equals the checkpoint's backbone
    enc = edgessl.load_encoder(out)
    ckpt = load_checkpoint(out)
    backbone_state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    for k, v in enc.state_dict().items():
        assert torch.equal(v, backbone_state[k]), k
    assert ckpt["epoch"] == 2 and ckpt["method"]["bank.weight"].shape == (24, 16)


def test_forward_pass_bank_initialisation_fills_every_row(tiny_data):
    torch.manual_seed(0)
    images = load_image_folder(tiny_data, 32)
    backbone, _ = create_backbone("mobilenetv3_small", small_input=True)
    model = Encoder(backbone, ProjectionHead(output_dim(backbone, 32), 16, 64))
    method = InstanceDiscrimination(len(images), 16, generator=torch.Generator().manual_seed(0))
    random_rows = method.bank.weight.clone()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    ticks = []
    forward_init_bank(model, method, images, torch.device("cpu"), "fp32", IMAGENET_MEAN, IMAGENET_STD, batch_size=10,
                      progress=lambda done, total: ticks.append((done, total)))
    assert ticks == [(8, 24), (16, 24), (24, 24)]  # the bar after each chunk (50,000 images: a minute, now shown)
    bank = method.bank.weight
    assert torch.allclose(bank.norm(dim=1), torch.ones(len(images)))
    assert ((bank - random_rows).norm(dim=1) > 1e-3).all()  # no row left at its random value
    # rows are the network's own features: train-mode BN over the same chunks (24 rows in the seeded order
    # bank_init_order(0, 24) -> 3 chunks of 8)
    first = bank_init_order(0, len(images))[:8]
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (images.images[first].float() / 255 - mean) / std
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.train()(x), dim=1)
    model.load_state_dict(state_before)
    assert torch.allclose(bank[first], expected, atol=1e-5)
    for k, v in model.state_dict().items():  # BN running statistics are untouched
        assert torch.equal(v, state_before[k]), k


def test_bank_initialisation_visits_the_images_in_a_seeded_shuffled_order():
    order = bank_init_order(0, 1000)
    assert sorted(order.tolist()) == list(range(1000))  # a permutation: every row once
    assert torch.equal(order, bank_init_order(0, 1000))  # seeded: the same every time
    assert not torch.equal(order, bank_init_order(1, 1000))  # another seed, another order
    # shuffled: a chunk of 100 from ten sorted class folders of 100 mixes the classes instead of holding one
    assert len(set((order[:100] // 100).tolist())) == 10


class Killed(Exception):
    pass


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(tiny_data, tmp_path):
    opts = dict(TINY, epochs=3, deterministic=True, seed=3, eval_every=0, negatives=10)  # 10 < 24: sampled columns
    full = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "full"), **opts)

    def kill(info):
        if info.epoch == 1 and info.step == 1:
            raise Killed()

    with pytest.raises(Killed):
        edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "cut"), on_step=kill, **opts)
    assert load_checkpoint(tmp_path / "cut")["epoch"] == 1
    resumed = edgessl.pretrain(resume=str(tmp_path / "cut"), quiet=True)
    a, b = load_checkpoint(full.run_dir), load_checkpoint(resumed.run_dir)
    assert a["epoch"] == b["epoch"] == 3
    for k, v in a["model"].items():
        assert torch.allclose(v.float(), b["model"][k].float(), atol=1e-5), k
    assert torch.allclose(a["method"]["bank.weight"], b["method"]["bank.weight"], atol=1e-5)
    assert [r["loss"] for r in full.history] == pytest.approx([r["loss"] for r in resumed.history], abs=1e-5)


@pytest.mark.slow
def test_non_finite_losses_stop_the_run_and_keep_the_last_good_checkpoint(tiny_data, tmp_path):
    def poison(info):
        if info.epoch == 1 and info.step == 0:
            with torch.no_grad():
                next(info.model.parameters()).fill_(float("nan"))

    opts = dict(TINY, batch_size=2, epochs=3, eval_every=0)  # 12 steps per epoch
    with pytest.raises(TrainingDiverged, match="10 non-finite losses in a row") as err:
        edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "nan"), on_step=poison, **opts)
    assert "last good checkpoint is kept" in str(err.value)
    ckpt = load_checkpoint(tmp_path / "nan")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_npid_preset_and_explicit_flags_win():
    cfg = resolve({"method": "npid"})
    assert (cfg.bank_init, cfg.bank_update, cfg.temperature, cfg.sd_weight) == ("random", "momentum", 0.1, 0.0)
    assert resolve({"method": "npid", "temperature": 0.07}).temperature == 0.07
    full = resolve({})
    assert (full.bank_init, full.bank_update, full.temperature, full.sd_weight) == ("forward", "grad", "auto", 5.0)
    assert (full.head, full.bank_lr) == ("linear", "auto")


@pytest.mark.slow
def test_npid_and_cutmix_runs_train(tiny_data, tmp_path):
    r = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "npid"), method="npid", **dict(TINY, epochs=1))
    assert r.history[0]["loss_sd"] == 0.0
    r = edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "cm"), cutmix=0.5, **dict(TINY, epochs=1))
    assert torch.isfinite(torch.tensor(r.history[0]["loss"]))


runner = CliRunner()


def test_cli_bad_input_exit_code_2_one_line(tmp_path, tiny_data):
    cases = {
        "missing": (["--data", str(tmp_path / "missing")], "does not exist"),
        "file": (["--data", str(next(tiny_data.rglob("*.png")))], "is a file, not a folder"),
        "empty": (["--data", str(tmp_path)], "No image files found"),
        "backbone": (["--data", str(tiny_data), "--backbone", "mobilenet_v3_smal"], "Unknown backbone"),
        "choice": (["--data", str(tiny_data), "--bank-update", "sideways"],
                   "--bank-update must be one of grad, momentum"),
    }
    for name, (args, msg) in cases.items():
        res = runner.invoke(app, ["pretrain", *args, "--out", str(tmp_path / name)])
        assert res.exit_code == 2, (name, res.output)
        lines = [line for line in res.output.strip().splitlines() if line]
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], (name, res.output)
        assert "Traceback" not in res.output


@pytest.mark.slow
def test_cli_small_data_shrinks_batch_with_warning(tmp_path):
    data = tmp_path / "three"
    data.mkdir()
    for f in sorted(demo_images().rglob("*.png"))[:3]:
        shutil.copy(f, data / f.name)
    res = runner.invoke(app, ["pretrain", "--data", str(data), "--epochs", "1", "--image-size", "32",
                              "--out", str(tmp_path / "r"), "--head-hidden", "32"])
    assert res.exit_code == 0, res.output
    assert "only 3 images, fewer than --batch-size 128: the batch shrinks to 3." in " ".join(res.output.split())


@pytest.mark.slow
def test_cli_skipped_files_are_warned_and_listed(tmp_path, tiny_data):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "broken.jpg").write_bytes(b"")
    (data / "junk.png").write_text("no")
    res = runner.invoke(app, ["pretrain", "--data", str(data), "--epochs", "1", "--image-size", "32",
                              "--out", str(tmp_path / "r"), "--batch-size", "8", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "skipped 2 unreadable file(s)" in " ".join(res.output.split())
    listed = (tmp_path / "r" / "skipped_files.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0].rsplit("/", 1)[1] for line in listed) == ["broken.jpg", "junk.png"]


def test_demo_command_and_help():
    res = runner.invoke(app, ["pretrain", "--help"])
    assert res.exit_code == 0 and "Examples" in res.output
    flags = ["--backbone", "--data", "--out", "--recipe", "--config", "--epochs", "--batch-size", "--image-size",
             "--lr", "--seed", "--device", "--precision", "--method", "--bank-init", "--bank-update", "--bank-lr",
             "--sd-weight", "--temperature", "--negatives", "--cutmix", "--small-input", "--val",
             "--labels-from-folders", "--eval-every", "--resume", "--deterministic", "--quiet"]
    for flag in flags:
        assert flag in res.output, flag


@pytest.mark.slow
def test_demo_run_on_bundled_images(tmp_path):
    res = runner.invoke(app, ["pretrain", "--backbone", "mobilenetv3_small", "--epochs", "1", "--image-size", "32",
                              "--out", str(tmp_path / "demo"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert ("--batch-size 128 would cover 36% of the 360 images per step; the batch shrinks to 32"
            in " ".join(res.output.split()))
    row = json.loads((tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()[0])
    assert "knn_top1" in row  # the demo images carry category folders: the kNN monitor runs
    # as asked; the run used 32
    assert yaml.safe_load((tmp_path / "demo" / "config.yaml").read_text())["batch_size"] == 128


def test_bank_batch_cap():
    assert [bank_batch_cap(n) for n in (3, 24, 360, 1529, 5000)] == [8, 8, 32, 152, 496]
    assert bank_batch_cap(360, multiple=16) == 32 and bank_batch_cap(100, multiple=16) == 16


def test_recipes_load_and_flags_override():
    cfg = resolve({"epochs": 3}, recipe="resnet18_cifar")
    assert (cfg.backbone, cfg.image_size, cfg.small_input, cfg.epochs) == ("resnet18", 32, "on", 3)
    for name in ("mobilenetv3_small_64px", "mobilenetv3_small_224px"):
        assert resolve(recipe=name).image_size in (64, 224)
        # tau and eta from the folder, as without a recipe (they had pinned 0.1 / 1.0, undoing the rules)
        assert (resolve(recipe=name).temperature, resolve(recipe=name).bank_lr) == ("auto", "auto")


def test_a_resume_on_another_device_gives_the_optimiser_state_the_weights_layout():
    """CUDA runs train channels_last, CPU runs NCHW: a checkpoint resumed on the other device had kept its momentum
    in the old layout, and the fused step (which reads memory in flat order) added it to the wrong weights."""
    import copy

    from edgessl.train.optim import build_optimizer
    from edgessl.train.state import match_layouts

    torch.manual_seed(0)
    conv, x = torch.nn.Conv2d(3, 8, 3), torch.randn(2, 3, 8, 8)
    opt = build_optimizer("sgd", conv.parameters(), 0.1, 0.9, 0.0)
    for _ in range(2):  # the straight run: a step, the checkpoint, the next step
        conv(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if not hasattr(conv, "saved"):
            conv.saved = (copy.deepcopy(conv.state_dict()), copy.deepcopy(opt.state_dict()))
    other = torch.nn.Conv2d(3, 8, 3)
    other.load_state_dict(conv.saved[0])
    other = other.to(memory_format=torch.channels_last)  # the resumed run's layout
    resumed = build_optimizer("sgd", other.parameters(), 0.1, 0.9, 0.0)
    resumed.load_state_dict(conv.saved[1])
    match_layouts(resumed)
    assert resumed.state[other.weight]["momentum_buffer"].stride() == other.weight.stride()
    other(x).square().mean().backward()
    resumed.step()
    assert torch.allclose(other.weight, conv.weight, atol=1e-6)


def test_a_bf16_or_fp32_checkpoint_resumes_in_fp16_with_a_fresh_scaler():
    """A disabled scaler saves {}: resuming such a run where auto picks fp16 (an older GPU) or with --precision fp16
    had been "its checkpoint does not fit the model these options build"."""
    from edgessl.train.state import TrainState

    def state(fp16: bool) -> TrainState:
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return TrainState(model, None, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
                          torch.amp.GradScaler("cpu", enabled=fp16), batch=8)

    ckpt = state(False).checkpoint(8, {}, 1)
    assert ckpt["scaler"] == {}
    resumed = state(True)
    resumed.restore(ckpt, None, 8)
    assert resumed.scaler.is_enabled() and resumed.scaler.get_scale() == 65536.0  # a fresh scaler's start


def test_cuda_rng_states_of_more_gpus_than_this_machine_sees_restore_the_ones_it_has(monkeypatch):
    """A checkpoint of a 2-GPU machine resumed on one GPU (or with CUDA_VISIBLE_DEVICES=1) had been an IndexError in
    torch.cuda.set_rng_state_all; a CPU run on a GPU machine no longer initialises CUDA to save its state."""
    from edgessl.train import checkpoint

    state = checkpoint.rng_state()
    assert "cuda" not in state  # CUDA never initialised here
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s, device)))
    checkpoint.set_rng_state({**state, "cuda": [torch.zeros(4, dtype=torch.uint8), torch.ones(4, dtype=torch.uint8)]})
    assert len(restored) == 1 and restored[0][1] == 0 and restored[0][0].sum() == 0


def test_the_augmentation_reads_nothing_back_from_the_device(monkeypatch):
    """Hue jitter had inverted its colour matrix on the images' device in every step (on a GPU a host check of the
    result) and the blur had read its radius from the device: the inverse is computed once and the radius comes from
    the host's uniforms, with the same crops."""
    from edgessl.data import augment

    images = (torch.arange(4 * 3 * 16 * 16) % 251).to(torch.uint8).view(4, 3, 16, 16)
    cfg = augment.AugmentConfig(blur_p=0.5)
    before = augment.augment_batch(images, torch.arange(4), 0, 0, cfg, IMAGENET_MEAN, IMAGENET_STD)
    monkeypatch.setattr(torch.linalg, "inv", lambda *a, **k: (_ for _ in ()).throw(AssertionError("inv in a step")))
    assert torch.equal(augment.augment_batch(images, torch.arange(4), 0, 0, cfg, IMAGENET_MEAN, IMAGENET_STD), before)
    sigma = torch.tensor([0.5, 1.7, 0.2, 1.0])
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augment.gaussian_blur(x, sigma, 1.7), augment.gaussian_blur(x, sigma))
