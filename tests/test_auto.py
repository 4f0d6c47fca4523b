"""--image-size auto and --epochs auto (edgessl.data.auto): the rules on synthetic folders in closed cases, the banner's
reasons, the resolved numbers in config.yaml and encoder.json, and explicit flags and recipes that override them."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import edgessl
from edgessl.config import resolve as resolve_config
from edgessl.data.auto import (
    EPOCH_BOUNDS,
    IMAGES_SEEN,
    PHOTO_SIZE,
    choose_epochs,
    choose_image_size,
    header_sizes,
)
from edgessl.errors import UserError


def folder(root: Path, sizes: list[tuple[int, int]], mode: str = "RGB", ext: str = "png") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        shape = (h, w) if mode == "L" else (h, w, 3)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / f"{i:03d}.{ext}")
    return root


def test_icons_keep_their_size_and_are_never_upscaled():
    assert choose_image_size([(64, 64)] * 10).value == 64
    assert choose_image_size([(32, 32)] * 10).value == 32
    assert choose_image_size([(72, 72)] * 10).value == 64  # rounded down, not up
    assert choose_image_size([(20, 20)] * 3).value == 32  # smaller than the ladder: its smallest size
    assert choose_image_size([(64, 64)] * 10).reason == (
        "auto: shorter side 64 px over 10 images; trained at their own size, never upscaled")


def test_the_reason_says_when_images_are_upscaled():
    """A folder of 16 px images had read "trained at ... 32 px, never upscaled"."""
    assert choose_image_size([(16, 16)] * 12).reason == (
        "auto: shorter side 16 px over 12 images; trained at 32 px, the smallest size; 12 of the 12 are "
        "smaller and upscaled to it")
    mixed = choose_image_size([(32, 32)] * 10 + [(416, 416)] * 16)  # CIFAR photos among NEU-DET scans
    assert mixed.value == 128 and mixed.reason.endswith("; 10 of the 26 are smaller and upscaled to it")
    some = choose_image_size([(48, 48)] * 2 + [(64, 64)] * 5)
    assert some.reason == ("auto: shorter side 64 px median (48-64 px) over 7 images; trained at their own size; 2 of "
                           "the 7 are smaller and upscaled to it")


def test_photos_are_capped_at_one_size_on_every_device():
    photo = choose_image_size([(640, 480)] * 5)
    assert photo.value == PHOTO_SIZE == 128
    assert photo.reason == ("auto: shorter side 480 px over 5 images; capped at 128 px (NEU-DET, 31 epochs: linear@10 "
                            "+0.05 over 96 px at 1.8x the time per epoch and per image on the device; --image-size 96 "
                            "for shorter epochs and a faster encoder, larger: --image-size N)")
    assert choose_image_size([(4000, 3000)]).value == 128  # a folder of one large image
    assert choose_image_size([(150, 200)] * 3).value == 128  # between two rungs: rounded down, not up
    assert choose_image_size([(100, 120)] * 3).value == 96


def test_mixed_sizes_follow_the_median_shorter_side():
    sizes = [(32, 32)] * 3 + [(90, 120)] * 4 + [(500, 300)] * 2  # shorter sides 32 x3, 90 x4, 300 x2: median 90
    choice = choose_image_size(sizes)
    assert choice.value == 64
    assert "90 px median (32-300 px) over 9 images" in choice.reason
    assert "rounded down to 64 px" in choice.reason
    assert choose_image_size([]).value == 64


def test_epochs_are_an_image_budget_within_bounds():
    lo, hi = EPOCH_BOUNDS
    assert choose_epochs(IMAGES_SEEN // 40).value == 40
    assert choose_epochs(1440).value == round(IMAGES_SEEN / 1440)
    assert choose_epochs(10).value == hi and "(the most)" in choose_epochs(10).reason
    assert choose_epochs(10**7).value == lo and "(the fewest)" in choose_epochs(10**7).reason
    assert choose_epochs(1500).reason == (f"auto: about {IMAGES_SEEN:,} image views for 1,500 images; on NEU-DET and "
                                          "emoji twice as long changed linear@10 by at most 0.02")
    # a bound: the views it really gives (3 images had read "about 45,000 image views for 3 images")
    assert choose_epochs(3).reason.startswith("auto: 3 images x 100 epochs (the most) = 300 image views, short of the "
                                              "budget of about 45,000; on NEU-DET")
    assert choose_epochs(50_000).reason.startswith("auto: 50,000 images x 15 epochs (the fewest) = 750,000 image "
                                                   "views, past the budget of about 45,000;")


def test_header_sizes_read_an_even_spread_and_skip_what_pillow_cannot_open(tmp_path):
    root = folder(tmp_path / "f", [(40 + i, 30) for i in range(10)])
    (root / "999.png").write_bytes(b"not an image")
    paths = sorted(root.iterdir())
    assert header_sizes(paths, limit=4) == [(40, 30), (43, 30), (47, 30)]  # files 0, 3, 7; 10 is the broken one
    assert len(header_sizes(paths)) == 10


def test_header_sizes_keep_pillows_decompression_bomb_warning_to_themselves(tmp_path):
    """A 90-megapixel image's header had printed Pillow's raw DecompressionBombWarning before edgessl's own line."""
    import warnings

    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("1", (10_000, 9_000)).save(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that got out would be an exception, and the header left out
        assert header_sizes([big]) == [(10_000, 9_000)]


def test_auto_and_numbers_parse_and_anything_else_is_one_line():
    assert resolve_config({"image_size": "96", "epochs": "auto"}).image_size == 96
    assert resolve_config({}).epochs == "auto" and resolve_config({}).image_size == "auto"
    with pytest.raises(UserError, match=r"^--epochs must be a whole number or auto, not 'lots'\.$"):
        resolve_config({"epochs": "lots"})
    with pytest.raises(UserError, match=r"^--image-size must be positive, not 0\.$"):
        resolve_config({"image_size": 0})
    recipe = resolve_config({}, recipe="mobilenetv3_small_64px")
    assert isinstance(recipe.image_size, int) and isinstance(recipe.epochs, int)  # recipes keep their numbers


def test_out_of_range_values_are_one_line_errors(tmp_path, monkeypatch):
    """Values that trained on silently (a blur probability of 2, a negative alpha, a head of 0 units) or failed deep
    inside (a 240 GB allocation for --image-size 100000, a UnicodeDecodeError for a config that is not text)."""
    from edgessl import config

    cases = {"blur": (2, "--blur is a probability between 0 and 1, not 2."),
             "sd_alpha": (-1, "--sd-alpha must be zero (a uniform target) or positive, not -1."),
             "head_hidden": (0, "--head-hidden must be positive, not 0.")}
    for name, (value, message) in cases.items():
        with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
            resolve_config({name: value})
    monkeypatch.setattr(config, "physical_memory", lambda: 24 * 2**30)
    assert resolve_config({"image_size": 1024}).image_size == 1024  # 128 crops: 1.5 GiB
    with pytest.raises(UserError, match=r"^--image-size 100000: one batch of 128 crops at 100000 px takes "
                                        r"14,305 GiB and this machine has 24 GiB of RAM\. Pass a smaller"):
        resolve_config({"image_size": 100000})
    monkeypatch.setattr(config, "physical_memory", lambda: None)  # not known: not checked
    assert resolve_config({"image_size": 100000}).image_size == 100000
    binary = tmp_path / "photo.png"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=f"^Config '{re.escape(str(binary))}' is not a text \\(YAML\\) file\\.$"):
        resolve_config({}, config=str(binary))


