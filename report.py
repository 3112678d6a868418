"""
The run's report card: report.md, loss.svg and report.json, written into the run directory.

Called by train_all.py's report phase; reads only what the phases left in the run directory
(phases.json, eval.json, each model's meta.json) and the values passed in. core.py borrows
CORE_NOTE and wilson_interval so its prints and the report say the same. It imports no project
module and nothing but the stdlib, so it can be read on its own and reused for any run directory.

Design:
- report.md follows nanochat's report: environment, config, per-phase numbers, samples, then a
  summary table with one column per model (BASE / MID / SFT) and the total wall clock time
- every accuracy cell carries its number of examples and its 95% Wilson interval, CORE and
  ChatCORE the number of tasks they average: a capped eval of a tiny model is noisy, and the
  reader must see how noisy before comparing two numbers
- below the summary: CORE per task (with the prompts cropped to fit the context), the chat evals
  per task (with the problems too long for the context, counted as failures), the tokenizer's
  bytes per token on each kind of text, and the chat-quality measures
- the environment names the CPU model and whether it has bf16 instructions: the minutes in the
  report mean little without them (such a CPU trains in bf16, 1.4x faster, see gpt.py)
- loss.svg is written by hand, one panel per training phase: a few rectangles, a polyline and
  circles are all a loss curve needs, so no plotting library is pulled in
- report.json holds the same numbers for programs (the summary as numbers, not strings); report.md
  is also copied to ./report.md, as nanochat does, so the learner finds it next to the code

eval.json, which the eval phase writes: {phase: {"val_bpb", "val_tokens", "samples": [[prompt,
text]], "core": {"core", "num_tasks", "tasks": {label: {"correct", "total", "cropped",
"accuracy", "centered"}}} (base; core.core_summary), "chat": {"tasks": {task: {"correct",
"total", "too_long", ...}}, "ChatCORE"} (evals.chat_summary) and "quality": {name: number,
"samples": [[i, prompt, answer, template]]} (evals.quality_summary; mid, sft)}, plus
"tokenizer": {"vocab_size", "texts": {kind: {"bytes", "tokens", "bytes_per_token"}}}
(core.tokenizer_eval). Anything missing prints as "-".

Left out on purpose:
- nanochat's "bloat" section (lines and characters of the code base) and its cost estimate
- the RL column: tinychat has no RL phase

References:
- nanochat report.py: https://github.com/karpathy/nanochat
- Wilson score interval: https://en.wikipedia.org/wiki/Binomial_proportion_confidence_interval
- SVG 1.1 basic shapes: https://www.w3.org/TR/SVG11/shapes.html
"""
import json
import os
import platform
import shutil
import subprocess
import time

MODELS = {"pretrain": "BASE", "midtrain": "MID", "sft": "SFT"}  # phase -> column of the summary
# the chat evals in nanochat's order; ChatCORE averages the first five (nanochat HEAD), and
# SpellingBee is reported beside it
CHAT_TASKS = ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
CHATCORE_TASKS = CHAT_TASKS[:5]
# rows of the training table: (label, key in meta.json's "results", float format); integers
# always print with thousands separators
TRAIN_ROWS = [("val bpb (end of training)", "val_bpb", ".4f"),
              ("train loss (nats/token)", "train_loss", ".4f"),
              ("parameters", "params", ""),
              ("steps", "steps", ""),
              ("tokens", "tokens", ""),
              ("minutes", "minutes", ".1f"),
              ("peak memory GB", "peak_mem_gb", ".2f")]
# printed with every CORE number, by core.py and in the report
CORE_NOTE = ("an 18-task CORE (the offline mirror's bundle) is not comparable to nanochat's "
             "22-task figure")
HONESTY = ("It will speak, often wrongly: it is a model for learning how a chat LLM is made, "
           "not for answers.")


# --- the machine ---

