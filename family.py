"""The model families in one place: SD-1.x, SD-2.x (512 px epsilon, 768 px v-prediction) and
SDXL-base, loaded from a diffusers folder or hub id. Everything else sees four things and never
asks which family it is:

- `m = load_model(model)`: the parts, frozen, fp32 (m.unet is what erase.py trains);
- `c = encode(m, prompts)`: a conditioning value, one tensor (B, L, D). SD-1/2: L = 77, the text
  encoder's token states. SDXL: the 77 token states of both encoders (penultimate layer, no final
  LayerNorm) concatenated to D = D1 + D2, and one more row, L = 78, that holds the second
  encoder's pooled (projected) embedding in its first P entries. So every operation on concepts
  (R cached, mixed by G(pi), a mean difference, a cosine) acts on what the UNet reads through
  cross-attention and through SDXL's added conditioning at once: c_a's two paths name one concept;
- `eps(m, z, t, c)`: the noise prediction epsilon at timestep t, whatever the UNet predicts
  (v-prediction: eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t, abar at the queried t), with SDXL's
  micro-conditioning time ids (H, W, 0, 0, H, W) at the family's native size;
- `ddim(eps_fn, scheduler, z, c, c_uncond, ...)`: DDIM with classifier-free guidance, the same
  for every family (SDXL ships an Euler scheduler: DDIM is built from its config, its betas).

Refused in one line before any weight loads: SD3 / FLUX (transformers, not UNets), inpainting or
depth UNets (9 or 5 input channels), the SDXL refiner, any other pipeline class.
"""
import argparse
import os

import torch
from torch.func import functional_call
from tqdm import tqdm

from cli import UsageError

SD14 = "CompVis/stable-diffusion-v1-4"
TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy", "model")
TOKENS = 77  # the token rows of a conditioning value; SDXL's row 77 is the pooled embedding
SUPPORTED = "SD-1.x, SD-2.x or SDXL-base"


def config(path, model, subfolder=None):
    """A folder's or hub id's JSON config (model_index.json, or a part's config.json), no weights."""
    from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
    try:
        if subfolder is None:
            return DiffusionPipeline.load_config(path)
        reader = DDIMScheduler if subfolder == "scheduler" else UNet2DConditionModel  # which file name
        return reader.load_config(path, subfolder=subfolder)
    except (OSError, ValueError, EnvironmentError) as e:
        raise UsageError(f"could not load {model}: {str(e).splitlines()[0]}") from None


def inspect(model):
    """Which family a checkpoint is, from its configs alone: "sd1", "sd2" or "sdxl", and its
    prediction type. Anything else is refused here, before a weight is read."""
    path = TOY if model == "toy" else model
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise UsageError(f"{model} is not a diffusers folder (no model_index.json)")
    elif os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise UsageError(f"model {model} does not exist (give a hub id or a diffusers folder)")
    index = config(path, model)
    kind = index.get("_class_name", "")
    if "transformer" in index or "Flux" in kind or "StableDiffusion3" in kind:
        raise UsageError(f"{model} is a {kind or 'transformer'} (a diffusion transformer, not a UNet): "
                         f"not supported; erasure here runs on {SUPPORTED}")
    if kind not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline") or index.get("requires_aesthetics_score"):
        what = "the SDXL refiner" if "XL" in kind else f"a {kind or 'pipeline of unknown class'}"
        raise UsageError(f"{model} is {what}: not supported; erasure here runs on {SUPPORTED}")
    if (index.get("text_encoder") or [None])[0] is None:
        raise UsageError(f"{model} has no text_encoder: not supported; erasure here runs on {SUPPORTED}")
    unet = config(path, model, "unet")
    if unet.get("in_channels") != unet.get("out_channels"):
        raise UsageError(f"{model}'s UNet takes {unet.get('in_channels')} input channels (an inpainting or "
                         f"depth model): not supported; erasure here runs on {SUPPORTED}")
    prediction = config(path, model, "scheduler").get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise UsageError(f"{model} predicts {prediction}; supported: epsilon and v_prediction")
    if kind == "StableDiffusionXLPipeline":
        return "sdxl", prediction, index
    sd2 = unet.get("use_linear_projection") or config(path, model, "text_encoder").get("hidden_act") == "gelu"
    return ("sd2" if sd2 else "sd1"), prediction, index