def test_a_config_file_setting_of_the_wrong_type_is_one_line(tmp_path):
    """The CLI's flags are typed by typer; a config file's or the API's were not: `lr: fast` was a TypeError deep in
    validation, `deterministic: "false"` (a truthy string) was kept, `batch_size: 1.5` was a divisibility error."""
    cases = {'lr: fast': "--lr must be a number, not 'fast'.",
             'feature_dim: big': "--feature-dim must be a whole number, not 'big'.",
             'batch_size: 1.5': "--batch-size must be a whole number, not 1.5.",
             'deterministic: "false"': "--deterministic must be true or false, not 'false'.",
             'quiet: maybe': "--quiet must be true or false, not 'maybe'.",
             'sd_weight: true': "--sd-weight must be a number, not True."}
    for i, (line, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(line + "\n")
        with pytest.raises(UserError, match="^" + re.escape(f"Config '{path}': {message}") + "$"):  # the file named
            resolve_config({}, config=str(path))
    with pytest.raises(UserError, match="^" + re.escape(f"Recipe '{path}': --sd-weight must be a number")):
        resolve_config({}, recipe=str(path))
    assert resolve_config({"sd_weight": 2.0}, recipe=str(path)).sd_weight == 2.0  # a flag over the file's value
    with pytest.raises(UserError, match="^" + re.escape("Unknown options: bacth_size (did you mean batch_size?).")):
        resolve_config({"bacth_size": 8})
    path.write_text("lr: 1\nteacher_image_size: null\ndeterministic: true\n")  # a whole number is a number
    cfg = resolve_config({}, config=str(path))
    assert cfg.lr == 1 and cfg.deterministic is True and cfg.teacher_image_size is None


def test_width_options_without_widths_are_one_line():
    """--slow-start 0.3 without --widths had run as if it were a setting."""
    with pytest.raises(UserError, match=r"^--slow-start needs --widths \(e.g. --widths 1.0,0.5\).$"):
        resolve_config({"slow_start": 0.3})
    with pytest.raises(UserError, match=r"^--width-distill needs --widths"):
        resolve_config({"width_distill": 0.9})
    assert resolve_config({"slow_start": 0.3, "widths": "1.0,0.5"}).slow_start == 0.3


def test_a_key_given_twice_in_a_config_file_is_one_line(tmp_path):
    """safe_load kept the last of two `epochs:` lines without a word."""
    path = tmp_path / "dup.yaml"
    path.write_text("epochs: 1\nlr: 0.1\nepochs: 2\n")
    with pytest.raises(UserError) as e:
        resolve_config({}, config=str(path))
    assert str(e.value) == f"Config '{path}' is not valid YAML: the key 'epochs' is given twice (line 3)"
    with pytest.raises(UserError, match=r"^--epochs must be .*"):
        resolve_config({"epochs": "many"})


def test_config_files_read_1e3_as_a_number_and_say_what_is_wrong_with_a_name(tmp_path):
    """A sweep of new-user mistakes: `lr: 1e-3` had been "not a number" (YAML 1.1 reads it as text), `1: 2` an
    AttributeError traceback, `batchsize: 8` got no suggestion, and a run directory as --config "not found"."""
    from edgessl.config import load_recipe, read_yaml

    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-3\nweight_decay: 5E-4\nblur: .5e-1\nepochs: 2\n")
    assert resolve_config({}, config=str(path)).lr == 0.001
    assert read_yaml(path, "Recipe") == {"lr": 0.001, "weight_decay": 0.0005, "blur": 0.05, "epochs": 2}
    for text, name in (("1: 2\n", "1"), ("true: 1\n", "True")):
        path.write_text(text)
        with pytest.raises(UserError) as e:
            read_yaml(path, "Recipe")
        assert str(e.value) == (f"Recipe '{path}' has an option name that is not text: {name} (option: value lines, "
                                "e.g. epochs: 30).")
    path.write_text("batchsize: 8\nEpochs: 1\nzzz: 1\n")
    with pytest.raises(UserError) as e:
        read_yaml(path, "Recipe")
    assert str(e.value) == (f"Recipe '{path}' has unknown options: Epochs (did you mean epochs?), batchsize (did you "
                            "mean batch_size?), zzz.")
    (tmp_path / "config.yaml").write_text("epochs: 1\n")
    with pytest.raises(UserError) as e:
        read_yaml(tmp_path, "Config")
    assert str(e.value) == f"Config '{tmp_path}' is a folder: did you mean {tmp_path / 'config.yaml'}?"
    with pytest.raises(UserError) as e:
        load_recipe(str(tmp_path / "r.yaml").removesuffix("r.yaml"))
    assert str(e.value).endswith("is a folder: did you mean " + str(tmp_path / "config.yaml") + "?")


def test_pretrain_on_photos_says_what_it_chose_and_records_the_numbers(tmp_path, capsys, monkeypatch):
    from edgessl.data import auto

    data = folder(tmp_path / "photos", [(300, 200)] * 12, mode="L", ext="jpg")
    monkeypatch.setattr(auto, "EPOCH_BOUNDS", (1, 1))  # one epoch: the rule's bound, not its budget, is shortened
    run = edgessl.pretrain(data=str(data), out=str(tmp_path / "run"), batch_size=8, eval_every=0)
    out = " ".join(capsys.readouterr().out.split())
    assert "Image size: 128 px (auto: shorter side 200 px over 12 images; capped at 128 px (NEU-DET, 31 epochs: " \
           "linear@10 +0.05 over 96 px" in out
    assert "Epochs: 1 (auto: 12 images x 1 epochs (the most) = 12 image views, short of the budget of about 45,000; " \
           "on NEU-DET" in out
    assert "12 images at 128px" in out
    cfg = yaml.safe_load((run.run_dir / "config.yaml").read_text())
    assert (cfg["image_size"], cfg["epochs"]) == (128, 1)
    meta = json.loads((run.run_dir / "encoder.json").read_text())
    assert meta["image_size"] == 128 and meta["auto"]["epochs"].startswith("1 (auto: ")


def test_explicit_flags_override_and_print_no_auto_line(tmp_path, capsys):
    data = folder(tmp_path / "photos", [(160, 120)] * 12)
    run = edgessl.pretrain(data=str(data), out=str(tmp_path / "run"), batch_size=8, eval_every=0, epochs=1,
                           image_size=32, temperature=0.1, bank_lr=1.0)
    out = capsys.readouterr().out
    assert "Image size:" not in out and "Epochs:" not in out and "Temperature:" not in out and "Bank step" not in out
    assert "12 images at 32px" in out
    assert "auto" not in json.loads((run.run_dir / "encoder.json").read_text())


def test_auto_epochs_count_the_images_that_train_not_the_unreadable_files(tmp_path, capsys, monkeypatch):
    """1,800 unreadable files among 2,000 had set the budget for 2,000 images: 22 epochs for 200 that trained."""
    from edgessl.data import auto

    data = folder(tmp_path / "f", [(32, 32)] * 12)
    for i in range(6):
        (data / f"junk{i}.png").write_bytes(b"not an image")
    monkeypatch.setattr(auto, "IMAGES_SEEN", 36)  # 36 views: 2 epochs of 18 files, 3 of the 12 that decode
    monkeypatch.setattr(auto, "EPOCH_BOUNDS", (1, 100))
    run = edgessl.pretrain(data=str(data), out=str(tmp_path / "run"), batch_size=8, eval_every=0, threads="1")
    out = " ".join(capsys.readouterr().out.split())
    assert "Epochs: 3 (auto: about 36 image views for 12 images; on NEU-DET and emoji twice as long changed " \
           "linear@10 by at most 0.02; the 6 unreadable files are not counted)" in out
    assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["epochs"] == 3 and len(run.history) == 3


def test_panoramas_are_told_the_centre_crop_keeps_little_of_them():
    """40 images of 4000 x 300 had trained on a 300 x 300 strip of each (7.5 %) without a word."""
    reason = choose_image_size([(4000, 300)] * 30 + [(400, 300)] * 10).reason
    assert reason.endswith("; 30 of the 40 are longer than 3:1, and the square centre crop keeps a third or less of "
                           "each: crop or pad them to squares first")
    assert "longer than" not in choose_image_size([(400, 300), (300, 899)] * 5).reason  # under 3:1: nothing said
