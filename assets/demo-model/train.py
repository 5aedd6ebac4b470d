"""Trains the demo model: Stable Diffusion's architecture, small, on unitune's demo world.

    cargo run --release -- world --out /tmp/world --count 20000 --seed 0
    python assets/demo-model/train.py --data /tmp/world --out assets/demo-model

(`tests/scripts/train-demo-model` does both in a fresh virtual environment.) Seeded
throughout; on 2 CPU cores it takes about an hour. What it writes is a diffusers
StableDiffusionPipeline folder in fp16 (`*.fp16.safetensors`), which unitune loads like any
model:

1. The VAE (AutoencoderKL, 64 px -> 16x16x4 latents) learns to reconstruct the scenes.
2. Every scene is encoded once; `scaling_factor` is set to 1 / the latents' standard
   deviation, as Stable Diffusion's was.
3. The CLIP text encoder (the real CLIP vocabulary, from the project's bundled tokenizer)
   is pretrained to state each caption's facts at the positions after it, then frozen, as
   Stable Diffusion's pretrained CLIP is.
4. The UNet learns to denoise those latents given a caption: the full caption half the
   time, a partial one (some objects, or only the background) 40 %, no caption 10 % (for
   classifier-free guidance), with Stable Diffusion's noise schedule and a velocity loss.
"""

import argparse
import copy
import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE.parent / "clip-tokenizer"
IMAGE = 64
CROP = 32


def vae_model(levels):
    """`levels` blocks: the latents are 2^(levels-1) times smaller than the image."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(16, 32, 64, 64)[:levels],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE,
    )


def text_model(layers):
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=128,
            intermediate_size=512,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=128,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        )
    )


def unet_model(latent_side):
    return UNet2DConditionModel(
        sample_size=latent_side,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 128, 192),
        layers_per_block=1,
        cross_attention_dim=128,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def scheduler():
    # Stable Diffusion 1.5's own scheduler config, predicting velocity as Stable Diffusion 2
    # (768 px) does: see train_unet for why.
    schedule = PNDMScheduler(
        prediction_type="v_prediction",
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    # Stable Diffusion's config also says `"clip_sample": false` (PNDM itself has no such
    # setting, so it is added to the config). Without it DDIM, in diffusers and unitune
    # alike, clips every step's guess of the latents to [-1, 1], which wipes out scenes whose
    # latents have unit spread (the objects went from 85 % of pixels kept to 34 % at t0 0.5).
    schedule.register_to_config(clip_sample=False)
    return schedule


def load_world(data: Path):
    raw = np.fromfile(data / "images.rgb", dtype=np.uint8)
    images = torch.from_numpy(raw.reshape(-1, IMAGE, IMAGE, 3)).permute(0, 3, 1, 2)
    captions = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == len(images), "one caption line per image"
    return images, captions


def to_unit(images_u8):
    return images_u8.float() / 127.5 - 1.0


def lr_at(step, steps, peak, warmup):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_vae(vae, images, steps, batch, generator, log):
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    start = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3, 50)
        idx = torch.randint(len(images), (batch,), generator=generator)
        # 32 px crops: the VAE is convolutional, so it learns the same from a quarter of the
        # pixels at a quarter of the cost (what fit the 2-core budget).
        ox, oy = torch.randint(0, IMAGE - CROP + 1, (2,), generator=generator).tolist()
        x = to_unit(images[idx, :, oy : oy + CROP, ox : ox + CROP])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=generator
        )
        rec = vae.decode(z).sample
        # Sharp flat colours matter more than anything: L1 + MSE, and a KL just strong
        # enough to keep the latents smooth.
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    vae.eval()


@torch.no_grad()
def encode_all(vae, images, batch=256):
    means, stds = [], []
    for i in range(0, len(images), batch):
        d = vae.encode(to_unit(images[i : i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, texts):
    return tokenizer(
        texts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


# The world's words (src/world/scene.rs and caption.rs), for the text encoder's pretraining
# and the conditioning check.
PALETTE = {
    "red": (230, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 225, 30),
    "green": (30, 170, 60),
    "blue": (30, 70, 230),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ["circle", "square", "triangle"]
SIZES = ["small", "large"]
POSITIONS = [
    "at the top left", "at the top", "at the top right",
    "on the left", "in the middle", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
]  # fmt: skip
OBJECT = re.compile(
    rf"a ({'|'.join(SIZES)}) ({'|'.join(PALETTE)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(sorted(POSITIONS, key=len, reverse=True))})"
)
BACKGROUND = re.compile(rf"on a ({'|'.join(PALETTE)}) background")


def made_up_words(rng, count):
    """Words that mean nothing here ("qovtre", "zimb"), as rare tokens such as UniTune's
    "beikkpic" do: captions are sometimes led by one or two of them, so that the text encoder
    states the caption's facts whatever comes first and the UNet learns that such words change
    nothing until fine-tuning binds one to a photo. Without them a leading "beikkpic" broke
    the caption: "beikkpic on a red background" gave a red frame in 4 of 24 samples,
    "on a red background" in 20 (run 3)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return " ".join(
        "".join(letters[i] for i in rng.integers(len(letters), size=rng.integers(3, 10)))
        for _ in range(count)
    )


