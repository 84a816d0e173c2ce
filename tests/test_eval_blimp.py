"""The batched BLiMP scorer (`blimp` in `evaluation.metrics`): lm-eval's blimp scores, exactly, from one
forward per length-sorted batch; the same log-likelihoods as an unbatched computation; the same scores on
two processes; and the `evaluation.blimp` settings."""

import json
import os
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_world_size, olmo_vocab_config, tiny_training_overrides, train, train_command
from transformers import AutoModelForCausalLM, AutoTokenizer

from pico_hf import PicoDecoderForCausalLM
from pico_hf.evaluation.blimp import (
    BLIMP_FILE,
    accuracies,
    batch_loglikelihoods,
    blimp_scores,
    load_blimp_pairs,
    plan_batches,
    sentence_loglikelihoods,
)
from pico_hf.evaluation.harness import lm_eval_blimp_tasks, task_manager
from pico_hf.tokenization import OLMO_TOKENIZER_ID, load_tokenizer
from pico_hf.training.config import ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = olmo_vocab_config(
        d_model=32,
        n_layers=2,
        attention_n_heads=4,
        attention_n_kv_heads=2,
        activation_hidden_dim=64,
        max_seq_len=64,
    )
    return PicoDecoderForCausalLM(config).eval()


def lm_eval_blimp(model, tokenizer, uids, limit, tmp_path):
    """lm-eval's own blimp_<uid> tasks on the shipped pairs: ({uid: acc}, {uid: [(ll_good, ll_bad), ...]})."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager(lm_eval_blimp_tasks(tmp_path, uids), include_defaults=False)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=8)
    results = simple_evaluate(
        model=lm,
        tasks=[f"blimp_{uid}" for uid in uids],
        limit=limit,
        bootstrap_iters=0,
        task_manager=manager,
        log_samples=True,
    )
    accs = {uid: results["results"][f"blimp_{uid}"]["acc,none"] for uid in uids}
    lls = {
        uid: [
            tuple(ll for ll, _ in sample["filtered_resps"])
            for sample in sorted(results["samples"][f"blimp_{uid}"], key=lambda s: s["doc_id"])
        ]
        for uid in uids
    }
    return accs, lls


def assert_equals_lm_eval(model, tokenizer, uids, limit, tmp_path):
    pairs = load_blimp_pairs(tokenizer, limit, uids)
    with torch.no_grad():
        ours = blimp_scores(model, pairs, batch_size=64)
    reference, reference_lls = lm_eval_blimp(model, tokenizer, uids, limit, tmp_path)
    assert {uid: ours[f"blimp_{uid}"]["acc"] for uid in uids} == reference  # exactly
    assert ours["blimp"]["acc"] == sum(reference.values()) / len(uids)
    assert len(set(reference.values())) > 1  # the sub-tasks score differently: a real comparison
    # And the log-likelihoods behind them, sentence by sentence.
    lls = sentence_loglikelihoods(model, pairs.sentences, batch_size=64)
    for task, uid in enumerate(pairs.tasks):
        pair_ids = [p for p, t in enumerate(pairs.task_of_pair) if t == task]
        ours_uid = [ll for p in pair_ids for ll in (lls[2 * p], lls[2 * p + 1])]
        reference_uid = [ll for pair in reference_lls[uid] for ll in pair]
        assert ours_uid == pytest.approx(reference_uid, abs=1e-4), uid


def test_scores_equal_lm_evals_blimp_tasks(model, tokenizer, tmp_path):
    assert_equals_lm_eval(
        model, tokenizer, ["anaphor_number_agreement", "wh_island", "passive_1"], 20, tmp_path
    )


@pytest.mark.slow
def test_scores_equal_lm_evals_blimp_on_all_67_tasks(model, tokenizer, tmp_path):
    uids = load_blimp_pairs(tokenizer, 1).tasks
    assert len(uids) == 67
    assert_equals_lm_eval(model, tokenizer, uids, 20, tmp_path)


def unbatched_loglikelihood(model, ids):
    """One sentence alone through the whole model: the sum of its tokens' log-probabilities."""
    ids = torch.tensor([ids])
    logprobs = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    return float(logprobs.gather(-1, ids[0, 1:, None]).sum())


