"""Whether a token verified inside a tree gets the same logits bits as in a chain.

    python -m benchmarks.tree_exactness [--model models/gpt2] [--trials 10] [--publish]

For speculative decoding with a tree of guesses: after a random prompt, the chain x, y, z runs as one
sequence's chunk (Engine.advance, a logits row per token), and the same path runs inside a tree whose
siblings sit between its nodes (x, w1, w2 below the prompt's last token and w1; y below x; z below y:
rows x, w1, w2, y, z). Reports, for the rows of x, y and z, how many trials differ from the chain and
the largest difference. A row after a sibling is masked out of its attention by the attention bias; if
its logits differ in the last bits, a tree's accepted branch is not what plain decoding computes.
JSON under benchmarks/out/ (benchmarks/results/ with --publish).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from .common import environment
from .isolate import out_dir


def main(argv=None) -> None:
    from kvcache_infer import Engine, Model, Nodes
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/gpt2")
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--publish", action="store_true")
    a = ap.parse_args(argv)
    model = Model(a.model)
    V = model.manifest.vocab_size
    rng = np.random.default_rng(0)
    differ, worst = [0, 0, 0], [0.0, 0.0, 0.0]
    for _ in range(a.trials):
        P = int(rng.integers(20, 120))
        prompt = rng.integers(0, V, P)
        x, w1, w2, y, z = (int(t) for t in rng.integers(0, V, 5))
        eng = Engine(model, max_sequences=2, max_seq_len=256)
        chain = eng.new_sequence()
        eng.step({chain: prompt})
        want = np.array(eng.advance({chain: [x, y, z]}, score=[chain]).logits(chain))       # [3,V]
        tree = eng.new_tree()
        eng.step({tree: Nodes(list(prompt))})
        got = np.array(eng.advance({tree: Nodes([x, w1, w2, y, z], [P - 1, P - 1, P + 1, P, P + 3])}).logits(tree))
        for i, row in enumerate((0, 3, 4)):
            d = float(np.abs(got[row] - want[i]).max())
            differ[i] += d > 0
            worst[i] = max(worst[i], d)
    res = {"model": a.model, "trials": a.trials, "rows": ["x", "y", "z"], "trials_differing": differ,
           "max_abs_diff": worst, "environment": environment(None)}
    print(f"{a.model}: of {a.trials} trials, rows x / y / z differ from the chain in {differ} "
          f"(largest |diff| {', '.join(f'{w:.2e}' for w in worst)})")
    path = out_dir(a.publish) / "tree_exactness.json"
    path.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
