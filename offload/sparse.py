"""Sparse attention's selection: block summaries, the blocks each head attends to within the token budget, the
speculated query of the next layer (InfiniGen-style prefetch), and the recall diagnostic.

Pages (`page_size` tokens) stay the unit of transfer and placement; blocks (`select_block` tokens, R per page) are
the unit of choice. Each block keeps a summary per KV head; a decode step scores the window's blocks and, per the
head mode, one set of blocks serves every head ("shared"), each KV head picks from its query heads' combined
scores ("kv"), or each query head picks alone ("query"). The pages the step touches are the union over heads; each
head attends only to its own blocks.

`SparseSelection` owns the summaries (on the compute device), the selection policy, the attention history, the
speculation hooks and the prefetch context. It decides; the runtime moves. Its inputs are the page table and the
tiers, passed per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offload import attention_math as am
from offload.config import OffloadConfig
from offload.decode import top_blocks
from offload.models import apply_rotary, decoder_layers, query_before_rotary
from offload.pagetable import window_start
from policies import SELECTION, PrefetchContext

# Added to the score of blocks a policy always keeps (outliers): above any share of attention (at most G).
KEEP = 1e4
# Candidate blocks a CPU scores at once in a batch's sparse step (`SparseSelection.scores_batch`): a piece of a few
# hundred blocks (four sequences of 1K tokens with 16-token blocks) keeps the policy's temporaries in the caches,
# which one piece for a whole batch of long sequences does not.
CPU_PIECE_BLOCKS = 256
# Per step decay of the attention history (`history` > 0).
HISTORY_DECAY = 0.9


@dataclass(frozen=True)
class BlockPlan:
    """A sparse step's shape, from host integers alone: the window's first page, the tail page and its tokens, the
    candidate blocks fb..fb+nb-1 (the full pages' blocks from the window's first visible one), the blocks the
    budget allows, and the tokens of block fb before the window's start."""

    first: int
    last: int
    valid: int
    fb: int
    nb: int
    k_blocks: int
    cut: int


