"""`flowflash` command line: thin verbs over the Python API. Any FlowflashError -> one line, exit 2."""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

from .errors import FlowflashError

_START = time.perf_counter()  # the CLI's own start, so reported times include importing torch/diffusers


def _number(parse, ok, what: str):
    """An argparse type: parse, then check; one message for both failures."""
    def convert(s: str):
        try:
            v = parse(s)
        except ValueError:
            v = None
        if v is None or not ok(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return convert


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
nonneg_int = _number(int, lambda v: v >= 0, "a non-negative integer")
nonneg_float = _number(float, lambda v: 0 <= v < float("inf"), "a number >= 0")


def _seed_list(s: str) -> list[int] | None:
    try:
        seeds = [int(x) for x in s.split(",")]
    except ValueError:
        return None
    return seeds if seeds and min(seeds) >= 0 and len(set(seeds)) == len(seeds) else None


def _float_list(s: str) -> list[float] | None:
    try:
        return [float(x) for x in s.split(",")]
    except ValueError:
        return None


# checked as a schedule by the Pipeline (one message for a bad order, wherever the times come from)
time_list = _number(_float_list, lambda v: True, "times separated by commas, e.g. 1,0.6,0")
TIMESTEPS_HELP = ("the times to integrate, from 1 (noise) down to 0, e.g. 1,0.6,0; in place of --steps and the "
                  "model's own schedule")

seed_list = _number(_seed_list, lambda v: True, "distinct non-negative seeds separated by commas, e.g. 0,1000,2000")


def size_arg(s: str) -> int | tuple[int, int]:
    """N (square) or WxH."""
    try:
        parts = [int(p) for p in s.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a size N or WxH in pixels, got {s!r}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own code for usage errors)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="flowflash", description="Few-step rectified-flow text-to-image, on the device.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)

    g = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images. Prompts longer than the text encoders take (emoji models: "
                                   "24 words / 24 MiniLM tokens; SD3: 77 CLIP tokens, --max-sequence-length T5 "
                                   "tokens) are truncated with one warning.")
    g.add_argument("prompt")
    gs = g.add_mutually_exclusive_group()
    gs.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: the model's)")
    gs.add_argument("--timesteps", type=time_list, default=None, help=TIMESTEPS_HELP)
    g.add_argument("--guidance", type=nonneg_float, default=None,
                   help="CFG scale, >= 0 (<= 1: no CFG; default: the model's)")
    g.add_argument("--seed", type=nonneg_int, default=0)
    g.add_argument("--num-images", type=positive_int, default=1)
    g.add_argument("--size", type=size_arg, default=None, help="image size, N or WxH px (default: the model's)")
    g.add_argument("--model", default=None, help="shipped model name (student: the default, 4 steps, no CFG; "
                   "teacher: 50 steps, CFG 4), a model folder, a diffusers StableDiffusion3Pipeline folder, or a "
                   "single .safetensors transformer checkpoint (with --config)")
    g.add_argument("--config", default=None, metavar="FOLDER",
                   help="a local diffusers SD3 folder giving the configs (and other components) of a single-file --model")
    g.add_argument("--negative-prompt", default=None, help="what the unconditional CFG branch encodes (with CFG)")
    g.add_argument("--init-image", default=None, metavar="FILE", help="img2img: start from this image")
    g.add_argument("--strength", type=float, default=0.8,
                   help="img2img: how far into the schedule to start, in (0, 1] (1 = from pure noise; default 0.8)")
    g.add_argument("--drop", action="append", default=[], metavar="ENCODER",
                   help="leave out this text encoder (emoji: light, minilm; SD3: t5, clip_g, clip_l); repeatable")
    g.add_argument("--no-minilm", action="store_true", help="drop the large text encoder (same as --drop minilm)")
    g.add_argument("--as-typed", action="store_true", help="draw a prompt that names no style as typed (a model whose "
                   "config names a default_style appends it otherwise, where the text encoders take it whole; the "
                   "PNG records the prompt drawn)")
    g.add_argument("--max-sequence-length", type=positive_int, default=256, help="T5 tokens (SD3; diffusers' 256)")
    g.add_argument("--profile", choices=["auto", "tiny", "laptop", "desktop", "gpu"], default=None,
                   help="device, dtype, threads, batch size and encoders for this kind of machine (flags given "
                        "explicitly win; `flowflash doctor` shows what auto picks); default: cpu, fp32, batches of 8")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default=None, help="default cpu")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="denoiser dtype (default fp32)")
    g.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help=argparse.SUPPRESS)  # old name
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the transformer (and on CUDA an SD3 VAE decoder), for many images in one "
                        "process")
    g.add_argument("--backend", choices=["torch", "openvino"], default=None,
                   help="the transformer's runtime (openvino: CPU, exported once and cached, for SD3 once per "
                        "size; needs the openvino extra); default torch")
    g.add_argument("--ov-weights", choices=["fp32", "int8", "int4"], default=None,
                   help="openvino weight compression (int8: the stored grid, same images within 1 level); default: "
                        "int8 for a flowflash model stored int8, else fp32")
    g.add_argument("--low-memory", action="store_true",
                   help="keep quantized weights int8 in memory (same images, smaller resident set)")
    g.add_argument("-o", "--output", default=None, help="PNG file, or a directory (default: outputs/)")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help="images denoised together; each batch is written before the next starts (default 8)")
    g.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's)")

    d = sub.add_parser("data", help="corpus tools")
    dsub = d.add_subparsers(dest="data_cmd", required=True, parser_class=Parser)
    b = dsub.add_parser("build", help="build the captioned emoji corpus")
    b.add_argument("--out", required=True)
    b.add_argument("--size", type=positive_int, default=64)
    b.add_argument("--seed", type=nonneg_int, default=0)
    b.add_argument("--scenes", type=nonneg_int, default=6000, help="compositional scenes to draw")
    b.add_argument("--cache", default=None, help="npm package cache (default ~/.cache/flowflash/npm)")
    b.add_argument("--categories", choices=["default", "wide"], default="default",
                   help="default: Smileys & Emotion, Animals & Nature, Food & Drink; wide: those plus Travel & "
                        "Places, Activities and Objects (no flags, keycaps, skin-tone or gender variants)")

    t = sub.add_parser("train", help="training")
    tsub = t.add_subparsers(dest="train_cmd", required=True, parser_class=Parser)
    tt = tsub.add_parser("teacher", help="train the rectified-flow teacher")
    tt.add_argument("--config", required=True)
    tt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    tt.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in this run")
    tt.add_argument("--until-step", type=positive_int, default=None, metavar="N",
                    help="stop at step N of the run (with --resume: wherever the checkpoint is)")
    te = tsub.add_parser("ship", help="copy a teacher run's EMA model (--run) or a distilled student folder "
                                      "(--student, with --stages) into a model folder with its model card")
    src = te.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a teacher training run folder")
    src.add_argument("--student", help="a distilled student model folder (a run's student/ or a merge)")
    te.add_argument("--stages", default=None, help="with --student: comma-separated run folders that made it, in order; RUN@N for "
                         "an export at step N of a longer run")
    te.add_argument("--to", required=True)
    te.add_argument("--command", required=True, help="the command that reproduces the run (goes in the card)")
    te.add_argument("--metrics", default=None, help="a markdown file of measured metrics for the card")
    te.add_argument("--threads", type=positive_int, default=1,
                    help="with --student: threads each stage ran with (logged wall-clock x N is the card's CPU-hours)")
    te.add_argument("--notes", default=None, help="a markdown file of notes for the card (e.g. training phases)")
    te.add_argument("--storage", choices=["int8", "fp16"], default="int8",
                    help="weights as int8 weight-only with per-channel scales (default) or fp16")
    te.add_argument("--merged", type=float, default=None, metavar="R",
                    help="with --student and two --stages: the student is R x the second + (1 - R) x the first, "
                         "merged by `flowflash merge` (the card says so)")
    dp = dsub.add_parser("prompts", help="write the held-out split of a corpus as an evaluation prompt set")
    dp.add_argument("--data", required=True)
    dp.add_argument("--out", required=True)
    dp.add_argument("--plain", action="store_true",
                    help="plain phrasings with no style ('a dog face', 'dog face emoji'), one a held-out single "
                         "concept, instead of the held-out captions (how plain_v1 was made)")

    j = sub.add_parser("judge", help="the evaluation instruments")
    jsub = j.add_subparsers(dest="judge_cmd", required=True, parser_class=Parser)
    jb = jsub.add_parser("build", help="train the scorer and crop classifier on the training split")
    jb.add_argument("--data", required=True)
    jv = jsub.add_parser("validate", help="the instruments' own accuracy on real held-out images")
    jv.add_argument("--data", required=True)
    jv.add_argument("--prompts", default=None)
    jv.add_argument("--out", default="docs/eval/judge-validity")

    e = sub.add_parser("eval", help="score a model (or a folder of images) on the evaluation prompt set")
    e.add_argument("--model", default="student")
    e.add_argument("--steps", type=positive_int, default=None)
    e.add_argument("--guidance", type=nonneg_float, default=None)
    e.add_argument("--no-minilm", action="store_true")
    e.add_argument("--as-typed", action="store_true", help="draw each prompt as typed (no style completion)")
    e.add_argument("--images", default=None, help="score these images (00000.png, ... in prompt order) instead")
    e.add_argument("--data", required=True, help="the built corpus (real held-out images)")
    e.add_argument("--prompts", default=None, help="prompt set: a packaged name (eval_v1, the default) or a JSONL file")
    es = e.add_mutually_exclusive_group()
    es.add_argument("--seed", type=nonneg_int, default=0)
    es.add_argument("--seeds", type=seed_list, default=None,
                    help="several seeds (e.g. 0,1000,2000): one row each and their mean with its standard error, "
                         "since one seed of a small prompt set moves R-precision by several prompts. Image i of seed S "
                         "draws noise seed S + i, so seeds closer than the number of prompts share noises (on other "
                         "prompts): space them by more than that for independent sets")
    e.add_argument("--save-images", default=None, help="also write the generated images to this folder "
                   "(with --seeds, one seed-K folder each)")
    e.add_argument("--cache", default=None, help="reuse generated images from this folder (see bench --cache)")
    e.add_argument("--out", required=True, help="results path stem: writes OUT.json and OUT.md")

    ds = sub.add_parser("distill", help="distil the teacher into a few-step student",
                        description="Distil a teacher into a few-step CFG-free student; the student is written to "
                                    "OUT/student. Flags override the YAML config's fields of the same name.")
    ds.add_argument("--method", default=None,
                    help="dmd2 (the default: issue 14's protocol found re-noised matching best, docs/benchmarks.md), "
                         "flash, tg or naive; a --config's method: field counts when this flag is absent")
    ds.add_argument("--config", default=None, help="YAML of DistillConfig fields (every other knob)")
    ds.add_argument("--out", default=None, help="run folder (overrides the config's out)")
    ds.add_argument("--teacher", default=None, help="teacher: a shipped name, a flowflash model folder, or a diffusers "
                    "StableDiffusion3Pipeline folder (trained in its latent space)")
    ds.add_argument("--student-steps", type=int, default=None, help="the student's steps (overrides the config)")
    ds.add_argument("--also-steps", type=int, nargs="+", default=None, metavar="K",
                    help="other step counts the same student learns (e.g. 2 beside --student-steps 4; each sample "
                         "draws its schedule; `generate --steps K` then runs them)")
    ds.add_argument("--iterations", type=positive_int, default=None, help="training iterations (the config's steps)")
    ds.add_argument("--prompts", default=None, metavar="FILE",
                    help="SD3 teacher: training prompts, one a line, or JSONL with a 'prompt' field")
    ds.add_argument("--size", type=size_arg, default=None, help="SD3 teacher: training size, N or WxH px")
    ds.add_argument("--drop", action="append", default=None, metavar="ENCODER",
                    help="SD3 teacher: train (and run) without this text encoder, e.g. t5; repeatable")
    ds.add_argument("--real-images", default=None, metavar="DIR",
                    help="SD3 teacher: real images for the adversarial heads (without them the term is off)")
    ds.add_argument("--batch-size", type=positive_int, default=None, help="global batch (split across processes)")
    ds.add_argument("--device", default=None, help="cpu or cuda (one GPU per process under torchrun)")
    ds.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                    help="bf16: autocast with fp32 master weights (the frozen SD3 teacher is held in bf16)")
    ds.add_argument("--fsdp", action="store_true", default=None, help="under torchrun: shard the roles with FSDP2")
    ds.add_argument("--grad-checkpointing", action="store_true", default=None,
                    help="recompute transformer blocks in backward (less memory, more time)")
    ds.add_argument("--embed-cache", default=None, metavar="DIR",
                    help="where prompt embeddings and real latents are cached (default ~/.cache/flowflash/embeddings)")
    ds.add_argument("--resume", action="store_true")
    ds.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many steps in this run")
    ds.add_argument("--until-step", type=positive_int, default=None, metavar="N",
                    help="stop at step N of the run (with --resume: wherever the checkpoint is), e.g. to export it "
                         "at fixed points")
    ds.add_argument("--measure-variance", type=positive_int, default=None, metavar="DRAWS",
                    help="do not train: draw the distribution-matching gradient DRAWS times on one fixed batch, "
                         "with timestep sharing and with re-noising, and report their variance (JSON to stdout)")
    ds.add_argument("--variance-batch", type=positive_int, default=8)
    ds.add_argument("--measure-noise", type=positive_int, default=None, metavar="K",
                    help="do not train: each arm's DM gradient (re-noising, sharing at x_t_i, sharing in-interval, "
                         "the old normaliser) over K independent minibatches on the config's roles: SNR and cosine "
                         "to a reference gradient (JSON to stdout)")
    ds.add_argument("--noise-ref", type=positive_int, default=256, help="draws of the reference gradient")
    ds.add_argument("--noise-batch", type=positive_int, default=16, help="minibatch size for --measure-noise")
    ds.add_argument("--from-checkpoint", action="store_true",
                    help="with --measure-variance: the roles of the run's last checkpoint, not the initial ones")

    ex = sub.add_parser("export", help="write a diffusers SD3 model (e.g. a student distilled from an SD3 pipeline) "
                                       "as a plain diffusers folder")
    ex.add_argument("model", help="a model folder (a diffusers SD3 folder, e.g. a distilled student)")
    ex.add_argument("--to", required=True)

    cv = sub.add_parser("convert", help="rewrite a model folder in the current layout with the given weight storage")
    cv.add_argument("model", help="shipped model name or model folder")
    cv.add_argument("--storage", choices=["int8", "int6", "int4", "fp16"], default="int8", help="default int8")
    cv.add_argument("--to", default=None, help="write here instead of replacing the folder")

    dr = sub.add_parser("doctor", help="this machine, the profile `auto` picks for it and why, expected memory")
    dr.add_argument("--model", default=None, help="model to plan memory for (default: the shipped student)")
    dr.add_argument("--profile", choices=["auto", "tiny", "laptop", "desktop", "gpu"], default="auto")
    dr.add_argument("--no-measure", action="store_true", help="skip the one-image run that measures peak memory")

    qz = sub.add_parser("quantize", help="a weight-only quantized copy of a model (8, 6 or 4 bits)",
                        description="Every linear layer's weight stored at --bits (8: a scale per output channel; "
                                    "6 and 4: packed, a scale per 32 columns), dequantized to the compute dtype at "
                                    "load; everything else in fp16. The card lists what was quantized.")
    qz.add_argument("model", help="a model folder not already quantized (fp32 or fp16), or an SD3 pipeline folder (the "
                    "shipped models are stored int8: `flowflash convert NAME --storage fp16 --to DIR` first)")
    qz.add_argument("--bits", type=int, choices=[8, 6, 4], required=True)
    qz.add_argument("--to", required=True, help="the new model folder (must not exist)")

    mg = sub.add_parser("merge", help="interpolate two model folders: RATIO * A + (1 - RATIO) * B, "
                                      "or choose RATIO by a sweep on alignment (--sweep)")
    mg.add_argument("a")
    mg.add_argument("b")
    mg.add_argument("--ratio", type=nonneg_float, default=None, help="the weight of A, in [0, 1]")
    mg.add_argument("--sweep", default=None, metavar="R1,R2,...",
                    help="evaluate these ratios on a fixed sample of training prompts (never the held-out set) "
                         "and write the best by CLIP-score analogue to -o")
    mg.add_argument("--data", default=None, help="with --sweep: the built corpus")
    mg.add_argument("--sweep-prompts", type=positive_int, default=256, help="training prompts the sweep draws")
    mg.add_argument("--report", default=None, help="with --sweep: results stem (writes .json, .md, .png)")
    mg.add_argument("-o", "--output", required=True)

    gr = sub.add_parser("grid", help="a grid of one image per prompt (a packaged list or a file, one per line)")
    gr.add_argument("--prompts", required=True,
                    help="a text file, one prompt a line, or a packaged list (grid64, grid64-core, grid64-plain)")
    gr.add_argument("--model", default=None)
    grs = gr.add_mutually_exclusive_group()
    grs.add_argument("--steps", type=positive_int, default=None)
    grs.add_argument("--timesteps", type=time_list, default=None, help=TIMESTEPS_HELP)
    gr.add_argument("--guidance", type=nonneg_float, default=None)
    gr.add_argument("--seed", type=nonneg_int, default=0)
    gr.add_argument("--cols", type=positive_int, default=8, help="images per row")
    gr.add_argument("--as-typed", action="store_true", help="draw each prompt as typed (no style completion)")
    gr.add_argument("--score", metavar="DATA", default=None,
                    help="also rank each single-emoji prompt's caption among all single-emoji captions of the "
                         "corpus DATA with the evaluation judge (generated vs the corpus image); writes OUT.json")
    gr.add_argument("-o", "--output", required=True)

    bn = sub.add_parser("bench", help="compare settings side by side: speed (and quality with --quality)")
    bn.add_argument("--setting", action="append", required=True, type=str,
                    help="NAME=model:teacher,steps:50,guidance:4[,minilm:false][,precision:bf16][,lowmem:true]"
                         "[,threads:N][,backend:openvino][,style:false]; repeat per setting")
    bn.add_argument("--baseline", default=None, help="setting the ratios are against (default: the first)")
    bn.add_argument("--reps", type=positive_int, default=5)
    bn.add_argument("--prompt", default="grinning face, twemoji style", help="the prompt the speed runs draw")
    bn.add_argument("--quality", action="store_true", help="also score each setting on the prompt set")
    bn.add_argument("--memory", action="store_true", help="also measure each setting's peak RSS in a fresh process")
    bn.add_argument("--cold", type=nonneg_int, default=0, metavar="N",
                    help="also time N fresh one-image `flowflash generate` processes per setting (and `import torch`)")
    bn.add_argument("--data", default=None)
    bn.add_argument("--prompts", default=None)
    bn.add_argument("--cache", default=None, help="reuse generated evaluation images from this folder "
                    "(keyed by weights hash, schedule, guidance, seed, prompt set); speed is always measured afresh")
    bn.add_argument("--out", required=True, help="results path stem; plots go next to it")

    sv = sub.add_parser("serve", help="a local web app and HTTP API (OpenAI images, AUTOMATIC1111, jobs with previews)")
    sv.add_argument("--model", action="append", default=[], help="a model as for generate (repeatable; the first is "
                    "the default; default: the shipped student)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (other than loopback needs --api-key)")
    sv.add_argument("--port", type=positive_int, default=7860, help="default 7860")
    sv.add_argument("--api-key", default=None, help="required as 'Authorization: Bearer KEY' on every API call "
                    "(at least 8 characters)")
    sv.add_argument("--max-queue", type=positive_int, default=32, help="jobs that may wait; beyond: HTTP 429")
    sv.add_argument("--max-batch", type=positive_int, default=8, help="images denoised together in one call")
    sv.add_argument("--output-dir", default="outputs/serve", help="where response_format=url images are written")
    sv.add_argument("--drop", action="append", default=[], metavar="ENCODER", help="as for generate")
    sv.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="cpu",
                    help="as for generate (default cpu)")
    sv.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="as for generate (default fp32)")
    return p


