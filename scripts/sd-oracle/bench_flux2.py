#!/usr/bin/env python3
"""The diffusers half of scripts/bench-flux2.sh: FLUX.2 [klein] 4B on the CPU.

Subcommands:

  make-model --out DIR [--tiny] [--tokenizer DIR] [--threads N]
      Writes a diffusers directory for Flux2KleinInpaintPipeline (is_distilled: true) with
      FLUX.2 [klein] 4B's architecture (Flux2Transformer2DModel, a Qwen3-4B Qwen3ForCausalLM
      text encoder, AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler) and fixed-seed random
      weights, stored as bf16 safetensors (about 16 GB). Running it costs what the real model
      costs. The tokenizer is remixd-diffusion's tiny Qwen fixture tokenizer with its chat
      template (every id it yields is far below the vocabulary size, so the cost is the same).
      The components are made one at a time, directly in bf16, and each is freed before the
      next (peak about 9 GB: the largest component in bf16). An interrupted run resumes with the
      components it had finished; nothing is done when DIR already holds a complete model of
      this kind (its stamp file, written last). --tiny makes a small model of the same
      structure (same latent channels, token counts and hidden-state layers; narrow and
      shallow) in seconds, for checking the code paths.

  diffusers --model DIR --threads N --part PART --repeats R
      Times one part on diffusers, on the CPU, in f32 (every component loaded with
      torch_dtype=torch.float32), with `torch.set_num_threads(N)`, in inference mode: one
      warm-up (its FLOPs counted with torch's FlopCounterMode) then R timed runs, median
      reported. Loads only the components the part needs. Prints one JSON object on stdout
      (the contract below); progress goes to stderr. One part per process, so that the
      process's peak RSS is that part's. Parts:
        text        encode_prompt of one prompt: chat template, padded to 512 tokens, Qwen3
                    hidden states 9, 18, 27 stacked -> [1, 512, 7680]
        tr512       one transformer forward as the pipeline calls it for a 512x512 output
        tr1024        with one reference image of the same size: 3 x (side/16)^2 image tokens
                    (noisy latents, the base image as reference T=10, the reference T=20),
                    512 text tokens, timestep 0.5 (the pipeline's t / 1000)
        vae_encode  a 512x512 image -> `_encode_vae_image` (encode, mode, patchify, batch norm)
        vae_decode  latents [1, 32, 64, 64] -> `vae.decode` -> image [1, 3, 512, 512]
        image       a whole 4-step 512x512 remix (base image, one reference, all-white mask,
                    strength 1, guidance 1): the text encoder runs first, alone, and is freed;
                    then Flux2KleinInpaintPipeline.__call__ runs with prompt_embeds= and no
                    text encoder (f32 text encoder and transformer together would need 32 GB)

  table --diffusers FILE --remixd FILE
      Prints both sides' figures side by side (plain text), from the files `merge` writes.

  merge --impl NAME --out FILE PART=FILE...
      Checks each FILE's one-part JSON object (the contract below, for that PART) and writes
      them as one file: {"impl": NAME, "parts": {PART: object, ...}}.

One-part JSON contract (both sides; remixd's `remixd bench flux2 --part PART` prints the same):
  part            one of text, tr512, tr1024, vae_encode, vae_decode, image
  seconds         median of the timed runs
  runs            the timed runs' seconds
  peak_rss_mb     the process's peak resident set (getrusage ru_maxrss), loading included
  compute_dtype   "float32" or "bfloat16": what the arithmetic is done in
  weights_dtype   the dtype the weights are held in while computing
  threads         the thread count used
  gflop           optional: the FLOPs of one run (multiply-add = 2)
  notes           optional: free text
diffusers adds: impl, model, repeats, warmup_s, load_s, loaded_components, stored_dtype,
loaded_rss_mb (RSS once loaded), run_peak_rss_mb (peak RSS from the warm-up on), peak_anon_mb
(peak of the RSS's anonymous part: without the file pages of memory-mapped weights),
matmul_gflops (torch's f32 matmul peak in that process), versions, and per part a few more
(gflop_min for text and image; text_seconds, pipeline_seconds, transformer_passes for image).

Run through scripts/bench-flux2.sh, which makes the virtualenv and sets the thread variables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
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
TINY_TOKENIZER = REPO / "crates/remixd-diffusion/tests/fixtures/tiny-flux2/tokenizer"

PROMPT = "a portrait of a knight in silver armor, dramatic lighting, highly detailed"
SEED = 1234
TEXT_TOKENS = 512  # the pipeline's max_sequence_length: the prompt is padded to it
HIDDEN_LAYERS = (9, 18, 27)  # the pipeline's text_encoder_out_layers
IMAGE_SIDE = 512
IMAGE_STEPS = 4
TIMESTEP = 0.5  # what the transformer is given (the pipeline passes t / 1000)
PARTS = ("text", "tr512", "tr1024", "vae_encode", "vae_decode", "image")
REQUIRED_KEYS = ("part", "seconds", "runs", "peak_rss_mb", "compute_dtype", "weights_dtype", "threads")

# Written into the model directory last; a directory without it (or with another text) is
# rebuilt. Change the text when the model's recipe changes.
STAMP_NAME = ".bench-flux2-model"
STAMP_TEXT = {
    False: "flux2-klein-4b-random v1: FLUX.2 [klein] 4B architecture, seed 1234, bf16 safetensors, tiny-flux2 tokenizer\n",
    True: "flux2-klein-4b-random-tiny v1: small model of the same structure, seed 1234, bf16 safetensors, tiny-flux2 tokenizer\n",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# FLUX.2 [klein] 4B's configurations (the public values of its component configs)

TRANSFORMER_CONFIG = dict(
    patch_size=1,
    in_channels=128,
    num_layers=5,
    num_single_layers=20,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=7680,  # 3 x the text encoder's hidden size (HIDDEN_LAYERS stacked)
    timestep_guidance_channels=256,
    mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32),
    rope_theta=2000,
    eps=1e-6,
    guidance_embeds=False,
)

# Qwen3-4B's config.
TEXT_CONFIG = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    rope_scaling=None,
    attention_bias=False,
    attention_dropout=0.0,
    use_sliding_window=False,
    sliding_window=None,
    max_window_layers=36,
    tie_word_embeddings=True,
    bos_token_id=151643,
    eos_token_id=151645,
)

# AutoencoderKLFlux2's defaults, spelled out.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=32,
    norm_num_groups=32,
    sample_size=1024,
    force_upcast=True,
    use_quant_conv=True,
    use_post_quant_conv=True,
    mid_block_add_attention=True,
    batch_norm_eps=1e-4,
    batch_norm_momentum=0.1,
    patch_size=(2, 2),
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    time_shift_type="exponential",
)

# --tiny: the same structure, narrow and shallow. The latent channels (32, so 128 transformer
# input channels), the VAE's 8x downscale, the 512 text tokens and the hidden-state layers
# (9, 18, 27: 28 layers, one past the last one used, as the real model has layers past it)
# are kept, so every part's token counts and shapes are the full model's.
TINY_TRANSFORMER = dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                        joint_attention_dim=3 * 32, axes_dims_rope=(4, 4, 4, 4))
TINY_TEXT = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=28, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_window_layers=28, bos_token_id=None, eos_token_id=2)
TINY_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1)


def configs(tiny: bool) -> tuple[dict, dict, dict]:
    if not tiny:
        return TRANSFORMER_CONFIG, TEXT_CONFIG, VAE_CONFIG
    return ({**TRANSFORMER_CONFIG, **TINY_TRANSFORMER}, {**TEXT_CONFIG, **TINY_TEXT}, {**VAE_CONFIG, **TINY_VAE})


# --------------------------------------------------------------------------------------
# make-model


def fill_random(module, gen) -> int:
    """Overwrites every parameter (in place, in its own dtype) from one fixed-seed generator:
    matrices and conv kernels ~ N(0, 1/fan_in), so each layer keeps its input's scale;
    embeddings ~ N(0, 1); norms' weights 1 and biases 0; other vectors (biases) ~ N(0, 0.02^2).
    A parameter shared by two modules (Qwen3's tied embeddings) is filled once, by its first.
    Returns the number of parameters."""
    import torch

    seen = set()
    count = 0
    with torch.no_grad():
        for mod in module.modules():
            is_norm = "Norm" in type(mod).__name__  # GroupNorm, LayerNorm, RMSNorm, Qwen3RMSNorm
            for name, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                count += p.numel()
                if is_norm:
                    p.fill_(1.0 if name == "weight" else 0.0)
                elif isinstance(mod, torch.nn.Embedding):
                    randn_into(p, 1.0, gen)
                elif p.ndim >= 2:
                    randn_into(p, (p.numel() // p.shape[0]) ** -0.5, gen)
                else:
                    randn_into(p, 0.02, gen)
    return count


def randn_into(t, std: float, gen, chunk: int = 1 << 24) -> None:
    """t <- N(0, std^2), drawn in f32 a chunk at a time (bounded scratch memory)."""
    import torch

    flat = t.view(-1)
    for i in range(0, flat.numel(), chunk):
        n = min(chunk, flat.numel() - i)
        flat[i : i + n].copy_(torch.randn(n, generator=gen).mul_(std))


def synthetic_image(size: int, variant: int = 0):
    """A deterministic RGB picture: two gradients, a sine band and a disc (variant 1: another
    phase and disc, for the reference image)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    phase = 1.3 * variant
    rgb = np.stack([255 * x, 255 * y, 127.5 + 127.5 * np.sin(9.0 * (x + 0.4 * y) + phase)], axis=-1)
    cx, cy = (0.4, 0.45) if variant == 0 else (0.6, 0.35)
    rgb[(x - cx) ** 2 + (y - cy) ** 2 < 0.2**2] = [240, 200, 40] if variant == 0 else [40, 90, 220]
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), "RGB")


