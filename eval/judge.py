"""Optional LLM judge on a 0-5 scale, through any OpenAI-compatible chat-completions endpoint.

Off unless a base URL is given. The rubric follows the paper's 0-5 grading of an answer
against a reference; the wording here is ours.
"""

from __future__ import annotations

import json
import logging
import os
import re
import urllib.request
from dataclasses import dataclass

logger = logging.getLogger(__name__)

RUBRIC = """You grade an answer to a question against a reference answer.
Score it on this scale:
5 - correct and complete: it states everything the reference states, with nothing wrong.
4 - correct, with a minor omission or imprecision that does not change the meaning.
3 - partly correct: the main point is right but important parts are missing or wrong.
2 - mostly wrong, though it contains some correct, relevant information.
1 - wrong, but on the topic of the question.
0 - wrong and unrelated, empty, or a refusal.
Reply with the line "Score: N" (N from 0 to 5) and nothing else."""

_SCORE = re.compile(r"score\s*[:=]?\s*([0-5])", re.IGNORECASE)
_DIGIT = re.compile(r"\b([0-5])\b")


def parse_score(reply: str) -> int | None:
    """The 0-5 score in a judge's reply ("Score: 4", or a lone digit), None if there is none."""
    found = _SCORE.search(reply) or _DIGIT.search(reply)
    return int(found.group(1)) if found else None


@dataclass
class JudgeClient:
    """Chat-completions client. `api_key_env` names the environment variable holding the key."""

    base_url: str
    model: str
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0

    def complete(self, messages: list[dict]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0.0}).encode()
        request = urllib.request.Request(
            self.base_url.rstrip("/") + "/chat/completions",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        key = os.environ.get(self.api_key_env)
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            payload = json.loads(response.read())
        return payload["choices"][0]["message"]["content"]

    def score(self, question: str, reference: str, answer: str) -> int | None:
        """The judge's 0-5 score for `answer`; None (logged) when the reply has no score."""
        content = f"Question: {question}\nReference answer: {reference}\nAnswer to grade: {answer}"
        reply = self.complete([{"role": "system", "content": RUBRIC}, {"role": "user", "content": content}])
        score = parse_score(reply)
        if score is None:
            logger.warning("judge reply without a score: %r", reply[:200])
        return score