def load_model(model=SD14, device="cpu", vae=True):
    """Tokenizer, text encoder(s), UNet, VAE (None for a pixel-space model, or when vae=False:
    erase.py trains without decoding) and DDIM scheduler of a checkpoint: a hub id, a local
    diffusers folder, or "toy" (toy.py's model). Only safetensors are read, always as float32
    (fp16-stored checkpoints included). Everything is frozen; erase.py chooses what to train."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    family, prediction, index = inspect(model)
    path = TOY if model == "toy" else model
    try:
        # latent DDIM never clips x0, and its last step goes to abar at timestep 0 (SD's own DDIM
        # config; SDXL's Euler config names neither, and DDIM's class defaults would clip)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", clip_sample=False,
                                                  set_alpha_to_one=False)
        # `dtype` (transformers 5, diffusers 0.42): without it an fp16 checkpoint stays fp16
        kw = dict(use_safetensors=True, dtype=torch.float32)
        parts = dict(tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                     text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw),
                     unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw), scheduler=scheduler)
        if family == "sdxl":
            parts.update(tokenizer_2=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                         text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
                             path, subfolder="text_encoder_2", **kw))
        has_vae = index.get("vae", [None])[0] is not None
        parts["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw) if vae and has_vae else None
        vae_cfg = config(path, model, "vae") if has_vae else None
    except (OSError, ValueError, EnvironmentError) as e:
        raise UsageError(f"could not load {model}: {str(e).splitlines()[0]}") from None
    return assemble(parts, model, device, vae_cfg, index.get("force_zeros_for_empty_prompt", False))


def assemble(parts, name, device="cpu", vae_cfg=None, force_zeros=None):
    """The model namespace from its parts (load_model's, or bench.py's random ones), frozen, on
    device: tokenizer (the BPE every encoder shares), tokenizers and text_encoders (one per
    encoder), unet, vae, scheduler; family, prediction, pixels (the native image side), and
    force_zeros (the pipeline's unconditional is zeros, SDXL-base)."""
    xl = "text_encoder_2" in parts
    encoders = [parts["text_encoder"]] + ([parts["text_encoder_2"]] if xl else [])
    unet = parts["unet"]
    for net in (*encoders, unet, parts.get("vae")):
        if net is not None:
            net.requires_grad_(False).eval().to(device)
    vae_cfg = vae_cfg or (parts["vae"].config if parts.get("vae") is not None else None)
    scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1) if vae_cfg else 1  # pixel space: 1
    sd2 = unet.config.use_linear_projection or encoders[0].config.hidden_act == "gelu"
    return argparse.Namespace(
        tokenizer=parts["tokenizer"], tokenizers=[parts["tokenizer"]] + ([parts["tokenizer_2"]] if xl else []),
        text_encoders=encoders, unet=unet, vae=parts.get("vae"), scheduler=parts["scheduler"], name=name,
        family="sdxl" if xl else "sd2" if sd2 else "sd1", prediction=parts["scheduler"].config.prediction_type,
        pixels=unet.config.sample_size * scale, force_zeros=xl if force_zeros is None else force_zeros)


# ---------------------------------------------------------------------------- conditioning
def tokenize(m, prompts):
    """Token ids (B, 77) with the first tokenizer: SOT, the prompt, EOT, padding."""
    return m.tokenizer(list(prompts), padding="max_length", max_length=TOKENS, truncation=True,
                       return_tensors="pt").input_ids


def repad(ids, tokenizer):
    """ids with everything after the first EOT set to this tokenizer's padding ("!" for SD-2's
    and SDXL's second tokenizer): the same BPE, another pad id."""
    after = (ids == tokenizer.eos_token_id).int().cumsum(1).cumsum(1) > 1
    return ids.masked_fill(after, tokenizer.pad_token_id)


def encode_ids(m, ids, tokens=None):
    """Conditioning values (B, L, D) from token ids (B, 77). tokens(j, E, ids) -> (B, 77, D_j),
    when given, replaces encoder j's table lookup E[ids] (E: its embedding table): the
    attacks' soft or learned tokens. Position embeddings and transformers are the encoders' own."""
    states, pooled = [], None
    for j, (tok, enc) in enumerate(zip(m.tokenizers, m.text_encoders)):
        ids_j = repad(ids, tok).to(enc.device)
        table = enc.get_input_embeddings()
        hook = None
        if tokens is not None:
            x = tokens(j, table.weight, ids_j)
            hook = table.register_forward_hook(lambda module, inputs, out, x=x: x.to(out.dtype))
        try:
            out = enc(ids_j, output_hidden_states=m.family == "sdxl")
        finally:
            if hook:
                hook.remove()
        if m.family == "sdxl":  # both encoders' penultimate states; the second's projected pooled
            states.append(out.hidden_states[-2])
            pooled = out[0] if j == 1 else pooled
        else:  # SD-2's folder already dropped OpenCLIP's last layer: [0] is ldm's "penultimate"
            states.append(out[0])
    c = torch.cat(states, dim=-1)  # (B, 77, D)
    if pooled is None:
        return c
    row = torch.zeros_like(c[:, :1])
    row[:, 0, :pooled.shape[-1]] = pooled
    return torch.cat([c, row], dim=1)  # (B, 78, D): SDXL's pooled embedding in row 77


@torch.no_grad()
def encode(m, prompts):
    """c = tau(prompt) for each prompt: (B, L, D), see the module's docstring."""
    return encode_ids(m, tokenize(m, prompts))