def check_finite(what: str, t) -> None:
    import torch

    t = t.detach().float()
    if not bool(torch.isfinite(t).all()):
        raise SystemExit(f"error: {what} is not finite (NaN or inf) with these random weights")
    log(f"   {what}: shape {list(t.shape)}, mean {t.mean():.4g}, std {t.std():.4g}, absmax {t.abs().max():.4g}")


def image_ids(pipe_cls, n_side: int, channels: int):
    """img_ids exactly as the pipeline builds them for one output of n_side x n_side latent
    tokens with one reference image of the same size: the noisy latents' ids
    (`_prepare_latent_ids`, T=0), then `_prepare_image_ids` of [base image latents,
    reference latents] (T=10, T=20)."""
    import torch

    lat = torch.zeros(1, channels, n_side, n_side)
    latent_ids = pipe_cls._prepare_latent_ids(lat)
    cond_ids = pipe_cls._prepare_image_ids([lat, lat], batch_size=1)
    return torch.cat([latent_ids, cond_ids], dim=1)


def transformer_inputs(pipe_cls, config, side: int, text_tokens: int, gen):
    """The transformer's inputs for one denoising step of a side x side output with one
    reference image of the same size, seeded."""
    import torch

    n_side = side // 16  # VAE 8x, then 2x2 patchified
    tokens = n_side * n_side
    hidden = torch.randn(1, 3 * tokens, config.in_channels, generator=gen)
    prompt_embeds = torch.randn(1, text_tokens, config.joint_attention_dim, generator=gen)
    return dict(
        hidden_states=hidden,
        timestep=torch.full((1,), TIMESTEP),
        guidance=None,
        encoder_hidden_states=prompt_embeds,
        txt_ids=pipe_cls._prepare_text_ids(prompt_embeds),
        img_ids=image_ids(pipe_cls, n_side, config.in_channels),
        joint_attention_kwargs=None,
        return_dict=False,
    )


