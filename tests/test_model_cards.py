"""Model cards: the suite cards in model_cards/ are current, evaluation files become model-index entries."""

import json

import pytest
from conftest import REPO, tiny_training_overrides
from fake_hub import fake_hub  # noqa: F401
from huggingface_hub import ModelCard, constants, get_session

from pico_hf import PicoDecoderConfig, PicoDecoderForCausalLM
from pico_hf.hub import cards
from pico_hf.training.config import ConfigError, load_config

SIZES = ("tiny", "small", "medium", "large")


def test_suite_cards_are_current(tmp_path):
    """`python -m pico_hf.hub.cards suite` re-rendered gives exactly the committed cards."""
    written = cards.write_suite_cards(REPO / "recipes" / "configs", tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        f"pico-decoder-{size}/README.md" for size in SIZES
    ]
    for path in written:
        committed = REPO / "model_cards" / path.relative_to(tmp_path)
        assert committed.read_text() == path.read_text(), (
            f"{committed} is stale: run `python -m pico_hf.hub.cards suite`"
        )
    # The template beside the cards is the one the package renders with.
    assert (REPO / "model_cards" / "template.md").read_text() == cards.TEMPLATE.read_text()


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_suite_card_metadata_and_facts(size):
    card = ModelCard.load(REPO / "model_cards" / f"pico-decoder-{size}" / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0"
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["datasets"] == ["pico-lm/pretokenized-dolma"]
    assert data["language"] == "en"
    assert "pico" in data["tags"]
    assert "model-index" not in data  # nothing measured here, nothing claimed
    # The architecture row: parameters counted on a real model built from the suite config.
    config, _ = load_config(REPO / "recipes" / "configs" / f"pico-decoder-{size}.yaml")
    model = config.model
    parameters = PicoDecoderForCausalLM(
        PicoDecoderConfig(
            d_model=model.d_model,
            n_layers=model.n_layers,
            attention_n_heads=model.attention_n_heads,
            attention_n_kv_heads=model.attention_n_kv_heads,
            activation_hidden_dim=model.activation_hidden_dim,
            vocab_size=model.vocab_size,
            max_seq_len=model.max_seq_len,
        )
    ).num_parameters()
    row = (
        f"| {model.d_model} | {model.n_layers} | {model.attention_n_heads} | {model.attention_n_kv_heads} | "
        f"{model.activation_hidden_dim} | {model.vocab_size} | {model.max_seq_len} |"
    )
    assert row in card.text and f"({parameters:,})" in card.text
    assert f"| steps | {config.training.max_steps:,} " in card.text
    assert f'from_pretrained("pico-lm/pico-decoder-{size}")' in card.text
    assert "trust_remote_code=True" in card.text
    assert "@software{pico2025" in card.text


def test_evaluation_file_becomes_model_index_entries(tmp_path):
    measured = tmp_path / "step_4.json"
    measured.write_text(json.dumps({"paloma": 123.456789, "dataset": "pico-lm/pretokenized-paloma-tinsy"}))
    [result] = cards.read_evaluation(measured, default_dataset="somewhere/else")
    assert (result.metric_name, result.metric_value, result.dataset_name) == (
        "paloma",
        123.4568,
        "pico-lm/pretokenized-paloma-tinsy",
    )
    assert result.metric_type == "perplexity"
    # No `dataset` field: the configured dataset; any metric name is taken as it is.
    stand_in = tmp_path / "step_5.json"
    stand_in.write_text(json.dumps({"embedded_heldout_perplexity": 50.0, "note": "x"}))
    [result] = cards.read_evaluation(stand_in, default_dataset="embedded")
    # Local data is named, without a Hub id.
    assert (result.metric_name, result.dataset_name, result.dataset_type) == (
        "embedded_heldout_perplexity",
        "pico-hf embedded held-out split",
        "local",
    )
    broken = tmp_path / "step_6.json"
    broken.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"step_6\.json holds list"):
        cards.read_evaluation(broken, default_dataset=None)


def test_fake_hub_validation_checks_the_model_index(fake_hub, tmp_path):  # noqa: F811
    measured = tmp_path / "step_1.json"
    measured.write_text(json.dumps({"paloma": 10.0, "dataset": "pico-lm/pretokenized-paloma-tinsy"}))
    data = cards._card_data("run", ["pico-lm/pretokenized-dolma"], cards.read_evaluation(measured, None))
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n# run\n")
    card.validate()  # a well-formed model-index passes
    # What the client itself cannot parse, the fake Hub refuses with the Hub's 400 and a reason.
    broken = "---\nmodel-index:\n- name: run\n  results:\n  - task: {type: text-generation}\n    metrics: []\n---\n"
    answer = get_session().post(
        f"{constants.ENDPOINT}/api/validate-yaml", json={"repoType": "model", "content": broken}
    )
    assert answer.status_code == 400
    assert '"model-index[0].results[0].dataset" needs "type" and "name"' in answer.text
    assert '"model-index[0].results[0].metrics" must be a non-empty array' in answer.text


