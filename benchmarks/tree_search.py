"""Tree search: an MCTS over token continuations, its leaf evaluations done five ways.

    python -m benchmarks.tree_search --model models/gpt2 [--root 256] [--rounds 3] [--publish]

The search (the same for every method; seeded): a root prompt of --root tokens; each iteration
selects --batch-leaves leaves by PUCT (priors = the parent's softmax, value = the node's top
softmax probability, virtual loss between the leaves of one batch), expands each into its top
--expand tokens, evaluates every new node (its logits over the whole path from the root), and
backs the values up. Nodes at depth --depth are not expanded. Measured: node evaluations per
second, after the root's prefill (not counted). Methods, each alone in its own process:

    no-cache        every new node's whole path recomputed (siblings batched: one [8, path] run)
    reprefill       KVCacheInferencer: reset_cache() + forward(path) for each new node
    restore         KVCacheInferencer: the parent's path rebuilt from a root snapshot and snapshotted;
                    per child restore(parent snapshot) + forward([child])  (the seed design's way)
    rewind          KVCacheInferencer: truncate to the prefix it shares with the parent's path, feed the
                    rest; per child forward([child]) then rewind(1)  (no copies at all)
    engine-fork     Engine: the parent's sequence adopts its retained rows, is forked per child, all
                    children of the batch run in one step, then are released (retained for later)
    engine-tree     Engine TreeSequence: the whole tree in one cache row, every batch of new nodes in
                    one step (tree attention: each node sees its ancestors only), nothing copied
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from .common import pyplot, environment, session_options
from .isolate import emit, out_dir, run_rounds, spread

METHODS = ("no-cache", "reprefill", "restore", "rewind", "engine-fork", "engine-tree")




class Node:
    __slots__ = ("token", "parent", "depth", "children", "prior", "n", "w", "value", "logits_top", "key")

    def __init__(self, token, parent, prior):
        self.token, self.parent, self.prior = token, parent, prior
        self.depth = 0 if parent is None else parent.depth + 1
        self.children: list[Node] = []
        self.n, self.w, self.value, self.logits_top, self.key = 0, 0.0, 0.0, None, None

    def path(self) -> list[int]:
        out, n = [], self
        while n is not None and n.token is not None:
            out.append(n.token)
            n = n.parent
        return out[::-1]


class Search:
    """The search itself; `evaluate(parent, children)` fills each child's logits-derived fields."""

    def __init__(self, root_ids: np.ndarray, expand: int, batch: int, depth: int, c_puct: float = 1.5):
        self.root_ids, self.expand, self.batch, self.max_depth, self.c = root_ids, expand, batch, depth, c_puct
        self.root = Node(None, None, 1.0)
        self.evals = 0

    def set_result(self, node: Node, logits: np.ndarray) -> None:
        """The node's value (its top softmax probability) and its children-to-be (top tokens, priors)."""
        top = np.argpartition(-logits, self.expand)[: self.expand]
        top = top[np.argsort(-logits[top], kind="stable")]
        z = float(np.exp(logits - logits[top[0]]).sum())
        node.logits_top = [(int(t), float(np.exp(logits[t] - logits[top[0]])) / z) for t in top]
        node.value = node.logits_top[0][1]

    def select(self) -> list[Node]:
        leaves, virtual = [], []
        for _ in range(self.batch):
            node = self.root
            while node.children:
                sq = math.sqrt(node.n + 1)
                node = max(node.children, key=lambda ch: (ch.w / ch.n if ch.n else 0.0)
                           + self.c * ch.prior * sq / (1 + ch.n))
            if node.depth >= self.max_depth or node in leaves:
                break
            leaves.append(node)
            while node is not None:                      # virtual loss: spread the batch's leaves
                node.n += 1
                virtual.append(node)
                node = node.parent
        for node in virtual:
            node.n -= 1
        return leaves

    def run(self, evaluate, budget: int) -> float:
        """Runs until `budget` evaluations; returns the seconds it took."""
        t0 = time.perf_counter()
        while self.evals < budget:
            leaves = self.select()
            if not leaves:
                break
            groups = []
            for leaf in leaves:
                leaf.children = [Node(t, leaf, p) for t, p in leaf.logits_top]
                groups.append((leaf, leaf.children))
            evaluate(groups)
            for _, children in groups:
                for ch in children:
                    self.evals += 1
                    node = ch
                    while node is not None:
                        node.n += 1
                        node.w += ch.value
                        node = node.parent
        return time.perf_counter() - t0


