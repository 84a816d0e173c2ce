"""BLiMP at every checkpoint: the shipped pairs scored in length-sorted batches on the live model.

lm-eval's blimp task (and pico-hf's `pico_blimp_*` copies of it) asks, per pair, for the log-likelihood of
`" " + sentence_good` and `" " + sentence_bad` with an empty context: the model sees the tokenizer's
prefix token (BOS, else EOS) and then the sentence, and the pair counts as right when
`argmax([ll_good, ll_bad]) == 0` (a tie goes to the good sentence). A sub-task's `acc` is the mean of its pairs'
outcomes, the `blimp` group's the unweighted mean of the 67 sub-tasks'. This module scores exactly that, but
with every sentence of every sub-task sorted by length into batches of `batch_size` sentences, one eval-mode
forward per batch (lm-eval runs 8 at a time through its generic request machinery), and the same float32
arithmetic per sentence as lm-eval (log-softmax over the vocabulary, the continuation's log-probs summed).

    pairs = load_blimp_pairs(tokenizer, max_pairs_per_task=20)   # the first 20 pairs of each sub-task
    scores = blimp_scores(model, pairs, batch_size=64)           # {"blimp": {"acc": ...}, "blimp_<uid>": {...}}

With several processes, the batches are planned over all sentences and dealt out round-robin; every process
runs the same number of forwards (sharded models stay in step), and the gathered log-likelihoods are those of a
1-process run, batch for batch, so the scores are the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from .perplexity import _model_device, _vocab_size
from .tasks_dir import DATA_DIR

BLIMP = "blimp"
BLIMP_FILE = DATA_DIR / "blimp.parquet"
PAIRS_PER_TASK = 1000  # every BLiMP sub-dataset has 1,000 pairs
# Float32 logits projected and log-softmaxed at once: 2**22 elements = 16 MiB (83 contexts at the OLMo
# vocabulary). Small enough that the log-softmax reads the projection's output while it is still in cache;
# 667 contexts at a time (128 MiB) ran the head at half the speed on a 2-core CPU.
MAX_LOGITS_ELEMENTS = 2**22


@dataclass
class BlimpPairs:
    """Tokenized BLiMP pairs: sentence 2i is pair i's good sentence, 2i+1 its bad one, each as the token ids
    the model reads (prefix token first) and scores from position 1 on."""

    tasks: list[str]  # the sub-datasets (UIDs), in the order of the shipped file
    task_of_pair: list[int]  # index into `tasks` per pair
    sentences: list[list[int]]

    @property
    def num_pairs(self) -> int:
        return len(self.task_of_pair)


def prefix_token_id(tokenizer) -> int:
    """What lm-eval's HFLM conditions an empty context on: BOS, else EOS."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(
            f"BLiMP scoring needs a tokenizer with a bos or eos token; {tokenizer.name_or_path} has neither"
        )
    return token


def encode_sentences(tokenizer, sentences: Sequence[str]) -> list[list[int]]:
    """Token ids as lm-eval scores an empty-context continuation `" " + sentence`: encoded without special
    tokens, then the prefix token in front unless the sentence already starts with it."""
    prefix = prefix_token_id(tokenizer)
    encoded = tokenizer([" " + s for s in sentences], add_special_tokens=False)["input_ids"]
    return [ids if ids[0] == prefix else [prefix, *ids] for ids in encoded]


