"""
Every phase of tinychat in one command: download, tokenizer, pretraining, midtraining, SFT, eval, report.

The learner's entry point (layer 4): imports bpe, gpt, optim, data, tasks, evals and report, writes
everything into the run directory (default ~/.cache/tinychat) and, rerun after a crash or a kill,
continues where it stopped.

Design:
- one dataclass per phase; data.add_config_args turns every field into a --flag whose help is the
  field's comment. The dataclass defaults ARE the --cpu preset; --smoke and the GPU preset only
  list the fields they change
- one training loop for pretrain, midtrain and SFT: they differ only in their batches and config
- resume is exact: a checkpoint holds the weights, the optimizer state, every rank's data position
  and the loop state (step, loss EMA, time spent), written to a .tmp folder renamed into place
- a phase is done when its output exists; phases.json records the settings each phase was made
  with, so a changed setting that makes finished work stale stops the run and says what to do
- under torchrun each rank trains on its own slice of the data and gradients are averaged

Left out on purpose:
- CORE and the chat evals: eval is bits per byte on the val shard plus greedy samples for now
- gradient clipping, torch.compile, wandb, and a sharded optimizer (every rank holds all of it)

References:
- nanochat (base_train.py, mid_train.py, chat_sft.py): https://github.com/karpathy/nanochat
- Muon, momentum warmup: https://kellerjordan.github.io/posts/muon/

Examples:
    python train_all.py --cpu --mirror ../shared/mirror
    python train_all.py --smoke --run-dir /tmp/smoke --mirror ../shared/mirror
    torchrun --nproc_per_node=2 train_all.py --smoke --from pretrain
"""
import argparse
import json
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
import torch.distributed as dist

from bpe import Tokenizer
from data import (add_config_args, build_token_cache, config_from_args, default_run_dir, download_all,
                  midtrain_batches, pretrain_batches, sft_batches, tokenizer_texts)
from evals import evaluate_bpb, evaluate_model, sample, val_tensor
from gpt import (GPT, autocast, config_from_depth, load_checkpoint, load_optim_state, pick_device, pick_precision,
                 save_checkpoint)
from optim import make_optimizers
from report import HONESTY, environment, read_json, write_atomic, write_report
from tasks import midtrain_conversations, sft_conversations

PHASES = ["download", "tokenizer", "tokenize", "pretrain", "midtrain", "sft", "eval", "report"]
TRAINING = PHASES[3:6]  # the phases that run the training loop
# What a phase leaves in the run dir; it is done when this exists (for training: model.pt + meta.json).
OUTPUTS = {"tokenizer": "tokenizer.bin", "pretrain": "base", "midtrain": "mid", "sft": "sft", "eval": "eval.json"}
# Rates for the banner's time estimates: measured on the 2-core reference machine (GPU ones nominal).
FLOPS_PER_S = {"cpu": 120e9, "cuda": 300e12, "mps": 5e12}  # sustained training FLOP/s per process
SHARD_CHARS = 12.3e6        # characters of text per pretraining shard in the mirror
CHARS_PER_TOKEN = 3.8       # characters per token of our 8K BPE on the mirror's text
BPE_CHARS_PER_S = 3e6       # bpe.py training
ENCODE_CHARS_PER_S = 1.5e6  # bpe.py encoding, both cores


# ----------------------------------------------------------------------------- configs

@dataclass
class RunConfig:
    """Where the run lives, where downloads come from, and the tokenizer."""
    run_dir: str = ""            # run directory; "" = ~/.cache/tinychat
    mirror: str = ""             # read https://HOST/PATH from MIRROR/HOST/PATH; "" = the real network
    device: str = ""             # cpu | cuda | mps; "" = cuda when available, else cpu
    num_train_shards: int = 4    # pretraining shards to fetch (the mirror has 4, ~12 MB of text each)
    vocab_size: int = 8192       # 256 bytes + merges + 9 special tokens, counted as nanochat does
    tokenizer_chars: int = 40_000_000  # characters of training text the BPE trainer reads


