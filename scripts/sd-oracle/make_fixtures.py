#!/usr/bin/env python3
"""Writes remixd-diffusion's parity fixtures (see crates/remixd-diffusion/tests/fixtures/README.md).

Two tiny random-weight Stable Diffusion pipelines are built with the real diffusers and
transformers classes, saved with `save_pretrained`, loaded back from disk, and run on CPU in
f32. Every tensor the Rust side is compared against is written to
`reference-<model>.safetensors`, and the numbers that go with it to `reference-<model>.json`.

Run through scripts/sd-oracle.sh, which makes the virtualenv with the pinned versions.
Everything is seeded: a re-run rewrites the same files.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import regex  # noqa: E402  (a dependency of transformers; the same engine CLIP's tokenizer uses)
import safetensors  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import diffusers  # noqa: E402
import transformers  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionImg2ImgPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPTokenizerFast  # noqa: E402

import flux2_fixtures  # noqa: E402  (this folder's FLUX.2 [klein] half)

# --------------------------------------------------------------------------------------
# Determinism

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)
torch.set_default_dtype(torch.float32)
torch.manual_seed(0)

PROMPT = "a portrait of a knight in silver armor, dramatic lighting, highly detailed"
NEGATIVE = "blurry, low quality, watermark"

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
}

TOKENIZER_CASES = [
    "a photo of a cat",
    "A Photo Of A CAT, In THE Garden",
    "   leading,  doubled  spaces\tand a tab\nand a newline   ",
    "Hello, world! It's a test; isn't it? (yes) [no] {maybe}... \"quoted\" -- end.",
    "digits 0123456789, 3.14159 and 2024-06-01 at 10:30pm, 4k 8K 1080p",
    "café, naïve résumé at the Ångström hôtel; Straße, ŒUVRE",
    "a cat 🐱 painting 🎨 with a brush 🖌️ and an artist 👩‍🎨",
    "don't you'll we're they've I'm he'd she's it'S",
    "hyphen-ated words_with_underscores and/or slashes + plus=equals #hash @at",
    "東京 タワー at night, 北京 city",
    "!!! wow!! what?! ...!",
    "",
    (
        "a very long prompt about a knight in silver armor standing on a hill at sunset, "
        "with dramatic lighting, volumetric fog, a castle in the distance, banners waving, "
        "a dragon circling overhead, highly detailed, sharp focus, trending, concept art, "
        "oil painting, warm colors, cinematic composition, masterpiece, best quality, "
        "intricate engraved details on the breastplate, reflections, rim light, bokeh, "
        "and many more words so that the tokenizer must truncate this text to 77 tokens"
    ),
]

# A small English text the tiny BPE vocabulary is learned from (written for this script).
BPE_CORPUS = """
A portrait of a knight in silver armor stands on a hill. The light is dramatic and the
picture is highly detailed. A painter works with a brush and a palette of warm colors: red,
orange, yellow, green, blue and violet. The painting shows a castle, a dragon, a forest, a
river and the mountains at sunset. Photographs of people, animals and cities are common in
the training of image models. A photo of a cat sitting in the garden, a photo of a dog
running on the beach, a photo of a city street at night with neon lights and rain.
The character wears a red cloak and a helmet with a long feather. Her face is calm, her
eyes are bright, and her hair is dark and short. The background is blurry, with soft
bokeh and a low sun. The style is realistic, cinematic and sharp, with fine textures.
An illustration in the style of a comic book, with bold lines, flat colors and strong
shadows. A watercolor landscape with a lake, trees, clouds and a small wooden house.
Low quality, blurry, jpeg artifacts, watermark, text, signature, cropped, out of frame,
bad anatomy, extra fingers, deformed hands, ugly, duplicate, worst quality.
The quick brown fox jumps over the lazy dog. The weather is nice today, and we are going
to the market to buy bread, cheese, apples and tea. They said that it was the best day of
the year. I think we should paint the wall in a light grey color before the winter.
Studio lighting, three point light, rim light, soft shadows, global illumination, volumetric
fog, depth of field, wide angle lens, close up, full body shot, from above, from below.
A knight, a wizard, a princess, a robot, a soldier, an astronaut in a space suit, a pirate
on a ship, a samurai with a sword, a viking with a shield, a detective in a long coat.
Concept art, digital painting, oil on canvas, pencil sketch, charcoal drawing, pixel art,
anime, manga, three dimensional render, photorealistic, masterpiece, trending, best quality.
"""


# --------------------------------------------------------------------------------------
# The tiny CLIP BPE vocabulary


def finite_json(value):
    """Replaces non-finite floats in a JSON-able value with their string form."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in CLIP's order (printable bytes first, then the rest
    shifted past 255), as CLIP's `bytes_to_unicode` orders them."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    order = list(printable)
    codepoints = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            order.append(b)
            codepoints.append(256 + extra)
            extra += 1
    return order, [chr(c) for c in codepoints]


WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)


def learn_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Plain byte-pair-encoding training over CLIP's word split: the most frequent adjacent
    pair is merged, ties broken by the pair itself so the result is deterministic."""
    order, symbols = byte_symbols()
    encode_byte = dict(zip(order, symbols))
    words = collections.Counter(WORD_PATTERN.findall(" ".join(text.lower().split())))
    corpus = []
    for word, count in sorted(words.items()):
        syms = [encode_byte[b] for b in word.encode("utf-8")]
        syms[-1] = syms[-1] + "</w>"
        corpus.append([syms, count])
    known = set(symbols) | {s + "</w>" for s in symbols}
    merges: list[tuple[str, str]] = []
    banned: set[tuple[str, str]] = set()
    while len(merges) < n_merges:
        pairs: collections.Counter = collections.Counter()
        for syms, count in corpus:
            for a, b in zip(syms, syms[1:]):
                if (a, b) not in banned:
                    pairs[(a, b)] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[0]
        joined = best[0] + best[1]
        if joined in known:
            # Two different pairs can spell the same symbol; keep the vocabulary unique.
            banned.add(best)
            continue
        known.add(joined)
        merges.append(best)
        for entry in corpus:
            syms = entry[0]
            out = []
            i = 0
            while i < len(syms):
                if i + 1 < len(syms) and syms[i] == best[0] and syms[i + 1] == best[1]:
                    out.append(joined)
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            entry[0] = out
    return merges


def write_tokenizer_files(directory: Path, n_merges: int = 400) -> None:
    _, symbols = byte_symbols()
    merges = learn_bpe(BPE_CORPUS, n_merges)
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    assert len(set(vocab_list)) == len(vocab_list)
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(directory / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


def make_tokenizer(pad_token: str) -> CLIPTokenizer:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_tokenizer_files(tmp)
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "bos_token": "<|startoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "pad_token": pad_token,
        }
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        special = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        (tmp / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        tok = CLIPTokenizer.from_pretrained(tmp)
    assert tok.model_max_length == 77
    return tok


# --------------------------------------------------------------------------------------
# Models


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter gets a fixed-seed normal draw (diffusers zero-initialises some
    layers, which would hide bugs): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.05^2),
    norm scales ~ 1 + N(0, 0.1^2), embeddings ~ N(0, 0.5^2)."""
    gen = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for mod_name, mod in module.named_modules():
            for p_name, p in mod.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                if isinstance(mod, norm_types):
                    value = 1.0 + 0.1 * noise if p_name == "weight" else 0.05 * noise
                elif isinstance(mod, torch.nn.Embedding):
                    value = 0.5 * noise
                elif p_name == "bias" or p.ndim == 1:
                    value = 0.05 * noise
                else:
                    fan_in = p[0].numel()
                    value = noise / fan_in**0.5
                p.copy_(value.to(p.dtype))


def build_text_encoder(tok: CLIPTokenizer, hidden_act: str, seed: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=37,
        projection_dim=32,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = CLIPTextModel(config)
    randomise(model, seed)
    return model.eval()


def build_sd1(tok: CLIPTokenizer):
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    randomise(unet, 101)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.18215,
    )
    randomise(vae, 102)
    text = build_text_encoder(tok, "quick_gelu", 103)
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        timestep_spacing="leading",
    )
    # SD 1.5's scheduler config also says clip_sample false; kept so that swapping the class
    # (DDIM) reads it, as it does with the real model.
    scheduler.register_to_config(clip_sample=False)
    return unet.eval(), vae.eval(), text, scheduler