def make_component(name: str, tiny: bool, tokenizer_dir: Path, gen_seed: int, dest: Path) -> None:
    """Builds one component directly in bf16 (no default init), fills it, checks a small
    forward for NaN/inf, saves it to dest and frees it."""
    import copy
    import gc

    import torch
    from diffusers import AutoencoderKLFlux2, Flux2KleinInpaintPipeline, Flux2Transformer2DModel
    from transformers import Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM
    from transformers.modeling_utils import no_init_weights

    tr_cfg, text_cfg, vae_cfg = configs(tiny)
    gen = torch.Generator().manual_seed(gen_seed)
    t0 = time.perf_counter()
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():  # torch.nn.init.* are no-ops: the memory is filled below
            if name == "transformer":
                model = Flux2Transformer2DModel(**tr_cfg)
            elif name == "text_encoder":
                model = Qwen3ForCausalLM(Qwen3Config(**text_cfg))
                model.tie_weights()  # lm_head shares the embeddings (not tied without the init)
                assert model.lm_head.weight is model.model.embed_tokens.weight
            else:
                model = AutoencoderKLFlux2(**vae_cfg)
    finally:
        torch.set_default_dtype(old_dtype)
    model.eval()
    n = fill_random(model, gen)
    log(f"   {name}: {n / 1e6:.1f} M parameters, built in {time.perf_counter() - t0:.0f} s")
    with torch.inference_mode():
        if name == "vae":
            # Batch-norm statistics of the packed latents: means ~ N(0, 0.2^2), variances
            # log-normal around 1.
            bn = model.bn
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen).mul_(0.2))
            bn.running_var.copy_(torch.randn(bn.running_var.shape, generator=gen).mul_(0.3).exp_())
            vae32 = copy.deepcopy(model).float()  # small: checked in f32, the benchmark's precision
            pipe = Flux2KleinInpaintPipeline(scheduler=None, vae=vae32, text_encoder=None, tokenizer=None,
                                             transformer=None)
            img = pipe.image_processor.preprocess(synthetic_image(64), 64, 64)
            check_finite("VAE _encode_vae_image (64x64 image)", pipe._encode_vae_image(img, None))
            lat = torch.randn(1, vae_cfg["latent_channels"], 8, 8, generator=gen)
            check_finite("VAE decode (8x8 latents)", vae32.decode(lat, return_dict=False)[0])
            del vae32, pipe
        elif name == "text_encoder":
            # Checked in bf16, as stored (an f32 copy would not fit beside it at full size).
            tok = Qwen2TokenizerFast.from_pretrained(tokenizer_dir)
            emb = Flux2KleinInpaintPipeline._get_qwen3_prompt_embeds(model, tok, PROMPT, max_sequence_length=32)
            check_finite("text encoder prompt embeds (32 tokens, bf16)", emb)
        else:
            args = transformer_inputs(Flux2KleinInpaintPipeline, model.config, 32, 8, gen)
            args = {k: (v.to(torch.bfloat16) if k in ("hidden_states", "encoder_hidden_states") else v)
                    for k, v in args.items()}
            check_finite("transformer output (2x2 latents x 3, 8 text tokens, bf16)", model(**args)[0])
    t0 = time.perf_counter()
    model.save_pretrained(dest, safe_serialization=True)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    log(f"   {name}: saved in {time.perf_counter() - t0:.0f} s, {size / 2**30:.2f} GiB")
    del model
    gc.collect()
    malloc_trim()


