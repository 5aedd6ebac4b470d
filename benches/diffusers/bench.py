#!/usr/bin/env python3
"""The measurements `unitune bench` makes, made with diffusers on PyTorch, printed as the same
JSON so that `compare.py` can set them side by side.

Same architecture (built from the same `assets/arch/` configs with random weights: compute and
memory do not depend on the values), same sizes, same batch layout:

- pass: one forward and backward of the denoising loss at batch 1 (per training mode, with
  and without gradient checkpointing);
- step: one optimizer step at batch 4 (gradient accumulation over micro-batches), the second
  of two so that optimizer state allocation is not timed; full fine-tuning with AdamW and
  with Adafactor (the UniTune paper's optimizer);
- sampling_step: one classifier-free-guided DDIM step (UNet on a batch of 2);
- SDXL (`--arch sdxl`): both text encoders (their penultimate states joined, the pooled
  projection), the UNet's added conditioning (pooled text and the six size numbers of the
  working size) in every UNet call, and `StableDiffusionXLImg2ImgPipeline` for the run's edit;
- vae_encode / vae_decode at the image size;
- unitune_run: a whole UniTune run as diffusers code would do it: fine-tune N steps at batch
  4, saving the trained weights at the paper's 1/8, 1/4, 1/2 and full ladder, then one img2img
  edit (strength = SDEdit t0 0.9, guidance 7.5) from the last.

Training modes: full (every UNet weight), attention (q, k, v, out of attn1 and attn2),
cross-kv (attn2's k and v weights), lora (PEFT LoRA rank 8 on the attention projections).
Precision: f32, or half (f16/bf16) the way diffusers' training scripts do it: frozen weights
in half, trained weights in f32, the forward under autocast.

Memory: peak resident memory of the process on the CPU (reset through
/proc/self/clear_refs), peak of torch's CUDA allocator on CUDA; each also above the memory in
use when the measurement started.

Needs torch, diffusers, transformers, peft and safetensors (see README.md here); never runs
in CI.
"""

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import random_pipeline  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
PAPER_SNAPSHOTS = [16, 32, 64, 128]
ATTENTION_PROJECTIONS = ["to_q", "to_k", "to_v", "to_out.0"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="sd15", choices=["sd15", "sd21", "sdxl"])
    p.add_argument("--size", default=None, help="WxH, default the architecture's native size")
    p.add_argument("--precision", default="f32", choices=["f32", "f16", "bf16"])
    p.add_argument("--modes", default="full,attention,cross-kv,lora")
    p.add_argument("--measure", default="pass,step,sample,vae,run")
    p.add_argument("--without-checkpointing", action="store_true",
                   help="also measure passes without gradient checkpointing")
    p.add_argument("--checkpointing", default="on", choices=["on", "off"],
                   help="gradient checkpointing in steps and the whole run")
    p.add_argument("--steps", type=int, default=128, help="fine-tuning steps of the whole run")
    p.add_argument("--sampling-steps", type=int, default=50)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--run-mode", default="full")
    p.add_argument("--out", default=None)
    return p.parse_args()


class Probe:
    """Current and peak memory, as `unitune bench` measures them."""

    def __init__(self, device):
        self.device = device

    def reset_peak(self):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    @staticmethod
    def _status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return None

    def current(self):
        import torch

        if self.device == "cuda":
            return torch.cuda.memory_allocated()
        return self._status("VmRSS:")

    def peak(self):
        import torch

        if self.device == "cuda":
            return torch.cuda.max_memory_allocated()
        return self._status("VmHWM:")


