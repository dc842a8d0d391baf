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
cache byte that anything can read as it was. Continuous batching over this (submit, generate,
stream) is in batching.py.
"""
from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .scheduler import Scheduler
from ..runtime.cache import make_cache
from ..errors import CapacityError, InvalidInputError, KVCacheError, ModelFormatError
from ..runtime.metrics import EngineMemoryProfile
from ..runtime.model import Model
from .prefix_cache import RadixIndex
from ..runtime.runs import Chunk, PackedRun
from .sequence import Nodes, Sequence, TreeSequence


def _int_arg(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


class StepOutput:
    """What one Engine.advance() produced: per sequence, its logits rows and greedy next tokens (for a
    sequence advanced with pick: its greedy next token only). Views into reused buffers, valid until
    the engine's next run; copy what you keep."""

    def __init__(self, logits: np.ndarray, tokens: np.ndarray, rows: dict[Sequence, slice],
                 picks: dict[Sequence, int] | None = None):
        self._logits, self._tokens, self._rows, self._picks = logits, tokens, rows, picks or {}

    def __contains__(self, seq: Sequence) -> bool:
        return seq in self._rows or seq in self._picks

    def __iter__(self):
        return iter([*self._rows, *self._picks])

    def logits(self, seq: Sequence) -> np.ndarray:
        """float32 [V] for a Sequence (its last new token), [n, V] for a TreeSequence (each new node)."""
        if seq in self._picks:
            raise KVCacheError("this sequence was advanced with pick (its greedy next token only): it has no "
                               "logits row; advance it without pick to get logits")
        rows = self._logits[self._rows[seq]]
        return rows if isinstance(seq, TreeSequence) else rows[0]

    def next_token(self, seq: Sequence) -> int:
        """The greedy next token of a Sequence (the graph's ArgMax or, with pick, its filtered exact
        pick: no logits row is read)."""
        if seq in self._picks:
            return self._picks[seq]
        return int(self._tokens[self._rows[seq]][-1])

    def next_tokens(self, seq: Sequence) -> np.ndarray:
        """The greedy next token of each new token's row ([1] for a Sequence)."""
        if seq in self._picks:
            return np.array([self._picks[seq]], np.int64)
        return self._tokens[self._rows[seq]]


