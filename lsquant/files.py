"""Small file helpers shared by the recipes, the metrics, the exporter and the models: atomic writes and line-based text
I/O (plain or gzip). One copy, so every artefact lsquant writes is either complete or absent."""
from __future__ import annotations

import contextlib
import gzip
import os
import tempfile
from pathlib import Path
from typing import IO, Iterable, Iterator

TMP_PREFIX = ".tmp-"  # temp files of interrupted atomic writes start with this; safe to delete


def _fsync_dir(directory: Path) -> None:
    """Persist a rename: on POSIX the new directory entry is durable only once the directory is fsynced."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename itself is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (h5py, torch.save); on a
    clean exit fsync it and ``os.replace`` it onto ``path``; on an exception delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit flush, fsync and ``os.replace`` it
    onto ``path``; on an exception delete it. A crash at any moment leaves either the old file or the new
    one under ``path``, never a partial one (the temp file lives in the same directory because a rename is
    atomic only within one file system).

    mode: "wb" or "w" (text; encoding defaults to utf-8).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode must be 'w' or 'wb', got {mode!r}")
    with atomic_path(path) as tmp, open(tmp, mode, encoding=(encoding or "utf-8") if mode == "w" else None) as f:
        yield f
        f.flush()


def open_text(path: str | os.PathLike, mode: str = "rt") -> IO[str]:
    """Open a UTF-8 text file, transparently gunzipping when the name ends in ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return gzip.open(path, mode, encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_lines(path: str | os.PathLike, strip: bool = True) -> list[str]:
    """All lines of a UTF-8 text file (``.gz`` accepted), without line endings.

    strip: also strip surrounding whitespace (sentence files: trailing spaces carry no meaning and would
    otherwise become tokens). Empty lines are kept, so line i stays line i (parallel files align by line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        with open_text(path) as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it with iconv -t utf-8") from e
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a truncated .gz raises EOFError
        raise ValueError(f"cannot read {path}: {e} (corrupt or truncated gzip?)") from e
    if lines and lines[-1] == "":  # the final newline ends the last line; it does not start a new one
        lines.pop()
    return [line.strip() if strip else line.rstrip("\r") for line in lines]


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """Write one line per item (UTF-8, ``\\n`` endings; gzip when the name ends in ``.gz``), atomically."""
    path = Path(path)
    lines = list(lines)
    bad = next((i for i, s in enumerate(lines) if "\n" in s or "\r" in s), None)
    if bad is not None:
        raise ValueError(f"write_lines({path}): item {bad} contains a line break: {lines[bad]!r}")
    data = "".join(s + "\n" for s in lines).encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)  # mtime=0: identical content gives identical bytes
    with atomic_write(path, "wb") as f:
        f.write(data)
    return path
