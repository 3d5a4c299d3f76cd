"""Write a tiny random-weight SD3 / SD3.5 diffusers pipeline folder: offline, in about a second, under 1 MB.

    python scripts/make_sd3_fixture.py OUT [--variant sd3.5-medium] [--seed 0] [--no-t5] [--single-file PATH]

Load it with StableDiffusion3Pipeline.from_pretrained(OUT, local_files_only=True) (add text_encoder_3=None,
tokenizer_3=None for --no-t5). --single-file also writes the transformer as one .safetensors (diffusers keys).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the fixture is built locally; nothing may reach a hub
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # works without an installed package

from flowflash.testing.sd3_fixture import VARIANTS, write_single_file, write_tiny_sd3  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="pipeline folder to write")
    ap.add_argument("--variant", choices=VARIANTS, default="sd3.5-medium")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-size", type=int, default=32, help="transformer's default latent side")
    ap.add_argument("--no-t5", action="store_true", help="leave out text_encoder_3/tokenizer_3")
    ap.add_argument("--t5-ff", type=int, default=None,
                    help="T5 feed-forward width (e.g. 400000: a T5 of ~200 MB that dominates the folder, as T5-XXL does)")
    ap.add_argument("--single-file", type=Path, help="also write the transformer as one .safetensors here")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    folder = write_tiny_sd3(args.out, variant=args.variant, seed=args.seed, sample_size=args.sample_size,
                            with_t5=not args.no_t5, t5_ff=args.t5_ff)
    if args.single_file:
        write_single_file(folder, args.single_file)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    print(f"{args.variant} (seed {args.seed}) -> {folder}: {size / 1e6:.2f} MB in {time.perf_counter() - start:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
