"""The paper's guardrails (section 5): safety system prompt and self-reflection moderation."""