def cpu_info() -> dict:
    """{"cpu_model", "cpu_bf16"} from /proc/cpuinfo (Linux); "-" where it cannot be read."""
    # bf16 instructions: AVX-512 BF16 (Intel Cooper Lake+, AMD Zen 4+) or AMX (Intel Sapphire
    # Rapids+); cli.pick_precision trains in bf16 only where one of them is present
    if not os.path.exists("/proc/cpuinfo"):
        return {"cpu_model": platform.processor() or "-", "cpu_bf16": "-"}
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    # "key<tabs>: value" lines, repeated for every CPU (the last CPU's stay; they are all alike)
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    model = fields.get("model name", "-")
    flags = fields.get("flags", "").split()
    found = [name for name in ("avx512_bf16", "amx_bf16") if name in flags]
    return {"cpu_model": model, "cpu_bf16": f"yes ({', '.join(found)})" if found else "no"}


def environment(**extra) -> dict:
    """Machine, software and git commit, plus what the caller adds (device, precision, torch)."""
    try:  # the commit is a nicety: a copy of the code without git still gets a report
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=here).stdout.strip() or "-"
    except OSError:
        commit = "-"
    memory_gb = 0
    if hasattr(os, "sysconf"):
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"platform": platform.platform(), **cpu_info(), "cpus": os.cpu_count(),
            "memory_gb": round(memory_gb, 1), "python": platform.python_version(),
            "git_commit": commit, **extra}


# --- numbers and their uncertainty ---

def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple:
    """95% (z = 1.96) Wilson score interval (low, high) of an accuracy over `total` examples."""
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


def accuracy_entry(correct: int, total: int, too_long: int = 0) -> dict:
    """{"value", "correct", "total", "low", "high", "too_long"}: an accuracy with its interval."""
    low, high = wilson_interval(correct, total)
    return {"value": correct / total if total else 0.0, "correct": correct, "total": total,
            "low": low, "high": high, "too_long": too_long}


def model_metrics(result: dict) -> dict:
    """One model's summary numbers {metric: entry} from its eval.json part; each entry has a
    "value" and what the cell shows beside it (examples and interval, tasks, tokens)."""
    # CORE and ChatCORE are means over tasks, each task with its own examples: their cells name
    # the tasks (and examples), CORE's adds the interval core.core_summary computed from the
    # tasks' variances, and the per-task tables below carry each task's interval
    metrics = {}
    core = result.get("core")
    if core:
        metrics["CORE"] = {"value": core["core"], "tasks": core["num_tasks"],
                           "total": sum(t["total"] for t in core["tasks"].values()),
                           "interval": core.get("interval")}  # None in an older eval.json
    chat = result.get("chat", {})
    tasks = chat.get("tasks", {})
    for task in CHAT_TASKS:
        if task in tasks:
            c = tasks[task]
            metrics[task] = accuracy_entry(c["correct"], c["total"], c.get("too_long", 0))
    # ChatCORE as the eval phase computed it; the cell counts the ChatCORE tasks that ran, so a
    # ChatCORE over fewer than nanochat's 5 shows it
    if chat.get("ChatCORE") is not None:
        metrics["ChatCORE"] = {"value": chat["ChatCORE"],
                               "tasks": sum(task in tasks for task in CHATCORE_TASKS)}
    if result.get("val_bpb") is not None:
        metrics["val bpb"] = {"value": result["val_bpb"], "tokens": result.get("val_tokens", 0)}
    return metrics


def format_cell(entry) -> str:
    """A summary cell: '0.2800 (0.22-0.35, n=200)', '0.0123 (-0.010 to +0.035, 18 tasks,
    900 ex)', or '-'."""
    # the kind of entry decides the cell: an accuracy has an interval ("low"), val bpb its
    # tokens, CORE and ChatCORE their tasks
    if entry is None:
        return "-"
    if "low" in entry:
        too_long = f", {entry['too_long']} too long" if entry["too_long"] else ""
        return (f"{entry['value']:.4f} ({entry['low']:.2f}-{entry['high']:.2f}, "
                f"n={entry['total']:,}{too_long})")
    if "tokens" in entry:
        return f"{entry['value']:.4f} ({entry['tokens']:,} tokens)"
    examples = f", {entry['total']:,} ex" if "total" in entry else ""
    interval = "{:+.3f} to {:+.3f}, ".format(*entry["interval"]) if entry.get("interval") else ""
    return f"{entry['value']:.4f} ({interval}{entry['tasks']} tasks{examples})"


