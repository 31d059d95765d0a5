"""`tmars inspect`: the per-sample work of the job on a few local images, no Ray.

Runs the same classes as the pipeline's actors (detector, masking, CLIP scorer), so what it
prints is what the job would write for these images.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from tmars_ray.config import Config
from tmars_ray.data.decode import decode_image


def inspect_images(
    paths: list[str], caption: str, cfg: Config, save_masked: str | None = None
) -> Iterator[dict[str, Any]]:
    from PIL import Image

    from tmars_ray.models.clip import ClipScorer, model_specs
    from tmars_ray.models.detect import TextDetector, flatten_polygons
    from tmars_ray.models.mask import mask_text

    detector = TextDetector(cfg, verify_min_chars=cfg.det_min_text_chars)
    scorer = ClipScorer(model_specs(cfg)[0], cfg.device, cfg.precision, cfg.clip_batch_size)
    if save_masked:
        os.makedirs(save_masked, exist_ok=True)
    for path in paths:
        record: dict[str, Any] = {"image": path}
        with open(path, "rb") as f:
            image, status = decode_image(f.read(), cfg.max_image_pixels)
        record["status"] = status
        if image is None:
            yield record
            continue
        det = detector.detect([image])[0]
        if det.error:
            yield {**record, "status": "detect_error", "error": det.error}
            continue
        masked = mask_text(image, det.polygons, cfg.mask_ring)
        clip, tmars = scorer.score(
            [image], [masked.masked if masked.n_text_boxes else None], [caption]
        )
        record.update(
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            boxes=flatten_polygons(det.polygons),
            n_text_boxes=masked.n_text_boxes,
            text_area=round(float(masked.text_area), 6),
            clip_score=float(clip[0]),
            tmars_score=float(tmars[0]),
            clip_model=scorer.identifier,
            random_weights=scorer.is_random,
        )
        if save_masked:
            stem = os.path.splitext(os.path.basename(path))[0]
            out = os.path.join(save_masked, f"{stem}.png")
            Image.fromarray(masked.masked).save(out)
            record["masked_image"] = out
        yield record
