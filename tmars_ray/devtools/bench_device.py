"""Offline device benchmark of the fused T-MARS stage (`make bench-device`; DESIGN 7, issue 23).

Made for a GPU node with no network and no Ray: the stage code is engine-free, so this runs
`models.gpu_step.DeviceTmarsStep` in process. It makes a random ViT-B-32 there (the same
compute as the real one), generates a DataComp-like pool there (JPEG q90, longest side 320-512
px, a third with text), warms up, measures for `--seconds`, and prints one JSON line:
samples_per_s counts status-ok rows only, start-up and warm-up excluded; gpu_busy is the share
of the window the GPU was busy (NVML through torch, else nvidia-smi); host_ms_per_sample is
this process's CPU time per sample; an agreement check against the CPU path (ONNX Runtime
detector, CLIP in fp32) on 64 samples. `BENCH_OUT=path` also writes the JSON there.

    python -m tmars_ray.devtools.bench_device [--seconds 60] [--samples 2000]
    python -m tmars_ray.devtools.bench_device --smoke   # this CPU, tiny model, < 2 minutes
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from multiprocessing import Pool
from typing import Any

import numpy as np

AGREE_SAMPLES = 64
# modules that do not exist on the offline GPU node: importing one would break the benchmark
ABSENT_THERE = ("ray", "paddleocr", "paddle", "s3fs", "onnxruntime_gpu")


# ---------------------------------------------------------------------------------------------
# the pool


def _one_sample(args: tuple[int, int, bool]) -> tuple[bytes, str, bool] | None:
    """Sample `index` as DataComp-like JPEG bytes, or None when its text flag is not `want`."""
    from PIL import Image

    from tmars_ray.devtools.synth import generate_sample

    seed, index, want_text = args
    s = generate_sample(seed, index)
    if bool(s.lines) != want_text:
        return None
    rng = np.random.default_rng([seed, index, 7])
    longest = int(rng.integers(320, 513))
    h, w = s.image.shape[:2]
    scale = longest / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    buf = io.BytesIO()
    Image.fromarray(s.image).resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue(), s.caption, want_text


def make_pool(n: int, seed: int = 0, workers: int = 1) -> tuple[list[bytes], list[str], int]:
    """(JPEG bytes, captions, how many carry text): a third with text, in generation order."""
    want = [k % 3 == 0 for k in range(n)]
    datas: list[bytes] = []
    captions: list[str] = []
    with_text = 0
    index = 0
    with Pool(max(1, workers)) as pool:
        for need_text in (True, False):
            count = sum(w == need_text for w in want)
            got = 0
            while got < count:
                batch = [(seed, index + k, need_text) for k in range(4 * (count - got))]
                index += len(batch)
                for res in pool.map(_one_sample, batch, chunksize=8):
                    if res is not None and got < count:
                        datas.append(res[0])
                        captions.append(res[1])
                        with_text += res[2]
                        got += 1
    order = np.random.default_rng(seed).permutation(n)  # text and no text interleaved
    return [datas[i] for i in order], [captions[i] for i in order], with_text


# ---------------------------------------------------------------------------------------------
# agreement with the CPU path


def _rect(b: Sequence[float]) -> tuple[float, float, float, float]:
    p = np.asarray(b, np.float64).reshape(-1, 2)
    return p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    a, b = _rect(a), _rect(b)
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union if union > 0 else 1.0


def same_boxes(a: Sequence, b: Sequence, iou: float = 0.8) -> bool:
    """As many boxes, each overlapping one of the other's by `iou` (DB's threshold turns tiny
    probability-map differences into 1-px shifts)."""
    return len(a) == len(b) and all(max(_iou(p, q) for q in b) >= iou for p in a)


def agreement(step: Any, datas: list[bytes], captions: list[str], spec: Any) -> dict[str, Any]:
    """The device step against the CPU path (ONNX Runtime detector, CLIP fp32 on the CPU)."""
    from tmars_ray.data.decode import decode_image
    from tmars_ray.models.settings import DetectorSettings, ScorerSettings, TmarsSettings
    from tmars_ray.models.tmars import TmarsStep

    got = step(datas, captions)
    ref_step = TmarsStep(
        TmarsSettings(DetectorSettings(device="cpu"), [spec], ScorerSettings("cpu", "fp32", 64))
    )
    ref = ref_step([decode_image(d, 1 << 28)[0] for d in datas], captions)
    both = [(g, r) for g, r in zip(got, ref) if g.status == r.status == "ok"]
    agree = [(g, r) for g, r in both if same_boxes(g.boxes, r.boxes)]

    def worst(pairs: list, col: str) -> float:
        return float(max((abs(g.scores[col] - r.scores[col]) for g, r in pairs), default=0.0))

    return {
        "samples": len(datas),
        "same_status": sum(g.status == r.status for g, r in zip(got, ref)),
        "same_boxes_share": round(len(agree) / max(len(both), 1), 4),
        "max_clip_score_diff": worst(both, "clip_score"),  # no masking involved
        "max_tmars_score_diff": worst(agree, "tmars_score"),  # where the boxes agree
        "max_tmars_score_diff_all": worst(both, "tmars_score"),
    }


# ---------------------------------------------------------------------------------------------
# GPU busy share


class BusySampler:
    """Polls the GPU's utilisation (NVML through torch, else nvidia-smi) every 100 ms."""

    def __init__(self, device: str) -> None:
        self.device, self.samples, self.method = device, [], None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> float | None:
        import torch

        if self.method in (None, "nvml"):
            try:
                value = float(torch.cuda.utilization())
                self.method = "nvml"
                return value
            except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi
                self.method = "nvidia-smi"
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5,
            )  # fmt: skip
            return float(out.stdout.split()[0])
        except Exception:  # noqa: BLE001 - nothing to read from
            self.method = "unavailable"
            return None

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            value = self._read()
            if value is None:
                return
            self.samples.append(value / 100.0)

    def __enter__(self) -> BusySampler:
        if self.device == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    @property
    def busy(self) -> float | None:
        return round(float(np.mean(self.samples)), 3) if self.samples else None