class Engine:
    """Many sequences, one cache, one ONNX Runtime run per step.

    Args:
        model: a Model (weights shared with anything else using it) or a path to load one from.
        max_sequences: slots (live plus retained sequences at once).
        max_seq_len: tokens one sequence may hold (default and bound: the model's position limit).
        max_chunk: longest chunk a run feeds one sequence; longer chunks run as several runs
            (chunked prefill). Each slot carries max_chunk - 1 rows of padding room.
        prefix_cache: retain released sequences and reuse indexed prefixes (token granularity).
        prefill_budget: prompt tokens the request scheduler feeds per step (default max_chunk).
        device, device_id, intra_op_threads, session_options: as for Model, when a path is given.
    """

    def __init__(self, model: Model | str | Path, *, max_sequences: int = 16, max_seq_len: int | None = None,
                 max_chunk: int = 64, prefix_cache: bool = True, prefill_budget: int | None = None,
                 device: str | None = None, device_id: int = 0, intra_op_threads: int | None = None,
                 session_options: ort.SessionOptions | None = None):
        max_sequences = _int_arg("max_sequences", max_sequences)
        max_chunk = _int_arg("max_chunk", max_chunk)
        if isinstance(model, Model):
            if device is not None and device != model.device:
                raise InvalidInputError(f"device={device!r} but the Model was loaded for {model.device!r}; "
                                        "load the Model with the device you want")
        else:
            model = Model(model, device=device or "cpu", device_id=device_id,
                          intra_op_threads=intra_op_threads, session_options=session_options)
        m = model.manifest
        if m.tokens != "packed":
            raise ModelFormatError(
                f"{model.dir} is a {m.tokens}-token graph ({m.source}), which runs all rows of a batch in lockstep; "
                "the Engine needs a packed-token graph (kvcache-infer manifest format 2). Re-export it: "
                f"`python -m export --model CHECKPOINT --out NEW_DIR` (or `--config NAME` for random weights). "
                "KVCacheInferencer still runs this model")
        if max_seq_len is None:
            max_seq_len = m.max_positions
        max_seq_len = _int_arg("max_seq_len", max_seq_len)
        if max_seq_len > m.max_positions:
            raise InvalidInputError(f"max_seq_len={max_seq_len} exceeds the model's position limit "
                                    f"max_positions={m.max_positions}; use max_seq_len <= {m.max_positions}")
        self.model, self.manifest = model, m
        self.max_sequences, self.max_seq_len = max_sequences, max_seq_len
        self.max_chunk = min(max_chunk, max_seq_len)
        self.capacity = max_seq_len + self.max_chunk - 1          # rows per slot, padding room included
        self.cache = make_cache(m, max_sequences, self.capacity, model.device, model.device_id,
                                fix="lower max_sequences, max_seq_len or max_chunk")
        self.runner = PackedRun(model, self.cache, max_chunk=self.max_chunk, max_logits=max(max_sequences, 64))
        self.prefix_cache = bool(prefix_cache)
        self.index = RadixIndex()                 # live and retained rows' tokens (live: prompts as fed)
        self._live: dict[int, Sequence] = {}      # slot -> its live sequence
        self._retained: OrderedDict[int, None] = OrderedDict()   # retained slots, least recently used first
        self._ids = itertools.count()
        self.lock = threading.RLock()             # held by every engine call (and by a whole scheduler tick)
        self.stats = {"sequences": 0, "prefix_hits": 0, "prefix_tokens_reused": 0, "evictions": 0, "forks": 0, "runs": 0}
        self.scheduler = Scheduler(self, prefill_budget=prefill_budget or self.max_chunk)

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
        self.stats["sequences"] += 1
        return seq

    def _free_slot(self, exclude: int | None = None) -> int:
        """The lowest free slot (keeps the bound slot range short), else the least recently used
        retained one; changes nothing."""
        busy = set(self._live) | set(self._retained)
        for s in range(self.max_sequences):
            if s not in busy:
                return s
        for s in self._retained:
            if s != exclude:
                return s
        raise CapacityError(f"all {self.max_sequences} slots hold live sequences (max_sequences="
                            f"{self.max_sequences}); release() one, or construct the Engine with a larger "
                            "max_sequences")

    def _claim(self, slot: int) -> None:
        """Makes `slot` empty and unindexed (evicting a retained sequence if it held one)."""
        if slot in self._retained:
            del self._retained[slot]
            self.stats["evictions"] += 1
        self.index.remove(slot)
        self.cache.truncate(0, [slot])

    def release(self, seq: Sequence) -> None:
        """Ends a sequence. With prefix_cache its slot is retained (its tokens stay indexed for reuse
        until the slot is needed); otherwise, and for trees, the slot is free at once."""
        with self.lock:
            self._check_live(seq)
            slot = seq.state.slot
            del self._live[slot]
            seq.state.released = True
            if self.prefix_cache and not isinstance(seq, TreeSequence) and seq.position > 0:
                self.index.set(slot, seq.state.tokens)
                self._retained[slot] = None
            else:
                self.index.remove(slot)
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
                if isinstance(node, bool) or not isinstance(node, (int, np.integer)) or not 0 <= node < seq.position:
                    raise InvalidInputError(f"node must be an int in [0, {seq.position}), got {node!r}")
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
                path = seq.path(int(node))
                self.cache.copy_rows(seq.state.slot, slot, len(path), src_rows=path)
                self.cache.truncate(len(path), [slot])
                new.state.tokens = [seq.state.tokens[i] for i in path]
            self._live[slot] = new
            self.stats["forks"] += 1
            return new

    def truncate(self, seq: Sequence, length: int) -> None:
        """Keeps the first `length` tokens (nodes, for a tree) of `seq`; O(1), nothing is cleared."""
        with self.lock:
            self._check_live(seq)
            if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or not 0 <= length <= seq.position:
                raise InvalidInputError(f"truncate(seq, length) needs an int in [0, position={seq.position}], "
                                        f"got {length!r}")
            length = int(length)
            self.cache.truncate(length, [seq.state.slot])
            del seq.state.tokens[length:]
            if isinstance(seq, TreeSequence):
                del seq.state.parents[length:], seq.state.depths[length:]
            elif seq.state.slot in self.index.entries:
                self.index.set(seq.state.slot, seq.state.tokens[:min(length, self.index.entries[seq.state.slot].size)])

    @property
    def live(self) -> list[Sequence]:
        return [self._live[s] for s in sorted(self._live)]

    # -- prefix reuse ----------------------------------------------------------------------------
    def match_length(self, tokens) -> int:
        """How many leading tokens of `tokens` a new sequence would adopt instead of running (at most
        len(tokens) - 1: the last token must run to give logits). 0 without prefix_cache."""
        with self.lock:
            toks = np.asarray(tokens, dtype=np.int64)
            if not self.prefix_cache or toks.size < 2:
                return 0
            return self.index.match(toks[:-1])[1]

    def _plan_adoption(self, seq: Sequence, ids: np.ndarray, keep_last: bool = True, taken: set | None = None):
        """(row the run writes, tokens adopted, source slot, take over?) for a sequence at position 0;
        keep_last leaves the last token to run (its logits are wanted). Copies the adopted rows into
        seq's own slot when not taking over: rows past its length 0, invisible until committed. A
        retained slot in `taken` (taken over by another sequence of the same step) is copied from."""
        if not self.prefix_cache or seq.position or isinstance(seq, TreeSequence) or ids.size < 1 + keep_last:
            return seq.state.slot, 0, None, False
        src, n = self.index.match(ids[:-1] if keep_last else ids)
        if src is None or n == 0:
            return seq.state.slot, 0, None, False
        takeover = src in self._retained and self.index.entries[src].size == n and src not in (taken or ())
        if takeover and taken is not None:
            taken.add(src)
        if not takeover:
            self.cache.copy_rows(src, seq.state.slot, n)
        return (src if takeover else seq.state.slot), n, src, takeover

    def _commit_adoption(self, seq: Sequence, row: int, n: int, src: int, takeover: bool) -> None:
        if takeover:                                 # seq moves into the retained slot; its own is free
            del self._retained[src]
            self.index.remove(src)
            del self._live[seq.state.slot]
            self.cache.truncate(0, [seq.state.slot])
            seq.state.slot = row
            self._live[row] = seq
        self.stats["prefix_hits"] += 1
        self.stats["prefix_tokens_reused"] += n

    def reuse_prefix(self, seq: Sequence, tokens, keep_last: bool = True) -> int:
        """Lets an empty sequence adopt the longest indexed prefix of `tokens` without running anything
        (at most len - 1 tokens with keep_last, so that the last one still runs and gives logits);
        returns how many tokens it now holds. The scheduler calls this before a request's first prompt
        chunk, so that a prefix longer than one chunk is reused whole."""
        with self.lock:
            self._check_live(seq)
            if seq.position:
                raise InvalidInputError(f"reuse_prefix() needs an empty sequence; this one holds {seq.position} tokens")
            ids = self.check_ids(tokens, "tokens")
            row, n, src, takeover = self._plan_adoption(seq, ids, keep_last)
            if n:
                self.cache.truncate(n, [row])
                self._commit_adoption(seq, row, n, src, takeover)
                seq.state.tokens = [int(t) for t in ids[:n]]
                self.index.set(seq.state.slot, seq.state.tokens)
            return n

    # -- steps -----------------------------------------------------------------------------------
    def step(self, feeds) -> dict[Sequence, np.ndarray]:
        """Advances each given sequence by its own ids, all in one batched run (several runs only when
        a chunk is longer than max_chunk). feeds: {handle: ids} or (handle, ids) pairs; ids a 1-D
        sequence of ints, or Nodes for a TreeSequence. Returns {handle: float32 [V] logits of its last
        new token} ([n, V], one row per new node, for a TreeSequence): fresh arrays the caller owns."""
        out = self.advance(feeds)
        return {seq: np.array(out.logits(seq)) for seq in out}

    def advance(self, feeds, pick=()) -> StepOutput:
        """step() without the copies: a StepOutput of views (logits rows, greedy next tokens). pick: the
        Sequences (not trees) that need only their greedy next token: with a graph that has the
        filtered greedy head (export --greedy-head) their logits rows are not computed; their
        StepOutput.logits() raises either way. Worth it for one or two picked sequences (on GPT-2
        small, 2 threads: a run of one sequence 22.0 ms against 23.3); slower from ~4 (16 sequences:
        61.8 against 49.1), which is why the Scheduler does not pick. A sequence's pick equals its
        logits' argmax except in float-rounding near-ties, so picking is not bitwise batch invariant
        across runs that pick and runs that do not."""
        with self.lock:
            items = self._check_feeds(feeds)
            try:
                pick = {pick} if isinstance(pick, Sequence) else set(pick)
            except TypeError:
                raise InvalidInputError(f"pick takes an iterable of Sequences, got {type(pick).__name__}") from None
            trees = [s for s in pick if isinstance(s, TreeSequence)]
            if trees or not pick <= {seq for seq, _, _ in items}:
                raise InvalidInputError("pick must name Sequences (not TreeSequences) that this step advances")
            taken: set[int] = set()
            plans = [self._plan_adoption(seq, ids, True, taken) if parents is None else (seq.state.slot, 0, None, False)
                     for seq, ids, parents in items]
            pieces = max(-(-(len(ids) - plan[1]) // self.max_chunk) for (_, ids, _), plan in zip(items, plans))
            kept: dict[Sequence, list] = {}      # multi-run steps: the rows each sequence keeps, copied
            final_picks: dict[Sequence, int] = {}
            for j in range(pieces):
                chunks, owners = [], []
                for (seq, ids, parents), (row, adopted, _, _) in zip(items, plans):
                    lo = adopted + j * self.max_chunk
                    if lo < len(ids):
                        hi = min(lo + self.max_chunk, len(ids))
                        chunks.append(self._chunk(seq, row, ids, parents, lo, hi, seq in pick and hi == len(ids)))
                        tree = isinstance(seq, TreeSequence)
                        owners.append((seq, hi - lo if tree else 1, tree or hi == len(ids)))
                logits, tokens, picks = self.runner.ragged(chunks, max(c.row for c in chunks) + 1)
                self.stats["runs"] += 1
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
                    result = StepOutput(logits, tokens, rows, picked)
                else:
                    for seq, sl in rows.items():
                        kept.setdefault(seq, []).append((np.array(logits[sl]), np.array(tokens[sl])))
                    final_picks.update(picked)
            if pieces > 1:
                order = list(kept)
                sizes = [sum(len(t) for _, t in kept[s]) for s in order]
                ends = np.cumsum(sizes)
                V = self.manifest.vocab_size
                result = StepOutput(np.concatenate([lg for s in order for lg, _ in kept[s]] or [np.zeros((0, V), np.float32)]),
                                    np.concatenate([t for s in order for _, t in kept[s]] or [np.zeros(0, np.int64)]),
                                    {s: slice(int(e - k), int(e)) for s, k, e in zip(order, sizes, ends)},
                                    final_picks)
            self._commit(items, plans)
            return result

    def _chunk(self, seq, row, ids, parents, lo, hi, pick: bool = False) -> Chunk:
        """Tokens [lo, hi) of a sequence's new ids as one run's chunk (a tree: with positions = depths
        and its ancestor mask)."""
        if not isinstance(seq, TreeSequence):
            return Chunk(row, ids[lo:hi], seq.position + lo, pick=pick)
        depths = seq.new_depths(parents[:hi])[lo:hi]
        anc = seq.ancestors(list(parents[:hi]), seq.position)[lo:hi]       # [hi - lo, position + hi]
        return Chunk(row, ids[lo:hi], seq.position + lo, positions=depths, all_logits=True, ancestors=anc)

    def _commit(self, items, plans) -> None:
        """After every run succeeded: adoption, lengths, tokens, index; no step can fail from here."""
        for (seq, _, _), plan in zip(items, plans):
            if plan[1]:
                self._commit_adoption(seq, *plan)
        lengths = self.cache.lengths.copy()
        for seq, ids, parents in items:
            lengths[seq.state.slot] = seq.position + len(ids)
            seq.state.tokens.extend(int(t) for t in ids)
            if parents is not None:
                for p in parents:
                    seq.state.parents.append(int(p))
                    seq.state.depths.append(0 if p < 0 else seq.state.depths[p] + 1)
            elif self.prefix_cache and len(ids) > 1:     # prompts are indexed as they are fed, decode
                self.index.set(seq.state.slot, seq.state.tokens)   # tokens at release (no per-token index work)
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
        def bad(msg: str) -> InvalidInputError:
            return InvalidInputError(msg.format(what=what if seq is None else f"{what} for {seq!r}"))
        try:
            a = ids if isinstance(ids, np.ndarray) else np.asarray(ids)
        except (ValueError, TypeError, OverflowError) as e:
            raise bad(f"{{what}} must be a 1-D sequence of ints; could not read {type(ids).__name__}: {e}") from None
        if a.ndim != 1 or a.size == 0:
            raise bad(f"{{what}} must be a non-empty 1-D sequence of token ids, got shape {a.shape}")
        if a.dtype.kind not in "iu":
            raise bad(f"{{what}} must be integers, got dtype {a.dtype}; ids are never converted silently: cast "
                      "them yourself if that is what you mean")
        V = self.manifest.vocab_size
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= V:
            raise bad(f"token id {lo if lo < 0 else hi} in {{what}} is outside the vocabulary [0, {V})")
        return a.astype(np.int64, copy=False)

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
            if seq.position + ids.size > self.max_seq_len:
                raise CapacityError(
                    f"{ids.size} token(s) at position {seq.position} of {seq!r} would exceed max_seq_len="
                    f"{self.max_seq_len}; release or truncate it, or construct the Engine with a larger "
                    f"max_seq_len (model limit {self.manifest.max_positions})")
            items.append((seq, ids, parents))
        return items

    # -- continuous batching (batching.Scheduler) --------------------------------------------------
    def make_request(self, prompt, max_new_tokens: int = 64, **sampling):
        """A validated Request, not yet queued (enqueue() queues it). sampling: temperature, top_k,
        top_p, seed, stop_ids."""
        return self.scheduler.make_request(prompt, max_new_tokens, **sampling)

    def enqueue(self, requests) -> None:
        """Queues requests made with make_request(); they run in the next ticks."""
        self.scheduler.enqueue(list(requests))

    @property
    def waiting_requests(self) -> int:
        """Requests queued and not yet admitted into a slot."""
        return len(self.scheduler.waiting)

    @property
    def running_requests(self) -> int:
        """Requests admitted into a slot and not yet finished."""
        return len(self.scheduler.running)

    @property
    def busy(self) -> bool:
        """Whether any submitted request is waiting or running."""
        return self.scheduler.busy

    def submit(self, prompt, max_new_tokens: int = 64, **sampling):
        """Queues a request (see Scheduler.submit); returns its Request handle."""
        return self.scheduler.submit(prompt, max_new_tokens, **sampling)

    def tick(self):
        """One scheduler step over the submitted requests: [(request, new token)] (see batching.py)."""
        return self.scheduler.tick()

    def cancel(self, request) -> None:
        """Stops a submitted request at the next tick; its slot is freed."""
        self.scheduler.cancel(request)

    def generate(self, prompts, max_new_tokens=64, **sampling):
        """Runs every prompt to completion with continuous batching; outputs in prompt order (id lists
        for id prompts, text for text prompts)."""
        return self.scheduler.generate(prompts, max_new_tokens, **sampling)

    def stream(self, prompts, max_new_tokens=64, **sampling):
        """Yields (request, token) as tokens are produced (text pieces for text prompts)."""
        return self.scheduler.stream(prompts, max_new_tokens, **sampling)

    # -- reporting -------------------------------------------------------------------------------
    def memory_profile(self) -> EngineMemoryProfile:
        with self.lock:
            m, c = self.manifest, self.cache
            per_token = m.cache_bytes_per_token
            lengths = c.lengths
            live = [int(lengths[s]) for s in self._live]
            retained = [int(lengths[s]) for s in self._retained]
            occupied = len(live) + len(retained)
            slot_table = (len(self._live) + len(self._retained)) * 16 + c.lengths.nbytes
            return EngineMemoryProfile(
                device=self.model.device, dtype=m.kv_dtype, total_bytes=c.nbytes, used_bytes=sum(live) * per_token,
                retained_bytes=sum(retained) * per_token, physical_blocks=self.max_sequences,
                logical_blocks=occupied, rows_per_block=self.capacity, page_table_bytes=slot_table + self.index.nbytes,
                allocator_bytes=self.runner.io_bytes, active_sequences=len(live), total_tokens=sum(live),
                retained_sequences=len(retained), retained_tokens=sum(retained), bytes_per_token=per_token,
                prefix_hits=self.stats["prefix_hits"], prefix_tokens_reused=self.stats["prefix_tokens_reused"],
                evictions=self.stats["evictions"])

    def __repr__(self) -> str:
        return (f"Engine(max_sequences={self.max_sequences}, max_seq_len={self.max_seq_len}, live={len(self._live)}, "
                f"retained={len(self._retained)}, {self.model!r})")
