"""The paper's guardrail system prompt (§5.1) and where it goes in a conversation.

The prompt becomes the conversation's system message. When the user gave a system message too,
both are kept, safety prompt first:

    SAFETY_PROMPT + "\\n\\n" + user's system message

Each chat format then places the system message its own way: Mistral v1 (no system role)
prepends it to the first user message with a blank line; a Jinja template renders its system
turn.
"""

from __future__ import annotations

from collections.abc import Sequence

from mistral7b.tokenizer import ROLE_ALIASES, Message

SAFETY_PROMPT = (
    "Always assist with care, respect, and truth. Respond with utmost utility yet securely. "
    "Avoid harmful, unethical, prejudiced, or negative content. Ensure replies promote fairness "
    "and positivity.")


def with_safety_prompt(messages: Sequence[Message]) -> list[Message]:
    """`messages` with the safety prompt as (or in front of) the system message (which may
    come with an alias role, e.g. "developer")."""
    out = [dict(m) for m in messages]
    if out and ROLE_ALIASES.get(out[0].get("role", ""), out[0].get("role")) == "system":
        out[0]["role"] = "system"
        out[0]["content"] = f"{SAFETY_PROMPT}\n\n{out[0]['content']}"
        return out
    return [{"role": "system", "content": SAFETY_PROMPT}, *out]
