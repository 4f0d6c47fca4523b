"""Greyscale folders (edgessl.data.greyscale): detection in closed cases (R = G = B, single-channel PNG, JPEG noise,
one colour image, a folder of one large image, icons), --greyscale auto | on | off with the reason printed,
colour-free augmentation that equals the default on grey images, and the manifest / device check told so."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import edgessl
from edgessl.data.augment import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, augment_batch
from edgessl.data.folder import ImageSet, load_image_folder
from edgessl.data.greyscale import (
    GREY_TOLERANCE,
    check_greyscale,
    choose_greyscale,
    colour_free,
    grey_rows,
    training_augment,
)
from edgessl.deploy.manifest import preprocess_spec
from edgessl.errors import UserError


def _set(rows: torch.Tensor) -> ImageSet:
    return ImageSet(Path("."), [Path(f"{i}.png") for i in range(len(rows))], rows.shape[-1], rows)


def _grey(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return g.expand(n, 3, size, size).contiguous()


def test_grey_rows_in_closed_cases():
    rows = _grey(3)
    noisy = rows.clone()
    noisy[1, 0, ::2] = (noisy[1, 0, ::2].int() + 1).clamp(max=255).to(torch.uint8)  # JPEG-sized noise on half
    coloured = rows.clone()
    coloured[2, 2] = 0  # no blue at all
    assert grey_rows(torch.stack([rows[0], noisy[1], coloured[2]])).tolist() == [True, True, False]
    spread = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    spread[0, 0] = round(2 * GREY_TOLERANCE)  # mean |R - G| + |G - B| = 2 x the tolerance
    assert not bool(grey_rows(spread)[0])


def test_check_greyscale_stops_at_the_first_colour_image_and_spreads_its_sample():
    rows = _grey(20)
    assert check_greyscale(_set(rows)).grey and check_greyscale(_set(rows)).checked == 20
    rows[7, 0] = 255 - rows[7, 0]  # image 7 has colour
    check = check_greyscale(_set(rows), chunk=4)
    assert not check.grey and check.colour == 7 and check.describe() == "colour (7.png has colour)"  # its file
    sampled = check_greyscale(_set(_grey(20)), limit=5)
    assert sampled.grey and sampled.checked == 5
    assert sampled.describe() == "greyscale (5 of 20 images, evenly spread: R = G = B)"


def test_folders_of_single_channel_pngs_and_grey_jpegs_are_greyscale_icons_are_not(tmp_path):
    rng = np.random.default_rng(0)
    scans, icons, one = tmp_path / "scans", tmp_path / "icons", tmp_path / "one"
    for d in (scans, icons, one):
        d.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(scans / f"{i}.png")
        grey = rng.integers(0, 256, (40, 40), dtype=np.uint8)
        Image.fromarray(np.stack([grey] * 3, -1)).save(scans / f"{i}.jpg", quality=70)
        Image.fromarray(rng.integers(0, 256, (40, 40, 4), dtype=np.uint8), "RGBA").save(icons / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (900, 1200), dtype=np.uint8), "L").save(one / "large.png")
    for folder, expected in ((scans, True), (icons, False), (one, True)):
        assert check_greyscale(load_image_folder(folder, 32, min_images=1)).grey is expected, folder.name


def test_choose_greyscale_says_why():
    grey, colour = _set(_grey(4)), _set(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))
    assert choose_greyscale("auto", grey).describe() == ("grey images: saturation, hue and random greyscale off "
                                                          "(auto: greyscale (all 4 images: R = G = B))")
    assert not choose_greyscale("auto", colour).on
    assert choose_greyscale("on", colour).on and choose_greyscale("on", colour).reason == "--greyscale on"
    assert choose_greyscale("off", grey).describe() == "colour augmentations kept (--greyscale off)"
    assert training_augment(0.3, choose_greyscale("on", grey)) == colour_free(AugmentConfig(blur_p=0.3))


def test_a_mixed_folder_says_it_trains_in_colour_and_how_many_are_grey():
    """16 grey scans and 10 colour photos had trained in colour without a Colour line."""
    rows = _grey(8)
    rows[5, 0] = 255 - rows[5, 0]  # image 5 has colour
    choice = choose_greyscale("auto", _set(rows))
    assert not choice.on and choice.mixed
    assert choice.describe() == ("colour augmentations kept (auto: colour (5.png has colour); 7 of the 8 images "
                                 "checked are grey: a mixed folder trains in colour (--greyscale on: no colour "
                                 "jitter, grey input on the device))")
    assert not choose_greyscale("auto", _set(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8))).mixed
    photos = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    photos[3] = _grey(1)[0]  # one grey photo among colour ones (CIFAR-10 has 3 %): a colour folder, not "mixed"
    assert not choose_greyscale("auto", _set(photos)).mixed
    photos[:2] = _grey(2)  # 3 of 8 grey (at least MIXED_SHARE): mixed
    assert choose_greyscale("auto", _set(photos)).mixed


def test_greyscale_on_over_colour_images_warns_that_training_keeps_their_colour():
    """--greyscale on had trained on colour crops and exported a grey-input model without a word."""
    from edgessl.data.greyscale import colour_under_on

    rows = _grey(8)
    assert colour_under_on("on", _set(rows)) is None and colour_under_on("auto", _set(rows)) is None
    rows[5, 0] = 255 - rows[5, 0]
    assert colour_under_on("on", _set(rows)) == (
        "--greyscale on: the folder has colour (colour (5.png has colour)); training keeps it (only the colour "
        "augmentations are off) while the export turns the device's input grey: convert the images to grey first "
        "for the two to match.")


def test_colour_free_augmentation_equals_the_default_on_grey_images():
    """On R = G = B images saturation, hue and random grayscale change nothing: the colour-free crops equal the
    default ones (same random stream, float rounding only), so turning them off costs no accuracy."""
    rows, index = _grey(16, 32), torch.arange(16)
    default = augment_batch(rows, index, 3, 0, AugmentConfig(), IMAGENET_MEAN, IMAGENET_STD)
    free = augment_batch(rows, index, 3, 0, colour_free(AugmentConfig()), IMAGENET_MEAN, IMAGENET_STD)
    assert torch.allclose(default, free, atol=1e-5)
    colour = torch.randint(0, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    assert not torch.allclose(augment_batch(colour, index, 3, 0, AugmentConfig(), IMAGENET_MEAN, IMAGENET_STD),
                              augment_batch(colour, index, 3, 0, colour_free(AugmentConfig()), IMAGENET_MEAN,
                                            IMAGENET_STD), atol=1e-3)


def test_the_manifest_and_the_device_check_turn_colour_input_grey(tmp_path):
    from edgessl.scripts import load_script

    check = load_script()
    meta = {"image_size": 16, "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert preprocess_spec(meta)["greyscale"] is False and preprocess_spec({**meta, "greyscale": True})["greyscale"]
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[..., 0] = 200  # pure red
    Image.fromarray(rgb).save(tmp_path / "red.png")
    as_colour = check.decode(tmp_path / "red.png", preprocess_spec(meta))
    as_grey = check.decode(tmp_path / "red.png", preprocess_spec({**meta, "greyscale": True}))
    assert as_colour[0, 0].tolist() == [200, 0, 0]
    assert as_grey[0, 0].tolist() == [60, 60, 60]  # PIL's luma: 200 x 299 / 1000 = 59.8


@pytest.mark.slow
def test_pretrain_on_a_greyscale_folder_prints_its_choice_and_records_it(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "scans"
    data.mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (40, 40), dtype=np.uint8), "L").save(data / f"{i}.png")
    run = edgessl.pretrain(data=str(data), out=str(tmp_path / "run"), epochs=1, image_size=32, batch_size=8,
                           head_hidden=32, feature_dim=16, workers=1, eval_every=0)
    out = " ".join(capsys.readouterr().out.split())
    assert ("Colour: grey images: saturation, hue and random greyscale off (auto: greyscale (all 24 images: R = G = "
            "B))") in out
    import json

    assert json.loads((run.run_dir / "encoder.json").read_text())["greyscale"] is True
    with pytest.raises(UserError, match="--greyscale must be one of auto, on, off, not 'maybe'."):
        edgessl.pretrain(data=str(data), out=str(tmp_path / "run2"), epochs=1, greyscale="maybe")
