"""Image folders: decoding rules, bad files, error messages (edgessl/data/folder.py) and the augmentation."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from edgessl.data import folder as folder_mod
from edgessl.data.augment import AugmentConfig, augment_batch, keyed_uniform
from edgessl.data.folder import decode_image, load_image_folder
from edgessl.data.signature import scan_images
from edgessl.errors import UserError
from edgessl.options import Decode


def save(img, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def solid(color, size=(40, 30), mode="RGB"):
    return Image.new(mode, size, color)


def test_alpha_is_composited_on_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (0, 0, 8, 4))  # opaque blue top half
    arr = decode_image(save(img, tmp_path / "a.png"), 8)
    assert arr.shape == (8, 8, 3) and arr.dtype == np.uint8
    assert tuple(arr[0, 0]) == (0, 0, 255)
    assert tuple(arr[7, 7]) == (255, 255, 255)


def test_palette_with_transparency_and_grayscale_and_cmyk(tmp_path):
    p = Image.new("P", (6, 6), 0)
    p.putpalette([10, 20, 30] + [200, 100, 50] * 255)
    p.info["transparency"] = 0
    assert tuple(decode_image(save(p, tmp_path / "p.png"), 6)[2, 2]) == (255, 255, 255)
    assert tuple(decode_image(save(solid(77, mode="L"), tmp_path / "g.png"), 6)[0, 0]) == (77, 77, 77)
    cmyk = decode_image(save(solid((0, 0, 0, 0), mode="CMYK"), tmp_path / "c.jpg"), 6)
    assert cmyk.min() >= 250  # CMYK (0,0,0,0) is white


def test_16_bit_is_scaled_not_clipped(tmp_path):
    arr16 = np.full((6, 6), 32896, dtype=np.uint16)  # half of 65535
    img = Image.fromarray(arr16)
    out = decode_image(save(img, tmp_path / "h.png"), 6)
    assert abs(int(out[0, 0, 0]) - 128) <= 1


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "e.jpg"
    img.save(path, exif=exif, quality=95)
    out = decode_image(path, 20)  # displayed image is 20 wide x 40 high; center crop keeps the middle
    full = np.asarray(Image.open(path).transpose(Image.Transpose.ROTATE_270))
    assert full.shape[:2] == (40, 20)
    assert out[0, 10].mean() > 200 and out[19, 10].mean() < 60  # white on top after rotation


def test_resize_shorter_side_and_center_crop(tmp_path):
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 255, 0), (20, 0, 40, 20))  # green middle third
    out = decode_image(save(img, tmp_path / "w.png"), 10)
    assert out.shape == (10, 10, 3)
    assert out[:, 2:8, 1].min() > 200  # the crop is the green middle


def make_folder(root, n=6, classes=("cat", "dog")):
    for i in range(n):
        save(solid((i * 30 % 255, 50, 90)), root / classes[i % len(classes)] / f"{i}.png")
    return root


def make_bad_files(root):
    (root / "bad").mkdir(parents=True, exist_ok=True)
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "text.png").write_text("this is not an image")
    good = root / "bad" / "whole.jpg"
    solid((1, 2, 3), (64, 64)).save(good, quality=90)
    data = good.read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    good.unlink()
    save(solid((5, 5, 5), (50, 50)), root / "bad" / "huge.png")
    save(solid((5, 5, 5), (10, 10)), root / "bad" / "locked.png")
    (root / "notes.txt").write_text("ignored: not an image extension")


def test_bad_files_are_skipped_with_reasons(tmp_path, monkeypatch):
    make_folder(tmp_path)
    make_bad_files(tmp_path)
    monkeypatch.setattr(folder_mod, "MAX_PIXELS", 2000)  # 50x50 = 2500 pixels is a "bomb" here
    locked = tmp_path / "bad" / "locked.png"
    if os.geteuid() == 0:  # root reads anything: simulate the permission error the OS would raise
        real_open = Image.open

        def guarded(path, *a, **k):
            if str(path) == str(locked):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *a, **k)

        monkeypatch.setattr(folder_mod.Image, "open", guarded)
    else:
        locked.chmod(0)
    data = load_image_folder(tmp_path, 16)
    reasons = {p.name: why for p, why in data.skipped}
    assert len(data) == 6 and data.images.shape == (6, 3, 16, 16)
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["text.png"].startswith("unreadable")
    assert reasons["truncated.jpg"].startswith("unreadable")
    assert reasons["huge.png"].startswith("decompression bomb")
    assert reasons["locked.png"] == "permission denied"
    assert "notes.txt" not in reasons


def test_missing_file_and_empty_folders_raise_one_line_errors(tmp_path):
    with pytest.raises(UserError, match=r"^--data '.*nope' does not exist\. Pass a folder of images\.$"):
        load_image_folder(tmp_path / "nope", 16)
    f = save(solid(0), tmp_path / "x.png")
    with pytest.raises(UserError, match="is a file, not a folder"):
        load_image_folder(f, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="No image files found"):
        load_image_folder(tmp_path / "empty", 16)
    save(solid(0), tmp_path / "one" / "a.png")
    (tmp_path / "one" / "b.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"has 1 readable image \(1 unreadable files skipped\); at least 2"):
        load_image_folder(tmp_path / "one", 16)
    with pytest.raises(UserError) as e:
        load_image_folder(tmp_path / "one", 16)
    assert str(e.value).startswith(f"--data '{tmp_path / 'one'}' has 1 readable image (1 unreadable files skipped); "
                                   "at least 2 are needed. Skipped: b.png (")  # its reason, as decoding gave it


def test_labels_from_first_level_subfolders(tmp_path):
    make_folder(tmp_path, n=5, classes=("b", "a"))
    data = load_image_folder(tmp_path, 8, labels=True)
    assert data.classes == ["a", "b"]
    assert [data.classes[i] for i in data.labels] == [p.parent.name for p in data.paths]
    save(solid(0), tmp_path / "loose.png")
    with pytest.raises(UserError, match="lies directly in it"):
        load_image_folder(tmp_path, 8, labels=True)


def test_streaming_matches_cache(tmp_path):
    make_folder(tmp_path, n=5)
    cached = load_image_folder(tmp_path, 12, decode=Decode(cache_dir="none"))
    # no disk cache, over the bound
    streamed = load_image_folder(tmp_path, 12, decode=Decode(cache_dir="none", cache_mb=1e-6))
    assert streamed.streaming and not cached.streaming
    idx = torch.tensor([4, 0, 2])
    assert torch.equal(cached.get(idx), streamed.get(idx))


def test_scan_is_sorted_recursive_and_skips_hidden(tmp_path):
    save(solid(0), tmp_path / "z" / "deep" / "1.png")
    save(solid(0), tmp_path / "a.png")
    save(solid(0), tmp_path / ".hidden" / "2.png")
    assert [p.relative_to(tmp_path).as_posix() for p in scan_images(tmp_path)] == ["a.png", "z/deep/1.png"]


def test_linked_folders_count_once_and_a_broken_link_is_skipped_with_its_reason(tmp_path):
    """A link back up the tree (a loop) had repeated every image about 40 times, until the system refused the path;
    a second link to a folder already seen, the same. Each real folder is scanned once, by pretraining and by the
    device-side tools alike; a link to a file that is gone is listed as skipped, not a traceback."""
    from edgessl.scripts import load_script

    root = tmp_path / "d"
    save(solid(10), root / "a.png")
    save(solid(20), root / "sub" / "b.png")
    (root / "loop").symlink_to(root, target_is_directory=True)
    (root / "sub2").symlink_to(root / "sub", target_is_directory=True)
    (root / "gone.png").symlink_to(tmp_path / "nowhere.png")
    names = [p.relative_to(root).as_posix() for p in scan_images(root)]
    assert names == ["a.png", "gone.png", "sub/b.png"]
    assert [p.relative_to(root).as_posix() for p in load_script("device_check.py").scan(root)] == names
    data = load_image_folder(root, 8, decode=Decode(cache_dir="none"))
    assert [p.name for p in data.paths] == ["a.png", "b.png"]
    assert [(p.name, why) for p, why in data.skipped] == [("gone.png", "broken link")]
    pre = {"image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3}
    assert load_script("embed_onnx.py").try_decode(root / "gone.png", pre) == (None, "broken link")


def test_augmentation_depends_only_on_seed_epoch_index():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    cfg = AugmentConfig(blur_p=0.5)
    idx = torch.tensor([10, 11, 12, 13, 14, 15])
    full = augment_batch(imgs, idx, epoch=3, seed=7, cfg=cfg, mean=(0.5,) * 3, std=(0.25,) * 3)
    part = augment_batch(imgs[[4, 1]], idx[[4, 1]], epoch=3, seed=7, cfg=cfg, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert torch.allclose(full[[4, 1]], part, atol=1e-6)  # same crop whatever the batch
    other = augment_batch(imgs, idx, epoch=4, seed=7, cfg=cfg, mean=(0.5,) * 3, std=(0.25,) * 3)
    assert not torch.allclose(full, other)
    assert full.shape == (6, 3, 16, 16) and torch.isfinite(full).all()


def test_keyed_uniform_range_and_independence():
    u = keyed_uniform(0, 0, np.arange(20000), 4)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.03
    assert np.array_equal(keyed_uniform(0, 0, [5], 4)[0], u[5])


def test_identity_augmentation_is_the_test_transform():
    imgs = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    cfg = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, jitter_p=0.0, grayscale_p=0.0)
    out = augment_batch(imgs, torch.tensor([0, 1]), 0, 0, cfg, (0.0,) * 3, (1.0,) * 3)
    assert torch.allclose(out, imgs.float() / 255, atol=1e-5)


def test_a_folder_without_class_subfolders_names_the_option_that_wants_labels(tmp_path):
    from edgessl.data.folder import folder_labels

    paths = [tmp_path / "a.png"]
    with pytest.raises(UserError, match=r"Move images into class folders, or drop --labels-from-folders\.$"):
        folder_labels(tmp_path, paths)
    with pytest.raises(UserError, match=r"^Labels need one subfolder per class under '.*', but 'a\.png' lies directly "
                                        r"in it\. Move images into class folders, or pass another --val: it takes a "
                                        r"labelled folder\.$"):
        folder_labels(tmp_path, paths, "--val")  # --val was given, not --labels-from-folders


def test_a_plot_title_in_a_script_the_font_lacks_draws_without_a_warning_per_glyph(tmp_path):
    import warnings

    from edgessl.report.plots import plot_curves

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        plot_curves([{"epoch": 1, "loss": 1.0}], tmp_path / "c.png", title="类别 ✈ 😀")
    assert (tmp_path / "c.png").stat().st_size > 0
