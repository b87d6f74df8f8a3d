"""Stable Diffusion 1.x, 2.x and XL built offline, with random weights.

Nothing here is part of the method. It lets everything else run where no model
hub can be reached: the tests, the benchmark (bench.py) and the toy world.

- `clip_tokenizer()`: SD-1.4's real CLIP tokenizer, rebuilt from the BPE merges
  file that the `open_clip_torch` wheel carries (49,408 tokens); with pad "!" it is
  SD-2's and SDXL's second tokenizer (open_clip pads with id 0).
- `configs(kind, size)`: the architectures as explicit configs, full size (SD-1.4,
  SD-2.1, SDXL-base: bench.py's counts) or shrunk so that a forward pass takes
  milliseconds on a CPU ("tiny"). Kinds: sd1, sd2 (512 px, epsilon), sd2-v (768 px,
  v-prediction), sdxl (two text encoders, pooled embedding, micro-conditioning).
- `save_random_pipeline(folder, kind)`: a random-weight pipeline written with
  `save_pretrained`, a folder that `family.load_model` (and diffusers' own
  StableDiffusionPipeline / StableDiffusionXLPipeline) reads like a real checkpoint.

    python offline.py tiny /tmp/tiny-sd             # then: python erase.py --model /tmp/tiny-sd ...
    python offline.py tiny /tmp/tiny-sdxl --kind sdxl
"""
import argparse
import gzip
import importlib.util
import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

KINDS = ("sd1", "sd2", "sd2-v", "sdxl")
# SD-1.4's scheduler config (scheduler/scheduler_config.json of the checkpoint); SD-2.x and SDXL
# share its betas (SD-2.1 768: v_prediction; SDXL ships an Euler scheduler with the same betas)
SD14_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, prediction_type="epsilon")
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                      prediction_type="epsilon")


def clip_tokenizer(pad="<|endoftext|>"):
    """SD-1.4's tokenizer: vocab = 256 byte symbols, the same with </w>, one token per
    merge (the first 48,894), then <|startoftext|>, <|endoftext|>; 49,408 entries.
    pad="!" (id 0) gives SD-2's tokenizer and SDXL's tokenizer_2 (open_clip's padding)."""
    spec = importlib.util.find_spec("open_clip")  # locate the file without importing open_clip
    if spec is None:
        raise RuntimeError("the CLIP merges file comes with open_clip_torch: "
                           "pip install -r requirements.txt")
    path = os.path.join(os.path.dirname(spec.origin), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    # the 256 byte symbols in GPT-2's printable byte-to-unicode order
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    symbols = [chr(c) for c in cs]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        json.dump({tok: i for i, tok in enumerate(vocab)}, open(f"{d}/vocab.json", "w"))
        with open(f"{d}/merges.txt", "w") as f:
            f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
        # SD-1.4 pads with <|endoftext|> (49407); open_clip (SD-2, SDXL's second) with "!" (0)
        return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt", model_max_length=77, pad_token=pad)


def text_config(width, layers, heads, act, projection=None, inner=4):
    """A CLIP text encoder's config: the real vocabulary and 77 positions."""
    return dict(vocab_size=49408, hidden_size=width, intermediate_size=inner * width, num_hidden_layers=layers,
                num_attention_heads=heads, max_position_embeddings=77, hidden_act=act,
                projection_dim=projection or width, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)


def vae_config(sample_size, widths, layers=2, **extra):
    n = len(widths)
    return dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=sample_size,
                block_out_channels=widths, layers_per_block=layers, down_block_types=("DownEncoderBlock2D",) * n,
                up_block_types=("UpDecoderBlock2D",) * n, **extra)


def sd14_configs():
    """SD-1.4's architecture: UNet (320, 640, 1280, 1280), CLIP ViT-L/14 text encoder, VAE."""
    unet = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    text = text_config(768, 12, 12, "quick_gelu")
    return unet, text, vae_config(512, (128, 256, 512, 512))


