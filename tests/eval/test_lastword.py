"""Last-word accuracy: item extraction on WikiText-style text, the batched score against greedy generation item by
item (truncation and mixed lengths included), the CLI flag, and SmolLM2 when it is cached."""

import json
import math

import jax
import numpy as np
import pytest

from research import cli, errors, models
from research.coding import artifact
from research.coding import pack as coding_pack
from research.data import tokenizers
from research.eval import lastword
from research.models import config as mc
from research.models import decode, zoo
from tests import helpers

SNIPPET = (
    " \n"
    " = Robert Smith = \n"
    " \n"
    " He was born in 1950 in the town of Leeds . \n"
    " = = Early life of the singer = = \n"
    " Critics called the new design a truly state @-@ of @-@ the @-@ art . \n"
    " Its population was counted at about 12 @,@ 000 . \n"
    ' He said that the show was " simply wonderful " . \n'
    " She sang on the album of the singer Teddy 's ) . \n"
    " Too short here . \n"
    " 3 : 04 \n"
    " The river flows north through the valley to O'Brien \n"
)


def test_items_of_a_wikitext_snippet():
    assert lastword.items(SNIPPET, min_words=4, limit=None) == [
        ("He was born in 1950 in the town of", " Leeds"),  # " ." dropped; the headings skipped
        ("Critics called the new design a", " truly"),  # "state @-@ of @-@ the @-@ art": no whole word
        ("Its population was counted at", " about"),  # "12 @,@ 000" is a number
        ('He said that the show was " simply', " wonderful"),  # ' " .' dropped
        ("She sang on the album of the singer", " Teddy"),  # "'s ) ." dropped
        ("The river flows north through the valley to", " O'Brien"),  # an inner apostrophe; no final punctuation
    ]  # "Too short here ." (2 words of context) and "3 : 04" (no word) are skipped
    assert lastword.items(SNIPPET, min_words=6, limit=2) == [
        ("He was born in 1950 in the town of", " Leeds"),
        ("Critics called the new design a", " truly"),
    ]
    assert lastword.items(SNIPPET, min_words=100) == []
    with pytest.raises(errors.UserError):
        lastword.items(SNIPPET, limit=0)


@helpers.needs_shared
def test_wikitext_selection_is_fixed():
    got = lastword.items(helpers.WIKITEXT_RAW.read_text(encoding="utf-8"))
    assert len(got) == lastword.LIMIT
    assert got[0].context.startswith("Robert Boulter is an English film") and got[0].target == " Hall"
    assert got[0].context.endswith("Sophie Stanton and Dominic")
    assert all(len(x.context.split()) >= lastword.MIN_WORDS for x in got)


def test_wilson_interval():
    assert lastword.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert lastword.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert lastword.wilson(0, 0) == (0.0, 1.0)


def test_bucket():
    assert [lastword.bucket(n) for n in (1, 16, 17, 64, 65, 100, 129, 1000)] == [16, 16, 20, 64, 80, 112, 160, 1024]


VOCAB, WINDOW = 128, 24  # a byte model over ASCII: its greedy output is always text


@pytest.fixture(scope="module")
def tiny():
    cfg = mc.llama_style(vocab_size=VOCAB, n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=64)
    graphdef, params = models.init(cfg, seed=3)
    params = dict(params, embed=jax.tree.map(lambda x: 10 * x, params["embed"]))  # larger logits: no near-ties
    return graphdef, params


def _greedy(graphdef, params, context: str, n: int) -> str:
    """The model's greedy continuation of `context` by n bytes, from the prompt `evaluate` keeps (window + 1 - n)."""
    prompt = np.frombuffer(context.encode(), np.uint8).astype(np.int32)[-(WINDOW + 1 - n) :]
    out = decode.generate(graphdef, params, prompt[None], n)[0, len(prompt) :]
    return bytes(out.astype(np.uint8).tolist()).decode("ascii")