def sync(device):
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def release_free_memory():
    """Hands memory malloc keeps for reuse back to the system, so that it does not count as
    in use at a measurement's start (glibc only; `unitune bench` does the same)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(probe, device, fn):
    """Runs fn (which may return the seconds that count) and returns time and memory."""
    import gc

    gc.collect()
    release_free_memory()
    sync(device)
    probe.reset_peak()
    start = probe.current()
    t0 = time.perf_counter()
    counted = fn()
    sync(device)
    seconds = counted if counted is not None else time.perf_counter() - t0
    peak = probe.peak()
    return {
        "seconds": seconds,
        "start_bytes": start,
        "peak_bytes": peak,
        "peak_above_start_bytes": max(0, peak - start) if peak and start else None,
    }


def dtype_of(name):
    import torch

    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def trains(mode, name):
    """Whether parameter `name` trains in `mode` (LoRA: the adapter's own parameters)."""
    if mode == "lora":
        return "lora_" in name
    if "lora_" in name:
        return False
    if mode == "full":
        return True
    in_attention = ".attn1." in name or ".attn2." in name
    projection = any(f".{p}." in name for p in ATTENTION_PROJECTIONS)
    if mode == "attention":
        return in_attention and projection
    if mode == "cross-kv":
        return ".attn2." in name and (".to_k." in name or ".to_v." in name) and name.endswith(".weight")
    raise SystemExit(f"unknown mode {mode}")


class Trainer:
    """One UNet set up for a training mode the way diffusers' training scripts do it."""

    def __init__(self, unet, mode, precision, device, lora_rank=8):
        import torch

        self.unet = unet
        self.mode = mode
        half = precision != "f32"
        has_lora = any("lora_" in n for n, _ in unet.named_parameters())
        if mode == "lora" and not has_lora:
            from peft import LoraConfig

            unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                        target_modules=ATTENTION_PROJECTIONS))
        elif mode == "lora":
            unet.enable_adapters()
        elif has_lora:
            unet.disable_adapters()
        self.params = []
        for name, p in unet.named_parameters():
            train = trains(mode, name)
            p.requires_grad_(train)
            if train:
                self.params.append(p)
        # Trained weights in f32 (the master copy), frozen ones in the compute precision.
        compute = dtype_of(precision)
        for name, p in unet.named_parameters():
            p.data = p.data.to(torch.float32 if (p.requires_grad or not half) else compute)
        self.autocast = half
        self.compute = compute
        self.device = device
        unet.train()

    def set_checkpointing(self, on):
        if on:
            self.unet.enable_gradient_checkpointing()
        else:
            self.unet.disable_gradient_checkpointing()

    def loss(self, latents, noise, timesteps, prompt, scheduler):
        import torch
        import torch.nn.functional as F

        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(self.device, dtype=self.compute, enabled=self.autocast):
            pred = self.unet(noisy, timesteps, prompt.context, added_cond_kwargs=prompt.added).sample
        return F.mse_loss(pred.float(), noise.float())


def build(args, device):
    import torch

    precision = args.precision
    compute = dtype_of(precision)
    unet = random_pipeline.build_unet(args.arch, torch.float32, device)
    vae_config = random_pipeline.load_config(args.arch, "vae")
    # diffusers upcasts an f16 VAE whose config says force_upcast (SD 1.x's overflows).
    vae_dtype = torch.float32 if (precision == "f16" and vae_config.get("force_upcast", True)) else compute
    vae = random_pipeline.build_vae(args.arch, vae_dtype, device)
    text_encoder = random_pipeline.build_text_encoder(args.arch, compute, device)
    text_encoder_2 = None
    if random_pipeline.has_second_text_encoder(args.arch):
        text_encoder_2 = random_pipeline.build_text_encoder_2(args.arch, compute, device)
    scheduler = random_pipeline.build_scheduler(args.arch)
    return unet, vae, (text_encoder, text_encoder_2), scheduler


class Prompt:
    """What the UNet is conditioned on: the context, and SDXL's added conditioning (pooled text
    and size numbers) or None."""

    def __init__(self, context, added=None):
        self.context = context
        self.added = added

    def to(self, dtype):
        added = None if self.added is None else {k: v.to(dtype) for k, v in self.added.items()}
        return Prompt(self.context.to(dtype), added)

    def repeat(self, n):
        added = None if self.added is None else {k: v.repeat(n, 1) for k, v in self.added.items()}
        return Prompt(self.context.repeat(n, 1, 1), added)

    @staticmethod
    def cat(prompts):
        import torch

        added = None
        if prompts[0].added is not None:
            added = {k: torch.cat([p.added[k] for p in prompts]) for k in prompts[0].added}
        return Prompt(torch.cat([p.context for p in prompts]), added)


def encode_prompt(encoders, tokenizers, prompt, device, size):
    """SD: the text encoder's last state. SDXL: as StableDiffusionXLPipeline.encode_prompt
    (both encoders' penultimate states joined, the second's pooled projection, the size numbers
    of an uncropped image at `size` = (height, width); an empty prompt is zeros, as
    force_zeros_for_empty_prompt makes the negative prompt)."""
    import torch

    def ids(tokenizer):
        return tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    first, second = encoders
    with torch.no_grad():
        if second is None:
            return Prompt(first(ids(tokenizers[0]))[0])
        h, w = size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=first.dtype, device=device)
        a = first(ids(tokenizers[0]), output_hidden_states=True)
        b = second(ids(tokenizers[1]), output_hidden_states=True)
        context = torch.cat([a.hidden_states[-2], b.hidden_states[-2]], dim=-1)
        pooled = b.text_embeds
        if not prompt:
            context, pooled = torch.zeros_like(context), torch.zeros_like(pooled)
        return Prompt(context, {"text_embeds": pooled, "time_ids": time_ids})