class SparseSelection:
    def __init__(self, model: torch.nn.Module, config: OffloadConfig, windows: list[int | None], page_size: int,
                 max_pages: int, q_heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, speculate: bool):
        self.model, self.config, self.page_size = model, config, page_size
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.block = config.block_size()
        self.per_page = page_size // self.block  # R: blocks per page
        self.mode = config.head_selection
        # Columns of a choice: one per KV head ("kv"), per query head ("query"), or one for all ("shared").
        self.choosers = {"shared": 1, "kv": kv_heads, "query": q_heads}[self.mode]
        self.selector = SELECTION.create(config.selection)
        self.max_blocks, self.dtype = max_pages * self.per_page, dtype
        self.device = device
        self.resize(windows, 1)
        self.hooks: list = []
        self.hidden: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]] = {}
        # Sparse selection's fixed part per (fb, last, sinks, recent start): see `fixed`.
        self.fixed_cache: dict[tuple[int, int, int, int], list] = {}
        if speculate:
            self._install_speculation()
        self.new_sequence()

    def resize(self, windows: list[int | None], batch: int) -> None:
        """Per-layer state for a page table of one row per layer and sequence of a batch of `batch` (row
        l * batch + b: layer l of sequence b), `windows` giving each row's sliding window."""
        self.windows, self.batch, self.layers = windows, batch, len(windows)
        # Key summaries of every block, kept on the device: [rows, max_blocks, S, H, D]. Not KV bytes.
        size = self.selector.summary_size(self.block, self.dtype)
        self.summaries = torch.zeros((self.layers, self.max_blocks, size, self.kv_heads, self.head_dim),
                                     dtype=self.dtype, device=self.device)
        self.summary_rows = list(self.summaries)  # per-row views, made once
        self.history = None
        if self.config.history > 0:
            # [rows, max_blocks, choosers], in a flat tensor with one spare row more: the one `scores_batch` writes
            # its padding to.
            self.history_flat = torch.zeros((self.layers * self.max_blocks + 1, self.choosers), dtype=torch.float32,
                                            device=self.device)
            self.history = self.history_flat[:-1].view(self.layers, self.max_blocks, self.choosers)
            self.history_rows = list(self.history)

    def reorder(self, rows: torch.Tensor, sources: torch.Tensor) -> None:
        """Beam search: row rows[i] goes on from row sources[i] (`Runtime.reorder`): their summaries, attention
        history and the selector's state; what the prefetch context remembers of those rows is dropped."""
        dev_rows, dev_srcs = rows.to(self.device), sources.to(self.device)
        self.summaries[dev_rows] = self.summaries[dev_srcs].clone()
        if self.history is not None:
            self.history[dev_rows] = self.history[dev_srcs].clone()
        self.selector.reorder(dict(zip(rows.tolist(), sources.tolist())))
        for row in rows.tolist():
            self.context.last_selected.pop(row, None)
            self.context.predicted_pages.pop(row, None)
            self.last_count.pop(row, None)

    def new_sequence(self) -> None:
        self.context = PrefetchContext()
        self.context.history = self.history_pages
        self.mass: torch.Tensor | None = None  # the predicted attention share of the pages chosen last
        self.last_count: dict[int, int] = {}  # blocks per chooser of each layer's last choice (streaming path)
        self.selector.reset()
        if self.history is not None:
            self.history.zero_()
        # Recall diagnostic, accumulated on the device: covered mass, pages touched (the union over heads) and
        # the pages' worth of blocks each head attends (without the tail), per layer.
        self.recall_sum = torch.zeros(self.layers, dtype=torch.float64, device=self.device)
        self.oracle_sum = torch.zeros(self.layers, dtype=torch.float64, device=self.device)
        self.union_sum = torch.zeros(self.layers, dtype=torch.float64, device=self.device)
        self.recall_n = [0] * self.layers
        self.sparse_n = [0] * self.layers
        self.head_pages = [0.0] * self.layers

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()

    # -- summaries -------------------------------------------------------------------------------------------
    def summary_bytes(self) -> int:
        """Bytes the block summaries take on the device (allocated for the longest sequence the pages allow)."""
        return self.summaries.numel() * self.summaries.element_size()

    def _blocks(self, k: torch.Tensor) -> torch.Tensor:
        """Keys of pages [n, H, P, D] -> keys of their blocks [n * R, H, B, D] (block order)."""
        n, h, _, d = k.shape
        return k.reshape(n, h, self.per_page, self.block, d).transpose(1, 2).reshape(n * self.per_page, h,
                                                                                     self.block, d)

    def summarize(self, layer: int, pages: list[int], k: torch.Tensor) -> None:
        """Summaries of the blocks of full pages `pages` (consecutive) of `layer` from their keys k [n, H, P, D]."""
        if pages:
            R = self.per_page
            self.summaries[layer, pages[0] * R:(pages[-1] + 1) * R] = self.selector.summarize(self._blocks(k))

    def summarize_page(self, layer: int, page: int, k: torch.Tensor) -> None:
        """The summaries of the blocks of one page that just filled, from its keys k [1, H, P, D]."""
        R = self.per_page
        self.summaries[layer, page * R:(page + 1) * R] = self.selector.summarize(self._blocks(k))

    # -- selection -------------------------------------------------------------------------------------------
    def budget(self, layer: int, n: int) -> BlockPlan | None:
        """The sparse step of `layer` with n tokens stored (the tail page holding the last ones); None when it is
        exact: a dense layer, or a budget that covers every token the query sees."""
        if layer // self.batch < self.config.dense_layers:
            return None
        P, B = self.page_size, self.block
        first, off = window_start(self.windows[layer], n, P)
        last = -(-n // P) - 1
        valid = n - last * P
        visible = n - first * P - off
        budget = self.config.token_budget_for(visible)
        start = first * P + off
        fb = start // B
        nb = last * self.per_page - fb
        k_blocks = max(0, (budget - valid) // B)
        if budget >= visible or k_blocks >= nb:
            return None
        return BlockPlan(first, last, valid, fb, nb, k_blocks, start - fb * B)

    def fixed(self, plan: BlockPlan) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The selection's fixed part among the candidate blocks: the sink blocks (from the window's first visible
        one, which is always kept when the window starts inside it) and the recent window, as device tensors
        (block ids [nf, choosers] in position order, and a bias over the candidates that is -inf on them), and how
        many blocks the scores add (the budget's blocks less the fixed ones; none when those take it all).
        Cached: they change at page boundaries and as the tail fills past a block of the recent window."""
        hit = self._fixed(plan)
        ids = hit[0]
        if len(hit) == 1:  # the device tensors, made once
            bias = torch.zeros(plan.nb, dtype=torch.float32)
            bias[[b - plan.fb for b in ids]] = float("-inf")
            forced = torch.tensor(ids, dtype=torch.long, device=self.device)
            hit += [forced[:, None].expand(len(ids), self.choosers), bias.to(self.device)[:, None]]
        return hit[1], hit[2], plan.k_blocks - len(ids)

    def fixed_ids(self, plan: BlockPlan) -> list[int]:
        """`fixed`'s block ids, as Python ints (host work alone, cached with them)."""
        return self._fixed(plan)[0]

    def _fixed(self, plan: BlockPlan) -> list:
        """The cache entry of the plan's fixed blocks: [ids], then their tensors once `fixed` made them."""
        B, R = self.block, self.per_page
        end = plan.last * R
        sinks = -(-self.config.sink_tokens // B)
        if plan.cut:
            sinks = max(sinks, 1)
        recent = max(0, self.config.recent_tokens - plan.valid)
        lo = max(plan.fb, end - -(-recent // B))
        key = (plan.fb, plan.last, sinks, lo)
        hit = self.fixed_cache.get(key)
        if hit is None:
            if len(self.fixed_cache) > 64:
                self.fixed_cache.clear()
            hit = self.fixed_cache[key] = [sorted(set(range(plan.fb, min(plan.fb + sinks, end))) | set(range(lo, end)))]
        return hit

    def scores(self, layer: int, q: torch.Tensor, plan: BlockPlan, scaling: float,
               guess: bool = False) -> torch.Tensor:
        """Predicted share of attention of the candidate blocks for queries q [H, M, D] (float32), per chooser:
        float32 [nb, choosers]. `guess`: q is a speculated query, which leaves the policy's state and the history
        unchanged."""
        if not guess:
            q = self.selector.query(layer, q)
        summaries = self.summary_rows[layer].narrow(0, plan.fb, plan.nb)
        share = torch.softmax(self.selector.bound(q, summaries, scaling), dim=0)  # [nb, H, M]
        share = self._by_chooser(share, self.selector.keep(summaries))
        if self.history is not None:
            w = self.config.history
            past = self.history_rows[layer].narrow(0, plan.fb, plan.nb)
            if guess:
                return torch.lerp(share, past, w)
            past.mul_(HISTORY_DECAY).add_(share, alpha=1 - HISTORY_DECAY)
            share = torch.lerp(share, past, w)
        return share

    def _by_chooser(self, share: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Shares of attention [..., H, M] per chooser [..., choosers] (summed over the query rows of a KV head, over
        everything, or one per query head), blocks the policy always keeps (`keep` [..., H]) lifted above all."""
        if self.mode == "kv":
            share = share.sum(-1)
        elif self.mode == "shared":
            share = share.sum((-2, -1)).unsqueeze(-1)
        else:
            share = share.flatten(-2)
        if keep is not None:
            if self.mode == "shared":
                keep = keep.any(-1, keepdim=True)
            elif self.mode == "query":
                keep = keep.repeat_interleave(self.q_heads // self.kv_heads, dim=-1)
            share = share + keep * KEEP
        return share

    def scores_batch(self, layers: list[int], rows: torch.Tensor, q: torch.Tensor, fb: torch.Tensor,
                     nb: torch.Tensor, most: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`scores` for sequences of a batch at once: rows `layers` (page table rows; `rows` the same as an int64
        tensor [B]), queries q [B, H, M, D] (float32; the policy's per-row state, if any, taken for all at once,
        `query_batch`), candidate blocks fb[b]..fb[b]+nb[b]-1 (int64 device tensors [B]), `most` the largest nb. The
        sequences' heads are scored side by side as the heads of one (a policy's bound and keep are per head).
        Returns (shares [B, most, choosers], 0 past a sequence's candidates; the candidates' rows in the summaries
        seen as [rows * max_blocks, ...] [B, most]; the padding, bool [B, most])."""
        q = self.selector.query_batch(layers, q)
        B, H, M, D = q.shape
        j = torch.arange(most, device=self.device)
        pad = j >= nb[:, None]
        cand = rows[:, None] * self.max_blocks + fb[:, None] + torch.minimum(j, nb[:, None] - 1)
        flat = self.summaries.view(-1, *self.summaries.shape[2:])
        summaries = flat.index_select(0, cand.view(-1)).view(B, most, -1, H, D)
        # A CPU scores in pieces of sequences (`CPU_PIECE_BLOCKS`: a sketch rebuilds every key of the candidates);
        # a GPU scores the batch at once.
        per = B if self.device.type == "cuda" else max(1, CPU_PIECE_BLOCKS // most)
        bound = torch.cat([self.selector.bound_batch(q[i:i + per], summaries[i:i + per], scaling)
                           for i in range(0, B, per)]) if per < B else self.selector.bound_batch(q, summaries, scaling)
        share = torch.softmax(bound.masked_fill(pad[:, :, None, None], float("-inf")), dim=1)
        share = self._by_chooser(share, self.selector.keep_batch(summaries)).masked_fill_(pad[:, :, None], 0.0)
        if self.history is not None:  # as `scores` updates and mixes each row's, the padding's to the spare row
            flat = self.history_flat
            past = flat.index_select(0, cand.view(-1)).view(share.shape)
            past.mul_(HISTORY_DECAY).add_(share, alpha=1 - HISTORY_DECAY)
            flat.index_copy_(0, torch.where(pad, flat.shape[0] - 1, cand).view(-1), past.view(-1, share.shape[-1]))
            share = torch.lerp(share, past, self.config.history).masked_fill_(pad[:, :, None], 0.0)
        return share, cand, pad

    def choose(self, layer: int, q: torch.Tensor, plan: BlockPlan, scaling: float, guess: bool = False
               ) -> torch.Tensor:
        """Blocks each chooser attends besides the tail: int64 [nf + free, choosers] on the device, the fixed
        part first (in position order) then the best-scored others. Sets `mass`: the share of each page."""
        forced, bias, free = self.fixed(plan)
        self.mass = None
        if free <= 0:
            return forced
        scores = self.scores(layer, q, plan, scaling, guess)
        # The predicted share of attention of each page feeds the score eviction policy.
        self.mass = torch.zeros(plan.last, dtype=torch.float32, device=self.device).index_add_(
            0, torch.arange(plan.fb, plan.fb + plan.nb, device=self.device) // self.per_page, scores.sum(1))
        return top_blocks(forced, scores, bias, free, plan.fb)

    def select(self, layer: int, q: torch.Tensor, n: int, scaling: float
               ) -> tuple[torch.Tensor, torch.Tensor | None, BlockPlan | None]:
        """For the streaming path: (full pages to attend, CPU ids in page order; the blocks chosen per chooser or
        None when the step is exact; the plan). The pages are remembered for temporal prefetch."""
        plan = self.budget(layer, n)
        if plan is None:
            self.mass = None
            first = window_start(self.windows[layer], n, self.page_size)[0]
            pages, chosen = torch.arange(first, -(-n // self.page_size) - 1), None
        else:
            chosen = self.choose(layer, q, plan, scaling)
            pages = torch.unique(chosen.flatten() // self.per_page).cpu()
            self.last_count[layer] = chosen.shape[0]
        self.context.last_selected[layer] = pages
        return pages, chosen, plan

    def hide(self, plan: BlockPlan, chosen: torch.Tensor, first: int, off: int):
        """For the streaming path's partials: `hide(pages)` -> bool [n, H, M, P] (broadcastable; True hides the
        key from that query row): each head sees only its own blocks, and no token before the window's start."""
        R, B, P = self.per_page, self.block, self.page_size
        seen = self._seen(chosen, plan.last * R)
        if off:  # tokens of the window's first page before its start
            edge = torch.zeros(P, dtype=torch.bool, device=self.device)
            edge[:off] = True
        heads = self.kv_heads if self.mode != "shared" else 1
        rows = self.choosers // heads

        def hidden(pages: torch.Tensor) -> torch.Tensor:
            idx = pages.to(self.device)
            blocks = seen.view(plan.last, R, self.choosers).index_select(0, idx)  # [n, R, C]
            out = (~blocks).repeat_interleave(B, dim=1).permute(0, 2, 1)  # [n, C, P]
            out = out.reshape(idx.numel(), heads, rows, P)
            if off:
                out = out | ((idx == first)[:, None, None, None] & edge)
            return out

        return hidden

    def _seen(self, chosen: torch.Tensor, blocks: int) -> torch.Tensor:
        """Bool [blocks, choosers]: True where a chooser chose the block (`chosen` [count, choosers] ids)."""
        return torch.zeros((blocks, self.choosers), dtype=torch.bool, device=chosen.device).scatter_(0, chosen, True)

    def history_pages(self, layer: int) -> torch.Tensor | None:
        """The pages holding the blocks `layer`'s attention history ranks highest, as many per chooser as its last
        choice held (CPU ids; the runtime keeps those in the window); None without a history or a choice yet."""
        count = self.last_count.get(layer)
        if self.history is None or count is None:
            return None
        top = torch.topk(self.history_rows[layer], count, dim=0).indices
        return torch.unique(top.flatten() // self.per_page).cpu()

    # -- speculation (InfiniGen) -----------------------------------------------------------------------------
    def _install_speculation(self) -> None:
        """Captures each attention module's input so that layer L can guess layer L+1's query. Gemma 3 rotates
        local and global layers with different frequencies: there the rotary embedding's output is captured per
        layer type, since layer L+1's may differ from layer L's."""
        model = self.model
        self.attn_modules = [layer.self_attn for layer in decoder_layers(model)]
        self.model_type = model.config.model_type
        self.rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rope_types: list[str] | None = None

        def capture(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is not None and hidden.shape[1] == 1:
                self.hidden[module.layer_idx] = (hidden, kwargs.get("position_embeddings"))

        for m in self.attn_modules:
            self.hooks.append(m.register_forward_pre_hook(capture, with_kwargs=True))
        rotary = getattr(model.model, "rotary_emb", None)
        if self.model_type == "gemma3_text" and rotary is not None:
            self.rope_types = list(model.config.layer_types)

            def capture_rope(module, args, kwargs, output):
                layer_type = args[2] if len(args) > 2 else kwargs.get("layer_type")
                self.rope[layer_type] = output

            self.hooks.append(rotary.register_forward_hook(capture_rope, with_kwargs=True))

    def speculate(self, layer: int, scaling: float, tokens_next: int) -> None:
        """Predicts the pages of the same sequence's next layer (row layer + batch, holding `tokens_next` tokens)
        from this layer's input and the next layer's own query projection, q-norm and rotary (see
        `models.query_before_rotary` for each architecture)."""
        B = self.batch
        nxt = layer + B
        model_layer, b = divmod(layer, B)
        captured = self.hidden.get(model_layer)
        if b == B - 1:
            self.hidden.pop(model_layer, None)
        if nxt >= self.layers or captured is None or tokens_next == 0:
            return
        q = self.speculated_query(model_layer + 1, *captured, b)
        if q is None:
            return  # no rotary to apply: no prediction (the layer then loads what it misses on demand)
        plan = self.budget(nxt, tokens_next + 1)
        if plan is None:
            first = window_start(self.windows[nxt], tokens_next + 1, self.page_size)[0]
            predicted = torch.arange(first, -(-(tokens_next + 1) // self.page_size) - 1)
        else:
            mass = self.mass
            chosen = self.choose(nxt, am.group_queries(q, self.kv_heads).float(), plan, scaling, guess=True)
            self.mass = mass  # the prediction's mass is not this layer's
            predicted = torch.unique(chosen.flatten() // self.per_page).cpu()
        self.context.predicted_pages[nxt] = predicted

    def speculated_query(self, nxt: int, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                         b: int = 0) -> torch.Tensor | None:
        """Model layer `nxt`'s query [1, Hq, 1, D] for sequence b of the attention input `hidden` [batch, 1, hidden],
        rotated by `rope` (the position embeddings the previous layer got; Gemma 3: those of `nxt`'s layer type)."""
        if self.rope_types is not None:
            rope = self.rope.get(self.rope_types[nxt])
        if rope is None:
            return None
        if hidden.shape[0] > 1:
            hidden = hidden[b:b + 1]
            rope = tuple(r[b:b + 1] if r.shape[0] > 1 else r for r in rope)
        module = self.attn_modules[nxt]
        return apply_rotary(module, query_before_rotary(self.model_type, module, hidden, self.head_dim), *rope)

    # -- recall diagnostic -----------------------------------------------------------------------------------
    def record_recall(self, layer: int, q: torch.Tensor, k: torch.Tensor, base: int, plan: BlockPlan | None,
                      chosen: torch.Tensor | None, scaling: float, softcap: float | None) -> None:
        """Dense attention of queries q [H, M, D] (one token) over keys k [count, H, P, D] of pages base..last (the
        tail last), to find the share of attention mass the chosen blocks (per chooser, without the tail) and the
        tail cover, averaged over query heads; also the pages the choice touched. An exact step covers all."""
        if plan is None:
            self.record_exact(layer)
            return
        self.recall_n[layer] += 1
        P, R, B = self.page_size, self.per_page, self.block
        count, heads = k.shape[0], k.shape[1]
        s = torch.matmul(q.float()[None], k.float().transpose(-1, -2)) * scaling  # [count, H, M, P]
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        pos = torch.arange(base * P, (base + count) * P, device=s.device).view(count, 1, 1, P)
        s = s.masked_fill((pos < plan.fb * B + plan.cut) | (pos >= plan.last * P + plan.valid), float("-inf"))
        p = torch.softmax(s.permute(1, 2, 0, 3).reshape(heads * s.shape[2], count * P), dim=-1)  # [Hq, tokens]
        full = (plan.last - base) * P
        mass = p[:, :full].reshape(p.shape[0], full // B, B).sum(-1)  # [Hq, blocks base*R..last*R-1]
        seen = self._seen(chosen - base * R, full // B)

        def per_query_of(by_chooser: torch.Tensor) -> torch.Tensor:  # [blocks, choosers] -> [blocks, Hq]
            if self.mode == "shared":
                return by_chooser.expand(-1, p.shape[0])
            if self.mode == "kv":
                return by_chooser.repeat_interleave(p.shape[0] // heads, 1)
            return by_chooser

        per_query = per_query_of(seen)
        covered = (mass * per_query.t()).sum(-1) + p[:, full:].sum(-1)
        self.recall_sum[layer] += covered.mean()
        # The oracle at the same granularity: the same fixed blocks, then as many others as were chosen, those with
        # the most true mass for each chooser (summed over its query heads).
        forced = self.fixed(plan)[0][:, 0] - base * R
        chooser_mass = {"shared": mass.sum(0, keepdim=True), "kv": mass.view(heads, -1, mass.shape[1]).sum(1),
                        "query": mass}[self.mode].t()  # [blocks, choosers]
        best = torch.zeros_like(seen)
        best[forced] = True
        free = chosen.shape[0] - forced.numel()
        if free > 0:
            ranked = chooser_mass.masked_fill(best, float("-inf"))
            ranked[:plan.fb - base * R] = float("-inf")  # before the window
            best.scatter_(0, ranked.topk(free, dim=0).indices, True)
        best = per_query_of(best)
        self.oracle_sum[layer] += ((mass * best.t()).sum(-1) + p[:, full:].sum(-1)).mean()
        self.union_sum[layer] += seen.view(-1, R, self.choosers).any(2).any(1).sum()
        self.sparse_n[layer] += 1
        self.head_pages[layer] += chosen.shape[0] / R

    def record_exact(self, layer: int) -> None:
        """A step of `layer` that attended every token: all of the mass covered."""
        self.recall_n[layer] += 1
        self.recall_sum[layer] += 1.0
        self.oracle_sum[layer] += 1.0

    def recall(self) -> dict | None:
        """Per layer and mean: the attention mass covered, and what an oracle choosing as many blocks of the same
        size by their true mass covers (`oracle`, with `of_oracle` the ratio of the means); over sparse steps, the
        pages a step touched (the union over heads) and the pages' worth of blocks each head attended (tails not
        counted)."""
        if not any(self.recall_n):
            return None

        def per_layer(sums: torch.Tensor) -> list[float | None]:
            return [s / n if n else None for s, n in zip(sums.cpu().tolist(), self.recall_n)]

        def mean(values: list[float | None]) -> float:
            seen = [r for r in values if r is not None]
            return sum(seen) / len(seen)

        covered, oracle = per_layer(self.recall_sum), per_layer(self.oracle_sum)
        steps = sum(self.sparse_n)
        touched = float(self.union_sum.sum())
        return {"per_layer": covered, "mean": mean(covered), "oracle_per_layer": oracle, "oracle": mean(oracle),
                "of_oracle": mean(covered) / mean(oracle), "union_pages": touched / max(1, steps),
                "pages_per_head": sum(self.head_pages) / max(1, steps)}
