"""Pictures: the original model beside the erased one, and prompt files into folders of PNGs.

Any family (family.py: SD-1.x, SD-2.x, SDXL-base) at its native size, with classifier-free
guidance, decoded with the VAE, by one of three samplers (`--scheduler`):

- ddim (the default): family.ddim, eta 0, the model's DDIM timesteps (SD: 991, 981, ..., 1 for
  100 steps). With the same seed and guidance it agrees with diffusers' StableDiffusionPipeline /
  StableDiffusionXLPipeline + DDIMScheduler (tests/test_sample.py);
- ddim-ldm: CompVis/ldm's DDIMSampler as the EAP repository ran it for Imagenette and Fig. 1
  (t_start = -1: its timesteps 1, 11, ..., 991 less the last): the same DDIM with the first step
  dropped, z_T taken as z at t = 981 and 99 steps from 981 down to 1 (S = 100);
- lms: diffusers' LMSDiscreteScheduler (order 4) as EAP's eval-scripts/generate-images.py built
  it for I2P, COCO-30K and the artists (the class's default timestep spacing, linspace: 999 ...
  0 in S steps), the model's betas and prediction type; the initial latent is z_T times
  init_noise_sigma. It agrees with StableDiffusionPipeline + that scheduler (tests/test_sample.py).

The unconditional branch is the pipeline's own (SDXL-base: zeros, force_zeros_for_empty_prompt;
else "" encoded).

    python sample.py --prompts "garbage truck, church" --seeds 0 1 2 --weights out/weights.safetensors
    python sample.py --csv imagenette.csv --out_dir gen/erased --weights out/weights.safetensors

The second form generates a prompt file into a folder of PNGs for evaluate.py (Section 5's
settings: 100 steps, guidance 7.5; --scheduler ddim unless given), resumable (DIR/settings.json
refuses a resume with another scheduler, steps, guidance, model or weights), and sharded across
GPUs when started with `torchrun --nproc_per_node 8 sample.py ...` or `accelerate launch ...`.
"""
import argparse
import json
import os
import shutil

import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw
from tqdm import tqdm

from cli import UsageError, default_device, one_line_errors, read_csv, run_cli
from family import SD14, ddim, decode, empty, encode, eps, load_model, noise, unet_output
from params import load_weights, prepared

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULERS = ("ddim", "ddim-ldm", "lms")
SETTINGS = "settings.json"  # what a --csv folder was generated with; a resume must match it


def set_precision(m, precision):
    """Generation's precision: the UNet and the VAE cast once (no autocast re-casting the weights
    at every step); the text encoders, run once per batch, and the sampler's z stay fp32. SDXL's
    VAE overflows in fp16 (its config says force_upcast, and diffusers' pipeline upcasts it): fp32."""
    upcast = m.family == "sdxl" and m.vae is not None and m.vae.config.get("force_upcast", False)
    for net in (m.unet, None if upcast else m.vae):
        if net is not None:
            net.to(PRECISIONS[precision])


@torch.no_grad()
def generate(m, prompts, seeds, guidance=7.5, steps=100, batch=8, progress=True, c_uncond=None,
             scheduler="ddim"):
    """One image per (prompt, seed) pair, as uint8 arrays (H, W, 3). The text encoder runs once
    per batch, on the batch's distinct prompts; c_uncond (the pipeline's unconditional) may be
    passed in. scheduler: one of SCHEDULERS (the module's docstring)."""
    c_uncond = empty(m) if c_uncond is None else c_uncond
    out = []
    pairs = list(zip(prompts, seeds))
    for i in tqdm(range(0, len(pairs), batch), desc="sampling", disable=not progress):
        chunk = pairs[i:i + batch]
        distinct = list(dict.fromkeys(p for p, _ in chunk))
        c = encode(m, distinct)[[distinct.index(p) for p, _ in chunk]]
        out += sample_from(m, c, [s for _, s in chunk], guidance, steps, c_uncond, scheduler)[0]
    return out


def z_T(m, seed):
    """One image's starting noise (1, C, H, W): family.noise for an int seed; for (seed, j), the
    j-th latent of a batch drawn from that seed, as the published generation scripts draw a
    prompt's num_samples (a CSV's `sample` column); (seed, 0) is the int seed's."""
    s, j = seed if isinstance(seed, tuple) else (seed, 0)
    return noise(m, j + 1, s, m.unet.device)[j:j + 1]


@torch.no_grad()
def sample_from(m, c, seeds, guidance, steps, c_uncond, scheduler="ddim"):
    """One batch from conditioning values c (B, L, D), seed by seed: the images as uint8 arrays
    (H, W, 3) and z_0 (B, C, H, W), what the VAE decoded them from."""
    z = torch.cat([z_T(m, s) for s in seeds])
    z = denoise(m, z, c, c_uncond.expand_as(c), guidance, steps, scheduler)
    x = rearrange(decode(m, z).float().cpu(), "b c h w -> b h w c")
    return list((x.numpy() * 255).round().astype(np.uint8)), z


