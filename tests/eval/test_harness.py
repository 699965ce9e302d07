"""The lm-evaluation-harness adapter: its log-likelihoods equal log-softmax sums of the model's logits, its rolling
windows are lm_eval's, its generations are `decode.generate`'s greedy output cut at the stop string, and local
tasks run end to end through `lm_eval.simple_evaluate` and `ziplm lm-eval`."""

import json
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

from lm_eval import utils as lm_eval_utils  # noqa: E402
from lm_eval.api import instance as lm_instance  # noqa: E402
from lm_eval.api import registry as lm_registry  # noqa: E402

from research import cli, models, sources  # noqa: E402
from research.coding import artifact  # noqa: E402
from research.eval import harness  # noqa: E402
from research.models import config as mc  # noqa: E402
from research.models import decode  # noqa: E402
from tests import helpers  # noqa: E402

W = 32  # the tiny model's context
CFG = mc.gpt2_style(vocab_size=256, n_layer=2, n_head=2, d_model=32, max_seq_len=W)
MODEL = sources.Model(CFG, *models.init(CFG, 0), "byte", "run", "tiny")

MC_ROWS = [
    {"question": "The sky is", "choices": ["blue", "green grass", "x"], "label": 0},
    {"question": "One plus one is", "choices": ["two", "three", "eleven or twelve"], "label": 0},
    {"question": "Cats say", "choices": ["woof", "meow"], "label": 1},
    {"question": "A long question about the weather in the mountains, asked twice:", "choices": ["rain", "sun"],
     "label": 1},
]  # fmt: skip
GEN_PROMPTS = ["Hello", "Hellp", "Question: why?"]
GEN_KWARGS = {"until": ["."], "max_gen_toks": 8}


@pytest.fixture(scope="module")
def lm():
    return harness.ZiplmLM(MODEL, batch_size=4)


def _requests(kind, args):
    return [lm_instance.Instance(kind, {}, a, i) for i, a in enumerate(args)]


@jax.jit
def _forward(params, tokens):  # (1, W) -> (W, V) log-probabilities
    return jax.nn.log_softmax(models.merge(MODEL.graphdef, params)(tokens)[0], -1)


def _logprobs(inputs) -> np.ndarray:
    """(T, V) log-softmax of the model's logits for a 1-D list of T <= W input ids (right-padded to W: the
    model is causal, so the padding changes no earlier position)."""
    padded = np.zeros((1, W), np.int32)
    padded[0, : len(inputs)] = inputs
    return np.asarray(_forward(MODEL.params, padded))[: len(inputs)]


def _hand_loglikelihood(seq, n):
    """Sum of log p(seq[k] | preceding tokens) over the last n tokens, scored in chunks of W targets from the
    first, each chunk's inputs the W tokens before its last target; and whether every target is the argmax."""
    total, greedy = 0.0, True
    for a in range(len(seq) - n, len(seq), W):
        b = min(a + W, len(seq))
        start = max(0, b - 1 - W)
        lp = _logprobs(seq[start : b - 1])
        for k in range(a, b):
            total += lp[k - 1 - start, seq[k]]
            greedy &= int(lp[k - 1 - start].argmax()) == seq[k]
    return total, greedy


def _byte_pair(context, continuation):
    if not context:
        return [10], list(continuation.encode())  # the byte tokenizer's start token
    stripped = context.rstrip()
    return list(stripped.encode()), list((context[len(stripped) :] + continuation).encode())


def test_loglikelihood_equals_the_log_softmax_of_the_logits(lm):
    greedy_ids = decode.generate(MODEL.graphdef, MODEL.params, np.asarray([list(b"Hi")]), 3)[0, 2:]
    greedy_text = bytes(greedy_ids.tolist()).decode("utf-8", "replace")
    pairs = [
        ("Hello", " world"),
        ("a", "b"),
        ("", "xyz"),  # empty context: scored from the start token
        ("The quick brown fox jumps over the lazy dog. " * 2, " again"),  # context cut from the left
        ("ctx ", "long continuation " * 3),  # the continuation alone is longer than the context: two windows
        ("Hi", greedy_text),
    ]
    got = lm.loglikelihood(_requests("loglikelihood", pairs))
    for pair, (lp, greedy) in zip(pairs, got, strict=True):
        ctx, cont = _byte_pair(*pair)
        want, want_greedy = _hand_loglikelihood(ctx + cont, len(cont))
        assert lp == pytest.approx(want, abs=1e-4), pair
        assert greedy == want_greedy, pair
    if max(greedy_ids) < 128:  # the model's greedy continuation is ASCII: it round-trips through the text
        assert got[-1][1]


@helpers.needs_shared
def test_pairs_split_as_hflm_does():
    from research.data import tokenizers

    tok = tokenizers.load(f"hf:{helpers.GPT2_TOKENIZER}")
    ctx, cont = harness.encode_pair(tok, "The cat ", "sat")
    assert ctx == tok.encode("The cat").tolist() and cont == tok.encode(" sat").tolist()
    ctx, cont = harness.encode_pair(tok, "", "Hello")
    assert ctx == [tok.start_token] and cont == tok.encode("Hello").tolist()


