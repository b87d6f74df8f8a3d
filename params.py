"""theta and theta': which UNet parameters an erasure trains, the frozen model eps_theta as the
same UNet with the original values of that subset swapped in (no second UNet in memory), and
the bf16 copies of the frozen weights that sampling reads."""
import torch

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


def frozen(m, theta):
    """eps_theta: the UNet with the original values theta of the trained subset swapped in."""
    unet = m.unet

    def eps_theta(z, t, c):
        # Gradient checkpointing recomputes a forward during backward, by then with theta' back
        # in place: a forward that backward goes through (pi's gradient, --pi_grad both) runs
        # without it. (diffusers checkpoints only where grad is enabled.)
        ckpt = unet.is_gradient_checkpointing and torch.is_grad_enabled()
        if ckpt:
            unet.disable_gradient_checkpointing()
        try:
            return eps(m, z, t, c, theta)
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