def denoise(m, z, c, c_uncond, guidance, steps, scheduler="ddim"):
    """z_T (B, C, H, W), as family.noise draws it -> z_0 by `scheduler` (one of SCHEDULERS) in
    `steps` steps, classifier-free guidance `guidance`; c, c_uncond: (B, L, D)."""
    if scheduler == "lms":
        return lms(m, z, c, c_uncond, guidance, steps)
    if scheduler not in ("ddim", "ddim-ldm"):
        raise UsageError(f"unknown scheduler {scheduler}; choose from {', '.join(SCHEDULERS)}")
    # ddim-ldm: CompVis's DDIMSampler with t_start = -1 runs its timesteps 1, 11, ..., 991 (S = 100)
    # less the last, so z_T enters at 981; diffusers' DDIM (steps_offset 1) runs 991, ..., 1.
    # The same DDIM from the second timestep: start = 1 (S - 1 steps; none when S = 1)
    later = dict(start=1) if scheduler == "ddim-ldm" else {}  # ddim: the call as it always was
    return ddim(lambda z, t, c: eps(m, z, t, c), m.scheduler, z, c, c_uncond, guidance, steps, **later)[0]


def lms_scheduler(m):
    """EAP's LMSDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule=
    "scaled_linear", num_train_timesteps=1000), with the model's betas and prediction type.
    Not from_config of the model's DDIM config: that carries timestep_spacing "leading" and
    steps_offset 1 (991, ..., 1), where EAP's scheduler had the class's linspace (999, ..., 0)."""
    from diffusers import LMSDiscreteScheduler
    cfg = m.scheduler.config
    try:  # diffusers' LMS integrates its coefficients with scipy
        return LMSDiscreteScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                                    beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule,
                                    trained_betas=cfg.trained_betas, prediction_type=m.prediction)
    except ImportError as e:
        raise UsageError(f"--scheduler lms needs scipy (pip install scipy): {e}") from None


def lms(m, z, c, c_uncond, guidance, steps):
    """diffusers' LMS (order 4) as its StableDiffusionPipeline drives it: z = z_T *
    init_noise_sigma; each step the UNet reads scale_model_input(z) at the (fractional) timestep
    t, guidance combines its two outputs, step() moves z. The UNet's own output goes to step():
    the scheduler turns v into x0 with its sigma (family.eps's v -> eps reads abar at an integer
    t; guidance is linear, so combining v or eps is the same)."""
    s = lms_scheduler(m)
    s.set_timesteps(steps, device=z.device)
    z = z * s.init_noise_sigma
    cond = torch.cat([c_uncond, c])
    for t in s.timesteps:
        out_u, out_c = unet_output(m, s.scale_model_input(torch.cat([z, z]), t), t, cond).chunk(2)
        z = s.step(out_u + guidance * (out_c - out_u), t, z).prev_sample
    return z


GRID_PAD = 160  # the row labels' column