def load_blimp_pairs(
    tokenizer, max_pairs_per_task: int | None = None, tasks: Sequence[str] | None = None
) -> BlimpPairs:
    """The first `max_pairs_per_task` pairs (all 1,000 when None; lm-eval's `limit` takes the same ones) of
    each BLiMP sub-dataset in `tasks` (all 67 when None), tokenized."""
    if max_pairs_per_task is not None and not 1 <= max_pairs_per_task <= PAIRS_PER_TASK:
        raise ValueError(
            f"max_pairs_per_task must be between 1 and {PAIRS_PER_TASK} or None, got {max_pairs_per_task}"
        )
    if not BLIMP_FILE.is_file():
        raise FileNotFoundError(
            f"{BLIMP_FILE} is missing; rebuild the offline evaluation data with eval/build_data.py"
        )
    table = pq.read_table(BLIMP_FILE, columns=["UID", "sentence_good", "sentence_bad"]).to_pydict()
    known = list(dict.fromkeys(table["UID"]))
    if tasks is not None:
        unknown = [uid for uid in tasks if uid not in known]
        if unknown:
            raise ValueError(f"{BLIMP_FILE} has no BLiMP sub-dataset {', '.join(repr(u) for u in unknown)}")
    chosen = known if tasks is None else [uid for uid in known if uid in set(tasks)]
    index = {uid: i for i, uid in enumerate(chosen)}
    limit = max_pairs_per_task or PAIRS_PER_TASK
    taken = dict.fromkeys(chosen, 0)
    task_of_pair: list[int] = []
    texts: list[str] = []
    for uid, good, bad in zip(table["UID"], table["sentence_good"], table["sentence_bad"], strict=True):
        if uid in index and taken[uid] < limit:
            taken[uid] += 1
            task_of_pair.append(index[uid])
            texts += [good, bad]
    return BlimpPairs(chosen, task_of_pair, encode_sentences(tokenizer, texts))


