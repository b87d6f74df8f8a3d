"""Model loading, prompt encoding, and the DDIM sampler with classifier-free guidance.

The sampler serves two purposes:
- Algorithm 2's z_t: DDIM from Gaussian noise, run with the model being trained
  and stopped after a random number of steps (erase.py calls `ddim(..., stop=t)`);
- pictures: the full loop, decoded with the VAE, the original model beside the
  erased one. With the same seed, scheduler and guidance it agrees with diffusers'
  StableDiffusionPipeline + DDIMScheduler (tests/test_sample.py checks this).

    python sample.py --prompts "garbage truck, church" --seeds 0 1 2 --weights out/weights.safetensors
    python sample.py --csv imagenette.csv --out_dir gen/erased --weights out/weights.safetensors

The second form generates a prompt file into a folder of PNGs for evaluate.py (Section 5's
settings: 100 DDIM steps, guidance 7.5), resumable, and sharded across GPUs when started with
`torchrun --nproc_per_node 8 sample.py ...` or `accelerate launch sample.py ...`.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from tqdm import tqdm

from cli import UsageError, default_device, one_line_errors, read_csv, run_cli

SD14 = "CompVis/stable-diffusion-v1-4"
TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "model")


def load_model(model=SD14, device="cpu", vae=True):
    """Tokenizer, text encoder, UNet, VAE (None for a pixel-space model, or when vae=False:
    erase.py trains without decoding) and DDIM scheduler of an SD-1.x checkpoint: a hub id,
    a local diffusers folder, or "toy" (toy.py's model). Only safetensors are read, always
    as float32 (fp16-stored derivatives included). The scheduler's config is read first:
    a v-prediction model is refused before any weights are loaded (Section 3: SD-1.x
    predicts epsilon). Everything is frozen; erase.py chooses what to train."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer
    path = TOY if model == "toy" else model
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise UsageError(f"{model} is not a diffusers folder (no model_index.json)")
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UsageError(f"model {model} does not exist (give a hub id or a diffusers folder)")
    try:
        index = DiffusionPipeline.load_config(path)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler")  # config only
    except (OSError, ValueError, EnvironmentError) as e:
        raise UsageError(f"could not load {model}: {str(e).splitlines()[0]}") from None
    if scheduler.config.prediction_type != "epsilon":
        raise UsageError(f"{model} predicts {scheduler.config.prediction_type}; SD-1.x predicts epsilon")
    try:
        # `dtype` (transformers 5, diffusers 0.42): without it an fp16 checkpoint stays fp16
        kw = dict(use_safetensors=True, dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        has_vae = vae and index.get("vae", [None])[0] is not None
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw) if has_vae else None
    except (OSError, ValueError, EnvironmentError) as e:
        raise UsageError(f"could not load {model}: {str(e).splitlines()[0]}") from None
    for m in (text_encoder, unet, vae):
        if m is not None:
            m.requires_grad_(False).eval().to(device)
    return argparse.Namespace(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
                              scheduler=scheduler, name=model)


def load_weights(unet, path):
    """Apply erase.py's output (trained parameters only, under the UNet's own names)."""
    if not os.path.isfile(path) or not path.endswith(".safetensors"):
        raise UsageError(f"weights {path} is not a .safetensors file")
    state = load_file(path)
    unknown = sorted(set(state) - set(dict(unet.named_parameters())))
    if unknown:
        raise UsageError(f"weights {path} do not fit this UNet (e.g. {unknown[0]})")
    unet.load_state_dict(state, strict=False)


@torch.no_grad()
def encode(m, prompts):
    """Text embeddings c = tau(prompt): the text encoder's last hidden state, (B, 77, D)."""
    ids = m.tokenizer(list(prompts), padding="max_length", max_length=m.tokenizer.model_max_length,
                      truncation=True, return_tensors="pt").input_ids
    device = m.text_encoder.device
    return m.text_encoder(ids.to(device))[0]


def ddim(unet, scheduler, z, c, c_uncond, guidance, steps, stop=None, progress=False):
    """DDIM (eta = 0) with classifier-free guidance, from z = z_T for `stop` of `steps` steps
    (all when None). Returns z_t and t, the timestep z_t is at (what the UNet is queried with).
    z: (B, C, H, W); c, c_uncond: (B, 77, D)."""
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.to(z.device)
    ts = scheduler.timesteps.tolist()
    stop = len(ts) if stop is None else stop
    dtype = getattr(unet, "dtype", z.dtype)  # a UNet cast to fp16 (--precision) gets fp16 inputs;
    cond = torch.cat([c_uncond, c]).to(dtype)  # z and the update below stay in z's precision
    for t in tqdm(ts[:stop], desc="DDIM", leave=False, disable=not progress):
        # classifier-free guidance, one batched forward: eps = eps(c_u) + g (eps(c) - eps(c_u))
        # t as a tensor (the UNet makes one of an int): torch.compile sees no new constant per step
        eps_u, eps_c = unet(torch.cat([z, z]).to(dtype), torch.tensor(t, device=z.device), encoder_hidden_states=cond
                            ).sample.to(z.dtype).chunk(2)
        eps = eps_u + guidance * (eps_c - eps_u)
        t_prev = t - scheduler.config.num_train_timesteps // steps
        a_t = abar[t]
        a_prev = abar[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod.to(z.device)
        # x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);  z_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps
        x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    t_at = ts[stop] if stop < len(ts) else 0
    return z, t_at


def noise(m, n, seed, device):
    """z_T for seed `seed`: (n, C, H, W), drawn on the CPU so that every device agrees."""
    cfg = m.unet.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(device)


@torch.no_grad()
def decode(m, z):
    """z_0 -> images in [0, 1], (B, 3, H, W). A pixel-space model (no VAE) samples images directly."""
    x = z if m.vae is None else m.vae.decode((z / m.vae.config.scaling_factor).to(m.vae.dtype)).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)


PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def set_precision(m, precision):
    """Generation's precision: the UNet and the VAE cast once (no autocast re-casting the weights
    at every step); the text encoder, run once per batch, and the sampler's z stay fp32."""
    for net in (m.unet, m.vae):
        if net is not None:
            net.to(PRECISIONS[precision])


@torch.no_grad()
def generate(m, prompts, seeds, guidance=7.5, steps=100, batch=8, progress=True, c_uncond=None):
    """One image per (prompt, seed) pair, as uint8 arrays (H, W, 3). The text encoder runs once
    per batch, on the batch's distinct prompts; c_uncond (the "" embedding) may be passed in."""
    c_uncond = encode(m, [""]) if c_uncond is None else c_uncond
    out = []
    pairs = list(zip(prompts, seeds))
    for i in tqdm(range(0, len(pairs), batch), desc="sampling", disable=not progress):
        chunk = pairs[i:i + batch]
        distinct = list(dict.fromkeys(p for p, _ in chunk))
        c = encode(m, distinct)[[distinct.index(p) for p, _ in chunk]]
        out += sample_from(m, c, [s for _, s in chunk], guidance, steps, c_uncond)[0]
    return out


@torch.no_grad()
def sample_from(m, c, seeds, guidance, steps, c_uncond):
    """One batch from text embeddings c (B, 77, D), seed by seed: the images as uint8 arrays
    (H, W, 3) and z_0 (B, C, H, W), what the VAE decoded them from."""
    z = torch.cat([noise(m, 1, s, m.unet.device) for s in seeds])
    z, _ = ddim(m.unet, m.scheduler, z, c, c_uncond.expand_as(c), guidance, steps)
    x = rearrange(decode(m, z).float().cpu(), "b c h w -> b h w c")
    return list((x.numpy() * 255).round().astype(np.uint8)), z


def grid(rows, row_labels, title=None):
    """rows: list of lists of (H, W, 3) uint8 -> one PIL image, labels on the left. Images
    under 64 pixels (the toy world's 16) are enlarged, nearest neighbour, to be seen."""
    k = max(1, 64 // rows[0][0].shape[0])
    rows = [[np.kron(x, np.ones((k, k, 1), np.uint8)) for x in row] for row in rows]
    h, w = rows[0][0].shape[:2]
    pad, top = 160, 24 if title else 0
    img = Image.new("RGB", (pad + w * len(rows[0]), top + h * len(rows)), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, 6), title, fill="black")
    for r, (row, label) in enumerate(zip(rows, row_labels)):
        draw.text((4, top + r * h + h // 2 - 6), label[:26], fill="black")
        for col, x in enumerate(row):
            img.paste(Image.fromarray(x), (pad + col * w, top + r * h))
    return img


def side_by_side(images):
    w = sum(i.width for i in images) + 8 * (len(images) - 1)
    out = Image.new("RGB", (w, max(i.height for i in images)), "white")
    x = 0
    for i in images:
        out.paste(i, (x, 0))
        x += i.width + 8
    return out


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--model", default=SD14, help="hub id, diffusers folder, or 'toy'")
    p.add_argument("--weights", help="erase.py's .safetensors: shown beside the original model")
    p.add_argument("--prompts", default="garbage truck, church", help="comma-separated")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (grid 50, --csv 100)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--device", default=default_device())
    p.add_argument("--out", default="samples.png", help="the grid's PNG")
    p.add_argument("--csv", help="prompt file (columns prompt, seed; optional guidance): one "
                                 "PNG per row into --out_dir (Section 5's settings by default)")
    p.add_argument("--out_dir", help="with --csv: folder of {row:05d}.png and prompts.csv")
    p.add_argument("--batch", type=int, default=None, help="images per forward (CUDA 16, CPU 8)")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="UNet and VAE precision (default: fp16 on CUDA, fp32 on CPU)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or (16 if cuda else 8)
    args.precision = args.precision or ("fp16" if cuda else "fp32")
    if args.batch < 1:
        raise UsageError("--batch must be at least 1")
    if args.csv and not args.out_dir:
        raise UsageError("--csv needs --out_dir")
    return args


def generate_csv(m, args, rows):
    """Section 5's generation: one PNG per CSV row (DIR/{row:05d}.png), 100 DDIM steps, guidance
    7.5 unless the row says otherwise. Resumable: rows whose PNG exists are skipped, and a PNG
    is written under a temporary name, then renamed. Started by torchrun / accelerate launch,
    each process takes the rows i with i % WORLD_SIZE == RANK."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.makedirs(args.out_dir, exist_ok=True)
    if rank == 0:
        shutil.copyfile(args.csv, os.path.join(args.out_dir, "prompts.csv"))
    todo = [i for i in range(rank, len(rows), world)
            if not os.path.exists(os.path.join(args.out_dir, f"{i:05d}.png"))]
    steps = args.steps or 100
    c_uncond = encode(m, [""])
    for j in tqdm(range(0, len(todo), args.batch), desc=f"rank {rank}: {len(todo)} images"):
        chunk = todo[j:j + args.batch]
        by_guidance = {}
        for i in chunk:  # rows of one batch may ask for different guidance scales
            by_guidance.setdefault(float(rows[i].get("guidance") or args.guidance), []).append(i)
        for g, idx in by_guidance.items():
            imgs = generate(m, [rows[i]["prompt"] for i in idx], [int(rows[i]["seed"]) for i in idx],
                            g, steps, batch=len(idx), progress=False, c_uncond=c_uncond)
            for i, x in zip(idx, imgs):
                path = os.path.join(args.out_dir, f"{i:05d}.png")
                Image.fromarray(x).save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)
    print(json.dumps({"wrote": args.out_dir, "rows": len(rows), "generated": len(todo), "rank": rank}))


def main(argv=None):
    args = parse_args(argv)
    if args.csv:
        rows = read_csv(args.csv, need=("prompt", "seed"))  # refuse a bad file before loading the model
        if "LOCAL_RANK" in os.environ and args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        m = load_model(args.model, args.device)
        if args.weights:
            load_weights(m.unet, args.weights)
        set_precision(m, args.precision)
        return generate_csv(m, args, rows)
    args.steps = args.steps or 50
    prompts = [p.strip() for p in args.prompts.split(",")]
    if not all(prompts):
        raise UsageError("empty prompt in --prompts")
    m = load_model(args.model, args.device)
    if args.weights and not (os.path.isfile(args.weights) and args.weights.endswith(".safetensors")):
        raise UsageError(f"weights {args.weights} is not a .safetensors file")
    pairs = [(p, s) for p in prompts for s in args.seeds]
    set_precision(m, args.precision)

    def panel(title):
        imgs = generate(m, [p for p, _ in pairs], [s for _, s in pairs], args.guidance, args.steps, args.batch)
        n = len(args.seeds)
        return grid([imgs[i:i + n] for i in range(0, len(imgs), n)], prompts, title)

    panels = [panel(f"original: {args.model}")]
    if args.weights:
        load_weights(m.unet, args.weights)
        panels.append(panel(f"erased: {os.path.basename(args.weights)}"))
    tmp = args.out + ".tmp.png"
    side_by_side(panels).save(tmp)
    os.replace(tmp, args.out)
    print(json.dumps({"wrote": args.out, "prompts": prompts, "seeds": args.seeds}))


if __name__ == "__main__":
    run_cli(main)
