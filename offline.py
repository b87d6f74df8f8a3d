"""Stable Diffusion 1.x built offline, with random weights.

Nothing here is part of the method. It lets everything else run where no model
hub can be reached: the tests, the benchmark (bench.py) and the toy world.

- `clip_tokenizer()`: SD-1.4's real CLIP tokenizer, rebuilt from the BPE merges
  file that the `open_clip_torch` wheel carries (49,408 tokens).
- `sd14_configs()`: the SD-1.4 UNet / text encoder / VAE architecture as
  explicit configs (859.5M UNet parameters), and `tiny_configs()`, the same
  shapes shrunk so that a forward pass takes milliseconds on a CPU.
- `save_random_pipeline(folder, ...)`: a random-weight pipeline written with
  `save_pretrained`, a folder that `sample.load_model` (and diffusers'
  `StableDiffusionPipeline.from_pretrained`) reads like a real checkpoint.

    python offline.py tiny /tmp/tiny-sd   # then: python erase.py --model /tmp/tiny-sd ...
"""
import argparse
import gzip
import importlib.util
import json
import os
import tempfile

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

# SD-1.4's scheduler config (scheduler/scheduler_config.json of the checkpoint)
SD14_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, prediction_type="epsilon")


def clip_tokenizer():
    """SD-1.4's tokenizer: vocab = 256 byte symbols, the same with </w>, one token per
    merge (the first 48,894), then <|startoftext|>, <|endoftext|>; 49,408 entries."""
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
        # SD-1.4 pads with <|endoftext|> (49407), not 0 as open_clip does
        return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt", model_max_length=77,
                             pad_token="<|endoftext|>")


def sd14_configs():
    """SD-1.4's architecture: UNet (320, 640, 1280, 1280), CLIP ViT-L/14 text encoder, VAE."""
    unet = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
                cross_attention_dim=768,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    text = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
               block_out_channels=(128, 256, 512, 512), layers_per_block=2,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return unet, text, vae


def tiny_configs(sample_size=8, width=32):
    """SD-1.x shapes shrunk: two UNet levels, 1 layer each, cross-attention dim `width`."""
    unet = dict(sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
                block_out_channels=(width, 2 * width), attention_head_dim=8,
                cross_attention_dim=width, norm_num_groups=width // 2,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    text = dict(vocab_size=49408, hidden_size=width, intermediate_size=2 * width,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    vae = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=2 * sample_size,
               block_out_channels=(width, width), layers_per_block=1, norm_num_groups=width // 2,
               down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return unet, text, vae


def build(configs, seed=0, vae=True):
    """Random-weight (tokenizer, text_encoder, unet, vae or None, scheduler)."""
    unet_cfg, text_cfg, vae_cfg = configs
    torch.manual_seed(seed)
    return (clip_tokenizer(), CLIPTextModel(CLIPTextConfig(**text_cfg)).eval(),
            UNet2DConditionModel(**unet_cfg), AutoencoderKL(**vae_cfg) if vae else None,
            DDIMScheduler(**SD14_SCHEDULER))


def save_pipeline(folder, tokenizer, text_encoder, unet, vae, scheduler):
    """Write a diffusers folder (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/,
    vae/ unless vae is None, all safetensors) that loads like a real SD-1.x checkpoint."""
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   unet=unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def save_random_pipeline(folder, configs=None, seed=0):
    return save_pipeline(folder, *build(configs or tiny_configs(), seed))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="write a random-weight SD-1.x folder")
    p.add_argument("size", choices=["tiny", "sd14"])
    p.add_argument("folder")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    save_random_pipeline(a.folder, tiny_configs() if a.size == "tiny" else sd14_configs(), a.seed)
    print(f"wrote a random {a.size} pipeline to {a.folder}")
