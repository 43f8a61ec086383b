"""Model files: reading and writing the text model, and the model shipped in the package.

A model is two files side by side: ``model.npz`` (numeric arrays, numpy's zip of ``.npy``
files, compressed) and ``model.json`` (metadata: format version, creation time, training data
and its SHA-256, feature settings, cross-validated metrics, thresholds, and the SHA-256 of the
``.npz``). Nothing is ever pickled: arrays are read with ``allow_pickle=False`` after every
member's header has been checked against the expected name, dtype and shape, so a malformed or
hostile file yields a `ModelFileError` naming the problem instead of a huge allocation, a
crash or code execution.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from classifier.model import MAX_FEATURES, ModelError, TextModel
from stanzaguard.errors import StanzaGuardError

NPZ_NAME = "model.npz"
JSON_NAME = "model.json"
DIGEST_KEY = "arrays_sha256"

#: Limits far above a real model (the shipped one is about 1 MB) and far below harm.
MAX_JSON_BYTES = 4 << 20
MAX_NPZ_BYTES = 128 << 20
MAX_HEADER_BYTES = 10_000

#: name -> (dtype, ndim, largest length): everything a model file may contain.
_EXPECTED: dict[str, tuple[np.dtype[Any], int, int]] = {
    "buckets": (np.dtype("<u4"), 1, MAX_FEATURES),
    "df": (np.dtype("<u4"), 1, MAX_FEATURES),
    "weights": (np.dtype("<f4"), 1, MAX_FEATURES),
    "intercept": (np.dtype("<f8"), 1, 1),
    "calibration": (np.dtype("<f8"), 1, 2),
    "n_docs": (np.dtype("<i8"), 1, 1),
}


class ModelFileError(StanzaGuardError):
    """A model file is missing, malformed, or does not match its metadata."""


@dataclass(frozen=True, slots=True)
class ModelFiles:
    npz: Path
    json: Path


def model_files(path: Path) -> ModelFiles:
    """The two files of the model at ``path``: a directory, or either of its files."""
    if path.suffix in (".npz", ".json"):
        return ModelFiles(path.with_suffix(".npz"), path.with_suffix(".json"))
    return ModelFiles(path / NPZ_NAME, path / JSON_NAME)


# --- writing ------------------------------------------------------------------------------


def save_model(model: TextModel, directory: Path) -> ModelFiles:
    """Write ``model.npz`` and ``model.json`` into ``directory`` (created if needed)."""
    arrays, metadata = model.to_arrays()
    buffer = io.BytesIO()
    np.savez_compressed(buffer, allow_pickle=False, **arrays)
    data = buffer.getvalue()
    metadata[DIGEST_KEY] = hashlib.sha256(data).hexdigest()
    text = json.dumps(metadata, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    files = model_files(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Arrays first, metadata last: a crash in between leaves a digest mismatch that the
    # loader reports, never a silently mixed model.
    _write_atomically(files.npz, data)
    _write_atomically(files.json, text.encode("utf-8"))
    return files


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


# --- reading ------------------------------------------------------------------------------


def load_model(path: Path) -> TextModel:
    """Read a model written by `save_model`; `ModelFileError` says what is wrong."""
    files = model_files(path)
    metadata = _read_metadata(files.json)
    data = _read_bytes(files.npz, MAX_NPZ_BYTES)
    return _build(data, metadata, files.npz)


def load_model_bytes(npz: bytes, metadata_json: bytes, *, name: str = "model") -> TextModel:
    """Like `load_model`, from the two files' contents (used for the packaged model)."""
    if len(metadata_json) > MAX_JSON_BYTES:
        raise ModelFileError(f"{name}.json: larger than {MAX_JSON_BYTES:,} bytes")
    if len(npz) > MAX_NPZ_BYTES:
        raise ModelFileError(f"{name}.npz: larger than {MAX_NPZ_BYTES:,} bytes")
    metadata = _parse_metadata(metadata_json, Path(f"{name}.json"))
    return _build(npz, metadata, Path(f"{name}.npz"))


def load_default_model() -> TextModel:
    """The model shipped in the package (trained on the SMS Spam Collection)."""
    folder = resources.files("stanzaguard").joinpath("models", "default")
    try:
        npz = folder.joinpath(NPZ_NAME).read_bytes()
        metadata = folder.joinpath(JSON_NAME).read_bytes()
    except OSError as exc:
        raise ModelFileError(f"the packaged default model is missing: {exc}") from None
    return load_model_bytes(npz, metadata, name="stanzaguard/models/default/model")