def cmd_generate(a) -> int:
    from tqdm import tqdm

    from .runtime.output import output_paths, parameters_text, save_png
    from .runtime.pipeline import Pipeline, check_explicit_timesteps, validate_prompt

    prompt = validate_prompt(a.prompt)
    if a.init_image is not None and not 0 < a.strength <= 1:
        raise FlowflashError(f"--strength must lie in (0, 1], got {a.strength}")
    if a.timesteps is not None:  # before the model loads (an SD3 folder takes a while)
        check_explicit_timesteps(a.timesteps)
    paths = output_paths(a.output, a.num_images)
    device, dtype, threads, batch = a.device, a.dtype or a.precision, a.threads, a.batch_size
    backend, low_memory = a.backend, a.low_memory
    drop = set(a.drop) | ({"minilm"} if a.no_minilm else set())
    if a.profile is not None:  # a profile fills in what the flags left open
        from .models.sd3 import is_diffusers_folder
        from .runtime.pipeline import resolve_model
        from .runtime.profiles import large_encoder, machine_facts, pick

        prof = pick(a.profile, machine_facts(), emoji=not is_diffusers_folder(resolve_model(a.config or a.model)))
        threads, batch = threads or prof.threads, batch or prof.batch_size
        low_memory = low_memory or prof.low_memory
        # the profile's OpenVINO only where the explicit flags leave room for it (fp32, CPU, no compile)
        fits = dtype in (None, "fp32") and device in (None, "cpu", "auto") and not a.compile and not low_memory
        backend = backend or (prof.backend if fits else "torch")
        device, dtype = device or prof.device, dtype or prof.dtype
        if prof.drop_large_encoder:  # a single-file checkpoint's encoders live in its --config folder
            drop.add(large_encoder(resolve_model(a.config or a.model)))
    if threads is not None:
        import torch
        torch.set_num_threads(threads)
    batch = batch or 8
    t0 = time.perf_counter()
    if a.ov_weights and backend != "openvino":
        raise FlowflashError("--ov-weights applies to --backend openvino")
    ov = {}
    if backend == "openvino":  # default: the grid the weights are stored on (int8 ones stay int8: same images)
        from .models.sd3 import is_diffusers_folder
        from .models.storage import quantized_bits
        from .runtime.pipeline import resolve_model
        ours = a.config is None and not is_diffusers_folder(resolve_model(a.model))
        ov = {"backend": "openvino",
              "ov_weights": a.ov_weights or ("int8" if ours and quantized_bits(resolve_model(a.model)) == 8 else "fp32")}
    pipe = Pipeline.load(a.model, drop=drop, dtype=dtype or "fp32", device=device or "cpu", config=a.config,
                         max_sequence_length=a.max_sequence_length, compile=a.compile, low_memory=low_memory, **ov)
    n_steps = len(a.timesteps) - 1 if a.timesteps else len(pipe.timesteps(a.steps, a.size)) - 1
    shown: list[str] = []
    text_s = denoise_s = 0.0
    # Batches of --batch-size, each image written as soon as its batch is done: memory does not grow with
    # --num-images. Bars appear only when a run lasts (tqdm's delay), so one quick image prints nothing extra.
    images_bar = tqdm(total=a.num_images, unit="img", desc="images", delay=2, disable=a.num_images == 1)
    for start in range(0, a.num_images, batch):
        chunk = paths[start: start + batch]
        seeds = [a.seed + start + k for k in range(len(chunk))]
        steps_bar = tqdm(total=n_steps, unit="step", desc="denoise", delay=2, leave=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the Generation lists them; printed once below
            gen = pipe.run([prompt] * len(chunk), seeds, steps=a.steps, guidance=a.guidance, size=a.size,
                           negative_prompt=a.negative_prompt, init_image=a.init_image, strength=a.strength,
                           progress=lambda i: steps_bar.update(1), timesteps=a.timesteps,
                           complete_style=not a.as_typed)
        steps_bar.close()
        pp = gen.params
        for img, path, seed, drawn in zip(gen.images, chunk, pp.seeds, pp.prompts):
            save_png(img, path, parameters_text(drawn, pp.steps, pp.guidance, seed, pp.size, pipe.name,
                                                pipe.hash, negative=pp.negative_prompt, strength=pp.strength,
                                                timesteps=a.timesteps))
            if len(paths) <= 20:
                print(path)
        images_bar.update(len(chunk))
        if start == 0 and pp.prompts[0] != prompt:  # said once, so the image is never a surprise
            print(f"drawn as {pp.prompts[0]!r} (--as-typed draws the prompt as typed)", file=sys.stderr)
        shown += [w for w in gen.warnings if w not in shown]
        text_s, denoise_s = text_s + gen.timings.text_s, denoise_s + gen.timings.denoise_s
    images_bar.close()
    if len(paths) > 20:
        print(f"{paths[0]} ... {paths[-1]}")
    if shown:  # one line, however many encoders cut it
        print(f"warning: {'; '.join(shown)}", file=sys.stderr)
    dt = time.perf_counter() - t0
    print(f"{a.num_images} image(s) in {dt:.2f} s, {time.perf_counter() - _START:.2f} s since start "
          f"({pipe.name}, {pp.steps} steps, CFG {pp.guidance:g}, text {text_s:.2f} s, "
          f"denoise {denoise_s:.2f} s)", file=sys.stderr)
    return 0


def cmd_data(a) -> int:
    if a.data_cmd == "prompts":
        from .eval.prompt_set import write_plain_prompt_set, write_prompt_set
        n = (write_plain_prompt_set if a.plain else write_prompt_set)(Path(a.data), Path(a.out))
        print(f"{n} prompts -> {a.out}")
        return 0

    from .data.build import build_corpus  # npm/resvg: only for the build verb

    meta = build_corpus(Path(a.out), size=a.size, seed=a.seed, cache=a.cache, n_scenes=a.scenes,
                        categories=a.categories)
    print(f"{meta['n_images']} images ({meta['n_train']} train, {meta['n_heldout']} held out), "
          f"{meta['n_concepts']} concepts, {len(meta['scene_objects'])} scene objects -> {a.out}")
    return 0


def cmd_train(a) -> int:
    if a.train_cmd == "ship":
        from .release.card import ship, ship_student
        if a.merged is not None and not a.student:
            raise FlowflashError("--merged describes a merged student: give it with --student")
        metrics = Path(a.metrics).read_text() if a.metrics else ""
        notes = Path(a.notes).read_text() if a.notes else ""
        if a.student:
            stages = [Path(r) for r in (a.stages or "").split(",") if r.strip()]
            print(ship_student(Path(a.student), Path(a.to), stages, a.command, metrics, notes, cores=a.threads,
                               storage_kind=a.storage, merged=a.merged))
        else:
            print(ship(Path(a.run), Path(a.to), a.command, metrics, notes, storage_kind=a.storage))
        return 0
    from .train.common import load_config
    from .train.configs import TeacherConfig
    from .train.run import train_teacher

    print(train_teacher(load_config(TeacherConfig, a.config), resume=a.resume, max_steps=a.max_steps,
                        until=a.until_step))
    return 0


def cmd_export(a) -> int:
    from .release.export import export
    from .runtime.pipeline import resolve_model

    print(export(resolve_model(a.model), Path(a.to)))
    return 0


def cmd_convert(a) -> int:
    from .release.card import convert
    from .runtime.pipeline import resolve_model

    src = resolve_model(a.model)
    dest = convert(src, Path(a.to) if a.to else None, a.storage)
    print(dest)
    return 0


def cmd_quantize(a) -> int:
    from .models.sd3 import is_diffusers_folder
    from .release.card import quantize, storage_text
    from .runtime.pipeline import resolve_model

    src = resolve_model(a.model)
    if is_diffusers_folder(src):
        from .release.quantize_sd3 import quantize_sd3
        print(quantize_sd3(src, Path(a.to), a.bits))
        return 0
    dest = quantize(src, Path(a.to), a.bits)
    print(dest)
    print(f"{storage_text(dest)}", file=sys.stderr)
    return 0


def cmd_doctor(a) -> int:
    import torch

    from .eval.bench import own_peak_rss_mb
    from .models.sd3 import is_diffusers_folder
    from .runtime.pipeline import resolve_model
    from .runtime.profiles import describe, expected_peak_mb, large_encoder, machine_facts, pick

    m = machine_facts()
    folder = resolve_model(a.model)
    prof = pick(a.profile, m, emoji=not is_diffusers_folder(folder))
    print(describe(m))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads by default")
    print(f"profile: {prof.name} ({prof.why})")
    drop = large_encoder(folder) if prof.drop_large_encoder else "none"
    print(f"  device {prof.device}, dtype {prof.dtype}, threads {prof.threads or 'torch default'}, "
          f"batch size {prof.batch_size}, drop {drop}, backend {prof.backend}"
          + (", quantized weights kept int8 in memory" if prof.low_memory else ""))
    if is_diffusers_folder(folder):
        print(f"model: {folder} (an SD3 pipeline: no memory plan yet; measure with flowflash bench --memory)")
        return 0
    plan = expected_peak_mb(folder, prof, own_peak_rss_mb())
    print(f"model: {folder.name}; planned memory ~{plan['total']:.0f} MB = torch {plan['torch']:.0f} + weights "
          f"{plan['weights']:.0f} + MiniLM {plan['minilm']:.0f} + working set {plan['working']:.0f} (libraries and "
          f"load-time copies come on top)")
    if not a.no_measure:
        import subprocess
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-c", "import sys; from flowflash.cli import main; from flowflash.eval.bench import "
                   "own_peak_rss_mb; c = main(sys.argv[1:]); print(f'PEAK {own_peak_rss_mb():.0f}'); sys.exit(c)",
                   "generate", "a red apple", "--model", str(folder), "--profile", prof.name, "-o",
                   f"{tmp}/probe.png", "--num-images", str(prof.batch_size)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        peak = [l for l in proc.stdout.splitlines() if l.startswith("PEAK ")]
        if proc.returncode != 0 or not peak:
            raise FlowflashError(f"the measuring run failed: {proc.stderr.strip()[-300:]}")
        print(f"measured: one batch of {prof.batch_size} image(s) in a fresh process peaks at {peak[0][5:]} MB")
    return 0


def cmd_grid(a) -> int:
    from .eval.grid import draw_grid, recognition_summary

    res = draw_grid(a.prompts, a.output, model=a.model, steps=a.steps, timesteps=a.timesteps, guidance=a.guidance,
                    seed=a.seed, cols=a.cols, score=Path(a.score) if a.score else None,
                    complete_style=not a.as_typed)
    print(res["path"])
    print(f"{res['n_prompts']} images in {res['seconds']:.1f} s", file=sys.stderr)
    if "scores" in res:
        print(f"{recognition_summary(res['scores'])} -> {res['json']}")
    return 0


def distill_config(a):
    """The run's DistillConfig: the YAML's fields, then the flags that were given (a flag left out keeps the YAML's
    value, and a field in neither keeps DistillConfig's default: method dmd2)."""
    from .train.common import load_config
    from .train.configs import DistillConfig

    flags = {"out": a.out, "teacher": a.teacher, "student_steps": a.student_steps, "also_steps": a.also_steps,
             "steps": a.iterations,
             "prompts": a.prompts, "size": list(a.size) if isinstance(a.size, tuple) else a.size, "drop": a.drop,
             "real_images": a.real_images, "batch_size": a.batch_size, "device": a.device, "precision": a.precision,
             "fsdp": a.fsdp, "grad_checkpointing": a.grad_checkpointing, "embed_cache": a.embed_cache}
    over = {k: v for k, v in {"method": a.method, **flags}.items() if v is not None}
    if a.student_steps is not None and a.student_steps < 1:
        raise FlowflashError(f"--student-steps must be >= 1, got {a.student_steps}")
    return load_config(DistillConfig, a.config, over)


def cmd_distill(a) -> int:
    from .train.run import distill, measure_variance

    cfg = distill_config(a)
    if a.measure_noise:
        import json
        from .train.run import measure_noise
        res = measure_noise(cfg, a.measure_noise, a.noise_ref, a.noise_batch)
        print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=1))
        return 0
    if a.measure_variance:
        import json
        res = measure_variance(cfg, a.measure_variance, a.variance_batch, from_checkpoint=a.from_checkpoint)
        print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=1))
        return 0
    folder = distill(cfg, resume=a.resume, max_steps=a.max_steps, until=a.until_step)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, once
        print(folder)
    return 0