# ---------------------------------------------------------------------------------------------
# the measurement


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def measure(step: Any, datas: list[bytes], captions: list[str], args: argparse.Namespace):
    """Threads feed the step batch after batch (the pool cycled) until the window ends."""
    import torch

    batches = [(i, min(i + args.batch, len(datas))) for i in range(0, len(datas), args.batch)]
    lock, cursor = threading.Lock(), [0]
    counts = {"ok": 0, "other": 0}

    def worker(deadline: float) -> None:
        while time.perf_counter() < deadline:
            with lock:
                a, b = batches[cursor[0] % len(batches)]
                cursor[0] += 1
            out = step(datas[a:b], captions[a:b])
            ok = sum(s.status == "ok" for s in out)
            with lock:
                counts["ok"] += ok
                counts["other"] += len(out) - ok

    def window(seconds: float) -> float:
        deadline = time.perf_counter() + seconds
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.threads) as pool:
            for f in [pool.submit(worker, deadline) for _ in range(args.threads)]:
                f.result()
        if step.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    window(args.warmup)  # kernels chosen, caches filled: not measured
    counts.update(ok=0, other=0)
    step.stage_s.clear()
    if step.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cpu0 = _cpu_seconds()
    with BusySampler(step.device) as busy:
        wall = window(args.seconds)
    cpu = _cpu_seconds() - cpu0
    n = counts["ok"] + counts["other"]
    return {
        "samples_per_s": round(counts["ok"] / wall, 1),
        "ok_rows": counts["ok"],
        "non_ok_rows": counts["other"],
        "window_s": round(wall, 1),
        "gpu_busy": busy.busy,
        "gpu_busy_method": busy.method,
        "host_ms_per_sample": round(1000 * cpu / max(n, 1), 3),
        "peak_gpu_mem_gb": (
            round(torch.cuda.max_memory_allocated() / 2**30, 2) if step.device == "cuda" else None
        ),
        # wall time of each phase summed over the feeding threads, per sample
        "stage_ms_per_sample": {k: round(1000 * v / max(n, 1), 3) for k, v in step.stage_s.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="this CPU, the tiny demo model, 64 samples")
    p.add_argument("--samples", type=int, default=2000, help="pool size (>= 2,000 on the GPU)")
    p.add_argument("--seconds", type=float, default=60.0, help="measured window")
    p.add_argument("--warmup", type=float, default=15.0, help="unmeasured warm-up (seconds)")
    p.add_argument("--batch", type=int, default=256, help="samples per step call")
    p.add_argument("--threads", type=int, default=0, help="feeding threads (0: cores / 2, <= 8)")
    p.add_argument("--precision", default="fp16", choices=["fp16", "bf16", "fp32"])
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from tmars_ray.models.clip import DEMO_MODEL
    from tmars_ray.models.gpu_step import DeviceTmarsStep
    from tmars_ray.models.settings import ClipSpec, DetectorSettings, ScorerSettings

    cores = os.cpu_count() or 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.samples, args.seconds, args.warmup, args.batch = AGREE_SAMPLES, 5.0, 1.0, 16
        spec = ClipSpec(DEMO_MODEL, DEMO_MODEL)
    elif device != "cuda":
        sys.exit("bench-device: torch sees no GPU (use --smoke for the CPU check)")
    else:
        spec = ClipSpec("ViT-B-32", None, allow_random=True, seed=0)  # same compute as real
    args.threads = args.threads or max(1, min(8, cores // 2))
    t0 = time.perf_counter()
    datas, captions, with_text = make_pool(args.samples, workers=cores)
    pool_s = time.perf_counter() - t0
    precision = args.precision if device == "cuda" else "fp32"
    step = DeviceTmarsStep(
        DetectorSettings(device=device, threads=1),
        [spec],
        ScorerSettings(device, precision, args.batch),
        device=device,
        det_precision=precision,
    )
    startup_s = time.perf_counter() - t0 - pool_s
    agree = agreement(step, datas[:AGREE_SAMPLES], captions[:AGREE_SAMPLES], spec)
    result = {
        "bench": "device-smoke" if args.smoke else "device",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu ({platform.machine()})",
        "cores": cores,
        "torch": torch.__version__,
        "model": spec.identifier,
        "precision": precision,
        "pool": {"samples": len(datas), "with_text": with_text, "jpeg_quality": 90},
        "batch": args.batch,
        "threads": args.threads,
        "pool_s": round(pool_s, 1),
        "startup_s": round(startup_s, 1),
        **measure(step, datas, captions, args),
        "agreement": agree,
        "agreement_ok": agree["same_boxes_share"] >= 0.95
        and agree["max_tmars_score_diff"] <= (1e-4 if precision == "fp32" else 1e-2),
    }
    absent = [m for m in ABSENT_THERE if m in sys.modules]
    if absent:  # the GPU node does not have them: the benchmark must not need them
        sys.exit(f"bench-device imported {absent}, which the offline GPU node lacks")
    line = json.dumps(result, sort_keys=True)
    print(line)
    if os.environ.get("BENCH_OUT"):
        with open(os.environ["BENCH_OUT"], "w") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
