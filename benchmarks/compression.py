"""Lossless compression of the edge's real features: ratio and speed per codec.

    python benchmarks/compression.py [--dataset digits] [--epochs 1]

Trains the ResNet-8 edge model of partition 0 (of 3, IID, seed 42) for
``--epochs`` epochs (the features of round 1's upload), extracts the features of
its training split, encodes them in every wire dtype and compresses the bytes
with zstd at levels 1, 3 (the one :mod:`flwr_fedgkt.compression` uses) and 9, and
with zlib and lzma from the standard library for comparison. Prints, per wire
dtype and codec: bytes per sample, the ratio to the uncompressed wire bytes, and
compression and decompression speed in MB/s of uncompressed bytes (best of 3).
Also the share of exactly-zero feature values (post-ReLU).
"""

from __future__ import annotations

import argparse
import lzma
import time
import zlib
from collections.abc import Callable

import torch
import zstandard

from flwr_fedgkt.codec import FEATURE_DTYPES, encode_features
from flwr_fedgkt.data import load_partition
from flwr_fedgkt.edge import EdgeTrainer

MB = 1e6


def _best(fn: Callable[[], object], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def codecs() -> dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]]:
    out = {}
    for level in (1, 3, 9):
        cctx = zstandard.ZstdCompressor(level=level)
        dctx = zstandard.ZstdDecompressor()
        out[f"zstd-{level}"] = (cctx.compress, dctx.decompress)
    out["zlib-6"] = (lambda b: zlib.compress(b, 6), zlib.decompress)
    out["lzma-0"] = (lambda b: lzma.compress(b, preset=0), lzma.decompress)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    part = load_partition(args.dataset, 0, 3, "iid", seed=42)
    trainer = EdgeTrainer(10, device="cpu", seed=42)
    trainer.train(part.train, epochs=args.epochs, batch_size=32)
    features = trainer.extract(part.train).features
    n = len(features)
    zeros = float((features == 0).float().mean())
    print(
        f"{args.dataset}, partition 0 of 3: {n} training samples, features "
        f"{tuple(features.shape[1:])}, {zeros:.1%} of the values exactly zero"
    )
    print("wire dtype | codec   | bytes/sample | ratio | compress MB/s | decompress MB/s")
    for dtype in FEATURE_DTYPES:
        raw = encode_features(features, dtype).data.tobytes()
        print(f"{dtype:10s} | none    | {len(raw) / n:12.0f} | {1.0:5.2f} |             - |")
        for name, (pack, unpack) in codecs().items():
            packed = pack(raw)
            assert unpack(packed) == raw
            seconds_in = _best(lambda pack=pack, raw=raw: pack(raw))
            seconds_out = _best(lambda unpack=unpack, packed=packed: unpack(packed))
            print(
                f"{dtype:10s} | {name:7s} | {len(packed) / n:12.0f} | "
                f"{len(raw) / len(packed):5.2f} | {len(raw) / MB / seconds_in:13.0f} | "
                f"{len(raw) / MB / seconds_out:15.0f}"
            )


if __name__ == "__main__":
    main()
