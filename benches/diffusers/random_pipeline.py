"""Stable Diffusion pipelines with random weights, built from the real architecture configs in
`assets/arch/<arch>/` (the same files `unitune bench` builds its models from).

Compute time and memory do not depend on the weights' values, so these stand in for the real
models wherever quality is not the question, with no download.
"""

import json
import pathlib

ARCH_DIR = pathlib.Path(__file__).resolve().parents[2] / "assets" / "arch"


def load_config(arch: str, part: str) -> dict:
    return json.loads((ARCH_DIR / arch / f"{part}.json").read_text())


def build_unet(arch: str, dtype, device):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = {k: v for k, v in load_config(arch, "unet").items() if not k.startswith("_")}
    return UNet2DConditionModel.from_config(config).to(device=device, dtype=dtype)


def build_vae(arch: str, dtype, device):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    config = {k: v for k, v in load_config(arch, "vae").items() if not k.startswith("_")}
    return AutoencoderKL.from_config(config).to(device=device, dtype=dtype)


def build_text_encoder(arch: str, dtype, device):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    config = CLIPTextConfig(**load_config(arch, "text_encoder"))
    return CLIPTextModel(config).to(device=device, dtype=dtype)


def has_second_text_encoder(arch: str) -> bool:
    """SDXL: OpenCLIP ViT-bigG with its projection beside CLIP ViT-L."""
    return (ARCH_DIR / arch / "text_encoder_2.json").exists()


def build_text_encoder_2(arch: str, dtype, device):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(3)
    config = CLIPTextConfig(**load_config(arch, "text_encoder_2"))
    return CLIPTextModelWithProjection(config).to(device=device, dtype=dtype)


def build_scheduler(arch: str):
    from diffusers import DDIMScheduler

    config = {k: v for k, v in load_config(arch, "scheduler").items() if not k.startswith("_")}
    return DDIMScheduler.from_config(config)


def save_pipeline(arch: str, folder: str, fp16: bool = True) -> None:
    """Writes a diffusers folder (weights only where they are needed to load it)."""
    import torch

    dtype = torch.float16 if fp16 else torch.float32
    out = pathlib.Path(folder)
    build_unet(arch, dtype, "cpu").save_pretrained(out / "unet", safe_serialization=True)
    build_vae(arch, dtype, "cpu").save_pretrained(out / "vae", safe_serialization=True)
    encoder = build_text_encoder(arch, dtype, "cpu")
    # transformers 5 drops the `text_model.` prefix that real SD checkpoints carry.
    from safetensors.torch import save_file

    (out / "text_encoder").mkdir(parents=True, exist_ok=True)
    state = {
        (k if k.startswith("text_model.") else f"text_model.{k}"): v.contiguous()
        for k, v in encoder.state_dict().items()
    }
    save_file(state, out / "text_encoder" / "model.safetensors")
    (out / "text_encoder" / "config.json").write_text(
        json.dumps(load_config(arch, "text_encoder"), indent=2)
    )
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    (out / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(load_config(arch, "scheduler"), indent=2)
    )


if __name__ == "__main__":
    import sys

    save_pipeline(sys.argv[1], sys.argv[2], fp16=len(sys.argv) < 4 or sys.argv[3] != "fp32")
