"""Last-word prediction accuracy (LAMBADA-style) on WikiText-2 raw test paragraphs: a downstream number offline.

    items = lastword.items(text)                  # the first LIMIT paragraphs with >= MIN_WORDS words of context
    r = lastword.evaluate(graphdef, params, tok, items, window=2048)
    r["accuracy"], r["interval"], r["mean_nll_last_word"], r["protocol"]

Definition. A paragraph is a non-empty line of the raw WikiText file that is not a heading (headings start with
" = "). Its target is its last *whole word*: scanning its whitespace-separated tokens from the end, the first one that
is alphabetic (letters, with apostrophes allowed between letters: "O'Brien", not "'s" or "monitors'") and not a part
of a hyphenated or numeric compound (WikiText writes "well-known" as "well @-@ known" and 1,000 as "1 @,@ 000": a
token next to "@-@", "@,@" or "@.@" is not a whole word). What follows the target (" .", " ) .", ' . "') is dropped;
the context is the paragraph's text before the target, as it stands in the raw file (spaced punctuation and "@-@"
included, as the perplexity protocol scores it); the target keeps its leading space, as LAMBADA's continuation does
(" word"). Each paragraph is scored alone, without the paragraphs before it.

Selection. The first `limit` paragraphs in file order whose context holds at least `min_words` whitespace-separated
tokens (WikiText's spaced punctuation counts as tokens): fixed and deterministic. Defaults MIN_WORDS = 40 and
LIMIT = 300 (WikiText-2 test has 2,183 paragraphs, 1,707 of them long enough); 300 items take SmolLM2-135M about
2-3 minutes on 2 CPU cores. The Wilson 95% interval on 300 items is about +-5 points: compare rows with it.

Scoring. Tokens as lm_eval builds them: context ids = the tokenizer's default prefix (BOS where `tokenizer(text)`
adds one; none for SmolLM2) + encode(context); continuation ids = encode(context + target) minus its first
len(encode(context)) ids (the same tokens as encode(target) whenever the tokenizer does not merge across the
boundary). The sequence context + continuation is left-truncated to window + 1 tokens and its last token dropped
(lm_eval's `inp = (context_enc + continuation_enc)[-(max_length + 1):][:-1]`), so the model reads at most `window`
tokens. One forward pass per item, batched (items sorted by length, right-padded to a few bucketed lengths: causal
attention makes the padding invisible to the scored positions); only the target positions' final hidden states go
through the output head, so no (B, T, V) logits exist. An item is correct iff the argmax at every target position
is the target token. That equals greedy generation of len(continuation) tokens compared with the continuation:
while the generated tokens equal the target's, generation feeds the model exactly the teacher-forced inputs, so
its picks are the teacher-forced argmaxes, and the first position that differs fails both tests. It is how
lm_eval defines LAMBADA's `acc` (`is_greedy`). Also reported: the target's summed NLL in nats, averaged over items
("mean_nll_last_word"), and its exp ("perplexity_last_word", lm_eval's LAMBADA perplexity).
"""

from __future__ import annotations

import functools
import math
import re
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from research import errors, models
from research.eval import metrics

MIN_WORDS = 40
LIMIT = 300
WINDOW = 2048
BATCH_SIZE = 8
# The WikiText-2 raw test file of the workspace's shared data (a sibling of the checkout), when present.
DEFAULT_TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext-2" / "raw" / "wiki.test.raw"

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")  # letters, apostrophes only between letters
_JOINERS = ("@-@", "@,@", "@.@")
_Z95 = 1.959963984540054


class Item(NamedTuple):
    """A context and the word to predict after it (with its leading space: " word")."""

    context: str
    target: str


