"""The LoRA demo (configs/lora_demo.yaml): does an adapter teach the bundled demo model a colour word it never
saw ("crimson", drawn as its red), without losing the old prompts? Accuracy before/after, with eval_demo's
generation and analysis (`benchmarks/eval_demo.py`).

    python benchmarks/eval_lora_demo.py                                  # the bundled model alone
    python benchmarks/eval_lora_demo.py --lora outputs/NNN-demo_lora/epochE-global_stepS/lora

New concept: "a crimson {shape} {motion}" for every motion x seed, scored as right when the video's shape is red.
Old grid: eval_demo's colour x motion grid (a reduced one by default: one seed).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from eval_demo import evaluate, grid, report  # noqa: E402

from opendit.data.synthetic import COLORS, MOTIONS, SHAPES  # noqa: E402
from opendit.sample import BUNDLED_MODEL, STDiTPipeline  # noqa: E402

NEW_WORD, MEANS = "crimson", "red"


def make_csv(src: str, dst: str, copies: int = 2) -> None:
    """The demo's training CSV: every row of ``src``, and each red clip ``copies`` more times captioned with the
    new word (the synthetic CSV's colour column says which clips are red)."""
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        out.append(row)
        if row["color"] == MEANS:
            out += [{**row, "text": re.sub(rf"\b{MEANS}\b", NEW_WORD, row["text"]), "color": NEW_WORD}] * copies
    with open(dst, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(out)
    print(f"{dst}: {len(out)} rows ({len(out) - len(rows)} captioned '{NEW_WORD}')")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--make_csv", nargs=2, metavar=("SRC", "DST"), help="only write the demo's training CSV")
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--lora", default=None, help="a LoRA folder (peft) to add")
    p.add_argument("--lora_scale", type=float, default=1.0, help="its strength")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="seeds of the new-concept prompts")
    p.add_argument("--grid_seeds", nargs="+", type=int, default=[0], help="seeds of the old grid")
    p.add_argument("--steps", type=int, default=None)
    args = p.parse_args()
    if args.make_csv:
        return make_csv(*args.make_csv)
    pipe = STDiTPipeline.from_pretrained(args.model, device="cpu")
    if args.lora:
        pipe.load_lora(args.lora, args.lora_scale)
    new = evaluate(pipe, grid([NEW_WORD], list(MOTIONS), list(SHAPES), args.seeds), "black", args.steps, None, 16)
    hits = sum(r["found_color"] == MEANS for r in new)
    print(f"new concept '{NEW_WORD}' drawn {MEANS}: {100 * hits / len(new):.1f}% of {len(new)} videos")
    print("old grid:")
    report(evaluate(pipe, grid(list(COLORS), list(MOTIONS), list(SHAPES), args.grid_seeds), "black", args.steps,
                    None, 16))


if __name__ == "__main__":
    main()