def build_sd2(tok: CLIPTokenizer):
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=32,
    )
    randomise(unet, 201)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.18215,
    )
    randomise(vae, 202)
    text = build_text_encoder(tok, "gelu", 203)
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=1,
        interpolation_type="linear",
        use_karras_sigmas=False,
    )
    # As SD-Turbo's scheduler_config.json: keys of the DDIM/PNDM lineage that Euler ignores
    # but a swapped-in DDIM reads.
    scheduler.register_to_config(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True)
    return unet.eval(), vae.eval(), text, scheduler


# --------------------------------------------------------------------------------------
# Recording every random draw


class NoiseTape:
    """Stands in for diffusers' `randn_tensor` in every module that imported it: each draw
    comes from this tape's own generator (f32, then cast), and is recorded in order."""

    def __init__(self) -> None:
        self.gen = torch.Generator().manual_seed(0)
        self.draws: list[torch.Tensor] = []
        self.sites: list[str] = []

    def reset(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.draws = []
        self.sites = []

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        t = torch.randn(tuple(shape), generator=self.gen, dtype=torch.float32)
        self.draws.append(t.clone())
        caller = sys._getframe(1)
        self.sites.append(f"{Path(caller.f_code.co_filename).stem}.{caller.f_code.co_name}")
        return t.to(dtype=dtype or torch.float32)


TAPE = NoiseTape()


def install_tape() -> list[str]:
    import diffusers.utils.torch_utils as tu

    # Import the modules that draw, so that their `randn_tensor` names exist to patch.
    import diffusers.models.autoencoders.vae  # noqa: F401
    import diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint  # noqa: F401
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img  # noqa: F401
    import diffusers.schedulers.scheduling_ddim  # noqa: F401
    import diffusers.schedulers.scheduling_dpmsolver_multistep  # noqa: F401
    import diffusers.schedulers.scheduling_euler_ancestral_discrete  # noqa: F401
    import diffusers.schedulers.scheduling_euler_discrete  # noqa: F401

    original = tu.randn_tensor
    patched = []
    for name, mod in list(sys.modules.items()):
        if name.startswith("diffusers") and getattr(mod, "randn_tensor", None) is original:
            setattr(mod, "randn_tensor", TAPE)
            patched.append(name)
    return sorted(patched)


# --------------------------------------------------------------------------------------
# Helpers


def synthetic_image(size: int) -> Image.Image:
    """Gradients, a disc, a rectangle and a diagonal stripe: deterministic and structured."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    r = 255 * x
    g = 255 * y
    b = 255 * (0.5 + 0.5 * np.sin(6.0 * (x + 0.5 * y)))
    img = np.stack([r, g, b], axis=-1)
    disc = (x - 0.35) ** 2 + (y - 0.4) ** 2 < 0.18**2
    img[disc] = [250, 220, 40]
    rect = (x > 0.55) & (x < 0.85) & (y > 0.6) & (y < 0.9)
    img[rect] = [30, 60, 200]
    stripe = np.abs(x - y - 0.1) < 0.04
    img[stripe] = [240, 240, 240]
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def ids(tok: CLIPTokenizer, text: str) -> torch.Tensor:
    out = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    return out.input_ids.to(torch.int64)


def num(t: torch.Tensor) -> list:
    return [float(v) for v in t.detach().cpu().reshape(-1).tolist()]


def scheduler_config_dict(s) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(s.config).items()}


def stats(t: torch.Tensor) -> dict:
    t = t.detach().float()
    return {"mean": float(t.mean()), "std": float(t.std()), "absmax": float(t.abs().max())}


# --------------------------------------------------------------------------------------
# References


def reference(name: str, model_dir: Path, out: dict, meta: dict, unet_timestep: float, turbo: bool) -> None:
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval()
    tok, text, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    assert isinstance(tok, CLIPTokenizer) and not isinstance(tok, CLIPTokenizerFast)
    assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
    gen = torch.Generator().manual_seed(1000 + sum(map(ord, name)))

    # Tokenizer cases. The fast tokenizer (what a `tokenizers`-based port resembles) is
    # compared and its disagreements listed; the slow one is the reference, as the
    # pipeline loads it.
    fast = CLIPTokenizerFast.from_pretrained(model_dir / "tokenizer")
    cases = []
    for i, text_case in enumerate(TOKENIZER_CASES):
        t = ids(tok, text_case)
        out[f"tok.{i}.ids"] = t
        case = {
            "index": i,
            "text": text_case,
            "tokens": tok.convert_ids_to_tokens(
                tok(text_case, truncation=True, max_length=77).input_ids
            ),
            "untruncated_length": len(tok(text_case).input_ids),
        }
        f = fast(text_case, padding="max_length", max_length=77, truncation=True).input_ids
        if f != t[0].tolist():
            case["fast_tokenizer_ids_differ"] = f
        cases.append(case)
    meta["tokenizer_cases"] = cases
    meta["tokenizer"] = {
        "class": type(tok).__name__,
        "vocab_size": len(tok),
        "n_merges": len(tok.bpe_ranks),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "model_max_length": tok.model_max_length,
        "ftfy": tok.fix_text is not None,
    }

    with torch.no_grad():
        # Text encoder, exactly as the pipeline's encode_prompt calls it.
        pe, ne = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        out["text.prompt.ids"] = ids(tok, PROMPT)
        out["text.negative.ids"] = ids(tok, NEGATIVE)
        direct = text(out["text.prompt.ids"])[0]
        assert torch.equal(direct, pe), "encode_prompt is last_hidden_state"
        out["text.prompt.embeds"] = pe
        out["text.negative.embeds"] = ne
        meta["text"] = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "embeds_stats": stats(pe)}

        # One UNet forward, batch 2 (negative then prompt, as classifier-free guidance runs).
        h = unet.config.sample_size
        sample = torch.randn((2, 4, h, h), generator=gen)
        timestep = torch.tensor([unet_timestep], dtype=torch.float32)
        ehs = torch.cat([ne, pe])
        unet_out = unet(sample, timestep, encoder_hidden_states=ehs).sample
        out["unet.sample"] = sample
        out["unet.timestep"] = timestep
        out["unet.encoder_hidden_states"] = ehs
        out["unet.out"] = unet_out
        meta["unet"] = {"timestep": unet_timestep, "out_stats": stats(unet_out)}

        # VAE: the encoder's posterior, and one decode.
        vsf = pipe.vae_scale_factor
        size = h * vsf
        pil = synthetic_image(size)
        image = pipe.image_processor.preprocess(pil)
        assert tuple(image.shape) == (1, 3, size, size)
        dist = vae.encode(image).latent_dist
        out["vae.image"] = image
        out["vae.mean"] = dist.mean
        out["vae.logvar"] = dist.logvar
        decode_in = torch.randn((1, 4, h, h), generator=gen)
        out["vae.decode_in"] = decode_in
        out["vae.decoded"] = vae.decode(decode_in).sample
        meta["vae"] = {
            "vae_scale_factor": vsf,
            "image_size": size,
            "scaling_factor": vae.config.scaling_factor,
            "mean_stats": stats(dist.mean),
            "logvar_stats": stats(dist.logvar),
            "decoded_stats": stats(out["vae.decoded"]),
        }

        # Schedulers on their own: set_timesteps(10), img2img slicing at strength 0.6,
        # add_noise at the first timestep, then 3 consecutive steps on random model outputs.
        meta["sched"] = {}
        for s, cls in SCHEDULERS.items():
            sched = cls.from_config(pipe.scheduler.config)
            sched.set_timesteps(10)
            steps, strength = 10, 0.6
            init_timestep = min(int(steps * strength), steps)
            t_start = max(steps - init_timestep, 0)
            ts = sched.timesteps[t_start * sched.order :]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
            out[f"sched.{s}.timesteps"] = ts.to(torch.float32)
            entry = {
                "class": cls.__name__,
                "config": scheduler_config_dict(sched),
                "num_inference_steps": steps,
                "strength": strength,
                "all_timesteps": num(sched.timesteps),
                "timesteps": num(ts),
                "t_start": t_start,
                "init_noise_sigma": float(sched.init_noise_sigma),
            }
            if hasattr(sched, "sigmas") and s != "ddim":
                out[f"sched.{s}.sigmas"] = sched.sigmas.to(torch.float32)
                entry["sigmas"] = "all sigmas after set_timesteps (length steps + 1), not sliced"
            # Schedulers are elementwise: small latents keep the fixtures small.
            original = torch.randn((1, 4, 8, 8), generator=gen)
            noise = torch.randn((1, 4, 8, 8), generator=gen)
            out[f"sched.{s}.add_noise.original"] = original
            out[f"sched.{s}.add_noise.noise"] = noise
            out[f"sched.{s}.add_noise.out"] = sched.add_noise(original, noise, ts[:1])
            TAPE.reset(5000 + len(s))
            sample = out[f"sched.{s}.add_noise.out"]
            for k in range(3):
                t = ts[k]
                model_output = torch.randn((1, 4, 8, 8), generator=gen)
                n_before = len(TAPE.draws)
                scaled = sched.scale_model_input(sample, t)
                prev = sched.step(model_output, t, sample, return_dict=False)[0]
                out[f"sched.{s}.step{k}.sample"] = sample
                out[f"sched.{s}.step{k}.scaled"] = scaled
                out[f"sched.{s}.step{k}.model_output"] = model_output
                drawn = TAPE.draws[n_before:]
                assert len(drawn) <= 1
                if drawn:
                    out[f"sched.{s}.step{k}.noise"] = drawn[0]
                out[f"sched.{s}.step{k}.prev"] = prev
                sample = prev
            entry["step_timesteps"] = num(ts[:3])
            entry["step_noise"] = [f"sched.{s}.step{k}.noise" for k in range(3) if f"sched.{s}.step{k}.noise" in out]
            meta["sched"][s] = entry

        # Whole img2img runs through the real pipeline.
        meta["img2img"] = {}
        runs = [(s, cls, 4, 0.75, 7.5) for s, cls in SCHEDULERS.items()]
        if turbo:
            runs.append(("turbo", EulerDiscreteScheduler, 2, 0.5, 0.0))
        base_scheduler = pipe.scheduler
        for s, cls, steps, strength, guidance in runs:
            pipe.scheduler = cls.from_config(base_scheduler.config)
            TAPE.reset(7000 + sum(map(ord, s)))
            captured = {}

            def wrap_prepare(orig):
                def inner(*args, **kwargs):
                    latents = orig(*args, **kwargs)
                    captured["start"] = latents.clone()
                    return latents

                return inner

            orig_prepare = pipe.prepare_latents
            pipe.prepare_latents = wrap_prepare(orig_prepare)
            unet_calls = []
            hook = unet.register_forward_hook(lambda m, a, o: unet_calls.append(a[0].shape[0]))
            step_latents = []
            step_ts = []

            def on_step(p, i, t, kw):
                step_latents.append(kw["latents"].clone())
                step_ts.append(float(t))
                return {}

            try:
                latents = pipe(
                    prompt=PROMPT,
                    negative_prompt=NEGATIVE,
                    image=pil,
                    strength=strength,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    output_type="latent",
                    callback_on_step_end=on_step,
                    callback_on_step_end_tensor_inputs=["latents"],
                ).images
            finally:
                hook.remove()
                pipe.prepare_latents = orig_prepare
            decoded = vae.decode(latents / vae.config.scaling_factor).sample
            out[f"img2img.{s}.image"] = image
            for i, d in enumerate(TAPE.draws):
                out[f"img2img.{s}.noise{i}"] = d
            out[f"img2img.{s}.start"] = captured["start"]
            for i, lat in enumerate(step_latents):
                out[f"img2img.{s}.step{i}.latents"] = lat
            out[f"img2img.{s}.latents"] = latents
            out[f"img2img.{s}.decoded"] = decoded
            assert len(unet_calls) == len(step_ts)
            assert all(b == (2 if guidance > 1.0 else 1) for b in unet_calls)
            meta["img2img"][s] = {
                "scheduler_class": cls.__name__,
                "scheduler_config": scheduler_config_dict(pipe.scheduler),
                "num_inference_steps": steps,
                "strength": strength,
                "guidance_scale": guidance,
                "classifier_free_guidance": guidance > 1.0,
                "timesteps": step_ts,
                "all_timesteps": num(pipe.scheduler.timesteps),
                "noise_draws": [
                    {"name": f"img2img.{s}.noise{i}", "site": site, "shape": list(d.shape)}
                    for i, (d, site) in enumerate(zip(TAPE.draws, TAPE.sites))
                ],
                "latents_stats": stats(latents),
                "decoded_stats": stats(decoded),
            }
        pipe.scheduler = base_scheduler


# --------------------------------------------------------------------------------------


def model_summary(model_dir: Path) -> dict:
    summary = {}
    for comp in ("unet", "transformer", "vae", "text_encoder"):
        if not (model_dir / comp).is_dir():
            continue
        files = sorted((model_dir / comp).glob("*.safetensors"))
        n = 0
        dtypes = set()
        for f in files:
            with safetensors.safe_open(f, "pt") as sf:
                for k in sf.keys():
                    t = sf.get_slice(k)
                    n += int(np.prod(t.get_shape()))
                    dtypes.add(t.get_dtype())
        summary[comp] = {
            "files": [f.name for f in files],
            "parameters": n,
            "bytes": sum(f.stat().st_size for f in files),
            "dtypes": sorted(dtypes),
        }
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path, help="the fixtures directory")
    ap.add_argument("--only", choices=["sd", "flux2"], help="rewrite one family's fixtures only")
    args = ap.parse_args()
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    patched = install_tape()

    models = [
        ("tiny-sd1", build_sd1, "<|endoftext|>", torch.float32, 500.0, False),
        ("tiny-sd2", build_sd2, "!", torch.float16, 437.5, True),
    ]
    if args.only == "flux2":
        models = []
    for name, build, pad, disk_dtype, unet_t, turbo in models:
        tok = make_tokenizer(pad)
        unet, vae, text, scheduler = build(tok)
        pipe = StableDiffusionImg2ImgPipeline(
            vae=vae,
            text_encoder=text,
            tokenizer=tok,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe = pipe.to(disk_dtype)
        model_dir = out_dir / name
        if model_dir.exists():
            shutil.rmtree(model_dir)
        pipe.save_pretrained(model_dir, safe_serialization=True)
        del pipe, unet, vae, text

        tensors: dict[str, torch.Tensor] = {}
        meta: dict = {
            "model": name,
            "model_dir": name,
            "weights_dtype_on_disk": str(disk_dtype).replace("torch.", ""),
            "compute_dtype": "float32",
            "versions": versions(),
            "randn_tensor_patched_in": patched,
        }
        reference(name, model_dir, tensors, meta, unet_t, turbo)
        write_reference(out_dir, name, model_dir, tensors, meta)

    if args.only != "flux2":
        synthetic_image(64).save(out_dir / "input-64.png")
    if args.only != "sd":
        model_dir, tensors, meta = flux2_fixtures.make(out_dir, randomise, TAPE)
        meta["versions"] = versions()
        meta["randn_tensor_patched_in"] = patched
        write_reference(out_dir, flux2_fixtures.NAME, model_dir, tensors, meta)


def versions() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }


def write_reference(out_dir: Path, name: str, model_dir: Path, tensors: dict, meta: dict) -> None:
    """Writes `reference-<name>.safetensors` and its JSON sidecar."""
    meta["model_summary"] = model_summary(model_dir)
    tensors = {k: v.detach().cpu().clone().contiguous() for k, v in sorted(tensors.items())}
    for k, v in tensors.items():
        assert v.dtype in (torch.float32, torch.int64), (k, v.dtype)
        assert torch.isfinite(v.float()).all(), k
    save_file(tensors, out_dir / f"reference-{name}.safetensors", metadata={"model": name})
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()}
    # Strict JSON (no Infinity/NaN literals, which Rust's and most parsers refuse):
    # non-finite numbers, such as a config's -inf, are written as strings.
    meta = finite_json(meta)
    (out_dir / f"reference-{name}.json").write_text(
        json.dumps(meta, indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
    )
    print(f"{name}: {len(tensors)} reference tensors")


if __name__ == "__main__":
    main()
