"""Bound runs: the objects that know which buffers a kind of graph run binds and what to write per call.

    PaddedRun   graphs whose ids are [B, S] (format 1, and Optimum's growing layout): rows in lockstep
    PackedRun   packed-token graphs (format 2): any rows, any chunk lengths, logits only where asked;
                a greedy lockstep run of a graph with greedy_index asks for no logits at all (R = 0)

Both offer `lockstep(ids [B, n], greedy, all_positions)` (what KVCacheInferencer needs); PackedRun
also offers `ragged(chunks, rows)` (what the Engine needs). The hot path writes ids, positions and
lengths into preallocated arrays bound by address, runs, and returns what the caller asked for;
bindings change only when a run's shapes change. A run never commits: the caller moves the cache
lengths after it succeeded.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from .buffers import DeviceBuffer, HostArray
from .cache import KVCache
from ..errors import InferenceError, KVCacheError, NonFiniteError
from .manifest import DTYPES
from .model import Model


# Greedy lockstep runs of up to this many rows pick through the filtered head (greedy_index); more rows
# compute their logits rows and take the graph's ArgMax. The filter's int8 MatMulNBits does not scale
# with rows on an AVX2 CPU without VNNI (GPT-2 small's head, 2 threads: 1 row 4.0 ms against 6.5 for
# the fp32 head and its ArgMax, 2 rows 4.7 against 8.1, 4 rows 8.1 against 7.5, 16 rows 30.7 against
# 14.1).
MAX_PICK_ROWS = 2

# Bindings kept per PackedRun, one per run shape: a speculative sequence alternates one-token steps
# with verifications of 2 .. MAX_DRAFTS + 1 tokens; rebinding ~20 inputs costs ~0.06 ms a run.
IO_BINDINGS = 12

# A greedy lockstep run that wants every position's token (verifying guesses) picks them through the
# filtered head when it has at most this many tokens. On a Zen 4 CPU (AVX-512 VNNI) the filter scales
# with rows, unlike the AVX2 figures above: GPT-2 small, 2 threads, a verifying run of 2 / 5 / 9 tokens
# took 17.5 / 18.6 / 22.6 ms with fp32 logits rows and their ArgMax, 15.0 / 17.4 / 21.8 with picks
# (one-off, in one process).
MAX_VERIFY_PICKS = 9


def run_bound(model: Model, io: ort.IOBinding, what: str) -> None:
    try:
        model.session.run_with_iobinding(io)
    except Exception as e:
        raise InferenceError(f"ONNX Runtime failed running {what}: {e}; the cache and position are unchanged") from e


class BoundRun(ABC):
    """What a KVCacheInferencer runs: every row advances by the same n tokens."""

    def __init__(self, model: Model, cache: KVCache):
        self.model, self.cache, self.m = model, cache, model.manifest

    @abstractmethod
    def lockstep(self, ids: np.ndarray, greedy: bool, all_positions: bool = False) -> np.ndarray:
        """Runs [B, n] ids at every row's current length. Returns a fresh array: [B] int64 greedy next
        tokens, or float32 logits [B, V] (last position) or [B, n, V] (all_positions). Does not commit."""

    def fill(self, ids: np.ndarray) -> None:
        """Runs [B, n] ids at every row's current length for their cache rows only (a prompt's
        leading chunk): graphs that can skip the head skip it. Does not commit."""
        self.lockstep(ids, greedy=False)

    @property
    @abstractmethod
    def io_bytes(self) -> int:
        """Bytes of the preallocated per-run input/output buffers."""


class PaddedRun(BoundRun):
    """Graphs with [B, S] ids and positions whose logits are [B, S, V]. The one-token step binds
    fixed buffers once; multi-token chunks bind their inputs per call."""

    def __init__(self, model: Model, cache: KVCache):
        super().__init__(model, cache)
        m, B, dev, did = self.m, cache.rows, model.device, model.device_id
        self._ids = DeviceBuffer((B, 1), np.int64, dev, did, fill=0)
        self._pos_ids = DeviceBuffer((B, 1), np.int64, dev, did, fill=0)
        self._logits = DeviceBuffer((B, 1, m.vocab_size), DTYPES[m.logits_dtype], dev, did)
        self._step_io = model.session.io_binding()
        self._step_io.bind_ortvalue_output(m.logits, self._logits.ortvalue)
        self._step_io.bind_ortvalue_input(m.input_ids, self._ids.ortvalue)
        if m.position_ids:
            self._step_io.bind_ortvalue_input(m.position_ids, self._pos_ids.ortvalue)
        cache.bind(self._step_io)
        self._chunk_io = model.session.io_binding()
        self._chunk_io.bind_output(m.logits, dev, did)
        cache.bind(self._chunk_io)
        # Greedy steps and chunks fetch only the in-graph argmax (no logits row leaves the graph).
        self._token = None
        if m.next_token:
            self._token = DeviceBuffer((B,), np.int64, dev, did, fill=0)
            self._greedy_step_io = model.session.io_binding()
            self._greedy_chunk_io = model.session.io_binding()
            for io in (self._greedy_step_io, self._greedy_chunk_io):
                io.bind_ortvalue_output(m.next_token, self._token.ortvalue)
                cache.bind(io)
            self._greedy_step_io.bind_ortvalue_input(m.input_ids, self._ids.ortvalue)
            self._greedy_step_io.bind_ortvalue_input(m.position_ids, self._pos_ids.ortvalue)
        self._host_step_ids = np.zeros((B, 1), np.int64)  # staging for CUDA's update_inplace
        self._host_step_pos = np.zeros((B, 1), np.int64)

    @property
    def io_bytes(self) -> int:
        return self._ids.nbytes + self._pos_ids.nbytes + self._logits.nbytes + self.cache.extra_bytes

    def lockstep(self, ids: np.ndarray, greedy: bool, all_positions: bool = False) -> np.ndarray:
        n = ids.shape[1]
        pos = self.cache.offset
        in_graph = greedy and self._token is not None and not all_positions
        if n == 1 and not all_positions:
            io = self._greedy_step_io if in_graph else self._step_io
            self._write_step_inputs(ids, pos)
        else:
            io = self._greedy_chunk_io if in_graph else self._chunk_io
            self._bind_chunk_inputs(io, ids, pos, logits=not in_graph)
        self.cache.prepare(io, n)
        run_bound(self.model, io, f"{n} token(s) at position {pos}")
        if in_graph:
            return np.array(self._token.to_host())                   # [B] int64
        if n == 1 and not all_positions:
            logits = self._logits.to_host()[:, 0]
        else:
            out = io.get_outputs()[0].numpy()
            logits = out if all_positions else out[:, -1]
        out = np.array(logits, dtype=np.float32)                      # a copy: the buffers are reused
        return out.argmax(-1) if greedy else out

    def _write_step_inputs(self, ids: np.ndarray, pos: int) -> None:
        if self._ids.host is not None:                  # CPU: the bound arrays are these numpy arrays
            self._ids.host[:] = ids
            self._pos_ids.host.fill(pos)
        else:                                           # CUDA: copy into the bound device buffers
            self._host_step_ids[:] = ids
            self._ids.ortvalue.update_inplace(self._host_step_ids)
            self._host_step_pos.fill(pos)
            self._pos_ids.ortvalue.update_inplace(self._host_step_pos)

    def _bind_chunk_inputs(self, io: ort.IOBinding, ids: np.ndarray, pos: int, logits: bool) -> None:
        m = self.m
        io.bind_cpu_input(m.input_ids, np.ascontiguousarray(ids, dtype=np.int64))
        if m.position_ids:
            positions = np.broadcast_to(np.arange(pos, pos + ids.shape[1], dtype=np.int64), ids.shape)
            io.bind_cpu_input(m.position_ids, np.ascontiguousarray(positions))
        if logits:
            io.bind_output(m.logits, self.model.device, self.model.device_id)  # the shape changes per call


class Chunk(NamedTuple):
    """One cache row's part of a ragged run."""

    row: int                                # cache row (the Engine's slot)
    ids: np.ndarray                         # [n] int64 new tokens
    start: int                              # tokens the row holds before the run (the write row)
    positions: np.ndarray | None = None     # [n] position ids (default start .. start + n - 1)
    all_logits: bool = False                # logits for every new token (default: the last one)
    ancestors: np.ndarray | None = None     # [n, start + n] bool: which tokens each new one may see (trees)
    pick: bool = False                      # only the last token's greedy next token, no logits row
                                            # (graphs with greedy_index; others compute the row anyway)