def cmd_merge(a) -> int:
    from .eval.merge_sweep import merge_models

    res = merge_models(a.a, a.b, a.output, ratio=a.ratio, sweep=a.sweep, data=Path(a.data) if a.data else None,
                       n_prompts=a.sweep_prompts, report=Path(a.report) if a.report else None)
    if res["sweep"] is not None:
        sweep = res["sweep"]
        print(f"best ratio {res['ratio']:g} (CLIP-score analogue "
              f"{max(r['clip_score'] for r in sweep['rows']):.2f} on {sweep['prompt_set']})")
    print(a.output)
    return 0


def cmd_judge(a) -> int:
    if a.judge_cmd == "build":
        from .eval.judge import JUDGE_DIR, build_judge
        info = build_judge(Path(a.data))
        print(f"judge built from {info['n_train_images']} training images, {info['n_crops']} crops -> {JUDGE_DIR}")
        return 0
    import json

    from .eval.tasks import validate_judge
    print(json.dumps(validate_judge(Path(a.data), a.prompts, Path(a.out)), indent=1))
    return 0


def cmd_eval(a) -> int:
    from .eval.generate import Setting
    from .eval.results import markdown_table
    from .eval.tasks import evaluate, evaluate_seeds

    if a.images and a.seeds:
        raise FlowflashError("--seeds draws new images for each seed; a folder given with --images has one set")
    if a.seeds and len(a.seeds) < 2:
        raise FlowflashError("--seeds needs at least two seeds (use --seed for one)")
    source = Path(a.images) if a.images else Setting(
        name=f"{Path(a.model).name}-{a.steps or 'default'}{'-as-typed' if a.as_typed else ''}", model=a.model,
        steps=a.steps, guidance=a.guidance,
        drop=("minilm",) if a.no_minilm else (), complete_style=not a.as_typed)
    kw = dict(save_images=Path(a.save_images) if a.save_images else None, cache=Path(a.cache) if a.cache else None)
    if a.seeds:
        rows = evaluate_seeds(source, Path(a.data), a.prompts, Path(a.out), seeds=a.seeds, **kw)
    else:
        rows = [evaluate(source, Path(a.data), a.prompts, Path(a.out), seed=a.seed, **kw)]
    print(markdown_table(rows))
    return 0


