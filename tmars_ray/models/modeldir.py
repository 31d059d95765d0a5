"""Model directories for PaddleOCR models whose weights ship inside installed packages.

PaddleOCR loads a model from a directory holding the weights next to an `inference.yml`; the
directories are materialised here, once per node, into a per-user cache (no network).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["default_cache_dir", "packaged_file", "save_atomically", "write_model_dir"]


def default_cache_dir() -> Path:
    """`$TMARS_CACHE_DIR`, else `$XDG_CACHE_HOME/tmars-ray`, else `~/.cache/tmars-ray`."""
    if os.environ.get("TMARS_CACHE_DIR"):
        return Path(os.environ["TMARS_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tmars-ray"


def save_atomically(path: Path, data: bytes) -> bool:
    """Write a per-machine cache file by atomic replace (a reader never sees half of it).
    False when it cannot be written (read-only home...): a cache that is not kept only costs
    the work again."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return True
    except OSError:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        return False


def packaged_file(package: str, relpath: str) -> Path:
    """Path of a data file inside an installed package, with an install hint when missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package!r} is not installed; it ships the model weights")
    path = Path(next(iter(spec.submodule_search_locations))) / relpath
    if not path.is_file():
        raise RuntimeError(f"{path} not found: the installed {package!r} lacks the model file")
    return path


def write_model_dir(
    kind: str,
    name: str,
    files: dict[str, Path],
    texts: dict[str, str],
    cache_dir: str | Path | None,
) -> Path:
    """Materialise a model directory (copied `files` + written `texts`) in the cache, atomically.

    The folder name carries a hash of the contents, so a changed package or yml gets a new
    folder; concurrent actors on one node each build in a private temp dir and rename it into
    place - the first rename wins, the others discard theirs.
    """
    digest = hashlib.sha256()
    for dst, src in sorted(files.items()):
        digest.update(dst.encode())
        digest.update(src.read_bytes())
    for dst, text in sorted(texts.items()):
        digest.update(dst.encode())
        digest.update(text.encode())
    roots = (
        [Path(cache_dir)]
        if cache_dir
        else [default_cache_dir(), Path(tempfile.gettempdir()) / "tmars-ray"]
    )
    last_error: Exception | None = None
    for root in roots:
        target = root / kind / f"{name}-{digest.hexdigest()[:12]}"
        if all((target / f).is_file() for f in [*files, *texts]):
            return target
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        except OSError as e:  # read-only home etc.: try the next root
            last_error = e
            continue
        try:
            for dst, src in files.items():
                shutil.copyfile(src, tmp / dst)
            for dst, text in texts.items():
                (tmp / dst).write_text(text)
            try:
                os.rename(tmp, target)
            except OSError:
                if not target.is_dir():  # not a lost race: a real failure
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    raise RuntimeError(f"cannot write a model directory under {roots}: {last_error}")
