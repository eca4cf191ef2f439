"""Decoding over a stateful next-token function, independent of any task or model layout.

A decoder is two functions a task provides:

    step(state, tokens) -> (logits [B, V], state)   tokens: the last chosen token per row
                                                    (None at the first step)
    reorder(state, rows) -> state                   keep / repeat rows (beam search)

so that beam search and a key-value cache plug in without another redesign. Greedy decoding,
top-k / top-p sampling and beam search are here; a finished row keeps receiving `end_id` (the step function leaves its
prefix as it is).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

StepFn = Callable[[Any, torch.Tensor | None], tuple[torch.Tensor, Any]]
ReorderFn = Callable[[Any, torch.Tensor], Any]


def _one_token_at_a_time(step: StepFn, state: Any, rows: int, max_len: int, end_id: int,
                         choose: Callable[[torch.Tensor], torch.Tensor]) -> list[list[int]]:
    """Each row's tokens (without `end_id`) as `choose(logits [B, V]) -> [B]` picks them."""
    words: list[list[int]] = [[] for _ in range(rows)]
    done = torch.zeros(rows, dtype=torch.bool)
    tokens: torch.Tensor | None = None
    for _ in range(max_len):
        logits, state = step(state, tokens)
        pred = choose(logits).cpu()
        for i, p in enumerate(pred.tolist()):
            if done[i]:
                continue
            if p == end_id:
                done[i] = True
            else:
                words[i].append(int(p))
        if bool(done.all()):
            break
        tokens = torch.where(done, torch.full_like(pred, end_id), pred)
    return words


@torch.no_grad()
def greedy(step: StepFn, state: Any, rows: int, max_len: int, end_id: int,
           banned: torch.Tensor | None = None) -> list[list[int]]:
    """The greedy token sequence of each row (without `end_id`), at most `max_len` tokens.

    Args:
        step: the next-token function.
        state: its initial state.
        rows: the batch size.
        max_len: the length budget (tokens, `end_id` excluded).
        end_id: the token that ends a row.
        banned: token ids never chosen (padding, [CLS], [MASK]...).
    """
    def choose(logits: torch.Tensor) -> torch.Tensor:
        if banned is not None and len(banned):
            logits[:, banned.to(logits.device)] = float("-inf")
        return logits.argmax(-1)

    return _one_token_at_a_time(step, state, rows, max_len, end_id, choose)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits with everything outside the top k (0: no limit) and outside the nucleus set to
    -inf: the smallest set of most likely tokens whose probability reaches `top_p` (the most
    likely token always stays)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p.
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