# --- the tables ---

def summary_table(evals: dict) -> tuple:
    """(markdown lines, numbers): nanochat's BASE / MID / SFT table of CORE, the chat evals,
    ChatCORE and val bpb; numbers is {metric: {column: entry}} for report.json."""
    # rows in nanochat's order (CORE first, val bpb last); a model without a number gets "-",
    # e.g. the base model has no chat evals and the chat models no CORE
    by_model = {col: model_metrics(evals.get(phase, {})) for phase, col in MODELS.items()}
    lines = ["| Metric | " + " | ".join(MODELS.values()) + " |", "|---|" + "---|" * len(MODELS)]
    numbers = {}
    for metric in ["CORE", *CHAT_TASKS, "ChatCORE", "val bpb"]:
        entries = {col: by_model[col].get(metric) for col in MODELS.values()}
        numbers[metric] = {col: e for col, e in entries.items() if e is not None}
        lines.append(f"| {metric} | " + " | ".join(format_cell(e) for e in entries.values()) + " |")
    return lines, numbers


def training_table(trained: dict) -> list:
    """Markdown lines of the training numbers (params, steps, minutes, ...) per model."""
    lines = ["| Training | " + " | ".join(MODELS.values()) + " |", "|---|" + "---|" * len(MODELS)]
    for label, key, spec in TRAIN_ROWS:
        values = [trained.get(phase, {}).get(key) for phase in MODELS]
        cells = ["-" if v is None else f"{v:,}" if isinstance(v, int) else format(v, spec)
                 for v in values]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def core_table(core: dict) -> list:
    """Markdown lines of CORE per task: accuracy with interval, centered accuracy, cropped."""
    if not core:
        return ["CORE was not evaluated."]
    lines = ["| task | correct | accuracy (95% interval) | centered | cropped |",
             "|---|---|---|---|---|"]
    for label, t in core["tasks"].items():
        low, high = wilson_interval(t["correct"], t["total"])
        lines.append(f"| {label} | {t['correct']:,}/{t['total']:,} | {t['accuracy']:.4f} "
                     f"({low:.2f}-{high:.2f}) | {t['centered']:+.4f} | {t['cropped']:,} |")
    lines += ["", f"CORE {core['core']:.4f}: the mean centered accuracy of {core['num_tasks']} "
                  f"tasks; {CORE_NOTE}. Centered = (accuracy - random baseline) / (1 - baseline), "
                  "so guessing scores 0. Cropped: prompts longer than the model's rotary table, "
                  "cut from the left."]
    return lines


def chat_table(evals: dict) -> list:
    """Markdown lines of the chat evals per model and task, with the problems too long to fit."""
    lines = ["| model | task | correct | accuracy (95% interval) | too long |",
             "|---|---|---|---|---|"]
    for phase, col in MODELS.items():
        for task, c in evals.get(phase, {}).get("chat", {}).get("tasks", {}).items():
            if task in CHAT_TASKS:
                e = accuracy_entry(c["correct"], c["total"], c.get("too_long", 0))
                lines.append(f"| {col} | {task} | {e['correct']:,}/{e['total']:,} | "
                             f"{e['value']:.4f} ({e['low']:.2f}-{e['high']:.2f}) | "
                             f"{e['too_long']:,} |")
    if len(lines) == 2:
        return ["The chat evals were not run."]
    return lines + ["", "A problem too long for the context counts as a failure (it stays in the "
                        "denominator)."]


def tokenizer_table(tokenizer: dict) -> list:
    """Markdown lines of the tokenizer's bytes per token on each kind of text."""
    if not tokenizer:
        return ["The tokenizer was not evaluated."]
    lines = [f"Vocabulary: {tokenizer['vocab_size']:,} tokens. More bytes per token = better "
             "compression (more text fits the context).", "",
             "| text | bytes | tokens | bytes/token |", "|---|---|---|---|"]
    for kind, t in tokenizer["texts"].items():
        lines.append(f"| {kind} | {t['bytes']:,} | {t['tokens']:,} | {t['bytes_per_token']:.2f} |")
    return lines


