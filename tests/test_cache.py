"""The decoded-image cache (edgessl.data.cache) and the prefetching loader (edgessl.data.loader): decode once, reuse,
invalidate, rebuild, atomic builds, and the same training from RAM, memory map and no cache."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import edgessl
import edgessl.data.folder as folder_mod
from edgessl.cli import app
from edgessl.data.budget import size_text
from edgessl.data.cache import cache_folder, clear_entries, entry_name, list_entries
from edgessl.data.folder import load_image_folder
from edgessl.data.loader import Prefetcher
from edgessl.errors import UserError
from edgessl.models.backbone import load_encoder
from edgessl.options import Decode


@pytest.fixture
def folder(tiny_data, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(tiny_data, root)
    return root


@pytest.fixture
def store(tmp_path):
    return tmp_path / "cache"


@pytest.fixture
def decodes(monkeypatch):
    """The files decoded from now on (edgessl.data.folder._try_decode calls)."""
    seen = []
    original = folder_mod._try_decode

    def counting(path, size):
        seen.append(Path(path).name)
        return original(path, size)

    monkeypatch.setattr(folder_mod, "_try_decode", counting)
    return seen


def _load(root, store, cache_mb=4096.0, **kw):
    return load_image_folder(root, 32, decode=Decode(cache_dir=store, workers=1, cache_mb=cache_mb), **kw)


def test_a_second_load_decodes_nothing_and_returns_the_same_rows(folder, store, decodes):
    first = _load(folder, store)
    assert len(decodes) == 24
    second = _load(folder, store)
    assert len(decodes) == 24  # nothing decoded again
    assert torch.equal(first.images, second.images) and first.paths == second.paths
    # the same pixels as decoding without a cache
    assert torch.equal(load_image_folder(folder, 32, decode=Decode(cache_dir="none")).images, first.images)
    index = json.loads(next((store / "images").glob("*.json")).read_text())
    assert index["size"] == 32 and len(index["files"]) == 24 and index["version"] == 1 and "policy" in index
    assert {"root", "signature", "data", "skipped"} <= set(index)


def test_a_link_to_the_folder_shares_its_entry(folder, store, decodes, tmp_path):
    first = _load(folder, store)
    link = tmp_path / "linked"
    link.symlink_to(folder, target_is_directory=True)
    decodes.clear()
    again = _load(link, store)
    assert decodes == []  # the folder's rows, not a second entry
    assert torch.equal(first.images, again.images) and len(list((store / "images").glob("*.u8"))) == 1
    assert again.paths[0] == link / first.paths[0].relative_to(folder)  # named as the user listed them
    clear_entries(store / "images", link)  # `cache clear --root` through the link finds the folder's entry
    assert list_entries(store / "images") == [] and not list((store / "images").glob("*.u8"))


def test_added_removed_and_changed_files_update_the_cache_decoding_only_those(folder, store, decodes):
    _load(folder, store)
    first_class = sorted(p for p in folder.iterdir())[0]
    files = sorted(first_class.glob("*.png"))
    shutil.copy(files[0], first_class / "zz_added.png")
    files[1].unlink()
    Image.new("RGB", (40, 40), (255, 0, 0)).save(files[2])  # changed content (and size)
    decodes.clear()
    got = _load(folder, store)
    assert sorted(decodes) == sorted(["zz_added.png", files[2].name])  # the unchanged 22 rows were reused
    assert len(got) == 24 and files[1] not in got.paths
    red = got.images[got.paths.index(files[2])]
    assert torch.equal(red, torch.tensor([255, 0, 0], dtype=torch.uint8).view(3, 1, 1).expand(3, 32, 32))
    assert torch.equal(got.images, load_image_folder(folder, 32, decode=Decode(cache_dir="none")).images)
    assert len(list((store / "images").glob("*.u8"))) == 1  # the old data file is gone


def test_a_truncated_cache_file_is_reported_and_rebuilt(folder, store, decodes):
    want = _load(folder, store).images.clone()
    data = next((store / "images").glob("*.u8"))
    whole = data.stat().st_size
    with open(data, "r+b") as fh:
        fh.truncate(whole // 2)
    warnings = []
    got = _load(folder, store, warn=warnings.append)
    assert warnings == [f"the image cache file {data}: data file damaged ({whole // 2:,} of {whole:,} bytes); "
                        "rebuilding it."]
    assert len(decodes) == 48 and torch.equal(got.images, want)
    (store / "images" / f"{entry_name(folder, 32)}.json").write_text("{not json")
    warnings.clear()
    assert torch.equal(_load(folder, store, warn=warnings.append).images, want)
    assert len(warnings) == 1 and "unreadable" in warnings[0]


def test_skipped_files_are_remembered_with_their_reasons(folder, store, decodes):
    (folder / sorted(os.listdir(folder))[0] / "broken.png").write_bytes(b"not an image")
    first = _load(folder, store)
    decodes.clear()
    second = _load(folder, store)
    assert decodes == [] and len(second.skipped) == 1
    assert second.skipped[0][0].name == "broken.png" and second.skipped == first.skipped
    assert second.skipped[0][1].startswith("unreadable")


def test_memory_map_beyond_the_ram_bound_gives_the_same_rows(folder, store):
    ram = _load(folder, store)
    mapped = _load(folder, store, cache_mb=0.01)
    assert not isinstance(ram.images.numpy(), np.memmap)
    assert torch.equal(ram.images, mapped.images)
    assert torch.equal(ram.get(torch.tensor([5, 1, 7])), mapped.get(torch.tensor([5, 1, 7])))


def test_not_enough_disk_space_is_one_error_before_any_decoding(folder, store, decodes, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(UserError) as err:
        _load(folder, store)
    need = 24 * 3 * 32 * 32
    assert str(err.value).startswith(f"The decoded-image cache needs {need:,} bytes")
    assert "--cache-dir" in str(err.value) and "1,000 free" in str(err.value)
    assert decodes == []


BUILDER = """
import sys, time
import edgessl.data.folder as f
from edgessl.options import Decode
original = f._try_decode
def slow(path, size):
    time.sleep(float(sys.argv[3]))
    return original(path, size)
