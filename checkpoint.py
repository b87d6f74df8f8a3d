"""An erasure's checkpoint and resume: theta', Adam's state, each pi with its optimiser and the
random generator, written atomically (safetensors), so that a resumed run ends with the same
weights as an uninterrupted one."""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cli import UsageError

RESUME = "resume.state"  # safetensors format; a different suffix keeps one *.safetensors in --out


def save_atomic(tensors, path, metadata=None):
    """Write to a temporary file, then rename: a half-written file is never taken for a whole one."""
    save_file(tensors, path + ".tmp", metadata=metadata)
    os.replace(path + ".tmp", path)


def flatten(prefix, opt):
    """An optimiser's state as flat tensors (safetensors holds tensors only)."""
    return {f"{prefix}.{i}.{k}": v.detach().cpu().contiguous()
            for i, st in opt.state_dict()["state"].items() for k, v in st.items()}


def unflatten(prefix, opt, tensors, device):
    sd = opt.state_dict()
    sd["state"] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            i, k = key[len(prefix) + 1:].split(".", 1)
            sd["state"].setdefault(int(i), {})[k] = v if k == "step" else v.to(device)
    opt.load_state_dict(sd)


def save(out, step, theta_prime, opt, S, gen):
    """Everything a resume needs: theta', Adam's state, each pi with its optimiser, the RNG."""
    tensors = {f"theta.{n}": p.detach().cpu().contiguous() for n, p in theta_prime.items()}
    tensors.update(flatten("opt", opt))
    for j, s in enumerate(S):
        tensors[f"pi.{j}"] = s["x"].detach().cpu().contiguous()
        tensors.update(flatten(f"piopt{j}", s["opt"]))
    tensors["rng"] = gen.get_state()
    save_atomic(tensors, os.path.join(out, RESUME), metadata={"step": str(step)})


def resume(args, config, theta_prime, opt, S, gen, device):
    """Restore a checkpoint written with the same settings; return the step to go on from."""
    path = os.path.join(args.out, RESUME)
    logpath = os.path.join(args.out, "log.jsonl")
    if not args.resume:
        if os.path.isfile(path):
            raise UsageError(f"{args.out} holds the checkpoint of an unfinished run: add --resume to "
                             f"go on from it, or delete {path} (or choose another --out) to start over")
        if os.path.exists(logpath):
            os.remove(logpath)  # a finished run's log: this run starts over
        return 0
    if not os.path.isfile(path):
        raise UsageError(f"--resume: no checkpoint in {args.out} (written with --save_every)")
    old = json.load(open(os.path.join(args.out, "config.json")))
    changed = [k for k in config if k != "steps" and old.get(k) != config[k]]
    if changed:
        raise UsageError(f"--resume with other settings than the checkpoint's: {', '.join(changed)}")
    with safe_open(path, "pt") as f:
        step = int(f.metadata()["step"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    with torch.no_grad():
        for n, p in theta_prime.items():
            p.copy_(tensors[f"theta.{n}"])
        for j, s in enumerate(S):
            s["x"].copy_(tensors[f"pi.{j}"])
    unflatten("opt", opt, tensors, device)
    for j, s in enumerate(S):
        unflatten(f"piopt{j}", s["opt"], tensors, device)
    gen.set_state(tensors["rng"])
    lines = open(logpath).readlines()[:step] if os.path.exists(logpath) else []
    with open(logpath, "w") as f:  # drop what was logged after the checkpoint
        f.writelines(lines)
    return step


def save_weights(args, family, tensors):
    """weights.safetensors: the changed UNet parameters under their own names, the model, method,
    concept and family in its metadata; the finished run's checkpoint removed."""
    weights = os.path.join(args.out, "weights.safetensors")
    save_atomic({n: w.cpu().contiguous() for n, w in tensors.items()}, weights,
                metadata={"model": str(args.model), "method": args.method, "concept": args.concept,
                          "family": family})
    print(json.dumps({"wrote": weights, "parameters": sum(w.numel() for w in tensors.values())}))
    return finished(args.out, weights)


def finished(out, result):
    """A run's result is written: its checkpoint goes."""
    if os.path.exists(os.path.join(out, RESUME)):
        os.remove(os.path.join(out, RESUME))
    return result