def tiny_configs(sample_size=8, width=32):
    """SD-1.x shapes shrunk: two UNet levels, 1 layer each, cross-attention dim `width`."""
    unet = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(width, 2 * width), attention_head_dim=8,
                cross_attention_dim=width, norm_num_groups=width // 2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text = text_config(width, 2, 4, "quick_gelu", inner=2)
    vae = vae_config(2 * sample_size, (width, width), 1, norm_num_groups=width // 2)
    return unet, text, vae


def configs(kind="sd1", size="tiny", latent=None):
    """dict(unet, texts (one config per text encoder), vae, scheduler, pipeline) of a kind.
    Full size: SD-1.4, SD-2.1 (768-v; sd2 is 2.1-base, the same at 512 px), SDXL-base 1.0.
    latent: another latent side (the image side follows)."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind} is not one of {KINDS}")
    tiny = size == "tiny"
    unet, text, vae = tiny_configs() if tiny else sd14_configs()
    out = dict(unet=unet, texts=[text], vae=vae, scheduler=dict(SD14_SCHEDULER), pipeline="StableDiffusionPipeline")
    if kind in ("sd2", "sd2-v"):  # OpenCLIP ViT-H text encoder (penultimate layer: 23 of 24), linear projections
        out["unet"] = dict(unet, use_linear_projection=True, upcast_attention=kind == "sd2-v",
                           attention_head_dim=(2, 4) if tiny else (5, 10, 20, 20),
                           **({} if tiny else dict(cross_attention_dim=1024)))
        out["texts"] = [dict(text, hidden_act="gelu") if tiny else text_config(1024, 23, 16, "gelu", 512)]
        if kind == "sd2-v":  # 768 px, v-prediction
            out["scheduler"]["prediction_type"] = "v_prediction"
            out["unet"]["sample_size"] = unet["sample_size"] if tiny else 96
            out["vae"] = dict(vae, sample_size=vae["sample_size"] if tiny else 768)
    if kind == "sdxl":
        h1, h2 = (32, 64) if tiny else (768, 1280)  # CLIP ViT-L and OpenCLIP ViT-bigG
        t = 8 if tiny else 256  # addition_time_embed_dim
        out["unet"] = dict(sample_size=8 if tiny else 128, in_channels=4, out_channels=4, layers_per_block=1 if tiny else 2,
                           block_out_channels=(32, 64) if tiny else (320, 640, 1280),
                           down_block_types=("DownBlock2D", "CrossAttnDownBlock2D") if tiny else
                           ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                           up_block_types=("CrossAttnUpBlock2D", "UpBlock2D") if tiny else
                           ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                           transformer_layers_per_block=(1, 2) if tiny else (1, 2, 10),
                           attention_head_dim=(2, 4) if tiny else (5, 10, 20), cross_attention_dim=h1 + h2,
                           use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=t,
                           projection_class_embeddings_input_dim=6 * t + h2,
                           **(dict(norm_num_groups=16) if tiny else {}))
        out["texts"] = [dict(text) if tiny else text_config(h1, 12, 12, "quick_gelu"),
                        dict(text_config(h2, 2, 4, "gelu", inner=2)) if tiny else text_config(h2, 32, 20, "gelu")]
        out["vae"] = dict(vae, sample_size=vae["sample_size"] if tiny else 1024, scaling_factor=0.13025,
                          force_upcast=True)
        out["scheduler"] = dict(SDXL_SCHEDULER)
        out["pipeline"] = "StableDiffusionXLPipeline"
    if latent:
        scale = out["vae"]["sample_size"] // out["unet"]["sample_size"]
        out["unet"] = dict(out["unet"], sample_size=latent)
        out["vae"] = dict(out["vae"], sample_size=latent * scale)
    return out


def build(cfg, seed=0, vae=True):
    """Random-weight parts of a pipeline from configs(...): a dict with tokenizer, text_encoder,
    unet, vae (None unless vae), scheduler, and for SDXL tokenizer_2 and text_encoder_2."""
    torch.manual_seed(seed)
    xl = cfg["pipeline"] == "StableDiffusionXLPipeline"
    sd2 = cfg["texts"][0]["hidden_act"] == "gelu"  # OpenCLIP's text encoder pads with "!"
    parts = dict(tokenizer=clip_tokenizer("!" if sd2 else "<|endoftext|>"),
                 text_encoder=CLIPTextModel(CLIPTextConfig(**cfg["texts"][0])).eval(),
                 unet=UNet2DConditionModel(**cfg["unet"]), vae=AutoencoderKL(**cfg["vae"]) if vae else None,
                 scheduler=(EulerDiscreteScheduler if xl else DDIMScheduler)(**cfg["scheduler"]))
    if xl:
        parts.update(tokenizer_2=clip_tokenizer("!"),
                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**cfg["texts"][1])).eval())
    return parts


def save_pipeline(folder, parts):
    """Write a diffusers folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/,
    vae/ unless parts["vae"] is None, SDXL's second encoder, all safetensors) that loads like a
    real checkpoint."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    if "text_encoder_2" in parts:
        pipe = StableDiffusionXLPipeline(**parts, image_encoder=None, feature_extractor=None)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_random_pipeline(folder, kind="sd1", seed=0, cfg=None):
    return save_pipeline(folder, build(cfg or configs(kind), seed))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="write a random-weight SD-1.x, SD-2.x or SDXL folder")
    p.add_argument("size", choices=["tiny", "full"])
    p.add_argument("folder")
    p.add_argument("--kind", default="sd1", choices=KINDS)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    save_random_pipeline(a.folder, a.kind, a.seed, configs(a.kind, a.size))
    print(f"wrote a random {a.size} {a.kind} pipeline to {a.folder}")
