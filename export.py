"""Erased weights as LoRA adapters: a full delta (erase.py's weights.safetensors, UCE's edit
included) to a LoRA by truncated SVD, layer by layer; a diffusers adapter to kohya's format.

    python export.py lora out/weights.safetensors --rank 4           # out/pytorch_lora_weights.safetensors
    python export.py kohya out/pytorch_lora_weights.safetensors      # out/lora_kohya.safetensors

For each changed weight W' (a Linear's (out, in), a Conv's (out, in, k, k) as (out, in k k)):
dW = W' - W = U S V^T, and the rank-r adapter B A with B = U_r S_r^(1/2), A = S_r^(1/2) V_r^T,
alpha = r (scale 1): the best rank-r approximation of dW in the Frobenius norm (Eckart-Young).
Each layer's relative error ||dW - B A|| / ||dW|| is printed, with the file's size. Biases and
norms (a LoRA cannot hold them) are reported and left out. The base model W comes from --model,
or from the model the weights' metadata names.
"""
import argparse
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lora
from cli import UsageError, one_line_errors, run_cli
from family import load_model
from params import checked_weights


def svd_factors(dW, rank):
    """B (out, r) and A (r, in) with B A the best rank-r approximation of dW (out, in), in float64."""
    U, S, Vh = torch.linalg.svd(dW.double(), full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def to_lora(args):
    """python export.py lora: the full delta in args.weights as a rank-r adapter of the base model."""
    if lora.is_adapter(args.weights):
        raise UsageError(f"{args.weights} is already a LoRA adapter; export.py lora takes a full delta (weights.safetensors)")
    with safe_open(args.weights, "pt") as f:
        meta = f.metadata() or {}
    model = args.model or meta.get("model")
    if not model:
        raise UsageError(f"{args.weights} names no model in its metadata: give --model")
    m = load_model(model, "cpu", vae=False)
    new = checked_weights(m, args.weights)  # refuses another family's weights in one line
    old = dict(m.unet.named_parameters())
    layers = sorted({n.rsplit(".", 1)[0] for n in new if n.endswith(".weight") and new[n].dim() in (2, 4)})
    left_out = {n: float((new[n] - old[n]).norm() / old[n].norm()) for n in new
                if n.rsplit(".", 1)[0] not in layers or not n.endswith(".weight")}
    deltas = {n: (new[f"{n}.weight"] - old[f"{n}.weight"]).flatten(1) for n in layers}
    _, config = lora.add(m.unet, layers, args.rank, args.rank)  # alpha = r: B A is dW itself
    errors = {}
    modules = dict(m.unet.named_modules())
    with torch.no_grad():
        for n, dW in deltas.items():
            B, A = svd_factors(dW, args.rank)
            mod = modules[n]
            mod.lora_A["default"].weight.copy_(A.reshape(mod.lora_A["default"].weight.shape))
            mod.lora_B["default"].weight.copy_(B.reshape(mod.lora_B["default"].weight.shape))
            errors[n] = float((dW.double() - B @ A).norm() / dW.double().norm().clamp(min=1e-30))
    out = args.out or os.path.dirname(os.path.abspath(args.weights))
    info = dict(model=str(model), method=meta.get("method", ""), concept=meta.get("concept", ""),
                train_method="export", source=os.path.basename(args.weights))
    path = lora.save(out, m.unet, config, m.family, info, args.format, args.dtype)
    for n, e in errors.items():
        print(f"{n}: relative error {e:.4f}")
    if left_out:
        print(f"left out (not a layer's weight, a LoRA cannot hold it): {len(left_out)} tensors, their change "
              f"relative to their norm at most {max(left_out.values()):.2e}")
    print(json.dumps({"wrote": path, "bytes": os.path.getsize(path), "rank": args.rank, "layers": len(errors),
                      "max_relative_error": max(errors.values()), "left_out": len(left_out)}))
    return dict(path=path, errors=errors, left_out=left_out)


def to_kohya(args):
    """python export.py kohya: a diffusers adapter (erase.py --lora_rank) in kohya's format."""
    if not lora.is_adapter(args.weights):
        raise UsageError(f"{args.weights} is a full delta, not a LoRA adapter; export.py lora makes one of it")
    with safe_open(args.weights, "pt") as f:
        meta = f.metadata() or {}
    state = {k.removeprefix("unet."): v for k, v in load_file(args.weights).items() if ".lora_A." in k or ".lora_B." in k}
    if not state or "lora_alpha" not in meta:
        raise UsageError(f"{args.weights} is not an adapter that erase.py or export.py wrote (diffusers' format)")
    out = args.out or os.path.dirname(os.path.abspath(args.weights))
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, lora.KOHYA)
    meta = {k: v for k, v in meta.items() if k != "lora_adapter_metadata"}  # kohya's carry alpha as tensors
    lora.save_file_atomic(lora.to_kohya(state, float(meta["lora_alpha"])), path, dict(meta, format="pt"))
    print(json.dumps({"wrote": path, "bytes": os.path.getsize(path)}))
    return dict(path=path)


def parse_args(argv=None):
    p = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    sub = p.add_subparsers(dest="command", required=True)
    a = one_line_errors(sub.add_parser("lora", help="a full delta to a LoRA adapter (truncated SVD)"))
    a.add_argument("weights", help="erase.py's weights.safetensors (any method, uce included)")
    a.add_argument("--rank", type=int, required=True)
    a.add_argument("--model", help="the base model (default: the one the weights' metadata names)")
    a.add_argument("--format", default="diffusers", choices=["diffusers", "kohya"])
    a.add_argument("--dtype", default="fp16", choices=list(lora.DTYPES))
    a.add_argument("--out", help="folder (default: the weights' own)")
    k = one_line_errors(sub.add_parser("kohya", help="a diffusers adapter in kohya's format (A1111, ComfyUI)"))
    k.add_argument("weights", help="pytorch_lora_weights.safetensors (erase.py --lora_rank, or export.py lora)")
    k.add_argument("--out", help="folder (default: the adapter's own)")
    args = p.parse_args(argv)
    if not (os.path.isfile(args.weights) and args.weights.endswith(".safetensors")):
        raise UsageError(f"weights {args.weights} is not a .safetensors file")
    if args.command == "lora" and args.rank < 1:
        raise UsageError(f"--rank {args.rank} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    return to_lora(args) if args.command == "lora" else to_kohya(args)


if __name__ == "__main__":
    run_cli(main)
