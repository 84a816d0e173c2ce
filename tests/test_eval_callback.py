"""Evaluation at every checkpoint of a training run: pico-train's eval_results files, values equal to an
offline computation on the saved checkpoints, and training left bitwise unaffected (resume included)."""

import json
import logging
import os
import random
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    StopAfter,
    assert_bitwise_equal,
    assert_world_size,
    final_weights,
    tiny_config,
    tiny_training_overrides,
    train,
    train_command,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from pico_hf import PicoDecoderForCausalLM
from pico_hf.evaluation.callback import EvaluationCallback, build_evaluation_callbacks, isolated_evaluation
from pico_hf.evaluation.perplexity import compute_perplexity
from pico_hf.training.config import ConfigError, load_config
from pico_hf.training.rundir import RunLayout

MAX_LENGTH = 12
STEPS = [0, 2, 4, 6]


def eval_texts(tmp_path):
    """Held-out texts in the word tokenizer's vocabulary (w2..w99), of mixed lengths, as a local dataset."""
    path = tmp_path / "eval" / "texts.parquet"
    if not path.exists():
        rng = random.Random(0)
        texts = [
            " ".join(f"w{rng.randrange(2, 100)}" for _ in range(rng.randrange(3, 25))) for _ in range(10)
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": texts, "source": ["test"] * len(texts)}), path)
    return path


def evaluation_overrides(tmp_path, **extra):
    return {
        "evaluation.metrics": "[paloma]",
        "evaluation.paloma.dataset_name": str(eval_texts(tmp_path)),
        "evaluation.paloma.max_length": MAX_LENGTH,
        "evaluation.paloma.batch_size": 3,
        **extra,
    }


def eval_results(run_dir):
    return {
        int(p.stem[5:]): json.loads(p.read_text()) for p in (run_dir / "eval_results").glob("step_*.json")
    }


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("evaluated")
    summary, config = train(tmp_path, **evaluation_overrides(tmp_path))
    return summary, config, tmp_path


def test_every_checkpoint_gets_eval_results_in_pico_train_format(evaluated_run):
    summary, config, _ = evaluated_run
    assert summary["checkpoints"] == [f"step_{s}" for s in STEPS]
    results_dir = config.run_dir / "eval_results"
    assert sorted(p.name for p in results_dir.iterdir()) == [f"step_{s}.json" for s in sorted(STEPS, key=str)]
    for step, values in eval_results(config.run_dir).items():
        assert list(values) == ["paloma", "dataset"] and isinstance(values["paloma"], float), step
        assert values["dataset"] == str(eval_texts(config.run_dir.parents[1])), step
    logged = [
        json.loads(line)
        for line in (config.logs_dir / "metrics.jsonl").read_text().splitlines()
        if "eval_paloma" in line
    ]
    assert [(entry["step"], entry["eval_paloma"]) for entry in logged] == [
        (step, eval_results(config.run_dir)[step]["paloma"]) for step in STEPS
    ]


def test_values_equal_an_offline_computation_on_the_saved_checkpoints(evaluated_run):
    _, config, tmp_path = evaluated_run
    texts = pq.read_table(eval_texts(tmp_path)).column("text").to_pylist()
    results = eval_results(config.run_dir)
    for step in STEPS:
        checkpoint = config.checkpoints_dir / f"step_{step}"
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        offline = compute_perplexity(model, tokenizer, texts, max_length=MAX_LENGTH, batch_size=3)
        assert results[step]["paloma"] == pytest.approx(offline.mean_perplexity, rel=1e-6), step
    # Training moved the model: the values are not all the same.
    assert len({round(values["paloma"], 6) for values in results.values()}) == len(STEPS)


def test_resume_with_evaluation_is_bitwise_identical_and_unperturbed(evaluated_run, tmp_path):
    _, config, _ = evaluated_run
    overrides = evaluation_overrides(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path, callbacks=[StopAfter(3)], **overrides)
    assert os.readlink(tmp_path / "runs" / "tiny" / "checkpoints" / "latest") == "step_2"
    summary, resumed = train(tmp_path, **overrides)
    assert summary["resumed_from"].endswith("step_2")
    assert_bitwise_equal(final_weights(resumed.run_dir), final_weights(config.run_dir))

    def values(run_dir):  # the datasets are each run's own copy of the same texts
        return {step: result["paloma"] for step, result in eval_results(run_dir).items()}

    assert values(resumed.run_dir) == values(config.run_dir)

    # Evaluating at every checkpoint leaves training exactly as it is without evaluation.
    _, plain = train(tmp_path / "plain")
    assert_bitwise_equal(final_weights(plain.run_dir), final_weights(config.run_dir))
    assert not (plain.run_dir / "eval_results").exists()


def test_isolated_evaluation_restores_mode_rng_and_grads():
    model = PicoDecoderForCausalLM(tiny_config()).train()
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    with isolated_evaluation(model):
        assert not model.training and not torch.is_grad_enabled()
        model(input_ids=ids)
        random.random(), np.random.rand(), torch.rand(3)  # e.g. lm-eval seeding the global generators
    assert model.training and torch.is_grad_enabled()
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def build(tmp_path, **overrides):
    config, _ = load_config(None, tiny_training_overrides(tmp_path, **overrides))
    return build_evaluation_callbacks(config, RunLayout(config.run_dir)), config


def test_metrics_empty_or_null_turns_evaluation_off(tmp_path):
    assert build(tmp_path, **{"evaluation.metrics": "[]"})[0] == []
    assert build(tmp_path, **{"evaluation.metrics": "null"})[0] == []


def test_the_lm_eval_tasks_are_resolved_once_per_run(tmp_path, monkeypatch):
    """Indexing lm-eval's task files takes seconds: building a run's evaluation resolves its tasks once."""
    from pico_hf.evaluation import harness

    resolve_tasks, calls = harness.resolve_tasks, []

    def counted(names, *args, **kwargs):
        calls.append(list(names))
        return resolve_tasks(names, *args, **kwargs)

    monkeypatch.setattr(harness, "resolve_tasks", counted)
    (callback,), _ = build(tmp_path, **{"evaluation.metrics": "[pico_arc_easy, pico_blimp]"})
    assert calls == [["pico_arc_easy", "pico_blimp"]]
    assert callback.tasks == ["pico_arc_easy", "pico_blimp"]


def test_max_samples_caps_the_evaluation_texts(tmp_path):
    (callback,), config = build(
        tmp_path, **evaluation_overrides(tmp_path, **{"evaluation.paloma.max_samples": 4})
    )
    assert isinstance(callback, EvaluationCallback) and len(callback.token_ids) == 4
    assert all(2 <= len(ids) <= MAX_LENGTH for ids in callback.token_ids)
    assert callback.results_dir == config.run_dir / "eval_results"


def test_unreachable_hub_dataset_falls_back_to_the_embedded_split(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        (callback,), _ = build(
            tmp_path,
            **{
                "evaluation.metrics": "[paloma]",
                "evaluation.paloma.max_length": 16,
                "evaluation.paloma.max_samples": 5,
            },
        )
    assert callback.dataset_name == "embedded" and len(callback.token_ids) == 5
    (record,) = [r for r in caplog.records if "pretokenized-paloma-tinsy" in r.getMessage()]
    assert record.getMessage() == (
        "Evaluation dataset 'pico-lm/pretokenized-paloma-tinsy' is on the Hugging Face Hub, which is unreachable: "
        "using the embedded held-out split instead, recorded as 'embedded_heldout_perplexity', not as Paloma"
    )


def test_lm_eval_tasks_run_at_every_checkpoint_on_the_live_model(tmp_path):
    from pico_hf.evaluation.harness import evaluate

    _, config = train(
        tmp_path,
        **{
            "evaluation.metrics": "[pico_arc_easy]",
            "evaluation.lm_eval.limit": 3,
            "evaluation.lm_eval.batch_size": 2,
            "training.max_steps": 2,
        },
    )
    results = eval_results(config.run_dir)
    assert sorted(results) == [0, 2] and all(list(r) == ["pico_arc_easy"] for r in results.values())
    logged = [
        json.loads(line)
        for line in (config.logs_dir / "metrics.jsonl").read_text().splitlines()
        if "eval_pico_arc_easy/acc" in line
    ]
    assert [(e["step"], e["eval_pico_arc_easy/acc_norm"]) for e in logged] == [
        (step, results[step]["pico_arc_easy"]["acc_norm"]) for step in (0, 2)
    ]
    # The same scores as lm-eval on the saved checkpoint, loaded afresh.
    model = AutoModelForCausalLM.from_pretrained(config.run_dir / "checkpoints" / "step_2")
    tokenizer = AutoTokenizer.from_pretrained(config.run_dir / "checkpoints" / "step_2")
    offline = evaluate(model, tokenizer, ["pico_arc_easy"], limit=3, batch_size=2, bootstrap_iters=0)
    assert results[2]["pico_arc_easy"] == pytest.approx(offline.scores()["pico_arc_easy"], abs=1e-9)


def test_the_embedded_split_is_recorded_and_logged_under_its_own_name(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import TrainerCallback

    class Evaluations(TrainerCallback):
        seen = []

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.seen.append((state.global_step, dict(metrics), state.best_metric))

    _, config = train(
        tmp_path,
        callbacks=[Evaluations()],
        **{
            "evaluation.metrics": "[paloma]",
            "evaluation.paloma.dataset_name": "embedded",
            "evaluation.paloma.max_length": 16,
            "evaluation.paloma.max_samples": 3,
            "training_arguments.report_to": "[tensorboard]",
            "training_arguments.metric_for_best_model": "eval_embedded_heldout_perplexity",
            "training_arguments.greater_is_better": "false",
        },
    )
    results = eval_results(config.run_dir)
    assert sorted(results) == STEPS
    for values in results.values():
        assert list(values) == ["embedded_heldout_perplexity", "dataset"] and values["dataset"] == "embedded"
    # on_evaluate sees the `eval_` metrics, as after Trainer.evaluate, with the best value so far kept.
    values = [results[step]["embedded_heldout_perplexity"] for step in STEPS]
    assert Evaluations.seen == [
        (step, {"eval_embedded_heldout_perplexity": value}, min(values[: i + 1]))
        for i, (step, value) in enumerate(zip(STEPS, values, strict=True))
    ]
    (events,) = list(config.logs_dir.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert "eval/embedded_heldout_perplexity" in accumulator.Tags()["scalars"]
    assert not [tag for tag in accumulator.Tags()["scalars"] if tag.startswith("train/eval")]
    scalars = accumulator.Scalars("eval/embedded_heldout_perplexity")
    assert [(s.step, s.value) for s in scalars] == [
        (step, pytest.approx(results[step]["embedded_heldout_perplexity"], rel=1e-6)) for step in STEPS
    ]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"evaluation.metrics": "[paloma, pico_arc_esay]"},
            r"evaluation.metrics: Unknown task 'pico_arc_esay'. Did you mean 'pico_arc_easy'",
        ),
        (
            {"evaluation.paloma.max_length": 2048},
            r"max_length \(2048\) is longer than model.max_seq_len \(16\)",
        ),
        ({"evaluation.paloma.batch_size": 0}, r"evaluation.paloma.batch_size must be positive, got 0"),
        (
            {"evaluation.paloma.max_samples": 0},
            r"evaluation.paloma.max_samples must be positive or null, got 0",
        ),
        (
            {"evaluation.paloma.dataset_name": "/nowhere/eval.parquet"},
            r"^evaluation.paloma.dataset_name: dataset path /nowhere/eval.parquet does not exist$",
        ),
    ],
)
def test_bad_evaluation_config_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(tmp_path, **evaluation_overrides(tmp_path, **overrides))
    assert not (tmp_path / "runs" / "tiny" / "checkpoints" / "step_0").exists()


