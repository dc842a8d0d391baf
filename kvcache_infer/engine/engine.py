"""Engine: many sequences of different lengths in one preallocated cache, advanced by ragged runs.

    eng = Engine("models/gpt2", max_sequences=16, max_seq_len=1024)
    a, b = eng.new_sequence(), eng.new_sequence()
    out = eng.step({a: prompt_a, b: [42]})      # one run; {handle: float32 [V] last-position logits}
    c = eng.fork(a)                             # c holds a's tokens; then they continue differently
    eng.release(b)                              # b's slot is retained for prefix reuse (or freed)

Memory: one in-place K and V buffer per layer, [max_sequences, H, max_seq_len + max_chunk - 1, D],
allocated once; a sequence owns one slot (a row of every buffer) from new_sequence()/fork() to
release(). A step writes each given sequence's new tokens into its slot from its position on; the
other slots are idle in that run (no attention cost). The max_chunk - 1 extra rows per slot are
padding room: GroupQueryAttention pads every row of a run to the longest chunk S and needs
position + S <= rows for each row taking part.

Prefix reuse (prefix_cache=True): released sequences keep their slot (retained, LRU) and are
indexed with the live ones in a radix tree of tokens; a sequence whose first step starts with an
indexed prefix adopts those tokens, by taking over a retained slot that holds exactly that prefix,
else by copying its rows into its own slot, and runs only the rest.

Every call validates everything before changing anything and commits (positions, tokens, slot
ownership, the index) only after its runs succeeded: a failed call leaves every sequence, slot and
cache byte that anything can read as it was.

Continuous batching (submit, tick, generate, stream; batching.py): the Scheduler (scheduler.py) plans
each step, tick() executes the plan with this Engine's step primitives; the Scheduler holds no
reference back.
"""
from __future__ import annotations

import itertools
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import CapacityError, InvalidInputError, ModelFormatError
from ..runtime.cache import make_cache
from ..runtime.checks import int_arg, max_seq_len_arg, rows_fit, token_ids
from ..runtime.metrics import EngineMemoryProfile
from ..runtime.model import Model, shared_model
from ..runtime.runs import Chunk, PackedRun
from ..runtime.speculative import MAX_DRAFTS, Proposer, proposer_arg
from .prefix_cache import Adoption, PrefixCache
from .batching import ContinuousBatching
from .sequence import Nodes, Sequence, TreeSequence
from .step_output import StepOutput, joined

PREFILL_BUDGET = 256        # prompt tokens a step feeds by default, as OpenVINO GenAI's scheduler (256 a step)