@pytest.mark.parametrize("n", [1, 5, 31, 32, 33, 64, 100])
@pytest.mark.parametrize("width", [4, 32])
def test_rolling_windows_are_lm_eval_s(n, width):
    tokens = list(range(100, 100 + n))
    theirs = [
        (ctx + cont)[-(width + 1) :]
        for ctx, cont in map(
            lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(tokens, 7, width, 1)
        )
    ]
    ours = harness.score_windows([7] + tokens, n, width)
    assert [row for row, _ in ours] == theirs
    assert sum(m for _, m in ours) == n


def test_loglikelihood_rolling_sums_every_token_s_log_probability(lm):
    short, long = "Short text.", "A longer text that will not fit in one context window of 32 bytes, so: windows."
    got = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(short,), (long,)]))
    ids = [10] + list(short.encode())
    lp = _logprobs(ids[:-1])
    assert got[0] == pytest.approx(sum(lp[k, ids[k + 1]] for k in range(len(ids) - 1)), abs=1e-4)
    total = 0.0
    for ctx, cont in map(
        lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(list(long.encode()), 10, W, 1)
    ):
        seq = ctx + cont
        lp = _logprobs(seq[:-1])
        total += sum(lp[k - 1, seq[k]] for k in range(len(seq) - len(cont), len(seq)))
    assert len(long.encode()) > W and got[1] == pytest.approx(total, abs=1e-4)


def test_generate_until_is_greedy_decoding_cut_at_the_stop_string(lm):
    prompts = [("Hello", 12), ("Hellp", 12), ("Hi there, ", None), ("x", 40)]  # two of equal length: one batch
    refs, args = [], []
    for text, limit in prompts:
        ids = list(text.encode())
        new = min(limit or lm.max_gen_toks, W - len(ids))
        out = decode.generate(MODEL.graphdef, MODEL.params, np.asarray([ids]), new)[0, len(ids) :]
        ref = bytes(out.tolist()).decode("utf-8", "replace")
        stop = next((c for c in ref[3:] if c.isascii() and c.isprintable()), None)  # one that occurs, if any
        refs.append(ref[: ref.index(stop)] if stop else ref)
        kwargs = {"until": [stop] if stop else []} | ({"max_gen_toks": limit} if limit else {})
        args.append((text, kwargs))
    assert lm.generate_until(_requests("generate_until", args)) == refs


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (d / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  cache_dir: {d / 'hf-cache'}\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return d


def _write_gen_task(d, answers):
    (d / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in answers))
    (d / "tiny_gen.yaml").write_text(
        "task: tiny_gen\ndataset_path: json\n"
        f"dataset_kwargs:\n  cache_dir: {d / 'hf-cache'}\n  data_files:\n    test: {d / 'gen.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\n"
        'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        f"generation_kwargs: {json.dumps(GEN_KWARGS)}\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )


def _hand_accuracy(lm):
    pairs = [(r["question"], " " + c) for r in MC_ROWS for c in r["choices"]]
    lls = iter(lp for lp, _ in lm.loglikelihood(_requests("loglikelihood", pairs)))
    picks = [int(np.argmax([next(lls) for _ in r["choices"]])) for r in MC_ROWS]
    return np.mean([p == r["label"] for p, r in zip(picks, MC_ROWS, strict=True)])


def test_simple_evaluate_on_local_tasks_reports_the_hand_computed_scores(lm, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    outputs = lm.generate_until(_requests("generate_until", [(p, GEN_KWARGS) for p in GEN_PROMPTS]))
    _write_gen_task(
        task_dir, [(GEN_PROMPTS[0], outputs[0]), (GEN_PROMPTS[1], outputs[1] + "?"), (GEN_PROMPTS[2], outputs[2])]
    )
    results = harness.evaluate(lm, ["tiny_mc", "tiny_gen"], include_path=[str(task_dir)])
    assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(_hand_accuracy(lm))
    assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(2 / 3)
    assert "tiny_mc" in harness.table(results) and results["config"]["model_source"] == "tiny"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.zlm"
    artifact.pack_model(MODEL, path)
    return path


def test_cli_lm_eval_writes_the_results(lm, task_dir, packed, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "lm_eval.json"
    argv = ["lm-eval", "--model", str(packed), "--tasks", "tiny_mc", "--include-path", str(task_dir)]
    assert cli.main([*argv, "--batch-size", "4", "--json", str(out)]) == 0
    assert "tiny_mc" in capsys.readouterr().out
    assert json.loads(out.read_text())["results"]["tiny_mc"]["acc,none"] == pytest.approx(_hand_accuracy(lm))
    by_name = lm_registry.get_model("ziplm").create_from_arg_string(f"pretrained={packed}", {"batch_size": 2})
    assert isinstance(by_name, harness.ZiplmLM) and by_name.batch_size == 2 and by_name.max_length == W


def test_cli_lm_eval_errors_are_one_line(packed, task_dir, monkeypatch, capsys):
    from lm_eval import tasks as lm_tasks

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    class NoDefaults(lm_tasks.TaskManager):  # lm_eval's own ~15,000 task files take 10 s to index
        def __init__(self, include_path=None, include_defaults=True, **kw):
            super().__init__(include_path=include_path or [str(task_dir)], include_defaults=False, **kw)

    monkeypatch.setattr(lm_tasks, "TaskManager", NoDefaults)
    argv = ["lm-eval", "--model", str(packed), "--tasks", "tiny_mc,no_such_task", "--include-path", str(task_dir)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown lm_eval task(s): no_such_task") and "\n" not in err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the harness extra were not installed
    assert cli.main(argv) == 2
    assert "pip install -e '.[harness]'" in capsys.readouterr().err