@torch.no_grad()
def sample(step: StepFn, state: Any, rows: int, max_len: int, end_id: int,
           top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
           banned: torch.Tensor | None = None,
           generator: torch.Generator | None = None) -> list[list[int]]:
    """A sampled token sequence per row (without `end_id`): each token drawn from the softmax
    of logits / `temperature`, restricted to the top k and the top-p nucleus
    (`filter_logits`). `generator` (CPU) makes the draws reproducible."""
    if temperature <= 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sampling needs temperature > 0, top_k >= 0, 0 < top_p <= 1 (got "
                         f"{temperature}, {top_k}, {top_p})")
    def choose(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float().cpu() / temperature
        if banned is not None and len(banned):
            logits[:, banned] = float("-inf")
        probs = filter_logits(logits, top_k, top_p).softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _one_token_at_a_time(step, state, rows, max_len, end_id, choose)


def sample_with_log_probs(step: StepFn, state: Any, rows: int, max_len: int, end_id: int,
                          top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                          banned: torch.Tensor | None = None,
                          generator: torch.Generator | None = None,
                          ) -> tuple[list[list[int]], torch.Tensor]:
    """Sampled sequences, as `sample`, and each one's mean log-probability [rows] with its
    gradient (SCST): the log-probability of each drawn token under the distribution it was
    drawn from (logits / temperature, filtered), summed over the tokens and the end token
    and divided by their number, as Oscar's sampling returns it. A row that reaches `max_len`
    without ending counts its `max_len` tokens."""
    if temperature <= 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sampling needs temperature > 0, top_k >= 0, 0 < top_p <= 1 (got "
                         f"{temperature}, {top_k}, {top_p})")
    words: list[list[int]] = [[] for _ in range(rows)]
    live = torch.ones(rows, dtype=torch.bool)
    total: torch.Tensor | None = None
    count = torch.zeros(rows)
    tokens: torch.Tensor | None = None
    for _ in range(max_len):
        logits, state = step(state, tokens)
        logits = logits.float() / temperature
        if banned is not None and len(banned):
            logits = logits.index_fill(1, banned.to(logits.device), float("-inf"))
        logp = torch.log_softmax(filter_logits(logits, top_k, top_p), dim=-1)
        with torch.no_grad():
            pred = torch.multinomial(logp.detach().exp().cpu(), 1, generator=generator)[:, 0]
        chosen = logp.gather(1, pred.to(logp.device)[:, None])[:, 0]
        counted = live.clone().to(chosen.device)
        chosen = torch.where(counted, chosen, torch.zeros_like(chosen))
        total = chosen if total is None else total + chosen
        count += live.float()
        for i, p in enumerate(pred.tolist()):
            if live[i]:
                if p == end_id:
                    live[i] = False
                else:
                    words[i].append(int(p))
        if not bool(live.any()):
            break
        tokens = torch.where(live, pred, torch.full_like(pred, end_id))
    assert total is not None
    return words, total / count.to(total.device)


def _log_probs(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """fp32 log-probabilities on the CPU, banned tokens at -inf."""
    logp = torch.log_softmax(logits.float().cpu(), dim=-1)
    if banned is not None and len(banned):
        logp[:, banned] = float("-inf")
    return logp


def _keep(hyps: list[tuple[float, list[int]]], seq: list[int], total: float,
          length_penalty: float, k: int) -> None:
    """Add a finished hypothesis, scored total / length ** penalty (length: its tokens and
    the end), to a best-first list of at most k."""
    hyps.append((total / (len(seq) + 1) ** length_penalty, seq))
    hyps.sort(key=lambda h: -h[0])
    del hyps[k:]


@torch.no_grad()
def beam_search(step: StepFn, reorder: ReorderFn, state: Any, rows: int, max_len: int,
                end_id: int, beam: int = 5, length_penalty: float = 1.0, n_best: int = 1,
                banned: torch.Tensor | None = None,
                ) -> list[list[tuple[list[int], float]]]:
    """The `n_best` highest-scoring sequences of each row, best first, as (tokens, score).

    Beam search as the Oscar code ran it (the beam hypotheses of transformers' generation code
    of its time): each step keeps the `beam` best live prefixes of a row by summed
    log-probability, from the best 2 x `beam` continuations; a continuation by `end_id` among
    the first `beam` of them finishes a hypothesis, scored sum of log-probabilities / length **
    `length_penalty` (length: the tokens chosen, `end_id` included; 0 ranks by the plain sum,
    above 1 favours longer captions). A row is done once it holds `beam` finished hypotheses
    and no live prefix can beat the worst of them (at the current length); at `max_len` the
    live prefixes join as they are. `beam=1` with `length_penalty=0` is greedy decoding.

    Args:
        step, reorder: the next-token function and the row selection of its state.
        state: the initial state of `rows` rows (one per input); it is widened to rows x beam.
        max_len: the length budget (tokens, `end_id` excluded).
        banned: token ids never chosen.
    """
    if beam < 1 or not 1 <= n_best <= beam:
        raise ValueError(f"beam search needs beam >= 1 and 1 <= n_best <= beam "
                         f"(got {beam}, {n_best})")
    k = beam
    state = reorder(state, torch.arange(rows).repeat_interleave(k))
    # Only the first copy of each row is live at the start: k equal prefixes would fill the
    # beam with one continuation k times.
    scores = torch.full((rows, k), float("-inf"))
    scores[:, 0] = 0.0
    prefixes: list[list[int]] = [[] for _ in range(rows * k)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(rows)]
    done = [False] * rows
    tokens: torch.Tensor | None = None

    def add(r: int, seq: list[int], total: float) -> None:
        _keep(finished[r], seq, total, length_penalty, k)

    for t in range(max_len):
        logits, state = step(state, tokens)
        logp = _log_probs(logits, banned)
        vocab = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(rows, k * vocab)
        top_s, top_i = cand.topk(min(2 * k, k * vocab), dim=1)
        new_scores = torch.full((rows, k), float("-inf"))
        src = torch.zeros(rows * k, dtype=torch.long)
        nxt = torch.full((rows * k,), end_id, dtype=torch.long)
        new_prefixes: list[list[int]] = []
        for r in range(rows):
            live: list[tuple[float, int, int]] = []
            if not done[r]:
                for rank, (sc, idx) in enumerate(zip(top_s[r].tolist(), top_i[r].tolist())):
                    if sc == float("-inf"):
                        break
                    b, tok = divmod(idx, vocab)
                    if tok == end_id:
                        if rank < k:
                            add(r, prefixes[r * k + b], sc)
                    else:
                        live.append((sc, b, tok))
                    if len(live) == k:
                        break
                full = len(finished[r]) == k
                if not live or (full and max(s for s, _, _ in live) / (t + 2) ** length_penalty
                                <= finished[r][-1][0]):
                    done[r] = True
            for j in range(k):
                row = r * k + j
                if not done[r] and j < len(live):
                    sc, b, tok = live[j]
                    new_scores[r, j] = sc
                    src[row], nxt[row] = r * k + b, tok
                    new_prefixes.append(prefixes[r * k + b] + [tok])
                else:
                    src[row] = r * k
                    new_prefixes.append([])
        if all(done):
            break
        scores, prefixes = new_scores, new_prefixes
        state = reorder(state, src)
        tokens = nxt
    else:
        for r in range(rows):
            if not done[r]:
                for j in range(k):
                    if scores[r, j] > float("-inf"):
                        add(r, prefixes[r * k + j], float(scores[r, j]))
    return [[(seq, sc) for sc, seq in hyps[:n_best]] for hyps in finished]


@torch.no_grad()
def constrained_beam_search(step: StepFn, reorder: ReorderFn, state: Any, rows: int,
                            max_len: int, end_id: int, constraints: list[list[Any]],
                            min_satisfied: int = 2, beam: int = 5, length_penalty: float = 1.0,
                            n_best: int = 1, banned: torch.Tensor | None = None,
                            ) -> list[list[tuple[list[int], float]]]:
    """Beam search that puts at least `min_satisfied` of each row's constraints into its
    output, as NoCaps' constrained beam search (Anderson et al. 2017), which Oscar ran with its
    detected tags and 2 to satisfy. A constraint is a token sequence (a tag's word pieces) or a
    list of them, its word forms: any one satisfies it (NoCaps accepts a class's singular and
    plural, "dog" or "dogs").

    A finite-state machine over search states: which constraints are already in the prefix,
    and which form of which one (if any) is half written and how far. Every state keeps its
    own `beam` best prefixes, so a constraint's unlikely first piece still survives in the
    state it leads to. A row's answer is its best finished hypothesis among the states that
    hold min(`min_satisfied`, its number of constraints) or more; if none reached that many
    within `max_len`, the states that hold the most. Scoring and `end_id` as in `beam_search`
    (no early stop: every row runs `max_len` steps unless its beams all end). Returns the
    `n_best` hypotheses of each row, best first, as (tokens, score).
    """
    if beam < 1 or not 1 <= n_best <= beam:
        raise ValueError(f"constrained beam search needs beam >= 1 and 1 <= n_best <= beam "
                         f"(got {beam}, {n_best})")

    def forms(c: Any) -> tuple[tuple[int, ...], ...]:
        alts = c if len(c) and isinstance(c[0], (list, tuple)) else [c]
        return tuple(dict.fromkeys(tuple(a) for a in alts if len(a)))

    cons = [[f for f in dict.fromkeys(forms(c) for c in row) if f] for row in constraints]
    # A hypothesis: (row, done mask, (constraint, form, pieces written) or None, score, tokens).
    Prog = tuple[int, int, int] | None
    Hyp = tuple[int, int, Prog, float, list[int]]
    live: list[Hyp] = [(r, 0, None, 0.0, []) for r in range(rows)]
    finished: dict[tuple[int, int], list[tuple[float, list[int]]]] = {}
    tokens: torch.Tensor | None = None

    def add(r: int, mask: int, seq: list[int], total: float) -> None:
        _keep(finished.setdefault((r, mask), []), seq, total, length_penalty, beam)

    def moves(h: Hyp) -> dict[int, list[tuple[int, Prog]]]:
        """Tokens that change a hypothesis's constraint state -> its new states."""
        r, mask, prog = h[0], h[1], h[2]
        out: dict[int, list[tuple[int, Prog]]] = {}
        nxt_piece = None
        if prog is not None:  # the next piece of the half-written form
            i, a, p = prog
            c = cons[r][i][a]
            nxt_piece = c[p]
            nxt = (mask | 1 << i, None) if p + 1 == len(c) else (mask, (i, a, p + 1))
            out.setdefault(c[p], []).append(nxt)
        for i, alts in enumerate(cons[r]):  # the first piece of a form of one not yet written
            if mask >> i & 1:
                continue
            for a, c in enumerate(alts):
                if prog is not None and prog[0] == i and c[0] == nxt_piece:
                    continue  # the half-written form goes on with this piece already
                target = (mask | 1 << i, None) if len(c) == 1 else (mask, (i, a, 1))
                if target not in out.setdefault(c[0], []):
                    out[c[0]].append(target)
        # Forms that share their first pieces ("dog" / "dogs"): once one is complete, the
        # constraint is satisfied and the others' half-written states add nothing.
        for tok, targets in out.items():
            done = {m for m, pr in targets if pr is None}
            out[tok] = [(m, pr) for m, pr in targets if pr is None or
                        (m | 1 << pr[0]) not in done]
        return out

    for t in range(max_len):
        logits, state = step(state, tokens)
        logp = _log_probs(logits, banned)
        vocab = logp.shape[-1]
        cand = torch.tensor([h[3] for h in live])[:, None] + logp  # [N, V]
        special = [moves(h) for h in live]
        stay = cand.clone()
        # pools: (row, mask, prog) -> [(score, source, token)]
        pools: dict[tuple[int, int, Prog], list[tuple[float, int, int]]] = {}
        for n, sp in enumerate(special):
            for tok, targets in sp.items():
                for mask, prog in targets:
                    pools.setdefault((live[n][0], mask, prog), []).append(
                        (float(cand[n, tok]), n, tok))
                stay[n, tok] = float("-inf")
        # Any other token leaves the constraint state as it is, minus a half-written piece.
        groups: dict[tuple[int, int], list[int]] = {}
        for n, h in enumerate(live):
            groups.setdefault((h[0], h[1]), []).append(n)
        for (r, mask), members in groups.items():
            flat = stay[members].reshape(-1)
            top_s, top_i = flat.topk(min(2 * beam, flat.numel()))
            pool = pools.setdefault((r, mask, None), [])
            for sc, idx in zip(top_s.tolist(), top_i.tolist()):
                pool.append((sc, members[idx // vocab], idx % vocab))
        new_live: list[Hyp] = []
        src: list[int] = []
        for (r, mask, prog), pool in pools.items():
            pool.sort(key=lambda e: -e[0])
            kept = 0
            for rank, (sc, n, tok) in enumerate(pool):
                if sc == float("-inf") or kept == beam:
                    break
                if tok == end_id:
                    if rank < beam:
                        add(r, live[n][1], live[n][4], sc)  # ends in its source's state
                    continue
                new_live.append((r, mask, prog, sc, live[n][4] + [tok]))
                src.append(n)
                kept += 1
        if not new_live:
            live = []
            break
        live = new_live
        state = reorder(state, torch.tensor(src, dtype=torch.long))
        tokens = torch.tensor([h[4][-1] for h in live], dtype=torch.long)
    for r, mask, _, sc, seq in live:
        add(r, mask, seq, sc)
    out = []
    for r in range(rows):
        need = min(min_satisfied, len(cons[r]))
        have = {m: hyps for (row, m), hyps in finished.items() if row == r and hyps}
        if not have:
            out.append([])
            continue
        best = max(bin(m).count("1") for m in have)
        pool_r = [h for m, hyps in have.items() if bin(m).count("1") >= min(need, best)
                  for h in hyps]
        pool_r.sort(key=lambda h: -h[0])
        out.append([(seq, sc) for sc, seq in pool_r[:n_best]])
    return out


class KVCache:
    """Keys and values of positions already encoded, per layer: what `BertSelfAttention`
    asks of a cache (`update`), plus the two operations decoding needs, keeping the first n
    positions and selecting rows (beam search). transformers' own caches change these two
    between minor versions (`crop`'s argument changed meaning within 5.x); this is all vlp uses.
    """

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this layer's new keys and values [B, heads, n, d]; return all of them."""
        if layer_idx in self.layers:
            k, v = self.layers[layer_idx]
            key, value = torch.cat([k, key], dim=2), torch.cat([v, value], dim=2)
        self.layers[layer_idx] = (key, value)
        return key, value

    def length(self) -> int:
        return next(iter(self.layers.values()))[0].shape[2] if self.layers else 0

    def keep(self, n: int) -> None:
        """Forget every position after the first n."""
        self.layers = {i: (k[:, :, :n], v[:, :, :n]) for i, (k, v) in self.layers.items()}

    def select(self, rows: torch.Tensor) -> None:
        """Keep (or repeat) these batch rows, in this order."""
        self.layers = {i: (k.index_select(0, rows.to(k.device)),
                           v.index_select(0, rows.to(v.device)))
                       for i, (k, v) in self.layers.items()}