class Engine(ContinuousBatching):
    """Many sequences, one cache, one ONNX Runtime run per step.

    Args:
        model: a Model (weights shared with anything else using it) or a path to load one from.
        max_sequences: slots (live plus retained sequences at once).
        max_seq_len: tokens one sequence may hold (default and bound: the model's position limit).
        max_chunk: longest chunk a run feeds one sequence; longer chunks run as several runs
            (chunked prefill). Each slot carries max_chunk - 1 rows of padding room.
        prefix_cache: retain released sequences and reuse indexed prefixes (token granularity).
        prefill_budget: prompt tokens the request scheduler feeds per step, besides the decoding
            requests' tokens (default PREFILL_BUDGET, at least max_chunk). Larger: prompts finish sooner
            and steps run bigger GEMMs; smaller: a burst of prompts delays the running requests' next
            tokens less (docs/performance.md, "Prompt tokens per step").
        speculative: requests' default proposer (None; "lookup": prompt lookup; "draft:PATH": a draft
            export with the same vocabulary; a runtime.speculative.Proposer): each decode step then
            also verifies the tokens it guesses, and greedy requests produce the same tokens as without.
        device, device_id, intra_op_threads, session_options: as for Model, when a path is given.
    """

    def __init__(self, model: Model | str | Path, *, max_sequences: int = 16, max_seq_len: int | None = None,
                 max_chunk: int = 64, prefix_cache: bool = True, prefill_budget: int | None = None,
                 device: str | None = None, device_id: int = 0, intra_op_threads: int | None = None,
                 session_options: ort.SessionOptions | None = None, speculative: Proposer | str | None = None):
        max_sequences = int_arg("max_sequences", max_sequences)
        speculative = proposer_arg(speculative)
        max_chunk = int_arg("max_chunk", max_chunk)
        model = shared_model(model, device, device_id=device_id, intra_op_threads=intra_op_threads,
                             session_options=session_options)
        m = model.manifest
        if m.tokens != "packed":
            raise ModelFormatError(
                f"{model.dir} is a {m.tokens}-token graph ({m.source}), which runs all rows of a batch in lockstep; "
                "the Engine needs a packed-token graph (kvcache-infer manifest format 2). Re-export it: "
                f"`python -m export --model CHECKPOINT --out NEW_DIR` (or `--config NAME` for random weights). "
                "KVCacheInferencer still runs this model")
        max_seq_len = max_seq_len_arg(max_seq_len, m)
        self.model, self.manifest = model, m
        self.max_sequences, self.max_seq_len = max_sequences, max_seq_len
        self.max_chunk = min(max_chunk, max_seq_len)
        self.capacity = max_seq_len + self.max_chunk - 1          # rows per slot, padding room included
        self.cache = make_cache(m, max_sequences, self.capacity, model.device, model.device_id,
                                fix="lower max_sequences, max_seq_len or max_chunk")
        rows = max_sequences * (1 + min(MAX_DRAFTS, self.max_chunk - 1)) if speculative else max_sequences
        self.runner = PackedRun(model, self.cache, max_chunk=self.max_chunk, max_logits=max(rows, 64))
        self.prefix_cache = PrefixCache(self.cache, prefix_cache)
        self._live: dict[int, Sequence] = {}      # slot -> its live sequence
        self._ids = itertools.count()
        self.lock = threading.RLock()             # held by every engine call (and by a whole tick)
        self._counts = {"sequences": 0, "forks": 0, "runs": 0}
        budget = max(PREFILL_BUDGET, self.max_chunk) if prefill_budget is None else prefill_budget
        self._init_batching(max_chunk=self.max_chunk, prefill_budget=budget, speculative=speculative)

    # -- sequences -------------------------------------------------------------------------------
    def new_sequence(self) -> Sequence:
        """A new, empty sequence owning a free slot (a retained one is evicted if none is free)."""
        with self.lock:
            return self._adopt_slot(Sequence)

    def new_tree(self) -> TreeSequence:
        """A new, empty TreeSequence (see Nodes): a tree of continuations in one slot."""
        with self.lock:
            return self._adopt_slot(TreeSequence)

    def _adopt_slot(self, kind):
        slot = self._free_slot()
        seq = kind(next(self._ids), slot)
        self._claim(slot)
        self._live[slot] = seq
        self._counts["sequences"] += 1
        return seq

    def _free_slot(self, exclude: int | None = None) -> int:
        """The lowest free slot (keeps the bound slot range short), else the least recently used
        retained one; changes nothing."""
        busy = set(self._live) | set(self.prefix_cache.retained)
        for s in range(self.max_sequences):
            if s not in busy:
                return s
        lru = self.prefix_cache.lru(exclude)
        if lru is not None:
            return lru
        raise CapacityError(f"all {self.max_sequences} slots hold live sequences (max_sequences="
                            f"{self.max_sequences}); release() one, or construct the Engine with a larger "
                            "max_sequences")

    def _claim(self, slot: int) -> None:
        """Makes `slot` empty and unindexed (evicting a retained sequence if it held one)."""
        self.prefix_cache.evict(slot)
        self.cache.truncate(0, [slot])

    def release(self, seq: Sequence) -> None:
        """Ends a sequence. With prefix_cache its slot is retained (its tokens stay indexed for reuse
        until the slot is needed); otherwise, and for trees, the slot is free at once."""
        with self.lock:
            self._check_live(seq)
            slot = seq.state.slot
            del self._live[slot]
            seq.state.released = True
            tokens = [] if isinstance(seq, TreeSequence) else seq.state.tokens
            if not self.prefix_cache.retain(slot, tokens):
                self.cache.truncate(0, [slot])

    def fork(self, seq: Sequence, node: int | None = None) -> Sequence:
        """A new sequence holding `seq`'s tokens (copied rows: O(position)); both then continue
        independently. For a TreeSequence: a copy of the whole tree, or with `node`, a plain Sequence
        holding the path from the root to that node."""
        with self.lock:
            self._check_live(seq)
            if node is not None:
                if not isinstance(seq, TreeSequence):
                    raise InvalidInputError("fork(seq, node=...) takes a TreeSequence; a Sequence forks whole")
                node = int_arg("node", node, 0, seq.position - 1, f" (the tree has {seq.position} nodes)")
            slot = self._free_slot()
            kind = TreeSequence if isinstance(seq, TreeSequence) and node is None else Sequence
            new = kind(next(self._ids), slot)
            self._claim(slot)
            if node is None:
                self.cache.copy(seq.state.slot, [slot], seq.position)
                new.state.tokens = list(seq.state.tokens)
                if kind is TreeSequence:
                    new.state.parents, new.state.depths = list(seq.state.parents), list(seq.state.depths)
            else:
                path = seq.path(node)
                self.cache.copy_rows(seq.state.slot, slot, len(path), src_rows=path)
                self.cache.truncate(len(path), [slot])
                new.state.tokens = [seq.state.tokens[i] for i in path]
            self._live[slot] = new
            self._counts["forks"] += 1
            return new

    def truncate(self, seq: Sequence, length: int) -> None:
        """Keeps the first `length` tokens (nodes, for a tree) of `seq`; O(1), nothing is cleared."""
        with self.lock:
            self._check_live(seq)
            length = int_arg("truncate(seq, length)", length, 0, seq.position, f" (position={seq.position})")
            self.cache.truncate(length, [seq.state.slot])
            del seq.state.tokens[length:]
            if isinstance(seq, TreeSequence):
                del seq.state.parents[length:], seq.state.depths[length:]
            else:
                self.prefix_cache.truncate(seq.state.slot, length, seq.state.tokens)

    @property
    def live(self) -> list[Sequence]:
        return [self._live[s] for s in sorted(self._live)]

    # -- prefix reuse (policy: prefix_cache.PrefixCache) ------------------------------------------
    def match_length(self, tokens) -> int:
        """How many leading tokens of `tokens` a new sequence would adopt instead of running (at most
        len(tokens) - 1: the last token must run to give logits). 0 without prefix_cache."""
        with self.lock:
            return self.prefix_cache.match_length(np.asarray(tokens, dtype=np.int64))

    def _plan_adoption(self, seq: Sequence, ids: np.ndarray, keep_last: bool = True, taken: set | None = None):
        if seq.position or isinstance(seq, TreeSequence):
            return Adoption(seq.state.slot, 0, None, False)
        return self.prefix_cache.plan(seq.state.slot, ids, keep_last, taken)

    def _commit_adoption(self, seq: Sequence, a: Adoption) -> None:
        if a.takeover:                               # seq moves into the retained slot; its own is free
            del self._live[seq.state.slot]
            self.cache.truncate(0, [seq.state.slot])
            seq.state.slot = a.row
            self._live[a.row] = seq
        self.prefix_cache.commit(a)

    def reuse_prefix(self, seq: Sequence, tokens, keep_last: bool = True) -> int:
        """Lets an empty sequence adopt the longest indexed prefix of `tokens` without running anything
        (at most len - 1 tokens with keep_last, so that the last one still runs and gives logits);
        returns how many tokens it now holds. tick() calls this before a request's first prompt
        chunk, so that a prefix longer than one chunk is reused whole."""
        with self.lock:
            self._check_live(seq)
            if seq.position:
                raise InvalidInputError(f"reuse_prefix() needs an empty sequence; this one holds {seq.position} tokens")
            ids = self.check_ids(tokens, "tokens")
            a = self._plan_adoption(seq, ids, keep_last)
            if a.tokens:
                self.cache.truncate(a.tokens, [a.row])
                self._commit_adoption(seq, a)
                seq.state.tokens = [int(t) for t in ids[:a.tokens]]
                self.prefix_cache.insert(seq.state.slot, seq.state.tokens)
            return a.tokens

    # -- steps -----------------------------------------------------------------------------------
    def step(self, feeds) -> dict[Sequence, np.ndarray]:
        """Advances each given sequence by its own ids, all in one batched run (several runs only when
        a chunk is longer than max_chunk). feeds: {handle: ids} or (handle, ids) pairs; ids a 1-D
        sequence of ints, or Nodes for a TreeSequence. Returns {handle: float32 [V] logits of its last
        new token} ([n, V], one row per new node, for a TreeSequence): fresh arrays the caller owns."""
        out = self.advance(feeds)
        return {seq: np.array(out.logits(seq)) for seq in out}

    def advance(self, feeds, pick=(), score=()) -> StepOutput:
        """step() without the copies: a StepOutput of views (logits rows, greedy next tokens). pick: the
        Sequences (not trees) that need only their greedy next token: with a graph that has the
        filtered greedy head (export --greedy-head) their logits rows are not computed; their
        StepOutput.logits() raises either way. It pays for one or two picked sequences and costs more
        than it saves for many (the filter's work grows with the rows picked), which is why tick()
        does not pick. A sequence's pick equals its logits' argmax except in float-rounding near-ties,
        so picking is not bitwise batch invariant across runs that pick and runs that do not.
        score: Sequences that get a logits row (and greedy token) for every new token, as trees do
        (verifying guessed tokens): their StepOutput.logits() is [n, V]."""
        with self.lock:
            items = self._check_feeds(feeds)
            pick, score = self._handles("pick", pick, items), self._handles("score", score, items)
            if pick & score:
                raise InvalidInputError("a sequence is in both pick and score; pick gives no logits rows")
            taken: set[int] = set()
            plans = [self._plan_adoption(seq, ids, True, taken) for seq, ids, _ in items]
            pieces = max(-(-(len(ids) - plan.tokens) // self.max_chunk) for (_, ids, _), plan in zip(items, plans))
            kept: dict[Sequence, list] = {}      # multi-run steps: the rows each sequence keeps, copied
            final_picks: dict[Sequence, int] = {}
            for j in range(pieces):
                chunks, owners = [], []
                for (seq, ids, parents), (row, adopted, _, _) in zip(items, plans):
                    lo = adopted + j * self.max_chunk
                    if lo < len(ids):
                        hi = min(lo + self.max_chunk, len(ids))
                        every = isinstance(seq, TreeSequence) or seq in score
                        chunks.append(self._chunk(seq, row, ids, parents, lo, hi, seq in pick and hi == len(ids),
                                                  every))
                        owners.append((seq, hi - lo if every else 1, every or hi == len(ids)))
                logits, tokens, picks = self.runner.ragged(chunks, max(c.row for c in chunks) + 1)
                self._counts["runs"] += 1
                rows, picked, r, g = {}, {}, 0, 0
                for (seq, k, keep), c in zip(owners, chunks):
                    if c.pick and picks is not None:   # the graph picked it: no logits row
                        if keep:
                            picked[seq] = int(picks[g])
                        g += 1
                        continue
                    if keep:
                        rows[seq] = slice(r, r + k)
                    r += k
                for seq in pick - picked.keys():        # no filtered head (or set aside at load): the row's ArgMax
                    if seq in rows:
                        picked[seq] = int(tokens[rows.pop(seq)][-1])
                if pieces == 1:
                    result = StepOutput(logits, tokens, rows, picked, score)
                else:
                    for seq, sl in rows.items():
                        kept.setdefault(seq, []).append((np.array(logits[sl]), np.array(tokens[sl])))
                    final_picks.update(picked)
            if pieces > 1:
                result = joined(kept, final_picks, self.manifest.vocab_size, score)
            self._commit(items, plans)
            return result

    def _handles(self, what: str, given, items) -> set:
        try:
            handles = {given} if isinstance(given, Sequence) else set(given)
        except TypeError:
            raise InvalidInputError(f"{what} takes an iterable of Sequences, got {type(given).__name__}") from None
        if any(isinstance(s, TreeSequence) for s in handles) or not handles <= {seq for seq, _, _ in items}:
            raise InvalidInputError(f"{what} must name Sequences (not TreeSequences) that this step advances")
        return handles

    def _chunk(self, seq, row, ids, parents, lo, hi, pick: bool = False, every: bool = False) -> Chunk:
        """Tokens [lo, hi) of a sequence's new ids as one run's chunk (a tree: with positions = depths
        and its ancestor mask); every: a logits row for each token."""
        if not isinstance(seq, TreeSequence):
            return Chunk(row, ids[lo:hi], seq.position + lo, all_logits=every, pick=pick)
        depths = seq.new_depths(parents[:hi])[lo:hi]
        anc = seq.ancestors(list(parents[:hi]), seq.position)[lo:hi]       # [hi - lo, position + hi]
        return Chunk(row, ids[lo:hi], seq.position + lo, positions=depths, all_logits=True, ancestors=anc)

    def _commit(self, items, plans) -> None:
        """After every run succeeded: adoption, lengths, tokens, index; no step can fail from here."""
        for (seq, _, _), plan in zip(items, plans):
            if plan.tokens:
                self._commit_adoption(seq, plan)
        lengths = self.cache.lengths.copy()
        for seq, ids, parents in items:
            lengths[seq.state.slot] = seq.position + len(ids)
            seq.state.tokens.extend(int(t) for t in ids)
            if parents is not None:
                for p in parents:
                    seq.state.parents.append(int(p))
                    seq.state.depths.append(0 if p < 0 else seq.state.depths[p] + 1)
            elif len(ids) > 1:     # prompts are indexed as they are fed, decode tokens at release
                self.prefix_cache.insert(seq.state.slot, seq.state.tokens)     # (no per-token index work)
        self.cache.commit(lengths)

    # -- validation ------------------------------------------------------------------------------
    def _check_live(self, seq) -> None:
        if not isinstance(seq, Sequence):
            raise InvalidInputError(f"expected a Sequence handle from this Engine, got {type(seq).__name__}")
        if seq.state.released:
            raise InvalidInputError(f"{seq!r} was released; its handle can no longer be used")
        if self._live.get(seq.state.slot) is not seq:
            raise InvalidInputError(f"{seq!r} does not belong to this Engine")

    def check_ids(self, ids, what: str = "ids", seq: Sequence | None = None) -> np.ndarray:
        """Validated token ids as a 1-D int64 array (InvalidInputError naming `what` of `seq` otherwise)."""
        def name() -> str:                      # formatted only for an error (a step checks every sequence)
            return what if seq is None else f"{what} for {seq!r}"
        a = token_ids(ids, self.manifest.vocab_size, name)
        if a.ndim != 1:
            raise InvalidInputError(f"{name()} must be a 1-D sequence of token ids, got shape {a.shape}")
        return a

    def _check_feeds(self, feeds):
        pairs = list(feeds.items()) if isinstance(feeds, Mapping) else None
        if pairs is None:
            try:
                pairs = [tuple(p) for p in feeds]
            except TypeError:
                raise InvalidInputError(f"step() takes {{handle: ids}} or (handle, ids) pairs, got "
                                        f"{type(feeds).__name__}") from None
            if any(len(p) != 2 for p in pairs):
                raise InvalidInputError("step() takes (handle, ids) pairs")
        if not pairs:
            raise InvalidInputError("step() needs at least one sequence and its ids")
        items, seen = [], set()
        for seq, ids in pairs:
            self._check_live(seq)
            if seq.id in seen:
                raise InvalidInputError(f"{seq!r} is given twice in one step; give each sequence once, with all "
                                        "its new ids")
            seen.add(seq.id)
            parents = None
            if isinstance(seq, TreeSequence):
                nodes = ids if isinstance(ids, Nodes) else Nodes(ids)
                toks = self.check_ids(nodes.tokens, "the nodes' tokens", seq)
                parents = seq.check_parents(nodes.parents, toks.size)
                depth = seq.new_depths(parents)
                if depth.size and int(depth.max()) >= self.manifest.max_positions:
                    raise CapacityError(f"a node of depth {int(depth.max())} is past the model's position limit "
                                        f"({self.manifest.max_positions})")
                ids = toks
            elif isinstance(ids, Nodes):
                raise InvalidInputError(f"{seq!r} is a Sequence: give it ids; Nodes are for a TreeSequence "
                                        "(Engine.new_tree())")
            else:
                ids = self.check_ids(ids, "the ids", seq)
            rows_fit(seq.position + ids.size, self.max_seq_len, lambda: (
                f"{ids.size} token(s) at position {seq.position} of {seq!r}",
                f"a sequence of this Engine (max_seq_len={self.max_seq_len})", "release or truncate it, or construct "
                f"the Engine with a larger max_seq_len (model limit {self.manifest.max_positions})"))
            items.append((seq, ids, parents))
        return items

    # -- reporting -------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        """Counters: sequences, prefix hits, prefix tokens reused, evictions, forks, runs, speculative
        decode steps, draft tokens verified and accepted."""
        c, p = self._counts, self.prefix_cache.stats
        return {"sequences": c["sequences"], **p, "forks": c["forks"], "runs": c["runs"],
                "speculative_steps": self.speculation.steps, "draft_tokens": self.speculation.drafts,
                "accepted_tokens": self.speculation.kept}

    def memory_profile(self) -> EngineMemoryProfile:
        with self.lock:
            m, c, pc = self.manifest, self.cache, self.prefix_cache
            per_token = m.cache_bytes_per_token
            live = [int(c.lengths[s]) for s in self._live]
            retained = [int(c.lengths[s]) for s in pc.retained]
            return EngineMemoryProfile(
                device=self.model.device, dtype=m.kv_dtype, total_bytes=c.nbytes, used_bytes=sum(live) * per_token,
                retained_bytes=sum(retained) * per_token, slots=self.max_sequences,
                occupied_slots=len(live) + len(retained), rows_per_slot=self.capacity,
                index_bytes=(len(live) + len(retained)) * 16 + c.lengths.nbytes + pc.nbytes,
                io_buffer_bytes=self.runner.io_bytes, active_sequences=len(live), total_tokens=sum(live),
                retained_sequences=len(retained), retained_tokens=sum(retained), bytes_per_token=per_token,
                prefix_hits=pc.stats["prefix_hits"], prefix_tokens_reused=pc.stats["prefix_tokens_reused"],
                evictions=pc.stats["evictions"],
                draft_cache_bytes=sum(r.speculation.drafter.nbytes for r in self.scheduler.running
                                      if r.speculation is not None),
                draft_tokens=self.speculation.drafts, accepted_tokens=self.speculation.kept,
                speculative_steps=self.speculation.steps)

    def __repr__(self) -> str:
        return (f"Engine(max_sequences={self.max_sequences}, max_seq_len={self.max_seq_len}, live={len(self._live)}, "
                f"retained={len(self.prefix_cache.retained)}, {self.model!r})")