def cmd_bench(a) -> int:
    from .eval.bench import parse_setting
    from .eval.results import markdown_table
    from .eval.tasks import bench

    res = bench([parse_setting(s) for s in a.setting], a.prompt, Path(a.out), baseline=a.baseline, reps=a.reps,
                memory=a.memory, quality=a.quality, data=Path(a.data) if a.data else None, prompts=a.prompts,
                cache=Path(a.cache) if a.cache else None, cold=a.cold)
    rows, base = res["rows"], res["baseline"]
    print(markdown_table(rows, base))
    print(f"speed-up vs {base}: " + ", ".join(f"{r['setting']} {r['speedup']:.1f}x" for r in rows))
    if "import_torch_s" in res:
        print(f"cold one-image vs `import torch` ({res['import_torch_s']:.2f} s): "
              + ", ".join(f"{r['setting']} {r['cold_vs_import_torch']:.2f}x" for r in rows))
    return 0


def cmd_serve(a) -> int:
    try:
        from .app.serve import serve
    except ImportError as e:
        raise FlowflashError(f"serving needs the serve extra ({e.name} is missing): pip install 'flowflash[serve]'")
    serve(a.model, a.host, a.port, a.api_key, a.max_queue, a.max_batch, Path(a.output_dir), a.drop, a.dtype, a.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "data": cmd_data, "train": cmd_train, "judge": cmd_judge,
                "eval": cmd_eval, "bench": cmd_bench, "grid": cmd_grid,
                "distill": cmd_distill, "merge": cmd_merge, "convert": cmd_convert, "export": cmd_export,
                "serve": cmd_serve, "quantize": cmd_quantize,
                "doctor": cmd_doctor}[a.cmd](a)
    except FlowflashError as e:
        print(f"flowflash: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