def model_index() -> dict:
    import diffusers

    return {
        "_class_name": "Flux2KleinInpaintPipeline",
        "_diffusers_version": diffusers.__version__,
        "is_distilled": True,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"],
        "tokenizer": ["transformers", "Qwen2TokenizerFast"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLFlux2"],
    }


def model_variant(out: Path) -> bool | None:
    """True for the tiny model, False for the full one, None when out holds no complete model."""
    stamp = out / STAMP_NAME
    if not stamp.is_file():
        return None
    text = stamp.read_text()
    for tiny, want in STAMP_TEXT.items():
        if text == want:
            return tiny
    return None


def cmd_make_model(args) -> None:
    out = Path(args.out)
    if model_variant(out) is args.tiny:
        log(f"== {out} already holds the model ({STAMP_NAME}); nothing to do")
        return
    tokenizer_dir = Path(args.tokenizer)
    if not (tokenizer_dir / "tokenizer.json").is_file() or not (tokenizer_dir / "chat_template.jinja").is_file():
        raise SystemExit(f"error: no Qwen tokenizer with its chat template in {tokenizer_dir}")

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    stamp = STAMP_TEXT[args.tiny]
    partial = out.with_name(out.name + ".partial")
    recipe = partial / ".recipe"
    if not (recipe.is_file() and recipe.read_text() == stamp):
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        recipe.write_text(stamp)
    what = "a tiny model of FLUX.2 [klein] 4B's structure" if args.tiny else "FLUX.2 [klein] 4B"
    log(f"== building {what} (random weights, bf16) in {partial}")
    # One component at a time, each with its own seed, in a fixed order.
    for i, name in enumerate(("vae", "transformer", "text_encoder")):
        done = partial / f".done-{name}"
        if done.is_file():
            log(f"   {name}: already made")
            continue
        shutil.rmtree(partial / name, ignore_errors=True)
        make_component(name, args.tiny, tokenizer_dir, SEED + 1 + i, partial / name)
        done.write_text("")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(partial / "scheduler")
    shutil.rmtree(partial / "tokenizer", ignore_errors=True)
    shutil.copytree(tokenizer_dir, partial / "tokenizer")  # the fixture's files exactly
    (partial / "model_index.json").write_text(json.dumps(model_index(), indent=2) + "\n")
    for f in partial.glob(".done-*"):
        f.unlink()
    recipe.unlink()
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)
    (out / STAMP_NAME).write_text(stamp)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"== model written in {time.perf_counter() - start:.0f} s, {size / 2**30:.2f} GiB")


# --------------------------------------------------------------------------------------
# diffusers


