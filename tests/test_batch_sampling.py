"""The batched sampler (batch_sampling.py) against the plain per-sequence reference
(sampling.Sampler and its apply_* rules): the same tokens and logprobs row by row, whatever else
shares the batch."""

from __future__ import annotations

import pytest
import torch

from mistral7b.batch_sampling import BatchSampler, _top_k_top_p
from mistral7b.sampling import Sampler, SamplingParams, apply_min_p, apply_top_k, apply_top_p

V = 300
PROMPT = [3, 17, 17, 42, 250]
CASES = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=0, repetition_penalty=1.3, logit_bias={5: 3.0, 7: -100}),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.0, top_k=5, seed=2),
    SamplingParams(temperature=0.7, top_p=0.6, seed=3),
    SamplingParams(temperature=1.3, min_p=0.05, seed=4),
    SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, seed=5),
    SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.7, seed=6,
                   logprobs=True, top_logprobs=3),
    SamplingParams(temperature=0.5, repetition_penalty=0.8, logit_bias={9: 2.0}, seed=7,
                   top_logprobs=2),
]
# The sampler runs on the logits' device; the CUDA cases need a GPU and are skipped without one.
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")])]


def step_logits(step: int, rows: int) -> torch.Tensor:
    """Peaked random logits, different for every step and row."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(rows, V, generator=g) * 4


@pytest.mark.parametrize("device", DEVICES)
def test_every_rule_matches_the_per_sequence_reference(device: str) -> None:
    """The batch on `device` against the reference on the CPU: a seeded row draws the same
    uniform numbers on every device."""
    batch = BatchSampler(len(CASES), V, device)
    reference = [Sampler(p, PROMPT) for p in CASES]
    for row, p in enumerate(CASES):
        batch.start(row, p, PROMPT)
    for step in range(40):
        logits = step_logits(step, len(CASES))
        got = batch.sample(range(len(CASES)), logits.to(device))
        for row, ref in enumerate(reference):
            want = ref.sample(logits[row])
            assert got[row].token_id == want.token_id, (row, step)
            if CASES[row].logprobs or CASES[row].top_logprobs:
                assert got[row].logprob == pytest.approx(want.logprob, abs=1e-5)
                assert [t for t, _ in got[row].top_logprobs] == [t for t, _ in want.top_logprobs]


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_row_draws_the_same_tokens_in_any_batch(device: str) -> None:
    """Row 0's tokens when alone, and when rows come and go beside it (with and without
    top-p rows, which make the batch sort)."""
    params = SamplingParams(temperature=1.0, min_p=0.01, seed=11)
    others = [SamplingParams(temperature=0.7, top_p=0.5), SamplingParams(temperature=0),
              SamplingParams(temperature=1.1, repetition_penalty=1.2, top_k=3)]

    def tokens(company: list[list[int]]) -> list[int]:
        sampler = BatchSampler(4, V, device)
        sampler.start(0, params, PROMPT)
        for row, p in enumerate(others, start=1):
            sampler.start(row, p, PROMPT)
        out = []
        for step, rows in enumerate(company):
            logits = step_logits(step, 4).to(device)
            out.append(sampler.sample([0, *rows], logits[[0, *rows]])[0].token_id)
        return out

    alone = tokens([[] for _ in range(30)])
    crowded = tokens([[1, 2, 3][: step % 4] for step in range(30)])
    reversed_order = tokens([[3, 1] if step % 2 else [2] for step in range(30)])
    assert alone == crowded == reversed_order


@pytest.mark.parametrize("device", DEVICES)
def test_filter_masks_equal_the_reference_rules(device: str) -> None:
    logits = step_logits(0, 5)
    logits[1, :10] = logits[1, 10]          # ties at the k-th value: lower ids win
    ks, ps = [0, 7, 50, 1, 300], [1.0, 0.8, 0.95, 0.3, 0.5]
    keep = _top_k_top_p(logits.to(device), ks, ps).cpu()
    for row in range(5):
        want = apply_top_p(apply_top_k(logits[row], ks[row]), ps[row]) > float("-inf")
        assert torch.equal(keep[row], want), row
    sampler = BatchSampler(1, V, device)
    p = SamplingParams(temperature=1.0, min_p=0.2, seed=0)
    sampler.start(0, p, [])
    allowed = apply_min_p(logits[2], 0.2) > float("-inf")
    for _ in range(50):                     # every draw lands among the ids min-p keeps
        assert allowed[sampler.sample([0], logits[2:3].to(device))[0].token_id]


def test_sampling_a_row_that_was_never_started_is_an_error() -> None:
    with pytest.raises(ValueError, match="not start"):
        BatchSampler(2, V).sample([1], step_logits(0, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_candidates_and_the_full_sort_keep_the_same_ids(monkeypatch: pytest.MonkeyPatch,
                                                         device: str) -> None:
    """On the CPU each row sorts only its candidates; alone, together, and with the whole
    vocabulary sorted instead, each row keeps the same ids as the reference. Ties (bfloat16
    logits have many), a row where every logit ties, rows whose nucleus needs more than the first
    candidates, and -inf logits (a grammar's forbidden tokens)."""
    import mistral7b.batch_sampling as batch_sampling

    logits = step_logits(2, 8).bfloat16().float()
    logits[5] = 1.5
    logits[6] = torch.linspace(0.0, 10.0, V)        # 64 candidates are not enough
    logits[7, ::2] = float("-inf")
    ks, ps = [5, 40, 1, 0, 100, 0, 0, 3], [0.9, 0.5, 1.0, 0.7, 0.95, 0.6, 0.99, 0.8]
    on = logits.to(device)                          # a GPU always sorts the whole vocabulary
    mixed = _top_k_top_p(on, ks, ps).cpu()
    for row in range(len(ks)):
        alone = _top_k_top_p(on[row:row + 1], ks[row:row + 1], ps[row:row + 1]).cpu()
        assert torch.equal(mixed[row:row + 1], alone), row
        want = apply_top_p(apply_top_k(logits[row], ks[row]), ps[row]) > float("-inf")
        assert torch.equal(mixed[row], want), row
    monkeypatch.setattr(batch_sampling, "TOPK_CANDIDATES", False)
    assert torch.equal(_top_k_top_p(on, ks, ps).cpu(), mixed)


def test_candidates_grow_until_they_hold_the_nucleus(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose nucleus needs 64, 512 and 4096 candidates and more, over 6000 ids."""
    import mistral7b.batch_sampling as batch_sampling

    wide = 6000
    logits = torch.stack([torch.linspace(0.0, slope * wide, wide)
                          for slope in (0.2, 0.01, 0.002, 0.0002)])
    ks, ps = [0, 0, 0, 0], [0.9, 0.9, 0.95, 0.5]
    keep = _top_k_top_p(logits, ks, ps)
    for row in range(4):
        want = apply_top_p(logits[row], ps[row]) > float("-inf")
        assert torch.equal(keep[row], want), row
    assert keep.sum(dim=1).tolist()[0] < 64 < keep.sum(dim=1).tolist()[2]
    monkeypatch.setattr(batch_sampling, "TOPK_CANDIDATES", False)
    assert torch.equal(_top_k_top_p(logits, ks, ps), keep)


def test_parameter_columns_are_uploaded_once_per_batch() -> None:
    sampler = BatchSampler(2, V)
    for row, p in enumerate(CASES[6:8]):
        sampler.start(row, p, PROMPT)
    sampler.sample([0, 1], step_logits(0, 2))
    kept = dict(sampler._constants)
    sampler.sample([0, 1], step_logits(1, 2))
    assert sampler._constants.keys() == kept.keys()
    assert all(sampler._constants[key] is tensor for key, tensor in kept.items())


def test_greedy_ids_are_torch_argmax_with_ties_to_the_lowest_id() -> None:
    from mistral7b.batch_sampling import greedy_ids

    logits = step_logits(3, 4).bfloat16().float()
    logits[1, 7] = logits[1, 200] = logits[1].max() + 1       # a tie: the lower id wins
    logits[2] = float("-inf")
    assert torch.equal(greedy_ids(logits), logits.argmax(dim=-1))
    assert greedy_ids(logits)[1] == 7
    assert torch.equal(greedy_ids(logits[:, ::2]), logits[:, ::2].argmax(dim=-1))  # strided
