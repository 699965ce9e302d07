"""lm-evaluation-harness (`lm_eval`) adapter: any ziplm model as an `lm_eval` language model named "ziplm".

    ziplm lm-eval --model runs/pruned --tasks lambada_openai,hellaswag --limit 200 --json out.json
    ziplm lm-eval --model smollm2-135m --tasks my_task --include-path tasks/   # a local task YAML directory

    from research.eval import harness                                # importing registers the model "ziplm"
    lm = harness.ZiplmLM("runs/pruned", batch_size=16)               # or a loaded `sources.Model`
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])
    lm_eval.simple_evaluate(model="ziplm", model_args="pretrained=model.zlm", tasks=[...])  # by name

The model is anything `research.sources.load` accepts: a run directory, a `ziplm compress` directory or `.zlm`
file, a GGUF file, a Hugging Face checkpoint directory, a zoo name (`smollm2-135m`, once pulled). Its tokenizer is
the one the source names (a run's "byte" or "hf:DIR", a GGUF file's own); `tokenizer=SPEC` overrides it, as the
CLI's --tokenizer does. lm_eval's own command line finds the model once this module is imported:
`python -c "import research.eval.harness, lm_eval.__main__ as m; m.cli_evaluate()" --model ziplm
--model_args pretrained=PATH --tasks ...`. torch is never imported (`ziplm lm-eval` also passes
torch_random_seed=None, so lm_eval does not seed it).

Tokenization (as lm_eval's Hugging Face model, `HFLM`, does by default):
- A (context, continuation) pair: the context's trailing whitespace moves to the front of the continuation, the
  joined text is encoded once and split after as many tokens as the context alone encodes to (so a word that
  tokenizes across the boundary stays one token, counted in the continuation). Both encodings start with the ids
  the tokenizer adds by default (`added_prefix`: BOS for Llama and OPT tokenizers, none for GPT-2 and bytes), as
  `tokenizer(text)` does in HFLM. An empty context is replaced by the start token (below).
- The sequence context + continuation is cut from the left to the model's context (`max_length`, default the
  model's max_seq_len) plus one; the continuation's tokens are scored in one forward pass, or, when the
  continuation alone is longer than the context, in consecutive windows that each give the most context.
- `loglikelihood_rolling`: the text is encoded without special tokens and scored from the start token, in
  disjoint windows of `max_length` targets, the last one with a full context (lm_eval's
  `get_rolling_token_windows(context_len=1)` + `make_disjoint_window`, the protocol of HFLM). The start token is
  the tokenizer's BOS, else its EOS, else id 0; for the byte tokenizer, which has neither, it is "\\n" (byte 10),
  the token a byte model's sequences start from everywhere else in ziplm.
- `generate_until`: greedy. The prompt is encoded like a context and keeps its last max_length - reserve tokens,
  reserve = min(max_gen_toks, max_length // 2) (HFLM keeps max_length - max_gen_toks, which is nothing for a
  model whose context is shorter than max_gen_toks, default 256); at most max_gen_toks tokens are generated, and
  never past the context. The text is cut before the first `until` string, and at the tokenizer's EOS token.
  Sampling arguments (do_sample, temperature) are ignored with a warning: decoding is always greedy.

Batching. Log-likelihood rows are sorted by length (longest first) and run `batch_size` at a time through one
jitted forward of `models.merge(graphdef, params)`: inputs right-padded to a power of two (at least 16, at most
max_length), the scored positions to a power of two (at least 8), the last batch with empty rows, so a whole task
compiles a handful of shapes. Only the scored positions go through the output head (`models.loss.chunked_nll` on
the gathered hidden states), so a batch holds (B, continuation, V) logits, not (B, T, V). Generation uses the KV
cache (`models.decode`): the prompt is prefilled in one padded call (the cache length is then set to the
prompt's, which masks the padding's slots), and tokens are decoded 16 per jitted call until every row of the
batch has met a stop string, EOS or its limit. The cache's length is one number for the whole batch, so only
prompts of equal token length share a batch (padded to a power of two rows); on a task whose prompts all differ
in length, generation runs one prompt at a time.

Offline. Nothing here touches the network: the model and tokenizer load from local files. `ziplm lm-eval` sets
HF_DATASETS_OFFLINE=1 and HF_HUB_OFFLINE=1 unless the environment sets them, so a task whose data set is not in
the Hugging Face cache fails at once (one line naming the data set) instead of retrying downloads. Local tasks (a YAML
with `dataset_path: json` and `dataset_kwargs: {data_files: {test: FILE}}`, given by --include-path) always run;
standard tasks such as `lambada_openai` or `hellaswag` run where their data sets were cached before (on a machine
with a network: `python -c "import datasets; datasets.load_dataset('EleutherAI/lambada_openai', 'default')"`,
or one `lm_eval` run of the task, then copy ~/.cache/huggingface/datasets over).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api import model as lm_model
from lm_eval.api import registry as lm_registry
from lm_eval.models import utils as lm_utils
from tqdm.auto import tqdm

from research import errors, models, sources
from research.data import tokenizers
from research.eval import metrics
from research.models import decode

log = logging.getLogger(__name__)

MIN_LENGTH = 16  # shortest padded input (the buckets are powers of two from here up to max_length)
MIN_SCORED = 8  # fewest scored positions per row that a batch is padded to (powers of two up to its length)
GEN_CHUNK = 16  # tokens decoded per jitted call between stop-string checks
DEFAULT_BATCH = 16


def bucket(n: int, cap: int, lo: int = 1) -> int:
    """The smallest power of two >= max(n, lo), but at most `cap` (itself >= n)."""
    return min(cap, max(lo, 1 << max(0, n - 1).bit_length()))


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the module docstring describes (HFLM's split)."""
    prefix = [int(t) for t in tok.added_prefix]
    if not context:
        return [int(tok.start_token)], [int(t) for t in tok.encode(continuation)]
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped) :] + continuation
    whole = prefix + [int(t) for t in tok.encode(context + continuation)]
    cut = len(prefix) + len(tok.encode(context))
    if cut == 0:  # a context of whitespace only, and no prefix: as an empty one
        return [int(tok.start_token)], whole
    return whole[:cut], whole[cut:]


