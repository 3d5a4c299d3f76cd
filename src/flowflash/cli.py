"""`flowflash` command line: thin verbs over the Python API. Any FlowflashError -> one line, exit 2."""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from .errors import FlowflashError


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
    return v


def nonneg_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own code for usage errors)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="flowflash", description="Few-step rectified-flow text-to-image, on the device.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images. Prompts longer than the text encoders take (24 words / "
                                   "24 MiniLM tokens) are truncated with one warning.")
    g.add_argument("prompt")
    g.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    g.add_argument("--guidance", type=nonneg_float, default=None, help="CFG scale, >= 0 (1 = no CFG; default: the model's)")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--num-images", type=positive_int, default=1)
    g.add_argument("--size", type=positive_int, default=None, help="image size in px (the model's only)")
    g.add_argument("--model", default=None, help="shipped model name (teacher) or a model folder")
    g.add_argument("--no-minilm", action="store_true", help="drop the large text encoder (MiniLM)")
    g.add_argument("-o", "--output", default=None, help="PNG file, or a directory (default: outputs/)")

    d = sub.add_parser("data", help="corpus tools")
    dsub = d.add_subparsers(dest="data_cmd", required=True, parser_class=Parser)
    b = dsub.add_parser("build", help="build the captioned emoji corpus")
    b.add_argument("--out", required=True)
    b.add_argument("--size", type=positive_int, default=64)
    b.add_argument("--seed", type=nonneg_int, default=0)
    b.add_argument("--scenes", type=nonneg_int, default=6000, help="compositional scenes to draw")
    b.add_argument("--cache", default=None, help="npm package cache (default ~/.cache/flowflash/npm)")

    t = sub.add_parser("train", help="training")
    tsub = t.add_subparsers(dest="train_cmd", required=True, parser_class=Parser)
    tt = tsub.add_parser("teacher", help="train the rectified-flow teacher")
    tt.add_argument("--config", required=True)
    tt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    tt.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in this run")
    return p


def cmd_generate(a) -> int:
    from .runtime.output import output_paths, parameters_text, save_png
    from .runtime.pipeline import Pipeline, validate_prompt

    prompt = validate_prompt(a.prompt)
    paths = output_paths(a.output, a.num_images)
    t0 = time.perf_counter()
    pipe = Pipeline.load(a.model, use_minilm=not a.no_minilm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = pipe.generate(prompt, steps=a.steps, guidance=a.guidance, seed=a.seed,
                               num_images=a.num_images, size=a.size)
    for msg in dict.fromkeys(str(w.message) for w in caught if "truncated" in str(w.message)):
        print(f"warning: {msg}", file=sys.stderr)
    pp = pipe.last_params
    for img, path, seed in zip(images, paths, pp["seeds"]):
        save_png(img, path, parameters_text(prompt, pp["steps"], pp["guidance"], seed, pp["size"], pipe.name, pipe.hash))
    dt = time.perf_counter() - t0
    for path in paths:
        print(path)
    print(f"{len(images)} image(s) in {dt:.2f} s ({pipe.name}, {pp['steps']} steps, CFG {pp['guidance']:g})",
          file=sys.stderr)
    return 0


def cmd_data(a) -> int:
    from .data.build import build_corpus

    meta = build_corpus(Path(a.out), size=a.size, seed=a.seed, cache=a.cache, n_scenes=a.scenes)
    print(f"{meta['n_images']} images ({meta['n_train']} train, {meta['n_heldout']} held out), "
          f"{meta['n_concepts']} concepts -> {a.out}")
    return 0


def cmd_train(a) -> int:
    from .train.common import load_config
    from .train.teacher import TeacherConfig, train_teacher

    out = train_teacher(load_config(TeacherConfig, a.config), resume=a.resume, max_steps=a.max_steps)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "data": cmd_data, "train": cmd_train}[a.cmd](a)
    except FlowflashError as e:
        print(f"flowflash: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
