"""Load and engine model of one simulated inference server: ticks of fluid engine steps.

Deterministic given the seed and the sequence of calls (the tick sequence depends only on the
model's state, never on how time is advanced); numpy-vectorised, so one simulated hour at moderate
load costs about a second of CPU. Hardware defaults (`spec.Hardware`): Llama-3.1-8B bf16 on one 80 GB
GPU: weights 16.06 GB, 2.5 GB activations, 2 TB/s, 300 TFLOP/s, 0.1 ms per sequence per step.

Ticks
  Δ = 0.25 s, or 1 s while nothing waits and every limit is far (KV < 50 %, slots < 50 %, TGI
  in-flight < 50 %): there a coarse tick changes nothing, since in-tick timing is computed exactly.

Load (arrivals are drawn in 30 s blocks on a fixed grid, identical whatever the knobs)
  arrivals           Poisson(rate), arrival times uniform
  prompt length      P ~ LogNormal(mean = prompt_tokens, σ = 0.5), ≥ 1
  output length      O ~ LogNormal(mean = output_tokens, σ = 0.7), capped at max_new = min(max_tokens,
                     max_len − P) → finished_reason "length", else "stop"
  shared prefix      one of `prefix_groups` prefixes of L = prefix_share·prompt_tokens tokens
                     (capped at P − 1); hits count whole blocks: ⌊min(L, P−1)/block⌋·block
  limits             vLLM/SGLang clip P to max_len − 1; TGI rejects P > max_input_tokens ("validation")

Memory
  bytes/token        b = 2 · layers · kv_heads · head_dim · (1 if fp8 KV else 2)      (128 KiB bf16)
  vLLM KV tokens     ⌊(gpu_mem·gpu_memory_utilization − weights − activations) / b / block⌋ · block
  SGLang KV tokens   (gpu_mem·mem_fraction_static − weights) / b
  TGI KV tokens      min(max_batch_total_tokens, 0.95·(gpu_mem − weights − activations) / b)
  usage              Σ_i ⌈(context_i − shared_i)/block⌉ + blocks of prefixes referenced by running
                     requests; unreferenced cached prefixes are evictable (LRU) and count as free

Time
  decode step        t_dec = t_base + c_seq·n_running + c_kv·Σ context_i
                     t_base = weights/bandwidth (8 ms), c_kv = b/bandwidth, c_seq = 0.1 ms
  prefill            c_pf = 2·params/FLOPs (54 µs) per uncached prompt token, in chunks of `chunk`
                     tokens per step (max_num_batched_tokens, chunked_prefill_size, max_batch_prefill_tokens).
                     Prefill is a FCFS server in continuous time (Lindley recursion):
                       finish_i = max(avail_i, finish_{i−1}) + left_i·(c_pf + t_fix/chunk)
                     and a first token comes no sooner than ⌈left/chunk⌉·t_fix + c_pf·left after
                     the prefill starts (+ t_dec/2 to reach a step boundary while decodes run)
  mixed steps        vLLM: decodes ride along with prefill chunks (step = t_dec + c_pf·chunk, t_fix = t_dec)
  stalling passes    vLLM V0 without chunked prefill, TGI, SGLang: prefill-only passes (t_fix = t_base)
                     during which every running decode waits (ITL = t_dec + pass time)
  decode tokens      per tick, k = (Δ − time in stalling passes)/t_dec steps (mixed: m + (Δ − m·t_mix)/t_dec);
                     every decoding request gains k tokens; ITL is observed at the step times

Scheduling (FCFS unless SGLang lpm; head-of-line blocking, as the engines do)
  prefill budget     a request leaves the queue only when this tick's prefill capacity,
                     Δ / (c_pf + t_fix/chunk) tokens minus the prefill still pending, reaches it
                     (at least one when nothing prefills). Queue time ends when its prefill starts.
  slots              running < max_num_seqs / max_running_requests / max_batch_size
  vLLM admission     the prompt's uncached blocks must be free now; decode growth is not reserved, so
                     when blocks run out the most recently admitted request is PREEMPTED (recompute:
                     prompt + generated tokens go back to the front of the queue)
  SGLang admission   free tokens ≥ Σ_running ratio·(max_new − generated) + new prompt + ratio·max_new,
                     ratio = new_token_ratio: starts at min(1, 0.7·schedule_conservativeness), decays
                     over 600 decode steps to 0.14 of that, resets on retraction (retracted requests go
                     to the back of the queue). High conservativeness keeps a queue while token_usage
                     < 0.9. lpm orders a queue of ≤ 128 requests by cached-prefix length (fcfs above)
  TGI admission      Σ (prompt + max_new_tokens) ≤ max_batch_total_tokens: never preempts; the router
                     rejects beyond max_concurrent_requests in flight ("overloaded")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from perfagent.sim.knobs import LoadSpec
from perfagent.sim.spec import EngineSpec, Hardware
from perfagent.sim.stats import Counters, Ewma, FloatArray, Hist, hists

# Columns of a request row (float64; token counts hold integral values):
# ARRIVAL time; PROMPT, OUT (target output) and MAX_NEW tokens; prefix GROUP (-1: none) and its SHARED
# tokens; GEN generated so far and GEN0 at (re)admission; CTX tokens in KV once prefilled; LEFT prefill
# tokens to compute; HIT0 cache hits at first admission; FIRST token, SCHED (prefill start) and AVAIL
# (earliest prefill start) times; VALID = the prompt fits the engine's input limit.
NCOL = 15
ARRIVAL, PROMPT, OUT, MAX_NEW, GROUP, SHARED, GEN, GEN0, CTX, LEFT, HIT0, FIRST, SCHED, AVAIL, VALID = range(
    NCOL
)

PROMPT_SIGMA = 0.5
OUTPUT_SIGMA = 0.7
ARRIVAL_BLOCK_S = 30.0  # arrivals are drawn for this much time at once (on a fixed grid)
FLUSH_ROWS = 512  # per-request observations are buffered and recorded in batches
LPM_MAX_QUEUE = 128  # SGLang switches lpm to fcfs for longer queues (schedule_policy.py)
SGLANG_INIT_RATIO = 0.7  # global_config.default_init_new_token_ratio
SGLANG_MIN_RATIO_FACTOR = 0.14  # default_min_new_token_ratio_factor
SGLANG_DECAY_STEPS = 600  # default_new_token_ratio_decay_steps
SGLANG_CLIP_MAX_NEW = 4096  # CLIP_MAX_NEW_TOKENS_ESTIMATION
WINDOW_S = 5.0  # time constant of the "recent" gauges (vLLM V0 logs throughput every 5 s)


class _Queue:
    """FIFO of request rows: amortised O(1) push at either end, pop from the front."""

    def __init__(self) -> None:
        self._buf = np.empty((256, NCOL))
        self._head = self._tail = 64

    def __len__(self) -> int:
        return self._tail - self._head

    def rows(self) -> FloatArray:
        return self._buf[self._head : self._tail]

    def _regrow(self, back: int, front: int) -> None:
        n = len(self)
        gap = max(64, 2 * front)
        buf = np.empty((max(256, gap + 2 * (n + back)), NCOL))
        buf[gap : gap + n] = self.rows()
        self._buf, self._head, self._tail = buf, gap, gap + n

    def push_back(self, rows: FloatArray) -> None:
        if self._tail + len(rows) > len(self._buf):
            self._regrow(len(rows), 0)
        self._buf[self._tail : self._tail + len(rows)] = rows
        self._tail += len(rows)

    def push_front(self, rows: FloatArray) -> None:
        if self._head < len(rows):
            self._regrow(0, len(rows))
        self._head -= len(rows)
        self._buf[self._head : self._head + len(rows)] = rows

    def pop_front(self, k: int) -> FloatArray:
        out = self._buf[self._head : self._head + k].copy()
        self._head += k
        if self._head == self._tail:
            self._head = self._tail = 64
        return out

    def reorder(self, order: np.ndarray) -> None:
        view = self.rows()
        view[:] = view[order]


@dataclass
class Gauges:
    """State as of the end of the last tick."""

    running: int = 0
    waiting: int = 0
    kv_used_tokens: float = 0.0  # referenced KV, what vLLM/SGLang count as used
    kv_usage: float = 0.0  # fraction of capacity
    reserved_tokens: float = 0.0  # TGI: prompt + max_new of the running batch
    retracted_last: int = 0  # requests preempted/retracted in the last tick
    new_token_ratio: float = 0.0  # SGLang


@dataclass(frozen=True)
class _Prefill:
    tokens: float  # prefill tokens computed in the tick
    steps: float  # forward passes that carried them
    first_idx: np.ndarray  # running rows whose prefill completed
    first_t: FloatArray  # ... and when their token came out


_NO_PREFILL = _Prefill(0.0, 0.0, np.empty(0, dtype=np.int64), np.empty(0))


class EngineModel:
    """One engine incarnation: state, counters and histograms since its (simulated) start."""

    def __init__(
        self,
        spec: EngineSpec,
        hw: Hardware,
        layout: Mapping[str, Sequence[float]],
        rng: np.random.Generator,
        start: float,
        load: LoadSpec,
        tick: float = 0.25,
        coarse_tick: float = 1.0,
    ) -> None:
        self.spec, self.hw, self.rng = spec, hw, rng
        self.start, self.t = start, start
        self.tick, self.coarse_tick = tick, max(tick, coarse_tick)
        self.ticks = 0
        self._c = Counters()
        self._h: dict[str, Hist] = hists(layout)
        self.gauges = Gauges()
        self.running = np.empty((0, NCOL))
        self.waiting = _Queue()
        self._own = np.empty(0)  # per running row: KV blocks beyond its shared prefix
        self._kv_sum = 0.0  # Σ tokens in KV over running rows (attention reads them all)
        self._pinned_count = 0  # prefixes referenced by running rows
        self._n_pre = 0  # running rows still in prefill
        self._done: list[tuple[FloatArray, FloatArray]] = []
        self._ttft: list[FloatArray] = []
        self._buffered = 0
        self.gen_rate, self.prompt_rate, self.busy = Ewma(WINDOW_S), Ewma(WINDOW_S), Ewma(WINDOW_S)
        self.hit_num, self.hit_den = Ewma(WINDOW_S), Ewma(WINDOW_S)
        self._tick_queries = self._tick_hits = 0.0
        self._blocks = spec.kv_tokens // spec.block
        self._t_base = hw.step_base_s
        self._c_seq = hw.seq_overhead_s
        self._c_kv = hw.kv_bytes_per_token(spec.kv_fp8) / hw.mem_bandwidth
        self._c_pf = hw.prefill_s_per_token
        self._kv_bytes = float(hw.kv_bytes_per_token(spec.kv_fp8))
        self._init_ratio = min(1.0, SGLANG_INIT_RATIO * (spec.conservativeness or 0.0))
        self._min_ratio = self._init_ratio * SGLANG_MIN_RATIO_FACTOR
        self._ratio = self._init_ratio
        self.load = load
        self._pending = np.empty((0, NCOL))
        self._pending_pos = 0
        self._pending_until = start
        self._reset_prefixes()
        self._set_gauges()

    # -- control ------------------------------------------------------------------------------------

    @property
    def now(self) -> float:
        return self.t

    @property
    def counters(self) -> Counters:
        self.flush()
        return self._c

    @property
    def hist(self) -> dict[str, Hist]:
        self.flush()
        return self._h

    def set_load(self, load: LoadSpec) -> None:
        old, self.load = self.load, load
        # Arrivals drawn beyond now belong to the old load.
        self._pending, self._pending_pos, self._pending_until = self._pending[:0], 0, self.now
        if (old.prefix_groups, old.prefix_share, old.prompt_tokens) != (
            load.prefix_groups,
            load.prefix_share,
            load.prompt_tokens,
        ):
            self._reset_prefixes()  # new templates: nothing cached for them yet

    def advance_to(self, t: float) -> None:
        """Run every whole tick that ends at or before `t`.

        The tick sequence depends only on the model's state, never on how `t` is reached, so one call
        for an hour and 3600 calls of a second give the same result.
        """
        while True:
            if self.load.rate == 0.0 and not len(self.running) and not len(self.waiting):
                fine = math.floor((t - self.t) / self.tick + 1e-9)
                if fine > 0:
                    self._idle(fine)  # nothing can happen: skip ahead in one go
                break
            dt = self.coarse_tick if self._far_from_limits() else self.tick
            if self.t + dt > t + 1e-9:
                break
            self._tick(dt)
        if self._buffered >= FLUSH_ROWS:
            self.flush()

    def _far_from_limits(self) -> bool:
        """Coarse ticks only while nothing waits and every limit is far: there they change nothing."""
        spec, g = self.spec, self.gauges
        if len(self.waiting) or g.kv_usage > 0.5 or 2 * g.running > spec.max_seqs:
            return False
        if (
            spec.max_concurrent is not None
            and 2 * (g.running + self.load.rate * self.coarse_tick) > spec.max_concurrent
        ):
            return False
        if spec.reserve_full and 2 * g.reserved_tokens > spec.kv_tokens:
            return False
        return 4 * self.load.rate * self.coarse_tick < spec.max_seqs - g.running

    def in_flight(self) -> int:
        return len(self.running) + len(self.waiting)

    @property
    def cache_hit_rate(self) -> float:
        """Recent prefix-cache hit rate in tokens, as SGLang's cache_hit_rate gauge reports it."""
        return self.hit_num.value / self.hit_den.value if self.hit_den.value > 1e-9 else 0.0

    @property
    def kv_blocks(self) -> int:
        return self._blocks

    # -- one tick -----------------------------------------------------------------------------------

    def _idle(self, n: int) -> None:
        for ewma in (self.gen_rate, self.prompt_rate, self.busy, self.hit_num, self.hit_den):
            ewma.update(0.0, n * self.tick)
        self.t += n * self.tick
        self.ticks += n
        self._pending_until = self.t

    def _tick(self, dt: float) -> None:
        t0 = self.t
        self._arrive(t0, t0 + dt)
        self._admit(t0, dt)
        self._step(t0, dt)
        self._evict_prefixes()
        self.t = t0 + dt
        self.ticks += 1
        if self._buffered >= FLUSH_ROWS:
            self.flush()

    def _reset_prefixes(self) -> None:
        self._prefix_len = round(self.load.prefix_share * self.load.prompt_tokens)
        self._prefix_blocks = self._prefix_len // self.spec.block if self.spec.prefix_cache else 0
        groups = self.load.prefix_groups
        self._cached = np.zeros(groups, dtype=bool)
        self._last_use = np.zeros(groups)
        # Running requests per prefix (pinned prefixes), for rows drawn under this load only.
        self._refs = [0] * groups
        self._pinned_count = 0
        if len(self.running):
            self.running[:, GROUP] = -1.0  # earlier templates are no longer shared with new requests
            self.running[:, SHARED] = 0.0
        self.waiting.rows()[:, GROUP] = -1.0
        self.waiting.rows()[:, SHARED] = 0.0
        if len(self.running):
            self._refresh_kv()  # their former prefix blocks are now their own

    def _ref(self, rows: FloatArray, sign: int) -> None:
        """Track which prefixes running requests reference (their blocks are pinned, not evictable)."""
        if self._prefix_blocks <= 0:
            return
        refs = self._refs
        for group in rows[:, GROUP].tolist():
            if group >= 0:
                g = int(group)
                before = refs[g]
                refs[g] = before + sign
                self._pinned_count += (before == 0) - (refs[g] == 0)

    def _lognormal(self, mean: float, sigma: float, n: int) -> FloatArray:
        out: FloatArray = np.rint(self.rng.lognormal(math.log(mean) - sigma * sigma / 2, sigma, n))
        return np.maximum(out, 1.0)

    def _draw(self, t_from: float, t_to: float) -> FloatArray:
        """Requests arriving in [t_from, t_to), as the engine's front end sees them."""
        load, spec = self.load, self.spec
        n = int(self.rng.poisson(load.rate * (t_to - t_from)))
        # Always draw the same variates, so that runs with different knobs see the same requests.
        arrival = t_from + np.sort(self.rng.random(n)) * (t_to - t_from)
        prompt = self._lognormal(load.prompt_tokens, PROMPT_SIGMA, n)
        out = self._lognormal(load.output_tokens, OUTPUT_SIGMA, n)
        group = self.rng.integers(0, load.prefix_groups, n).astype(np.float64)
        rows = np.full((n, NCOL), np.nan)
        rows[:, VALID] = prompt <= spec.max_input
        if spec.max_concurrent is None:  # vLLM/SGLang: clip instead of modelling 400 responses
            prompt = np.minimum(prompt, spec.max_input)
        max_new = np.maximum(np.minimum(load.max_tokens, spec.max_len - prompt), 1.0)
        rows[:, ARRIVAL] = arrival
        rows[:, PROMPT] = prompt
        rows[:, OUT] = np.minimum(out, max_new)
        rows[:, MAX_NEW] = max_new
        if self._prefix_blocks > 0:
            rows[:, GROUP] = group
            shared = np.maximum(np.minimum(self._prefix_len, prompt - 1), 0.0)
            rows[:, SHARED] = np.floor(shared / spec.block) * spec.block
        else:
            rows[:, GROUP] = -1.0
            rows[:, SHARED] = 0.0
        rows[:, GEN] = rows[:, GEN0] = 0.0
        rows[:, AVAIL] = arrival
        return rows

    def _arrive(self, t0: float, t1: float) -> None:
        if self._pending_until < t1 and self.load.rate > 0:
            grid = self.start + math.ceil((t1 - self.start) / ARRIVAL_BLOCK_S - 1e-9) * ARRIVAL_BLOCK_S
            until = max(grid, t1)
            rest = self._pending[self._pending_pos :]
            self._pending = np.concatenate((rest, self._draw(self._pending_until, until)))
            self._pending_pos, self._pending_until = 0, until
        pos = self._pending_pos
        j = int(np.searchsorted(self._pending[pos:, ARRIVAL], t1, side="left"))
        if j == 0:
            return
        rows = self._pending[pos : pos + j]
        self._pending_pos = pos + j
        c = self._c
        c.arrived += j
        if self.spec.max_concurrent is not None:  # TGI router: a permit per in-flight request first
            allowed = max(0, self.spec.max_concurrent - self.in_flight())
            c.rejected_overloaded += max(0, j - allowed)
            rows = rows[:allowed]
            valid = rows[:, VALID] > 0  # then validation: prompt longer than max_input_tokens
            c.rejected_validation += len(rows) - int(valid.sum())
            rows = rows[valid]
            if "validation" in self._h and len(rows):
                self._h["validation"].observe(2e-4 + 1e-7 * rows[:, PROMPT])
        if len(rows):
            self.waiting.push_back(rows)

    def _hits(self, cand: FloatArray) -> FloatArray:
        """Prefix-cache hit tokens if these candidates were admitted now, in order."""
        g = cand[:, GROUP].astype(np.int64)
        cached = self._cached[g]
        if cached.all():
            return cand[:, SHARED].copy()
        # Later requests of a prefix that an earlier candidate computes find it cached.
        later = np.ones(len(g), dtype=bool)
        later[np.unique(g, return_index=True)[1]] = False
        hit: FloatArray = np.where(cached | later, cand[:, SHARED], 0.0)
        return hit

    def _used_blocks(self) -> float:
        return float(self._own.sum()) + self._pinned_count * self._prefix_blocks

    def _refresh_kv(self) -> None:
        """Recompute per-row KV holdings of the running batch (once per tick and after admission)."""
        run = self.running
        kv = run[:, CTX] - run[:, LEFT] + np.floor(run[:, GEN]) - run[:, GEN0]
        self._kv_sum = float(kv.sum())
        self._own = np.ceil((kv - np.minimum(run[:, SHARED], kv)) / self.spec.block)

    def _admit(self, t0: float, dt: float) -> None:
        spec = self.spec
        run = self.running
        slots = spec.max_seqs - len(run)
        if slots <= 0 or not len(self.waiting):
            return
        # Prefill budget of this tick: requests start only as fast as prefill chunks are computed
        # (vLLM V1's per-step token budget, SGLang/TGI prefill batches); the rest keep waiting.
        t_fix = self._t_base + (self._c_seq * len(run) + self._c_kv * self._kv_sum if spec.mixed else 0.0)
        budget = dt / (self._c_pf + t_fix / spec.chunk)
        if self._n_pre:
            budget -= float(run[:, LEFT].sum())
        if budget <= 0:
            return
        if spec.lpm and self._prefix_blocks > 0 and len(self.waiting) <= LPM_MAX_QUEUE:
            rows = self.waiting.rows()
            g = rows[:, GROUP].astype(np.int64)
            match = np.where((g >= 0) & self._cached[np.maximum(g, 0)], rows[:, SHARED], 0.0)
            self.waiting.reorder(np.argsort(-match, kind="stable"))
        cand = self.waiting.rows()[: min(slots, len(self.waiting))]
        hits = self._hits(cand) if self._prefix_blocks > 0 else np.zeros(len(cand))
        ctx = cand[:, PROMPT] + np.floor(cand[:, GEN])  # a preempted request recomputes its output too
        compute = ctx - hits
        if spec.reserve_full:  # TGI: the whole prompt + max_new_tokens is reserved up front
            need = cand[:, PROMPT] + cand[:, MAX_NEW]
            free = spec.kv_tokens - self.gauges.reserved_tokens
        elif spec.conservativeness is not None:  # SGLang: also reserve a share of future decode tokens
            need = compute + self._ratio * np.minimum(cand[:, MAX_NEW], SGLANG_CLIP_MAX_NEW)
            future = np.maximum(np.minimum(run[:, MAX_NEW], SGLANG_CLIP_MAX_NEW) - run[:, GEN], 0.0)
            free = spec.kv_tokens - self._used_blocks() - self._ratio * float(future.sum())
        else:  # vLLM: blocks for the uncached prompt must be free now; decode growth is not reserved
            need = np.ceil(compute / spec.block)
            free = self._blocks - self._used_blocks()
        k = int(np.searchsorted(np.cumsum(need), free, side="right"))
        # Whatever the budget left, at least one request starts (a long prompt takes several ticks).
        k = min(k, max(1, int(np.searchsorted(np.cumsum(compute), budget, side="right"))))
        if k == 0:
            return
        rows = self.waiting.pop_front(k)
        hits, ctx = hits[:k], ctx[:k]
        rows[:, CTX] = ctx
        rows[:, LEFT] = compute[:k]
        avail = rows[:, AVAIL]
        np.maximum(avail, t0, out=avail)
        fresh = np.isnan(rows[:, HIT0])
        if fresh.all():  # never admitted before (GEN and GEN0 are 0); SCHED is set when prefill starts
            rows[:, HIT0] = hits
        else:  # preempted earlier: keep first-admission facts, recompute what was generated
            rows[:, GEN0] = np.floor(rows[:, GEN])
            rows[:, HIT0] = np.where(fresh, hits, rows[:, HIT0])
        self.running = np.concatenate((run, rows)) if len(run) else rows
        # Admitted rows hold only their cached prefix so far: shared blocks, no own blocks.
        self._own = np.concatenate((self._own, np.zeros(k)))
        self._kv_sum += float(hits.sum())
        self._ref(rows, +1)
        self._n_pre += k  # hits never cover a whole prompt: every admitted row has prefill to do
        c = self._c
        if spec.prefix_cache:
            q, hsum = float(ctx.sum()), float(hits.sum())
            c.prefix_queries += q
            c.prefix_hits += hsum
            self._tick_queries += q
            self._tick_hits += hsum
            if self._prefix_blocks > 0:
                g = rows[:, GROUP].astype(np.int64)
                self._cached[g] = True
                self._last_use[g] = t0
        if spec.reserve_full:  # TGI takes new batches of up to max_batch_prefill_tokens from the queue
            self.gauges.reserved_tokens += float(need[:k].sum())
            batches = max(1, math.ceil(float(rows[:, PROMPT].sum()) / spec.chunk))
            c.new_batches += batches
            if "batch_next_size" in self._h:
                self._h["batch_next_size"].observe_one(k / batches, batches)
            if len(run):  # a batch is running: the new one is concatenated onto it
                c.concats += batches
                if "concat_decode" in self._h:
                    self._h["concat_decode"].observe_one(1e-4 + 2e-6 * len(self.running), batches)

    def _prefill(self, t0: float, dt: float, t_fix: float, t_dec: float, n_dec: int) -> _Prefill:
        """Prefill as a FCFS server in continuous time (Lindley recursion, vectorised)."""
        spec, run = self.spec, self.running
        idx = np.flatnonzero(run[:, LEFT] > 0)
        if len(idx) == 1:
            return self._prefill_one(int(idx[0]), t0, dt, t_fix, t_dec, n_dec)
        left = run[idx, LEFT]
        avail = np.maximum(run[idx, AVAIL], t0)
        w = left * (self._c_pf + t_fix / spec.chunk)  # server time, the step's fixed cost amortised
        cum = np.cumsum(w)
        fin = np.maximum.accumulate(avail - (cum - w)) + cum
        start = fin - w
        frac = (t0 + dt - start) / w
        np.minimum(frac, 1.0, out=frac)
        np.maximum(frac, 0.0, out=frac)
        done_tokens = left * frac
        tokens, busy = float(done_tokens.sum()), float(w @ frac)
        # Steps carrying prefill: full chunks when saturated, about one per request when not.
        chunks = float(np.ceil(done_tokens / spec.chunk).sum())
        steps = max(tokens / spec.chunk, chunks * (1.0 - min(1.0, busy / dt)))
        if tokens > 0:
            steps = min(steps, max(tokens / spec.chunk, (dt - self._c_pf * tokens) / t_fix))
        done = frac >= 1.0
        run[idx, LEFT] = np.where(done, 0.0, left - done_tokens)
        sched = run[idx, SCHED]
        unscheduled = np.isnan(sched)
        if unscheduled.any():  # queue time ends when the first prefill chunk is scheduled
            run[idx[unscheduled], SCHED] = start[unscheduled]
        if not done.any():
            return _Prefill(tokens, steps, idx[:0], np.empty(0))
        # Alone, a request still needs whole steps of fixed cost, and joins at a step boundary.
        left, start = left[done], start[done]
        floor_t = start + np.ceil(left / spec.chunk) * t_fix + self._c_pf * left
        if n_dec:
            floor_t += 0.5 * t_dec
        return _Prefill(tokens, steps, idx[done], np.maximum(fin[done], floor_t))

    def _prefill_one(self, i: int, t0: float, dt: float, t_fix: float, t_dec: float, n_dec: int) -> _Prefill:
        """`_prefill` for the common case of one prefilling request, in scalar arithmetic (same model)."""
        spec, row = self.spec, self.running[i]
        left = float(row[LEFT])
        w = left * (self._c_pf + t_fix / spec.chunk)
        start = max(float(row[AVAIL]), t0)
        frac = min(1.0, max(0.0, (t0 + dt - start) / w))
        tokens = left * frac
        steps = max(tokens / spec.chunk, math.ceil(tokens / spec.chunk) * (1.0 - min(1.0, w * frac / dt)))
        if tokens > 0:
            steps = min(steps, max(tokens / spec.chunk, (dt - self._c_pf * tokens) / t_fix))
        if math.isnan(row[SCHED]):
            row[SCHED] = start
        if frac < 1.0:
            row[LEFT] = left - tokens
            return _Prefill(tokens, steps, _NO_PREFILL.first_idx, _NO_PREFILL.first_t)
        row[LEFT] = 0.0
        first = (
            start + math.ceil(left / spec.chunk) * t_fix + self._c_pf * left + (0.5 * t_dec if n_dec else 0.0)
        )
        return _Prefill(tokens, steps, np.array([i]), np.array([max(start + w, first)]))

    def _step(self, t0: float, dt: float) -> None:
        spec, c = self.spec, self._c
        t1 = t0 + dt
        self.hit_num.update(self._tick_hits / dt, dt)
        self.hit_den.update(self._tick_queries / dt, dt)
        self._tick_queries = self._tick_hits = 0.0
        run = self.running
        n = len(run)
        if n == 0:
            for ewma in (self.gen_rate, self.prompt_rate, self.busy):
                ewma.update(0.0, dt)
            self._set_gauges()
            return
        t_dec = self._t_base + self._c_seq * n + self._c_kv * self._kv_sum
        t_fix = t_dec if spec.mixed else self._t_base
        if self._n_pre:
            decoding = run[:, LEFT] <= 0
            n_dec = n - self._n_pre
            pf = self._prefill(t0, dt, t_fix, t_dec, n_dec)
            self._n_pre -= len(pf.first_idx)
        else:
            decoding, n_dec, pf = None, n, _NO_PREFILL
        m, P = pf.steps, pf.tokens
        t_pstep = t_fix + self._c_pf * P / m if m > 0 else 0.0  # one prefill-carrying step
        if spec.mixed:  # decodes advance in every step; prefill-carrying ones are just longer
            k = m + max(0.0, dt - m * t_pstep) / t_dec
            itl_slow, slow_share = t_pstep, (m / k if k > 0 else 0.0)
        else:  # prefill passes stall every running decode
            k = max(0.0, dt - m * t_pstep) / t_dec
            itl_slow, slow_share = t_dec + t_pstep, (min(m, k) / k if k > 0 else 0.0)
        t_avg = dt / k if k > 0 else 0.0  # 0: no decode step fits in this tick

        # Tokens: decoding rows make k steps; a row whose prefill ends at ft emits one, then decodes.
        # Token counts are fluid (fractional); the renderers print whole numbers.
        gen, out = run[:, GEN], run[:, OUT]
        if decoding is None:
            gen += k
        elif n_dec:
            gen[decoding] += k
        tokens = k * n_dec
        fi, ft = pf.first_idx, pf.first_t
        fresh_n = 0
        if len(fi):
            inc = 1.0 + np.maximum(0.0, t1 - ft) / t_avg if t_avg > 0 else np.ones(len(fi))
            gen[fi] += inc
            tokens += float(inc.sum())
            fresh_mask = np.isnan(run[fi, FIRST])
            fresh = fi if fresh_mask.all() else fi[fresh_mask]
            fresh_n = len(fresh)
            if fresh_n:
                ft_fresh = ft if fresh_n == len(fi) else ft[fresh_mask]
                run[fresh, FIRST] = ft_fresh
                self._ttft.append(ft_fresh - run[fresh, ARRIVAL])
                prompt = float(run[fresh, PROMPT].sum())
                c.prompt_tokens += prompt
                c.local_compute_tokens += prompt - float(run[fresh, HIT0].sum())
                self.prompt_rate.update(prompt / dt, dt)
            else:
                self.prompt_rate.update(0.0, dt)
        else:
            self.prompt_rate.update(0.0, dt)
        finished = gen >= out
        any_finished = bool(finished.any())
        if any_finished:
            # Each row finished (gen - out) average steps before t1, but not before its first token.
            over = gen[finished] - out[finished]
            tokens -= float(over.sum())
            fin_t = np.maximum(t1 - over * t_avg, run[finished, FIRST])
            gen[finished] = out[finished]
        c.generation_tokens += tokens
        self.gen_rate.update(tokens / dt, dt)
        itl_tokens = tokens - fresh_n
        if itl_tokens > 0 and "itl" in self._h:
            self._h["itl"].observe_one(itl_slow, itl_tokens * slow_share)
            self._h["itl"].observe_one(t_dec, itl_tokens * (1.0 - slow_share))
        self._record_steps(m, k, n_dec, P, t_pstep, t_dec, n)
        c.flops += 2.0 * self.hw.params * (P + tokens)
        c.read_bytes += (
            k + (0.0 if spec.mixed else m)
        ) * self.hw.weights_bytes + k * self._kv_sum * self._kv_bytes
        c.write_bytes += (P + tokens) * self._kv_bytes
        # The engine steps back to back while anything decodes; otherwise only while prefilling.
        self.busy.update(1.0 if n_dec else min(1.0, m * t_pstep / dt), dt)
        if spec.conservativeness is not None:
            decay = (self._init_ratio - self._min_ratio) / SGLANG_DECAY_STEPS
            self._ratio = max(self._min_ratio, self._ratio - decay * k)
        if any_finished:
            done_rows = run[finished]
            self._ref(done_rows, -1)
            self._done.append((done_rows, fin_t))
            self._buffered += len(done_rows)
            if spec.reserve_full:
                self.gauges.reserved_tokens -= float((done_rows[:, PROMPT] + done_rows[:, MAX_NEW]).sum())
            self.running = run[~finished]
        self._refresh_kv()
        self._preempt(t1)
        self._set_gauges()

    def _record_steps(
        self, m: float, k: float, n_dec: int, P: float, t_pstep: float, t_dec: float, n: int
    ) -> None:
        """Per-step histograms and counters (vLLM iteration tokens, TGI forward/decode/filter times)."""
        c, h = self._c, self._h
        c.prefill_steps += m
        c.decode_steps += k
        if "iteration_tokens" in h:
            chunk = P / m if m > 0 else 0.0
            if self.spec.mixed:
                h["iteration_tokens"].observe_one(n_dec + chunk, m)
                h["iteration_tokens"].observe_one(float(n_dec), k - m)
            else:
                h["iteration_tokens"].observe_one(chunk, m)
                h["iteration_tokens"].observe_one(float(n_dec), k)
        if "forward_prefill" in h:
            detok, filt = 2e-5 * n, 5e-5 + 1e-6 * n
            for method, calls, t in (("prefill", m, t_pstep), ("decode", k, t_dec)):
                h[f"forward_{method}"].observe_one(t, calls)
                h[f"decode_{method}"].observe_one(detok, calls)
                h[f"filter_{method}"].observe_one(filt, calls)
                h[f"infer_{method}"].observe_one(t + detok + filt, calls)

    def flush(self) -> None:
        """Record buffered per-request observations (TTFT, finished requests) into counters/histograms."""
        if self._ttft:
            if "ttft" in self._h:
                self._h["ttft"].observe(np.concatenate(self._ttft))
            self._ttft.clear()
        if not self._done:
            self._buffered = 0
            return
        rows = np.concatenate([r for r, _ in self._done])
        fin_t = np.concatenate([t for _, t in self._done])
        self._done.clear()
        self._buffered = 0
        c, h = self._c, self._h
        arrival, sched, first, out = rows[:, ARRIVAL], rows[:, SCHED], rows[:, FIRST], rows[:, OUT]
        n = len(rows)
        length = int((out >= rows[:, MAX_NEW]).sum())
        c.finished += n
        c.finished_length += length
        c.finished_stop += n - length
        c.prompt_tokens_done += float(rows[:, PROMPT].sum())
        c.generation_tokens_done += float(out.sum())
        c.cached_tokens_done += float(rows[:, HIT0].sum())
        decode = fin_t - first
        observations: dict[str, Callable[[], FloatArray]] = {
            "e2e": lambda: fin_t - arrival,
            "queue": lambda: sched - arrival,
            "inference": lambda: fin_t - sched,
            "prefill": lambda: first - sched,
            "decode": lambda: decode,
            "prompt_tokens": lambda: rows[:, PROMPT],
            "gen_tokens": lambda: out,
            "max_gen_tokens": lambda: out,
            "max_tokens": lambda: rows[:, MAX_NEW],
            "n": lambda: np.ones(n),
            "best_of": lambda: np.ones(n),
            "prefill_kv_computed": lambda: rows[:, PROMPT] - rows[:, HIT0],
            "mean_time_per_token": lambda: (fin_t - sched) / out,  # TGI: inference time / tokens
            "tpot_request": lambda: decode[out > 1] / (out[out > 1] - 1),
        }
        for name, values in observations.items():
            if name in h:
                h[name].observe(values())
        if "skipped_tokens" in h:  # TGI summary: one zero per generated token (no speculation)
            h["skipped_tokens"].observe_one(0.0, float(out.sum()))

    def _preempt(self, t1: float) -> None:
        """Out of KV blocks: vLLM preempts (recompute), SGLang retracts; most recently admitted first."""
        self.gauges.retracted_last = 0
        run = self.running
        if self.spec.reserve_full or not len(run):
            return
        over = self._used_blocks() - self._blocks
        if over <= 0:
            return
        # The shortest tail whose own blocks cover the excess (shared prefix blocks are not counted).
        j = min(len(run), int(np.searchsorted(np.cumsum(self._own[::-1]), over, side="left")) + 1)
        victims = run[len(run) - j :].copy()
        self.running = run[: len(run) - j]
        self._ref(victims, -1)
        self._n_pre = int(np.count_nonzero(self.running[:, LEFT] > 0))
        self._refresh_kv()
        c = self._c
        c.preemptions += j
        c.preempted_input_tokens += float(victims[:, PROMPT].sum())
        c.preempted_output_tokens += float(np.floor(victims[:, GEN]).sum())
        victims[:, AVAIL] = t1
        self.gauges.retracted_last = j
        if self.spec.retract_to_back:  # SGLang appends retracted requests to the waiting queue
            self.waiting.push_back(victims)
            self._ratio = self._init_ratio  # and raises new_token_ratio again
        else:  # vLLM V1 prepends preempted requests to the waiting queue
            self.waiting.push_front(victims)

    def _evict_prefixes(self) -> None:
        """Unreferenced cached prefixes live in free blocks; evict the least recently used when short."""
        per = self._prefix_blocks
        if per <= 0:
            return
        free = self._blocks - self._used_blocks()
        if np.count_nonzero(self._cached) * per <= free:
            return
        loose = np.flatnonzero(self._cached & (np.asarray(self._refs) == 0))
        excess = len(loose) * per - free
        if excess > 0:
            order = loose[np.argsort(self._last_use[loose], kind="stable")]
            self._cached[order[: math.ceil(excess / per)]] = False

    def _set_gauges(self) -> None:
        g = self.gauges
        g.running = len(self.running)
        g.waiting = len(self.waiting)
        used = self._used_blocks() if g.running else 0.0
        g.kv_used_tokens = used * self.spec.block
        g.kv_usage = min(1.0, used / self._blocks)
        g.new_token_ratio = self._ratio
