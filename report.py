"""
The run's report card: report.md, loss.svg and report.json, written into the run directory.

Called by train_all.py's report phase; reads only what the phases left in the run directory
(phases.json, eval.json, each model's meta.json) and the values passed in. It imports no project
module and nothing but the stdlib, so it can be read on its own and reused for any run directory.

Design:
- report.md follows nanochat's report: environment, config, per-phase numbers, samples, then a
  summary table with one column per model (BASE / MID / SFT) and the total wall clock time
- loss.svg is written by hand, one panel per training phase: a few rectangles, a polyline and
  circles are all a loss curve needs, so no plotting library is pulled in
- report.json holds the same numbers for programs; report.md is also copied to ./report.md,
  as nanochat does, so the learner finds it next to the code

Left out on purpose:
- nanochat's "bloat" section (lines and characters of the code base) and its cost estimate
- CORE and the chat evals (ARC, MMLU, GSM8K, HumanEval, ChatCORE): rows appear once evals.py adds them

References:
- nanochat report.py: https://github.com/karpathy/nanochat
- SVG 1.1 basic shapes: https://www.w3.org/TR/SVG11/shapes.html
"""
import json
import os
import platform
import shutil
import subprocess
import time

MODELS = {"pretrain": "BASE", "midtrain": "MID", "sft": "SFT"}  # training phase -> column of the summary
# (row label, key in the results, where it comes from, float format): "eval" = the eval phase,
# "train" = the training loop; integers always print with thousands separators
SUMMARY_ROWS = [("val bpb (eval phase)", "val_bpb", "eval", ".4f"), ("val tokens scored", "val_tokens", "eval", ""),
                ("val bpb (end of training)", "val_bpb", "train", ".4f"),
                ("train loss (nats/token)", "train_loss", "train", ".4f"), ("parameters", "params", "train", ""),
                ("steps", "steps", "train", ""), ("tokens", "tokens", "train", ""),
                ("minutes", "minutes", "train", ".1f"), ("peak memory GB", "peak_mem_gb", "train", ".2f")]
HONESTY = "It will speak, often wrongly: it is a model for learning how a chat LLM is made, not for answers."


def environment(**extra) -> dict:
    """Machine, software and git commit, plus what the caller adds (device, precision, torch version)."""
    try:  # the commit is a nicety: a copy of the code without git still gets a report
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or "-"
    except OSError:
        commit = "-"
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "memory_gb": round(memory_gb, 1),
            "python": platform.python_version(), "git_commit": commit, **extra}


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple:
    """95% (z = 1.96) Wilson score interval (low, high) of an accuracy measured on `total` examples."""
    # A capped eval on a tiny model is noisy, and the interval says how noisy. Wilson's, unlike the
    # textbook p +- z*sqrt(p(1-p)/n), never leaves [0, 1] and is not zero-width at p = 0 or 1:
    #   center = (p + z^2/2n) / (1 + z^2/n),  half = z/(1 + z^2/n) * sqrt(p(1-p)/n + z^2/4n^2)
    # e.g. 8 of 10 correct -> (0.49, 0.94); 80 of 100 -> (0.71, 0.87).
    if total == 0:
        return 0.0, 1.0
    p, n = correct / total, total
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return max(0.0, center - half), min(1.0, center + half)


