"""Model files: round trip, the packaged default model, and hostile or broken files."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from classifier.model import TextModel
from classifier.train import TrainConfig, fit_model
from stanzaguard import models
from stanzaguard.models import (
    ModelFileError,
    load_default_model,
    load_model,
    model_files,
    save_model,
)
from tests.support.textdata import SMS_SHA256, synthetic_corpus

TEXTS = ["", "free prize call 09061701461", "lunch tomorrow?", "ÜBER 🙂 \ud800", "x" * 5000]


@pytest.fixture(scope="module")
def model() -> TextModel:
    return fit_model(synthetic_corpus(), TrainConfig(inner_folds=3), info={"note": "test"}).model


@pytest.fixture
def saved(model: TextModel, tmp_path: Path) -> Path:
    save_model(model, tmp_path / "m")
    return tmp_path / "m"


def rewrite(
    directory: Path,
    arrays: Callable[[dict[str, Any]], None] | None = None,
    npz: Callable[[bytes], bytes] | None = None,
    metadata: Callable[[dict[str, Any]], None] | None = None,
    fix_digest: bool = True,
) -> None:
    """Tamper with a saved model, keeping the digest consistent unless asked not to."""
    files = model_files(directory)
    data = files.npz.read_bytes()
    if arrays is not None:
        with np.load(io.BytesIO(data)) as loaded:
            content = {k: loaded[k] for k in loaded.files}
        arrays(content)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **content)  # allow_pickle defaults to True: hostile
        data = buffer.getvalue()
    if npz is not None:
        data = npz(data)
    files.npz.write_bytes(data)
    meta = json.loads(files.json.read_text())
    if fix_digest:
        meta[models.DIGEST_KEY] = hashlib.sha256(data).hexdigest()
    if metadata is not None:
        metadata(meta)
    files.json.write_text(json.dumps(meta))


def npy_with_header(header: dict[str, Any], payload: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue() + payload


def replace_member(name: str, content: bytes) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        out = io.BytesIO()
        with (
            zipfile.ZipFile(io.BytesIO(data)) as source,
            zipfile.ZipFile(out, "w") as target,
        ):
            for info in source.infolist():
                body = content if info.filename == name else source.read(info)
                target.writestr(info.filename, body)
        return out.getvalue()

    return change


class TestRoundTrip:
    def test_save_and_load(self, model: TextModel, saved: Path) -> None:
        files = model_files(saved)
        assert files.npz.is_file() and files.json.is_file()
        meta = json.loads(files.json.read_text())
        assert meta["format"] == "stanzaguard-text-model" and meta["version"] == 1
        assert meta["note"] == "test"
        assert meta["thresholds"] == model.thresholds.to_json()
        for path in (saved, files.npz, files.json):
            loaded = load_model(path)
            assert [loaded.score(t) for t in TEXTS] == [model.score(t) for t in TEXTS]
            assert loaded.info["note"] == "test"

    def test_no_pickle_inside(self, saved: Path) -> None:
        with np.load(model_files(saved).npz, allow_pickle=False) as npz:
            assert all(npz[name].dtype != object for name in npz.files)


class TestDefaultModel:
    def test_packaged_model_loads_and_separates(self) -> None:
        model = load_default_model()
        data = model.info["training"]["data"]
        assert data["sha256"] == SMS_SHA256
        assert data["rows"] == 5574
        assert "stanzaguard train" in model.info["training"]["command"]
        metrics = model.info["metrics"]["block"]
        assert metrics["spam_caught"] > 0.9 and metrics["blocked_ham"] < 0.005
        spam = model.score("WINNER!! You have been selected for a £900 prize. Call 09061701461")
        ham = model.score("Are we still meeting for lunch tomorrow? I'll call you later")
        assert spam >= model.thresholds.block > ham

    def test_packaged_model_is_small(self) -> None:
        npz = Path(models.__file__).parent / "models" / "default" / models.NPZ_NAME
        assert npz.stat().st_size < 2_500_000


class TestHostileFiles:
    @pytest.mark.parametrize(
        ("tamper", "message"),
        [
            (
                lambda d: rewrite(d, arrays=lambda a: a.update(weights=a["weights"].astype("f8"))),
                "float32",
            ),
            (
                lambda d: rewrite(d, arrays=lambda a: a.update(weights=np.array([object()]))),
                "objects",
            ),
            (lambda d: rewrite(d, arrays=lambda a: a.update(evil=np.zeros(2))), "unexpected: evil"),
            (lambda d: rewrite(d, arrays=lambda a: a.pop("df")), "missing: df"),
            (lambda d: rewrite(d, arrays=lambda a: a.update(df=a["df"].reshape(1, -1))), "1-D"),
            (lambda d: rewrite(d, arrays=lambda a: a.update(df=a["df"][:-1])), "same length"),
            (
                lambda d: rewrite(
                    d,
                    npz=replace_member(
                        "weights.npy",
                        npy_with_header(
                            {"descr": "<f4", "fortran_order": False, "shape": (10**9,)}
                        ),
                    ),
                ),
                "at most",
            ),
            (
                lambda d: rewrite(
                    d,
                    npz=replace_member(
                        "weights.npy",
                        npy_with_header(
                            {"descr": "<f4", "fortran_order": False, "shape": (1000,)}, b"\0" * 40
                        ),
                    ),
                ),
                "truncated",
            ),
            (
                lambda d: rewrite(d, npz=replace_member("df.npy", b"\x93NUMPY\x01\x00garbage")),
                "header",
            ),
            (lambda d: rewrite(d, npz=lambda b: b[: len(b) // 2]), "not a valid .npz"),
            (lambda d: rewrite(d, npz=lambda b: b"PK\x03\x04" + b"\0" * 100), "not a valid .npz"),
            (lambda d: rewrite(d, npz=lambda b: b + b"x", fix_digest=False), "SHA-256"),
            (lambda d: rewrite(d, metadata=lambda m: m.pop(models.DIGEST_KEY)), "arrays_sha256"),
            (lambda d: rewrite(d, metadata=lambda m: m.update(version=99)), "version"),
            (lambda d: rewrite(d, metadata=lambda m: m["features"].update(bits=99)), "bits"),
            (lambda d: model_files(d).json.write_text("{broken"), "invalid JSON"),
            (lambda d: model_files(d).json.write_text("[1, 2]"), "JSON object"),
            (lambda d: model_files(d).json.write_bytes(b'{"a": "\xff"}'), "not UTF-8"),
            (lambda d: model_files(d).json.write_text("[" * 100_000), "JSON"),
            (lambda d: model_files(d).npz.unlink(), "no such file"),
        ],
    )
    def test_clear_errors(self, saved: Path, tamper: Callable[[Path], None], message: str) -> None:
        tamper(saved)
        with pytest.raises(ModelFileError, match=message):
            load_model(saved)

    def test_oversized_files_are_not_read(
        self, saved: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(models, "MAX_NPZ_BYTES", 1000)
        with pytest.raises(ModelFileError, match="larger than"):
            load_model(saved)
        monkeypatch.setattr(models, "MAX_JSON_BYTES", 10)
        with pytest.raises(ModelFileError, match="larger than"):
            load_model(saved)
