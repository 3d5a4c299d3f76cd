"""A tiny Stable Diffusion 3 / 3.5 diffusers pipeline with random weights and locally built tokenizers.

The folder has the real layout (model_index.json, transformer/, vae/, three text encoders, three tokenizers,
scheduler/), the real component classes and the real tensor layouts, only a few MB in size, so loading,
prompt encoding, sampling and single-file code paths can run offline in seconds. Nothing is downloaded.

    folder = write_tiny_sd3(tmp_path / "sd3", variant="sd3.5-medium")
    pipe = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True)

`write_single_file` writes the transformer as one .safetensors file with diffusers keys; diffusers'
`from_single_file` takes such a file as is when its keys equal the model's (it only runs the original-SD3 key
converter otherwise), and needs `config=` because it cannot infer a config from diffusers keys offline:

    SD3Transformer2DModel.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                           local_files_only=True)
"""
from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

VARIANTS = ("sd3-medium", "sd3.5-medium", "sd3.5-large")

# Whole-word tokens in both tokenizers; any other text splits into characters (CLIP) or characters/unk (T5).
WORDS = ("a", "an", "the", "of", "on", "in", "with", "and", "photo", "painting", "style", "background",
         "red", "green", "blue", "yellow", "white", "black", "apple", "banana", "dog", "cat", "face", "tree",
         "house", "car", "man", "woman", "emoji", "icon")

CLIP_MAX_LENGTH = 77  # both CLIPs, as in SD3; T5 pads to the pipeline's max_sequence_length (256)
T5_MAX_LENGTH = 512
# Widths. The two CLIPs differ so that a swapped concat fails loudly; their sum (8 + 16) stays under T5's
# width (32), which SD3 zero-pads the concatenated CLIP features up to before joining T5's sequence.
CLIP_L_WIDTH, CLIP_G_WIDTH, T5_WIDTH = 8, 16, 32
HEADS, HEAD_DIM = 2, 8  # transformer inner width 16
LATENT_CHANNELS = 16  # SD3's VAE latent channels
VAE_SCALING, VAE_SHIFT = 1.5305, 0.0609  # SD3's VAE scaling_factor / shift_factor
MAX_LATENT_SIDE = 64  # pos_embed covers latents up to 64 px, i.e. 512 px images


def transformer_config(variant: str, sample_size: int = 32) -> dict:
    """SD3Transformer2DModel kwargs: SD3 has plain attention, SD3.5 adds RMS qk-norm, 3.5-medium dual attention."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")
    return dict(
        sample_size=sample_size, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=HEADS * HEAD_DIM,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,  # cat of both CLIPs' projected text_embeds
        pos_embed_max_size=max(MAX_LATENT_SIDE, sample_size) // 2,  # in patches
        dual_attention_layers=(0,) if variant == "sd3.5-medium" else (),
        qk_norm=None if variant == "sd3-medium" else "rms_norm",
    )


def _byte_alphabet() -> list[str]:
    """The printable stand-in byte-level BPE uses for each byte 0..255 (the GPT-2/CLIP scheme), in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    out, shifted = [], 0
    for b in range(256):
        if b in printable:
            out.append(chr(b))
        else:  # whitespace/control bytes move above 255 so every byte has a visible symbol
            out.append(chr(256 + shifted))
            shifted += 1
    return out


def _clip_tokenizer(pad_token: str):
    """A CLIP byte-level BPE over the whole byte alphabet plus merges that spell WORDS, from vocab.json + merges.txt."""
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    ids: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        ids.setdefault(token, len(ids))
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # merge left to right: a p -> ap, ap p -> app, ... appl e</w> -> apple</w>
        merged, *rest = list(word[:-1]) + [word[-1] + "</w>"]
        for part in rest:
            if (merged, part) not in merges:
                merges.append((merged, part))
            merged += part
            ids.setdefault(merged, len(ids))
    for special in ("<|startoftext|>", "<|endoftext|>"):  # last, as in CLIP (49406, 49407)
        ids.setdefault(special, len(ids))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(ids, ensure_ascii=False), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=CLIP_MAX_LENGTH, pad_token=pad_token)


def _t5_tokenizer():
    """A T5-style Unigram tokenizer: <pad>=0, </s>=1, <unk>=2, metaspace words, </s> appended."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in WORDS]  # a known word beats spelling it out
    pieces += [(c, -6.0) for c in string.ascii_letters + string.digits + string.punctuation]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    # Same pieces as transformers' own T5 tokenizer, so a save/load round trip rebuilds it identically.
    metaspace = dict(replacement="▁", prepend_scheme="always", split=True)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(**metaspace)])
    backend.decoder = decoders.Metaspace(**metaspace)
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _clip_encoder(tokenizer, width: int, act: str):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, projection_dim=width,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act=act,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModelWithProjection(config).eval()


def _t5_encoder(tokenizer, d_ff: int = 2 * T5_WIDTH):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=8, d_ff=d_ff, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3's t5-xxl
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, use_cache=False)
    return T5EncoderModel(config).eval()


def _vae(sample_size: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,  # 4 blocks: 8x downsampling
        sample_size=sample_size * 8, scaling_factor=VAE_SCALING, shift_factor=VAE_SHIFT,
        use_quant_conv=False, use_post_quant_conv=False,  # SD3's VAE has neither
    ).eval()


def write_tiny_sd3(folder: Path, variant: str = "sd3.5-medium", seed: int = 0, sample_size: int = 32,
                   with_t5: bool = True, t5_ff: int | None = None) -> Path:
    """Write a complete StableDiffusion3Pipeline folder (all safetensors) with random weights; same seed, same weights.

    `sample_size` is the transformer's default latent side (pipeline default image = 8x that). `with_t5=False`
    leaves out text_encoder_3/tokenizer_3 (null in model_index.json), like SD3 run without T5. `t5_ff` widens
    T5's feed-forward layers, for a fixture whose T5 dominates the weights as T5-XXL does SD3's (benchmarks of
    dropping it).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    config = transformer_config(variant, sample_size)
    folder = Path(folder)

    def seeded(index: int) -> None:  # one stream per component: dropping T5 leaves the other weights unchanged
        torch.manual_seed(seed * 1000 + index)

    tokenizer, tokenizer_2 = _clip_tokenizer("<|endoftext|>"), _clip_tokenizer("!")  # SD3's CLIP-G pads with "!"
    tokenizer_3 = _t5_tokenizer() if with_t5 else None
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        seeded(0)
        transformer = SD3Transformer2DModel(**config).eval()
        seeded(1)
        vae = _vae(sample_size)
        seeded(2)
        text_encoder = _clip_encoder(tokenizer, CLIP_L_WIDTH, "quick_gelu")  # CLIP-L uses quick_gelu
        seeded(3)
        text_encoder_2 = _clip_encoder(tokenizer_2, CLIP_G_WIDTH, "gelu")  # CLIP-G (OpenCLIP) uses exact gelu
        seeded(4)
        text_encoder_3 = (_t5_encoder(tokenizer_3, t5_ff or 2 * T5_WIDTH) if with_t5 else None)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def write_single_file(folder: Path, path: Path) -> Path:
    """Write the pipeline's transformer weights as ONE .safetensors file with diffusers keys.

    diffusers' from_single_file loads such a file unconverted because its key set equals the model's
    (see the module docstring for the call); original-SD3 keys would work too but need no extra code here.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = sorted((Path(folder) / "transformer").glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no transformer safetensors under {folder}")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:  # save_pretrained may shard big models; merge them all
        with safe_open(str(shard), framework="pt") as f:
            state.update({k: f.get_tensor(k) for k in f.keys()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path