def malloc_trim() -> None:
    """Hands freed heap memory back to the system (glibc), so a freed model leaves the RSS."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Rss:
    """Peak resident set: the whole process's (getrusage ru_maxrss, loading included); the
    peak while running only (VmHWM after resetting it through /proc/self/clear_refs once the
    model is loaded, where the kernel allows it); and the peak of its anonymous part (RssAnon,
    sampled every 50 ms by a thread), which leaves out the pages of memory-mapped weight files
    that loading touches (file-backed: counted in the RSS, but the kernel can drop them)."""

    def __init__(self) -> None:
        import threading

        self.process_peak = 0.0
        self.run_peak = None
        self.loaded = None
        self._can_reset = None
        self.anon_peak = self._status("RssAnon")
        if self.anon_peak is not None:
            threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            v = self._status("RssAnon")
            if v is not None and v > self.anon_peak:
                self.anon_peak = v
            time.sleep(0.05)

    @staticmethod
    def _status(key: str):
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return None

    def now_mb(self):
        return self._status("VmRSS")

    def forget(self) -> None:
        """Drops what the peaks hold so far (the matmul measurement's scratch), where allowed."""
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return
        self.anon_peak = self._status("RssAnon")

    def checkpoint(self) -> None:
        import resource

        self.process_peak = max(self.process_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)

    def start_run(self) -> None:
        """Call once the model is loaded, before the warm-up."""
        now = self.now_mb()
        if now is not None:
            self.loaded = max(self.loaded or 0.0, now)
        self.checkpoint()  # before the reset, which may lower ru_maxrss too
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self._can_reset = True
        except OSError:
            self._can_reset = False

    def end_run(self) -> None:
        if self._can_reset:
            hwm = self._status("VmHWM")
            if hwm is not None:
                self.run_peak = max(self.run_peak or 0.0, hwm)
        self.checkpoint()


def timed(what: str, fn, repeats: int, count_flops: bool = True):
    """One warm-up call (FLOPs counted on it), then `repeats` timed calls. Returns
    (list of seconds, warm-up seconds, FLOP counter or None, the last result)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = None
    t0 = time.perf_counter()
    if count_flops:
        with FlopCounterMode(display=False) as counter:
            result = fn()
    else:
        result = fn()
    warm = time.perf_counter() - t0
    note = f", {counter.get_total_flops() / 1e9:.1f} GFLOP" if counter is not None else ""
    log(f"   {what}: warm-up {warm:.2f} s{note}")
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        log(f"   {what}: run {i + 1}/{repeats} {times[-1]:.3f} s")
    return times, warm, counter, result


def module_gflop(counter, pattern: str) -> float:
    """The FLOPs FlopCounterMode attributed to the modules whose dotted name matches pattern
    (a regular expression on the whole name), without counting nested matches twice."""
    rx = re.compile(pattern)
    names = [k for k in counter.get_flop_counts() if k != "Global" and rx.fullmatch(k)]
    top = [k for k in names if not any(k != o and k.startswith(o + ".") for o in names)]
    return sum(sum(counter.get_flop_counts()[k].values()) for k in top) / 1e9


def matmul_peak(n: int = 4096, runs: int = 3) -> float:
    import torch

    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    with torch.inference_mode():
        times, _, _, _ = timed(f"matmul {n}x{n} f32", lambda: torch.mm(a, b), runs, count_flops=False)
    return 2 * n**3 / statistics.median(times) / 1e9


def load_pipeline(model: str, needs: set[str]):
    """Flux2KleinInpaintPipeline.from_pretrained in f32 with only the components in `needs`
    (the others passed as None, so never loaded)."""
    import torch
    from diffusers import Flux2KleinInpaintPipeline

    skip = {k: None for k in ("transformer", "vae", "text_encoder", "tokenizer") if k not in needs}
    t0 = time.perf_counter()
    pipe = Flux2KleinInpaintPipeline.from_pretrained(model, torch_dtype=torch.float32, **skip)
    pipe.set_progress_bar_config(disable=True)
    for name in ("transformer", "vae", "text_encoder"):
        m = getattr(pipe, name, None)
        if m is None:
            continue
        m.eval()
        dtypes = {p.dtype for p in m.parameters()}
        if dtypes != {torch.float32} or any(p.device.type != "cpu" for p in m.parameters()):
            raise SystemExit(f"error: {name} loaded as {dtypes}, not float32 on the CPU")
    loaded = ", ".join(sorted(needs))
    return pipe, time.perf_counter() - t0, loaded


def text_part(pipe, repeats: int):
    """encode_prompt of PROMPT as the pipeline runs it. Returns (times, warm-up s, GFLOP,
    GFLOP strictly needed, prompt embeds, notes)."""
    import torch

    tok = pipe.tokenizer
    templated = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                        add_generation_prompt=True, enable_thinking=False)
    real = len(tok(templated)["input_ids"])
    cfg = pipe.text_encoder.config
    fn = lambda: pipe.encode_prompt(prompt=PROMPT, device=torch.device("cpu"), max_sequence_length=TEXT_TOKENS)[0]
    times, warm, counter, emb = timed("encode_prompt", fn, repeats)
    want = [1, TEXT_TOKENS, len(HIDDEN_LAYERS) * cfg.hidden_size]
    if list(emb.shape) != want:
        raise SystemExit(f"error: prompt embeds are {list(emb.shape)}, not {want}")
    check_finite("prompt embeds", emb)
    gflop = counter.get_total_flops() / 1e9
    # What the pipeline needs is the first max(HIDDEN_LAYERS) layers' outputs; diffusers also
    # runs the layers after those and the LM head's logits for all 512 positions.
    unused = module_gflop(counter, rf".*\.layers\.({'|'.join(str(i) for i in range(max(HIDDEN_LAYERS), cfg.num_hidden_layers))})")
    unused += module_gflop(counter, r".*\.lm_head")
    notes = (f"{real} prompt tokens (chat template, no thinking) padded to {TEXT_TOKENS} with the pad token, attention "
             f"mask on; diffusers runs all {cfg.num_hidden_layers} layers and the LM head's logits for all "
             f"{TEXT_TOKENS} positions ({unused:.1f} of the {gflop:.1f} GFLOP), of which only hidden states "
             f"{', '.join(map(str, HIDDEN_LAYERS))} are used; gflop_min leaves those out")
    return times, warm, gflop, gflop - unused, emb, notes


def cmd_diffusers(args) -> None:
    tiny = model_variant(Path(args.model))
    if tiny is None:
        raise SystemExit(f"error: {args.model} is not a complete model; run make-model --out {args.model} first")
    import gc

    import torch

    torch.set_num_threads(args.threads)
    log(f"== diffusers {args.part}: torch {torch.__version__}, {torch.get_num_threads()} threads (asked {args.threads})")
    wall = time.perf_counter()
    rss = Rss()
    peak = matmul_peak() if not args.no_matmul else None
    if peak is not None:
        log(f"   matmul peak {peak:.1f} GFLOP/s")
        gc.collect()
        malloc_trim()
        rss.forget()  # the peaks are the part's: loading and running

    import diffusers
    import transformers
    from diffusers import Flux2KleinInpaintPipeline as P
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    r = args.repeats
    part = args.part
    out = {"impl": "diffusers", "part": part}
    extra = {}
    gen = torch.Generator().manual_seed(SEED)
    load_s = 0.0

    with torch.inference_mode():
        if part == "text":
            pipe, load_s, loaded = load_pipeline(args.model, {"text_encoder", "tokenizer"})
            rss.start_run()
            times, warm, gflop, gflop_min, _, notes = text_part(pipe, r)
            rss.end_run()
            extra["gflop_min"] = round(gflop_min, 3)

        elif part in ("tr512", "tr1024"):
            side = 512 if part == "tr512" else 1024
            pipe, load_s, loaded = load_pipeline(args.model, {"transformer"})
            tr = pipe.transformer
            inputs = transformer_inputs(P, tr.config, side, TEXT_TOKENS, gen)
            n = inputs["hidden_states"].shape[1] // 3

            def fn():
                with tr.cache_context("cond"):
                    return tr(**inputs)[0][:, :n]

            rss.start_run()
            times, warm, counter, pred = timed(f"transformer forward {side}x{side}", fn, r)
            rss.end_run()
            check_finite("noise prediction", pred)
            gflop = counter.get_total_flops() / 1e9
            h = inputs["hidden_states"]
            notes = (f"hidden_states {list(h.shape)} = {n} noisy-latent + {n} base-image + {n} reference tokens; "
                     f"encoder_hidden_states {list(inputs['encoder_hidden_states'].shape)}; img_ids T=0 (latents), "
                     f"10 (base), 20 (reference), H/W the latent grid; txt_ids (0,0,0,l); timestep {TIMESTEP}; "
                     f"inputs N(0,1), seed {SEED}")

        elif part in ("vae_encode", "vae_decode"):
            pipe, load_s, loaded = load_pipeline(args.model, {"vae"})
            vae = pipe.vae
            if part == "vae_encode":
                image = pipe.image_processor.preprocess(synthetic_image(IMAGE_SIDE), IMAGE_SIDE, IMAGE_SIDE)
                fn = lambda: pipe._encode_vae_image(image, gen)
                what = f"_encode_vae_image {IMAGE_SIDE}x{IMAGE_SIDE}"
                notes = (f"image [1, 3, {IMAGE_SIDE}, {IMAGE_SIDE}] in [-1, 1] -> encode, latent mode, patchify, "
                         f"batch-norm normalise -> [1, {4 * vae.config.latent_channels}, {IMAGE_SIDE // 16}, {IMAGE_SIDE // 16}]")
            else:
                lat = torch.randn(1, vae.config.latent_channels, IMAGE_SIDE // 8, IMAGE_SIDE // 8, generator=gen)
                fn = lambda: vae.decode(lat, return_dict=False)[0]
                what = f"vae.decode {IMAGE_SIDE // 8}x{IMAGE_SIDE // 8}"
                notes = (f"latents {list(lat.shape)} N(0,1) -> vae.decode (post-quant conv, decoder) -> "
                         f"[1, 3, {IMAGE_SIDE}, {IMAGE_SIDE}]; no batch-norm denormalise, unpatchify or postprocess")
            rss.start_run()
            times, warm, counter, res = timed(what, fn, r)
            rss.end_run()
            check_finite(f"{part} output", res)
            gflop = counter.get_total_flops() / 1e9

        else:  # image
            # 1. The text encoder alone, freed before the transformer is loaded.
            pipe, load_text_s, _ = load_pipeline(args.model, {"text_encoder", "tokenizer"})
            rss.start_run()
            text_times, text_warm, text_gflop, text_gflop_min, embeds, _ = text_part(pipe, r)
            rss.end_run()
            embeds = embeds.clone()
            del pipe
            gc.collect()
            malloc_trim()
            log(f"   text encoder freed; RSS now {rss.now_mb():.0f} MB")
            # 2. The pipeline without a text encoder, given the prompt embeds.
            pipe, load_s, loaded = load_pipeline(args.model, {"transformer", "vae", "tokenizer"})
            load_s += load_text_s
            passes = [0]
            hook = pipe.transformer.register_forward_pre_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
            base, ref = synthetic_image(IMAGE_SIDE, 0), synthetic_image(IMAGE_SIDE, 1)
            from PIL import Image

            mask = Image.new("L", (IMAGE_SIDE, IMAGE_SIDE), 255)

            def run_image(steps: int):
                passes[0] = 0
                res = pipe(
                    image=base,
                    image_reference=ref,
                    mask_image=mask,
                    prompt_embeds=embeds,
                    strength=1.0,
                    num_inference_steps=steps,
                    guidance_scale=1.0,
                    output_type="pil",
                    generator=torch.Generator().manual_seed(SEED),
                )
                img = res.images[0]
                assert img.size == (IMAGE_SIDE, IMAGE_SIDE), img.size
                assert passes[0] == steps, (passes[0], steps)
                return img

            rss.start_run()
            # Warm-up: the same call with one step (every component once; a full 4-step call
            # would cost 4 transformer forwards more). FLOPs counted on it.
            _, pipe_warm, counter, _ = timed("image, 1-step warm-up", lambda: run_image(1), 0)
            pipe_times = []
            for i in range(r):
                t0 = time.perf_counter()
                run_image(IMAGE_STEPS)
                pipe_times.append(time.perf_counter() - t0)
                log(f"   image: run {i + 1}/{r} {pipe_times[-1]:.2f} s ({IMAGE_STEPS} transformer passes)")
            rss.end_run()
            hook.remove()
            one_step = counter.get_total_flops() / 1e9
            tr_pass = module_gflop(counter, r"Flux2Transformer2DModel")
            gflop = text_gflop + one_step + (IMAGE_STEPS - 1) * tr_pass if tr_pass > 0 else None
            times = [a + b for a, b in zip(text_times, pipe_times)]
            warm = text_warm + pipe_warm
            extra.update(
                text_seconds=round(statistics.median(text_times), 4),
                pipeline_seconds=round(statistics.median(pipe_times), 4),
                transformer_passes=IMAGE_STEPS,
                gflop_min=round(gflop - (text_gflop - text_gflop_min), 3) if gflop is not None else None,
            )
            notes = (f"Flux2KleinInpaintPipeline.__call__: {IMAGE_SIDE}x{IMAGE_SIDE} base image, one "
                     f"{IMAGE_SIDE}x{IMAGE_SIDE} reference, all-white mask, strength 1.0, {IMAGE_STEPS} steps, "
                     f"guidance 1.0 (distilled: no CFG), output_type pil, seed {SEED}. The text encoder runs first "
                     f"(encode_prompt, timed as the text part) and is freed; the pipeline is then called with "
                     f"prompt_embeds= and text_encoder=None. seconds = text encode + pipeline call (each run pairs "
                     f"one of each; loading excluded); warm-up: a 1-step call; gflop = text + 1-step call + "
                     f"{IMAGE_STEPS - 1} more transformer passes")

    rss.checkpoint()
    out.update(
        seconds=round(statistics.median(times), 4),
        runs=[round(t, 4) for t in times],
        peak_rss_mb=round(rss.process_peak),
        compute_dtype="float32",
        weights_dtype="float32",
        threads=args.threads,
        gflop=round(gflop, 3) if gflop is not None else None,
        notes=notes,
        model=("tiny " if tiny else "") + "flux2-klein-4b-random",
        repeats=r,
        warmup_s=round(warm, 3),
        load_s=round(load_s, 2),
        loaded_components=loaded,
        loaded_rss_mb=round(rss.loaded) if rss.loaded is not None else None,
        run_peak_rss_mb=round(rss.run_peak) if rss.run_peak is not None else None,
        peak_anon_mb=round(rss.anon_peak) if rss.anon_peak is not None else None,
        stored_dtype="bfloat16",
        matmul_gflops=round(peak, 2) if peak is not None else None,
        versions=f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}",
        **extra,
    )
    log(f"== diffusers {part} done in {time.perf_counter() - wall:.0f} s; peak RSS {out['peak_rss_mb']} MB"
        + (f" ({out['run_peak_rss_mb']} MB while running)" if out["run_peak_rss_mb"] is not None else ""))
    print(json.dumps(out))


# --------------------------------------------------------------------------------------
# merge


def read_part(path: Path, impl: str, part: str) -> dict:
    """One part-run's stdout: exactly one JSON object, for `part` (a stray line before it is
    tolerated, with a warning)."""
    try:
        text = path.read_text()
    except OSError as e:
        raise SystemExit(f"error: cannot read {impl}'s part figures {path}: {e}")
    try:
        data = json.loads(text)
    except ValueError:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        try:
            data = json.loads(lines[-1])
        except (ValueError, IndexError):
            raise SystemExit(f"error: {path} ({impl}) does not hold a JSON object: {text[:200]!r}")
        log(f"warning: {path} ({impl}) has other output before its JSON object; used its last line")
    if not isinstance(data, dict):
        raise SystemExit(f"error: {path} ({impl}) holds {type(data).__name__}, not one JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise SystemExit(f"error: {path} ({impl}) lacks {', '.join(missing)}")
    if data["part"] != part:
        raise SystemExit(f"error: {path} ({impl}) is for part {data['part']!r}, not {part!r}")
    for k in ("seconds", "peak_rss_mb"):
        if number(data, k) is None:
            raise SystemExit(f"error: {path} ({impl}): {k} is {data[k]!r}, not a number")
    for k in ("compute_dtype", "weights_dtype"):
        if data[k] not in ("float32", "bfloat16", "float16"):
            log(f"warning: {path} ({impl}): {k} is {data[k]!r}")
    return data


def cmd_merge(args) -> None:
    parts = {}
    for arg in args.files:
        part, sep, f = arg.partition("=")
        if not sep or part not in PARTS:
            raise SystemExit(f"error: {arg!r} is not PART=FILE with PART one of {', '.join(PARTS)}")
        if part in parts:
            raise SystemExit(f"error: part {part} given twice")
        parts[part] = read_part(Path(f), args.impl, part)
    merged = {"impl": args.impl, "parts": {p: parts[p] for p in PARTS if p in parts}}
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    tmp.rename(args.out)


# --------------------------------------------------------------------------------------
# table

LABELS = {
    "text": "text encode (512 tokens)",
    "tr512": "transformer 512x512 + ref",
    "tr1024": "transformer 1024x1024 + ref",
    "vae_encode": "VAE encode 512x512",
    "vae_decode": "VAE decode 64x64",
    "image": "4-step 512x512 remix",
}
SHORT_DTYPE = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def load_side(path: str, impl: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        log(f"warning: no figures for {impl} ({path}: {e})")
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("parts"), dict):
        raise SystemExit(f"error: {path} is not a merged file ({{'impl': ..., 'parts': {{...}}}})")
    if data.get("impl") != impl:
        log(f"warning: {path} says impl={data.get('impl')!r}, expected {impl!r}")
    return data["parts"]


def number(d: dict, key: str):
    v = d.get(key)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def cmd_table(args) -> None:
    d = load_side(args.diffusers, "diffusers")
    r = load_side(args.remixd, "remixd")

    def fmt(v, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    def dtype(p: dict) -> str:
        if not p:
            return "-"
        c, w = p.get("compute_dtype"), p.get("weights_dtype")
        return f"{SHORT_DTYPE.get(c, c)} (w {SHORT_DTYPE.get(w, w)})"

    header = ["", "diffusers s", "remixd s", "d/r", "GFLOP", "d GFLOP/s", "r GFLOP/s",
              "d peak MB", "r peak MB", "d compute (weights)", "r compute (weights)"]
    rows = []
    borrowed = False
    for part in PARTS:
        dp, rp = d.get(part, {}), r.get(part, {})
        if not dp and not rp:
            continue
        ds, rs = number(dp, "seconds"), number(rp, "seconds")
        dg = number(dp, "gflop")
        # remixd's own count when it gives one; else diffusers' (the same work, but for the
        # text encoder, where remixd may skip what the pipeline does not use: then the
        # minimum diffusers counted).
        rg = number(rp, "gflop")
        if rg is None and rp:
            rg = number(dp, "gflop_min") if part in ("text", "image") and number(dp, "gflop_min") else dg
            borrowed = borrowed or rg is not None
        gcell = fmt(dg, ".1f") if rg is None or dg is None or abs(dg - rg) < 1e-6 * max(dg, 1) else f"{dg:.1f} / {rg:.1f}"
        ratio = ds / rs if ds and rs else None
        rows.append([
            LABELS[part], fmt(ds, ".3f"), fmt(rs, ".3f"), fmt(ratio, ".2f"), gcell,
            fmt(dg / ds if dg and ds else None, ".1f"), fmt(rg / rs if rg and rs else None, ".1f"),
            fmt(number(dp, "peak_rss_mb"), ".0f"), fmt(number(rp, "peak_rss_mb"), ".0f"), dtype(dp), dtype(rp),
        ])

    threads = sorted({str(p.get("threads")) for side in (d, r) for p in side.values()})
    model = next((p.get("model") for p in d.values() if p.get("model")), "flux2-klein-4b-random")
    print(f"FLUX.2 [klein] 4B architecture ({model}, random weights), CPU; threads: {', '.join(threads) or '-'}")
    if not rows:
        print("(no figures)")
        return
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print()
    dm = next((number(p, "matmul_gflops") for p in d.values() if number(p, "matmul_gflops")), None)
    rm = next((number(p, "matmul_gflops") for p in r.values() if number(p, "matmul_gflops")), None)
    print(f"matmul peak (f32): diffusers/torch {fmt(dm, '.1f')} GFLOP/s, remixd {fmt(rm, '.1f')} GFLOP/s")
    print("d/r = diffusers seconds / remixd seconds: > 1, remixd is faster")
    print("GFLOP: torch's FlopCounterMode on diffusers' warm-up (matmuls, convolutions, attention; a multiply-add")
    print("  = 2 FLOPs; norms, activations, softmax not counted). 'a / b': the count for diffusers / the one")
    print("  for remixd (its own when it gives one).")
    if borrowed:
        print("  remixd gave no count: its GFLOP/s uses diffusers' (for text and image, the minimum the pipeline")
        print("  needs: hidden states up to layer 27, no LM head)")
    print("peak MB: each part in its own process, its peak RSS (ru_maxrss) with loading included; it counts")
    print("  the touched pages of memory-mapped weight files too")
    print("  MB: RSS once loaded, peak RSS while running, peak of the RSS's anonymous part (no file pages):")
    for side, parts in (("diffusers", d), ("remixd", r)):
        for p in PARTS:
            v = parts.get(p, {})
            bits = [f"{k} {number(v, key):.0f}" for k, key in (("loaded", "loaded_rss_mb"), ("running", "run_peak_rss_mb"),
                                                              ("anonymous", "peak_anon_mb")) if number(v, key)]
            if bits:
                print(f"    {side} {p}: {', '.join(bits)}")
    print("compute (weights): the precision of the arithmetic and of the weights held while computing")
    for side, parts in (("diffusers", d), ("remixd", r)):
        for p, v in parts.items():
            if v.get("notes"):
                print(f"{side} {p}: {v['notes']}")
    ths = {p.get("threads") for side in (d, r) for p in side.values()}
    if len(ths) > 1:
        print("warning: the parts ran with different thread counts")
    for p in PARTS:
        if (p in d) != (p in r):
            print(f"warning: {p} measured on {'diffusers' if p in d else 'remixd'} only")


# --------------------------------------------------------------------------------------


def positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return v


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("make-model", help="write the random-weight FLUX.2 [klein] 4B diffusers directory")
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="a small model of the same structure (code-path checks)")
    p.add_argument("--tokenizer", default=str(TINY_TOKENIZER), help="Qwen tokenizer files to copy")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1)
    p.set_defaults(fn=cmd_make_model)

    p = sub.add_parser("diffusers", help="time one part on diffusers (CPU, f32); one JSON object on stdout")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=positive_int, required=True)
    p.add_argument("--part", choices=PARTS, required=True)
    p.add_argument("--repeats", type=positive_int, default=1)
    p.add_argument("--no-matmul", action="store_true", help="skip the f32 matmul peak measurement")
    p.set_defaults(fn=cmd_diffusers)

    p = sub.add_parser("merge", help="check one side's part files and write them as one file")
    p.add_argument("--impl", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("files", nargs="+", metavar="PART=FILE")
    p.set_defaults(fn=cmd_merge)

    p = sub.add_parser("table", help="print diffusers' and remixd's figures side by side")
    p.add_argument("--diffusers", required=True)
    p.add_argument("--remixd", required=True)
    p.set_defaults(fn=cmd_table)

    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