# -- evaluators: each sets every new child's result; `root` evaluates the root prompt -------------------
def method(name: str, model, search: Search, cap: int):
    from kvcache_infer import Engine, KVCacheInferencer, Nodes
    root = search.root_ids
    if name in ("no-cache", "reprefill", "restore", "rewind"):
        inf = KVCacheInferencer(model, max_seq_len=cap, batch_size=search.expand if name == "no-cache" else 1)
        if name == "no-cache":
            search.set_result(search.root, inf.forward(np.tile(root, (search.expand, 1)))[0])

            def evaluate(groups):
                for _, children in groups:
                    inf.reset_cache()
                    paths = np.array([np.concatenate([root, ch.path()]) for ch in children])
                    for ch, lg in zip(children, inf.forward(paths)):
                        search.set_result(ch, lg)
            return evaluate
        search.set_result(search.root, inf.forward(root))
        if name == "reprefill":
            def evaluate(groups):
                for _, children in groups:
                    for ch in children:
                        inf.reset_cache()
                        search.set_result(ch, inf.forward(np.concatenate([root, ch.path()])))
            return evaluate
        if name == "restore":
            base = inf.snapshot()

            def evaluate(groups):
                for parent, children in groups:
                    inf.restore(base)
                    tail = parent.path()
                    if tail:
                        inf.forward(tail)
                    snap = inf.snapshot()
                    for ch in children:
                        inf.restore(snap)
                        search.set_result(ch, inf.forward([ch.token]))
            return evaluate
        held: list[int] = list(root)                   # rewind: what the cache holds

        def evaluate(groups):
            for parent, children in groups:
                want = list(root) + parent.path()
                k = 0
                while k < min(len(held), len(want)) and held[k] == want[k]:
                    k += 1
                inf.truncate(k)
                del held[k:]
                if k < len(want):
                    inf.forward(want[k:])
                    held.extend(want[k:])
                for ch in children:
                    search.set_result(ch, inf.forward([ch.token]))
                    inf.rewind(1)
        return evaluate
    if name == "engine-fork":
        slots = search.batch * search.expand
        eng = Engine(model, max_sequences=2 * slots, max_seq_len=cap)
        first = eng.new_sequence()
        search.set_result(search.root, eng.step({first: root})[first])
        eng.release(first)

        def evaluate(groups):
            feeds = {}
            for parent, children in groups:
                want = np.concatenate([root, parent.path()]).astype(np.int64)
                seq = eng.new_sequence()
                have = eng.reuse_prefix(seq, want, keep_last=False)
                if have < want.size:
                    eng.step({seq: want[have:]})
                seqs = [seq] + [eng.fork(seq) for _ in children[1:]]
                for s, ch in zip(seqs, children):
                    feeds[s] = [ch.token]
                    ch.key = s
            out = eng.advance(feeds)
            for _, children in groups:
                for ch in children:
                    search.set_result(ch, out.logits(ch.key))
            for s in feeds:
                eng.release(s)
        return evaluate
    if name == "engine-tree":
        eng = Engine(model, max_sequences=1, max_seq_len=cap)
        tree = eng.new_tree()
        lg = eng.step({tree: Nodes(root)})[tree]
        search.set_result(search.root, lg[-1])
        search.root.key = root.size - 1                  # the root's node index in the tree

        def evaluate(groups):
            tokens, parents, order = [], [], []
            for parent, children in groups:
                for ch in children:
                    tokens.append(ch.token)
                    parents.append(parent.key)
                    order.append(ch)
            start = tree.position
            out = eng.advance({tree: Nodes(tokens, parents)})
            rows = out.logits(tree)
            for i, ch in enumerate(order):
                ch.key = start + i
                search.set_result(ch, rows[i])
        return evaluate
    raise ValueError(name)


def worker(a) -> None:
    from kvcache_infer import Model
    model = Model(a.model, intra_op_threads=a.threads, session_options=session_options(a.threads))
    V, P = model.manifest.vocab_size, model.manifest.max_positions
    root = np.random.default_rng(a.seed).integers(0, V, a.root)
    budget = a.evals_slow if a.worker in ("no-cache", "reprefill") else a.evals
    tree_rows = a.root + budget + a.batch_leaves * a.expand
    if a.worker == "engine-tree" and tree_rows > P:
        raise SystemExit(f"a tree of {tree_rows} nodes does not fit the model's {P} positions: lower --evals")
    cap = min(P, tree_rows if a.worker == "engine-tree" else a.root + a.depth + 1)
    evals, seconds, depths = 0, 0.0, []
    for _ in range(a.repeats):                 # the same search again: enough work to time, one tree at a time
        search = Search(root, a.expand, a.batch_leaves, a.depth)
        evaluate = method(a.worker, model, search, cap)
        seconds += search.run(evaluate, budget)
        evals += search.evals
        stack = [search.root]
        while stack:
            n = stack.pop()
            depths.append(n.depth)
            stack.extend(n.children)
        del evaluate
    emit({"method": a.worker, "evaluations": evals, "seconds": seconds, "evals_per_s": evals / seconds,
          "max_depth": max(depths), "mean_depth": float(np.mean(depths)), "environment": environment(a.threads)})