def score_windows(seq: list[int], n: int, width: int) -> list[tuple[list[int], int]]:
    """Rows that score the last `n` tokens of `seq` (each once, every one with as much context as fits).

    Args:
      seq: token ids; seq[0] is never scored (n <= len(seq) - 1).
      n: how many of the last tokens to score.
      width: the model's context: a row's inputs are at most this many tokens.

    Returns:
      [(row, m)]: row[:-1] are a forward pass's inputs, row[1:] its targets, of which the last m are scored.
    """
    if not 0 <= n < len(seq):
        raise ValueError(f"cannot score {n} of {len(seq)} tokens: the first has no context")
    rows = []
    for a in range(len(seq) - n, len(seq), width):
        b = min(a + width, len(seq))
        rows.append((seq[max(0, b - 1 - width) : b], b - a))
    return rows


@functools.partial(jax.jit, static_argnums=0)
def _score(graphdef, params, inputs, pos, targets, valid):
    """Per row: the summed log-probability of the scored targets and whether each is the argmax.

    inputs (B, T) int; pos (B, M) input positions whose next token is scored; targets (B, M); valid (B, M) bool.
    """
    model = models.merge(graphdef, params)
    b, t = inputs.shape
    hidden = model.hidden(inputs, attn_chunk=metrics.auto_attn_chunk(b, model.cfg.n_head, t))  # (B, T, D)
    picked = jnp.take_along_axis(hidden, pos[..., None], axis=1)  # (B, M, D)
    chunk = models.loss.auto_chunk(b, pos.shape[1], model.cfg.vocab_size)
    nll, correct = models.loss.chunked_nll(model.head, picked, targets, chunk)  # (B, M) each
    return -jnp.sum(jnp.where(valid, nll, 0.0), -1), jnp.all(correct | ~valid, -1)


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=2)
def _greedy(graphdef, params, cache, tok, steps):
    """Feeds tok (B,) and then each greedy pick: (B, steps) new tokens and the cache."""
    model = models.merge(graphdef, params)

    def body(i, carry):
        out, cache, tok = carry
        logits, cache = model(tok[:, None], cache=cache)  # (B, 1, V)
        tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
        return out.at[:, i].set(tok), cache, tok

    out = jnp.zeros((tok.shape[0], steps), jnp.int32)
    out, cache, _ = jax.lax.fori_loop(0, steps, body, (out, cache, tok))
    return out, cache


