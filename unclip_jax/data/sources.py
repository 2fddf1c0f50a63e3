"""Readers for image-text data as users have it: a folder of images with same-named .txt
captions, or webdataset tar shards as img2dataset writes them.

Both yield `RawExample`s (key, encoded image bytes, caption or None) without decoding; the
dataset builder decodes, checks and counts what it skips.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tarfile
from collections.abc import Iterator

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


@dataclasses.dataclass(frozen=True)
class RawExample:
    """One image-text pair before decoding: caption None when the source has none."""

    key: str
    image_bytes: bytes
    caption: str | None


class SourceError(ValueError):
    """A missing, empty or unreadable data source, named in the message."""


def _caption_from_json(raw: bytes) -> str | None:
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption if isinstance(caption, str) else None


def _clean(caption: str | None) -> str | None:
    if caption is None:
        return None
    caption = " ".join(caption.split())
    return caption or None


def iter_folder(path: str) -> Iterator[RawExample]:
    """Images under `path` (recursively), each with the caption in the same-named .txt file.

    The key is the image's path relative to `path`, without its extension.
    """
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in IMAGE_EXTENSIONS:
                continue
            image_path = os.path.join(root, name)
            caption_path = os.path.join(root, stem + ".txt")
            caption = None
            if os.path.exists(caption_path):
                # utf-8-sig: a byte-order mark is not part of the caption.
                with open(caption_path, encoding="utf-8-sig", errors="replace") as f:
                    caption = _clean(f.read())
            with open(image_path, "rb") as f:
                image_bytes = f.read()
            key = os.path.splitext(os.path.relpath(image_path, path))[0]
            yield RawExample(key=key, image_bytes=image_bytes, caption=caption)


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _tar_paths(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    return sorted(
        os.path.join(root, name)
        for root, _, files in os.walk(path)
        for name in files
        if name.endswith(TAR_SUFFIXES)
    )


def _shard_name(tar_path: str, root: str) -> str:
    """The shard's path relative to the source root, without its suffix (unique per source)."""
    rel = os.path.relpath(tar_path, root) if os.path.isdir(root) else os.path.basename(tar_path)
    for suffix in TAR_SUFFIXES:
        if rel.endswith(suffix):
            return rel[: -len(suffix)]
    return rel


def iter_webdataset(path: str) -> Iterator[RawExample]:
    """Examples of webdataset shards (`path` a .tar or a folder of them), img2dataset style.

    Members are grouped by key (the name up to its first dot): `key.jpg|png|webp` is the
    image, `key.txt` the caption, else the "caption" field of `key.json`.
    """
    for tar_path in _tar_paths(path):
        try:
            archive = tarfile.open(tar_path)  # noqa: SIM115 - closed by the with below
        except (tarfile.TarError, OSError) as err:
            raise SourceError(f"cannot read webdataset shard {tar_path!r}: {err}") from err
        with archive:
            groups: dict[str, dict[str, bytes]] = {}
            order: list[str] = []
            for member in archive:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if base.startswith("."):
                    continue
                key, _, ext = base.partition(".")
                key = os.path.join(os.path.dirname(member.name), key)
                extracted = archive.extractfile(member)
                if extracted is None:
                    continue
                if key not in groups:
                    groups[key] = {}
                    order.append(key)
                groups[key][ext.lower()] = extracted.read()
            shard = _shard_name(tar_path, path)
            for key in order:
                parts = groups[key]
                image = next((parts[e[1:]] for e in IMAGE_EXTENSIONS if e[1:] in parts), None)
                if image is None:
                    continue  # metadata-only entries (e.g. failed downloads) have no image
                caption = (
                    _clean(parts["txt"].decode("utf-8-sig", "replace")) if "txt" in parts else None
                )
                if caption is None and "json" in parts:
                    caption = _caption_from_json(parts["json"])
                yield RawExample(key=f"{shard}/{key}", image_bytes=image, caption=_clean(caption))


def detect_format(path: str) -> str:
    """'webdataset' for a .tar or a folder holding .tar files, 'folder' for a folder of images.

    Raises SourceError for a missing path or one that holds neither.
    """
    if not os.path.exists(path):
        raise SourceError(f"data source not found: {path!r}")
    if os.path.isfile(path):
        if path.endswith(TAR_SUFFIXES):
            return "webdataset"
        raise SourceError(f"data source {path!r} is a file but not a .tar webdataset shard")
    if _tar_paths(path):
        has_images = any(
            os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
            for _, _, fs in os.walk(path)
            for f in fs
        )
        if has_images:
            raise SourceError(
                f"data source {path!r} holds both images and .tar shards: point it at one kind"
            )
        return "webdataset"
    for _, _, files in os.walk(path):
        if any(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files):
            return "folder"
    raise SourceError(
        f"data source {path!r} is empty: no images ({', '.join(IMAGE_EXTENSIONS)}) and no .tar "
        "shards in it"
    )


def iter_source(path: str) -> Iterator[RawExample]:
    """The examples of a folder or webdataset source, whichever `path` is."""
    if detect_format(path) == "webdataset":
        return iter_webdataset(path)
    return iter_folder(path)
