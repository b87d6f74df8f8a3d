"""theta and theta': which UNet parameters an erasure trains, the frozen model eps_theta as the
same UNet with the original values of that subset swapped in (no second UNet in memory; with a
LoRA adapter, the UNet with the adapter off), the bf16 copies of the frozen weights that
sampling reads, and loading an erasure's output (a full delta or an adapter) into a model."""
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lora
from cli import UsageError
from family import eps

TRAIN_METHODS = ("xattn", "xattn-strict", "noxattn", "full")


def trained_parameter_names(unet, train_method):
    """ESD-x (xattn): names containing attn2, the cross-attention. ESD-x-strict (xattn-strict,
    ESD's current code): attn2's key and value projections only. ESD-u (noxattn): all but attn2,
    the time embedding and the output layer (conv_norm_out, conv_out). full: all."""
    names = [n for n, _ in unet.named_parameters()]
    if train_method == "xattn":
        return [n for n in names if "attn2" in n]
    if train_method == "xattn-strict":
        return [n for n in names if "attn2.to_k." in n or "attn2.to_v." in n]
    if train_method == "noxattn":
        return [n for n in names if not ("attn2" in n or n.startswith(("time_embedding", "conv_out", "conv_norm_out")))]
    return names


def split(unet, train_method):
    """theta' (the trained subset of the UNet's parameters, now requiring grad) and theta (a
    copy of their original values), name -> tensor."""
    names = set(trained_parameter_names(unet, train_method))
    theta_prime = {n: p for n, p in unet.named_parameters() if n in names}
    for p in theta_prime.values():
        p.requires_grad_(True)
    return theta_prime, {n: p.detach().clone() for n, p in theta_prime.items()}


def frozen(m, theta, extra=None):
    """eps_theta: the UNet with the original values theta of the trained subset swapped in (and
    `extra` values too: sampling's bf16 copies); a UNet with a LoRA adapter (theta empty), with
    the adapter off."""
    unet = m.unet
    values = {**theta, **(extra or {})} or None

    def eps_theta(z, t, c):
        # Gradient checkpointing recomputes a forward during backward, by then with theta' back
        # in place: a forward that backward goes through (pi's gradient, --pi_grad both) runs
        # without it. (diffusers checkpoints only where grad is enabled.)
        ckpt = unet.is_gradient_checkpointing and torch.is_grad_enabled()
        if ckpt:
            unet.disable_gradient_checkpointing()
        try:
            with lora.disabled(unet):
                return eps(m, z, t, c, values)
        finally:
            if ckpt:
                unet.enable_gradient_checkpointing()
    return eps_theta


def matmul_parameters(unet):
    """Names of the Linear and Conv weights and biases: the parameters that autocast casts to
    bf16 at every call (norms run in fp32 under autocast and keep their fp32 parameters)."""
    return [f"{name}.{pn}" if name else pn for name, mod in unet.named_modules()
            if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) for pn, _ in mod.named_parameters(recurse=False)]


def low_precision(unet, values, dtype=torch.bfloat16):
    """{name: value cast to dtype} for the matmul parameters among `values` (name -> tensor)."""
    return {n: values[n].detach().to(dtype) for n in matmul_parameters(unet) if n in values}


def weights_family(path):
    """The family a weights file was made for (erase.py's metadata), or None."""
    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("family")


def load_weights(m, path):
    """Apply erase.py's output to m.unet: a full delta (the trained parameters under the UNet's
    own names) or a LoRA adapter (diffusers' or kohya's format)."""
    prepared(m, path)()


def prepared(m, path):
    """erase.py's output checked against m (refused in one line where it does not fit), and a
    function that applies it to m.unet: load_state_dict for a full delta, an adapter attached."""
    if os.path.isfile(path) and path.endswith(".safetensors") and lora.is_adapter(path):
        adapter = lora.checked(m.unet, path, m.family)
        return lambda: lora.attach(m.unet, adapter)
    state = checked_weights(m, path)
    return lambda: m.unet.load_state_dict(state, strict=False)


def checked_weights(m, path):
    """A full delta as {name: tensor}, refused in one line when it was made for another family,
    or does not fit m.unet (a name it lacks, another shape), or is an adapter."""
    if not os.path.isfile(path) or not path.endswith(".safetensors"):
        raise UsageError(f"weights {path} is not a .safetensors file")
    if lora.is_adapter(path):
        raise UsageError(f"{path} is a LoRA adapter, not the full delta expected here")
    made_for = weights_family(path)
    if made_for and made_for != m.family:
        raise UsageError(f"weights {path} were made for an {made_for} model; {m.name} is {m.family}")
    state = load_file(path)
    params = dict(m.unet.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise UsageError(f"weights {path} do not fit this UNet (e.g. {unknown[0]})")
    wrong = [n for n in state if state[n].shape != params[n].shape]
    if wrong:
        raise UsageError(f"weights {path} do not fit this UNet: {wrong[0]} is {tuple(state[wrong[0]].shape)}, "
                         f"the UNet's {tuple(params[wrong[0]].shape)}")
    return state