def main():
    args = parse_args()
    import torch
    from transformers import CLIPTokenizer

    torch.manual_seed(0)
    device = args.device
    side = {"sd21": 768, "sdxl": 1024}.get(args.arch, 512)
    width, height = (int(v) for v in args.size.split("x")) if args.size else (side, side)
    modes = [m for m in args.modes.split(",") if m]
    # LoRA adds adapters to the UNet in place: measure it last.
    modes.sort(key=lambda m: m == "lora")
    measures = set(args.measure.split(","))
    probe = Probe(device)

    probe.reset_peak()
    t0 = time.perf_counter()
    unet, vae, encoders, scheduler = build(args, device)
    sync(device)
    load = {"seconds": time.perf_counter() - t0, "memory_bytes": probe.current()}
    vocab = (str(REPO / "assets/clip-tokenizer/vocab.json"), str(REPO / "assets/clip-tokenizer/merges.txt"))
    # SDXL's second tokenizer is the same vocabulary padded with `!`.
    # model_max_length: the pipelines pad and truncate to it (built from files, it is unset).
    tokenizers = (CLIPTokenizer(*vocab, model_max_length=77),
                  CLIPTokenizer(*vocab, pad_token="!", model_max_length=77))

    def encode(prompt):
        return encode_prompt(encoders, tokenizers, prompt, device, (height, width))

    context = encode("beikkpic")
    latent_shape = (1, 4, height // 8, width // 8)
    results = []

    def report(name, value):
        print(f"bench: {name} {json.dumps(value)}", file=sys.stderr, flush=True)
        results.append(value)

    g = torch.Generator(device="cpu").manual_seed(2)

    def randn(shape, dtype=torch.float32):
        return torch.randn(shape, generator=g).to(device=device, dtype=dtype)

    if "pass" in measures:
        for mode in modes:
            trainer = Trainer(unet, mode, args.precision, device)
            for checkpoint in ([True, False] if args.without_checkpointing else [True]):
                trainer.set_checkpointing(checkpoint)
                latents, noise = randn(latent_shape), randn(latent_shape)
                t = torch.tensor([500], device=device)
                ctx = context.to(trainer.compute if trainer.autocast else torch.float32)

                def one_pass():
                    trainer.loss(latents, noise, t, ctx, scheduler).backward()

                if device == "cuda":
                    one_pass()
                for p in trainer.params:
                    p.grad = None
                m = measure(probe, device, one_pass)
                for p in trainer.params:
                    p.grad = None
                m.update({"name": "pass", "mode": mode, "batch": 1, "checkpointing": checkpoint})
                report("pass", m)

    def optimizer_for(params, kind):
        if kind == "adamw":
            return torch.optim.AdamW(params, lr=1e-4)
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-4, relative_step=False, scale_parameter=False, warmup_init=False)

    def train(trainer, kind, steps, micro, on_step=None):
        optimizer = optimizer_for(trainer.params, kind)
        passes = 4 // micro
        ctx = context.to(trainer.compute if trainer.autocast else torch.float32).repeat(micro)
        for step in range(1, steps + 1):
            for _ in range(passes):
                shape = (micro,) + latent_shape[1:]
                t = torch.randint(0, 1000, (micro,), device=device)
                loss = trainer.loss(randn(shape), randn(shape), t, ctx, scheduler) / passes
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step:
                on_step(step)
        return optimizer

    if "step" in measures:
        variants = []
        for mode in modes:
            variants += [(mode, "adamw"), (mode, "adafactor")] if mode == "full" else [(mode, "adafactor")]
        for mode, kind in variants:
            trainer = Trainer(unet, mode, args.precision, device)
            trainer.set_checkpointing(args.checkpointing == "on")
            marks = {}

            def two_steps():
                train(trainer, kind, 2, args.micro_batch, lambda s: (sync(device), marks.__setitem__(s, time.perf_counter())))
                return marks[2] - marks[1]

            m = measure(probe, device, two_steps)
            m.update({"name": "step", "mode": mode, "batch": 4, "micro_batch": args.micro_batch,
                      "optimizer": kind, "checkpointing": args.checkpointing == "on"})
            report("step", m)

    # Sampling: the UNet in the compute precision, no gradients.
    def sampling_unet():
        unet.eval()
        for p in unet.parameters():
            p.requires_grad_(False)
            p.data = p.data.to(dtype_of(args.precision))
        return unet

    if "sample" in measures:
        model = sampling_unet()
        compute = dtype_of(args.precision)
        both = Prompt.cat([encode(""), encode("a photo of a cat")]).to(compute)
        scheduler.set_timesteps(3)
        marks = []

        def denoise():
            latents = randn(latent_shape, compute)
            with torch.no_grad():
                for t in scheduler.timesteps:
                    out = model(torch.cat([latents] * 2), t, both.context,
                                added_cond_kwargs=both.added).sample
                    base, prompted = out.chunk(2)
                    guided = base + 7.5 * (prompted - base)
                    latents = scheduler.step(guided, t, latents).prev_sample
                    sync(device)
                    marks.append(time.perf_counter())
            return (marks[-1] - marks[0]) / (len(marks) - 1)

        m = measure(probe, device, denoise)
        m.update({"name": "sampling_step", "guidance": 7.5, "batch": 2})
        report("sampling_step", m)

    if "vae" in measures:
        image = torch.rand((1, 3, height, width), generator=g).to(device=device, dtype=vae.dtype) * 2 - 1
        holder = {}

        def encode():
            with torch.no_grad():
                holder["latents"] = vae.encode(image).latent_dist.sample() * vae.config.scaling_factor

        def decode():
            with torch.no_grad():
                vae.decode(holder["latents"] / vae.config.scaling_factor)

        if device == "cuda":
            encode()
            decode()
        for name, fn in [("vae_encode", encode), ("vae_decode", decode)]:
            m = measure(probe, device, fn)
            m["name"] = name
            report(name, m)

    if "run" in measures and args.steps > 0:
        from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline
        from PIL import Image
        from safetensors.torch import save_file

        ladder = sorted({max(1, -(-s * args.steps // 128)) for s in PAPER_SNAPSHOTS})
        trainer = Trainer(unet, args.run_mode, args.precision, device)
        trainer.set_checkpointing(args.checkpointing == "on")
        names = [n for n, p in unet.named_parameters() if p.requires_grad]
        snapshot_dir = tempfile.mkdtemp()
        photo = Image.new("RGB", (width, height), (120, 160, 200))
        timing = {}

        def run():
            t0 = time.perf_counter()

            def keep(step):
                if step in ladder:
                    params = dict(unet.named_parameters())
                    state = {n: params[n].detach().to(dtype_of(args.precision)).contiguous() for n in names}
                    save_file(state, os.path.join(snapshot_dir, f"{step}.safetensors"))

            train(trainer, "adafactor", args.steps, args.micro_batch, keep)
            sync(device)
            timing["tune"] = time.perf_counter() - t0
            # The fine-tune's own peak, before the edit's VAE decode (as `unitune bench`).
            timing["tune_peak"] = probe.peak()
            if encoders[1] is None:
                pipe = StableDiffusionImg2ImgPipeline(
                    vae=vae, text_encoder=encoders[0], tokenizer=tokenizers[0], unet=sampling_unet(),
                    scheduler=scheduler, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False)
            else:
                pipe = StableDiffusionXLImg2ImgPipeline(
                    vae=vae, text_encoder=encoders[0], text_encoder_2=encoders[1],
                    tokenizer=tokenizers[0], tokenizer_2=tokenizers[1], unet=sampling_unet(),
                    scheduler=scheduler, requires_aesthetics_score=False,
                    force_zeros_for_empty_prompt=True)
            pipe.set_progress_bar_config(disable=True)
            pipe("beikkpic a cat wearing sunglasses", image=photo, strength=0.9, guidance_scale=7.5,
                 num_inference_steps=args.sampling_steps, output_type="np")
            return None

        m = measure(probe, device, run)
        m.update({"name": "unitune_run", "mode": args.run_mode, "tune_steps": args.steps,
                  "snapshots": ladder, "micro_batch": args.micro_batch,
                  "sampling_steps": args.sampling_steps, "optimizer": "adafactor",
                  "tune_seconds": timing.get("tune"), "tune_peak_bytes": timing.get("tune_peak")})
        report("unitune_run", m)

    device_name = device
    if device == "cuda":
        device_name = f"cuda:0 ({torch.cuda.get_device_name(0)})"
    output = {
        "tool": "diffusers",
        "version": __import__("diffusers").__version__,
        "torch": torch.__version__,
        "device": device_name,
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "width": width,
        "height": height,
        "precision": args.precision,
        "memory": "peak resident memory of the process" if device == "cpu" else "peak of torch's CUDA allocator",
        "load": load,
        "results": results,
    }
    text = json.dumps(output, indent=2)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
