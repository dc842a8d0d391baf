"""KVCacheInferencer: one sequence (or one lockstep batch) decoding against a resident KV cache."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .runtime.cache import make_cache
from .runtime.checks import int_arg, max_seq_len_arg, rows_fit
from .runtime.checks import token_ids as token_ids_arg
from .errors import ConcurrentUseError, InvalidInputError
from .runtime.generation import Sampler, check_request, decode, encode_prompt, stream_text
from .runtime.metrics import LatencyTracker, MemoryProfile, Metrics
from .runtime.model import Model, shared_model
from .runtime.runs import PackedRun, PaddedRun
from .runtime.snapshot import CacheSnapshot, check, take
from .runtime.speculative import MAX_DRAFTS, Proposer, Speculation, SpeculationTotals, accept, proposer_arg


class KVCacheInferencer:
    """Feeds tokens through a Model while its per-layer KV cache stays on the device.

    Args:
        model: a Model, or a path to build one from (then device/device_id/intra_op_threads apply).
        device: "cpu" or "cuda" (default: the Model's device, else "cpu").
        max_seq_len: cache capacity in tokens per sequence; default and upper bound: the model's
            position limit (manifest `max_positions`).
        batch_size: rows decoded in lockstep; every forward() gets exactly this many rows.
        prefill_chunk: a longer chunk of new tokens (a prompt) runs as several runs of at most this
            many tokens (packed-token graphs; one run for others). Attention computes each run's new tokens against
            every row before them, so one run of S tokens costs S x S scores and runs of c cost about
            S x S / 2 + S x c / 2; the matrix products cost the same. 256 is the fastest for GPT-2
            small's 512-token prompts on our CPU (docs/performance.md).

    What never changes after construction: the cache buffers (same device addresses until the
    object dies), the bound one-token step, the preallocated id/position/logits buffers.
    What changes, in place: forward() writes the new rows and advances the position;
    generate()/stream() do that once per token; truncate()/rewind()/reset_cache() move the position;
    restore() and fork() rewrite rows. Each call either completes or leaves the state as it was.
    """

    def __init__(self, model: Model | str | Path, *, device: str | None = None, device_id: int = 0,
                 max_seq_len: int | None = None, batch_size: int = 1, intra_op_threads: int | None = None,
                 session_options: ort.SessionOptions | None = None, prefill_chunk: int = 256):
        model = shared_model(model, device, device_id=device_id, intra_op_threads=intra_op_threads,
                             session_options=session_options)
        m = model.manifest
        self.model, self.manifest = model, m
        self.batch_size = int_arg("batch_size", batch_size)
        self.capacity = max_seq_len_arg(max_seq_len, m)
        self.prefill_chunk = int_arg("prefill_chunk", prefill_chunk)
        self._chunk = self.prefill_chunk if m.tokens == "packed" else self.capacity   # others: one run
        self.cache = make_cache(m, self.batch_size, self.capacity, model.device, model.device_id)
        # The bound runs of this graph kind: every call only writes ids/positions into their buffers.
        if m.tokens == "packed":
            self.runner = PackedRun(model, self.cache, max_chunk=self.capacity, max_logits=self.batch_size)
        else:
            self.runner = PaddedRun(model, self.cache)

        self._latency = LatencyTracker()
        self._speculation = SpeculationTotals()          # over every speculative call (runtime/speculative.py)
        self._busy = threading.Lock()  # one sequence: a second thread gets ConcurrentUseError

    # -- state ---------------------------------------------------------------------------------
    @property
    def position(self) -> int:
        """Tokens held per sequence; the next forward() writes from this row."""
        return self.cache.offset

    @property
    def device(self) -> str:
        return self.model.device

    def reset_cache(self) -> None:
        """Starts a new sequence: position 0, metrics cleared. Nothing is reallocated or cleared:
        rows at and past the position are never read, so nothing of the old sequence is visible."""
        with self._enter("reset_cache"):
            self.cache.reset()
            self._latency.reset()

    def truncate(self, length: int) -> None:
        """Keeps the first `length` tokens of every row; the next forward() writes from there.
        O(1) for the in-place layout, O(length) for the growing one. Nothing is reallocated."""
        with self._enter("truncate"):
            self.cache.truncate(int_arg("truncate(length)", length, 0, self.position, f" (position={self.position})"))

    def rewind(self, n: int) -> None:
        """Drops the last `n` tokens of every row (truncate(position - n))."""
        self.truncate(self.position - int_arg("rewind(n)", n, 0, self.position, f" (position={self.position})"))

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, stop_ids=(),
                 speculative: Proposer | str | None = None):
        """Feeds `prompt` after what the cache holds and returns the new tokens: a list of ids for an id
        prompt, a string for a text prompt (needs the model's tokenizer.json). temperature 0 is greedy
        (the next token comes from the graph: its filtered greedy head where the export has one, else
        its argmax; no logits row is copied). Stops after
        max_new_tokens or after a token in stop_ids (included). Each step is a forward(): on an error the
        cache holds the prompt and the tokens generated so far. Call reset_cache() first for a new sequence.

        speculative: "lookup" (prompt lookup), "draft:PATH" (a draft export with the same vocabulary) or a
        Proposer (runtime.speculative): each step also runs the tokens it guesses and keeps those the model
        agrees with (greedy: the same tokens as without; sampling: the same distribution). The number
        guessed adapts to how many were kept, down to none. Afterwards the cache holds what it would hold
        without speculation."""
        out = self.stream(prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                          stop_ids=stop_ids, speculative=speculative)
        return "".join(out) if isinstance(prompt, str) else list(out)

    def stream(self, prompt, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, stop_ids=(),
               speculative: Proposer | str | None = None):
        """Like generate(), as an iterator: new ids (int) for an id prompt, text pieces (str) for a text
        prompt. The request is validated before the first token; nothing runs until iteration starts."""
        if self.batch_size != 1:
            raise InvalidInputError(f"generate/stream decode one sequence (batch_size=1); this inferencer has "
                                    f"batch_size={self.batch_size}: use next_tokens() or forward() for batches")
        sampler = Sampler(temperature, top_k, top_p, seed, vocab=self.manifest.vocab_size)
        tok, prompt = encode_prompt(self.model, prompt)
        ids, _ = self._check_ids(prompt)
        stop = check_request(max_new_tokens, stop_ids, self.manifest.vocab_size)
        rows_fit(self.position + ids.shape[1] + max_new_tokens - 1,      # the last new token is not fed back
                 self.capacity, lambda: (f"{ids.shape[1]} prompt tokens + {max_new_tokens} new tokens at position "
                                         f"{self.position}", f"this inferencer (max_seq_len={self.capacity})",
                                         "shorten the prompt, lower max_new_tokens, or reset_cache()"))
        step = self.next_tokens if sampler.greedy else (lambda x: sampler(self.forward(x)))
        proposer = proposer_arg(speculative)
        if proposer is None:
            it = decode(step, ids[0], max_new_tokens, stop)
        else:
            proposer.check(self.model)
            it = self._speculate(step, sampler, proposer, ids[0], max_new_tokens, stop)
        return stream_text(tok, it) if tok is not None else it

    def _speculate(self, step, sampler: Sampler, proposer: Proposer, prompt: np.ndarray, max_new_tokens: int,
                   stop: frozenset):
        """decode() with guesses (runtime/speculative.py): each run feeds the last token and up to k
        drafts and yields the kept drafts plus the model's next token."""
        spec = Speculation(proposer, self._speculation)
        start, P = self.position, len(prompt)
        seq = np.empty(P + max_new_tokens + MAX_DRAFTS, np.int64)   # the prompt and the tokens so far
        seq[:P] = prompt
        L = P                                                        # tokens in seq
        try:
            seq[L] = step(prompt)
            L += 1
            yield int(seq[L - 1])
            while int(seq[L - 1]) not in stop and L - P < max_new_tokens:
                k = spec.next_length(max_new_tokens - (L - P) - 1)
                drafts = _drafts(spec.propose(seq[:L], k), k) if k else ()
                if not len(drafts):
                    new = [int(step(seq[L - 1:L]))]
                else:
                    feed = np.concatenate([seq[L - 1:L], drafts])[None]         # [1, 1 + k]
                    with self._enter("stream"):
                        self._check_ids(feed)
                        out = self._run(feed, sampler.greedy, all_positions=True)     # [(1,) n] tokens or [1, n, V]
                        new = accept(drafts, out.reshape(-1), None, sampler) if sampler.greedy else \
                            accept(drafts, None, out[0], sampler)
                        self.cache.truncate(self.position - (len(drafts) + 1 - len(new)))   # rejected rows
                    spec.verified(len(drafts), len(new) - 1)
                for t in new:
                    seq[L] = t
                    L += 1
                    yield t
                    if t in stop:
                        break
        finally:
            # hold what plain decoding holds: the prompt and every token yielded but the last (kept
            # guesses not yielded yet, when the caller stops early, are dropped)
            if self.position > start + L - 1 and self._busy.acquire(blocking=False):
                try:
                    self.cache.truncate(start + L - 1)
                finally:
                    self._busy.release()
            spec.close()

    def snapshot(self) -> CacheSnapshot:
        """Copies rows [0, position) of the cache to host memory (O(position)); changes nothing."""
        with self._enter("snapshot"):
            return take(self.cache.read(self.position), self.position, self.manifest.kv_dtype, self.batch_size)

    def restore(self, snap: CacheSnapshot) -> None:
        """Makes the cache and position exactly what they were at snap (bit for bit). In place,
        O(snap.position); a snapshot of another geometry, dtype or batch size raises, changing nothing."""
        with self._enter("restore"):
            check(snap, self.manifest, self.batch_size, self.capacity)
            self.cache.write(list(snap.layers))

    def fork(self, src: int = 0, dst=None) -> None:
        """Copies batch row `src`'s cache rows [0, position) into the rows `dst` (default: every other
        row), so that they continue the same prefix; then forward() can feed each row differently.
        In place, O(position x len(dst)); nothing is reallocated."""
        with self._enter("fork"):
            B = self.batch_size
            dst = [r for r in range(B) if r != src] if dst is None else list(dst)
            rows = [src, *dst]
            src, *dst = [int_arg(f"fork(src={src!r}, dst={dst!r}): a batch row", r, 0, B - 1) for r in rows]
            self.cache.copy(src, [r for r in dst if r != src], self.position)

    def _enter(self, what: str):
        if not self._busy.acquire(blocking=False):
            raise ConcurrentUseError(
                f"{what}() was called while another thread is inside this inferencer; an inferencer is one "
                "sequence: give each thread its own KVCacheInferencer (they can share one Model)")
        return _Release(self._busy)

    # -- the hot path ----------------------------------------------------------------------------
    def forward(self, token_ids) -> np.ndarray:
        """Runs a chunk of n >= 1 new tokens per row and returns the last position's logits.

        token_ids: a 1-D sequence of ints (batch_size 1) or a [batch_size, n] integer array.
        Returns float32 numpy logits, [V] for 1-D input, [batch_size, V] for 2-D input (a fresh
        array the caller owns). Changes in place: cache rows [position, position + n), position += n.
        On any error nothing observable changes (rows [0, position) and the position stay as they were).
        """
        with self._enter("forward"):
            ids, squeeze = self._check_ids(token_ids)
            out = self._run(ids, greedy=False)
            return out[0] if squeeze else out

    def next_tokens(self, token_ids) -> np.ndarray | int:
        """Like forward(), but returns the greedy next token instead of logits: an int for 1-D input,
        a [batch_size] int64 array for 2-D input. Comes from the graph's filtered greedy head where the
        export has one (greedy_index: no logits row is computed), else its argmax output (no logits row
        leaves the device), else from the logits. Changes in place exactly what
        forward() changes; on any error nothing observable changes."""
        with self._enter("next_tokens"):
            ids, squeeze = self._check_ids(token_ids)
            out = self._run(ids, greedy=True)
            return int(out[0]) if squeeze else out

    def _run(self, ids: np.ndarray, greedy: bool, all_positions: bool = False) -> np.ndarray:
        """One run over validated [B, n] ids (see BoundRun.lockstep); commits only after it succeeded."""
        n = ids.shape[1]
        t0 = time.perf_counter()
        if n > self._chunk and not all_positions:
            out = self._run_chunks(ids, greedy)
        else:
            out = self.runner.lockstep(ids, greedy, all_positions)
            self.cache.commit(self.cache.lengths + n)           # the one state change
        self._latency.record((time.perf_counter() - t0) * 1e3, n)
        return out

    def _run_chunks(self, ids: np.ndarray, greedy: bool) -> np.ndarray:
        """A chunk longer than prefill_chunk: leading runs of prefill_chunk tokens (cache rows only),
        then the rest; a failure drops the leading runs' rows (the position is where it was)."""
        c, start = self._chunk, self.cache.offset
        try:
            for lo in range(0, ids.shape[1] - c, c):
                self.runner.fill(ids[:, lo:lo + c])
                self.cache.commit(self.cache.lengths + c)
            out = self.runner.lockstep(ids[:, self.cache.offset - start:], greedy)
        except BaseException:
            self.cache.truncate(start)
            raise
        self.cache.commit(self.cache.lengths + ids.shape[1] - (self.cache.offset - start))
        return out

    def _check_ids(self, token_ids) -> tuple[np.ndarray, bool]:
        """Validates without touching any state; returns ([batch_size, n] ids, squeeze flag)."""
        a = token_ids_arg(token_ids, self.manifest.vocab_size)
        B = self.batch_size
        if a.ndim == 1 and B != 1:
            raise InvalidInputError(f"got a 1-D sequence but batch_size={B}; pass a [{B}, n] array")
        if a.ndim == 2 and a.shape[0] != B:
            raise InvalidInputError(f"got {a.shape[0]} rows but batch_size={B}; pass a [{B}, n] array")
        if a.ndim not in (1, 2) or a.shape[-1] == 0:
            raise InvalidInputError(f"token_ids must be 1-D or 2-D [batch_size, n] with n >= 1, got shape {a.shape}")
        n = a.shape[-1]
        rows_fit(self.cache.offset + n, self.capacity, lambda: (
            f"{n} token(s) at position {self.cache.offset}", f"this inferencer (max_seq_len={self.capacity})",
            f"call reset_cache(), or construct with a larger max_seq_len (model limit {self.manifest.max_positions})"))
        return (a[None, :], True) if a.ndim == 1 else (a, False)

    # -- reporting -------------------------------------------------------------------------------
    @property
    def metrics(self) -> Metrics:
        return self._latency.snapshot(self.position, self.batch_size)

    @property
    def speculation_stats(self) -> dict[str, float]:
        """Over every speculative generate/stream so far (runtime.speculative.SpeculationTotals.stats)."""
        return self._speculation.stats()

    def print_metrics(self) -> None:
        print(self.metrics.report())

    def memory_profile(self) -> MemoryProfile:
        m, c = self.manifest, self.cache
        per_token = m.cache_bytes_per_token
        tokens = self.position * self.batch_size
        used = tokens * per_token
        io_bytes = self.runner.io_bytes
        return MemoryProfile(
            layout=c.layout, device=self.device, dtype=m.kv_dtype, total_cache_bytes=c.nbytes,
            used_cache_bytes=used, free_cache_bytes=c.nbytes - used, bytes_per_token=per_token,
            tokens=tokens, capacity_tokens=self.capacity * self.batch_size, active_sequences=self.batch_size,
            io_buffer_bytes=io_bytes)

    def __repr__(self) -> str:
        return (f"KVCacheInferencer(position={self.position}, capacity={self.capacity}, "
                f"batch_size={self.batch_size}, {self.model!r})")


class _Release:
    """Context manager releasing an already-acquired lock."""

    __slots__ = ("lock",)

    def __init__(self, lock: threading.Lock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()
        return False


def _drafts(drafts, k: int) -> np.ndarray:
    """A proposer's guesses as int64, at most k (its contract: "up to k"); ids of another integer type
    are taken as they are, anything else is refused (range is checked with the run's ids)."""
    a = np.asarray(drafts)
    if a.size and (a.ndim != 1 or a.dtype.kind not in "iu"):
        raise InvalidInputError(f"a proposer's guesses must be a 1-D sequence of integer token ids; got dtype "
                                f"{a.dtype}, shape {a.shape}")
    return a[:k].astype(np.int64)
