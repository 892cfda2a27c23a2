"""No untrusted pickles: a ``.pt`` checkpoint loads only when its sha256 is pinned (or recorded by our own
recipe build, or ``trust_unpinned`` is set); non-pickle sources are unaffected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tasks.config import ProfileError
from tasks.ingest.layout import DocLayoutYoloDetector, build_layout_detector
from tasks.ingest.plan import ingest_base_hash
from tasks.models import (
    PICKLE_RECORD,
    RECIPES,
    UntrustedPickleError,
    build_recipe,
    pickle_files,
    resolve_source,
    sha256_file,
    verify_pickle,
)
from tasks.recipes.doclayout_yolo_tiny import build_random_doclayout_yolo

FAKE_RECIPE = "pickle-test"
_BUILDS: list[Path] = []


def fake_recipe(out_dir: Path) -> Path:
    """Recipe builder for the tests: a copy of the module's random DocLayout-YOLO checkpoint."""
    shutil.copy(_BUILDS[0], Path(out_dir) / "model.pt")
    return Path(out_dir)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_random_doclayout_yolo(tmp_path_factory.mktemp("pin"))
    _BUILDS[:] = [path]
    return path


@pytest.fixture
def recipe_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ckpt: Path) -> Path:
    """A private model cache with the fake recipe registered."""
    monkeypatch.setenv("M3DR_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("M3DR_RECIPE_CACHE", str(tmp_path / "recipe-cache"))
    monkeypatch.setitem(RECIPES, FAKE_RECIPE, f"{__name__}:fake_recipe")
    return tmp_path / "models"


def _cfg(model: str, **extra: object) -> dict:
    return {"engine": "doclayout-yolo", "model": model, "imgsz": 320, **extra}


def test_unpinned_pt_is_refused_with_the_line_to_add(ckpt: Path) -> None:
    actual = sha256_file(ckpt)
    for model in (str(ckpt), str(ckpt.parent)):  # the file or its directory
        with pytest.raises(UntrustedPickleError) as exc:
            build_layout_detector(_cfg(model))
        msg = str(exc.value)
        assert "is not pinned" in msg and "runs code" in msg
        assert actual in msg and f'sha256 = "{actual}"' in msg and "[layout]" in msg
        assert "trust_unpinned = true" in msg
    with pytest.raises(UntrustedPickleError):  # the class itself checks, not only the registry
        DocLayoutYoloDetector(ckpt)


def test_wrong_pin_is_refused(ckpt: Path) -> None:
    wrong = "0" * 64
    for extra in ({}, {"trust_unpinned": True}):  # a pin, once given, is never overridden
        with pytest.raises(UntrustedPickleError, match="does not match the pinned") as exc:
            build_layout_detector(_cfg(str(ckpt), sha256=wrong, **extra))
        assert sha256_file(ckpt) in str(exc.value)


def test_right_pin_loads(ckpt: Path) -> None:
    det = build_layout_detector(_cfg(str(ckpt.parent), sha256=sha256_file(ckpt).upper()))
    assert isinstance(det, DocLayoutYoloDetector) and det.weights == ckpt


def test_trust_unpinned_loads(ckpt: Path, caplog: pytest.LogCaptureFixture) -> None:
    det = build_layout_detector(_cfg(str(ckpt), trust_unpinned=True))
    assert det.weights == ckpt
    assert any("unpinned pickle" in r.getMessage() for r in caplog.records)


def test_pin_must_be_a_sha256(ckpt: Path) -> None:
    with pytest.raises(ProfileError, match="sha256"):
        build_layout_detector(_cfg(str(ckpt), sha256="abc123"))


def test_non_pickle_sources_unaffected(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    model_dir = tmp_path / "st"
    model_dir.mkdir()
    save_file({"w": torch.zeros(2, 2)}, str(model_dir / "model.safetensors"))
    (model_dir / "config.json").write_text("{}")
    assert pickle_files(model_dir) == []
    for path in (model_dir, model_dir / "model.safetensors", model_dir / "config.json"):
        assert verify_pickle(path, source=str(path)) is None  # unpinned, untrusted: still fine
    assert resolve_source(str(model_dir)) == model_dir.resolve()


def test_recipe_build_records_and_verifies(recipe_cache: Path, ckpt: Path) -> None:
    out = build_recipe(FAKE_RECIPE)
    pt = out / "model.pt"
    record = (out / PICKLE_RECORD).read_text()
    assert sha256_file(pt) in record
    source = f"recipe:{FAKE_RECIPE}"
    # our own build loads with no pin; a dotfile record leaves the fingerprint alone
    det = build_layout_detector(_cfg(source))
    assert det.weights == pt
    # a same-named pickle outside the build dir never borrows the record
    other = recipe_cache.parent / "elsewhere"
    other.mkdir()
    shutil.copy(pt, other / "model.pt")
    with pytest.raises(UntrustedPickleError, match="no sha256 record"):
        verify_pickle(other / "model.pt", source=source)
    # the file changed after the build: refused, even with trust_unpinned
    with pt.open("ab") as fh:
        fh.write(b"\0")
    for trust in (False, True):
        with pytest.raises(UntrustedPickleError, match="changed after") as exc:
            build_layout_detector(_cfg(source, trust_unpinned=trust))
        assert f"m3dr models build {FAKE_RECIPE} --force" in str(exc.value)
    # a build that predates records: refused; build_recipe rebuilds it (and records it)
    (out / PICKLE_RECORD).unlink()
    with pytest.raises(UntrustedPickleError, match="no sha256 record"):
        build_layout_detector(_cfg(source))
    build_recipe(FAKE_RECIPE)
    assert sha256_file(pt) == sha256_file(ckpt) and (out / PICKLE_RECORD).is_file()
    assert verify_pickle(pt, source=source) == sha256_file(ckpt)


def test_pin_does_not_change_the_ingest_hash() -> None:
    base = {"layout": {"engine": "doclayout-yolo", "model": "hf:x/y:z.pt"}}
    pinned = {"layout": {**base["layout"], "sha256": "a" * 64, "trust_unpinned": True}}
    assert ingest_base_hash(base, "fp") == ingest_base_hash(pinned, "fp")
    moved = {"layout": {**base["layout"], "imgsz": 640}}
    assert ingest_base_hash(base, "fp") != ingest_base_hash(moved, "fp")
