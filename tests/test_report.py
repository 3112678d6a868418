"""
Tests of report.py: the Wilson interval's known values, the BASE / MID / SFT table and the report
files made from a hand-made eval.json, and the CPU facts of the environment section.
"""
import json
import os
import tempfile

from report import CORE_NOTE, cpu_info, summary_table, wilson_interval, write_report

# a hand-made eval.json: CORE on the base model, some chat evals on MID, nothing on SFT but bpb
EVAL = {
    "pretrain": {"val_bpb": 1.23456, "val_tokens": 65_536, "samples": [["The sky", " is\nblue"]],
                 "core": {"core": 0.05, "interval": [-0.1, 0.2], "num_tasks": 2, "tasks": {
                     "arc_easy": {"correct": 9, "total": 20, "cropped": 0, "accuracy": 0.45,
                                  "centered": 0.2667},
                     "boolq": {"correct": 6, "total": 10, "cropped": 3, "accuracy": 0.6,
                               "centered": -0.0526}}}},
    "midtrain": {"val_bpb": 1.5, "val_tokens": 8192,
                 "chat": {"tasks": {"ARC-Easy": {"correct": 10, "total": 20, "too_long": 0},
                                    "GSM8K": {"correct": 0, "total": 8, "too_long": 2}},
                          "ChatCORE": 0.0123},
                 "quality": {"ended_share": 0.5, "prompts": 4,
                             "samples": [[0, "Hi", "Hello!", ""], [1, "Joke?", "x", "identity"]]}},
    "sft": {"val_bpb": 1.4},
    "tokenizer": {"vocab_size": 8192, "texts": {
        "code (HumanEval)": {"bytes": 3000, "tokens": 1000, "bytes_per_token": 3.0}}},
}


def test_report_wilson_interval_known_values():
    """Wilson 95% intervals match hand-computed values, stay in [0, 1], are wide at 0 examples."""
    cases = {(8, 10): (0.4902, 0.9433), (80, 100): (0.7112, 0.8666), (0, 5): (0.0, 0.4345),
             (5, 5): (0.5655, 1.0)}
    for (correct, total), expected in cases.items():
        low, high = wilson_interval(correct, total)
        assert abs(low - expected[0]) < 1e-4 and abs(high - expected[1]) < 1e-4, \
            f"{correct}/{total}: got ({low:.4f}, {high:.4f}), expected {expected}: formula is off"
    assert wilson_interval(0, 0) == (0.0, 1.0), "no examples must mean 'anything is possible'"


def test_report_summary_table_cells():
    """Each cell carries its examples and interval (or tasks, or tokens); a missing one is '-'."""
    lines, numbers = summary_table(EVAL)
    cells = [line.strip("| ").split(" | ") for line in lines[2:]]
    rows = {row[0]: row[1:] for row in cells}
    assert list(rows) == ["CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval",
                          "SpellingBee", "ChatCORE", "val bpb"], f"nanochat's order: {list(rows)}"
    assert rows["CORE"] == ["0.0500 (-0.100 to +0.200, 2 tasks, 30 ex)", "-", "-"], rows["CORE"]
    assert rows["ARC-Easy"] == ["-", "0.5000 (0.30-0.70, n=20)", "-"], rows["ARC-Easy"]
    assert rows["GSM8K"][1] == "0.0000 (0.00-0.32, n=8, 2 too long)", "too-long problems must show"
    assert rows["MMLU"] == ["-", "-", "-"] and rows["ChatCORE"][1] == "0.0123 (2 tasks)", rows
    assert rows["val bpb"] == ["1.2346 (65,536 tokens)", "1.5000 (8,192 tokens)",
                               "1.4000 (0 tokens)"], rows["val bpb"]
    assert numbers["ARC-Easy"]["MID"]["total"] == 20 and "BASE" not in numbers["ARC-Easy"], numbers


def test_report_files_from_hand_made_eval_json():
    """write_report turns eval.json into report.md's tables and report.json's numbers."""
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = os.path.join(tmp, "run")
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "eval.json"), "w") as f:
            json.dump(EVAL, f)
        cwd = os.getcwd()
        os.chdir(tmp)  # report.md is also copied to the working directory
        try:
            lines = write_report(run_dir, {"cpu_model": "Test CPU"}, {}, {"pretrain": "base"})
        finally:
            os.chdir(cwd)
        md = open(os.path.join(run_dir, "report.md")).read()
        summary = json.load(open(os.path.join(run_dir, "report.json")))["summary"]
    assert "| Metric | BASE | MID | SFT |" in lines[0], "the summary goes back to the caller's log"
    for text in ("| boolq | 6/10 | 0.6000 (0.31-0.83) | -0.0526 | 3 |", CORE_NOTE,
                 "| MID | GSM8K | 0/8 | 0.0000 (0.00-0.32) | 2 |",
                 "| code (HumanEval) | 3,000 | 1,000 | 3.00 |",
                 "| ended_share | - | 0.5000 | - |", "| prompts | - | 4 | - |",
                 "- 'Joke?' -> 'x' [identity]", "- cpu_model: Test CPU", r"-> ' is\nblue'"):
        assert text in md, f"report.md lacks {text!r}"
    assert summary["CORE"]["BASE"] == {"value": 0.05, "tasks": 2, "total": 30,
                                       "interval": [-0.1, 0.2]}, summary["CORE"]


def test_report_cpu_info():
    """The environment names the CPU and says yes or no to bf16 instructions."""
    info = cpu_info()
    assert info["cpu_model"] and info["cpu_bf16"].split(" ")[0] in ("yes", "no", "-"), info