@pytest.mark.slow
def test_two_processes_share_the_evaluation(evaluated_run, tmp_path):
    """With two processes each scores half of the texts; the gathered values match the one-process run. The
    lm-eval tasks' documents are shared out too: their scores are those of the checkpoint evaluated by one
    process."""
    from pico_hf.evaluation.harness import evaluate

    _, config, _ = evaluated_run
    lm_eval = {"evaluation.metrics": "[paloma, pico_arc_easy]", "evaluation.lm_eval.limit": 3}
    overrides = tiny_training_overrides(tmp_path, **evaluation_overrides(tmp_path, **lm_eval))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*train_command(2), *overrides], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_world_size(result.stderr, 2)
    two = eval_results(tmp_path / "runs" / "tiny")
    one = eval_results(config.run_dir)
    assert two.keys() == one.keys() == set(STEPS)
    # Step 0: the same weights and the same batches, so the same values (up to thread-count rounding).
    assert two[0]["paloma"] == pytest.approx(one[0]["paloma"], rel=1e-6)
    for step in STEPS:  # two processes train with a different reduction order: close, not bitwise
        assert two[step]["paloma"] == pytest.approx(one[step]["paloma"], rel=1e-3), step
    for step in (0, STEPS[-1]):
        checkpoint = tmp_path / "runs" / "tiny" / "checkpoints" / f"step_{step}"
        model = AutoModelForCausalLM.from_pretrained(checkpoint)
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        offline = evaluate(model, tokenizer, ["pico_arc_easy"], limit=3, bootstrap_iters=0)
        assert two[step]["pico_arc_easy"] == pytest.approx(offline.scores()["pico_arc_easy"], abs=1e-9), step