def split(paragraph: str) -> Item | None:
    """A paragraph's (context, " last whole word"), or None when it holds no whole word (see the module docstring)."""
    text = paragraph.strip()
    toks = list(re.finditer(r"\S+", text))
    for i in range(len(toks) - 1, -1, -1):
        word = toks[i].group()
        joined = (i > 0 and toks[i - 1].group() in _JOINERS) or (i + 1 < len(toks) and toks[i + 1].group() in _JOINERS)
        if _WORD.fullmatch(word) and not joined:
            return Item(text[: toks[i].start()].rstrip(), " " + word)
    return None


def items(text: str, min_words: int = MIN_WORDS, limit: int | None = LIMIT) -> list[Item]:
    """The last-word items of a raw WikiText text: the first `limit` paragraphs (None: all) whose context has at
    least `min_words` whitespace-separated tokens, in file order.

    Args:
      text: raw WikiText (`wiki.test.raw`, or its rows joined with blank lines: the line layout is what counts).
      min_words: the least context length, in whitespace-separated tokens.
      limit: keep the first this many qualifying paragraphs (None: every one).
    """
    if min_words < 0 or (limit is not None and limit < 1):
        raise errors.UserError(f"last-word items need min_words >= 0 and limit >= 1, got {min_words}, {limit}")
    out = []
    for line in text.split("\n"):
        if not line.strip() or line.startswith(" = "):
            continue
        item = split(line)
        if item is not None and len(item.context.split()) >= min_words:
            out.append(item)
            if limit is not None and len(out) == limit:
                break
    return out


def selection(min_words: int = MIN_WORDS, limit: int | None = LIMIT, source: str = "WikiText-2 raw test") -> str:
    """The items' description for a protocol string."""
    first = "every paragraph" if limit is None else f"the first {limit} paragraphs"
    return f"{source}: {first} (file order, headings skipped) with >= {min_words} words of context"


def protocol(selection: str, window: int) -> str:
    """The one-line protocol of a result: the items' selection and the scoring."""
    return (
        f"last-word prediction (LAMBADA-style) on {selection}; target = the last whole word with its leading space; "
        f"greedy exact match (argmax at every target token, as lm_eval's LAMBADA acc), context left-truncated to "
        f"{window} tokens; Wilson 95% interval"
    )


def encode(tokenizer, item: Item) -> tuple[np.ndarray, np.ndarray]:
    """(context ids, continuation ids) as lm_eval builds them (see the module docstring)."""
    prefix = np.asarray(getattr(tokenizer, "added_prefix", np.zeros(0, np.int32)), np.int32)
    ctx = np.asarray(tokenizer.encode(item.context), np.int32)
    whole = np.asarray(tokenizer.encode(item.context + item.target), np.int32)
    cont = whole[len(ctx) :]
    if len(cont) == 0:
        raise errors.UserError(f"the target {item.target!r} encodes to no token after its context")
    return np.concatenate([prefix, ctx]), cont


