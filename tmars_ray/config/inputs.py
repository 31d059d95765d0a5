"""Inputs and outputs (CLI group `io`): where the pool is, how its shards are laid out, where
the run folder goes, and the guards against hostile members."""

from __future__ import annotations

from dataclasses import dataclass

from tmars_ray.config.options import opt


@dataclass
class InputOptions:
    input: str | None = opt(
        None, "Pool to filter: a directory, glob, file, or s3://bucket/prefix of shards.", "io"
    )
    output: str | None = opt(None, "Run folder (local path or s3://...).", "io")
    input_format: str = opt(
        "auto",
        "Shard format: auto (by extension), webdataset or parquet.",
        "io",
        choices=["auto", "webdataset", "parquet"],
    )
    image_column: str = opt("image", "Parquet column with encoded image bytes.", "io")
    caption_column: str = opt("caption", "Parquet column with the caption.", "io")
    uid_column: str = opt("uid", "Parquet column with the DataComp uid (optional).", "io")
    key_column: str = opt("key", "Parquet column with the sample key (optional).", "io")
    max_image_pixels: int = opt(
        89_478_485, "Decompression-bomb guard: images with more pixels get status too_large.", "io"
    )
    max_member_bytes: int = opt(
        32 * 2**20,
        "Tar members (image, caption, json) larger than this many bytes are never read: the "
        "sample gets status too_large. Default 32 MiB fits any real JPEG.",
        "io",
    )