def summary_table(trained: dict, evals: dict) -> list:
    """Markdown lines of the BASE / MID / SFT table; '-' where a model or a number is missing."""
    lines = ["| Metric | " + " | ".join(MODELS.values()) + " |", "|---|" + "---|" * len(MODELS)]
    for label, key, source, spec in SUMMARY_ROWS:
        results = evals if source == "eval" else trained
        values = [results.get(ph, {}).get(key) for ph in MODELS]
        cells = ["-" if v is None else f"{v:,}" if isinstance(v, int) else format(v, spec) for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def read_json(path: str) -> dict:
    """The JSON object in path, or {} when a phase has not written it (yet)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_report(run_dir: str, env: dict, config: dict, model_dirs: dict) -> list:
    """Write report.md, loss.svg and report.json into run_dir (and ./report.md); return the summary lines.

    Reads from run_dir: phases.json (phase -> {"minutes"}), eval.json (phase -> {"val_bpb", "val_tokens",
    "samples": [[prompt, text]]}) and, for each training phase, model_dirs[phase]/meta.json, whose
    "results" hold params, steps, tokens, minutes, train_loss, val_bpb, curve [[step, loss]] and
    val [[step, val_loss, val_bpb]].
    """
    minutes = {ph: entry.get("minutes", 0.0) for ph, entry in read_json(os.path.join(run_dir, "phases.json")).items()}
    trained = {ph: read_json(os.path.join(run_dir, d, "meta.json")).get("results", {}) for ph, d in model_dirs.items()}
    evals = read_json(os.path.join(run_dir, "eval.json"))
    table, total = summary_table(trained, evals), sum(minutes.values())
    md = ["# tinychat training report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", "", HONESTY, "",
          "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    md += ["", "## Config", "", "```json", json.dumps(config, indent=1), "```", "",
           "## Phases", "", "| phase | minutes |", "|---|---|"] + [f"| {ph} | {m:.1f} |" for ph, m in minutes.items()]
    for phase, result in evals.items():
        md += ["", f"### {MODELS.get(phase, phase)} samples (greedy)", ""]
        md += [f"- {prompt!r} -> {text!r}" for prompt, text in result.get("samples", [])]  # repr: newlines stay visible
    md += ["", "## Summary", "", *table, "", "![train and val loss of every phase](loss.svg)", "",
           f"Total wall clock time: {int(total // 60)}h{int(total % 60)}m"]
    write_atomic(os.path.join(run_dir, "loss.svg"), loss_svg({ph: (r.get("curve", []), r.get("val", []))
                                                       for ph, r in trained.items()}))
    write_atomic(os.path.join(run_dir, "report.json"), json.dumps(
        {"environment": env, "config": config, "minutes": minutes, "train": trained, "eval": evals}, indent=1))
    write_atomic(os.path.join(run_dir, "report.md"), "\n".join(md) + "\n")
    shutil.copy(os.path.join(run_dir, "report.md"), "report.md")
    return table + [f"report: {os.path.join(run_dir, 'report.md')} (also ./report.md), loss.svg, report.json"]


def write_atomic(path: str, text: str):
    """Write via path.tmp + os.replace, so a reader never sees half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def loss_svg(curves: dict) -> str:
    """SVG text, one panel per phase: train loss (EMA) as a blue line, val loss as orange dots (nats/token).

    curves: phase -> (train [[step, loss], ...], val [[step, val_loss, val_bpb], ...]).
    """
    W, H, M = 320, 220, 36  # panel width and height, and the margin left for labels, in pixels
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * max(len(curves), 1)}" height="{H}" '
           'font-family="sans-serif" font-size="11">']
    for i, (phase, (train, val)) in enumerate(curves.items()):
        points = [(s, loss) for s, loss in train] + [(s, loss) for s, loss, _ in val]
        if not points:
            continue
        s0, s1 = min(s for s, _ in points), max(s for s, _ in points)
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        left = i * W + M

        def xy(step, loss):
            # (step, loss) -> pixels; SVG's y grows downwards, so the highest loss sits at the top edge
            return (left + (step - s0) / max(s1 - s0, 1) * (W - 2 * M),
                    M + (hi - loss) / max(hi - lo, 1e-9) * (H - 2 * M))
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in train))
        out += [f'<rect x="{left}" y="{M}" width="{W - 2 * M}" height="{H - 2 * M}" fill="none" stroke="#999"/>',
                f'<text x="{left}" y="{M - 8}">{phase}: train (blue), val (orange)</text>',
                f'<text x="{left - M + 2}" y="{M + 4}">{hi:.2f}</text>',
                f'<text x="{left - M + 2}" y="{H - M}">{lo:.2f}</text>',
                f'<text x="{left}" y="{H - M + 14}">step {s0}</text>',
                f'<text x="{left + W - 2 * M}" y="{H - M + 14}" text-anchor="end">{s1}</text>',
                f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>']
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#ff7f0e"/>' for x, y in (xy(s, v) for s, v, _ in val)]
    return "\n".join(out + ["</svg>"]) + "\n"
