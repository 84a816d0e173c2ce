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
The computation is `pico_hf.evaluation.perplexity`, shared with the in-training evaluation callback.
"""

from __future__ import annotations

import datasets
import evaluate
import torch

import pico_hf  # noqa: F401  (registers pico-decoder with transformers' Auto classes)
from pico_hf.evaluation.perplexity import compute_perplexity

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
    trust_remote_code (bool): load the model's own code from its checkpoint. Defaults to False.
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
        result = compute_perplexity(
            model,
            tokenizer,
            predictions,
            max_length=max_length,
            batch_size=batch_size,
            add_start_token=add_start_token,
        )
        return result.to_dict()