@dataclass
class TrainConfig:
    """Knobs every training phase has; each phase below sets its own defaults."""
    num_steps: int = 1000        # optimizer steps
    device_batch_size: int = 32  # rows per forward pass; lower it if memory runs out
    total_batch_tokens: int = 8192  # tokens per optimizer step; the rest is gradient accumulation
    embedding_lr: float = 0.2    # AdamW lr of the token embedding (nanochat)
    unembedding_lr: float = 0.004  # AdamW lr of lm_head (nanochat)
    matrix_lr: float = 0.02      # Muon lr of the block matrices (nanochat)
    lr_frac: float = 1.0         # multiplies all three lrs (nanochat's init_lr_frac)
    warmup_frac: float = 0.0     # share of steps where lr rises linearly from 0
    warmdown_frac: float = 0.2   # share of steps at the end where lr falls linearly
    final_lr_frac: float = 0.0   # lr multiplier reached at the end of the warmdown
    eval_every: int = 250        # steps between val bpb evaluations and samples (and at the end)
    eval_tokens: int = 65_536    # val tokens scored per evaluation during training
    log_every: int = 25          # steps between step lines
    save_every_min: float = 2.0  # minutes between checkpoints, the most work a kill can lose; 0 = every step
    seed: int = 1337             # seeds weight init and data order

    def __post_init__(self):
        assert 0 <= self.warmup_frac + self.warmdown_frac <= 1, f"warmup {self.warmup_frac} + warmdown {self.warmdown_frac} > 1"


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining: the GPT learns to continue documents from the token cache."""
    depth: int = 4               # transformer blocks
    head_dim: int = 64           # width per attention head; n_embd = 64 * depth rounded up to it
    seq_len: int = 256           # context length in tokens (midtrain and SFT inherit it)
    num_steps: int = 900         # optimizer steps


@dataclass
class MidtrainConfig(TrainConfig):
    """Midtraining: conversations, tool use and multiple choice, every token trained."""
    num_steps: int = 120         # optimizer steps


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: one conversation per row, only assistant tokens trained."""
    num_steps: int = 80          # optimizer steps
    lr_frac: float = 0.02        # nanochat SFT starts at 2% of the base lrs
    warmdown_frac: float = 1.0   # lr falls linearly to 0 over the whole phase, as in nanochat


@dataclass
class EvalConfig:
    """Evaluation of the base, mid and sft models."""
    bpb_tokens: int = 0          # val tokens scored for the base model; 0 = the whole pinned val shard
    chat_bpb_tokens: int = 262_144  # the same for mid and sft (their bpb only shows how much text they kept)
    sample_tokens: int = 48      # tokens generated per greedy sample


# section -> (flag prefix, dataclass): --vocab-size, --pretrain-depth, --sft-lr-frac, ...
SECTIONS = {"run": ("", RunConfig), "pretrain": ("pretrain", PretrainConfig), "midtrain": ("midtrain", MidtrainConfig),
            "sft": ("sft", SFTConfig), "eval": ("eval", EvalConfig)}
# Settings that change what a phase prints or where it runs, never what it produces.
COSMETIC = {"run_dir", "mirror", "device", "eval_every", "eval_tokens", "log_every", "save_every_min"}
PRESETS = {
    "cpu": {},  # the dataclass defaults
    # every phase on a tiny model in a couple of minutes, to check that everything works
    "smoke": {"run": {"num_train_shards": 1, "vocab_size": 1024, "tokenizer_chars": 2_000_000},
              "pretrain": {"depth": 2, "head_dim": 32, "seq_len": 128, "num_steps": 30, "device_batch_size": 8,
                           "total_batch_tokens": 2048, "eval_every": 15, "eval_tokens": 8192, "log_every": 5},
              **{ph: {"num_steps": 10, "device_batch_size": 8, "total_batch_tokens": 2048, "eval_tokens": 8192,
                      "log_every": 5} for ph in ("midtrain", "sft")},
              "eval": {"bpb_tokens": 32_768, "chat_bpb_tokens": 32_768, "sample_tokens": 16}},
    # nanochat's d20 speedrun on one 8-GPU node (reference §6.1): 20 tokens per parameter
    "gpu": {"run": {"num_train_shards": 240, "vocab_size": 65_536, "tokenizer_chars": 2_000_000_000},
            "pretrain": {"depth": 20, "head_dim": 128, "seq_len": 2048, "num_steps": 21_400, "device_batch_size": 32,
                         "total_batch_tokens": 524_288, "eval_tokens": 10_485_760},
            "midtrain": {"num_steps": 809, "device_batch_size": 32, "total_batch_tokens": 524_288},
            "sft": {"num_steps": 701, "device_batch_size": 4, "total_batch_tokens": 65_536}},
}


