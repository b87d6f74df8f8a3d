"""A toy world for concept erasure, small enough for a laptop CPU: coloured shapes, a tiny
SD-shaped text-to-image model trained from scratch, and the oracle that reads its images
(oracle.py). benchmark.py runs Section 5.1's experiment (Table 1) and Section 3.2's sensitivity
analysis (Fig. 1a) in it, every method through erase.py exactly as on SD-1.4.

    python toy.py oracle                     # the judge, toy/oracle.safetensors (~2 min)
    python toy.py train                      # the model, toy/model/ (~33 min, one CPU thread)
    python toy.py vocab                      # toy/vocab.txt: the concept space R of Algorithm 1
    python benchmark.py --model toy --out out/toy   # Table 1 (mean ± std, 3 splits x 2 seeds) + Fig. 1a
    python sample.py --model toy --prompts "a red circle, a blue square" --steps 20

The world: 16x16 RGB images of one shape of one colour on black; 6 colours x 6 shapes = 36
concepts ("red circle"), captioned "a red circle" / "red circle" (65%), "a circle" / "circle"
(10%), "a red shape" / "red" (10%), "" (10%, so that classifier-free guidance works), or one
of 40 words unrelated to the pictures ("day", "dog"; 5%).
Concepts share words, so erasing "red circle" can hurt "red square" and "blue circle" the way
erasing "nudity" hurts "woman" in the paper. The model: the parts SD-1.4 is made of, shrunk:
diffusers' UNet2DConditionModel with cross-attention (pixel space, no VAE: z is the image in
[-1, 1]), transformers' CLIPTextModel (2 layers, width 32), SD-1.4's real CLIP tokenizer and
DDIM scheduler (betas), trained jointly with Eq. 1.
"""
import argparse
import json
import math
import os
import shutil
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import offline
from cli import one_line_errors, run_cli
from family import TOY
from oracle import ORACLE, oracle_net, recognise
from prompts import TOY_COLOURS, TOY_CONCEPTS, TOY_SHAPES

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy")
VOCAB = os.path.join(HERE, "vocab.txt")

# ---------------------------------------------------------------------------- the world
COLOURS = dict(zip(TOY_COLOURS, [(220, 40, 40), (245, 140, 20), (240, 220, 40), (40, 180, 60),
                                (40, 90, 230), (150, 60, 200)]))  # RGB
SHAPES, CONCEPTS = TOY_SHAPES, TOY_CONCEPTS  # 36; index = 6 colour + shape
SIZE, SUPER = 16, 8  # image side; supersampling of the drawing (antialiased edges)
# words that say nothing about the pictures: R's unrelated concepts ("bamboo" for "nudity")
UNRELATED = ("time people year day man woman child world life hand house car dog cat tree "
             "water city music book money food night river king road door family friend horse "
             "bird sea mountain ship garden church letter phone game war school").split()


def outline(shape, cx, cy, r):
    """The shape of radius r at (cx, cy): ("ellipse", box) or ("polygon", points)."""
    if shape == "circle":
        return "ellipse", [cx - r, cy - r, cx + r, cy + r]
    if shape == "square":
        a = 0.82 * r
        return "polygon", [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "triangle":
        return "polygon", [(cx + r * math.cos(a), cy + 0.15 * r + r * math.sin(a))
                           for a in np.deg2rad([-90, 30, 150])]
    if shape == "star":  # five points, inner radius 0.45 r
        return "polygon", [(cx + q * math.cos(a), cy + 0.08 * r + q * math.sin(a)) for q, a in
                           zip([r, 0.45 * r] * 5, np.deg2rad(-90 + 36 * np.arange(10)))]
    if shape == "cross":
        w = 0.33 * r
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w), (w, r), (-w, r), (-w, w),
               (-r, w), (-r, -w), (-w, -w)]
        return "polygon", [(cx + u, cy + v) for u, v in pts]
    # heart: the classic parametric curve, x = 16 sin^3 s, y = 13 cos s - 5 cos 2s - ...
    s = np.linspace(0, 2 * np.pi, 60)
    u, v = 16 * np.sin(s) ** 3, -(13 * np.cos(s) - 5 * np.cos(2 * s) - 2 * np.cos(3 * s) - np.cos(4 * s))
    return "polygon", [(cx + r * a / 16, cy + r * (b + 2) / 16) for a, b in zip(u, v)]


