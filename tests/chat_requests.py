"""Chat requests to vLLM's OpenAI server, with logprobs keyed by token id like the
HF references in reference.json."""

from __future__ import annotations

from openai import OpenAI


def ask(client: OpenAI, ckpt, messages: list[dict]) -> dict:
    """One chat completion; logprobs keyed by token id, like the reference."""
    response = client.chat.completions.create(
        model=str(ckpt), messages=messages, max_tokens=8, temperature=0.0,
        logprobs=True, top_logprobs=10,
        extra_body={"prompt_logprobs": 1, "return_tokens_as_token_ids": True,
                    "ignore_eos": True},
    )
    choice = response.choices[0]
    first = choice.logprobs.content[0].top_logprobs
    prompt = response.model_extra["prompt_logprobs"]
    prompt_ids = [_id_of_actual(entry) for entry in prompt[1:]]
    return {
        "prompt_logprobs": [lp for _, lp in prompt_ids],
        "prompt_token_ids": [tok for tok, _ in prompt_ids],
        "next_top_logprobs": [[_token_id(t.token), t.logprob] for t in first],
        "greedy_token_ids": [_token_id(c.token) for c in choice.logprobs.content],
    }


def _token_id(token: str) -> int:
    return int(token.removeprefix("token_id:"))


def _id_of_actual(entry: dict) -> tuple[int, float]:
    # The actual prompt token is the entry with the largest rank when it is not top-1;
    # with prompt_logprobs=1 the dict holds it plus (maybe) the top-1 token.
    items = sorted(entry.items(), key=lambda kv: -kv[1]["rank"])
    token, info = items[0]
    return int(token), info["logprob"]
