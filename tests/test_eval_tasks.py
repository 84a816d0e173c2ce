"""lm-eval on pico checkpoints: pico-hf's task configs offline, known answers, prompts identical to lm-eval's,
the command line, pico vs its Llama conversion, and the errors."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, olmo_vocab_config
from transformers import LlamaForCausalLM

from pico_hf import PicoDecoderForCausalLM
from pico_hf.convert import main as convert
from pico_hf.evaluation.harness import (
    EvaluationError,
    evaluate,
    lm_eval_blimp_tasks,
    load_model,
    resolve_tasks,
    task_manager,
    task_manager_for,
)
from pico_hf.evaluation.tasks_dir import TASKS_DIR
from pico_hf.tokenization import load_tokenizer

RUN_SCRIPT = REPO / "eval" / "run.py"
PICO_TASKS = ["pico_arc_easy", "pico_hellaswag", "pico_paloma", "pico_paloma_tinsy"]
BLIMP_TASKS = [f"pico_blimp_{path.stem}" for path in sorted((TASKS_DIR / "blimp").glob("[a-z]*.yaml"))]


@pytest.fixture(scope="module")
def manager():
    """pico-hf's tasks alone (what eval/run.py uses when only pico tasks are asked for)."""
    return task_manager(TASKS_DIR, include_defaults=False)