class PackedRun(BoundRun):
    """Packed-token graphs: a run feeds T tokens of any cache rows, padded to S per row only inside
    attention, and computes logits for R chosen tokens. Every input is a view of a preallocated
    array, bound by address; a run whose shapes equal the previous run's binds nothing.

    max_chunk: the longest chunk (S) a run may pad to; the cache capacity must leave room for it
    (GroupQueryAttention needs start + S <= capacity for every row that takes part).
    max_logits: logits rows kept in a preallocated buffer; a run asking for more (scoring every
    position of a long text) lets ONNX Runtime allocate its output."""

    def __init__(self, model: Model, cache: KVCache, *, max_chunk: int, max_logits: int):
        super().__init__(model, cache)
        m = self.m
        if m.tokens != "packed" or not cache.per_row:
            raise KVCacheError("PackedRun needs a packed-token graph with the in-place cache layout")
        rows, C = cache.rows, cache.capacity
        self.max_chunk, self.max_logits = max_chunk, max_logits
        self.max_tokens = rows * max_chunk
        self._ids = HostArray(self.max_tokens, np.int64)
        self._pos = HostArray(self.max_tokens, np.int64)
        self._cache_len = HostArray(rows, np.int32, fill=1)
        self._q_len = HostArray(rows, np.int32)
        self._padded = HostArray(rows * max_chunk, np.int64)
        self._cells = HostArray(2 * self.max_tokens, np.int64)      # (row, column) of each packed token
        self._keep = HostArray(self.max_tokens, np.int64)
        self._zero_bias = HostArray(max_chunk * C, m.np_dtype)       # never written: bound as [1,1,S,C]
        self._tree_bias: HostArray | None = None                      # [rows,1,S,C], made on first use
        self._big: tuple[HostArray, HostArray] | None = None           # outputs of a run with R > max_logits
        self._logits = HostArray(max_logits * m.vocab_size, np.float32)
        self._next = HostArray(max_logits, np.int64)
        # Graphs with greedy_index pick a greedy step's tokens without computing logits rows (G rows;
        # G = 0 in runs that want logits).
        # G rows; G = 0 in runs that want logits, and in every run when the load-time check set the filter
        # aside (model.greedy_pick). The int8 node's probe rows are bound empty.
        G = max(rows, 2, MAX_VERIFY_PICKS)
        self._greedy = (HostArray(G, np.int64), HostArray(G, np.int64)) if m.greedy_index else None
        self.picks = model.greedy_pick.filtered
        self._no_probe = HostArray(1, np.float32) if m.greedy_probe else None
        self._arange = np.arange(max(self.max_tokens, C + max_chunk), dtype=np.int64)   # positions, indices
        self._neg = np.finfo(m.np_dtype).min
        self.io: ort.IOBinding | None = None   # the bindings of the current run's shapes
        self._ios: OrderedDict[tuple, list] = OrderedDict()   # shapes -> [IOBinding, cache rows bound]
        self._views = (None, None, None)   # (R, logits [R,V], next tokens [R]) views of the outputs
        self._lockstep = None     # (B, n, all_positions, pick) whose constant inputs are in place

    @property
    def io_bytes(self) -> int:
        arrays = [self._ids, self._pos, self._cache_len, self._q_len, self._padded, self._cells, self._keep,
                  self._zero_bias, self._logits, self._next] + ([self._tree_bias] if self._tree_bias else [])
        arrays += list(self._greedy or ()) + list(self._big or ())
        return sum(a.nbytes for a in arrays)

    def _bind(self, T: int, B: int, S: int, R: int, tree: bool, G: int = 0) -> None:
        """Makes self.io the bindings for these shapes: one of the last IO_BINDINGS shapes' bindings as
        they are (runs that alternate shapes, as speculative decoding's steps and verifications do,
        bind nothing), else the least recently used one rebound."""
        key = (T, B, S, R, tree, G)
        entry = self._ios.get(key)
        if entry is not None:
            self._ios.move_to_end(key)
            self.io = entry[0]
            return
        if R > self.max_logits and (self._big is None or self._big[1].array.size < R):
            # more rows than preallocated (scoring a long text): grow-only buffers; bindings of the
            # old ones go
            self._big = (HostArray(R * self.m.vocab_size, np.float32), HostArray(R, np.int64))
            self._views = (None, None, None)
            for k in [k for k in self._ios if k[3] > self.max_logits]:
                del self._ios[k]
        if len(self._ios) < IO_BINDINGS:
            entry = [self.model.session.io_binding(), None]
        else:
            entry = self._ios.popitem(last=False)[1]
        self._ios[key] = entry
        m, io, C = self.m, entry[0], self.cache.capacity
        self._ids.bind_input(io, m.input_ids, [T])
        self._pos.bind_input(io, m.position_ids, [T])
        self._cache_len.bind_input(io, m.cache_lengths, [B])
        self._q_len.bind_input(io, m.query_lengths, [B])
        self._padded.bind_input(io, m.padded_tokens, [B, S])
        self._cells.bind_input(io, m.token_cells, [T, 2])
        self._keep.bind_input(io, m.logits_index, [R])
        bias = self._tree_bias if tree else self._zero_bias
        bias.bind_input(io, m.attention_bias, [B if tree else 1, 1, S, C])
        logits, nxt = self._big if R > self.max_logits else (self._logits, self._next)
        logits.bind_output(io, m.logits, [R, m.vocab_size])
        nxt.bind_output(io, m.next_token, [R])
        if self._greedy:
            self._greedy[0].bind_input(io, m.greedy_index, [G])
            self._greedy[1].bind_output(io, m.greedy_token, [G])
        if self._no_probe:
            self._no_probe.bind_input(io, m.greedy_probe, [0, m.hidden_size])
            self._no_probe.bind_output(io, m.greedy_probe_scores, [0, m.vocab_size])
        if entry[1] != B:
            self.cache.bind(io, B)
            entry[1] = B
        self.io = io

    def _outputs(self, R: int) -> tuple[np.ndarray, np.ndarray]:
        if self._views[0] != R:
            logits, nxt = self._big if R > self.max_logits else (self._logits, self._next)
            self._views = (R, logits.view((R, self.m.vocab_size)), nxt.view((R,)))
        return self._views[1], self._views[2]

    def fill(self, ids: np.ndarray) -> None:
        self.lockstep(ids, greedy=False, head=False)

    def lockstep(self, ids: np.ndarray, greedy: bool, all_positions: bool = False, head: bool = True) -> np.ndarray:
        B, n = ids.shape
        T, P = B * n, self.cache.offset
        pick = head and greedy and self.picks and B <= MAX_PICK_ROWS and (not all_positions or T <= MAX_VERIFY_PICKS)
        R = 0 if not head or pick else T if all_positions else B        # logits rows (none when picking)
        G = (T if all_positions else B) if pick else 0
        if n > self.max_chunk:
            raise KVCacheError(f"a chunk of {n} tokens is longer than this run's max_chunk={self.max_chunk}")
        if self._lockstep != (B, n, all_positions, pick, head):
            ar = self._arange
            self._padded.array[:T] = ar[:T]
            cells = self._cells.view((B, n, 2))
            cells[..., 0] = ar[:B, None]
            cells[..., 1] = ar[:n]
            last = ar[n - 1:T:n]                                        # each row's last token
            if pick:
                self._greedy[0].array[:G] = ar[:T] if all_positions else last
            elif head:
                self._keep.array[:R] = ar[:T] if all_positions else last
            self._q_len.array[:B] = n
            self._lockstep = (B, n, all_positions, pick, head)
        self._ids.array[:T] = ids.reshape(-1)
        if n == 1:
            self._pos.array[:T] = P
        else:
            self._pos.view((B, n))[:] = self._arange[P:P + n]
        self._cache_len.array[:B] = P + n
        self._bind(T, B, n, R, tree=False, G=G)
        run_bound(self.model, self.io, f"{n} token(s) at position {P}")
        if not head:
            return np.empty((B, 0), np.float32)
        if pick:
            return _checked(self._greedy[1].array[:G].copy(), f"{n} token(s) at position {P}")   # [B] int64
        logits, nxt = self._outputs(R)
        if greedy:
            return np.array(nxt)
        return np.array(logits).reshape(B, n, -1) if all_positions else np.array(logits)

    def ragged(self, chunks: list[Chunk], rows: int) -> tuple[np.ndarray, np.ndarray]:
        """One run over cache rows [0, rows): each chunk's tokens go to its row from its start on; rows
        without a chunk are idle (untouched, no cost in attention). Returns (logits [R, V], next tokens
        [R], picks [G]): logits rows and their argmax for the last token of each chunk (every token of
        an all_logits chunk), except pick chunks of a graph with greedy_index, whose greedy next tokens
        are the picks instead (None: no picks; pick chunks then get logits rows like the others); each
        in chunk order; views valid until the next run. Does not commit. Picks cost more than logits
        rows from ~4 rows on (MAX_PICK_ROWS): callers pick for few rows."""
        S = max(len(c.ids) for c in chunks)
        T = sum(len(c.ids) for c in chunks)
        if S > self.max_chunk or T > self.max_tokens:
            raise KVCacheError(f"a run of {T} tokens with a chunk of {S} exceeds max_chunk={self.max_chunk}")
        # Batch invariance: ONNX Runtime takes other kernel paths for one row (MatMulNBits, for the
        # tokens and for the logits rows, which alone go through the last layer's MLP and the
        # lm_head) and for a grid one column wide (GroupQueryAttention's decoding path), whose results
        # differ in the last bits, and int8-quantized activations (int4 graphs) turn that into ~1% of
        # the logits. So a run has at least 2 tokens (a copy of a lone token, reading its row's
        # attention output), 2 columns and 2 logits rows (the one repeated; callers see one): a row's
        # numbers do not depend on what else is in the run (max_chunk >= 2; with max_chunk=1 there is
        # no room for a second column and runs are not batch invariant). Likewise a run of one picked
        # row picks it twice.
        dummy = T == 1 and self.max_chunk >= 2
        if S == 1 and self.max_chunk >= 2:
            S = 2
        self._lockstep = None
        ar, C = self._arange, self.cache.capacity
        q, cl = self._q_len.view((rows,)), self._cache_len.view((rows,))
        pad = self._padded.view((rows, S))
        q[:] = 0
        cl[:] = 1                               # idle rows: 1 token held, 0 new (GQA: cache untouched)
        pad[:] = 0
        ids, pos, keep = self._ids.array, self._pos.array, self._keep.array
        cells = self._cells.view((T, 2))
        tree = any(c.ancestors is not None for c in chunks)
        if tree:
            if self._tree_bias is None:
                self._tree_bias = HostArray(self.cache.rows * self.max_chunk * C, self.m.np_dtype)
            bias = self._tree_bias.view((rows, 1, S, C))
            bias[:] = 0
        picks = self._greedy[0].array if self.picks else None
        off = r = gr = 0
        for c in chunks:
            n = len(c.ids)
            ids[off:off + n] = c.ids
            pos[off:off + n] = ar[c.start:c.start + n] if c.positions is None else c.positions
            q[c.row], cl[c.row] = n, c.start + n
            pad[c.row, :n] = ar[off:off + n]
            cells[off:off + n, 0] = c.row
            cells[off:off + n, 1] = ar[:n]
            if c.all_logits:
                keep[r:r + n] = ar[off:off + n]
                r += n
            elif c.pick and picks is not None:
                picks[gr] = off + n - 1
                gr += 1
            else:
                keep[r] = off + n - 1
                r += 1
            if c.ancestors is not None:
                bias[c.row, 0, :n, :c.start + n] = np.where(c.ancestors, 0, self._neg)
            off += n
        if dummy:
            T = 2
            ids[1], pos[1] = ids[0], pos[0]
            self._cells.view((T, 2))[1] = (chunks[0].row, 0)
        kept, picked = r, gr
        if r == 1 and self.max_logits >= 2 and self.max_tokens >= 2:
            keep[1], kept = keep[0], 2
        if r == 0 and gr == 1:
            picks[1], picked = picks[0], 2
        self._bind(T, rows, S, kept, tree, G=picked)
        run_bound(self.model, self.io, f"{T} token(s) over {len(chunks)} row(s)")
        logits, nxt = self._outputs(r)
        return logits, nxt, (_checked(self._greedy[1].array[:gr], f"{T} token(s) over {len(chunks)} row(s)") if gr
                             else None)


def _checked(picks: np.ndarray, what: str) -> np.ndarray:
    """The greedy head answers -1 for rows whose activations are not finite."""
    if (picks < 0).any():
        raise NonFiniteError(f"the model's activations are NaN or infinite at {int((picks < 0).sum())} of the "
                             f"{len(picks)} picked rows in a run of {what}: no greedy token exists; the cache and "
                             "positions are unchanged (check the model's weights and the inputs)")
    return picks