def read_metadata(path: Path) -> dict[str, Any]:
    """The metadata (``model.json``) of the model at ``path``, without reading its arrays.

    For listings; it says nothing about whether the arrays load (`load_model` does).
    """
    return _read_metadata(model_files(path).json)


def _read_bytes(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ModelFileError(f"{path}: larger than {limit:,} bytes; not a model file")
    return data


def _read_metadata(path: Path) -> dict[str, Any]:
    return _parse_metadata(_read_bytes(path, MAX_JSON_BYTES), path)


def _parse_metadata(data: bytes, path: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelFileError(f"{path}: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    except RecursionError:
        raise ModelFileError(f"{path}: JSON nested too deeply") from None
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path}: must hold a JSON object")
    return metadata


def _build(data: bytes, metadata: dict[str, Any], npz_path: Path) -> TextModel:
    digest = metadata.pop(DIGEST_KEY, None)
    if not isinstance(digest, str):
        raise ModelFileError(f"{npz_path.with_suffix('.json')}: no {DIGEST_KEY!r} string")
    if hashlib.sha256(data).hexdigest() != digest:
        raise ModelFileError(
            f"{npz_path}: SHA-256 differs from {DIGEST_KEY} in the metadata "
            "(files from different models, or a damaged file)"
        )
    arrays = _read_arrays(data, npz_path)
    try:
        return TextModel.from_arrays(arrays, metadata)
    except ModelError as exc:
        raise ModelFileError(f"{npz_path}: {exc}") from None


def _read_arrays(data: bytes, path: Path) -> dict[str, npt.NDArray[Any]]:
    """Check each member's header, then load with ``np.load(allow_pickle=False)``."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: info for info in archive.infolist()}
            expected = {f"{name}.npy" for name in _EXPECTED}
            if set(members) != expected:
                missing = ", ".join(sorted(expected - set(members))) or "none"
                unexpected = ", ".join(sorted(set(members) - expected)) or "none"
                raise ModelFileError(
                    f"{path}: wrong members (missing: {missing}; unexpected: {unexpected})"
                )
            for name, (dtype, ndim, longest) in _EXPECTED.items():
                info = members[f"{name}.npy"]
                with archive.open(info) as member:
                    _check_header(member, info.file_size, name, dtype, ndim, longest, path)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in _EXPECTED}
    except ModelFileError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise ModelFileError(f"{path}: not a valid .npz (zip) file: {exc}") from None
    except (ValueError, OSError, EOFError, KeyError, NotImplementedError) as exc:
        # ValueError covers numpy's refusal of object (pickled) arrays and bad headers.
        raise ModelFileError(f"{path}: unreadable array data: {exc}") from None


def _check_header(
    member: Any,
    member_size: int,
    name: str,
    dtype: np.dtype[Any],
    ndim: int,
    longest: int,
    path: Path,
) -> None:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(member)
        if version == (1, 0):
            shape, fortran, found = fmt.read_array_header_1_0(
                member, max_header_size=MAX_HEADER_BYTES
            )
        elif version in ((2, 0), (3, 0)):
            shape, fortran, found = fmt.read_array_header_2_0(
                member, max_header_size=MAX_HEADER_BYTES
            )
        else:
            raise ModelFileError(f"{path}: array {name!r}: unsupported .npy version {version}")
    except ValueError as exc:
        raise ModelFileError(f"{path}: array {name!r}: bad .npy header: {exc}") from None
    if found.hasobject:
        raise ModelFileError(f"{path}: array {name!r} holds Python objects; refused (no pickle)")
    if found != dtype:
        raise ModelFileError(f"{path}: array {name!r} must be {dtype.name}, got {found}")
    if len(shape) != ndim:
        raise ModelFileError(f"{path}: array {name!r} must be {ndim}-D, got shape {shape}")
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count > longest:
        raise ModelFileError(
            f"{path}: array {name!r} has {count:,} entries; at most {longest:,} allowed"
        )
    if fortran and ndim > 1:
        raise ModelFileError(f"{path}: array {name!r}: Fortran order not supported")
    if count * dtype.itemsize > member_size:
        raise ModelFileError(f"{path}: array {name!r} is truncated")