def _code_after(text: str, marker: str) -> str:
    """The first ```python block after `marker` in a card."""
    return text.split(marker, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_checkpoint_card_title_and_how_to_use(tmp_path):
    """The title survives the model-index (which consumes `model_name`); "How to use" loads the checkpoint
    from where it is: its folder for a local run, the repo's run branch once it has a repo id."""
    import subprocess
    import sys

    from conftest import train

    train(tmp_path, **{"training.max_steps": 2})
    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "eval_results").mkdir(exist_ok=True)
    (run_dir / "eval_results" / "step_2.json").write_text(json.dumps({"paloma": 99.5, "dataset": "a/b"}))
    card = cards.checkpoint_card(run_dir, 2)
    assert card.data.to_dict()["model-index"][0]["name"] == "tiny"
    assert "\n# tiny\n" in card.text
    step_dir = (run_dir / "checkpoints" / "step_2").as_posix()
    assert f'AutoModelForCausalLM.from_pretrained("{step_dir}")' in card.text
    assert "path/to" not in card.text and "revision=" not in card.text
    on_hub = cards.checkpoint_card(run_dir, 2, repo_id="someone/tiny")
    assert 'AutoModelForCausalLM.from_pretrained("someone/tiny", revision="tiny")' in on_hub.text

    # The card's own no-pico-hf snippet, run as written in a process that never imports pico_hf, with no
    # terminal to answer a prompt: no trust_remote_code prompt, no config-class warning.
    snippet = _code_after(card.text, "Or without pico-hf")
    assert snippet.count("trust_remote_code=True") == 1  # the model's line only
    check = snippet + "import sys\nprint(type(model).__module__.split('.')[0], type(tokenizer).__name__, "
    check += "'pico_hf' in sys.modules, tokenizer('a b').input_ids)\n"
    result = subprocess.run(
        [sys.executable, "-c", check],
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["transformers_modules", "TokenizersBackend", "False"]
    assert "custom code" not in result.stderr and "model of type" not in result.stderr


BLIMP_SUBTASKS = [f"pico_blimp_phenomenon_{i}" for i in range(cards.MAX_SUBTASKS_IN_CARD + 1)]
# What the evaluation callback writes with `evaluation.metrics=[paloma, pico_arc_easy, hellaswag, pico_blimp,
# paloma_wikitext_103, a small group]`: perplexity, then lm-eval's {task: {metric: value}}.
STEP_RESULTS = {
    "paloma": 41.234567,
    "dataset": "pico-lm/pretokenized-paloma-tinsy",
    "pico_arc_easy": {"acc": 0.3, "acc_norm": 0.25},
    "hellaswag": {"acc": 0.27, "acc_norm": 0.2625},
    "pico_blimp": {"acc": 0.524242},
    **{task: {"acc": 0.5 + i / 100} for i, task in enumerate(BLIMP_SUBTASKS)},
    "paloma_wikitext_103": {"word_perplexity": 1234.5, "byte_perplexity": 5.5, "bits_per_byte": 2.4594},
    "blimp": {"acc": 0.61},
    "blimp_adjunct_island": {"acc": 0.6},
    "blimp_anaphor_gender_agreement": {"acc": 0.62},
}
EXPECTED_DATA = {  # task -> (dataset type, name, config, split) in the model-index
    "paloma": ("pico-lm/pretokenized-paloma-tinsy", "pico-lm/pretokenized-paloma-tinsy", None, None),
    "pico_arc_easy": ("allenai/ai2_arc", "ARC-Easy", "ARC-Easy", "validation"),
    "hellaswag": ("Rowan/hellaswag", "HellaSwag", None, "validation"),
    "pico_blimp": ("nyu-mll/blimp", "BLiMP", None, "train"),
    "paloma_wikitext_103": ("allenai/paloma", "Paloma wikitext_103", "wikitext_103", "val"),
    "blimp": ("nyu-mll/blimp", "BLiMP", None, "train"),
    "blimp_adjunct_island": ("nyu-mll/blimp", "BLiMP adjunct_island", "adjunct_island", "train"),
    "blimp_anaphor_gender_agreement": (
        "nyu-mll/blimp",
        "BLiMP anaphor_gender_agreement",
        "anaphor_gender_agreement",
        "train",
    ),
}


def test_checkpoint_card_carries_every_score_of_eval_results(tmp_path):
    from huggingface_hub import metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    config, _ = load_config(None, tiny_training_overrides(tmp_path))
    run_dir = config.run_dir
    (run_dir / "checkpoints" / "step_4").mkdir(parents=True)
    config.save_yaml(run_dir / "training_config.yaml")
    (run_dir / "eval_results").mkdir()
    (run_dir / "eval_results" / "step_4.json").write_text(json.dumps(STEP_RESULTS))
    path = cards.write_checkpoint_card(run_dir, 4, "fake-user/tiny", "tiny")

    card = ModelCard.load(path)
    assert card.data.eval_results  # huggingface_hub parses the model-index back into EvalResults
    metadata = metadata_load(path)
    _, parsed = model_index_to_eval_results(metadata["model-index"])
    found = {result.metric_name: result for result in parsed}
    expected = {"paloma": STEP_RESULTS["paloma"]}
    for task, metrics in STEP_RESULTS.items():
        if isinstance(metrics, dict) and task not in BLIMP_SUBTASKS:  # 9 sub-tasks: the group stands for them
            expected.update({f"{task}/{metric}": value for metric, value in metrics.items()})
    assert set(found) == set(expected)
    for name, value in expected.items():
        result = found[name]
        assert result.metric_value == round(value, 4), name
        task = name.split("/")[0]
        data = (result.dataset_type, result.dataset_name, result.dataset_config, result.dataset_split)
        assert data == EXPECTED_DATA[task], name
        assert result.metric_type == ("perplexity" if task == "paloma" else name.split("/")[1])
    assert "datasets" not in metadata  # trained on a local file: no Hub id to list
