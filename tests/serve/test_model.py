"""The quickstart on the real embedded model: SmolLM2-135M-Instruct served by llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import EXAMPLES, run_cli

from parsl_chat.io.results import COLUMNS

pytestmark = [pytest.mark.model, pytest.mark.slow]


def _example_ids() -> list[str]:
    ids = []
    for n, line in enumerate((EXAMPLES / "prompts.jsonl").read_text().splitlines(), 1):
        obj = json.loads(line)
        ids.append(str(obj.get("custom_id") or obj.get("id") or f"line-{n}"))
    return sorted(ids)


@pytest.mark.parametrize("flag", [[], ["--no-parsl"]], ids=["parsl", "no-parsl"])
def test_quickstart_on_the_embedded_model(flag: list[str], tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("run", str(EXAMPLES / "prompts.jsonl"), "--out", str(out), *flag, timeout=900)
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert tuple(df.columns) == COLUMNS
    assert sorted(df.custom_id) == _example_ids()
    assert (df.status == "ok").all()
    assert (df.model == "smollm2-135m-instruct").all()
    assert df.response.str.len().gt(0).all() and (df.completion_tokens > 0).all()
    assert "starting the embedded model server" in result.stderr
    assert (out / "logs" / "model-server.log").is_file()
    # a real model, not an echo: answers differ between prompts and don't repeat the prompt
    assert df.response.nunique() == len(df)


def test_embedded_server_answers_directly(embedded_server: str) -> None:
    import httpx

    body = {
        "model": "smollm2-135m-instruct",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. Answer concisely."},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "temperature": 0,
        "max_tokens": 24,
    }
    answer = httpx.post(f"{embedded_server}/chat/completions", json=body, timeout=120).json()
    assert "Paris" in answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] > 0


SENTIMENT_SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"type": "string", "enum": ["positive", "negative"]},
        # an enum, not minimum/maximum: llama.cpp's grammar does not enforce numeric bounds (seen: 10 stars),
        # which the validator then catches as invalid_output
        "stars": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
    },
    "required": ["sentiment", "stars"],
    "additionalProperties": False,
}


def test_embedded_model_answers_a_two_field_schema(embedded_server: str, tmp_path: Path) -> None:
    """llama.cpp's grammar-constrained decoding, asked as OpenAI spells it, through the real CLI."""
    import jsonschema

    (tmp_path / "sentiment.json").write_text(json.dumps(SENTIMENT_SCHEMA))
    config = tmp_path / "config.yaml"
    config.write_text(
        "schema: sentiment.json\nagents:\n  - name: rater\n"
        "    system_prompt: Rate the review. Answer in JSON.\n    params: {temperature: 0, max_tokens: 48}\n"
    )
    reviews = ["I love this phone, the battery is great.", "Terrible. It broke after a day.", "Works fine, fast delivery."]
    prompts = tmp_path / "reviews.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in reviews))
    out = tmp_path / "run"
    result = run_cli(
        "run", str(prompts), "--config", str(config), "--endpoint", embedded_server, "--model", "smollm2-135m-instruct",
        "--out", str(out), "--no-parsl", "--flatten", "--agents", "1", timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    df = pd.read_parquet(out / "results.parquet")
    assert (df.status == "ok").all(), df[["error_type", "error"]]
    for parsed in df.parsed:
        jsonschema.validate(json.loads(parsed), SENTIMENT_SCHEMA)
    assert set(df.sentiment) <= {"positive", "negative"} and df.stars.between(1, 5).all()
    assert (df.attempts == 1).all()  # constrained decoding: valid the first time, nothing asked again