def _batch_size(value) -> int:
    if value is None or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH  # no memory probing: "auto" is the default
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise errors.UserError(f"batch_size must be a positive integer or 'auto', got {value!r}") from None
    if value < 1:
        raise errors.UserError(f"batch_size must be a positive integer, got {value}")
    return value


@lm_registry.register_model("ziplm")
class ZiplmLM(lm_model.LM):
    """A ziplm model behind lm_eval's `LM` interface (see the module docstring).

    Args:
      pretrained: a source spec for `sources.load` (run, `.zlm`, GGUF, HF directory, zoo name) or a loaded
        `sources.Model`.
      tokenizer: a tokenizer spec or object overriding the model's.
      step, dtype: as for `sources.load` (a run's checkpoint step; compute dtype of HF and GGUF checkpoints).
      batch_size: rows per forward pass (and prompts per generation batch); "auto" is the default, 16.
      max_length: the context used (default and maximum: the model's max_seq_len).
      max_gen_toks: generated tokens when a request names no limit (default 256).
      max_batch_size, device: accepted for lm_eval's command line and ignored (JAX picks the device).
    """

    def __init__(
        self,
        pretrained=None,
        tokenizer=None,
        step=None,
        dtype=None,
        batch_size=DEFAULT_BATCH,
        max_length=None,
        max_gen_toks: int = 256,
        max_batch_size=None,
        device=None,
    ):
        super().__init__()
        if pretrained is None:
            raise errors.UserError("name the model: pretrained=RUN_DIR | FILE.zlm | FILE.gguf | HF_DIR | zoo name")
        m = pretrained if isinstance(pretrained, sources.Model) else sources.load(str(pretrained), step, dtype)
        spec = tokenizer if tokenizer is not None else m.tokenizer
        if spec is None:
            raise errors.UserError(f"{m.source} has no tokenizer files; pass tokenizer=SPEC (byte, hf:DIR)")
        self.tok = tokenizers.load(spec) if isinstance(spec, str) else spec
        self.model = m
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or m.cfg.max_seq_len)
        if not 2 <= self.max_length <= m.cfg.max_seq_len:
            raise errors.UserError(f"max_length must be in 2 .. {m.cfg.max_seq_len} (the model's context)")
        self.max_gen_toks = int(max_gen_toks)
        # The EOS token of a Hugging Face tokenizer ends a generation; the byte tokenizer has none.
        self.eos_id = getattr(getattr(self.tok, "_tok", None), "eos_token_id", None)
        self._warned_sampling = False

    def get_model_info(self) -> dict:
        """What lm_eval records under results["config"]."""
        m = self.model
        return {
            "model_source": str(m.source),
            "model_kind": m.kind,
            "model_step": m.step,
            "tokenizer": getattr(self.tok, "spec", type(self.tok).__name__),
            "max_length": self.max_length,
            "model_num_parameters": int(sum(np.size(x) for x in jax.tree.leaves(m.params))),
        }

    def _prefixed(self, text: str) -> list[int]:
        return [int(t) for t in self.tok.added_prefix] + [int(t) for t in self.tok.encode(text)]

    def _bar(self, total: int, desc: str, disable: bool):
        return tqdm(total=total, desc=desc, disable=disable or total <= self.batch_size, leave=False)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """[(sum of the continuation tokens' log-probabilities in nats, whether every one is the argmax)]."""
        rows, owner = [], []
        for i, (context, continuation) in enumerate(req.args for req in requests):
            ctx, cont = encode_pair(self.tok, context, continuation)
            if cont:
                for row in score_windows(ctx + cont, len(cont), self.max_length):
                    rows.append(row)
                    owner.append(i)
        out = [(0.0, True) for _ in requests]  # an empty continuation has probability one
        for i, (lp, greedy) in zip(owner, self._score_rows(rows, "loglikelihood", disable_tqdm), strict=True):
            out[i] = (out[i][0] + lp, out[i][1] and greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """[log-probability in nats of each whole text, from the start token] (see the module docstring)."""
        rows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            ids = [int(t) for t in self.tok.encode(text)]
            for row in score_windows([int(self.tok.start_token)] + ids, len(ids), self.max_length):
                rows.append(row)
                owner.append(i)
        out = [0.0 for _ in requests]
        for i, (lp, _) in zip(owner, self._score_rows(rows, "loglikelihood_rolling", disable_tqdm), strict=True):
            out[i] += lp
        return out

    def _score_rows(self, rows, desc: str, disable: bool) -> list[tuple[float, bool]]:
        """`_score` over rows from `score_windows`, longest first, `batch_size` at a time."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list = [None] * len(rows)
        with self._bar(len(rows), desc, disable) as bar:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                t = bucket(max(len(rows[i][0]) - 1 for i in idx), self.max_length, MIN_LENGTH)
                w = bucket(max(rows[i][1] for i in idx), t, MIN_SCORED)
                b = self.batch_size  # the last batch is padded too: one compiled shape fewer per length
                inputs, pos, targets = (np.zeros(s, np.int32) for s in ((b, t), (b, w), (b, w)))
                valid = np.zeros((b, w), bool)
                j = np.arange(w)
                for r, i in enumerate(idx):
                    row, m = rows[i]
                    n = len(row) - 1
                    inputs[r, :n] = row[:-1]
                    valid[r] = j >= w - m
                    pos[r] = np.maximum(n - w + j, 0)
                    targets[r] = np.where(valid[r], np.asarray(row[1:], np.int32)[pos[r]], 0)
                lp, greedy = _score(self.model.graphdef, self.model.params, inputs, pos, targets, valid)
                lp, greedy = np.asarray(lp), np.asarray(greedy)
                for r, i in enumerate(idx):
                    out[i] = (float(lp[r]), bool(greedy[r]))
                bar.update(len(idx))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, cut before the first stop string (see the module docstring)."""
        jobs = []  # (request index, prompt ids, new-token limit, stop strings)
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kw = lm_utils.normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            if kw.get("do_sample") and not self._warned_sampling:
                log.warning("ziplm's lm_eval adapter decodes greedily; do_sample and temperature are ignored")
                self._warned_sampling = True
            limit = max(1, int(kw["max_gen_toks"]))
            keep = self.max_length - min(limit, self.max_length // 2)
            ids = self._prefixed(context)[-keep:] or [int(self.tok.start_token)]
            until = [s for s in kw["until"] if s]
            jobs.append((i, ids, min(limit, self.max_length - len(ids)), until))
        groups: dict[int, list] = {}
        for job in jobs:
            groups.setdefault(len(job[1]), []).append(job)
        out = [""] * len(requests)
        with self._bar(len(jobs), "generate_until", disable_tqdm) as bar:
            for length in sorted(groups, reverse=True):
                group = groups[length]
                for start in range(0, len(group), self.batch_size):
                    batch = group[start : start + self.batch_size]
                    for (i, *_), text in zip(batch, self._generate(batch), strict=True):
                        out[i] = text
                    bar.update(len(batch))
        return out

    def _generate(self, batch) -> list[str]:
        """Texts for jobs whose prompts have equal token length (`generate_until`'s tuples)."""
        cfg, graphdef, params = self.model.cfg, self.model.graphdef, self.model.params
        p, longest = len(batch[0][1]), max(job[2] for job in batch)
        room = p - 1 + -(-longest // GEN_CHUNK) * GEN_CHUNK
        capacity = bucket(room, self.max_length, MIN_LENGTH)  # past max_length only picks after the limits are met
        b = bucket(len(batch), self.batch_size)
        prompts = np.asarray([job[1] for job in batch] + [batch[0][1]] * (b - len(batch)), np.int32)  # (b, P)
        cache = decode.init_cache(cfg, b, capacity)
        if p > 1:
            block = np.zeros((b, bucket(p - 1, capacity, MIN_LENGTH)), np.int32)
            block[:, : p - 1] = prompts[:, :-1]
            cache = decode.prefill(graphdef, params, cache, block)
            cache = cache._replace(length=jnp.asarray(p - 1, jnp.int32))  # the padding's slots stay masked
        tok, new = jnp.asarray(prompts[:, -1]), np.zeros((b, 0), np.int32)
        texts: list = [None] * len(batch)
        while any(t is None for t in texts):
            picked, cache = _greedy(graphdef, params, cache, tok, GEN_CHUNK)
            tok, new = picked[:, -1], np.concatenate([new, np.asarray(picked)], 1)
            for r, (_, _, limit, until) in enumerate(batch):
                if texts[r] is None:
                    texts[r] = self._finished(new[r, :limit], until, limit)
        return texts

    def _finished(self, ids: np.ndarray, until: list[str], limit: int) -> str | None:
        """The text of `ids` cut at EOS and before the first stop string, or None while more tokens may follow."""
        ended = False
        if self.eos_id is not None and self.eos_id in ids:
            ids, ended = ids[: list(ids).index(self.eos_id)], True
        text = self.tok.decode(ids)
        cuts = [text.index(s) for s in until if s in text]
        if cuts:
            return text[: min(cuts)]
        return text if ended or len(ids) >= limit else None


def _offline_defaults() -> None:
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        os.environ.setdefault(name, "1")


def _task_manager(names: list[str], include_path):
    """lm_eval's TaskManager over `include_path` alone when it holds every task named (scanning lm_eval's own
    ~15,000 task files takes about 10 s), else over both; an unknown task is a UserError."""
    from lm_eval import tasks as lm_tasks

    def missing(tm):
        return [n for n in names if n not in tm.all_tasks and not (Path(n).is_file() and n.endswith((".yaml", ".yml")))]

    if include_path:
        for p in include_path:
            if not Path(p).is_dir():
                raise errors.UserError(f"--include-path {p} is not a directory")
        tm = lm_tasks.TaskManager(include_path=list(include_path), include_defaults=False)
        if not missing(tm):
            return tm
    tm = lm_tasks.TaskManager(include_path=list(include_path) if include_path else None)
    unknown = missing(tm)
    if unknown:
        raise errors.UserError(
            f"unknown lm_eval task(s): {', '.join(unknown)} (list them: lm_eval ls tasks; a local task: "
            "--include-path DIR holding its YAML)"
        )
    return tm


def evaluate(lm: ZiplmLM, tasks: list[str], *, include_path=None, limit=None, num_fewshot=None, seed=0) -> dict:
    """`lm_eval.simple_evaluate` of `lm` on `tasks` (names, or YAML files), offline by default.

    Args:
      lm: the adapter.
      tasks: task or group names (lm_eval's, or those under `include_path`).
      include_path: directories of task YAML files.
      limit: documents per task (None: all).
      num_fewshot: few-shot examples (None: each task's default).
      seed: lm_eval's Python, numpy and few-shot seeds.

    Returns:
      lm_eval's results dict ("results", "configs", "versions", "n-shot", "config", ...), without samples.
    """
    import lm_eval
    from lm_eval import utils as lm_eval_utils

    _offline_defaults()
    tm = _task_manager(tasks, include_path)
    try:
        # lm_eval's environment report imports torch wherever it is installed (and runs its collect_env probes,
        # about 5 s); with torch reported absent it imports nothing of it (torch_random_seed=None does the same
        # for its seeding).
        with mock.patch.object(lm_eval_utils, "is_torch_available", lambda: False):
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=tm,
                limit=limit,
                num_fewshot=num_fewshot,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=None,
                fewshot_random_seed=seed,
            )
    except ConnectionError as e:  # datasets' offline errors (and huggingface_hub's) derive from it
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise errors.UserError(f"a task's data set is not available offline ({first})") from None
    results["pretty_env_info"] = "not collected (ziplm runs lm_eval without torch)"
    results["config"]["batch_size"] = lm.batch_size  # lm_eval records only a batch size it was given itself
    return results


def table(results: dict) -> str:
    """lm_eval's Markdown results table (and the groups' table, when there are groups)."""
    from lm_eval import utils as lm_eval_utils

    text = lm_eval_utils.make_table(results)
    if results.get("groups"):
        text += "\n" + lm_eval_utils.make_table(results, "groups")
    return text