f._try_decode = slow
images = f.load_image_folder(sys.argv[1], 32, decode=Decode(cache_dir=sys.argv[2], workers=1))
print(len(images))
"""


def _builder(root, store, delay):
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(root), str(store), str(delay)],
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_two_concurrent_builders_leave_one_valid_cache(folder, store):
    procs = [_builder(folder, store, 0.02) for _ in range(2)]
    assert [p.communicate(timeout=120)[0].strip() for p in procs] == ["24", "24"]
    images = store / "images"
    assert len(list(images.glob("*.json"))) == 1 and len(list(images.glob("*.u8"))) == 1
    assert not list(images.glob(".*.tmp"))
    uncached = load_image_folder(folder, 32, decode=Decode(cache_dir="none"))
    assert torch.equal(_load(folder, store).images, uncached.images)


@pytest.mark.slow
def test_a_killed_build_leaves_no_cache_and_the_next_one_cleans_up(folder, store, decodes):
    proc = _builder(folder, store, 0.5)
    deadline = time.time() + 60
    while not list((store / "images").glob(".*.tmp")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not list((store / "images").glob("*.json")) and not list((store / "images").glob("*.u8"))
    assert list_entries(store / "images") == []
    got = _load(folder, store)
    assert len(decodes) == 24 and len(got) == 24
    assert not list((store / "images").glob(".*.tmp"))  # the killed build's temporary file was removed


def test_cache_dir_none_and_the_default_folder(folder, monkeypatch, tmp_path):
    assert cache_folder("none") is None
    monkeypatch.setenv("EDGESSL_CACHE_DIR", str(tmp_path / "env"))
    assert cache_folder("auto") == tmp_path / "env" / "images"
    monkeypatch.delenv("EDGESSL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder("auto") == tmp_path / "xdg" / "edgessl" / "images"
    load_image_folder(folder, 32, decode=Decode(cache_dir="none"))
    assert not (tmp_path / "xdg").exists()


def test_cache_list_and_clear_commands(folder, store, tiny_data):
    _load(folder, store)
    _load(tiny_data, store)
    load_image_folder(folder, 24, decode=Decode(cache_dir=store, workers=1))  # the same folder at another size
    runner = CliRunner()
    res = runner.invoke(app, ["cache", "list", "--cache-dir", str(store)], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and str(folder) in res.output and "in 3 entries of 2 folders;" in res.output
    res = runner.invoke(app, ["cache", "clear", str(folder / "nope"), "--cache-dir", str(store)])
    assert res.exit_code == 0 and " ".join(res.output.split()) == (
        f"Nothing is cached for {folder / 'nope'} or the folders inside it (edgessl cache list shows what is).")
    res = runner.invoke(app, ["cache", "clear", str(folder.parent), "--cache-dir", str(store)])  # the folder above
    # index, data, build lock, readers lock, last use; of both sizes
    assert res.exit_code == 0 and res.output.startswith("Removed 10 cache files of")
    assert [e["root"] for e in list_entries(store / "images")] == [str(tiny_data)]
    (store / "images" / "notes.txt").write_text("mine")  # not a cache file: never deleted
    res = runner.invoke(app, ["cache", "clear", "--cache-dir", str(store)], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and list_entries(store / "images") == []
    assert f"cache files from {store} (" in res.output  # which cache was emptied: all of it had gone unnamed
    assert (store / "images" / "notes.txt").exists()
    res = runner.invoke(app, ["cache", "list", "--cache-dir", str(store)])
    assert "is empty" in res.output
    res = runner.invoke(app, ["cache", "list", "--cache-dir", str(store / "typo")], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and res.output.startswith(f"No cache in {store / 'typo' / 'images'} (no such folder yet)")


def test_prefetcher_keeps_order_raises_where_it_failed_and_stops_early():
    with Prefetcher(lambda i: i * i, 50, depth=2) as items:
        assert list(items) == [i * i for i in range(50)]

    def failing(i):
        if i == 3:
            raise ValueError("boom at 3")
        return i

    got = []
    with pytest.raises(ValueError, match="boom at 3"), Prefetcher(failing, 10) as items:
        got.extend(items)
    assert got == [0, 1, 2]
    made = []
    with Prefetcher(lambda i: made.append(i) or i, 1000, depth=2) as items:
        for i in items:
            if i == 1:
                break
    assert len(made) <= 5  # stopped shortly after the consumer left


@pytest.mark.slow
def test_pretraining_from_memory_map_ram_and_no_cache_is_bit_identical(tiny_data, tmp_path):
    opts = dict(data=str(tiny_data), epochs=2, image_size=32, batch_size=8, head_hidden=64, feature_dim=16,
                eval_every=0, quiet=True, deterministic=True, workers=1, negatives=10,
                cache_dir=str(tmp_path / "cache"))
    runs = {
        "ram": dict(opts),
        "mapped": dict(opts, cache_mb=0.01),  # 24 x 3 x 32 x 32 bytes > 10 KiB: memory-mapped
        "none": dict(opts, cache_dir="none"),
    }
    weights = {}
    for name, extra in runs.items():
        edgessl.pretrain(out=str(tmp_path / name), **extra)
        weights[name] = load_encoder(tmp_path / name).state_dict()
    for name in ("mapped", "none"):
        for k, v in weights["ram"].items():
            assert torch.equal(v, weights[name][k]), (name, k)


@pytest.mark.slow
def test_bf16_autocast_runs_real_steps_on_the_cpu(tiny_data, tmp_path):
    losses = []
    edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "bf16"), epochs=1, image_size=32, batch_size=8,
                     head_hidden=64, feature_dim=16, eval_every=0, quiet=True, workers=1, device="cpu",
                     precision="bf16", on_step=lambda info: losses.append(info.loss))
    assert len(losses) == 3 and all(np.isfinite(losses))
    row = json.loads((tmp_path / "bf16" / "metrics.jsonl").read_text().splitlines()[0])
    assert np.isfinite(row["loss"]) and row["epoch"] == 1


@pytest.mark.slow
def test_fp16_with_its_gradient_scaler_runs_real_steps_on_the_cpu(tiny_data, tmp_path):
    """The GPU's fp16 path on the CPU: the scaler starts at 2^16, skips the steps whose gradients overflow (the
    weights and the bank stay put, on_step is not called) and halves its scale until steps go through."""
    steps = []
    edgessl.pretrain(data=str(tiny_data), out=str(tmp_path / "fp16"), epochs=3, image_size=32, batch_size=8,
                     head_hidden=64, feature_dim=16, eval_every=0, quiet=True, workers=1, device="cpu",
                     precision="fp16", on_step=lambda info: steps.append((info.epoch, info.step, info.loss)))
    assert 1 <= len(steps) < 9 and all(np.isfinite([loss for _, _, loss in steps]))
    scaler = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=False)["scaler"]
    assert scaler["scale"] < 2.0**16  # it backed off from its initial scale


def test_export_samples_come_from_the_cache_without_decoding(folder, monkeypatch, isolated_cache):
    import edgessl.deploy.images as images_mod

    fresh = images_mod.sample_folder(folder, 32, 10, "--calib")  # no cache entry yet: decoded
    load_image_folder(folder, 32)  # the default cache folder (EDGESSL_CACHE_DIR of the test session)
    calls = []
    monkeypatch.setattr(images_mod, "_try_decode", lambda *a: calls.append(a))
    cached = images_mod.sample_folder(folder, 32, 10, "--calib")
    assert calls == [] and cached.paths == fresh.paths
    assert np.array_equal(cached.images, fresh.images) and np.array_equal(cached.labels, fresh.labels)


# ---------------------------------------------------------------- the budget (edgessl.data.budget)
def _folders(tiny_data, tmp_path, n: int) -> list[Path]:
    """n folders of 6 different emoji each (their entries are 6 x 3 x 32 x 32 = 18 KiB)."""
    files = sorted(tiny_data.rglob("*.png"))
    out = []
    for k in range(n):
        root = tmp_path / f"f{k}"
        root.mkdir()
        for f in files[6 * k : 6 * k + 6]:
            shutil.copy(f, root / f.name)
        out.append(root)
    return out


def _used(store: Path, root: Path, when: float) -> None:
    os.utime(store / "images" / f"{entry_name(root, 32)}.used", (when, when))


def test_parse_size_and_the_auto_budget(tmp_path, monkeypatch):
    from edgessl.data.budget import cache_budget
    from edgessl.options import parse_size

    assert [parse_size(t) for t in ("20G", "500M", "1.5GiB", "1000", "none")] == [20 * 2**30, 500 * 2**20,
                                                                                   int(1.5 * 2**30), 1000, None]
    with pytest.raises(UserError, match="--cache-max must be auto, none or a size such as 20G or 500M, not 'lots'"):
        parse_size("lots")
    monkeypatch.setenv("EDGESSL_CACHE_MAX", "junk")  # named where the value came from
    with pytest.raises(UserError, match="^EDGESSL_CACHE_MAX must be auto, none or a size such as 20G or 500M, not "):
        cache_budget(tmp_path)
    monkeypatch.delenv("EDGESSL_CACHE_MAX", raising=False)
    total = shutil.disk_usage(tmp_path).total
    size, how = cache_budget(tmp_path / "new" / "images")
    assert size == min(20 * 2**30, int(0.1 * total)) and how.startswith("auto: the smaller of 20 GiB and 10 %")
    monkeypatch.setenv("EDGESSL_CACHE_MAX", "2G")
    assert cache_budget(tmp_path) == (2 * 2**30, "EDGESSL_CACHE_MAX 2G")
    assert cache_budget(tmp_path, "none") == (None, "no budget (--cache-max none)")


def test_the_budget_evicts_the_least_recently_used_first(tiny_data, tmp_path, decodes):
    store, roots = tmp_path / "cache", _folders(tiny_data, tmp_path, 4)
    for root in roots[:3]:
        _load(root, store).reading.close()
    now = time.time()
    for k, root in enumerate(roots[:3]):  # f1 used longest ago, then f0, then f2
        _used(store, root, now - [200, 300, 100][k])
    one = list_entries(store / "images")[0]["bytes"]
    lines = []
    got = load_image_folder(roots[3], 32, decode=Decode(cache_dir=store, workers=1, cache_max=str(3 * one + 10)),
                            warn=lines.append)
    assert len(got) == 6
    assert sorted(e["root"] for e in list_entries(store / "images")) == sorted(str(r) for r in (roots[0], roots[2],
                                                                                               roots[3]))
    used = time.strftime("%Y-%m-%d %H:%M", time.localtime(now - 300))  # when it was last read (it said 1970)
    assert lines == [f"cache: evicted {roots[1]} at 32 px ({size_text(one)}; least recently used, last on {used}) to "
                     f"stay within the {size_text(3 * one + 10)} budget."]
    decodes.clear()
    _load(roots[1], store)  # the evicted folder is simply decoded again
    assert len(decodes) == 6


def test_a_folder_larger_than_the_whole_budget_is_decoded_without_the_cache(tiny_data, tmp_path, decodes):
    """Evicting every other entry would not make room, and writing it would break the budget: the others stay, the
    folder is decoded in memory, and one line says so."""
    store, roots = tmp_path / "cache", _folders(tiny_data, tmp_path, 2)
    _load(roots[0], store).reading.close()
    before = list_entries(store / "images")
    lines, budget = [], 5 * 3 * 32 * 32  # room for 5 of the 6 images at 32 px
    got = load_image_folder(roots[1], 32, decode=Decode(cache_dir=store, workers=1, cache_max=str(budget)),
                            warn=lines.append)
    assert len(got) == 6 and got.get(range(6)).shape == (6, 3, 32, 32)
    assert list_entries(store / "images") == before
    assert lines == [f"cache: {roots[1]} at 32 px needs 18.0 KiB, more than the whole {size_text(budget)} budget: "
                     "decoded without the cache this run (raise --cache-max or EDGESSL_CACHE_MAX to keep it)."]
    assert size_text(budget) == "15.0 KiB" and size_text(5 * 2**20) == "5.0 MiB" and size_text(12) == "12 B"
    # the auto budget, a guess, is exceeded rather than decoding a large folder afresh every epoch: nothing evicted
    from edgessl.data.cache import make_room

    lines = []
    assert make_room(store / "images", 2 * 2**30, 2**30, "none", lines.append) == []
    assert list_entries(store / "images") == before and lines == [
        "cache: this folder needs 2.0 GiB, more than the whole 1.0 GiB budget (auto): cached anyway, nothing evicted "
        "for it (--cache-max sets a budget that is kept)."]


def test_stale_entries_go_first_are_listed_and_cleared(tiny_data, tmp_path):
    store, roots = tmp_path / "cache", _folders(tiny_data, tmp_path, 3)
    for root in roots:
        _load(root, store).reading.close()
    now = time.time()
    for root, ago in zip(roots, (1000, 500, 400), strict=True):  # f0 the least recently used, but current
        _used(store, root, now - ago)
    shutil.rmtree(roots[1])
    (roots[2] / next(iter(sorted(os.listdir(roots[2]))))).unlink()
    res = CliRunner().invoke(app, ["cache", "list", "--cache-dir", str(store)], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and "stale: folder gone" in res.output and "stale: files changed" in res.output
    assert "2 stale entries" in res.output and "edgessl cache clear --stale" in res.output
    from edgessl.data.cache import make_room

    lines = []
    total = sum(e["bytes"] for e in list_entries(store / "images"))
    assert make_room(store / "images", 1, total, "none", lines.append) == [entry_name(roots[1], 32)]
    assert "stale: folder gone" in lines[0]
    res = CliRunner().invoke(app, ["cache", "clear", "--stale", "--cache-dir", str(store)])
    assert res.exit_code == 0 and res.output.startswith("Removed 1 stale entry")
    assert [e["root"] for e in list_entries(store / "images")] == [str(roots[0])]


def test_a_damaged_data_file_is_listed_as_stale_and_cleared(tiny_data, tmp_path):
    store, (root,) = tmp_path / "cache", _folders(tiny_data, tmp_path, 1)
    _load(root, store).reading.close()
    data = next((store / "images").glob("*.u8"))
    whole = data.stat().st_size
    with open(data, "r+b") as fh:
        fh.truncate(whole - 100)
    res = CliRunner().invoke(app, ["cache", "list", "--cache-dir", str(store)], env={"COLUMNS": "300"})
    assert res.exit_code == 0 and f"stale: data file damaged ({whole - 100:,} of {whole:,} bytes)" in res.output
    assert "1 stale entry" in res.output
    data.unlink()
    res = CliRunner().invoke(app, ["cache", "list", "--cache-dir", str(store)], env={"COLUMNS": "300"})
    assert "stale: data file missing" in res.output
    res = CliRunner().invoke(app, ["cache", "clear", "--stale", "--cache-dir", str(store)])
    assert res.exit_code == 0 and res.output.startswith("Removed 1 stale entry")
    assert list_entries(store / "images") == []


@pytest.mark.slow
def test_an_entry_another_process_reads_is_never_evicted(tiny_data, tmp_path):
    from edgessl.data.cache import make_room

    store, roots = tmp_path / "cache", _folders(tiny_data, tmp_path, 2)
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys; from edgessl.data.folder import load_image_folder; "
         "from edgessl.options import Decode; "
         "s = load_image_folder(sys.argv[1], 32, decode=Decode(cache_dir=sys.argv[2], workers='1')); "
         "print('reading', flush=True); sys.stdin.read()", str(roots[0]), str(store)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "reading"
        _load(roots[1], store).reading.close()
        _used(store, roots[0], time.time() - 1000)  # the first to go, were it not read
        lines = []
        evicted = make_room(store / "images", 1, 1, "none", lines.append)
        assert evicted == [entry_name(roots[1], 32)]
        held = sum(e["bytes"] for e in list_entries(store / "images")) + 1
        assert lines[-1] == (f"cache: {size_text(held)} after this folder, over the 1 B budget: 1 entry in use by "
                             f"another process ({roots[0]}) cannot be evicted now; the next run that needs room "
                             "evicts it once free.")
        assert [e["root"] for e in list_entries(store / "images")] == [str(roots[0])]
    finally:
        reader.communicate("", timeout=60)
    assert make_room(store / "images", 1, 1, "none", lambda _: None) == [entry_name(roots[0], 32)]


def test_teacher_banks_of_a_gone_folder_are_stale_and_cleared(tmp_path):
    store = tmp_path / "cache"
    (store / "images").mkdir(parents=True)
    teachers = store / "teachers"
    teachers.mkdir()
    kept, gone = tmp_path / "kept", tmp_path / "gone"
    kept.mkdir()
    for name, root in (("a", kept), ("b", gone)):
        (teachers / f"{name}.json").write_text(json.dumps({"data_root": str(root), "image_size": 32, "rows": 4,
                                                           "timm_name": "resnet18"}))
        (teachers / f"{name}.safetensors").write_bytes(b"0" * 64)
    res = CliRunner().invoke(app, ["cache", "list", "--cache-dir", str(store)], env={"COLUMNS": "300"})
    rows = [line for line in res.output.splitlines() if "--teacher resnet18" in line]
    assert len(rows) == 2 and "stale: folder gone" in rows[1] and "stale" not in rows[0]
    assert "1 stale entry" in res.output
    res = CliRunner().invoke(app, ["cache", "clear", "--stale", "--cache-dir", str(store)])
    assert res.exit_code == 0 and res.output.startswith("Removed 1 stale entry")
    assert sorted(p.name for p in teachers.iterdir()) == ["a.json", "a.safetensors"]
    res = CliRunner().invoke(app, ["cache", "clear", str(kept), "--cache-dir", str(store)])
    assert res.exit_code == 0 and not list(teachers.iterdir())


def test_a_folder_with_a_dot_in_its_name_is_cleared(tiny_data, store, tmp_path):
    """`cache clear my.imgs` had said nothing was cached, and a full clear had left every my.imgs-32px-* file."""
    dotted = tmp_path / "my.imgs"
    shutil.copytree(tiny_data, dotted)
    _load(dotted, store)
    clear_entries(store / "images", dotted)
    assert list_entries(store / "images") == [] and not list((store / "images").glob("my.imgs-*"))
    _load(dotted, store)
    clear_entries(store / "images")
    assert not list((store / "images").glob("my.imgs-*"))


def test_a_killed_builds_temporary_file_is_listed_and_freed_by_clear_stale(folder, store):
    """`kill -9` mid-build left .<entry>.u8.<pid>.tmp: hidden from cache list, kept by clear --stale."""
    import subprocess
    import sys

    from edgessl.workflows.cache import cache_entries, clear_cache

    _load(folder, store)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = store / "images" / f".x-32px-0123456789abcdef.1.u8.{dead.stdout.strip()}.tmp"
    orphan.write_bytes(b"\0" * 1000)
    mine = store / "images" / f".y-32px-0123456789abcdef.1.u8.{os.getpid()}.tmp"  # a build still running
    mine.write_bytes(b"\0" * 10)
    listed = [e for e in cache_entries(store)[1] if e.get("orphan")]
    assert [(e["name"], e["bytes"], e["stale"]) for e in listed] == [(orphan.name, 1000, "left by a killed build")]
    assert clear_cache(store, stale=True) == (1, 1000)
    assert not orphan.exists() and mine.exists() and len(list_entries(store / "images")) == 1


def test_a_read_only_cache_is_read_without_its_readers_lock(folder, store, monkeypatch):
    """A populated cache on a read-only mount had failed with 'Read-only file system: ...readers'."""
    from edgessl.data import budget

    first = _load(folder, store).images.clone()
    real_open = open

    def read_only(path, mode="r", *args, **kwargs):
        if str(path).endswith(".readers") and mode != "r":
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    assert budget.hold(store / "images", "anything") is None
    assert torch.equal(_load(folder, store).images, first)