def lm_eval_scores(results):
    """The lm-eval part of a step_N.json: {task: {metric: value}}."""
    return {name: value for name, value in results.items() if isinstance(value, dict)}


@pytest.mark.slow
def test_two_processes_share_the_lm_eval_documents_and_score_as_one(tmp_path):
    """With two processes each scores its share of every lm-eval task's documents (lm-eval's data-parallel
    evaluation on the live model) and the merged scores equal a 1-process run's, exactly: `acc` is a mean of
    0/1 outcomes, each decided by a log-likelihood comparison far from a tie, so no rounding can move it."""
    from pico_hf.evaluation.harness import evaluate
    from pico_hf.tokenization import OLMO_TOKENIZER_ID

    lm_eval = {
        # The OLMo tokenizer, so the tasks' English texts are real tokens (the word tokenizer reads them as
        # unknown tokens: equal log-likelihoods, ties decided by rounding).
        "data.tokenizer.name": OLMO_TOKENIZER_ID,
        "data.tokenizer.vocab_size": 50304,
        "model.vocab_size": 50304,
        "model.max_seq_len": 32,  # room for every continuation (lm-eval truncates contexts from the left)
        "evaluation.metrics": "[paloma, pico_arc_easy, pico_blimp]",
        "evaluation.lm_eval.limit": 5,
        "evaluation.lm_eval.batch_size": 4,
        "training.max_steps": 2,
    }
    _, one = train(tmp_path / "one", **evaluation_overrides(tmp_path, **lm_eval))
    overrides = tiny_training_overrides(tmp_path / "two", **evaluation_overrides(tmp_path, **lm_eval))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*train_command(2), *overrides], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_world_size(result.stderr, 2)
    # Process 0 (the one drawing the requests' bar) scored its share of the documents: 3 of the 5 questions
    # x 4 choices and 3 of the 5 pairs x 2 sentences of each of the 67 BLiMP tasks, not all 690 requests.
    assert "Running loglikelihood requests:   0%|          | 0/414 " in result.stderr, result.stderr[-3000:]
    assert "/690 " not in result.stderr
    two_dir = tmp_path / "two" / "runs" / "tiny"
    two, ones = eval_results(two_dir), eval_results(one.run_dir)
    assert two.keys() == ones.keys() == {0, 2}
    scores = lm_eval_scores(two[0])
    assert {"pico_arc_easy", "pico_blimp", "pico_blimp_adjunct_island"} <= scores.keys()
    assert len(scores) == 2 + 67  # arc, the BLiMP group and its 67 tasks
    # Step 0: the same weights in both runs, so the same scores, exactly.
    assert scores == lm_eval_scores(ones[0])
    assert two[0]["paloma"] == pytest.approx(ones[0]["paloma"], rel=1e-6)  # gathered perplexities
    # Step 2: two processes trained with another reduction order; a 1-process evaluation of that checkpoint.
    checkpoint = two_dir / "checkpoints" / "step_2"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    offline = evaluate(
        model, tokenizer, ["pico_arc_easy", "pico_blimp"], limit=5, batch_size=4, bootstrap_iters=0
    )
    assert lm_eval_scores(two[2]) == offline.scores()