def plot(record: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    summ = {k: v for k, v in record["summary"].items() if "failed" not in v}
    names = list(summ)
    med = [summ[n]["evals_per_s"]["median"] for n in names]
    err = [[m - summ[n]["evals_per_s"]["min"] for n, m in zip(names, med)],
           [summ[n]["evals_per_s"]["max"] - m for n, m in zip(names, med)]]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    ax.barh(names, med, xerr=err, color=["tab:blue" if n.startswith("engine") else "tab:gray" for n in names])
    for y, m in enumerate(med):
        ax.text(m * 1.1, y, f"{m:.1f}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("node evaluations per second (log scale; range over rounds)")
    s = record["search"]
    ax.set_title(f"MCTS over token continuations, {Path(record['model']).name}: root {s['root']} tokens, "
                 f"{s['expand']} children x {s['batch_leaves']} expansions per batch", fontsize=10)
    ax.grid(axis="x", alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/gpt2")
    ap.add_argument("--root", type=int, default=256, help="root prompt tokens (default 256)")
    ap.add_argument("--expand", type=int, default=8, help="children per expanded node (default 8)")
    ap.add_argument("--batch-leaves", type=int, default=4, help="leaves selected and expanded per batch (default 4)")
    ap.add_argument("--depth", type=int, default=32, help="maximum depth below the root (default 32)")
    ap.add_argument("--evals", type=int, default=256, help="evaluations per run (default 256)")
    ap.add_argument("--evals-slow", type=int, default=64, help="evaluations for no-cache and reprefill (default 64)")
    ap.add_argument("--repeats", type=int, default=1, help="searches per run, each from a fresh root (default 1)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--publish", action="store_true")
    ap.add_argument("--replot", type=Path, default=None, metavar="JSON", help="rebuild the plot of a result file")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    if a.replot:
        return plot(json.loads(a.replot.read_text()), a.replot.with_suffix(".png"))
    args = ["--model", a.model, "--root", str(a.root), "--expand", str(a.expand), "--batch-leaves", str(a.batch_leaves),
            "--depth", str(a.depth), "--evals", str(a.evals), "--evals-slow", str(a.evals_slow), "--seed", str(a.seed),
            "--repeats", str(a.repeats),
            "--threads", str(a.threads)]
    print(f"== tree search, {a.model}: root {a.root} tokens, {a.expand} children per expansion, {a.batch_leaves} "
          f"expansions per batch, depth <= {a.depth}; {a.rounds} rounds, each method alone in its own process", flush=True)
    res = run_rounds("benchmarks.tree_search", {m: [m, *args] for m in a.methods}, a.rounds)
    summary = {}
    for m, rs in res.items():
        ok = [r for r in rs if "failed" not in r]
        summary[m] = ({"evals_per_s": spread([r["evals_per_s"] for r in ok]), "evaluations": ok[0]["evaluations"],
                       "mean_depth": ok[0]["mean_depth"], "max_depth": ok[0]["max_depth"]} if ok
                      else {"failed": rs[0]["failed"]})
    best = {k: summary[k]["evals_per_s"]["median"] for k in summary if "failed" not in summary[k]}
    ratios = {}
    for ours in ("engine-tree", "engine-fork"):
        if ours in best:
            ratios[ours] = {k: best[ours] / v for k, v in best.items() if not k.startswith("engine")}
    record = {"benchmark": "tree_search", "model": a.model, "search": vars(a) | {"worker": None},
              "environment": environment(a.threads), "summary": summary, "speedup": ratios,
              "rounds": res}
    out = out_dir(a.publish) / f"tree_search_{Path(a.model).name}.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(record, out.with_suffix(".png"))
    for m, v in summary.items():
        if "failed" in v:
            print(f"{m:12s} not run: {v['failed'][:160]}")
        else:
            e = v["evals_per_s"]
            print(f"{m:12s} {e['median']:8.1f} evaluations/s ({e['min']:.1f}-{e['max']:.1f}), {v['evaluations']} "
                  f"evaluations, mean depth {v['mean_depth']:.1f}")
    for ours, r in ratios.items():
        print(f"{ours} speedup: " + ", ".join(f"{x:.1f}x {k}" for k, x in r.items()))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
