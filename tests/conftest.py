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
  config.yaml, ...). Read-only: copy it (run_copy, or shutil.copytree) before writing into it.
- run_copy: a private copy of demo_run to write into.
- exports (session): one short pretraining on 72 demo images, its encoder exported (fp32 + int8 + fp16) and a
  classifier (fp32 + int8), into one export folder (test_export.py, test_device_check.py). Read-only.
- one_torch_thread (module): PyTorch on one thread for the module, restored afterwards (small forward passes on a CPU
  shared with other jobs ran up to 60x slower with two OpenMP threads waiting for each other).
- EDGESSL_ONNX_EXPORTER=torchscript for the session and the processes it starts (unless already set): every
  export tries the TorchScript exporter first (about 1 s instead of 15-20 s for torch.export on 2 cores);
  test_export.py tests the default torch.export path and the fallback with it set to dynamo.
- Under pytest-xdist (`-n 2`, what CI runs) each worker runs PyTorch on one thread (OMP_NUM_THREADS=1, unless set:
  two workers share the 2 cores, and two runs a test compares bit for bit take the same thread count whatever the
  other worker does; tests of the `--threads auto` policy remove it), and the COLUMNS=80 / LINES=24 its workers get
  are removed, so the CLI's output is wrapped as in a plain run.
- SHARED / needs_shared(name): the shared data sets (../shared/data) and a skip marker for tests that need one of them
  (a user's clone has none; CI has them).
"""

import contextlib
import os
import shutil
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: see the docstring (set before torch is imported)
    os.environ.pop("COLUMNS", None)  # xdist's workers get COLUMNS=80, LINES=24; a pipe has neither
    os.environ.pop("LINES", None)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # one core per worker, the same thread count in every run

import pytest  # noqa: E402
import torch  # noqa: E402

from edgessl.demo import demo_images

os.environ.setdefault("EDGESSL_ONNX_EXPORTER", "torchscript")  # see the docstring

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def needs_shared(archive: str):
    """Skip the test cleanly when ../shared/data/<archive> is absent."""
    return pytest.mark.skipif(not (SHARED / archive).is_file(), reason=f"../shared/data/{archive} not present")

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
    monkeypatch.setattr("edgessl.models.hub.hub_reachable", lambda: True)  # the hub answers, the download fails


@pytest.fixture
def run_copy(demo_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(demo_run, dst)
    return dst


@contextlib.contextmanager
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def one_torch_thread():
    with _one_thread():
        yield


PER_CLASS = 8  # 9 demo classes x 8 = 72 images: >= 64 for the parity check, 1 epoch in a few seconds


def _subset(dst: Path) -> Path:
    from edgessl.demo import demo_images

    for folder in sorted(p for p in demo_images().iterdir() if p.is_dir()):
        (dst / folder.name).mkdir(parents=True)
        for png in sorted(folder.glob("*.png"))[:PER_CLASS]:
            shutil.copy(png, dst / folder.name / png.name)
    return dst


def _classifier(run: Path, data: Path) -> Path:
    from edgessl.data.augment import test_transform
    from edgessl.data.folder import load_image_folder
    from edgessl.models.backbone import load_encoder
    from edgessl.models.classifier import Classifier, save_classifier

    encoder = load_encoder(run)
    meta = encoder.edgessl_meta
    classes = sorted(p.name for p in data.iterdir())
    model = Classifier(encoder, meta["feature_dim"], len(classes)).eval()
    images = load_image_folder(data, meta["image_size"], labels=True)
    with torch.no_grad():  # a nearest-class-mean layer: logits that mean something, as a fine-tuned one's do
        feats = torch.nn.functional.normalize(encoder(test_transform(images.get(torch.arange(len(images))),
                                                                     meta["mean"], meta["std"])), dim=1)
        means = torch.stack([feats[images.labels == c].mean(0) for c in range(len(classes))])
        model.fc.weight.copy_(10 * torch.nn.functional.normalize(means, dim=1))
        model.fc.bias.zero_()
    folder = run / "finetune-test"
    save_classifier(model, folder, {**meta, "classes": classes, "train_data": str(data),
                                    "finetune": {"encoder_run": str(run)}})  # as finetune records it
    return folder


def build_exports(root: Path) -> dict:
    """Pretrain 1 epoch at 32 px on 72 demo images, export the encoder (fp32 + int8 + fp16) and a classifier
    (fp32 + int8) into the same export folder. Cached for the whole session (both test files). int8 is the single
    configuration (--int8-mode strict): the search may keep fp32 on a machine where int8 is slower
    (test_quantize_search.py covers it)."""
    with _one_thread():
        return _build(root)


def _build(root: Path) -> dict:
    import edgessl

    data = _subset(root / "data")
    run = root / "run"
    edgessl.pretrain(data=str(data), epochs=1, image_size=32, batch_size=32, out=str(run), quiet=True, eval_every=0,
                     backbone="mobilenetv3_small")
    clf = _classifier(run, data)
    enc_result = edgessl.export(run, int8="strict", fp16=True)
    clf_result = edgessl.export(run, classifier=clf, int8="strict")
    return {"data": data, "run": run, "classifier": clf, "export": run / "export", "encoder_result": enc_result,
            "classifier_result": clf_result}


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    return build_exports(tmp_path_factory.mktemp("export"))


TINY = dict(image_size=32, batch_size=8, head_hidden=32, feature_dim=16, quiet=True, workers=1, eval_every=0)


def make_run(data, precision: str = "fp32", device: str = "cpu", **options):
    """(Run, TrainState, Objective) of a one-process TINY run on `device`, built by the functions pretrain() uses (on
    CUDA build_model returns a channels_last model, new_state an fp16 run's GradScaler("cuda"))."""
    from rich.console import Console

    from edgessl.config import resolve
    from edgessl.data.folder import load_image_folder
    from edgessl.evaluate.monitor import Monitor
    from edgessl.options import Decode
    from edgessl.runtime import ThreadChoice
    from edgessl.train import distributed
    from edgessl.train.build import build_model, encoder_meta, new_state
    from edgessl.train.objective import Objective
    from edgessl.train.prepare import resolve_bank_lr, resolve_temperature
    from edgessl.train.types import Run

    cfg = resolve({**TINY, "epochs": 20, "data": str(data), **options})  # size, epochs: numbers
    d, dev = distributed.Dist(), torch.device(device)
    model, arch, feat_dim, widths, teacher = build_model(cfg, None, d, dev)
    images = load_image_folder(data, cfg.image_size, decode=Decode(workers=1))
    cfg, _ = resolve_temperature(cfg, images)  # --temperature auto, as pretrain resolves it, then --bank-lr auto
    cfg, _ = resolve_bank_lr(cfg)
    state = new_state(cfg, model, len(images), cfg.batch_size, dev, precision)
    run = Run(cfg, d, dev, data, images, slice(0, cfg.batch_size), Monitor(None, None),
              encoder_meta(cfg, arch, feat_dim, widths, None), ThreadChoice(1, "test"), Console(quiet=True), True)
    objective = Objective(state.method, cfg.seed, cfg.epochs, dev, precision, widths, teacher=teacher)
    return run, state, objective