def with_made_up_words(rng, text, p):
    """`text`, led by one or two made-up words with probability `p`."""
    if rng.random() >= p:
        return text
    lead = made_up_words(rng, int(rng.integers(1, 3)))
    return f"{lead} {text}" if text else lead


def caption_facts(text):
    """What a caption states, as class numbers: the background's colour, then colour, shape
    and size in each of the nine places; a fact the caption leaves out is its own class."""
    unstated = len(PALETTE)
    facts = [unstated] * (1 + 3 * len(POSITIONS))
    if match := BACKGROUND.search(text):
        facts[0] = list(PALETTE).index(match[1])
    for size, colour, shape, position in OBJECT.findall(text):
        place = 1 + 3 * POSITIONS.index(position)
        facts[place : place + 3] = [
            list(PALETTE).index(colour),
            SHAPES.index(shape),
            SIZES.index(size),
        ]
    return facts


def pretrain_text_encoder(text_encoder, tokenizer, captions, steps, generator, rng, log):
    """Teaches the text encoder to state its caption's facts (background colour; colour, shape
    and size in each place) linearly at every position from the end of the caption on (the
    padding positions, which the causal mask lets see all of it).

    Stable Diffusion's CLIP comes pretrained and stays frozen; ours starts random, and then
    only one of 77 cross-attention positions differs between "on a red background" and "on a
    blue background": the UNet's output moved by 1 % between them and the first runs never
    learned to follow captions. After this stage ~70 positions carry the caption's facts in a
    form one linear map (the cross-attention's values) can read. Half the captions are led by
    made-up words, whose facts are the caption's own.
    """
    texts = sorted({text for scene in captions for text in scene})
    facts = torch.tensor([caption_facts(text) for text in texts])
    classes = len(PALETTE) + 1
    head = torch.nn.Linear(text_encoder.config.hidden_size, facts.shape[1] * classes)
    opt = torch.optim.AdamW(list(text_encoder.parameters()) + list(head.parameters()), lr=1e-3)
    text_encoder.train()
    positions = torch.arange(tokenizer.model_max_length)
    start = time.time()
    for step in range(steps):
        batch = torch.randint(len(texts), (128,), generator=generator)
        ids = tokenize(tokenizer, [with_made_up_words(rng, texts[i], 0.5) for i in batch])
        eos = (ids == tokenizer.eos_token_id).int().argmax(1)
        hidden = text_encoder(ids)[0]
        logits = head(hidden).view(len(batch), ids.shape[1], facts.shape[1], classes)
        after_caption = positions[None] >= eos[:, None]
        target = facts[batch][:, None, :].expand(-1, ids.shape[1], -1)
        logits, target = logits[after_caption], target[after_caption]
        loss = F.cross_entropy(logits.reshape(-1, classes), target.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            accuracy = (logits.argmax(-1) == target).all(-1).float().mean().item()
            log(
                f"text step {step}/{steps} loss {loss.item():.3f}, every fact right at "
                f"{100 * accuracy:.1f} % of positions ({time.time() - start:.0f} s)"
            )
    text_encoder.eval()
    text_encoder.requires_grad_(False)


@torch.no_grad()
def prompt_sensitivity(unet, text_encoder, tokenizer, latent_side, seed):
    """How much the UNet's output changes between "on a red background" and "on a blue
    background" at the first of 20 sampling steps, where the background is decided
    (relative): about 1 % means captions are ignored."""
    context = text_encoder(tokenize(tokenizer, ["on a red background", "on a blue background"]))[0]
    x = torch.randn((1, 4, latent_side, latent_side), generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([951])
    red = unet(x, t, encoder_hidden_states=context[:1]).sample
    blue = unet(x, t, encoder_hidden_states=context[1:]).sample
    return ((red - blue).norm() / red.norm()).item()


def train_unet(
    unet, text_encoder, tokenizer, means, stds, scale, captions, args, generator, rng, log
):
    # Velocity, not noise: a caption decides the background and the objects only at the
    # noisiest steps (below them the noisy latents already show the colours), where the noise
    # is almost all of the input, so predicting noise there is easy and a model trained on the
    # noise loss gains almost nothing from reading the caption; the velocity is close to the
    # scene itself there. (With the noise loss the UNet's output moved by 0.2-3 % between two
    # background prompts after 150 steps and samples ignored them.)
    noise_schedule = DDPMScheduler.from_config(scheduler().config)
    # The text encoder stays as its pretraining left it, as Stable Diffusion's CLIP does.
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    unet.train()
    start = time.time()
    for step in range(args.unet_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.unet_steps, args.lr, 200)
        idx = torch.randint(len(means), (args.batch,), generator=generator)
        latents = (
            means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=generator)
        ) * scale
        texts = []
        for i in idx.tolist():
            u = rng.random()
            if u < 0.1:
                text = ""
            elif u < 0.1 + args.full_caption_p:
                text = captions[i][0]
            else:
                text = captions[i][1 + rng.integers(len(captions[i]) - 1)]
            texts.append(with_made_up_words(rng, text, args.made_up_p))
        with torch.no_grad():
            context = text_encoder(tokenize(tokenizer, texts))[0]
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, 1000, (args.batch,), generator=generator)
        noisy = noise_schedule.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=context).sample
        loss = F.mse_loss(pred, noise_schedule.get_velocity(latents, noise, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == args.unet_steps - 1:
            elapsed = time.time() - start
            sensitivity = prompt_sensitivity(
                unet, text_encoder, tokenizer, latents.shape[-1], args.seed
            )
            log(
                f"unet step {step}/{args.unet_steps} loss {loss.item():.4f}, prompt moves the "
                f"output {100 * sensitivity:.1f} % ({elapsed:.0f} s, {elapsed / (step + 1):.2f} s/step)"
            )
        if args.checkpoint_every and step and step % args.checkpoint_every == 0:
            yield step
        if args.stop_after and step >= args.stop_after:
            break
    unet.eval()


@torch.no_grad()
def conditioning_check(vae, text_encoder, tokenizer, unet, seed, lead=""):
    """The share of "on a X background" samples whose frame is X: whether the captions are
    being learned at all (the first run's samples hardly depended on them). With `lead`
    ("beikkpic "), whether a rare token in front, as UniTune's prompts have, leaves the
    caption working."""
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(scheduler().config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    names = list(PALETTE)
    images = pipe(
        [f"{lead}on a {name} background" for name in names],
        guidance_scale=4.0,
        num_inference_steps=20,
        height=IMAGE,
        width=IMAGE,
        output_type="np",
        generator=torch.Generator().manual_seed(seed),
    ).images
    colours = np.array(list(PALETTE.values()), dtype=np.float32)
    right = 0
    for name, image in zip(names, images):
        frame = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]) * 255
        nearest = np.argmin(((frame[:, None, :] - colours[None]) ** 2).sum(-1), axis=1)
        right += int(np.bincount(nearest, minlength=len(names)).argmax() == names.index(name))
    unet.train()
    return right / len(names)


def prompts_followed(vae, text_encoder, tokenizer, unet, seed):
    plain = conditioning_check(vae, text_encoder, tokenizer, unet, seed)
    led = conditioning_check(vae, text_encoder, tokenizer, unet, seed, lead="beikkpic ")
    return f"background prompts followed: {plain:.2f} (led by \"beikkpic\": {led:.2f})"


def save(out: Path, vae, text_encoder, tokenizer, unet):
    # Copies: rounding the modules being trained to fp16 would change them.
    half = lambda module: copy.deepcopy(module).to(torch.float16)
    pipe = StableDiffusionPipeline(
        vae=half(vae),
        text_encoder=half(text_encoder),
        tokenizer=tokenizer,
        unet=half(unet),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging, variant="fp16", safe_serialization=True)
    for part in ["model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]:
        target = out / part
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        shutil.move(str(staging / part), str(target))
    shutil.rmtree(staging, ignore_errors=True)
    standard_layout(out)


def standard_layout(out: Path):
    """Stable Diffusion's own folder layout, which transformers 5 writes differently, plus
    unitune's key in the pipeline's index."""
    # Its CLIPTextModel saves weights without the `text_model.` prefix of every SD release.
    weights = out / "text_encoder" / "model.fp16.safetensors"
    tensors = load_file(str(weights))
    save_file(
        {k if k.startswith("text_model.") else "text_model." + k: v for k, v in tensors.items()},
        str(weights),
        metadata={"format": "pt"},
    )
    # And the tokenizer as tokenizer.json; SD folders carry vocab.json and merges.txt.
    tokenizer = out / "tokenizer"
    shutil.rmtree(tokenizer)
    tokenizer.mkdir()
    for name in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]:
        shutil.copy(TOKENIZER / name, tokenizer / name)
    # unitune's own key (diffusers ignores keys starting with "_"): the fidelity slider uses
    # the table calibrated for this model (src/engine/fidelity.rs).
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_unitune_fidelity_table"] = "demo"
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="from `unitune world`")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--unet-steps", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--checkpoint-every", type=int, default=400, help="save the model every N UNet steps"
    )
    parser.add_argument("--vae-from", type=Path, help="reuse a trained VAE (a model folder)")
    parser.add_argument(
        "--resume",
        type=Path,
        help="continue a finished run (a model folder): its VAE, text encoder and UNet, trained "
        "for another --unet-steps",
    )
    parser.add_argument("--vae-levels", type=int, default=3, help="3: 16x16 latents, 4: 8x8")
    parser.add_argument("--text-layers", type=int, default=4)
    parser.add_argument("--text-steps", type=int, default=400)
    parser.add_argument("--full-caption-p", type=float, default=0.5)
    parser.add_argument(
        "--made-up-p", type=float, default=0.25, help="share of UNet captions led by made-up words"
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=0,
        help="stop (and save) after the UNet step the log numbers N, keeping the --unet-steps schedule",
    )
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    log_file = open(args.out / "train.log", "a")

    def log(text):
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"train.py {vars(args)}")
    images, captions = load_world(args.data)
    log(f"{len(images)} scenes from {args.data}")
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER)

    if args.resume:
        args.vae_from = args.resume
    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae", variant="fp16").float()
    else:
        vae = vae_model(args.vae_levels)
        train_vae(vae, images, args.vae_steps, args.vae_batch, generator, log)
    vae.eval()
    means, stds = encode_all(vae, images)
    scale = 1.0 / means.std().item()
    vae.register_to_config(scaling_factor=scale)
    with torch.no_grad():
        sample = to_unit(images[:256])
        rec = vae.decode(vae.encode(sample).latent_dist.mean).sample
        log(f"vae reconstruction MSE {F.mse_loss(rec, sample).item():.5f}, scaling_factor {scale:.4f}")

    if args.resume:
        # Another UNet schedule on top of a finished run: its frozen text encoder and UNet.
        text_encoder = CLIPTextModel.from_pretrained(
            args.resume, subfolder="text_encoder", variant="fp16"
        ).float()
        text_encoder.requires_grad_(False)
        unet = UNet2DConditionModel.from_pretrained(
            args.resume, subfolder="unet", variant="fp16"
        ).float()
    else:
        text_encoder = text_model(args.text_layers)
        pretrain_text_encoder(
            text_encoder, tokenizer, captions, args.text_steps, generator, rng, log
        )
        unet = unet_model(means.shape[-1])
    count = lambda m: sum(p.numel() for p in m.parameters())
    log(
        f"parameters: unet {count(unet) / 1e6:.2f} M, text encoder {count(text_encoder) / 1e6:.2f} M, "
        f"vae {count(vae) / 1e6:.2f} M"
    )
    for step in train_unet(
        unet, text_encoder, tokenizer, means, stds, scale, captions, args, generator, rng, log
    ):
        save(args.out, vae, text_encoder, tokenizer, unet)
        log(f"saved at step {step}; {prompts_followed(vae, text_encoder, tokenizer, unet, args.seed)}")
    save(args.out, vae, text_encoder, tokenizer, unet)
    log(f"done; {prompts_followed(vae, text_encoder, tokenizer, unet, args.seed)}")


if __name__ == "__main__":
    main()
