"""The score table's contract : column names, types and sample statuses.

Every module that reads or writes score rows takes names and types from here.
"""

from __future__ import annotations

import pyarrow as pa

# Sample statuses: `ok`, or the precise reason a sample could not be scored.
OK = "ok"
DECODE_ERROR = "decode_error"  # bytes are not a decodable image (corrupt, truncated, not an image)
EMPTY_IMAGE = "empty_image"  # zero-byte image member / null image cell
NO_IMAGE = "no_image"  # no image member (tar) / no image column (parquet)
NO_CAPTION = "no_caption"  # caption missing or empty after stripping
BAD_CAPTION = "bad_caption"  # caption bytes are not UTF-8
TOO_LARGE = "too_large"  # decompression-bomb guard: more pixels than max_image_pixels
DETECT_ERROR = "detect_error"  # detector failed on this image
SCORE_ERROR = "score_error"  # CLIP failed on this image
OOM = "oom"  # the device ran out of memory on this sample alone (its batch was split down to it)
DUPLICATE_UID = "duplicate_uid"  # uid already seen earlier in the same shard
TRUNCATED = "truncated"  # the sample being read where its tar is damaged: members may be lost
WORKER_CRASH = "worker_crash"  # its model worker died on it repeatedly (isolated poison sample)
SAMPLE_STATUSES = (
    OK,
    DECODE_ERROR,
    EMPTY_IMAGE,
    NO_IMAGE,
    NO_CAPTION,
    BAD_CAPTION,
    TOO_LARGE,
    DETECT_ERROR,
    SCORE_ERROR,
    OOM,
    DUPLICATE_UID,
    TRUNCATED,
    WORKER_CRASH,
)

# Shard-level statuses, recorded in the manifest (not rows): why a shard ended early.
SHARD_OK = "ok"
SHARD_TRUNCATED = "truncated_tar"  # rows read before the damage are kept
SHARD_CORRUPT = "corrupt_tar"  # a garbled member header mid-archive; rows before it are kept
SHARD_UNREADABLE = "unreadable_shard"  # could not be opened / parsed at all
SHARD_MISSING_COLUMN = "missing_column"  # parquet lacks the image/caption column (rows kept)
SHARD_EMPTY = "empty_shard"  # no samples: a zero-byte file, a tar without members, 0 rows
SHARD_MISSING = "missing_shard"  # listed, then gone before it could be read
SHARD_BAD_COLUMN = "bad_column_type"  # parquet image column holds no bytes (wrong type)
# A failed shard's samples are lost (its count may be unknown): never recorded as done, so a
# rerun retries it; the run fails unless --max-failed-shards allows it.
SHARD_FAILED = (SHARD_UNREADABLE, SHARD_MISSING_COLUMN, SHARD_MISSING, SHARD_BAD_COLUMN)
SHARD_STATUSES = (
    SHARD_OK,
    SHARD_TRUNCATED,
    SHARD_CORRUPT,
    SHARD_UNREADABLE,
    SHARD_MISSING_COLUMN,
    SHARD_EMPTY,
    SHARD_MISSING,
    SHARD_BAD_COLUMN,
)

SCORE_SCHEMA = pa.schema(
    [
        pa.field("uid", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("n_text_boxes", pa.int32()),
        pa.field("text_area", pa.float32()),
        pa.field("boxes", pa.list_(pa.list_(pa.float32()))),
        pa.field("clip_score", pa.float32()),
        pa.field("tmars_score", pa.float32()),
        # True when the sample had no valid DataComp uid and `uid` was derived from (shard, key)
        pa.field("derived_uid", pa.bool_(), nullable=False),
    ]
)

# Optional columns, present only when the run asked for them.
OCR_TEXT = pa.field("ocr_text", pa.string())  # recognised text of the boxes (text-match)
CLIP_SCORE_2 = pa.field("clip_score_2", pa.float32())  # second checkpoint, original image
TMARS_SCORE_2 = pa.field("tmars_score_2", pa.float32())  # second checkpoint, masked image
CAPTION = pa.field("caption", pa.string())  # the caption, kept with ocr_text for text-match
OPTIONAL_FIELDS = (OCR_TEXT, CAPTION, CLIP_SCORE_2, TMARS_SCORE_2)


def table_schema(columns: list[str] | None = None) -> pa.Schema:
    """Score schema plus whichever optional columns are named in `columns`."""
    schema = SCORE_SCHEMA
    for field in OPTIONAL_FIELDS:
        if columns and field.name in columns:
            schema = schema.append(field)
    return schema