def wilson(correct: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a proportion correct / n."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bucket(length: int, least: int = 16) -> int:
    """A padded length for `length`: the next multiple of a quarter of its power of two (64, 80, 96, 112, 128, 160,
    ...), so four compiled shapes per octave cover every item with at most a quarter of padding."""
    if length <= least:
        return least
    step = 1 << max(0, (length - 1).bit_length() - 3)
    return -(-length // step) * step


@functools.partial(jax.jit, static_argnums=(0, 5))
def _score(graphdef, params, inputs, positions, targets, attn_chunk):
    """Target log-probabilities and argmax hits: inputs (B, T), positions and targets (B, K) -> (B, K) each."""
    model = models.merge(graphdef, params)
    hidden = model.hidden(inputs, attn_chunk=attn_chunk)  # (B, T, D)
    h = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # (B, K, D): only the target positions
    logp = jax.nn.log_softmax(model.head(h), -1)  # (B, K, V)
    lp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return lp, jnp.argmax(logp, -1) == targets


def evaluate(
    graphdef,
    params,
    tokenizer,
    items: list[Item],
    window: int = WINDOW,
    batch_size: int = BATCH_SIZE,
    *,
    selection: str | None = None,
    progress: bool | None = None,
    desc: str = "last word",
    return_hits: bool = False,
) -> dict:
    """Greedy exact-match accuracy of the items' targets (see the module docstring for the protocol).

    Args:
      graphdef, params: the model, as from `models.split`.
      tokenizer: has `encode(text) -> ids` (and optionally `added_prefix`, ids put before every context).
      items: from `items` (or any list of `Item`).
      window: the most tokens the model reads per item (contexts are left-truncated to fit).
      batch_size: items per forward pass.
      selection: how the items were chosen, for the protocol string (default: "N items").
      progress: show a progress bar (None: only on a terminal).
      desc: progress bar label.
      return_hits: also return "hits", each item's correctness in the items' order.

    Returns:
      {"accuracy", "interval" (Wilson 95%), "correct", "items", "mean_nll_last_word" (nats per target word),
      "perplexity_last_word", "target_tokens", "truncated" (items whose context was cut), "tokens" (model
      inputs, unpadded), "seconds", "protocol"}.
    """
    if not items:
        raise errors.UserError("no last-word items to evaluate (is the text raw WikiText with long paragraphs?)")
    if batch_size <= 0 or window <= 0:
        raise errors.UserError(f"last-word batch size and window must be positive, got {batch_size}, {window}")
    cfg = models.merge(graphdef, params).cfg
    if window > cfg.max_seq_len:
        raise errors.UserError(f"last-word window {window} exceeds the model's context ({cfg.max_seq_len})")
    t0 = time.time()
    seqs, conts, truncated = [], [], 0
    for item in items:
        ctx, cont = encode(tokenizer, item)
        if len(cont) >= window:
            raise errors.UserError(f"the target {item.target!r} has {len(cont)} tokens: no room in window {window}")
        seq = np.concatenate([ctx, cont])
        truncated += len(seq) - 1 > window
        seqs.append(seq[-(window + 1) :][:-1])  # the model's input: at most `window` tokens
        conts.append(cont)
    k = max(len(c) for c in conts)
    order = sorted(range(len(items)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch
    logprob, hit = np.zeros(len(items)), np.zeros(len(items), bool)
    disable = None if progress is None else not progress
    for s in tqdm(range(0, len(order), batch_size), desc=desc, disable=disable, leave=False):
        rows = order[s : s + batch_size]
        t = min(bucket(len(seqs[rows[0]])), window)
        inputs = np.zeros((batch_size, t), np.int32)  # rows past the items are padding, as are positions past K
        positions = np.zeros((batch_size, k), np.int32)
        targets = np.zeros((batch_size, k), np.int32)
        valid = np.zeros((batch_size, k), bool)
        for r, i in enumerate(rows):
            n, c = len(seqs[i]), len(conts[i])
            inputs[r, :n] = seqs[i]
            positions[r, :c] = np.arange(n - c, n)  # the input at n - c + j predicts continuation token j
            targets[r, :c] = conts[i]
            valid[r, :c] = True
        chunk = metrics.auto_attn_chunk(batch_size, cfg.n_head, t)
        lp, ok = (np.asarray(a) for a in _score(graphdef, params, inputs, positions, targets, chunk))
        for r, i in enumerate(rows):
            logprob[i] = lp[r][valid[r]].sum()
            hit[i] = ok[r][valid[r]].all()
    correct, n = int(hit.sum()), len(items)
    nll = float(-logprob.mean())
    return {
        "accuracy": correct / n,
        "interval": list(wilson(correct, n)),
        "correct": correct,
        "items": n,
        "mean_nll_last_word": nll,
        "perplexity_last_word": math.exp(min(nll, 700.0)),
        "target_tokens": int(sum(len(c) for c in conts)),
        "truncated": int(truncated),
        "tokens": int(sum(len(x) for x in seqs)),
        "seconds": time.time() - t0,
        "protocol": protocol(selection or f"{n} items", window),
        **({"hits": hit.tolist()} if return_hits else {}),
    }
