"""Generation against transformers' generate, batching, stops, logprobs, seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mistral7b

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away, there lived",
           "1 2 3", "Mistral 7B uses sliding window attention and a rolling buffer cache so"]


@pytest.fixture(scope="module")
def llm(native_v1_dir: Path) -> mistral7b.LLM:
    return mistral7b.load(native_v1_dir)


def hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_tokens_match_transformers(llm, hf_mistral_v1) -> None:
    for prompt in PROMPTS[:2]:
        ids = llm.tokenizer.encode(prompt)
        ours = llm.generate(prompt, max_tokens=40, temperature=0, ignore_eos=True)
        assert ours.token_ids == hf_greedy(hf_mistral_v1, ids, 40)   # 40 tokens > 2 windows
        assert ours.finish_reason == "length" and ours.prompt_tokens == len(ids)
        assert ours.text == llm.tokenizer.decode(ours.token_ids)


def test_batch_gives_each_prompt_its_own_greedy_text(llm) -> None:
    alone = [llm.generate(p, max_tokens=24, temperature=0, ignore_eos=True) for p in PROMPTS]
    batched = llm.generate_batch(PROMPTS, max_tokens=24, temperature=0, ignore_eos=True)
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]


def test_batch_with_small_chunks_and_different_limits(llm) -> None:
    from mistral7b import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (3, 17, 1, 9)]
    batched = llm.generate_batch(PROMPTS, params, chunk_size=5)
    for prompt, p, result in zip(PROMPTS, params, batched, strict=True):
        assert result.token_ids == llm.generate(prompt, p).token_ids
        assert len(result.token_ids) == p.max_tokens


def test_seeded_sampling_is_reproducible_and_batch_invariant(llm) -> None:
    kwargs = dict(max_tokens=16, temperature=1.0, top_p=0.9, ignore_eos=True, seed=1234)
    first = llm.generate(PROMPTS[0], **kwargs)
    assert llm.generate(PROMPTS[0], **kwargs).token_ids == first.token_ids
    assert llm.generate_batch(PROMPTS[:2], **kwargs)[0].token_ids == first.token_ids
    assert llm.generate(PROMPTS[0], **dict(kwargs, seed=99)).token_ids != first.token_ids


def test_logprobs_match_transformers(llm, hf_mistral_v1) -> None:
    result = llm.generate(PROMPTS[1], max_tokens=8, temperature=0, ignore_eos=True, logprobs=True,
                          top_logprobs=3)
    ids = llm.tokenizer.encode(PROMPTS[1]) + result.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_mistral_v1(torch.tensor([ids])).logits[0].float(), -1)
    n = len(llm.tokenizer.encode(PROMPTS[1]))
    expected = [ref[n - 1 + i, t].item() for i, t in enumerate(result.token_ids)]
    assert result.logprobs == pytest.approx(expected, abs=1e-4)
    assert result.top_logprobs is not None and len(result.top_logprobs) == 8
    best_id, best_lp = result.top_logprobs[0][0]
    assert best_id == result.token_ids[0]       # greedy: the chosen token is the best one
    assert best_lp == pytest.approx(expected[0], abs=1e-4)


def test_stop_string_cuts_the_text(llm) -> None:
    full = llm.generate(PROMPTS[1], max_tokens=30, temperature=0, ignore_eos=True)
    word = full.text.split()[3]
    stopped = llm.generate(PROMPTS[1], max_tokens=30, temperature=0, ignore_eos=True, stop=[word])
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(word)]
    assert len(stopped.token_ids) < len(full.token_ids)


def test_stop_token_and_eos(llm) -> None:
    full = llm.generate(PROMPTS[0], max_tokens=10, temperature=0, ignore_eos=True)
    stop_at = full.token_ids[4]
    result = llm.generate(PROMPTS[0], max_tokens=10, temperature=0, ignore_eos=True,
                          stop_token_ids=[stop_at])
    first = full.token_ids.index(stop_at)
    assert result.finish_reason == "stop" and result.token_ids == full.token_ids[: first + 1]
    assert result.text == llm.tokenizer.decode(full.token_ids[:first])


def test_stream_generate_pieces_add_up(llm) -> None:
    pieces = list(llm.stream_generate(PROMPTS[2], max_tokens=20, temperature=0, ignore_eos=True))
    whole = llm.generate(PROMPTS[2], max_tokens=20, temperature=0, ignore_eos=True)
    assert "".join(p.text for p in pieces) == whole.text
    assert [t for p in pieces for t in p.token_ids] == whole.token_ids
    assert pieces[-1].finish_reason == "length"
    assert all(p.finish_reason is None for p in pieces[:-1])


def test_chat_uses_the_instruct_format(llm) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    result = llm.chat(messages, max_tokens=5, temperature=0, ignore_eos=True)
    direct = llm.generate(llm.tokenizer.encode_chat(messages), max_tokens=5, temperature=0,
                          ignore_eos=True)
    assert result.token_ids == direct.token_ids


def test_bad_prompts(llm) -> None:
    with pytest.raises(mistral7b.InvalidArgumentError, match="empty"):
        llm.generate([], max_tokens=3)
    with pytest.raises(mistral7b.InvalidArgumentError, match="32000"):
        llm.generate([1, 32000], max_tokens=3)
    with pytest.raises(ValueError, match="temperature"):
        llm.generate("hi", temperature=-1)
