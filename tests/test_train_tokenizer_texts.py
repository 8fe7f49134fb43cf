"""The tiny tokenizer of a recipe is trained on text from every kind of source, plain-text (`lm`)
sources included, and the run's data builds then use it."""

from __future__ import annotations

import json
from pathlib import Path

from train_runs import TINY_RECIPE

from data.tokenization import load_tokenizer
from train.config import load_recipe
from train.data_stream import source_build_dir
from train.distributed import DistributedContext
from train.runner import prepare_run, tokenizer_texts

# A made-up word that only the plain-text source holds, frequent enough there that a BPE
# trained on that source's text makes it a single token.
WORD = "zorblaxite"


def recipe_with_an_lm_source(tmp_path: Path, texts: list[str], sample_records: int):  # noqa: ANN201
    corpus = tmp_path / "prose.jsonl"
    corpus.write_text("".join(json.dumps({"body": text}) + "\n" for text in texts))
    source = {
        "source": {"kind": "lm", "path": str(corpus), "text_field": "body"},
        "sample_kind": "lm",
        "max_example_tokens": 256,
    }
    return load_recipe(
        TINY_RECIPE,
        [
            f"run.output_dir={tmp_path / 'run'}",
            f"data.sources.prose={json.dumps(source)}",
            f"tokenizer.train_tiny.sample_records={sample_records}",
            "stages.cpt_warmup.sources={prose: 1.0}",
            "stages.cpt_warmup.eval.sources={}",
        ],
    )


def test_tokenizer_texts_take_the_first_texts_of_an_lm_source(tmp_path: Path) -> None:
    texts = [f"text number {i} about {WORD}" for i in range(7)]
    recipe = recipe_with_an_lm_source(tmp_path, texts, sample_records=5)
    gathered = list(tokenizer_texts(recipe, tmp_path / "tokenizer", limit=5))
    # The lm source comes last in data.sources; each source gives at most `limit` texts of a kind.
    assert gathered[-5:] == texts[:5]
    assert texts[5] not in gathered


def test_a_run_with_a_tiny_tokenizer_builds_an_lm_source(tmp_path: Path, context: DistributedContext) -> None:
    texts = [f"{WORD} {WORD} and other prose, paragraph {i}." for i in range(50)]
    recipe = recipe_with_an_lm_source(tmp_path, texts, sample_records=50)
    run_dir = Path(recipe.run.output_dir)
    tokenizer_dir = prepare_run(recipe, [recipe.stage("cpt_warmup")], run_dir, context)
    tokenizer = load_tokenizer(tokenizer_dir)
    assert len(tokenizer.encode(WORD)) == 1  # learnt from the lm source's text
    manifest = json.loads((source_build_dir(run_dir, "prose") / "manifest.json").read_text())
    assert manifest["config"]["sample_kind"] == "lm"