def build_parser() -> argparse.ArgumentParser:
    """Presets, phase selection, then one --flag per field of every section's dataclass."""
    parser = argparse.ArgumentParser(usage="%(prog)s [--cpu | --smoke] [--only PHASE | --from PHASE] [--FLAG VALUE ...]",
                                     description=__doc__.split("\n\n")[0], epilog=__doc__.split("Examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--cpu", action="store_true", help="the preset tuned for an hour on 2 CPU cores (the defaults)")
    preset.add_argument("--smoke", action="store_true", help="every phase on a tiny model in a few minutes")
    parser.add_argument("--only", choices=PHASES, help="run just this phase")
    parser.add_argument("--from", dest="start", choices=PHASES, help="run this phase and every later one")
    for prefix, cls in SECTIONS.values():
        add_config_args(parser, cls, prefix)
    return parser


def lr_scale(step: int, cfg: TrainConfig) -> float:
    """Multiplier of every base lr at 0-based `step`: linear warmup, constant, linear warmdown (nanochat)."""
    warmup, warmdown = round(cfg.warmup_frac * cfg.num_steps), round(cfg.warmdown_frac * cfg.num_steps)
    if step < warmup:
        return (step + 1) / warmup
    if step <= cfg.num_steps - warmdown:
        return 1.0
    progress = (cfg.num_steps - step) / warmdown  # 1 where the warmdown starts, 0 at step num_steps
    return progress + (1 - progress) * cfg.final_lr_frac


def muon_momentum(step: int) -> float:
    """Muon's momentum: 0.85 -> 0.95 linearly over the first 300 steps, then 0.95 (nanochat, Keller Jordan)."""
    return 0.85 + 0.10 * min(step / 300, 1.0)  # a lighter momentum while the weights move fast


@dataclass
class Runtime:
    """What main() decides once and passes down: device, precision, this process's rank, the run dir."""
    device: torch.device
    precision: str               # "bf16" | "fp32", from gpt.pick_precision
    rank: int                    # this process under torchrun; 0 when alone
    world_size: int              # processes under torchrun; 1 when alone
    run_dir: str

    def path(self, *parts) -> str:
        return os.path.join(self.run_dir, *parts)

    def log(self, msg: str = ""):
        """Print on rank 0 and append to <run_dir>/log.txt: the only way this file prints."""
        if self.rank == 0:
            print(msg, flush=True)
            with open(self.path("log.txt"), "a", encoding="utf-8") as f:
                f.write(msg + "\n")


def make_runtime(run: RunConfig) -> Runtime:
    """Pick device and precision, join torchrun's process group if there is one, size the CPU threads."""
    # torchrun describes the process group in these variables; without torchrun we are one process
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = pick_device(run.device or None)
    if world_size > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
    if device.type == "cpu":
        # NOTE: processes on one machine share its cores; more threads than cores make every step slower
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    rt = Runtime(device, pick_precision(device), rank, world_size, os.path.expanduser(run.run_dir or default_run_dir()))
    os.makedirs(rt.run_dir, exist_ok=True)
    return rt


# ----------------------------------------------------------------------------- checkpoints

def save_resume(out_dir: str, model, optimizers, loop: dict, rt: Runtime):
    """Checkpoint weights, optimizer state and loop state (every rank's data position) in out_dir/resume."""
    if rt.world_size > 1:
        states = [None] * rt.world_size
        dist.all_gather_object(states, loop["data"][rt.rank])
        loop["data"] = states
    if rt.rank == 0:
        # NOTE: three files cannot be replaced together atomically, so they go to resume.tmp, which then
        # takes resume's place. save_checkpoint writes meta.json last: a folder with one is complete,
        # so a kill between the rmtree and the rename still leaves a whole checkpoint in resume.tmp
        tmp = os.path.join(out_dir, "resume.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp, model, {"loop": loop}, {"optimizers": [opt.state_dict() for opt in optimizers]})
        shutil.rmtree(os.path.join(out_dir, "resume"), ignore_errors=True)
        os.replace(tmp, os.path.join(out_dir, "resume"))


def restore(out_dir: str, model, optimizers, loop: dict, rt: Runtime) -> dict:
    """Load out_dir's resume checkpoint, if any, into model and optimizers; return its loop state (or `loop`)."""
    for folder in (os.path.join(out_dir, "resume"), os.path.join(out_dir, "resume.tmp")):
        if os.path.exists(os.path.join(folder, "meta.json")):
            saved, meta = load_checkpoint(folder, rt.device)
            model.load_state_dict(saved.state_dict())
            for opt, state in zip(optimizers, load_optim_state(folder)["optimizers"]):
                opt.load_state_dict(state)  # also moves the state to the parameters' device
            rt.log(f"resuming from {folder} (step {meta['loop']['step']})")
            return meta["loop"]
    return loop


# ----------------------------------------------------------------------------- the training loop

def train(phase: str, model, tok, cfg: TrainConfig, make_batches, rt: Runtime) -> dict:
    """Train `model` in place for cfg.num_steps optimizer steps, resuming from the newest checkpoint in its
    phase folder, and save it there as the phase's final model; return the results for the report.
    make_batches(state) gives this rank's iterator of (x, y, state), (B, T) int64 each, resumed at state."""
    out_dir, T, rows_per_pass = rt.path(OUTPUTS[phase]), model.config.seq_len, cfg.device_batch_size * rt.world_size
    grad_accum = cfg.total_batch_tokens // (rows_per_pass * T)
    if grad_accum < 1 or cfg.total_batch_tokens % (rows_per_pass * T):
        raise ValueError(f"--{phase}-total-batch-tokens {cfg.total_batch_tokens} must be a multiple of device batch "
                         f"{cfg.device_batch_size} x seq_len {T} x {rt.world_size} processes = {rows_per_pass * T}")
    lrs = {k: getattr(cfg, k) * cfg.lr_frac for k in ("embedding_lr", "unembedding_lr", "matrix_lr")}
    optimizers = make_optimizers(model, **lrs)
    loop = restore(out_dir, model, optimizers, {"step": 0, "ema": 0.0, "elapsed": 0.0, "data": [None] * rt.world_size,
                                                "train": [], "val": []}, rt)  # the loop's state, all in a checkpoint
    batches, val = make_batches(loop["data"][rt.rank]), val_tensor(rt.run_dir, T, max(1, cfg.eval_tokens // T))
    token_bytes = torch.tensor(tok.token_byte_lengths())
    rt.log(f"{model.num_params():,} parameters | {model.flops_per_token():.3g} FLOPs/token | {cfg.total_batch_tokens:,} "
           f"tokens/step = {cfg.device_batch_size} rows x {T} x {rt.world_size} processes x {grad_accum} grad-accum | "
           f"{cfg.num_steps:,} steps | {rt.precision}")
    start_step, t_start, t_saved, step_times = loop["step"], time.time() - loop["elapsed"], time.time(), []
    while True:
        step, loop["elapsed"] = loop["step"], time.time() - t_start
        is_last = step == cfg.num_steps
        # --- evaluate and sample (rank 0 only; the other ranks wait for it in the next all-reduce) ---
        if rt.rank == 0 and (is_last or step % cfg.eval_every == 0) and not (step == start_step > 0):
            bpb, val_loss = evaluate_bpb(model, val, token_bytes, rt.device, rt.precision, cfg.device_batch_size)
            loop["val"].append([step, val_loss, bpb])
            rt.log(f"eval | {phase} | step {step:04d} | val_bpb {bpb:.4f}")
            for prompt, text in sample(model, tok, phase != "pretrain", 24, rt.precision) if step > 0 else []:
                rt.log(f"sample | {prompt!r} -> {text!r}")
        if is_last:
            return finish(phase, model, cfg, loop, rt)
        # --- checkpoint every few minutes (not right after a resume: that one is on disk) ---
        due = torch.tensor([float(step > start_step and time.time() - t_saved >= cfg.save_every_min * 60)], device=rt.device)
        if rt.world_size > 1:  # NOTE: rank 0's clock decides for all, or the ranks would wait for each other forever
            dist.broadcast(due, src=0)
        if due.item():
            save_resume(out_dir, model, optimizers, loop, rt)
            t_saved = time.time()
        # --- forward and backward over grad_accum micro-batches ---
        t0, loss_sum = time.time(), 0.0
        for _ in range(grad_accum):
            x, y, loop["data"][rt.rank] = next(batches)  # (B, T) each, on the CPU
            with autocast(rt.device, rt.precision):
                loss = model(x.to(rt.device), y.to(rt.device))  # mean nats over this micro-batch's targets
            # NOTE: divided by grad_accum, the summed gradients are the mean over the whole step; without
            # it the step grows with the number of micro-batches
            (loss / grad_accum).backward()
            loss_sum += loss.item() / grad_accum
        # --- update: both optimizers at this step's lr and momentum ---
        scale = lr_scale(step, cfg)
        optimizer_step(model, optimizers, scale, muon_momentum(step), rt)
        # --- log: the loss as a bias-corrected EMA, the ETA from steps after the first 3 (warm-up) ---
        dt = time.time() - t0
        step_times += [dt] if step - start_step >= 3 else []
        # ema <- 0.9*ema + 0.1*loss; dividing by 1 - 0.9^(step+1) removes the pull towards the initial 0
        loop["ema"] = 0.9 * loop["ema"] + 0.1 * loss_sum
        smooth, loop["step"] = loop["ema"] / (1 - 0.9 ** (step + 1)), step + 1
        if step % cfg.log_every == 0 or step == cfg.num_steps - 1:
            loop["train"].append([step, smooth])
            eta = sum(step_times) / max(len(step_times), 1) * (cfg.num_steps - step - 1) / 60
            rt.log(f"step {step:04d}/{cfg.num_steps:04d} | loss {smooth:.4f} | lr_scale {scale:.2f} | "
                   f"dt {dt * 1000:.0f} ms | {cfg.total_batch_tokens / dt:,.0f} tok/s | eta {eta:.1f} min")


def optimizer_step(model, optimizers, lr_scale_: float, momentum: float, rt: Runtime):
    """Average the gradients over ranks, set lr (initial_lr * lr_scale_) and Muon's momentum, step, zero."""
    if rt.world_size > 1:
        for p in model.parameters():  # every rank then takes the same step and the replicas stay equal
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= rt.world_size
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_scale_
            if "momentum" in group:  # only Muon's groups have it
                group["momentum"] = momentum
        opt.step()
    model.zero_grad(set_to_none=True)


def finish(phase: str, model, cfg: TrainConfig, loop: dict, rt: Runtime) -> dict:
    """Save the phase's final model with its results in meta.json, drop the resume checkpoints."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**30 if sys.platform == "darwin" else 2**20)
    results = {"params": model.num_params(), "steps": cfg.num_steps, "tokens": cfg.num_steps * cfg.total_batch_tokens,
               "minutes": loop["elapsed"] / 60, "train_loss": loop["train"][-1][1] if loop["train"] else None,
               "val_bpb": loop["val"][-1][2] if loop["val"] else None, "peak_mem_gb": peak,  # ru_maxrss: KB on Linux
               "curve": loop["train"], "val": loop["val"]}
    if rt.rank == 0:
        out_dir = rt.path(OUTPUTS[phase])
        save_checkpoint(out_dir, model, {"phase": phase, "train_config": asdict(cfg), "results": results})
        for name in ("resume", "resume.tmp"):
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    return results


# ----------------------------------------------------------------------------- phases

def phase_data(phase: str, cfgs: dict, rt: Runtime):
    """download, tokenizer, tokenize: data.py fetches and caches, bpe.py learns the merges."""
    run = cfgs["run"]
    if phase == "download":  # every file now, so no later phase ever waits on the network
        download_all(rt.run_dir, run.mirror or None, run.num_train_shards)
    elif phase == "tokenizer":
        texts = tokenizer_texts(rt.run_dir, run.tokenizer_chars)
        Tokenizer.train(texts, run.vocab_size, verbose=True).save(rt.path("tokenizer.bin"))
    else:  # every shard encoded once; rebuilt only if the tokenizer changed
        build_token_cache(rt.run_dir, Tokenizer.load(rt.path("tokenizer.bin")))


def phase_train(phase: str, cfgs: dict, rt: Runtime) -> dict:
    """pretrain starts a fresh GPT; midtrain and sft continue the previous phase's model."""
    cfg, tok = cfgs[phase], Tokenizer.load(rt.path("tokenizer.bin"))
    torch.manual_seed(cfg.seed)  # weight init; the data order has its own seed
    B = cfg.device_batch_size
    if phase == "pretrain":
        model = GPT(config_from_depth(cfg.depth, tok.vocab_size, cfg.seq_len, head_dim=cfg.head_dim)).to(rt.device)
        stream = lambda state: pretrain_batches(rt.run_dir, "train", B, cfg.seq_len, seed=cfg.seed, state=state,
                                                rank=rt.rank, world_size=rt.world_size)
    else:
        model, _ = load_checkpoint(rt.path(OUTPUTS[TRAINING[TRAINING.index(phase) - 1]]), rt.device)
        conversations = (midtrain_conversations if phase == "midtrain" else sft_conversations)(rt.run_dir)
        mine, batches = conversations[rt.rank::rt.world_size], midtrain_batches if phase == "midtrain" else sft_batches
        stream = lambda state: batches(tok, mine, B, model.config.seq_len, state=state)  # each rank its share
    return train(phase, model.train(), tok, cfg, stream, rt)


def phase_eval(cfgs, rt):
    tok, results = Tokenizer.load(rt.path("tokenizer.bin")), {}
    for phase, cfg in ((phase, cfgs["eval"]) for phase in TRAINING):
        model, _ = load_checkpoint(rt.path(OUTPUTS[phase]), rt.device)
        r = results[phase] = evaluate_model(model, tok, rt.run_dir, phase != "pretrain", rt.device, rt.precision,
                                            cfg.bpb_tokens if phase == "pretrain" else cfg.chat_bpb_tokens, cfg.sample_tokens)
        rt.log(f"eval | {phase} | val_bpb {r['val_bpb']:.4f} | {r['val_tokens']:,} tokens")
        for prompt, text in r["samples"]:
            rt.log(f"sample | {prompt!r} -> {text!r}")
    write_atomic(rt.path("eval.json"), json.dumps(results, indent=1))


def phase_report(cfgs, rt):
    """report.py reads what the phases left in the run dir and writes report.md, loss.svg, report.json."""
    env = environment(torch=torch.__version__, device=str(rt.device), precision=rt.precision, processes=rt.world_size)
    for line in write_report(rt.run_dir, env, {s: asdict(c) for s, c in cfgs.items()}, {p: OUTPUTS[p] for p in TRAINING}):
        rt.log(line)


# ----------------------------------------------------------------------------- bookkeeping and main

def phase_settings(phase: str, cfgs: dict) -> dict:
    """The settings a phase's output depends on: its own section's and those of every phase before it."""
    sections = ["run"] + [s for s in SECTIONS if s in PHASES[:PHASES.index(phase) + 1]]
    return {f"{s}.{k}": v for s in sections for k, v in asdict(cfgs[s]).items() if k not in COSMETIC}


def is_done(phase: str, rt: Runtime) -> bool:
    """Its output exists; for a model folder, its meta.json (save_checkpoint writes it after the weights)."""
    return phase in OUTPUTS and os.path.exists(rt.path(OUTPUTS[phase], *(["meta.json"] if phase in TRAINING else [])))


def check_settings(cfgs: dict, rt: Runtime):
    """Stop, saying what to do, when work on disk was made with other settings than this run's."""
    record = read_json(rt.path("phases.json"))
    for i, phase in enumerate(PHASES):
        old, new = record.get(phase, {}).get("settings"), phase_settings(phase, cfgs)
        if phase not in OUTPUTS or old in (None, new) or not os.path.exists(rt.path(OUTPUTS[phase])):
            continue
        changed = "; ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in sorted({**old, **new}) if old.get(k) != new.get(k))
        stale = " ".join(rt.path(OUTPUTS[p]) for p in PHASES[i:] if p in OUTPUTS and os.path.exists(rt.path(OUTPUTS[p])))
        raise SystemExit(f"{phase} in {rt.run_dir} was made with other settings ({changed}).\n"
                         f"It and every later phase would be stale. Rerun with the old flags, or start them over:\n"
                         f"    rm -rf {stale}\nor keep that run and give this one its own --run-dir.")


def note_phase(phase: str, cfgs: dict, rt: Runtime, **extra):
    """Record in phases.json the settings a phase runs with (and, once it is done, its minutes)."""
    if rt.rank == 0:
        record = read_json(rt.path("phases.json"))
        record[phase] = {**record.get(phase, {}), "settings": phase_settings(phase, cfgs), **extra}
        write_atomic(rt.path("phases.json"), json.dumps(record, indent=1))


def estimate(cfgs: dict, rt: Runtime) -> tuple:
    """({phase: expected minutes}, GB of memory, GB of disk), from FLOPs and the rates measured above."""
    p, run = cfgs["pretrain"], cfgs["run"]
    with torch.device("meta"):  # shapes only: no memory, no init
        model = GPT(config_from_depth(p.depth, run.vocab_size, p.seq_len, head_dim=p.head_dim))
    flops, chars = FLOPS_PER_S[rt.device.type] * rt.world_size, (run.num_train_shards + 1) * SHARD_CHARS
    minutes = {ph: cfgs[ph].num_steps * cfgs[ph].total_batch_tokens * model.flops_per_token() / flops / 60 for ph in TRAINING}
    ev = cfgs["eval"]  # eval scores its val tokens with forward passes only: 1/3 of a training step's FLOPs
    eval_tokens = (ev.bpb_tokens or SHARD_CHARS / CHARS_PER_TOKEN) + 2 * ev.chat_bpb_tokens
    minutes.update(download=0.2, tokenizer=min(run.tokenizer_chars, chars) / BPE_CHARS_PER_S / 60, report=0.0,
                   tokenize=chars / ENCODE_CHARS_PER_S / 60, eval=eval_tokens * model.flops_per_token() / 3 / flops / 60)
    # memory: weights, grads and optimizer state (16 bytes/param) + one micro-batch's activations (about
    # 40 bytes per layer and channel, 16 per logit: bf16 and fp32 copies and their gradients) + 1 GB of Python
    act = p.device_batch_size * p.seq_len * (p.depth * model.config.n_embd * 40 + run.vocab_size * 16)
    disk = chars * 0.4 + chars / CHARS_PER_TOKEN * 2 + model.num_params() * 4 * 6  # parquet, tokens, checkpoints
    return minutes, (16 * model.num_params() + act) / 2**30 + 1.0, disk / 2**30


def main(argv=None):
    """Parse flags, print the banner, then run the selected phases, skipping the ones already done."""
    args = build_parser().parse_args(argv)
    preset = "smoke" if args.smoke else "cpu" if args.cpu or not torch.cuda.is_available() else "gpu"
    # each section: the dataclass defaults, then the preset's changes, then the flags given
    cfgs = {s: config_from_args(args, cls, prefix, PRESETS[preset].get(s)) for s, (prefix, cls) in SECTIONS.items()}
    rt = make_runtime(cfgs["run"])
    selected = [args.only] if args.only else PHASES[PHASES.index(args.start or "download"):]
    check_settings(cfgs, rt)
    minutes, mem_gb, disk_gb = estimate(cfgs, rt)
    # --- the banner: what will run, how long, what it needs ---
    rt.log(f"== tinychat ==  {HONESTY}")
    rt.log(f"preset {preset}{'' if args.cpu or args.smoke else ' (chosen for this machine)'} | device {rt.device} | "
           f"{rt.precision} | {rt.world_size} process(es) | run dir {rt.run_dir}")
    for phase in PHASES:
        status = "done, skip" if is_done(phase, rt) else "run" if phase in selected else "not selected"
        rt.log(f"  {phase:<10} {status:<13} ~{minutes[phase]:5.1f} min")
    todo = sum(minutes[p] for p in selected if not is_done(p, rt))
    rt.log(f"expected ~{todo:.0f} min on the reference 2-core CPU, ~{mem_gb:.1f} GB memory, ~{disk_gb:.1f} GB disk")
    # --- the phases ---
    for phase in selected:
        rt.log(f"\n== {phase} ==")
        if is_done(phase, rt):
            rt.log(f"{phase} is done ({rt.path(OUTPUTS[phase])} exists; delete it to redo it), skipping")
            continue
        rt.log(json.dumps(asdict(cfgs[phase if phase in SECTIONS else "run"])))  # the settings it runs with
        t0, prior = time.time(), read_json(rt.path("phases.json")).get(phase, {}).get("minutes", 0.0)
        note_phase(phase, cfgs, rt)
        # training phases run on every rank; the others on rank 0 while the rest wait at the barrier
        result = PHASE_FUNCS[phase](cfgs, rt) if rt.rank == 0 or phase in TRAINING else None
        if rt.world_size > 1:
            dist.barrier()
        note_phase(phase, cfgs, rt, minutes=result["minutes"] if result else prior + (time.time() - t0) / 60)
    if rt.world_size > 1:
        dist.destroy_process_group()


PHASE_FUNCS = {**{p: partial(phase_data, p) for p in PHASES[:3]}, **{p: partial(phase_train, p) for p in TRAINING},
               "eval": phase_eval, "report": phase_report}


if __name__ == "__main__":
    main()
