#!/usr/bin/env python3
"""The diffusers half of scripts/bench-sd.sh: Stable Diffusion 1.5 on the CPU in f32.

Subcommands:

  make-model --out DIR
      Writes a diffusers directory (a StableDiffusionImg2ImgPipeline: unet, vae, text_encoder,
      tokenizer, scheduler; no safety checker, no feature extractor) with SD 1.5's
      architecture and fixed-seed random weights, stored as f16 safetensors. The cost of
      running it is that of the real model. The tokenizer is the tiny CLIP BPE tokenizer of
      remixd-diffusion's fixtures (every id it yields is below 49408, so the cost is the same).
      Nothing is done when DIR already holds a complete model of this kind (its stamp file).

  diffusers --model DIR --threads N --steps S --strength X --repeats R
      Times diffusers (f32, `torch.set_num_threads(N)`, inference mode, one warm-up each, median
      of R runs): the UNet forward at batch 1 and 2, the VAE's encode of a 512x512 image and
      decode of 64x64 latents, and one whole img2img image. Counts those forwards' FLOPs with
      torch's FlopCounterMode (on the warm-up runs, which cost nothing extra) and measures
      torch's f32 matmul peak. Prints one JSON object on stdout; progress goes to stderr.

  table --diffusers FILE --remixd FILE
      Prints the two sides' figures side by side (plain text).

Run through scripts/bench-sd.sh, which makes the virtualenv and sets the thread variables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[2]
TINY_TOKENIZER = REPO / "crates/remixd-diffusion/tests/fixtures/tiny-sd1/tokenizer"

PROMPT = "a portrait of a knight in silver armor, dramatic lighting, highly detailed"
SEED = 1234
# Written into the model directory last; a directory without it (or with another text) is
# rebuilt. Change the text when the model's recipe changes.
STAMP_NAME = ".bench-sd-model"
STAMP_TEXT = "sd15-random v1: SD 1.5 architecture, seed 1234, f16 safetensors, tiny-sd1 tokenizer\n"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# SD 1.5's configurations (the public values of its unet/vae/text_encoder/scheduler configs)

UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
    # As in SD 1.5's text_encoder/config.json (transformers then pools at the largest id,
    # which SD does not use).
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    skip_prk_steps=True,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)


# --------------------------------------------------------------------------------------
# make-model


def fill_random(module, seed: int) -> int:
    """Overwrites every parameter from one fixed-seed generator: matrices and conv kernels
    ~ N(0, 1/fan_in) (activations keep their scale, so f32 stays finite through the deep
    stacks), other vectors ~ N(0, 0.02^2), embeddings ~ N(0, 0.02^2), norms weight 1 and
    bias 0. Returns the number of parameters."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    count = 0
    with torch.no_grad():
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                count += p.numel()
                if isinstance(mod, norms):
                    p.fill_(1.0 if name == "weight" else 0.0)
                    continue
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                if isinstance(mod, torch.nn.Embedding) or p.ndim < 2:
                    noise.mul_(0.02)
                else:
                    noise.mul_((p.numel() // p.shape[0]) ** -0.5)
                p.copy_(noise)
    return count


def synthetic_image(size: int):
    """A deterministic RGB picture: two gradients, a sine band and a disc."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    rgb = np.stack([255 * x, 255 * y, 127.5 + 127.5 * np.sin(9.0 * (x + 0.4 * y))], axis=-1)
    rgb[(x - 0.4) ** 2 + (y - 0.45) ** 2 < 0.2**2] = [240, 200, 40]
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")


def image_tensor(size: int):
    import numpy as np
    import torch

    arr = np.asarray(synthetic_image(size), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def check_finite(what: str, t) -> None:
    import torch

    t = t.detach().float()
    if not bool(torch.isfinite(t).all()):
        raise SystemExit(f"error: {what} is not finite (NaN or inf) with these random weights")
    log(f"   {what}: shape {list(t.shape)}, mean {t.mean():.4g}, std {t.std():.4g}, absmax {t.abs().max():.4g}")


def smoke_test(unet, vae, text, tokenizer) -> None:
    """A small-resolution pass through every model (the weights as stored: f16 values in
    f32), to fail early on NaN or inf; `diffusers` checks the full size again."""
    import torch

    gen = torch.Generator().manual_seed(SEED)
    with torch.inference_mode():
        ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden = text(ids)[0]
        check_finite("text encoder output", hidden)
        latents = torch.randn(2, 4, 16, 16, generator=gen)
        eps = unet(latents, 500, encoder_hidden_states=hidden.expand(2, -1, -1)).sample
        check_finite("UNet output (16x16 latents)", eps)
        enc = vae.encode(image_tensor(64)).latent_dist.mean
        check_finite("VAE encode (64x64 image)", enc)
        dec = vae.decode(torch.randn(1, 4, 8, 8, generator=gen) / vae.config.scaling_factor).sample
        check_finite("VAE decode (8x8 latents)", dec)


def model_is_complete(out: Path) -> bool:
    stamp = out / STAMP_NAME
    return stamp.is_file() and stamp.read_text() == STAMP_TEXT


def cmd_make_model(args) -> None:
    out = Path(args.out)
    if model_is_complete(out):
        log(f"== {out} already holds the model ({STAMP_NAME}); nothing to do")
        return
    tokenizer_dir = Path(args.tokenizer)
    if not (tokenizer_dir / "vocab.json").is_file():
        raise SystemExit(f"error: no CLIP tokenizer in {tokenizer_dir}")

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    torch.manual_seed(SEED)  # the constructors' own init, overwritten below
    log("== building SD 1.5 (random weights, f32)")
    unet = UNet2DConditionModel(**UNET_CONFIG).eval()
    vae = AutoencoderKL(**VAE_CONFIG).eval()
    text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG)).eval()
    for name, model, seed in (("unet", unet, SEED + 1), ("vae", vae, SEED + 2), ("text_encoder", text, SEED + 3)):
        n = fill_random(model, seed)
        log(f"   {name}: {n / 1e6:.1f} M parameters")
    # Round to what is stored (f16), so that the check runs on the same values both sides load.
    for model in (unet, vae, text):
        model.to(torch.float16).to(torch.float32)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    log("== checking for NaN/inf at small sizes")
    smoke_test(unet, vae, text, tokenizer)
    for model in (unet, vae, text):
        model.to(torch.float16)

    scheduler = PNDMScheduler(**SCHEDULER_CONFIG)
    # SD 1.5's scheduler_config.json also carries clip_sample false (read by DDIM if swapped in).
    scheduler.register_to_config(clip_sample=False)
    pipe = StableDiffusionImg2ImgPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    log(f"== saving to {out} (f16 safetensors)")
    pipe.save_pretrained(partial, safe_serialization=True)
    # The tokenizer files exactly as in the fixtures.
    shutil.rmtree(partial / "tokenizer")
    shutil.copytree(tokenizer_dir, partial / "tokenizer")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    (out / STAMP_NAME).write_text(STAMP_TEXT)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"== model written in {time.perf_counter() - start:.0f} s, {size / 2**30:.2f} GiB")


# --------------------------------------------------------------------------------------
# diffusers


def timed(what: str, fn, repeats: int, count_flops: bool = False):
    """One warm-up call (FLOPs counted on it when asked), then `repeats` timed calls.
    Returns (median seconds or None when repeats is 0, GFLOP or None, the last result)."""
    from torch.utils.flop_counter import FlopCounterMode

    gflop = None
    t0 = time.perf_counter()
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            result = fn()
        gflop = counter.get_total_flops() / 1e9
    else:
        result = fn()
    note = f", {gflop:.1f} GFLOP" if gflop is not None else ""
    log(f"   {what}: warm-up {time.perf_counter() - t0:.2f} s{note}")
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        log(f"   {what}: run {i + 1}/{repeats} {times[-1]:.3f} s")
    return (statistics.median(times) if times else None), gflop, result


def matmul_peak(n: int = 4096, runs: int = 5) -> float:
    import torch

    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    with torch.inference_mode():
        median, _, _ = timed(f"matmul {n}x{n} f32", lambda: torch.mm(a, b), runs)
    return 2 * n**3 / median / 1e9


def cmd_diffusers(args) -> None:
    if not model_is_complete(Path(args.model)):
        raise SystemExit(f"error: {args.model} is not a complete model; run make-model --out {args.model} first")
    if int(args.steps * args.strength) < 1:
        raise SystemExit(f"error: --steps {args.steps} with --strength {args.strength} runs no denoising step")
    import torch

    torch.set_num_threads(args.threads)
    log(f"== torch {torch.__version__}, {torch.get_num_threads()} threads (asked {args.threads})")
    wall = time.perf_counter()
    peak = matmul_peak()
    log(f"   matmul peak {peak:.1f} GFLOP/s")

    import diffusers
    import transformers
    from diffusers import StableDiffusionImg2ImgPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    log(f"== loading {args.model} in f32 (diffusers {diffusers.__version__}, transformers {transformers.__version__})")
    t0 = time.perf_counter()
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    # remixd runs SD 1.5's PNDM config through DDIM (same schedule, no doubled first
    # step), so the whole-image timing uses DDIM on both sides: the same UNet passes.
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    unet, vae, text, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for m in (unet, vae, text):
        m.eval()
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.parameters())
    procs = sorted({type(p).__name__ for p in unet.attn_processors.values()})
    log(f"   loaded in {time.perf_counter() - t0:.1f} s; UNet attention: {', '.join(procs)}")

    gen = torch.Generator().manual_seed(SEED)
    latents1 = torch.randn(1, 4, 64, 64, generator=gen)
    latents2 = torch.randn(2, 4, 64, 64, generator=gen)
    hidden1 = torch.randn(1, 77, 768, generator=gen)
    hidden2 = torch.randn(2, 77, 768, generator=gen)
    image = image_tensor(512)
    dec_in = torch.randn(1, 4, 64, 64, generator=gen) / vae.config.scaling_factor
    ids = tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    r = args.repeats
    out = {"impl": "diffusers", "threads": args.threads}

    with torch.inference_mode():
        log("== text encoder (FLOPs only)")
        _, text_gflop, _ = timed("text encoder b1", lambda: text(ids)[0], 0, count_flops=True)
        log("== UNet")
        out["unet_b1_s"], out["unet_b1_gflop"], eps = timed(
            "UNet b1", lambda: unet(latents1, 500, encoder_hidden_states=hidden1).sample, r, True
        )
        check_finite("UNet b1 output", eps)
        out["unet_b2_s"], out["unet_b2_gflop"], eps = timed(
            "UNet b2", lambda: unet(latents2, 500, encoder_hidden_states=hidden2).sample, r, True
        )
        check_finite("UNet b2 output", eps)
        log("== VAE")
        out["vae_encode_s"], out["vae_encode_gflop"], enc = timed(
            "VAE encode 512x512", lambda: vae.encode(image).latent_dist.mean, r, True
        )
        check_finite("VAE encode output", enc)
        out["vae_decode_s"], out["vae_decode_gflop"], dec = timed(
            "VAE decode 64x64", lambda: vae.decode(dec_in).sample, r, True
        )
        check_finite("VAE decode output", dec)

        log("== whole img2img image")
        passes = [0]
        hook = unet.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
        pil = synthetic_image(512)

        def run_image(strength: float):
            passes[0] = 0
            res = pipe(
                prompt=PROMPT,
                image=pil,
                strength=strength,
                num_inference_steps=args.steps,
                guidance_scale=7.5,
                output_type="pil",
                generator=torch.Generator().manual_seed(SEED),
            )
            assert res.images[0].size == (512, 512)
            return passes[0]

        # Warm-up: the same call at the smallest strength, one step (two UNet passes with PNDM,
        # whose first step is doubled); the components are already warm from the above.
        t0 = time.perf_counter()
        n = run_image(min(1.0, 1.5 / args.steps))
        log(f"   image: warm-up with {n} UNet pass(es) {time.perf_counter() - t0:.2f} s")
        times = []
        image_repeats = args.image_repeats or max(1, r // 2)
        for i in range(image_repeats):
            t0 = time.perf_counter()
            n = run_image(args.strength)
            times.append(time.perf_counter() - t0)
            log(f"   image: run {i + 1}/{image_repeats} {times[-1]:.2f} s, {n} UNet passes (batch 2)")
        hook.remove()
        out["image_s"] = statistics.median(times)
        out["image_unet_passes"] = n

    out["matmul_gflops"] = peak
    out["text_encoder_gflop"] = text_gflop
    rounded = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}
    order = [
        "impl", "threads", "unet_b1_s", "unet_b2_s", "vae_encode_s", "vae_decode_s", "image_s",
        "image_unet_passes", "matmul_gflops", "unet_b1_gflop", "unet_b2_gflop", "vae_encode_gflop",
        "vae_decode_gflop", "text_encoder_gflop",
    ]
    log(f"== diffusers half done in {time.perf_counter() - wall:.0f} s")
    print(json.dumps({k: rounded[k] for k in order}))


# --------------------------------------------------------------------------------------
# table

METRICS = [
    ("unet_b1", "UNet forward, batch 1"),
    ("unet_b2", "UNet forward, batch 2"),
    ("vae_encode", "VAE encode 512x512"),
    ("vae_decode", "VAE decode 64x64"),
    ("image", "img2img image"),
]


def load_side(path: str, impl: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: cannot read {impl}'s figures from {path}: {e}")
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} does not hold one JSON object")
    if data.get("impl") != impl:
        log(f"warning: {path} says impl={data.get('impl')!r}, expected {impl!r}")
    return data


def number(d: dict, key: str):
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def image_gflop(counts: dict, passes) -> float | None:
    """FLOPs of one img2img image: the UNet passes (batch 2), VAE encode and decode, and the
    text encoder on the prompt and the empty negative prompt."""
    parts = [number(counts, k) for k in ("unet_b2_gflop", "vae_encode_gflop", "vae_decode_gflop")]
    if passes is None or None in parts:
        return None
    return passes * parts[0] + parts[1] + parts[2] + 2 * (number(counts, "text_encoder_gflop") or 0.0)


def cmd_table(args) -> None:
    d = load_side(args.diffusers, "diffusers")
    r = load_side(args.remixd, "remixd")
    dpeak, rpeak = number(d, "matmul_gflops"), number(r, "matmul_gflops")

    def fmt(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def rate(gflop, secs, peak) -> str:
        if gflop is None or not secs:
            return "-"
        gfs = gflop / secs
        return f"{gfs:.1f} ({100 * gfs / peak:.0f}%)" if peak else f"{gfs:.1f}"

    header = ["", "diffusers s", "remixd s", "diffusers/remixd", "GFLOP", "diffusers GFLOP/s (% peak)", "remixd GFLOP/s (% peak)"]
    rows = []
    for key, label in METRICS:
        ds, rs = number(d, f"{key}_s"), number(r, f"{key}_s")
        if key == "image":
            dg = image_gflop(d, number(d, "image_unet_passes"))
            rg = image_gflop(d, number(r, "image_unet_passes"))  # diffusers' counts, remixd's passes
            gflop_cell = fmt(dg, ".0f") if dg == rg else f"{fmt(dg, '.0f')} / {fmt(rg, '.0f')}"
        else:
            dg = rg = number(d, f"{key}_gflop")
            gflop_cell = fmt(dg, ".1f")
        ratio = ds / rs if ds and rs else None
        rows.append([label, fmt(ds, ".3f"), fmt(rs, ".3f"), fmt(ratio, ".2f"), gflop_cell, rate(dg, ds, dpeak), rate(rg, rs, rpeak)])

    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    print(f"SD 1.5 architecture (random weights), CPU f32; threads: diffusers {d.get('threads')}, remixd {r.get('threads')}")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print()
    print(f"matmul peak (f32): diffusers/torch {fmt(dpeak, '.1f')} GFLOP/s, remixd/candle {fmt(rpeak, '.1f')} GFLOP/s")
    dp, rp = d.get("image_unet_passes"), r.get("image_unet_passes")
    print(f"img2img image: UNet passes (batch 2) diffusers {dp}, remixd {rp};")
    print("  its GFLOP = passes x UNet b2 + VAE encode + VAE decode + 2 text encoder forwards")
    print("GFLOP: torch's FlopCounterMode on diffusers, used for both sides: convolutions, matmuls and")
    print("  attention, a multiply-add = 2 FLOPs; norms, activations, softmax not counted")
    print("  (as direct sums: remixd's Winograd convolutions multiply less, so its % of peak can pass 100)")
    print("diffusers/remixd > 1: remixd is faster")
    kernels = [
        ("3x3 conv, 320 ch, 64x64, batch 2", "conv3x3_320_candle_s", "conv3x3_320_im2col_s", "candle's conv", "im2col"),
        ("3x3 conv, 320 ch, 64x64, batch 2", "conv3x3_320_im2col_s", "conv3x3_320_winograd_s", "im2col", "winograd"),
        ("self-attention, 4096 tokens, 8x40, batch 2", "attention_4096_materialised_s", "attention_4096_tiled_s", "materialised", "tiled"),
    ]
    if any(number(r, old) for _, old, _, _, _ in kernels):
        print()
        print("remixd's kernels against the paths they replace (same run, remixd side):")
        for label, old, new, old_name, new_name in kernels:
            o, n = number(r, old), number(r, new)
            speedup = f"{o / n:.2f}x" if o and n else "-"
            print(f"  {label}: {old_name} {fmt(o, '.3f')} s, {new_name} {fmt(n, '.3f')} s, {speedup}")
    notes = []
    if d.get("threads") != r.get("threads"):
        notes.append("the two sides ran with different thread counts")
    if dp != rp:
        notes.append("the two sides ran a different number of UNet passes per image")
    for n in notes:
        print(f"warning: {n}")


# --------------------------------------------------------------------------------------


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def strength(s: str) -> float:
    v = float(s)
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError("must be in (0, 1]")
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-model", help="write the random-weight SD 1.5 diffusers directory")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=str(TINY_TOKENIZER), help="CLIP tokenizer files to copy")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.set_defaults(fn=cmd_make_model)

    p = sub.add_parser("diffusers", help="time diffusers on the CPU; one JSON object on stdout")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=positive_int, required=True)
    p.add_argument("--steps", type=positive_int, default=10)
    p.add_argument("--strength", type=strength, default=0.5)
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--image-repeats", type=positive_int, default=None, help="default: max(1, repeats // 2)")
    p.set_defaults(fn=cmd_diffusers)

    p = sub.add_parser("table", help="print diffusers' and remixd's figures side by side")
    p.add_argument("--diffusers", required=True)
    p.add_argument("--remixd", required=True)
    p.set_defaults(fn=cmd_table)

    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