def test_accuracy_equals_greedy_generation(tiny):
    graphdef, params = tiny
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghij klmnop"))
    # (context bytes, target bytes): short, long (truncated to the window), and exactly the window (25 = 24 + 1);
    # four (prompt, target) lengths in all keep generate's compilations few.
    shapes = [(10, 1), (10, 2), (30, 1), (30, 2), (60, 1), (60, 2), (23, 2), (10, 1), (40, 2), (10, 2)]
    items = []
    for i, (length, n) in enumerate(shapes):
        context = "".join(rng.choice(letters, length))
        target = _greedy(graphdef, params, context, n)
        if i % 3 == 1:  # wrong at one position (the last or the first): not greedy
            j = n - 1 if i % 2 else 0
            target = target[:j] + chr((ord(target[j]) + 1) % VOCAB) + target[j + 1 :]
        items.append(lastword.Item(context, target))
    # The hand computation: greedy generation of as many tokens as the target has, compared, item by item.
    want = [_greedy(graphdef, params, x.context, len(x.target)) == x.target for x in items]
    assert want == [i % 3 != 1 for i in range(len(items))]
    tok = tokenizers.ByteTokenizer()
    r = lastword.evaluate(graphdef, params, tok, items, WINDOW, 3, return_hits=True)
    assert r["hits"] == want
    assert r["correct"] == sum(want) and r["items"] == len(items) and r["accuracy"] == sum(want) / len(items)
    assert r["truncated"] == 5  # the 30-, 40- and 60-byte contexts
    assert r["target_tokens"] == sum(n for _, n in shapes)
    lo, hi = r["interval"]
    assert lo < r["accuracy"] < hi
    # The summed NLL of each target, from full logits of the right-padded sequences (one forward pass).
    seqs = [np.frombuffer((x.context + x.target).encode(), np.uint8).astype(np.int32)[-(WINDOW + 1) :] for x in items]
    inputs = np.zeros((len(seqs), WINDOW), np.int32)
    for row, seq in zip(inputs, seqs):
        row[: len(seq) - 1] = seq[:-1]
    logits = jax.jit(lambda p, x: models.merge(graphdef, p)(x))(params, inputs)  # (N, W, V)
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    nll = [
        -sum(logp[i, len(seq) - 1 - len(x.target) + j, seq[len(seq) - len(x.target) + j]] for j in range(len(x.target)))
        for i, (x, seq) in enumerate(zip(items, seqs))
    ]
    assert r["mean_nll_last_word"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert r["perplexity_last_word"] == pytest.approx(math.exp(np.mean(nll)), rel=1e-5)
    assert "greedy exact match" in r["protocol"] and f"{WINDOW} tokens" in r["protocol"]
    assert lastword.evaluate(graphdef, params, tok, items, WINDOW, 8, return_hits=True)["hits"] == want  # any batch


def test_bad_input(tiny):
    graphdef, params = tiny
    tok = tokenizers.ByteTokenizer()
    with pytest.raises(errors.UserError, match="no last-word items"):
        lastword.evaluate(graphdef, params, tok, [])
    with pytest.raises(errors.UserError, match="exceeds the model's context"):
        lastword.evaluate(graphdef, params, tok, [lastword.Item("a b", " c")], window=65)


def test_cli_lastword_writes_json(tiny, tmp_path, capsys):
    graphdef, params = tiny
    cfg = models.merge(graphdef, params).cfg
    model = tmp_path / "m.zlm"
    meta = artifact.meta(cfg, "byte", "test", "run", None, None)
    coding_pack.pack(jax.tree.map(np.asarray, params), model, meta=meta)
    text = tmp_path / "wiki.raw"
    text.write_text(SNIPPET)
    out = tmp_path / "r.json"
    argv = ["eval", "--model", str(model), "--lastword", "--corpus", str(text), "--json", str(out)]
    assert cli.main([*argv, "--lastword-min-words", "4", "--lastword-limit", "5", "--window", "32"]) == 0
    r = json.loads(out.read_text())
    assert r["items"] == 5 and 0 <= r["correct"] <= 5 and len(r["interval"]) == 2
    assert "the first 5 paragraphs" in r["protocol"] and r["model"] == str(model)
    printed = capsys.readouterr().out
    assert "last-word accuracy" in printed and "Wilson 95%" in printed


REAL = zoo.cached("smollm2-135m", helpers.REAL_MODELS)


@pytest.mark.skipif(REAL is None, reason="SmolLM2-135M not cached (run: ziplm pull smollm2-135m)")
@helpers.needs_shared
def test_real_smollm2_matches_greedy_generation():
    from research import sources

    m = sources.load(str(REAL))
    tok = tokenizers.load(m.tokenizer)
    # Five paragraphs longer than the window whose last word is one token: one prompt shape, one generate compile.
    items = [
        x
        for x in lastword.items(helpers.WIKITEXT_RAW.read_text(encoding="utf-8"), limit=20)
        if len(lastword.encode(tok, x)[1]) == 1 and len(lastword.encode(tok, x)[0]) > 128
    ][:5]
    assert len(items) == 5
    r = lastword.evaluate(m.graphdef, m.params, tok, items, window=128, batch_size=5, return_hits=True)
    assert r["truncated"] == 5  # cut on the left to 128 tokens
    want = []
    for x in items:
        ctx, cont = lastword.encode(tok, x)
        prompt = np.concatenate([ctx, cont])[-129:][: -len(cont)]
        got = decode.generate(m.graphdef, m.params, prompt[None], len(cont))[0, len(prompt) :]
        want.append(bool(np.array_equal(got, cont)))
    assert r["hits"] == want