@pytest.fixture(scope="module")
def full_manager():
    """lm-eval's tasks and pico-hf's."""
    return task_manager(TASKS_DIR)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = olmo_vocab_config(
        d_model=16,
        n_layers=1,
        attention_n_heads=2,
        attention_n_kv_heads=1,
        activation_hidden_dim=32,
        max_seq_len=128,
    )
    return PicoDecoderForCausalLM(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny pico checkpoint with the OLMo tokenizer and its model code (as training writes them)."""
    path = tmp_path_factory.mktemp("eval") / "pico"
    tiny_model().save_pretrained(path)
    load_tokenizer().save_pretrained(path)
    return path


def scores(report):
    return {task: values for task, values in report.scores().items()}


# --- task configs -----------------------------------------------------------------------------------------


def test_pico_tasks_are_registered(manager, full_manager):
    assert len(BLIMP_TASKS) == 67
    assert manager.all_tasks == sorted(["pico", *PICO_TASKS, "pico_blimp", *BLIMP_TASKS])
    assert set(manager.task_index["pico"].tags) == {*PICO_TASKS, *BLIMP_TASKS}
    assert {"pico", *PICO_TASKS, "pico_blimp", "hellaswag", "arc_easy", "blimp", "paloma"} <= set(
        full_manager.all_tasks
    )
    assert task_manager_for(["pico_arc_easy", "pico_p*"], TASKS_DIR).all_tasks == manager.all_tasks


def test_pico_tag_runs_offline_and_skips_the_hub_task(checkpoint, manager, caplog):
    model, tokenizer = load_model(str(checkpoint), device="cpu")
    report = evaluate(model, tokenizer, ["pico"], manager, limit=2, batch_size=4, bootstrap_iters=0)
    values = scores(report)
    assert sorted(values) == sorted(
        ["pico_arc_easy", "pico_blimp", "pico_hellaswag", "pico_paloma", *BLIMP_TASKS]
    )
    assert set(values["pico_arc_easy"]) == set(values["pico_hellaswag"]) == {"acc", "acc_norm"}
    assert set(values["pico_paloma"]) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert all(value == value for task in values.values() for value in task.values())  # no NaN
    assert report.results["n-samples"]["pico_hellaswag"] == {"original": 10042, "effective": 2}
    assert report.results["n-samples"]["pico_arc_easy"] == {"original": 570, "effective": 2}
    assert report.results["n-samples"]["pico_paloma"] == {"original": 201, "effective": 2}
    assert report.skipped == {
        "pico_paloma_tinsy": "needs the Hugging Face Hub dataset pico-lm/pretokenized-paloma-tinsy, "
        "and offline mode is on"
    }
    assert "Skipping pico_paloma_tinsy: needs the Hugging Face Hub" in caplog.text


def test_hub_tasks_are_skipped_offline_and_kept_online(full_manager):
    manager = full_manager
    offline = resolve_tasks(["hellaswag", "arc_easy", "blimp", "paloma_c4_en", "pico_arc_easy"], manager)
    assert offline.runnable == ["pico_arc_easy"]
    assert offline.skipped == {
        "hellaswag": "needs the Hugging Face Hub dataset Rowan/hellaswag, and offline mode is on",
        "arc_easy": "needs the Hugging Face Hub dataset allenai/ai2_arc, and offline mode is on",
        "blimp": "needs the Hugging Face Hub dataset nyu-mll/blimp, and offline mode is on",
        "paloma_c4_en": "needs the Hugging Face Hub dataset allenai/paloma, and offline mode is on",
    }
    online = resolve_tasks(
        ["hellaswag", "blimp", "paloma_c4_en", "pico_paloma_tinsy"], manager, hub_available=True
    )
    assert online.runnable == ["hellaswag", "blimp", "paloma_c4_en", "pico_paloma_tinsy"]
    assert online.skipped == {}
    runnable = resolve_tasks(["pico_*"], manager).runnable
    assert [n for n in runnable if not n.startswith("pico_blimp")] == [
        "pico_arc_easy",
        "pico_hellaswag",
        "pico_paloma",
    ]
    assert resolve_tasks(["pico"], manager).runnable == [
        "pico_arc_easy",
        "pico_blimp",
        "pico_hellaswag",
        "pico_paloma",
    ]


def _lm_eval_yaml(name):
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(
        os.path.join(os.path.dirname(lm_eval.__file__), "tasks", *name.split("/")), resolve_func=True
    )


@pytest.mark.parametrize(
    ("ours", "theirs", "loader"),
    [
        ("pico_hellaswag", "hellaswag/hellaswag.yaml", "load_hellaswag"),
        ("pico_arc_easy", "arc/arc_easy.yaml", "load_arc_easy"),
    ],
)
def test_prompts_and_preprocessing_are_lm_evals_own(manager, ours, theirs, loader):
    """lm-eval's own task config, fed our offline data, builds exactly the requests our task builds."""
    from lm_eval.api.task import ConfigurableTask

    ours_task = manager.load([ours])["tasks"][ours]
    reference = _lm_eval_yaml(theirs)
    reference.update(
        task=f"reference_{ours}",
        custom_dataset=getattr(sys.modules[ours_task.config.custom_dataset.__module__], loader),
        validation_split="validation",
        training_split=None,
        test_split=None,
    )
    reference.pop("dataset_path", None)
    reference.pop("dataset_name", None)
    reference_task = ConfigurableTask(config=reference)
    for key in (
        "output_type",
        "metric_list",
        "doc_to_text",
        "doc_to_target",
        "doc_to_choice",
        "target_delimiter",
    ):
        assert getattr(ours_task.config, key) == getattr(reference_task.config, key), key
    ours_docs, reference_docs = ours_task.validation_docs(), reference_task.validation_docs()
    assert len(ours_docs) == len(reference_docs) == {"pico_hellaswag": 10042, "pico_arc_easy": 570}[ours]
    for index in range(0, len(ours_docs), 97):
        doc, ref = ours_docs[index], reference_docs[index]
        assert ours_task.doc_to_text(doc) == reference_task.doc_to_text(ref)
        assert ours_task.doc_to_choice(doc) == reference_task.doc_to_choice(ref)
        assert ours_task.doc_to_target(doc) == reference_task.doc_to_target(ref)


# --- known answers: a real pico-decoder rigged to prefer one continuation -----------------------------------


def rigged_model(preferred_ids, boost=50.0):
    """A pico-decoder whose next-token distribution ignores the context and puts almost all its mass on
    `preferred_ids`: attention and MLP outputs are zeroed, every embedding is the same vector, and the head
    scores the preferred tokens `boost` and every other token 0."""
    model = tiny_model()
    with torch.no_grad():
        model.pico_decoder.embedding_proj.weight.fill_(1.0)
        for block in model.pico_decoder.layers:
            block.attention.o_proj.weight.zero_()
            block.swiglu.w_2.weight.zero_()
        head = model.de_embedding_proj.weight
        head.zero_()
        head[sorted(preferred_ids)] = boost / head.shape[1]  # hidden state is all ones after the norm
    return model


@pytest.mark.parametrize("task", ["pico_arc_easy", "pico_hellaswag"])
def test_multiple_choice_scores_a_known_answer(manager, task):
    tokenizer = load_tokenizer()
    loaded = manager.load([task])["tasks"][task]
    doc = loaded.validation_docs()[0]
    choices, gold = loaded.doc_to_choice(doc), loaded.doc_to_target(doc)
    gold = gold if isinstance(gold, int) else choices.index(gold)

    def token_set(text):
        return set(tokenizer(" " + text, add_special_tokens=False)["input_ids"])

    for preferred in (gold, (gold + 1) % len(choices)):
        wanted = token_set(choices[preferred])
        assert all(token_set(c) - wanted for i, c in enumerate(choices) if i != preferred)
        report = evaluate(rigged_model(wanted), tokenizer, [task], manager, limit=1, bootstrap_iters=0)
        expected = 1.0 if preferred == gold else 0.0
        assert scores(report)[task] == {"acc": expected, "acc_norm": expected}


# --- command line, conversions, plain lm_eval ---------------------------------------------------------------


def run_cli(*args, timeout=600):
    return subprocess.run(
        [sys.executable, str(RUN_SCRIPT), *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_and_python_give_identical_numbers(checkpoint, manager, tmp_path):
    tasks = ["pico_arc_easy", "pico_paloma"]
    result = run_cli(
        "--model", str(checkpoint), "--tasks", ",".join(tasks), "--limit", "3", "--device", "cpu",
        "--paloma", "embedded", "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = json.loads((tmp_path / "out" / "results.json").read_text())
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "|pico_arc_easy" in markdown and "| mean over texts | embedded | 3 | 128 |" in markdown
    assert "|pico_paloma" in result.stdout and markdown in result.stdout

    model, tokenizer = load_model(str(checkpoint), device="cpu")
    report = evaluate(model, tokenizer, tasks, manager, limit=3, paloma="embedded")
    assert written["results"] == report.results["results"]
    assert written["pico_hf"]["perplexity"] == report.paloma
    assert report.scores()["embedded_heldout_perplexity"] == {"perplexity": report.paloma["mean_perplexity"]}
    assert "paloma" not in report.scores() and report.paloma["metric"] == "embedded_heldout_perplexity"
    assert "| embedded_heldout_perplexity (pico-lm/perplexity) |" in markdown
    assert written["config"]["model"] == str(checkpoint)


def test_llama_conversion_scores_the_same(checkpoint, manager, tmp_path):
    convert(["to-llama", str(checkpoint), str(tmp_path / "llama")])
    tasks = ["pico_arc_easy", "pico_hellaswag", "pico_paloma"]
    reports = {}
    for name, path in (("pico", checkpoint), ("llama", tmp_path / "llama")):
        model, tokenizer = load_model(str(path), device="cpu")
        reports[name] = evaluate(
            model, tokenizer, tasks, manager, limit=4, paloma="embedded", bootstrap_iters=0
        )
    assert isinstance(model, LlamaForCausalLM)
    pico, llama = scores(reports["pico"]), scores(reports["llama"])
    assert pico.keys() == llama.keys()
    for task in pico:
        assert llama[task] == pytest.approx(pico[task], rel=1e-5), task


@pytest.mark.slow
def test_plain_lm_eval_cli_on_a_checkpoint(checkpoint, manager, tmp_path):
    """`lm_eval --model hf ... trust_remote_code=True` runs our tasks on our checkpoints (remote code)."""
    result = subprocess.run(
        [
            sys.executable, "-m", "lm_eval", "--model", "hf",
            "--model_args", f"pretrained={checkpoint},trust_remote_code=True",
            "--include_path", str(TASKS_DIR), "--tasks", "pico_paloma,pico_arc_easy",
            "--limit", "3", "--device", "cpu", "--output_path", str(tmp_path / "out"),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Custom kwargs can be passed to `--metadata`" not in result.stderr + result.stdout
    (written,) = (tmp_path / "out").rglob("results_*.json")
    model, tokenizer = load_model(str(checkpoint), device="cpu")
    report = evaluate(model, tokenizer, ["pico_paloma", "pico_arc_easy"], manager, limit=3)
    for task, values in scores(report).items():
        for metric, value in values.items():
            assert json.loads(written.read_text())["results"][task][f"{metric},none"] == pytest.approx(
                value, rel=1e-5
            )


def test_pico_tasks_load_under_plain_lm_eval_without_the_metadata_notice(tmp_path):
    """lm-eval's own TaskManager (as its CLI builds it, in a fresh process) loads our tasks without its
    once-per-task `--metadata` notice: our loaders take no kwargs. Other tasks keep their warnings."""
    code = f"""
import logging
from lm_eval.tasks import TaskManager, get_task_dict
tasks = get_task_dict(["pico_arc_easy", "pico_hellaswag"], TaskManager(include_path={str(TASKS_DIR)!r}, include_defaults=False))
print(sorted(tasks))
logging.getLogger("lm_eval.api.task").warning("other_task: Custom kwargs can be passed to `--metadata` here")
"""
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "['pico_arc_easy', 'pico_hellaswag']"
    notices = [line for line in result.stderr.splitlines() if "Custom kwargs" in line]
    assert len(notices) == 1 and "other_task:" in notices[0]


# --- errors -----------------------------------------------------------------------------------------------


def test_unknown_task_names_the_available_ones(full_manager):
    manager = full_manager
    with pytest.raises(EvaluationError) as error:
        resolve_tasks(["pico_hellaswg"], manager)
    message = str(error.value)
    assert message.startswith("Unknown task 'pico_hellaswg'. Did you mean 'pico_hellaswag'")
    assert (
        "pico-hf tasks: pico_arc_easy, pico_blimp, pico_hellaswag, pico_paloma, pico_paloma_tinsy;" in message
    )
    assert "`python eval/run.py --list` prints them" in message
    with pytest.raises(EvaluationError, match=r"Unknown task 'zzz_\*'"):
        resolve_tasks(["zzz_*"], manager)


def test_cli_reports_errors_in_one_line():
    result = run_cli("--model", "./nowhere", "--tasks", "pico_arc_easy", "--device", "cpu")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: Model path ./nowhere does not exist"


def test_model_errors(checkpoint, tmp_path):
    with pytest.raises(EvaluationError, match=r"Model path \./nowhere does not exist"):
        load_model("./nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        EvaluationError, match=r"empty is not a model: expected a checkpoint directory with config.json"
    ):
        load_model(str(tmp_path / "empty"))
    (tmp_path / "file.txt").write_text("not a model")
    with pytest.raises(EvaluationError, match=r"file.txt is not a model"):
        load_model(str(tmp_path / "file.txt"))
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(
        EvaluationError, match=r"no_weights is not a model: it has config.json but no weights"
    ):
        load_model(str(no_weights))
    no_tokenizer = tmp_path / "no_tokenizer"
    tiny_model().save_pretrained(no_tokenizer)
    with pytest.raises(EvaluationError, match=r"Checkpoint .*no_tokenizer has no tokenizer .*--tokenizer"):
        load_model(str(no_tokenizer))
    _, tokenizer = load_model(str(no_tokenizer), tokenizer="allenai/OLMo-7B-0724-hf", device="cpu")
    assert tokenizer.eos_token_id == 50279
    with pytest.raises(
        EvaluationError, match=r"Could not load model \(local cache or Hub\) 'pico-lm/not-cached'"
    ):
        load_model("pico-lm/not-cached")


def test_a_perplexity_task_draws_one_progress_bar(checkpoint, tmp_path):
    result = run_cli(
        "--model", str(checkpoint), "--tasks", "pico_paloma", "--limit", "6", "--device", "cpu",
        "--batch_size", "2", "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    states = [line for line in result.stderr.replace("\r", "\n").splitlines() if "loglikelihood" in line]
    assert not any(
        line.startswith("Running loglikelihood requests") for line in states
    )  # one per batch before
    assert {line.split(":")[0] for line in states} == {"Running loglikelihood_rolling requests"}
    assert states[-1].startswith("Running loglikelihood_rolling requests: 12 windows")  # 2 per document here


def test_a_multiple_choice_task_draws_only_its_requests_bar(checkpoint, tmp_path):
    result = run_cli(
        "--model", str(checkpoint), "--tasks", "pico_arc_easy", "--limit", "4", "--device", "cpu",
        "--output", str(tmp_path / "out"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bars = [
        line for line in result.stderr.replace("\r", "\n").splitlines() if "it/s" in line or "?it" in line
    ]
    assert bars, result.stderr  # the requests' bar is drawn ...
    assert all(line.startswith("Running loglikelihood requests") for line in bars), bars  # ... and only it


def test_list_puts_pico_tasks_first_and_filters(full_manager):
    result = run_cli("--list", "arc_e")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["pico-hf tasks (1):", "  pico_arc_easy"]
    assert lines[2] == "pico-hf tags and groups (0):"
    tasks = lines[lines.index(next(line for line in lines if line.startswith("lm-eval tasks"))) + 1 :]
    assert "  arc_easy" in tasks and all("arc_e" in line for line in tasks)
    everything = run_cli("--list").stdout.splitlines()
    ours = sorted(PICO_TASKS + BLIMP_TASKS)
    assert everything[: len(ours) + 4] == [
        f"pico-hf tasks ({len(ours)}):",
        *(f"  {t}" for t in ours),
        "pico-hf tags and groups (2):",
        "  pico",
        "  pico_blimp",
    ]


# --- BLiMP: pico_blimp vs lm-eval's blimp_* on a local copy in the Hub dataset's layout -----------------------

BLIMP_PARITY = ["anaphor_number_agreement", "wh_island"]


@pytest.fixture(scope="module")
def blimp_hub_copy(tmp_path_factory):
    """lm-eval's own blimp tasks on two sub-datasets of the shipped pairs, in the Hub dataset's layout."""
    return lm_eval_blimp_tasks(tmp_path_factory.mktemp("blimp"), BLIMP_PARITY)


def test_blimp_tasks_are_lm_evals_67(manager):
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    reference = load_yaml(
        os.path.join(os.path.dirname(lm_eval.__file__), "tasks", "blimp", "_blimp.yaml"), resolve_func=False
    )
    ours = manager.task_index["pico_blimp"].cfg
    assert len(ours["task"]) == 67
    assert ours["task"] == [name.replace("blimp_", "pico_blimp_", 1) for name in reference["task"]]
    assert ours["aggregate_metric_list"] == reference["aggregate_metric_list"]
    assert set(ours["task"]) <= manager.task_index["pico"].tags


def test_pico_blimp_scores_equal_lm_evals_blimp(checkpoint, blimp_hub_copy):
    manager = task_manager([TASKS_DIR, blimp_hub_copy], include_defaults=False)
    ours = [f"pico_blimp_{uid}" for uid in BLIMP_PARITY]
    theirs = [f"blimp_{uid}" for uid in BLIMP_PARITY]
    loaded = manager.load(ours + theirs)["tasks"]
    for mine, ref in zip(ours, theirs, strict=True):
        docs, ref_docs = loaded[mine].validation_docs(), loaded[ref].validation_docs()
        assert len(docs) == len(ref_docs) == 1000
        assert list(docs) == list(ref_docs)
        for doc in docs.select(range(0, 1000, 37)):
            args = [
                (r.arguments, r.doc_id)
                for r in loaded[mine].construct_requests(doc, "", metadata=("t", 0, 1))
            ]
            ref_args = [
                (r.arguments, r.doc_id) for r in loaded[ref].construct_requests(doc, "", metadata=("t", 0, 1))
            ]
            assert args == ref_args
    model, tokenizer = load_model(str(checkpoint), device="cpu")
    report = evaluate(model, tokenizer, ours + theirs, manager, limit=40, batch_size=16, bootstrap_iters=0)
    values = scores(report)
    for mine, ref in zip(ours, theirs, strict=True):
        assert values[mine] == values[ref]
        assert report.results["n-samples"][mine] == {"original": 1000, "effective": 40}
    assert len({values[name]["acc"] for name in ours}) == 2  # different pairs, different scores


@pytest.mark.slow
def test_pico_blimp_group_is_the_mean_of_its_tasks(checkpoint, manager):
    model, tokenizer = load_model(str(checkpoint), device="cpu")
    report = evaluate(model, tokenizer, ["pico_blimp"], manager, limit=2, batch_size=16, bootstrap_iters=0)
    values = scores(report)
    subtasks = [name for name in values if name.startswith("pico_blimp_")]
    assert len(subtasks) == 67
    mean = sum(values[name]["acc"] for name in subtasks) / 67
    assert values["pico_blimp"]["acc"] == pytest.approx(mean, abs=1e-12)


def test_few_shot_tasks_are_told_apart(tmp_path):
    """Few-shot tasks draw their examples per process, so the in-training evaluation keeps them on process 0:
    resolve_tasks names them (through groups, includes and tags)."""
    (tmp_path / "few_shot_arc.yaml").write_text(
        f"include: {TASKS_DIR / 'pico_arc_easy.yaml'}\ntask: few_shot_arc\ntag: []\nnum_fewshot: 2\n"
    )
    manager = task_manager([TASKS_DIR, tmp_path], include_defaults=False)
    assert resolve_tasks(["pico_blimp", "pico_arc_easy"], manager, hub_available=False).few_shot == []
    selection = resolve_tasks(["pico_blimp", "few_shot_arc"], manager, hub_available=False)
    assert selection.runnable == ["pico_blimp", "few_shot_arc"] and selection.few_shot == ["few_shot_arc"]
