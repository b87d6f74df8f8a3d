"""Concept Ablation (Kumari et al., ICCV 2023) as its published code trains it (`--method ca`,
`--ca_mode images`, the default; concept-ablation's diffusers/train.py, model-based loss):

- anchor images: `--ca_images` latents that the original model generates for the anchor c*
  (DDIM, --ddim_steps steps, guidance --ca_guidance), made once and cached;
- each update: one of them, x0, noised forward at t ~ U{0..T-1} with eps ~ N(0, I):
  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and
  L1 = || eps_theta'(x_t, c_e) - sg(eps_theta(x_t, c*)) ||^2 (the anchor's prediction; CA's code
  takes it from the model being trained under no_grad: --ca_target trained);
- prior preservation where the anchor overlaps the concept (its words are among c_e's: "truck"
  in "garbage truck"; CA's --with_prior_preservation): a second anchor image with its own t and
  noise, L2 = || eps_theta'(x_t', c*) - eps' ||^2, weighted by --lam (CA's prior_loss_weight 1);
- the trained parameters: attn2's to_k and to_v (CA's default group; --train_method xattn-strict).

`--ca_mode trajectory`: z_t on the frozen model's DDIM trajectory for c* instead of anchor
images, no prior term (the variant this project ran before).
Where this differs from CA's code (README): the latents are used as generated (CA decodes its
images and encodes them back through the VAE, sampling its posterior), the prompts are the
concept and the anchor themselves (CA captions each image with a generated sentence and its copy
with the anchor replaced by the concept), and the loss is unmasked (CA's mask is all ones
unless its crop augmentation shrinks an image).
"""
import argparse
import hashlib
import os

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from family import ddim, eps


def add_arguments(p):
    """erase.py's flags for CA as its code trains."""
    p.add_argument("--ca_mode", default="images", choices=["images", "trajectory"],
                   help="ca: anchor images noised at t ~ U[0, T) (CA's code) or z_t on c*'s DDIM trajectory")
    p.add_argument("--ca_images", type=int, default=200, help="ca: anchor images per anchor")
    p.add_argument("--ca_guidance", type=float, default=7.5, help="ca: the anchor images' guidance")
    p.add_argument("--ca_prior", default="auto", choices=["auto", "on", "off"],
                   help="ca: the prior term (auto: where the anchor's words are among the concept's)")


def images(args):
    """Whether this run is CA as its code trains (anchor images)."""
    return args.method == "ca" and args.ca_mode == "images"


def overlaps(concept, anchor):
    """CA's prior preservation applies: every word of the anchor is a word of the concept."""
    return set(anchor.lower().split()) <= set(concept.lower().split())


def draw(gen, args, i, shape, T):
    """An update's CA draws, after erase.draws' own: which anchor image, t ~ U{0..T-1} and the
    noise; then the prior term's three (when concept i overlaps its anchor)."""
    n = args.ca_images
    one = lambda: (int(torch.randint(n, (1,), generator=gen)), int(torch.randint(T, (1,), generator=gen)),  # noqa: E731
                   torch.randn(shape, generator=gen))
    j, t, noise = one()
    prior = one() if args.ca_prior[i] else None
    return argparse.Namespace(j=j, t=t, noise=noise, prior=prior)


def prior_input(A, d, abar, device):
    """The prior term's input: (x_t', eps', t') from draw d's second anchor image."""
    j, t, noise = d.ca.prior
    noise = noise.to(device, A.dtype)
    return noised(A[d.i, j:j + 1], t, noise, abar), noise, torch.tensor(t, device=device)


def noised(x0, t, noise, abar):
    """The forward process: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
    return abar[t].sqrt() * x0 + (1 - abar[t]).sqrt() * noise


@torch.no_grad()
def anchor_latents(m, args, c_anchor, c_n, batch=16):
    """The anchor images: for each erased concept's anchor, args.ca_images latents z_0 (n, N, C,
    H, W) from the model as it is now (the original: called before any update), DDIM from noise
    seeded by --seed. Cached under a key made of the UNet's weights, the anchor and the settings."""
    unet = m.unet
    total = f"{float(sum(p.detach().double().sum() for p in unet.parameters())):.10e}"
    key = hashlib.sha1("\n".join(map(str, [m.name, total, *args.anchors, args.ca_images, args.ddim_steps,
                                           args.ca_guidance, args.seed])).encode()).hexdigest()[:16]
    path = os.path.join(args.cache_dir, f"ca-anchors-{key}.safetensors")
    if os.path.isfile(path):
        return load_file(path)["z0"].to(args.device, unet.dtype)
    cfg, gen = unet.config, torch.Generator().manual_seed(args.seed)
    out = []
    for i in range(len(c_anchor)):
        z0 = []
        for s in tqdm(range(0, args.ca_images, batch), desc=f"CA: images of '{args.anchors[i]}'"):
            b = min(batch, args.ca_images - s)
            z_T = torch.randn(b, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
            z, _ = ddim(lambda z, t, c: eps(m, z, t, c), m.scheduler, z_T.to(args.device, unet.dtype),
                        c_anchor[i:i + 1].expand(b, -1, -1), c_n.expand(b, -1, -1), args.ca_guidance, args.ddim_steps)
            z0.append(z)
        out.append(torch.cat(z0))
    z0 = torch.stack(out)
    os.makedirs(args.cache_dir, exist_ok=True)
    save_file({"z0": z0.cpu().contiguous()}, path + ".tmp")
    os.replace(path + ".tmp", path)  # atomic: a half-written cache is never read
    return z0
