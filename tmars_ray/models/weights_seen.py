"""Weights checks that already passed on this machine, so a rerun skips the check's child
interpreter (importing torch and open_clip: 6-9 s of a 2-core driver on every resume, re-filter
or submitted job, where Ray's start no longer hides it).

An entry says: this CLIP spec (model name or config file, pretrained tag or checkpoint) resolved
to this local weights file under this open_clip and tmars-ray. It stands only while the weights
file - and a config file the spec names - is unchanged (`file_hash.file_key`: path, size, mtime,
ctime, inode). Only passes are remembered, never failures or random weights: a spec whose
entry does not stand is checked again in full. The file sits next to the content-hash cache
(`<cache dir>/weights-checked.json`); one that cannot be read or written only costs a check.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tmars_ray.models.file_hash import file_key, read_cache, write_cache
from tmars_ray.models.modeldir import default_cache_dir
from tmars_ray.models.settings import ClipSpec
from tmars_ray.models.versions import library_versions

CACHE_FILE = "weights-checked.json"
MAX_ENTRIES = 64


def _path(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir or default_cache_dir()) / CACHE_FILE


def _identity(path: str) -> str | None:
    try:
        return file_key(path)
    except OSError:
        return None


def spec_key(spec: ClipSpec) -> str:
    """What the check's answer depends on besides the weights file itself."""
    versions = library_versions(("open_clip_torch", "tmars-ray"))
    model = spec.model
    if model.endswith(".json") and os.path.exists(model):
        model = f"{model}@{_identity(model)}"  # an edited config is checked again
    return "|".join(
        [model, str(spec.pretrained), *(f"{k}={v}" for k, v in sorted(versions.items()))]
    )


def passed(specs: Sequence[ClipSpec], cache_dir: str | Path | None = None) -> bool:
    """True when every spec's check passed before and its files are unchanged since."""
    entries = read_cache(_path(cache_dir))
    for spec in specs:
        entry = entries.get(spec_key(spec))
        if not isinstance(entry, dict) or not entry.get("weights"):
            return False
        if _identity(entry["weights"]) != entry.get("identity"):
            return False
    return bool(specs)


def remember(spec: ClipSpec, weights: str, cache_dir: str | Path | None = None) -> None:
    """Record that `spec`'s check passed with its weights at the local file `weights`."""
    identity = _identity(weights)
    if identity is None or not os.path.isfile(weights):
        return  # a folder or a remote name: nothing whose change could be noticed
    where = _path(cache_dir)
    entries = read_cache(where)
    key = spec_key(spec)
    entries.pop(key, None)
    entries[key] = {"weights": os.path.realpath(weights), "identity": identity}  # last = newest
    write_cache(where, dict(list(entries.items())[-MAX_ENTRIES:]))