def draw(colour, shape, rng):
    """One image (SIZE, SIZE, 3) uint8: random radius, position and a +-20 colour jitter."""
    r = rng.uniform(3.5, 5.5)
    cx, cy = rng.uniform(r + 0.5, SIZE - r - 0.5, size=2)
    mask = Image.new("L", (SIZE * SUPER,) * 2, 0)
    kind, pts = outline(shape, cx * SUPER, cy * SUPER, r * SUPER)
    getattr(ImageDraw.Draw(mask), kind)(pts, fill=255)
    alpha = np.asarray(mask.resize((SIZE, SIZE), Image.BOX), np.float32)[..., None] / 255
    rgb = np.clip(np.array(COLOURS[colour]) + rng.uniform(-20, 20, 3), 0, 255)
    return (alpha * rgb).round().astype(np.uint8)


def caption(colour, shape, rng):
    """A caption of the image: full (65%), shape only, colour only (10% each), "" (10%), or
    an unrelated word alone (5%): a word that says nothing about the picture, like "a photo".
    (Never trained, such a word would be an alias of some arbitrary concept.)"""
    u, a = rng.random(), "a " if rng.random() < 0.5 else ""
    if u < 0.1:
        return ""
    if u < 0.15:
        return UNRELATED[rng.integers(len(UNRELATED))]
    if u < 0.25:
        return f"{a}{shape}"
    if u < 0.35:
        return f"a {colour} shape" if a else colour
    return f"{a}{colour} {shape}"


def world_batch(rng, n):
    """n random (image, caption, label) triples: x (n, 3, SIZE, SIZE) in [-1, 1], captions,
    labels (n, 2) = (colour index, shape index)."""
    labels = rng.integers(0, 6, size=(n, 2))
    imgs = np.stack([draw(list(COLOURS)[c], SHAPES[s], rng) for c, s in labels])
    caps = [caption(list(COLOURS)[c], SHAPES[s], rng) for c, s in labels]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, caps, torch.from_numpy(labels)


def vocabulary():
    """R for Algorithm 1: colour and shape words, their 36 combinations, unrelated words."""
    return [*COLOURS, *SHAPES, *CONCEPTS, *UNRELATED]


def shares_word(c, erased):
    return bool(set(c.split()) & {w for e in erased for w in e.split()})


