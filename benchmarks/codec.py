"""Codec throughput: a ResNet-18-sized update through FLStore's codec next to plain zstd level 1.

Systems: ``codec-encode`` (serialize + sha256 + zstd), ``codec-decode`` (zstd straight into a
round-matrix row + sha256 + finiteness), ``zstd-compress`` and ``zstd-decompress`` (plain
zstandard level 1 on the same safetensors bytes). Metric ``throughput_mb_s`` of the raw bytes;
all four are interleaved in one run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import interleave, parser, summarize, timed, write_report
from flstore_core.data.codec import Update, decode_into, encode_update, serialize

RESNET18_PARAMS = 11_689_512


def resnet18_sized_update(seed: int = 0) -> Update:
    """Random float32 tensors adding up to ResNet-18's parameter count (a few realistic shapes)."""
    rng = np.random.default_rng(seed)
    conv = 512 * 512 * 3 * 3
    shapes = {f"layer{i}.conv.weight": (512, 512, 3, 3) for i in range(RESNET18_PARAMS // conv)}
    rest = RESNET18_PARAMS - len(shapes) * conv
    shapes["fc.weight"] = (rest,)
    tensors = {n: (rng.standard_normal(s) * 0.05).astype(np.float32) for n, s in shapes.items()}
    return Update(tensors, num_examples=500, metrics={"loss": 0.7})


def main() -> None:
    args = parser(__doc__ or "").parse_args()
    update = resnet18_sized_update()
    raw = serialize(update)
    mb = len(raw) / 1e6
    encoded = encode_update(update)
    row = np.empty(RESNET18_PARAMS, np.float32)
    cctx = zstandard.ZstdCompressor(level=1)
    dctx = zstandard.ZstdDecompressor()
    plain = cctx.compress(raw)

    systems = {
        "codec-encode": lambda: timed(lambda: encode_update(update)),
        "codec-decode": lambda: timed(
            lambda: decode_into(encoded.data, row, encoded.specs, expected_sha256=encoded.sha256)
        ),
        "zstd-compress": lambda: timed(lambda: cctx.compress(raw)),
        "zstd-decompress": lambda: timed(lambda: dctx.decompress(plain)),
    }
    samples = interleave(systems, args.repetitions)
    runs = []
    for system, ms in samples.items():
        throughput = [mb / (t / 1000.0) for t in ms]
        runs.append(
            {
                "system": system,
                "metric": "throughput_mb_s",
                **summarize(throughput),
                "params": RESNET18_PARAMS,
                "raw_mb": round(mb, 2),
                "compression_ratio": round(len(raw) / len(plain), 3),
            }
        )
    write_report("codec", runs, args.json)
    by = {r["system"]: r["p50"] for r in runs}
    for r in runs:
        print(f"{r['system']:>16}: p50 {r['p50']:8.1f} MB/s  p95 {r['p95']:8.1f} MB/s  n={r['n']}")
    print(f"codec-decode / zstd-decompress = {by['codec-decode'] / by['zstd-decompress']:.2f}x")
    print(f"codec-encode / zstd-compress   = {by['codec-encode'] / by['zstd-compress']:.2f}x")


if __name__ == "__main__":
    main()