def grid(rows, row_labels, title=None):
    """rows: list of lists of (H, W, 3) uint8 -> one PIL image, labels on the left. Images
    under 64 pixels (the toy world's 16) are enlarged, nearest neighbour, to be seen."""
    k = max(1, 64 // rows[0][0].shape[0])
    rows = [[np.kron(x, np.ones((k, k, 1), np.uint8)) for x in row] for row in rows]
    h, w = rows[0][0].shape[:2]
    pad, top = GRID_PAD, 24 if title else 0
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
    p.add_argument("--steps", type=int, default=None, help="sampler steps (grid 50, --csv 100)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--scheduler", default="ddim", choices=SCHEDULERS,
                   help="ddim (default); ddim-ldm: CompVis DDIM, t_start -1 (EAP's Imagenette, Fig. 1); "
                        "lms: LMSDiscreteScheduler (EAP's I2P, COCO-30K, artists)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--out", default="samples.png", help="the grid's PNG")
    p.add_argument("--csv", help="prompt file (columns prompt, seed; optional guidance, sample): one "
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
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be at least 1")
    if args.csv and not args.out_dir:
        raise UsageError("--csv needs --out_dir")
    return args


def settings(args):
    """What a --csv folder's images depend on, as SETTINGS records it (local paths absolute)."""
    def where(p):
        return os.path.abspath(p) if p and os.path.exists(p) else p
    return dict(model=where(args.model), weights=where(args.weights), scheduler=args.scheduler,
                steps=args.steps or 100, guidance=args.guidance)


def check_settings(args, rank=0):
    """Refuses to resume a --csv folder with other settings than its images were made with
    (DIR/settings.json); records them when the folder has none. A folder from before settings
    were recorded was made by DDIM: resumed as such, refused with another scheduler."""
    path, want = os.path.join(args.out_dir, SETTINGS), settings(args)
    if os.path.isfile(path):
        with open(path) as f:
            have = json.load(f)
        changed = [k for k in want if have.get(k) != want[k]]
        if changed:
            raise UsageError(f"{args.out_dir} holds images made with " + ", ".join(
                f"--{k} {have.get(k)}" for k in changed) + "; this run asks for " + ", ".join(
                f"--{k} {want[k]}" for k in changed) + ": give another --out_dir (or remove the folder)")
        return
    if os.path.isdir(args.out_dir) and any(f.endswith(".png") for f in os.listdir(args.out_dir)) \
            and args.scheduler != "ddim":
        raise UsageError(f"{args.out_dir} holds images from before {SETTINGS} was written (DDIM); "
                         f"this run asks for --scheduler {args.scheduler}: give another --out_dir")
    os.makedirs(args.out_dir, exist_ok=True)
    with open(f"{path}.{rank}.tmp", "w") as f:
        json.dump(want, f, indent=1)
    os.replace(f"{path}.{rank}.tmp", path)


def row_seed(row):
    """A CSV row's seed: `seed`, or (seed, sample) where the row has a `sample` column (z_T)."""
    return (int(row["seed"]), int(row["sample"])) if row.get("sample") not in (None, "") else int(row["seed"])


def generate_csv(m, args, rows, on_images=None):
    """Section 5's generation: one PNG per CSV row (DIR/{row:05d}.png), 100 steps of
    args.scheduler, guidance 7.5 unless the row says otherwise. Resumable: rows whose PNG exists
    are skipped (check_settings has refused other settings), and a PNG is written under a
    temporary name, then renamed. Started by torchrun / accelerate launch, each process takes
    the rows i with i % WORLD_SIZE == RANK."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.makedirs(args.out_dir, exist_ok=True)
    if rank == 0:
        shutil.copyfile(args.csv, os.path.join(args.out_dir, "prompts.csv"))
    todo = [i for i in range(rank, len(rows), world)
            if not os.path.exists(os.path.join(args.out_dir, f"{i:05d}.png"))]
    steps = args.steps or 100
    c_uncond = empty(m)
    for j in tqdm(range(0, len(todo), args.batch), desc=f"rank {rank}: {len(todo)} images"):
        chunk = todo[j:j + args.batch]
        by_guidance = {}
        for i in chunk:  # rows of one batch may ask for different guidance scales
            by_guidance.setdefault(float(rows[i].get("guidance") or args.guidance), []).append(i)
        for g, idx in by_guidance.items():
            imgs = generate(m, [rows[i]["prompt"] for i in idx], [row_seed(rows[i]) for i in idx],
                            g, steps, batch=len(idx), progress=False, c_uncond=c_uncond,
                            scheduler=args.scheduler)
            for i, x in zip(idx, imgs):
                path = os.path.join(args.out_dir, f"{i:05d}.png")
                Image.fromarray(x).save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)
            if on_images:  # benchmark.py --table's progress bar
                on_images(len(idx))
    print(json.dumps({"wrote": args.out_dir, "rows": len(rows), "generated": len(todo), "rank": rank,
                      "scheduler": args.scheduler}))


def main(argv=None, on_images=None):
    args = parse_args(argv)
    if args.csv:
        rows = read_csv(args.csv, need=("prompt", "seed"))  # refuse a bad file before loading the model
        check_settings(args, int(os.environ.get("RANK", 0)))  # and a resume with other settings
        if "LOCAL_RANK" in os.environ and args.device.startswith("cuda"):
            args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        m = load_model(args.model, args.device)
        if args.weights:
            load_weights(m, args.weights)
        set_precision(m, args.precision)
        return generate_csv(m, args, rows, on_images)
    args.steps = args.steps or 50
    prompts = [p.strip() for p in args.prompts.split(",")]
    if not all(prompts):
        raise UsageError("empty prompt in --prompts")
    m = load_model(args.model, args.device)
    erased = prepared(m, args.weights) if args.weights else None  # refused before generating
    pairs = [(p, s) for p in prompts for s in args.seeds]
    set_precision(m, args.precision)

    def panel(title):
        imgs = generate(m, [p for p, _ in pairs], [s for _, s in pairs], args.guidance, args.steps, args.batch,
                        scheduler=args.scheduler)
        n = len(args.seeds)
        return grid([imgs[i:i + n] for i in range(0, len(imgs), n)], prompts, title)

    panels = [panel(f"original: {args.model}")]
    if erased:
        erased()
        panels.append(panel(f"erased: {os.path.basename(args.weights)}"))
    tmp = args.out + ".tmp.png"
    side_by_side(panels).save(tmp)
    os.replace(tmp, args.out)
    print(json.dumps({"wrote": args.out, "prompts": prompts, "seeds": args.seeds}))


if __name__ == "__main__":
    run_cli(main)
