"""Image preprocessing on the host against on the device: the time from a decoded uint8 image to the pixel
rows the vision tower reads, on the device the model runs on.

    python benchmarks/preprocess.py [--out DIR]   # on the GPU: 448x448 and 1920x1080 images
    python benchmarks/preprocess.py --smoke       # anywhere: small images, the host routes

Routes (qvl's `ImageProcessor`, one image per call, the rows moved to the model's device and synchronized):
  pil (host)      PIL bicubic resize and numpy normalize, then the float32 rows copied to the device
  torch (host)    torchvision's resize and normalize in torch on the CPU, then the rows copied
  torch (device)  the uint8 image copied to the device and everything done there (`device="cuda"`)
Writes preprocess.json and preprocess.md: the median ms per route and image, and the largest difference of
each route's rows from torch (host)'s, in uint8 levels after normalizing (the GPU route resizes in float32, as
torchvision does there, so it may differ by a few levels at sharp edges).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness import CUDA, DEVICE, device_name, median_seconds  # noqa: E402
from benchmarks.model_peers import write_files  # noqa: E402
from qvl.processing import ImageProcessor, VisionProcessingConfig  # noqa: E402

FULL_SIZES = ((448, 448), (1080, 1920))  # (height, width)
SMOKE_SIZES = ((61, 97), (120, 160))


def routes() -> dict[str, VisionProcessingConfig]:
    out = {"pil (host)": VisionProcessingConfig(), "torch (host)": VisionProcessingConfig(resize_backend="torch")}
    if CUDA:
        out["torch (device)"] = VisionProcessingConfig(resize_backend="torch", device="cuda")
    return out


def image(height: int, width: int) -> np.ndarray:
    """A textured uint8 RGB image (smooth gradients and sharp edges, as photos have)."""
    y, x = np.mgrid[:height, :width]
    rng = np.random.default_rng(height * width)
    noise = rng.integers(0, 40, (height, width, 3))
    base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x ^ y) & 255], -1)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="small images")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args(argv)
    reps = 3 if args.smoke else 21
    rows = []
    for height, width in SMOKE_SIZES if args.smoke else FULL_SIZES:
        picture = image(height, width)
        level = 1 / 255 / min(VisionProcessingConfig().image_std)
        reference = None
        for name, cfg in routes().items():
            processor = ImageProcessor(cfg)

            def run(processor=processor, picture=picture):
                return processor([picture])["pixel_values"].to(DEVICE)

            seconds = median_seconds(run, reps=reps, warmup=2)
            pixels = run().float().cpu()
            reference = pixels if name == "torch (host)" else reference
            rows.append({"image": f"{width}x{height}", "route": name, "ms": seconds * 1e3,
                         "rows": pixels.shape[0], "pixels": pixels})
        for row in rows[-len(routes()):]:
            row["levels_from_torch_host"] = float((row.pop("pixels") - reference).abs().max() / level)
    meta = {"device": device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "reps": reps}
    lines = [f"Device: {meta['device']}; torch {torch.__version__}; {meta['date']}; median of {reps}", "",
             "| image | route | ms | patch rows | largest difference from torch (host), uint8 levels |",
             "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['image']} | {r['route']} | {r['ms']:.2f} | {r['rows']} | {r['levels_from_torch_host']:.1f} |"
              for r in rows]
    write_files(args.out, "preprocess", meta, rows, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
