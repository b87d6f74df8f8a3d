"""Erasure into a LoRA adapter (peft): theta' is a low-rank update of each module that
--train_method names, W + (alpha / r) B A, and the frozen eps_theta is the same UNet with the
adapter switched off, so no copy of theta is kept. Written in diffusers' format
(pytorch_lora_weights.safetensors, with peft's config in its metadata so that alpha survives
loading) or kohya's (`--lora_format kohya`: lora_unet_*.lora_down / lora_up / alpha, which
diffusers', ComfyUI's and A1111's loaders read), in fp16 by default (`--lora_dtype`).

    python erase.py --concept "garbage truck" --lora_rank 4            # out/pytorch_lora_weights.safetensors
    python export.py lora out/weights.safetensors --rank 4             # a full delta to a LoRA (SVD)

Which modules: xattn, attn2's to_q, to_k, to_v and to_out.0; xattn-strict, attn2's to_k and
to_v; noxattn and full, every Linear and Conv2d layer whose weight that method trains.
"""
import contextlib
import json
import os
import re
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cli import UsageError

FILE = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights(folder) looks for
KOHYA = "lora_kohya.safetensors"
ATTN2 = {"xattn": ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"],
         "xattn-strict": ["attn2.to_k", "attn2.to_v"]}
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def target_modules(unet, train_method, names):
    """The modules the adapter wraps: attn2's projections for xattn and xattn-strict (matched
    by suffix), else the Linear and Conv2d layers whose weights --train_method trains (names:
    params.trained_parameter_names)."""
    if train_method in ATTN2:
        return ATTN2[train_method]
    names = set(names)
    return sorted(n for n, mod in unet.named_modules()
                  if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and f"{n}.weight" in names)


def widths(unet, targets):
    """min(in, out) of every targeted layer, by module name: a rank above it adds nothing."""
    out = {}
    for n, mod in unet.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and any(n == t or n.endswith("." + t) for t in targets):
            shape = mod.weight.shape
            out[n] = min(shape[0], shape[1])
    return out


def add(unet, targets, rank, alpha=None, seed=0):
    """Wrap the modules `targets` (target_modules) of unet (frozen) with a LoRA adapter of rank r
    and scale alpha / r (B = 0 at the start: the UNet's outputs are unchanged; A drawn as peft
    draws it, Kaiming-uniform, but from a generator seeded with `seed`, so that a run, and its
    resume, starts from the same adapter). Returns theta' (the adapter's parameters, name ->
    tensor, requiring grad) and peft's LoraConfig."""
    from peft import LoraConfig
    width = widths(unet, targets)
    if rank < 1 or rank > min(width.values()):
        narrow = min(width, key=width.get)
        raise UsageError(f"--lora_rank {rank} must be between 1 and the narrowest adapted layer's width "
                         f"({width[narrow]}, {narrow})")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=True)
    unet.add_adapter(config)
    theta_prime = {n: p for n, p in unet.named_parameters() if ".lora_" in n}
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in theta_prime.items():
            if ".lora_A." in n:  # peft's init, a = sqrt(5), drawn on the CPU from g
                p.copy_(torch.nn.init.kaiming_uniform_(torch.empty(p.shape), a=5 ** 0.5, generator=g))
    return theta_prime, config


