"""A pair compared at its coarser image's resolution (edgessl.evaluate.resolution) and the stored sizes it reads
(edgessl.data.folder.shorter_sides)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from edgessl.data import folder
from edgessl.data.folder import LARGE_SIDE, shorter_sides
from edgessl.evaluate import copies as cp
from edgessl.evaluate.resolution import FINE, SHRUNK, match_resolution


def _rows(*pictures: np.ndarray) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pictures])


def _texture(seed: int, size: int = 32) -> np.ndarray:
    """Fine detail up to a 32 px picture's limit (20 x 20 random colours enlarged), as in a CIFAR-10 image."""
    rng = np.random.default_rng(seed)
    return np.asarray(Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC))


def _shrunk(picture: np.ndarray, side: int) -> np.ndarray:
    """A copy stored at side x side pixels, as the decoder enlarges it back (bicubic)."""
    size = picture.shape[0]
    small = Image.fromarray(picture).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))


def test_pairs_of_one_resolution_or_of_large_files_are_left_as_they_are():
    rows = _rows(*(_texture(s) for s in range(4)))
    pairs = torch.tensor([[0, 1], [2, 3], [0, 3]])
    for sides in ([32, 32, 32, 32], [FINE, 400, 64, 1000], [int(SHRUNK * 32) + 1, 32, 32, 32]):  # 28 of 32: close
        out, matched, which = match_resolution(rows, pairs, torch.tensor(sides))
        assert out is rows and matched.shape == (0, 2) and which.tolist() == [], sides
    out, matched, which = match_resolution(rows, pairs, torch.tensor([26, 32, 32, 32]))  # 26 < FINE, < SHRUNK x 32
    assert len(out) == 6 and matched.tolist() == [[0, 4], [0, 5]] and which.tolist() == [0, 2]


def test_the_sharper_image_of_a_pair_is_resampled_through_the_coarser_ones_size():
    """Each pair that needs it gets its own new row (an image may pair with copies of several sizes); the coarser
    image and the input rows stay as they were; the new row is the definition: down to the coarser side and back,
    bicubic, antialiased on the way down."""
    rows = _rows(_texture(0), _shrunk(_texture(0), 16), _shrunk(_texture(0), 20), _texture(1))
    before = rows.clone()
    pairs = torch.tensor([[0, 1], [2, 0], [0, 3], [1, 2]])
    out, matched, which = match_resolution(rows, pairs, torch.tensor([32, 16, 20, 32]))
    assert torch.equal(out[:4], before) and torch.equal(rows, before)
    assert matched.tolist() == [[4, 1], [2, 5], [1, 6]] and which.tolist() == [0, 1, 3]
    for row, (source, side) in zip(out[4:], [(0, 16), (0, 20), (2, 16)], strict=True):
        x = F.interpolate(rows[source : source + 1].float(), size=(side, side), mode="bicubic", antialias=True)
        want = F.interpolate(x, size=(32, 32), mode="bicubic").round().clamp(0, 255).to(torch.uint8)[0]
        assert torch.equal(row, want)


def test_a_flat_picture_stays_flat_through_the_resampling():
    rows = _rows(np.full((32, 32, 3), 77, np.uint8), np.full((32, 32, 3), 77, np.uint8))
    out, _, _ = match_resolution(rows, torch.tensor([[0, 1]]), torch.tensor([32, 16]))
    assert out[2].unique().tolist() == [77]


def test_a_copy_shrunk_to_half_scores_as_a_copy_when_compared_at_its_resolution():
    """A 32 px picture with detail up to its limit and its copy stored at 16 px: compared as decoded, the copy lacks
    the detail and scores 0.85 or less; with the sides, the better of that and the score at the copy's resolution:
    0.95 or more, in either order; another picture stored at 16 px scores below 0 (MATCH_FLOOR) and is not scored
    again, and a pair of one size scores as without the sides."""
    sides = torch.tensor([32, 16, 16, 32])
    for seed in range(4):
        rows = _rows(_texture(seed), _shrunk(_texture(seed), 16), _shrunk(_texture(seed + 100), 16),
                     _texture(seed + 200))
        pairs = np.array([[0, 1], [1, 0], [0, 2], [0, 3]])
        plain = cp.copy_scores(rows.__getitem__, pairs)
        asked: set[int] = set()
        matched = cp.copy_scores(rows.__getitem__, pairs, sides_a=lambda i, asked=asked: (
            asked.update(torch.as_tensor(i).tolist()), sides[torch.as_tensor(i)])[1])
        assert 2 not in asked  # only in a pair below MATCH_FLOOR: its file's size is never read
        assert plain[:2].max() <= 0.85 and matched[:2].min() >= 0.95 and matched[2] < 0, (seed, plain, matched)
        assert matched[3] == plain[3] and matched[2] == plain[2]  # one size; below MATCH_FLOOR: not scored again


def test_two_sets_need_the_sides_of_both_or_of_neither():
    rows = _rows(_texture(0), _texture(1))
    with pytest.raises(ValueError, match="sides of both or of neither"):
        cp.copy_scores(rows.__getitem__, np.array([[0, 1]]), rows.__getitem__, sides_a=lambda i: torch.tensor([32]))


def test_shorter_sides_reads_each_header_once(tmp_path, monkeypatch):
    paths = [tmp_path / "wide.png", tmp_path / "tall.jpg", tmp_path / "broken.png"]
    Image.new("RGB", (40, 20)).save(paths[0])
    Image.new("RGB", (30, 90)).save(paths[1])
    paths[2].write_bytes(b"not an image")
    opened = []
    real_open = folder.Image.open
    monkeypatch.setattr(folder.Image, "open", lambda p, *a, **k: (opened.append(p), real_open(p, *a, **k))[1])
    sides = shorter_sides(paths)
    assert sides(torch.tensor([1, 0])).tolist() == [30, 20]
    assert sides(np.array([0, 1, 2, 0])).tolist() == [20, 30, LARGE_SIDE, 20]
    assert [p.name for p in opened] == ["tall.jpg", "wide.png", "broken.png"]
