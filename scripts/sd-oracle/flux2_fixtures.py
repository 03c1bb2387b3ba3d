"""The FLUX.2 [klein] half of remixd-diffusion's parity fixtures (imported by make_fixtures.py).

A tiny random-weight `Flux2KleinInpaintPipeline` is built with the real diffusers and
transformers classes (1 double and 1 single transformer block of 2 heads × 16, a 2-layer
Qwen3, a 1-channel VAE), its tokenizer a Qwen2-style byte-level BPE trained here with the
`tokenizers` library on a few sentences, and a chat template written for this script that
uses the Jinja features real templates use. It is saved with `save_pretrained`, loaded back,
and every tensor the Rust side checks is recorded: token ids, text hidden states, one
transformer forward with and without reference tokens, VAE encode/decode, scheduler sigmas,
and whole inpaint-pipeline runs with every random draw recorded.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffusers import (
    AutoencoderKLFlux2,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinInpaintPipeline,
    Flux2Transformer2DModel,
)
from diffusers.pipelines.flux2.pipeline_flux2_klein_inpaint import compute_empirical_mu
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2TokenizerFast, Qwen3Config, Qwen3ForCausalLM

NAME = "tiny-flux2"
PROMPT = "the knight from the reference image stands in the garden, warm light, detailed"
NEGATIVE = "blurry, low quality"
TEXT_LAYERS = (0, 1, 2)
MAX_LEN = 512

# Qwen2's pre-tokenizer split: contractions, letters with one leading non-letter, single
# digits, punctuation runs, newlines, other whitespace.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# A chat template written for these fixtures, in the shape of a Qwen3 template: a
# namespace, a reversed loop with loop indices, string methods, tests and whitespace
# control, and a `tojson` of tools; rendered by transformers as the pipeline does.
CHAT_TEMPLATE = """{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- 'Tools:' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_user=messages|length - 1) %}
{%- for message in messages[::-1] %}
{%- set index = (messages|length - 1) - loop.index0 %}
{%- if message.role == 'user' and ns.last_user == messages|length - 1 %}{%- set ns.last_user = index %}{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- set content = message.content if message.content is string else '' %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
{%- elif message.role == 'assistant' %}
{%- if '</think>' in content %}
{%- set content = content.split('</think>')[-1].lstrip('\\n') %}
{%- endif %}
{{- '<|im_start|>assistant\\n' + content.strip() + '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
{%- endif %}"""

BPE_TEXT = """
The knight from the reference image stands in the garden. A portrait of a woman with a red
cloak, warm light, soft shadows and a detailed background. A cat sits on a wooden bench in
the park; the sun is low and the sky is orange. Blurry, low quality, watermark, text. A robot
walks through a city at night, neon lights reflect in the rain. 2024-06-01 at 10:30, 4k.
Don't you think it's a good picture? They've painted the walls; we'll see.
"""

TOKENIZER_CASES = [
    PROMPT,
    "",
    "a photo of a cat",
    "  Leading spaces,\ttabs\nand two\n\nnewlines  ",
    "digits 0123456789, 3.14 and 2024-06-01; don't, it's, we'll",
    "café naïve 東京 🐱 — “quotes”",
    "text with <|im_end|> and <think> inside",
    " ".join(["the knight in the garden"] * 120),  # truncated at 512 tokens
]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL,
        show_progress=False,
    )
    tok.train_from_iterator([line for line in BPE_TEXT.splitlines() if line], trainer)
    fast = Qwen2TokenizerFast(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build(tok, randomise):
    text = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tok),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=1024,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=None,
        )
    )
    randomise(text, 201)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16 * len(TEXT_LAYERS),
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4),
        rope_theta=2000,
        guidance_embeds=False,
    )
    randomise(transformer, 202)
    vae = AutoencoderKLFlux2(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=32,
        sample_size=32,
        batch_norm_eps=1e-4,
    )
    randomise(vae, 203)
    # The batch norm's running statistics are buffers, not parameters: give them values
    # too, so that the normalisation is not the identity.
    gen = torch.Generator().manual_seed(204)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.running_mean.shape, generator=gen))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=gen))
    # FLUX.2 [klein]'s own scheduler configuration.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    return text.eval(), transformer.eval(), vae.eval(), scheduler


def synthetic(w: int, h: int, phase: float) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x /= w - 1
    y /= h - 1
    r = 255 * (0.5 + 0.5 * np.sin(5 * x + phase))
    g = 255 * y
    b = 255 * (0.5 + 0.5 * np.cos(4 * (x + y) - phase))
    img = np.stack([r, g, b], axis=-1)
    disc = (x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.2**2
    img[disc] = [230, 200 - 80 * phase, 60]
    return Image.fromarray(np.clip(np.round(img), 0, 255).astype(np.uint8), "RGB")


def half_mask(w: int, h: int) -> Image.Image:
    """White (repaint) over the right part, black (keep) elsewhere, with a soft edge."""
    x = np.arange(w, dtype=np.float32)[None, :].repeat(h, 0)
    m = np.clip((x - 0.45 * w) / (0.1 * w), 0, 1) * 255
    return Image.fromarray(np.round(m).astype(np.uint8), "L")


def to_tensor(img: Image.Image) -> torch.Tensor:
    a = torch.from_numpy(np.asarray(img).astype(np.float32) / 255.0)
    if a.ndim == 2:
        a = a[None]
    else:
        a = a.permute(2, 0, 1)
    return a[None]


def reference(model_dir: Path, out: dict, meta: dict, tape) -> None:
    pipe = Flux2KleinInpaintPipeline.from_pretrained(model_dir, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    tok, text = pipe.tokenizer, pipe.text_encoder

    # Tokenizer: the chat template, then padding/truncation to 512.
    cases = []
    for p in TOKENIZER_CASES:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        enc = tok(rendered, padding="max_length", truncation=True, max_length=MAX_LEN)
        cases.append({"prompt": p, "text": rendered, "ids": enc["input_ids"], "mask": enc["attention_mask"]})
    meta["tokenizer_cases"] = cases

    # Text encoder: every hidden state, and the pipeline's stacked embeddings.
    ids = torch.tensor([cases[0]["ids"]])
    mask = torch.tensor([cases[0]["mask"]])
    with torch.no_grad():
        hs = text(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    for i, h in enumerate(hs):
        out[f"text.hidden.{i}"] = h
    embeds, _ = pipe.encode_prompt(PROMPT, text_encoder_out_layers=TEXT_LAYERS)
    negative, _ = pipe.encode_prompt(NEGATIVE, text_encoder_out_layers=TEXT_LAYERS)
    out["text.embeds"] = embeds
    out["text.negative.embeds"] = negative
    meta.update(prompt=PROMPT, negative_prompt=NEGATIVE, text_layers=list(TEXT_LAYERS), max_sequence_length=MAX_LEN)

    # VAE: the posterior's mode of an image, and a decode.
    base = synthetic(48, 32, 0.0)
    reference_img = synthetic(24, 28, 1.0)
    image = to_tensor(base) * 2 - 1
    with torch.no_grad():
        mode = pipe.vae.encode(image).latent_dist.mode()
        out["vae.image"] = image
        out["vae.mode"] = mode
        out["vae.decoded"] = pipe.vae.decode(mode).sample
        out["vae.packed"] = pipe._encode_vae_image(image, None)

    # Transformer: one forward without and one with reference tokens, at a mid timestep.
    cfg = pipe.transformer.config
    gen = torch.Generator().manual_seed(301)
    h, w = 6, 5
    img_latents = torch.randn((1, cfg.in_channels, h, w), generator=gen)
    img_ids = pipe._prepare_latent_ids(img_latents)[0]
    ref_latents = torch.randn((1, cfg.in_channels, 4, 3), generator=gen)
    ref_ids = pipe._prepare_image_ids([ref_latents], 1)[0]
    txt_len = 7
    encoder = torch.randn((1, txt_len, cfg.joint_attention_dim), generator=gen)
    txt_ids = pipe._prepare_text_ids(encoder)[0]
    for case, hidden, ids_ in [
        ("noref", pipe._pack_latents(img_latents), img_ids),
        (
            "ref",
            torch.cat([pipe._pack_latents(img_latents), pipe._pack_latents(ref_latents)], dim=1),
            torch.cat([img_ids, ref_ids], dim=0),
        ),
    ]:
        t = torch.tensor([0.7321])
        with torch.no_grad():
            o = pipe.transformer(
                hidden_states=hidden,
                timestep=t,
                guidance=None,
                encoder_hidden_states=encoder,
                txt_ids=txt_ids,
                img_ids=ids_,
                return_dict=False,
            )[0]
        out[f"tr.{case}.hidden"] = hidden
        out[f"tr.{case}.encoder"] = encoder
        out[f"tr.{case}.img_ids"] = ids_.to(torch.float32)
        out[f"tr.{case}.txt_ids"] = txt_ids.to(torch.float32)
        out[f"tr.{case}.out"] = o
        meta[f"tr.{case}.timestep"] = float(t[0])

    # Scheduler: sigmas and timesteps as the pipeline sets them, for several step counts
    # and sequence lengths (both branches of the empirical mu).
    sched_cases = []
    for steps in (1, 2, 4, 8, 28, 50):
        for seq in (48, 1024, 4096, 4301, 8192):
            mu = compute_empirical_mu(image_seq_len=seq, num_steps=steps)
            s = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
            s.set_timesteps(steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            sched_cases.append(
                {
                    "steps": steps,
                    "image_seq_len": seq,
                    "mu": mu,
                    "sigmas": [float(v) for v in s.sigmas],
                    "timesteps": [float(v) for v in s.timesteps],
                }
            )
    meta["scheduler_cases"] = sched_cases

    # Whole runs of the inpaint pipeline. The only random draw is the initial noise.
    runs = [
        # name, reference, mask, guidance, strength, steps
        ("plain", None, None, 1.0, 0.8, 4),
        ("ref", reference_img, None, 1.0, 1.0, 4),
        ("mask_cfg", reference_img, half_mask(48, 32), 3.5, 0.7, 5),
    ]
    meta["runs"] = {}
    for n, (name, ref, m, guidance, strength, steps) in enumerate(runs):
        tape.reset(400 + n)
        steps_seen = []

        def on_step(_pipe, i, t, kw, steps_seen=steps_seen, name=name):
            out[f"run.{name}.step.{i}"] = kw["latents"].clone()
            steps_seen.append(float(t))
            return kw

        mask_img = m if m is not None else Image.new("L", base.size, 255)
        with torch.no_grad():
            latents = pipe(
                prompt=PROMPT,
                image=base,
                image_reference=ref,
                mask_image=mask_img,
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=guidance,
                negative_prompt_embeds=negative if guidance > 1 else None,
                generator=torch.Generator().manual_seed(7),
                output_type="latent",
                callback_on_step_end=on_step,
                text_encoder_out_layers=TEXT_LAYERS,
            ).images
            decoded = pipe.vae.decode(latents).sample
        for i, d in enumerate(tape.draws):
            out[f"run.{name}.noise.{i}"] = d
        out[f"run.{name}.latents"] = latents
        out[f"run.{name}.decoded"] = decoded
        meta["runs"][name] = {
            "reference": ref is not None,
            "mask": m is not None,
            "guidance_scale": guidance,
            "strength": strength,
            "num_inference_steps": steps,
            "timesteps_run": steps_seen,
            "noise_sites": list(tape.sites),
            "size": list(base.size),
            "reference_size": list(ref.size) if ref is not None else None,
        }

    base.save(model_dir.parent / "flux2-base.png")
    reference_img.save(model_dir.parent / "flux2-reference.png")
    half_mask(48, 32).save(model_dir.parent / "flux2-mask.png")


def make(out_dir: Path, randomise, tape) -> tuple[Path, dict, dict]:
    tok = make_tokenizer()
    text, transformer, vae, scheduler = build(tok, randomise)
    pipe = Flux2KleinInpaintPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text, tokenizer=tok, transformer=transformer, is_distilled=False
    )
    model_dir = out_dir / NAME
    if model_dir.exists():
        shutil.rmtree(model_dir)
    pipe.save_pretrained(model_dir, safe_serialization=True)
    del pipe, text, transformer, vae
    tensors: dict = {}
    meta: dict = {"model": NAME, "model_dir": NAME, "weights_dtype_on_disk": "float32", "compute_dtype": "float32"}
    reference(model_dir, tensors, meta, tape)
    return model_dir, tensors, meta
