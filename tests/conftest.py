"""Shared, generic test fixtures. Any test module may use them; keep this file to fixtures only.

- labelled_demo (session): a tiny labelled split of the bundled demo emoji in the ImageFolder layout:
  train/<class>/ with 6, 6 and 3 images of 3 classes (one class smaller on purpose) and test/<class>/ with 3 each.
  Read-only: copy it before changing it.
- tiny_data (session): 24 demo emoji, 4 of each of 6 categories, in class subfolders. Read-only.
- isolated_cache (session, automatic): EDGESSL_CACHE_DIR points at a temporary folder for the whole session (and
  the processes it starts), so tests never read or write the user's ~/.cache/edgessl.
- timm_offline: timm.create_model as it behaves offline: pretrained=True raises the hub's connection error, random
  weights still build (so `--init timm` / `--teacher timm:` can be tested without a download).
- demo_run (session): a run directory of a 1-epoch pretraining at 32 px on labelled_demo/train (encoder files,
  config.yaml, ...). Read-only: copy it (shutil.copytree) before writing into it.
"""

import os
import shutil

import pytest

from edgessl.demo import demo_images

DEMO_CLASSES = ("activities", "animals_and_nature", "flags")
DEMO_TRAIN = (6, 6, 3)
DEMO_TEST = 3


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    old = os.environ.get("EDGESSL_CACHE_DIR")
    os.environ["EDGESSL_CACHE_DIR"] = str(tmp_path_factory.mktemp("edgessl-cache"))
    yield os.environ["EDGESSL_CACHE_DIR"]
    if old is None:
        os.environ.pop("EDGESSL_CACHE_DIR", None)
    else:
        os.environ["EDGESSL_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def labelled_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled_demo")
    for name, n_train in zip(DEMO_CLASSES, DEMO_TRAIN, strict=True):
        files = sorted((demo_images() / name).glob("*.png"))
        for split, chosen in (("train", files[:n_train]), ("test", files[n_train : n_train + DEMO_TEST])):
            (root / split / name).mkdir(parents=True)
            for f in chosen:
                shutil.copy(f, root / split / name / f.name)
    return root


@pytest.fixture(scope="session")
def demo_run(labelled_demo, tmp_path_factory):
    import edgessl

    out = tmp_path_factory.mktemp("demo_run") / "run"
    edgessl.pretrain(data=str(labelled_demo / "train"), out=str(out), epochs=1, image_size=32, batch_size=8,
                     head_hidden=64, feature_dim=16, eval_every=0, quiet=True, workers=1)
    return out


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for cls in sorted(p for p in demo_images().iterdir() if p.is_dir())[:6]:
        (root / cls.name).mkdir()
        for f in sorted(cls.glob("*.png"))[:4]:
            shutil.copy(f, root / cls.name / f.name)
    return root


@pytest.fixture
def timm_offline(monkeypatch):
    import timm

    real = timm.create_model

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'")
        return real(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