def test_batched_and_deduplicated_loglikelihoods_equal_one_sentence_at_a_time(model, tokenizer):
    pairs = load_blimp_pairs(tokenizer, 6, ["wh_island", "passive_1", "npi_present_1"])
    with torch.no_grad():
        expected = [unbatched_loglikelihood(model, ids) for ids in pairs.sentences]
        for batch_size in (1, 7, 64):
            got = sentence_loglikelihoods(model, pairs.sentences, batch_size)
            assert [got[i] for i in range(len(expected))] == pytest.approx(expected, abs=1e-4)
        # The whole-forward path (a model whose decoder cannot run alone) computes the same values.
        rows = pairs.sentences[:10]
        split = batch_loglikelihoods(model, rows)
        with_whole_forward = batch_loglikelihoods(WholeForward(model), rows)
        assert with_whole_forward == pytest.approx(split, abs=1e-5)


class WholeForward(torch.nn.Module):
    """A causal LM without `get_decoder`: only its whole forward can be called."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_pairs_are_the_first_n_of_each_sub_task_in_file_order(tokenizer):
    import pyarrow.parquet as pq

    pairs = load_blimp_pairs(tokenizer, 3)
    assert pairs.num_pairs == 67 * 3 and len(pairs.sentences) == 2 * 67 * 3
    table = pq.read_table(BLIMP_FILE, filters=[("UID", "==", "wh_island")]).to_pydict()
    task = pairs.tasks.index("wh_island")
    first = pairs.task_of_pair.index(task)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for k in range(3):
        good, bad = pairs.sentences[2 * (first + k)], pairs.sentences[2 * (first + k) + 1]
        assert good == [
            bos,
            *tokenizer(" " + table["sentence_good"][k], add_special_tokens=False)["input_ids"],
        ]
        assert bad == [bos, *tokenizer(" " + table["sentence_bad"][k], add_special_tokens=False)["input_ids"]]
    with pytest.raises(ValueError, match="max_pairs_per_task must be between 1 and 1000 or None, got 0"):
        load_blimp_pairs(tokenizer, 0)
    with pytest.raises(ValueError, match="has no BLiMP sub-dataset 'wh_islands'"):
        load_blimp_pairs(tokenizer, 1, ["wh_islands"])


def test_ties_go_to_the_good_sentence_and_the_group_is_the_mean_of_sub_tasks(tokenizer):
    pairs = load_blimp_pairs(tokenizer, 2, ["wh_island", "passive_1"])
    # passive_1: two wins; wh_island: a tie (right, as np.argmax picks the first) and a loss.
    scores = accuracies(pairs, [-1.0, -2.0, -1.5, -9.0, -3.0, -3.0, -5.0, -4.0])
    assert pairs.tasks == ["passive_1", "wh_island"]  # the shipped file's order
    assert scores == {
        "blimp": {"acc": 0.75},
        "blimp_passive_1": {"acc": 1.0},
        "blimp_wh_island": {"acc": 0.5},
    }


def test_shares_of_two_processes_make_up_the_one_process_values(model, tokenizer):
    """Batches are planned over all sentences and dealt out: each process's values are bitwise those of a
    1-process run, and the two shares cover every sentence once."""
    pairs = load_blimp_pairs(tokenizer, 4, ["wh_island", "passive_1", "npi_present_1"])
    with torch.no_grad():
        one = sentence_loglikelihoods(model, pairs.sentences, batch_size=5)
        shares = [sentence_loglikelihoods(model, pairs.sentences, 5, 0, rank, 2) for rank in (0, 1)]
    assert not shares[0].keys() & shares[1].keys()
    assert {**shares[0], **shares[1]} == one
    batches = plan_batches(pairs.sentences, 5)
    assert [len(pairs.sentences[b[0]]) for b in batches] == sorted(
        (len(pairs.sentences[b[0]]) for b in batches), reverse=True
    )


# --- in training -----------------------------------------------------------------------------------------

OLMO = {
    # The OLMo tokenizer, so BLiMP's sentences are real tokens (the tests' word tokenizer reads them as unknown
    # tokens: equal log-likelihoods, every pair a tie).
    "data.tokenizer.name": OLMO_TOKENIZER_ID,
    "data.tokenizer.vocab_size": 50304,
    "model.vocab_size": 50304,
    "model.max_seq_len": 32,
    "evaluation.metrics": "[blimp]",
    "evaluation.blimp.max_pairs_per_task": 2,
    "evaluation.blimp.batch_size": 32,
    "training.max_steps": 2,
}


def eval_results(run_dir):
    return {
        int(p.stem[5:]): json.loads(p.read_text()) for p in (run_dir / "eval_results").glob("step_*.json")
    }


def test_blimp_runs_at_every_checkpoint_on_the_live_model(tmp_path):
    _, config = train(tmp_path, **OLMO)
    results = eval_results(config.run_dir)
    assert sorted(results) == [0, 2]
    for values in results.values():
        assert list(values) == ["blimp"] + [
            f"blimp_{uid}" for uid in load_blimp_pairs(load_tokenizer(), 1).tasks
        ]
    logged = [
        json.loads(line)
        for line in (config.logs_dir / "metrics.jsonl").read_text().splitlines()
        if "eval_blimp/acc" in line
    ]
    assert [(e["step"], e["eval_blimp/acc"], e["eval_blimp_wh_island/acc"]) for e in logged] == [
        (step, results[step]["blimp"]["acc"], results[step]["blimp_wh_island"]["acc"]) for step in (0, 2)
    ]
    # The scores of the saved checkpoint, loaded afresh.
    checkpoint = config.run_dir / "checkpoints" / "step_2"
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    pairs = load_blimp_pairs(AutoTokenizer.from_pretrained(checkpoint), 2)
    with torch.no_grad():
        assert results[2] == blimp_scores(model, pairs, batch_size=7)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"evaluation.blimp.max_pairs_per_task": 0},
            r"evaluation.blimp.max_pairs_per_task must be between 1 and 1000 \(the pairs of a BLiMP sub-task\) "
            r"or null, got 0",
        ),
        (
            {"evaluation.blimp.max_pairs_per_task": 1001},
            r"evaluation.blimp.max_pairs_per_task must be between 1 and 1000 .* got 1001",
        ),
        ({"evaluation.blimp.batch_size": 0}, r"evaluation.blimp.batch_size must be positive, got 0"),
    ],
)
def test_bad_blimp_settings_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, **{**OLMO, **overrides})
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "step_0").exists()


@pytest.mark.slow
def test_two_processes_share_the_blimp_batches_and_score_as_one(tmp_path):
    _, one = train(tmp_path / "one", **OLMO)
    overrides = tiny_training_overrides(tmp_path / "two", **OLMO)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*train_command(2), *overrides], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_world_size(result.stderr, 2)
    two_dir = tmp_path / "two" / "runs" / "tiny"
    two, ones = eval_results(two_dir), eval_results(one.run_dir)
    assert two.keys() == ones.keys() == {0, 2}
    assert two[0] == ones[0]  # step 0: the same weights, so the same scores, exactly
    # Step 2: two processes trained with another reduction order; a 1-process evaluation of that checkpoint.
    checkpoint = two_dir / "checkpoints" / "step_2"
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    with torch.no_grad():
        assert two[2] == blimp_scores(
            model, load_blimp_pairs(AutoTokenizer.from_pretrained(checkpoint), 2), 32
        )