@contextlib.contextmanager
def disabled(unet):
    """The UNet with its adapter switched off (theta), inside the block; a UNet without one as it is."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        yield
        return
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def remove(unet):
    """Take every adapter out (the wrapped layers become plain layers again): the UNet is theta."""
    if getattr(unet, "_hf_peft_config_loaded", False):
        unet.unload_lora()


def is_adapter(path):
    """Whether a .safetensors file is a LoRA (diffusers' or kohya's keys) rather than a full delta."""
    with safe_open(path, "pt") as f:
        return any(".lora_A." in k or ".lora_down." in k for k in f.keys())


def to_kohya(state, alpha):
    """peft's names (down_blocks.0...attn2.to_k.lora_A.weight) to kohya's
    (lora_unet_down_blocks_0_..._attn2_to_k.lora_down.weight, .lora_up.weight, .alpha)."""
    out = {}
    for key, w in state.items():
        module, which = re.match(r"(.*)\.lora_([AB])\.weight$", key).groups()
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if which == 'A' else 'up'}.weight"] = w
        out[f"{name}.alpha"] = torch.tensor(float(alpha))
    return out


def save(out, unet, config, family, info, kind="diffusers", dtype="fp16"):
    """The adapter of unet as one file in `out`: diffusers' format (written by the pipeline's own
    save_lora_weights, peft's config in its metadata) or kohya's; `info` (model, method, concept,
    train_method) and the family in the metadata too. Atomic: written aside, then renamed."""
    from peft.utils import get_peft_model_state_dict
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    state = {k: v.detach().to(DTYPES[dtype]).cpu().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    meta = dict(info, family=family, lora_rank=str(config.r), lora_alpha=str(config.lora_alpha))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, FILE if kind == "diffusers" else KOHYA)
    if kind == "kohya":  # no peft config: kohya's files carry alpha as tensors
        tensors, meta = to_kohya(state, config.lora_alpha), dict(meta, format="pt")
    else:
        pipe = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
        with tempfile.TemporaryDirectory(dir=out) as d:
            pipe.save_lora_weights(d, unet_lora_layers=state, unet_lora_adapter_metadata=config.to_dict())
            with safe_open(os.path.join(d, FILE), "pt") as f:
                meta = dict(f.metadata(), **meta)
            tensors = load_file(os.path.join(d, FILE))
    save_file_atomic(tensors, path, meta)
    print(json.dumps({"wrote": path, "parameters": sum(v.numel() for k, v in tensors.items() if "alpha" not in k),
                      "bytes": os.path.getsize(path)}))
    return path


def checked(unet, path, family):
    """The adapter in `path` (diffusers' or kohya's format, as diffusers' loader converts it) and
    its metadata. Refused in one line: an adapter made for another family, or one whose modules
    or shapes this UNet lacks (names in other tools' conventions are left to diffusers' loader)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    with safe_open(path, "pt") as f:
        made_for = (f.metadata() or {}).get("family")
    if made_for and made_for != family:
        raise UsageError(f"adapter {path} was made for an {made_for} model; this one is {family}")
    modules = dict(unet.named_modules())
    kohya = {"lora_unet_" + n.replace(".", "_"): n for n in modules}
    for key, w in load_file(path).items():
        found = re.match(r"(?:unet\.)?(.*)\.lora_(A|B|down|up)\.weight$", key)
        if not found or not (found.group(1) in modules or found.group(1) in kohya):
            continue
        name, which = kohya.get(found.group(1), found.group(1)), found.group(2)
        weight = getattr(modules[name], "weight", None)
        if weight is None or w.shape[1 if which in ("A", "down") else 0] != weight.shape[1 if which in ("A", "down") else 0]:
            raise UsageError(f"adapter {path} does not fit this UNet (e.g. {name})")
    pipe = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    try:
        state, alphas, meta = pipe.lora_state_dict(path, return_lora_metadata=True)  # kohya's: converted
    except (ValueError, KeyError) as e:
        raise UsageError(f"adapter {path} could not be read: {str(e).splitlines()[0]}") from None
    # in the UNet's precision: peft runs the adapter's branch in its weights' dtype (an fp16 file in
    # an fp32 UNet would compute that branch in fp16)
    dtype = next(unet.parameters()).dtype
    return dict(state_dict={k: v.to(dtype) for k, v in state.items()}, network_alphas=alphas, metadata=meta)


def attach(unet, adapter):
    """The adapter (checked's output) into unet, in place of any it had."""
    remove(unet)
    unet.load_lora_adapter(adapter["state_dict"], network_alphas=adapter["network_alphas"], prefix="unet",
                           metadata=adapter["metadata"])


def save_file_atomic(tensors, path, metadata):
    save_file(tensors, path + ".tmp", metadata={k: str(v) for k, v in metadata.items()})
    os.replace(path + ".tmp", path)