def tokens_of(c):
    """What cross-attention reads of a conditioning value: its 77 token rows, (B, 77, D)."""
    return c[:, :TOKENS]


@torch.no_grad()
def empty(m, zeros=None):
    """The empty concept "": encoded (SD-1/2's unconditional, EAP's c_n) or zeros (diffusers'
    SDXL pipeline with force_zeros_for_empty_prompt). None: the pipeline's own choice."""
    c = encode(m, [""])
    return torch.zeros_like(c) if (m.force_zeros if zeros is None else zeros) else c


# ---------------------------------------------------------------------------- the UNet
def unet_output(m, z, t, c, values=None, unet=None):
    """What m.unet (or `unet`) predicts at (z_t, t, c), epsilon or v as the model was trained,
    with the parameter values `values` (name -> tensor) swapped in where given. z: (B, C, H, W);
    t: int or tensor (fractional for LMS)."""
    unet = m.unet if unet is None else unet
    dtype = unet.dtype  # a UNet cast for generation (fp16) gets its inputs cast; the output comes
    kw = dict(encoder_hidden_states=tokens_of(c).to(dtype))  # back in z's precision
    if m.family == "sdxl":  # pooled embedding (row 77) and micro-conditioning (H, W, 0, 0, H, W)
        h = m.pixels
        ids = torch.tensor([h, h, 0, 0, h, h], device=z.device, dtype=dtype).expand(len(z), -1)
        kw["added_cond_kwargs"] = dict(text_embeds=c[:, TOKENS, :pooled_dim(m)].to(dtype), time_ids=ids)
    args = (z.to(dtype), t)
    return (functional_call(unet, values, args, kw) if values else unet(*args, **kw)).sample.to(z.dtype)


def eps(m, z, t, c, values=None, unet=None):
    """epsilon(z_t, t, c): unet_output, converted for v-prediction models: eps = sqrt(abar_t) v +
    sqrt(1 - abar_t) z_t, abar at the timestep the UNet was queried with."""
    out = unet_output(m, z, t, c, values, unet)
    if m.prediction == "v_prediction":
        a = m.scheduler.alphas_cumprod.to(z.device)[torch.as_tensor(t, device=z.device)].to(z.dtype)
        a = a.reshape(-1, *[1] * (z.dim() - 1))
        out = a.sqrt() * out + (1 - a).sqrt() * z  # eps = sqrt(abar_t) v + sqrt(1 - abar_t) z_t
    return out


def pooled_dim(m):
    return m.text_encoders[-1].config.projection_dim


def ddim(eps_fn, scheduler, z, c, c_uncond, guidance, steps, stop=None, progress=False, start=0):
    """DDIM (eta = 0) with classifier-free guidance over the timesteps ts[start:stop] of `steps`
    (all when None): z = z_T is taken to sit at ts[start] (the published CompVis sampler's
    `timesteps[:-1]`: start 1). eps_fn(z, t, c) -> epsilon (e.g. lambda z, t, c: eps(m, z, t, c)).
    Returns z_t and t, the timestep z_t is at (what the UNet is queried with). z: (B, C, H, W);
    c, c_uncond: (B, L, D)."""
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.to(z.device)
    ts = scheduler.timesteps.tolist()
    stop = len(ts) if stop is None else stop
    cond = torch.cat([c_uncond, c])
    for t in tqdm(ts[start:stop], desc="DDIM", leave=False, disable=not progress):
        # classifier-free guidance, one batched forward: eps = eps(c_u) + g (eps(c) - eps(c_u))
        # t as a tensor (the UNet makes one of an int): torch.compile sees no new constant per step
        eps_u, eps_c = eps_fn(torch.cat([z, z]), torch.tensor(t, device=z.device), cond).chunk(2)
        e = eps_u + guidance * (eps_c - eps_u)
        t_prev = t - scheduler.config.num_train_timesteps // steps
        a_t = abar[t]
        a_prev = abar[t_prev] if t_prev >= 0 else scheduler.final_alpha_cumprod.to(z.device)
        # x0 = (z_t - sqrt(1 - abar_t) eps) / sqrt(abar_t);  z_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps
        x0 = (z - (1 - a_t).sqrt() * e) / a_t.sqrt()
        z = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * e
    t_at = ts[stop] if stop < len(ts) else 0
    return z, t_at


def noise(m, n, seed, device):
    """z_T for seed `seed`: (n, C, H, W) at the family's native size, drawn on the CPU so that
    every device agrees."""
    cfg = m.unet.config
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(device)


@torch.no_grad()
def decode(m, z):
    """z_0 -> images in [0, 1], (B, 3, H, W). A pixel-space model (no VAE) samples images directly."""
    x = z if m.vae is None else m.vae.decode((z / m.vae.config.scaling_factor).to(m.vae.dtype)).sample
    return (x.float() / 2 + 0.5).clamp(0, 1)