def quality_table(evals: dict) -> list:
    """Markdown lines of the chat-quality measures per model (whatever keys eval.json holds)."""
    # the chat evals (evals.py) choose these measures; the report prints whatever keys they
    # wrote, in their order, so a new measure needs no change here
    quality = {col: evals.get(phase, {}).get("quality", {}) for phase, col in MODELS.items()}
    # numbers only: the sampled answers ("samples") are printed with the other samples
    keys = list(dict.fromkeys(k for q in quality.values() for k, v in q.items()
                              if isinstance(v, (int, float))))
    if not keys:
        return ["Chat quality was not measured."]
    lines = ["| measure | " + " | ".join(MODELS.values()) + " |", "|---|" + "---|" * len(MODELS)]
    for key in keys:
        cells = ["-" if q.get(key) is None else f"{q[key]:.4f}" if isinstance(q[key], float)
                 else str(q[key]) for q in quality.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


# --- the run's record: phases.json ---

def record_phase(run_dir: str, phase: str, settings: dict, **extra):
    """Merge a phase's settings (and extra fields, e.g. its minutes) into run_dir/phases.json."""
    path = os.path.join(run_dir, "phases.json")
    record = read_json(path)
    record[phase] = {**record.get(phase, {}), "settings": settings, **extra}
    write_atomic(path, json.dumps(record, indent=1))


def stale_message(run_dir: str, settings: dict, outputs: dict) -> str | None:
    """None, or what to do when work on disk was made with other settings than this run's.

    settings: {phase: the settings its output depends on now} for the phases to check, in order;
    outputs: {phase: its output path} for every phase that has one, in order (the later ones
    are stale too). phases.json holds the settings each phase was made with.
    """
    record = read_json(os.path.join(run_dir, "phases.json"))
    for phase, new in settings.items():
        old = record.get(phase, {}).get("settings")
        # a training phase's folder counts from its first checkpoint: a resume with other
        # settings would mix two runs
        if old in (None, new) or not os.path.exists(outputs[phase]):
            continue
        keys = sorted({**old, **new})
        changed = "; ".join(f"{k} {old.get(k)} -> {new.get(k)}" for k in keys
                            if old.get(k) != new.get(k))
        later = list(outputs)[list(outputs).index(phase):]
        stale = " ".join(outputs[p] for p in later if os.path.exists(outputs[p]))
        return (f"{phase} in {run_dir} was made with other settings ({changed}).\n"
                f"It and every later phase would be stale. Rerun with the old flags, or start "
                f"them over:\n    rm -rf {stale}\n"
                f"or keep that run and give this one its own --run-dir.")
    return None


# --- the report files ---

def read_json(path: str) -> dict:
    """The JSON object in path, or {} when a phase has not written it (yet)."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_report(run_dir: str, env: dict, config: dict, model_dirs: dict) -> list:
    """Write report.md, loss.svg and report.json into run_dir (and ./report.md); return the
    summary lines (the eval table, the training table, where the files are).

    Reads from run_dir: phases.json (phase -> {"minutes"}), eval.json (see the module docstring)
    and, for each training phase, model_dirs[phase]/meta.json, whose "results" hold params, steps,
    tokens, minutes, train_loss, val_bpb, curve [[step, loss]] and val [[step, val_loss, val_bpb]].
    """
    # every input may be missing (a run stopped early, or --only report on a fresh dir): each
    # table then says what was not run instead of failing
    phases = read_json(os.path.join(run_dir, "phases.json"))
    minutes = {ph: entry.get("minutes", 0.0) for ph, entry in phases.items()}
    trained = {ph: read_json(os.path.join(run_dir, d, "meta.json")).get("results", {})
               for ph, d in model_dirs.items()}
    evals = read_json(os.path.join(run_dir, "eval.json"))
    table, numbers = summary_table(evals)
    train_lines = training_table(trained)
    total = sum(minutes.values())
    md = ["# tinychat training report", "", f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
          HONESTY, "", "## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    md += ["", "## Config", "", "```json", json.dumps(config, indent=1), "```", "",
           "## Phases", "", "| phase | minutes |", "|---|---|"]
    md += [f"| {ph} | {m:.1f} |" for ph, m in minutes.items()]
    md += ["", "## Tokenizer", "", *tokenizer_table(evals.get("tokenizer", {}))]
    md += ["", "## CORE (BASE)", "", *core_table(evals.get("pretrain", {}).get("core", {}))]
    md += ["", "## Chat evals (MID, SFT)", "", *chat_table(evals)]
    md += ["", "## Chat quality", "", *quality_table(evals)]
    for phase, col in MODELS.items():
        answers = evals.get(phase, {}).get("quality", {}).get("samples", [])
        if answers:  # [i, prompt, answer, the training template it copies or ""]
            md += ["", f"### {col} sampled answers (chat defaults)", ""]
            md += [f"- {prompt!r} -> {answer!r}" + (f" [{template}]" if template else "")
                   for _, prompt, answer, template in answers]
    for phase, col in MODELS.items():
        samples = evals.get(phase, {}).get("samples", [])
        if samples:  # repr: newlines stay visible and the sample stays on one line
            md += ["", f"### {col} samples (greedy)", ""]
            md += [f"- {prompt!r} -> {text!r}" for prompt, text in samples]
    md += ["", "## Summary", "", *table, "", *train_lines, "",
           "![train and val loss of every phase](loss.svg)", "",
           f"Total wall clock time: {int(total // 60)}h{int(total % 60)}m"]
    curves = {ph: (r.get("curve", []), r.get("val", [])) for ph, r in trained.items()}
    write_atomic(os.path.join(run_dir, "loss.svg"), loss_svg(curves))
    write_atomic(os.path.join(run_dir, "report.json"), json.dumps(
        {"environment": env, "config": config, "minutes": minutes, "summary": numbers,
         "train": trained, "eval": evals}, indent=1))
    write_atomic(os.path.join(run_dir, "report.md"), "\n".join(md) + "\n")
    shutil.copy(os.path.join(run_dir, "report.md"), "report.md")
    where = f"report: {os.path.join(run_dir, 'report.md')} (also ./report.md), loss.svg, " \
            "report.json"
    return table + [""] + train_lines + [where]


def write_atomic(path: str, text: str):
    """Write via path.tmp + os.replace, so a reader never sees half a file."""
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def loss_svg(curves: dict) -> str:
    """SVG text, one panel per phase: train loss (EMA) as a blue line, val loss as orange dots
    (nats/token). curves: phase -> (train [[step, loss]], val [[step, val_loss, val_bpb]])."""
    W, H, M = 320, 220, 36  # panel width and height, and the margin left for labels, in pixels
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W * max(len(curves), 1)}" '
           f'height="{H}" font-family="sans-serif" font-size="11">']
    for i, (phase, (train, val)) in enumerate(curves.items()):
        points = [(s, loss) for s, loss in train] + [(s, loss) for s, loss, _ in val]
        if not points:
            continue
        s0, s1 = min(s for s, _ in points), max(s for s, _ in points)
        lo, hi = min(v for _, v in points), max(v for _, v in points)
        left = i * W + M

        def xy(step, loss):
            # (step, loss) -> pixels; SVG's y grows downwards, so the highest loss sits at the top
            return (left + (step - s0) / max(s1 - s0, 1) * (W - 2 * M),
                    M + (hi - loss) / max(hi - lo, 1e-9) * (H - 2 * M))
        line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in train))
        out += [f'<rect x="{left}" y="{M}" width="{W - 2 * M}" height="{H - 2 * M}" fill="none" '
                'stroke="#999"/>',
                f'<text x="{left}" y="{M - 8}">{phase}: train (blue), val (orange)</text>',
                f'<text x="{left - M + 2}" y="{M + 4}">{hi:.2f}</text>',
                f'<text x="{left - M + 2}" y="{H - M}">{lo:.2f}</text>',
                f'<text x="{left}" y="{H - M + 14}">step {s0}</text>',
                f'<text x="{left + W - 2 * M}" y="{H - M + 14}" text-anchor="end">{s1}</text>',
                f'<polyline points="{line}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>']
        out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#ff7f0e"/>'
                for x, y in (xy(s, v) for s, v, _ in val)]
    return "\n".join(out + ["</svg>"]) + "\n"
