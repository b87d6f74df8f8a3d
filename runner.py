"""Running a plan of stages (protocol.py makes them): each stage one call of erase.py, sample.py,
evaluate.py or attack.py in this process, its output in its log, recorded when it ends
(OUT/stages/NAME.json: its command, written when it starts and when it ends), so that a run
started again redoes no finished stage, goes on with a stopped one, and refuses one recorded
with another command (unless --redo names its kind). Under torchrun or
accelerate launch the erasures and attacks are shared out over the ranks, every rank takes its
rows of each generation (sample.py), and rank 0 makes the prompts and the scores; a barrier
between these phases. One progress bar over it all.
"""
import datetime
import json
import os
import shlex
import shutil
import sys
import time
from contextlib import redirect_stderr, redirect_stdout

import torch
from tqdm import tqdm

import attack
import erase
import evaluate
import sample
from cli import UsageError


def ranks():
    """(rank, world size): torchrun's or accelerate launch's RANK and WORLD_SIZE, else (0, 1);
    with several, the ranks join a gloo group (CPU or GPU: it only waits for the others)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return rank, world


MAINS = {"erase.py": lambda argv, bar: erase.main(argv), "sample.py": lambda argv, bar: sample.main(argv, bar),
         "evaluate.py": lambda argv, bar: evaluate.main(argv), "attack.py": lambda argv, bar: attack.main(argv)}


def recorded(args, stage):
    """The stage's record (OUT/stages/NAME.json, written when it starts and again when it ends):
    None if it never started, else its command and whether it finished."""
    path = os.path.join(args.out, "stages", stage["name"] + ".json")
    return json.load(open(path)) if os.path.isfile(path) else None


def done(args, stage):
    rec = recorded(args, stage)
    return bool(rec and rec["finished"] and rec["argv"] == stage["argv"])


def output(stage):
    """What a stage writes: erase.py's folder, sample.py's folder, a prompt CSV, a JSON."""
    argv = stage["argv"]
    flag = {"erase.py": "--out", "sample.py": "--out_dir"}.get(stage["script"], "--out" if stage["kind"] == "prompts"
                                                                 else "--json")
    return argv[argv.index(flag) + 1]


def todo(args, stages):
    """The stages not yet done, in order. One recorded with another command is refused unless
    --redo names its kind; it is then made again, and so is every later stage that reads its
    output (the plan's order is the order of its inputs): their old output, whole or partial, goes
    first. A stage stopped with the same command keeps its partial output and goes on from it."""
    left, redone = [], []
    for s in stages:
        rec = recorded(args, s)
        stale = any(a == o or a.startswith(o + os.sep) for a in s["argv"] for o in redone)
        if done(args, s) and not stale:
            continue
        changed = rec is not None and rec["argv"] != s["argv"]
        if changed and not stale and s["kind"] not in args.redo:
            raise UsageError(f"{s['name']} was made with another command ({shlex.join(rec['argv'])[:200]}): "
                             f"give --redo {s['kind']}, or another --out")
        if changed or stale:
            out = output(s)
            shutil.rmtree(out) if os.path.isdir(out) else os.remove(out) if os.path.exists(out) else None
            if rec is not None:
                os.remove(os.path.join(args.out, "stages", s["name"] + ".json"))
            redone.append(out)
        left.append(s)
    return left


def run_stage(args, s, bar, log):
    """One stage in this process, its output (and tqdm's) in its log; recorded when it ends."""
    argv = list(s["argv"])
    if s["script"] == "erase.py" and erase.parse_args(argv).method != "uce":
        out = output(s)  # a stopped erasure goes on from its checkpoint
        argv += ["--save_every", "100"] + (["--resume"] if os.path.isfile(os.path.join(out, "resume.state")) else [])
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f, redirect_stdout(f), redirect_stderr(f):
        print(f"$ python {s['script']} {shlex.join(argv)}", flush=True)
        try:
            MAINS[s["script"]](argv, bar)
        except UsageError as e:
            raise UsageError(f"{s['name']}: {e}") from None


def record(args, s, finished=True):
    """The stage's record: its command, the rank that ran it, when it finished (None: started)."""
    path = os.path.join(args.out, "stages", s["name"] + ".json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(dict(argv=s["argv"], script=s["script"], rank=int(os.environ.get("RANK", 0)),
                       finished=time.strftime("%Y-%m-%d %H:%M:%S") if finished else None), f)
    os.replace(path + ".tmp", path)


def phases(stages):
    """prompts (rank 0), erasures (shared out), generations (every rank, sharded by rows), scores
    and attacks (shared out): a barrier between phases under torchrun."""
    return [("one", [s for s in stages if s["kind"] == "prompts"]),
            ("share", [s for s in stages if s["kind"] == "erase"]),
            ("all", [s for s in stages if s["kind"] == "sample"]),
            ("share", [s for s in stages if s["kind"] == "attack"]),
            ("one", [s for s in stages if s["kind"] == "score"])]


def execute(args, stages, rank=0, world=1):
    """Every stage not yet done, phase by phase, under one progress bar: stages done of all, images
    per second, time left (from the plan's estimates, scaled by the pace so far). Returns the
    number of stages this process ran."""
    left = todo(args, stages)
    ran, images, tic = 0, [0], time.time()
    total = sum(s["seconds"] for s in left) or 1.0
    bar = tqdm(total=round(total), disable=rank != 0 or args.quiet, file=sys.stderr,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
    finished = len(stages) - len(left)

    def post():
        bar.set_description(f"{finished}/{len(stages)} stages")
        bar.set_postfix_str(f"{images[0] / max(time.time() - tic, 1e-9):.2f} images/s")

    for who, group in phases(left):
        mine = group[rank::world] if who == "share" else group if who == "all" or rank == 0 else []
        for s in mine:
            if args.max_stages is not None and ran >= args.max_stages:
                bar.close()
                return ran
            per_image = s["seconds"] / max(s["images"], 1)

            def on_images(n):  # sample.py, after each batch
                images[0] += n
                bar.update(n * per_image)
                post()
            start = bar.n
            if who != "all" or rank == 0:
                record(args, s, finished=False)
            run_stage(args, s, on_images, os.path.join(args.out, "logs", s["name"] + ".log"))
            if who != "all" or world == 1:
                record(args, s)
            ran += 1
            finished += 1
            bar.update(max(start + s["seconds"] - bar.n, 0))
            post()
        if world > 1:
            torch.distributed.barrier()
        for s in mine if world > 1 and rank == 0 and who == "all" else []:  # a generation is whole once every rank's rows are
            record(args, s)
    bar.close()
    return ran
