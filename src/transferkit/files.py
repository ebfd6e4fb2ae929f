"""Where transferkit keeps its caches, and atomic writes: a file is either the old one or the complete new one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The user cache folder (``$TRANSFERKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/transferkit``, else ``~/.cache``)."""
    root = os.environ.get("TRANSFERKIT_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "transferkit")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside ``target``; on success it is renamed over ``target``, on error removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix or target.suffix, dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically; a file name that is not UTF-8 (its undecodable bytes
    arrive as lone surrogates) is written with those bytes escaped, never a crash."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="backslashreplace")


def write_json_atomic(target: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented UTF-8 JSON (accents kept as they are) atomically; strings holding a non-UTF-8
    file name are \\u-escaped, so reading the file back gives the same name."""
    write_text_atomic(target, json_text(obj) + "\n")


def json_text(obj, indent: int | None = 2) -> str:
    """``obj`` as JSON with accents kept, unless a string holds a non-UTF-8 file name: then \\u-escaped."""
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, indent=indent, ensure_ascii=True)
    return text


def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b hex digest of a file's bytes: the identity of an image or a weights file in the caches."""
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: str | os.PathLike) -> tuple[str, int]:
    """(the stat stamp, the mtime in ns)."""
    st = os.stat(path)
    text = f"{os.path.realpath(path)}|{st.st_dev}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}"
    return text, st.st_mtime_ns


def known_digest(path: str | os.PathLike) -> str:
    """``file_digest`` of a large file read again and again (a model file, a cached conversion), remembered by its
    stat stamp (real path, device, inode, size, mtime and ctime in ns, as git's index and ccache do): hashing the
    20 MB Lite0 model file and its 20 MB conversion took 0.1 s of the 0.56 s that one cached prediction took.
    Any write to the file (a new save, a torn or damaged copy, even one that restores the mtime) changes its
    ctime or size, so it is hashed again. A file modified in the last two seconds is not remembered (a timestamp
    too coarse to tell two writes apart)."""
    before, mtime_ns = _stamp(path)
    memo = cache_dir("digests") / f"{bytes_digest(before.encode('utf-8', 'surrogateescape'))[:32]}.sum"
    found = read_checked(memo)
    if found is not None and len(found) == 40:
        return found.decode("ascii")
    digest = file_digest(path)
    if _stamp(path)[0] == before and time.time_ns() - mtime_ns > 2_000_000_000:
        with contextlib.suppress(OSError):
            write_checked(memo, digest.encode("ascii"))
    return digest


CHECK_TAG = b"TKSUM1"  # trailer of a checked cache file: tag + 20-byte BLAKE2b of everything before it
_TRAILER = len(CHECK_TAG) + 20


def _blake2b(data: bytes):
    return hashlib.blake2b(data, digest_size=20)


def bytes_digest(data: bytes) -> str:
    return _blake2b(data).hexdigest()


def write_checked(target: str | os.PathLike, payload: bytes) -> None:
    """Write ``payload`` atomically with a checksum trailer, so a later reader can tell a damaged cache file (a
    flipped bit, a torn write on a full disk) from a good one."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(payload + CHECK_TAG + _blake2b(payload).digest())


def read_checked(path: str | os.PathLike) -> bytes | None:
    """The payload of a file written by :func:`write_checked`, or None when it is absent or damaged."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        return None
    body, tag, digest = data[:-_TRAILER], data[-_TRAILER:-20], data[-20:]
    if len(data) < _TRAILER or tag != CHECK_TAG or _blake2b(body).digest() != digest:
        return None
    return body
