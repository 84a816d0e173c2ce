"""Perplexity as the published pico models report it: a local `evaluate` metric, drop-in for `pico-lm/perplexity`.

    import evaluate
    perplexity = evaluate.load("eval/metrics/perplexity")
    result = perplexity.compute(
        model_id="runs/demo/checkpoints/step_150",  # a checkpoint directory, a Hub id, or a loaded model
        predictions=texts,
        add_start_token=False,
        max_length=2048,
        batch_size=16,
        trust_remote_code=True,
    )
    result["mean_perplexity"], result["perplexities"]

The arguments and results are those of `pico-lm/perplexity` (the metric pico-train calls at every checkpoint),
so `mean_perplexity` is comparable with the `{"paloma": ...}` values in the published runs' `eval_results/`.

Like any `evaluate` module it stands alone: it needs evaluate, datasets, torch and transformers, not pico_hf
(pico-hf checkpoints carry their model code; load them with `trust_remote_code=True`). The computation is the
one `pico_hf.evaluation.perplexity` shares with the in-training evaluation, and the tests keep the two equal.
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F

# No paper to cite: the definition is perplexity itself, computed as pico-lm/perplexity does.
_CITATION = ""

_DESCRIPTION = """\
Perplexity of a causal language model on a list of texts, the way the pico-lm models report it: each text is
tokenized without special tokens, truncated to `max_length`, and scored on its own (right-padded batches);
its perplexity is exp(mean next-token negative log-likelihood over its tokens), and `mean_perplexity` is the
unweighted mean of the per-text perplexities.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score.
    model_id (str or PreTrainedModel): a model directory or Hub id (loaded with AutoModelForCausalLM), or an
        already loaded causal language model (then pass `tokenizer` too).
    batch_size (int): texts per forward pass. Defaults to 16.
    add_start_token (bool): prepend the tokenizer's bos token to every text (then at most `max_length - 1`
        text tokens are kept). pico models are evaluated with False; tokenizers without bos need False.
        Defaults to True, as in `pico-lm/perplexity`.
    device (str): "cuda", "cpu", ... Defaults to cuda when available.
    max_length (int): truncate every text to this many tokens. Defaults to no truncation.
    trust_remote_code (bool): load the model's own code from its checkpoint (pico-hf checkpoints need it unless
        pico_hf is imported in the process). Defaults to False.
    tokenizer (PreTrainedTokenizerBase): the tokenizer, when `model_id` is a loaded model; by default the
        tokenizer saved with the model.
Returns:
    perplexities (list of float): the perplexity of each text, in input order.
    mean_perplexity (float): their unweighted mean.
Examples:
    >>> perplexity = evaluate.load("eval/metrics/perplexity")
    >>> result = perplexity.compute(model_id=model_dir, predictions=["Hello there, world."], add_start_token=False)
    >>> sorted(result)
    ['mean_perplexity', 'perplexities']
"""

# Float32 logits held by one forward pass: 2**28 elements = 1 GiB (a 2048-token batch of 16 at the OLMo
# vocabulary would otherwise need 6.6 GB at once).
MAX_LOGITS_ELEMENTS = 2**28


def encode_texts(
    tokenizer, texts: list[str], max_length: int | None, add_start_token: bool
) -> list[list[int]]:
    """Token ids per text: no special tokens, truncated to `max_length` (the start token included, if any)."""
    start: list[int] = []
    if add_start_token:
        if tokenizer.bos_token_id is None:
            raise ValueError(
                f"add_start_token=True needs a tokenizer with a bos token, and {type(tokenizer).__name__} "
                f"({tokenizer.name_or_path}) has none; pico models are evaluated with add_start_token=False"
            )
        start = [tokenizer.bos_token_id]
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, got {max_length}")
    limit = max_length - len(start) if max_length is not None else None
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=limit is not None, max_length=limit)
    token_ids = [start + ids for ids in encoded["input_ids"]]
    for index, ids in enumerate(token_ids):
        if len(ids) < 2:
            raise ValueError(
                f"Text {index} ({texts[index][:50]!r}) has {len(ids)} token(s); perplexity needs at least two "
                "(one to predict from, one to predict). Remove empty or one-token texts"
                + ("." if add_start_token else ", or pass add_start_token=True.")
            )
    return token_ids


@torch.no_grad()
def batch_perplexities(model, rows: list[list[int]], pad_token_id: int) -> list[float]:
    """exp(mean NLL of tokens 2..n) for each row of token ids, in one right-padded batch."""
    device = next(model.parameters()).device
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
        attention_mask[i, : len(row)] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)

    head = model.get_output_embeddings()
    vocab_size = head.weight.shape[0] if head is not None else model.config.vocab_size
    rows_per_forward = max(1, MAX_LOGITS_ELEMENTS // (width * vocab_size))
    perplexities: list[float] = []
    for start in range(0, len(rows), rows_per_forward):
        ids = input_ids[start : start + rows_per_forward]
        mask = attention_mask[start : start + rows_per_forward]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (b, T, V)
        shift_logits = logits[:, :-1].float()
        nll = F.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(ids.shape[0], -1)  # (b, T-1)
        shift_mask = mask[:, 1:].to(nll.dtype)
        perplexities += torch.exp((nll * shift_mask).sum(1) / shift_mask.sum(1)).tolist()
    return perplexities


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
            reference_urls=["https://huggingface.co/spaces/pico-lm/perplexity"],
        )

    def _compute(
        self,
        predictions,
        model_id,
        batch_size: int = 16,
        add_start_token: bool = True,
        device: str | None = None,
        max_length: int | None = None,
        trust_remote_code: bool = False,
        tokenizer=None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if isinstance(model_id, torch.nn.Module):
            if tokenizer is None:
                raise ValueError("model_id is a loaded model: pass its tokenizer as `tokenizer=`")
            model = model_id
            if device is not None:
                model = model.to(device)
        else:
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=trust_remote_code).to(
                device
            )
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)

        token_ids = encode_texts(tokenizer, predictions, max_length, add_start_token)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Longest texts first: little padding, and the largest batch comes first.
        order = sorted(range(len(token_ids)), key=lambda i: (-len(token_ids[i]), i))
        perplexities: list[float] = [0.0] * len(token_ids)
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), batch_size):
                batch = order[start : start + batch_size]
                values = batch_perplexities(model, [token_ids[i] for i in batch], pad)
                for index, value in zip(batch, values, strict=True):
                    perplexities[index] = value
        finally:
            model.train(was_training)
        return {"perplexities": perplexities, "mean_perplexity": float(np.mean(perplexities))}