def held_out_accuracy(net, seed, n_per_concept=100):
    """% of fresh clean images (n per concept, drawn from `seed`) read as their own concept."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(36), n_per_concept)
    read = recognise(net, [draw(*CONCEPTS[i].split(), rng) for i in truth])
    return 100 * float((read == truth).mean())


def train_oracle(args):
    """Cross-entropy on both heads, on clean images with noise and blur added, so that the
    judge tolerates what a small diffusion model draws. It never sees a generated image."""
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    net = oracle_net()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / args.steps)))
    for k in range(args.steps):
        x, _, y = world_batch(rng, 128)
        x = (x + 1) / 2  # (B, 3, 16, 16) in [0, 1]
        blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        x = torch.lerp(x, blur, torch.rand(len(x), 1, 1, 1) * (torch.rand(len(x), 1, 1, 1) < 0.3))
        x = x + torch.rand(len(x), 1, 1, 1) * 0.1 * torch.randn_like(x)
        logits = net(x)
        loss = F.cross_entropy(logits[:, :6], y[:, 0]) + F.cross_entropy(logits[:, 6:], y[:, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if k % 200 == 0 or k == args.steps - 1:
            print(f"oracle step {k}: loss {loss.item():.4f}", flush=True)
    net.eval()
    acc = held_out_accuracy(net, args.seed + 1)
    print(json.dumps({"held_out_accuracy": acc, "wrote": args.out}))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file(net.state_dict(), args.out, metadata={"held_out_accuracy": f"{acc:.2f}"})
    return acc


# ---------------------------------------------------------------------------- the model
def configs():
    """SD-1.4's UNet layout (cross-attention down blocks, a plain block at one end, a
    cross-attention mid block) and CLIP text encoder, shrunk for 16x16 pixels on a CPU."""
    unet = dict(sample_size=SIZE, in_channels=3, out_channels=3, layers_per_block=1,
                block_out_channels=(32, 64, 64), attention_head_dim=4, cross_attention_dim=32,
                norm_num_groups=8,  # cross-attention at 8x8 and 4x4 (and the mid block)
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    return unet, text


def save_model(folder, tokenizer, text_encoder, unet, scheduler, info):
    """An SD-1.x diffusers folder without a VAE (sample.load_model: pixel space) and train.json,
    written beside `folder`, then renamed over it."""
    tmp = folder.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    offline.save_pipeline(tmp, dict(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=None,
                                    scheduler=scheduler))
    with open(os.path.join(tmp, "train.json"), "w") as f:
        json.dump(info, f, indent=1)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def train(args):
    """Eq. 1, L = E ||eps - eps_theta(z_t, t, tau(caption))||^2, from scratch, for the UNet and
    the text encoder together; the exponential moving average of the weights is saved."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    tic, cpu = time.time(), time.process_time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng, gen = np.random.default_rng(args.seed), torch.Generator().manual_seed(args.seed)
    unet_cfg, text_cfg = configs()
    tokenizer = offline.clip_tokenizer()
    text_encoder, unet = CLIPTextModel(CLIPTextConfig(**text_cfg)), UNet2DConditionModel(**unet_cfg)
    scheduler = DDIMScheduler(**offline.SD14_SCHEDULER)
    abar = scheduler.alphas_cumprod  # (1000,)
    params = [*unet.parameters(), *text_encoder.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    # linear warm-up, then cosine decay to 10% of lr
    lr_at = lambda k: min(1, (k + 1) / 100) * (0.55 + 0.45 * math.cos(math.pi * k / args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = [p.detach().clone() for p in params]
    losses = []
    for k in range(args.steps):
        x0, caps, _ = world_batch(rng, args.batch)  # (B, 3, 16, 16)
        ids = tokenizer(caps, padding="max_length", max_length=77, return_tensors="pt").input_ids
        c = text_encoder(ids)[0]  # tau(caption), (B, 77, 32)
        t = torch.randint(0, len(abar), (len(x0),), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * x0 + (1 - a).sqrt() * eps  # z_t ~ q(z_t | z_0)
        loss = (eps - unet(z_t, t, encoder_hidden_states=c).sample).pow(2).mean()  # Eq. 1
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA, decay warmed up from 0
            d = min(args.ema, (1 + k) / (10 + k))
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - d)
        losses.append(loss.item())
        if k % 100 == 0 or k == args.steps - 1:
            print(f"step {k}: loss {np.mean(losses[-100:]):.4f}  {time.time() - tic:.0f}s", flush=True)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    info = dict(vars(args), final_loss=float(np.mean(losses[-100:])), seconds=round(time.time() - tic),
                cpu_seconds=round(time.process_time() - cpu),
                loss_every_100=[round(float(np.mean(losses[i:i + 100])), 4) for i in range(0, len(losses), 100)])
    save_model(args.out, tokenizer, text_encoder.eval(), unet.eval(), scheduler, info)
    print(json.dumps({"wrote": args.out, "final_loss": info["final_loss"], "seconds": info["seconds"]}))
    return info


# ---------------------------------------------------------------------------- command line
def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    sub = p.add_subparsers(dest="command", required=True)
    o = one_line_errors(sub.add_parser("oracle", help="train the judge"))
    o.add_argument("--steps", type=int, default=3000)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--out", default=ORACLE)
    t = one_line_errors(sub.add_parser("train", help="train the text-to-image model from scratch"))
    t.add_argument("--steps", type=int, default=1800)
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--ema", type=float, default=0.999)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="1: the same result on any machine, and "
                   "no thrashing where the cores are shared")
    t.add_argument("--out", default=TOY)
    v = one_line_errors(sub.add_parser("vocab", help="write the concept space R"))
    v.add_argument("--out", default=VOCAB)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print(json.dumps(vars(args)))
    if args.command == "oracle":
        return train_oracle(args)
    if args.command == "train":
        return train(args)
    if args.command == "vocab":
        with open(args.out, "w") as f:
            f.write("\n".join(vocabulary()) + "\n")
        return print(json.dumps({"wrote": args.out, "concepts": len(vocabulary())}))


if __name__ == "__main__":
    run_cli(main)