def _split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, output projection) when the logits are `projection(decoder(ids).last_hidden_state)` and both
    can be called alone (transformers' causal LMs: pico-decoder, Llama); None for a model whose forward must
    run whole, such as a sharded one (FSDP, ZeRO-3: its root module gathers parameters)."""
    from torch.distributed.tensor import DTensor

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or type(head) is not torch.nn.Linear or decoder is model:
        return None
    if any(isinstance(p, DTensor) or p.numel() == 0 for p in model.parameters()):
        return None
    return decoder, head


@torch.inference_mode()
def batch_loglikelihoods(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    pad_token_id: int = 0,
    max_logits_elements: int = MAX_LOGITS_ELEMENTS,
) -> list[float]:
    """Sum of log p(token t | tokens < t) over positions 1..n of each row, in one right-padded batch (causal
    attention keeps real tokens blind to the padding on their right, as in lm-eval, which passes no mask).

    The output projection and log-softmax dominate a small model's cost at a 50k vocabulary, so they run once
    per distinct context in the batch: every sentence's first prediction (from the prefix token alone), and a
    pair's shared opening words, are one row of logits, not one per sentence."""
    device = _model_device(model)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    # Every real prediction (row, position) in row order, and the distinct context (tokens 0..position) it
    # reads; equal contexts have equal hidden states under causal attention.
    contexts: dict[tuple[int, ...], int] = {}
    context_of: list[int] = []
    first_row: list[int] = []
    first_position: list[int] = []
    for i, row in enumerate(rows):
        for position in range(len(row) - 1):
            key = tuple(row[: position + 1])
            if key not in contexts:
                contexts[key] = len(contexts)
                first_row.append(i)
                first_position.append(position)
            context_of.append(contexts[key])
    context_of_t = torch.tensor(context_of, device=device)
    targets = torch.cat([torch.as_tensor(row[1:], dtype=torch.long) for row in rows]).to(device)

    split = _split_head(model)
    if split is not None:
        decoder, head = split
        hidden = decoder(input_ids=input_ids[:, :-1].to(device), use_cache=False).last_hidden_state
        features = hidden[torch.tensor(first_row, device=device), torch.tensor(first_position, device=device)]
        project = head
    else:  # the whole forward (logits at every position of the batch), read at the contexts' positions
        logits = model(input_ids=input_ids[:, :-1].to(device), use_cache=False).logits
        features = logits[torch.tensor(first_row, device=device), torch.tensor(first_position, device=device)]
        del logits
        project = torch.nn.Identity()

    logprobs = torch.empty(len(context_of), dtype=torch.float32, device=device)
    chunk = max(1, max_logits_elements // _vocab_size(model))
    for start in range(0, features.shape[0], chunk):
        # lm-eval's arithmetic: float32 log-softmax over the vocabulary, the targets' values gathered.
        table = F.log_softmax(project(features[start : start + chunk]).float(), dim=-1)
        reads = (context_of_t >= start) & (context_of_t < start + chunk)
        logprobs[reads] = table[context_of_t[reads] - start, targets[reads]]
        del table
    # Each sentence's sum over its own tokens only, as lm-eval sums them (a padded sum could round otherwise).
    totals, start = [], 0
    for row in rows:
        totals.append(float(logprobs[start : start + len(row) - 1].sum()))
        start += len(row) - 1
    return totals


def plan_batches(sentences: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Sentence indices per batch: longest first (little padding), and within a length in token order, so
    sentences opening alike (a pair, a sub-task's template) share a batch and their contexts' logits."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = sorted(range(len(sentences)), key=lambda i: (-len(sentences[i]), list(sentences[i]), i))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def sentence_loglikelihoods(
    model: torch.nn.Module,
    sentences: Sequence[Sequence[int]],
    batch_size: int = 64,
    pad_token_id: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
) -> dict[int, float]:
    """{sentence index: log-likelihood} for this process's share: batches planned over all sentences (longest
    first), dealt out round-robin; a process short of work repeats a batch and drops the result, so every
    process runs the same number of forwards."""
    batches = plan_batches(sentences, batch_size)
    mine = batches[process_index::num_processes]
    results: dict[int, float] = {}
    for round_index in range(math.ceil(len(batches) / num_processes)):
        batch = mine[round_index] if round_index < len(mine) else batches[0]
        values = batch_loglikelihoods(model, [sentences[i] for i in batch], pad_token_id)
        if round_index < len(mine):
            results.update(zip(batch, values, strict=True))
    return results


def accuracies(pairs: BlimpPairs, loglikelihoods: Sequence[float]) -> dict[str, dict[str, float]]:
    """lm-eval's blimp scores from the sentences' log-likelihoods: `blimp_<uid>` {"acc": mean of the pairs'
    `argmax([good, bad]) == 0`} per sub-task, and `blimp` {"acc": the unweighted mean over sub-tasks}."""
    right = [0] * len(pairs.tasks)
    count = [0] * len(pairs.tasks)
    for pair, task in enumerate(pairs.task_of_pair):
        good, bad = loglikelihoods[2 * pair], loglikelihoods[2 * pair + 1]
        right[task] += int(good >= bad)  # np.argmax returns the first of equal values: the good sentence
        count[task] += 1
    per_task = [r / c for r, c in zip(right, count, strict=True)]  # lm-eval's `mean`: sum / len
    scores = {BLIMP: {"acc": sum(per_task) / len(per_task)}}
    scores.update({f"{BLIMP}_{uid}": {"acc": acc} for uid, acc in zip(pairs.tasks, per_task, strict=True)})
    return scores


def blimp_scores(
    model: torch.nn.Module,
    pairs: BlimpPairs,
    batch_size: int = 64,
    pad_token_id: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
) -> dict[str, dict[str, float]]:
    """The BLiMP scores of `model` (in eval mode, under no_grad: the caller's job) on `pairs`. With several
    processes every one calls this and gets the same scores."""
    mine = sentence_loglikelihoods(
        model, pairs.sentences, batch_size, pad_token_id, process_index, num_processes
    )
    if num_processes > 1:
        from accelerate.utils import gather_object

        merged: dict[int, float] = {}
        for shard in gather_object([mine]):
            merged.update(shard)
        mine = merged
    return accuracies(pairs, [mine[i] for i in range(len(pairs.sentences))])


__all__ = [
    "BLIMP",
    "BlimpPairs",
    "accuracies",
    "batch_loglikelihoods",
    "blimp_scores",
    "encode_sentences",
    "load_blimp_pairs",
    "plan_batches",
    "sentence_loglikelihoods",
]
