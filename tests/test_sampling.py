from __future__ import annotations

import dataclasses
import math
from collections import Counter

import pydantic
import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from mistral7b.errors import Mistral7BError
from mistral7b.sampling import (
    RANGES,
    InvalidSamplingParam,
    Sampler,
    SampleResult,
    SamplingParams,
    TokenHistory,
    apply_top_k,
    make_logits_processors,
)

# ---------------------------------------------------------------------------
# helpers (independent reference computations in plain Python)
# ---------------------------------------------------------------------------


def py_softmax(values: list[float]) -> list[float]:
    m = max(values)
    exps = [math.exp(v - m) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


def py_log_softmax(values: list[float]) -> list[float]:
    m = max(values)
    lse = m + math.log(sum(math.exp(v - m) for v in values))
    return [v - lse for v in values]


def draw(params: SamplingParams, logits: torch.Tensor, n: int) -> Counter[int]:
    sampler = Sampler(params, prompt_ids=[])
    return Counter(sampler.sample(logits).token_id for _ in range(n))


def random_logits(n_steps: int, vocab: int, seed: int, scale: float = 2.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(vocab, generator=g) * scale for _ in range(n_steps)]


# A hand-built distribution with a shuffled order, so "most probable" is not
# simply "lowest id".
PROBS = [0.04, 0.25, 0.10, 0.40, 0.06, 0.15]
LOGITS = torch.tensor([math.log(p) for p in PROBS])


# ---------------------------------------------------------------------------
# SamplingParams validation
# ---------------------------------------------------------------------------

BAD_PARAMS = [
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 1.5),
    ("max_tokens", True),
    ("temperature", -1.0),
    ("temperature", 101.0),
    ("temperature", float("nan")),
    ("temperature", "hot"),
    ("top_k", -2),
    ("top_k", 2.0),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", float("inf")),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -2.5),
    ("seed", "abc"),
    ("seed", 1.0),
    ("stop", [""]),
    ("stop", ""),
    ("stop", ["ok", 3]),
    ("stop", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["2"]),
    ("stop_token_ids", "2"),
    ("ignore_eos", "yes"),
    ("logprobs", 1),
    ("top_logprobs", 21),
    ("top_logprobs", -1),
]


@pytest.mark.parametrize(("field", "value"), BAD_PARAMS)
def test_invalid_params_name_their_field(field: str, value: object) -> None:
    with pytest.raises(InvalidSamplingParam) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, Mistral7BError)
    message = str(info.value)
    # The message starts with the field name (so "stop" cannot be satisfied by
    # a "stop_token_ids" message and vice versa).
    assert message.startswith(field + " "), message


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("temperature", -1.0, "[0, 100]"),
        ("top_p", 0.0, "(0, 1]"),
        ("min_p", 2.0, "[0, 1]"),
        ("presence_penalty", 3.0, "[-2, 2]"),
        ("frequency_penalty", -3.0, "[-2, 2]"),
        ("top_logprobs", 50, "[0, 20]"),
        ("max_tokens", 0, ">= 1"),
        ("top_k", -3, ">= -1"),
        ("repetition_penalty", 0.0, "(0, 100]"),
    ],
)
def test_range_errors_state_range_and_value(field: str, value: float, allowed: str) -> None:
    with pytest.raises(InvalidSamplingParam) as info:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    message = str(info.value)
    assert field in message
    assert allowed in message
    assert f"(got {value!r})" in message


def test_boundary_values_are_accepted() -> None:
    SamplingParams(
        max_tokens=1,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        min_p=1.0,
        repetition_penalty=1e-3,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        top_logprobs=20,
        seed=0,
    )
    SamplingParams(temperature=100.0, min_p=0.0, presence_penalty=2, frequency_penalty=-2, seed=-7)


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p, p.min_p) == (256, 0.7, 0, 1.0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None and p.stop == () and p.stop_token_ids == ()
    assert not p.ignore_eos and not p.logprobs and p.top_logprobs == 0
    assert not p.greedy
    assert SamplingParams(temperature=0).greedy


def test_stop_normalisation_and_immutability() -> None:
    assert SamplingParams(stop="###").stop == ("###",)  # type: ignore[arg-type]
    p = SamplingParams(stop=["a", "bc"], stop_token_ids=[2, 7])  # type: ignore[arg-type]
    assert p.stop == ("a", "bc")
    assert p.stop_token_ids == (2, 7)
    assert isinstance(p.stop, tuple) and isinstance(p.stop_token_ids, tuple)
    assert SamplingParams(stop_token_ids=5).stop_token_ids == (5,)  # type: ignore[arg-type]
    hash(p)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------
# greedy / top-k
# ---------------------------------------------------------------------------


def test_greedy_is_argmax() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0), prompt_ids=[1, 2, 3])
    for logits in random_logits(40, 97, seed=1):
        expected = max(range(97), key=lambda i: (logits[i].item(), -i))
        assert sampler.sample(logits).token_id == expected


def test_greedy_ties_pick_lowest_id() -> None:
    logits = torch.tensor([1.0, 3.0, 0.5, 3.0, -2.0])
    assert Sampler(SamplingParams(temperature=0), []).sample(logits).token_id == 1


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
def test_top_k_1_equals_greedy(temperature: float) -> None:
    params = SamplingParams(temperature=temperature, top_k=1, seed=3)
    sampler = Sampler(params, [])
    for logits in random_logits(40, 64, seed=2):
        expected = max(range(64), key=lambda i: (logits[i].item(), -i))
        assert sampler.sample(logits).token_id == expected
    tied = torch.tensor([0.0, 2.0, 2.0, 2.0])
    tie_sampler = Sampler(params, [])
    assert all(tie_sampler.sample(tied).token_id == 1 for _ in range(50))


def test_top_k_support() -> None:
    counts = draw(SamplingParams(temperature=1.0, top_k=2, seed=11), LOGITS, 2000)
    top2 = set(sorted(range(len(PROBS)), key=lambda i: -PROBS[i])[:2])
    assert set(counts) == top2


def test_top_k_keeps_exactly_k_with_ties() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 3.0, 3.0, 0.0])
    out = apply_top_k(logits, 3)
    kept = [i for i in range(6) if out[i].item() != float("-inf")]
    assert kept == [1, 2, 3]
    assert torch.equal(out[kept], logits[kept])


# ---------------------------------------------------------------------------
# top-p / min-p supports on a hand-built distribution
# ---------------------------------------------------------------------------


def expected_top_p_support(probs: list[float], top_p: float) -> set[int]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept: set[int] = set()
    mass = 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.75, 0.9, 0.97])
def test_top_p_support(top_p: float) -> None:
    expected = expected_top_p_support(PROBS, top_p)
    counts = draw(SamplingParams(temperature=1.0, top_p=top_p, seed=5), LOGITS, 3000)
    assert set(counts) == expected
    total_mass = sum(PROBS[i] for i in expected)
    for i in expected:
        assert abs(counts[i] / 3000 - PROBS[i] / total_mass) < 0.04


def test_top_p_tiny_keeps_only_the_best() -> None:
    counts = draw(SamplingParams(temperature=1.0, top_p=1e-6, seed=9), LOGITS, 300)
    assert set(counts) == {3}


@pytest.mark.parametrize("min_p", [0.1, 0.2, 0.3, 0.5, 1.0])
def test_min_p_support(min_p: float) -> None:
    threshold = min_p * max(PROBS)
    expected = {i for i, p in enumerate(PROBS) if p >= threshold}
    counts = draw(SamplingParams(temperature=1.0, min_p=min_p, seed=6), LOGITS, 3000)
    assert set(counts) == expected


def test_filters_apply_in_order_top_k_then_top_p() -> None:
    # top_p=0.85 on the full distribution keeps 4 ids, but applied after
    # top-k=3 (renormalised 0.5, 0.3125, 0.1875) it keeps those 3.
    k3 = sorted(range(len(PROBS)), key=lambda i: -PROBS[i])[:3]
    renorm = [PROBS[i] if i in k3 else 0.0 for i in range(len(PROBS))]
    total = sum(renorm)
    renorm = [p / total for p in renorm]
    expected = expected_top_p_support(renorm, 0.85)
    assert len(expected) == 3 and len(expected_top_p_support(PROBS, 0.85)) == 4
    counts = draw(SamplingParams(temperature=1.0, top_k=3, top_p=0.85, seed=4), LOGITS, 2000)
    assert set(counts) == expected


def test_min_p_uses_temperature_scaled_probabilities() -> None:
    # At T=0.5 probabilities become p^2 / sum(p^2); min_p=0.2 then keeps only
    # ids with p^2 >= 0.2 * 0.4^2, i.e. p >= 0.179 -> {0.4, 0.25}.
    t = 0.5
    scaled = py_softmax([v / t for v in LOGITS.tolist()])
    expected = {i for i, p in enumerate(scaled) if p >= 0.2 * max(scaled)}
    assert expected == {1, 3}
    counts = draw(SamplingParams(temperature=t, min_p=0.2, seed=8), LOGITS, 2000)
    assert set(counts) == expected


# ---------------------------------------------------------------------------
# temperature sampling frequencies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_temperature_frequencies_match_softmax(temperature: float) -> None:
    raw = [1.0, 2.0, 0.5, -1.0, 1.5, 0.0]
    expected = py_softmax([v / temperature for v in raw])
    n = 20000
    counts = draw(SamplingParams(temperature=temperature, seed=1234), torch.tensor(raw), n)
    for i, p in enumerate(expected):
        assert abs(counts[i] / n - p) < 0.015, (i, counts[i] / n, p)


# ---------------------------------------------------------------------------
# penalties
# ---------------------------------------------------------------------------


def processed(raw: list[float], prompt: list[int], generated: list[int],
              params: SamplingParams) -> torch.Tensor:
    """`raw` logits after the params' logits processors, with that prompt and generated text."""
    history = TokenHistory(len(raw), prompt)
    for t in generated:
        history.add(t)
    logits = torch.tensor(raw)
    for proc in make_logits_processors(params):
        logits = proc(logits, history)
    return logits


def test_repetition_penalty_matches_hand_computation_and_transformers() -> None:
    raw = [2.0, -1.0, 0.5, -3.0, 1.0, 0.0, 4.0]
    prompt = [0, 1, 5]
    generated = [3, 3]
    penalty = 1.5
    params = SamplingParams(repetition_penalty=penalty)

    logits = processed(raw, prompt, generated, params)

    seen = set(prompt) | set(generated)
    hand = [(v / penalty if v > 0 else v * penalty) if i in seen else v for i, v in enumerate(raw)]
    assert logits.tolist() == pytest.approx(hand, abs=1e-6)

    hf = RepetitionPenaltyLogitsProcessor(penalty=penalty)
    hf_out = hf(torch.tensor([prompt + generated]), torch.tensor([raw]))[0]
    torch.testing.assert_close(logits, hf_out)


def test_repetition_penalty_drives_greedy_choice() -> None:
    raw = torch.tensor([3.0, 2.5, 2.1, -1.0])
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=1.5), prompt_ids=[0])
    # id 0 (in prompt): 3.0/1.5 = 2.0 < 2.5 -> id 1
    assert sampler.sample(raw).token_id == 1
    # now id 1 was generated too: 2.0, 1.67, 2.1 -> id 2
    assert sampler.sample(raw).token_id == 2
    # ids 0,1,2 penalised: 2.0, 1.67, 1.4 -> id 0
    assert sampler.sample(raw).token_id == 0
    assert sampler.generated == (1, 2, 0)


def test_presence_and_frequency_penalties_match_hand_computation() -> None:
    raw = [1.0, 2.0, 3.0, -0.5, 0.25]
    prompt = [1, 3]  # prompt tokens must NOT be penalised by presence/frequency
    generated = [2, 2, 4, 2]
    presence, frequency = 0.5, 0.3
    params = SamplingParams(presence_penalty=presence, frequency_penalty=frequency)

    logits = processed(raw, prompt, generated, params)

    counts = Counter(generated)
    hand = [v - presence * (counts[i] > 0) - frequency * counts[i] for i, v in enumerate(raw)]
    assert logits.tolist() == pytest.approx(hand, abs=1e-6)


def test_penalties_combined_order() -> None:
    raw = [2.0, -1.0, 1.0]
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=1.0, frequency_penalty=0.5)
    history = TokenHistory(3, [1])
    history.add(0)
    history.add(0)
    logits = torch.tensor(raw)
    for proc in make_logits_processors(params):
        logits = proc(logits, history)
    # id0: 2/2 - 1 - 0.5*2 = -1 ; id1: -1*2 = -2 ; id2 untouched
    assert logits.tolist() == pytest.approx([-1.0, -2.0, 1.0])


def test_forced_tokens_via_accept_count_as_generated() -> None:
    raw = torch.tensor([5.0, 4.9, 0.0])
    sampler = Sampler(SamplingParams(temperature=0, presence_penalty=1.0), prompt_ids=[])
    sampler.accept(0)
    assert sampler.sample(raw).token_id == 1
    assert sampler.generated == (0, 1)


def test_no_penalty_means_no_processors() -> None:
    assert make_logits_processors(SamplingParams()) == []


# ---------------------------------------------------------------------------
# seeding
# ---------------------------------------------------------------------------


def test_same_seed_same_tokens_independent_of_other_samplers() -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=77)
    steps = random_logits(60, 50, seed=3, scale=1.0)
    a = Sampler(params, [])
    b = Sampler(params, [])
    other = Sampler(dataclasses.replace(params, seed=78), [])
    seq_a, seq_b, seq_other = [], [], []
    for logits in steps:
        seq_a.append(a.sample(logits).token_id)
        seq_other.append(other.sample(logits).token_id)
        torch.rand(10)  # global RNG use must not matter
        seq_b.append(b.sample(logits).token_id)
    assert seq_a == seq_b
    assert seq_a != seq_other


def test_sampling_does_not_touch_global_rng() -> None:
    state = torch.get_rng_state()
    sampler = Sampler(SamplingParams(temperature=1.0), [])
    for logits in random_logits(5, 20, seed=4):
        sampler.sample(logits)
    assert torch.equal(state, torch.get_rng_state())


def test_unseeded_samplers_differ() -> None:
    params = SamplingParams(temperature=1.0)
    steps = random_logits(40, 100, seed=5, scale=0.5)
    a = Sampler(params, [])
    b = Sampler(params, [])
    assert [a.sample(x).token_id for x in steps] != [b.sample(x).token_id for x in steps]


# ---------------------------------------------------------------------------
# logprobs
# ---------------------------------------------------------------------------


def test_logprob_is_raw_log_softmax() -> None:
    params = SamplingParams(
        temperature=0.5, top_k=5, repetition_penalty=1.3, presence_penalty=0.7, seed=1
    )
    sampler = Sampler(params, prompt_ids=[0, 1, 2])
    for logits in random_logits(20, 30, seed=6):
        result = sampler.sample(logits)
        assert isinstance(result, SampleResult)
        reference = py_log_softmax(logits.tolist())
        assert result.logprob == pytest.approx(reference[result.token_id], abs=1e-5)
        assert result.top_logprobs == []


def test_top_logprobs_sorted_and_correct() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, top_logprobs=5, seed=2), [])
    for logits in random_logits(10, 40, seed=7):
        result = sampler.sample(logits)
        reference = py_log_softmax(logits.tolist())
        best = sorted(range(40), key=lambda i: -reference[i])[:5]
        assert [t for t, _ in result.top_logprobs] == best
        values = [v for _, v in result.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx([reference[i] for i in best], abs=1e-5)


def test_low_precision_logits_are_handled_in_float32() -> None:
    logits = torch.tensor([1.0, 2.0, 3.0, 0.5], dtype=torch.bfloat16)
    result = Sampler(SamplingParams(temperature=0, top_logprobs=2), []).sample(logits)
    assert result.token_id == 2
    reference = py_log_softmax([1.0, 2.0, 3.0, 0.5])
    assert result.logprob == pytest.approx(reference[2], abs=1e-5)
    assert [t for t, _ in result.top_logprobs] == [2, 1]


def test_rejects_bad_logits_shape_and_prompt_ids() -> None:
    sampler = Sampler(SamplingParams(), [])
    with pytest.raises(ValueError):
        sampler.sample(torch.zeros(2, 5))
    with pytest.raises(ValueError):
        Sampler(SamplingParams(), [10]).sample(torch.zeros(5))


@pytest.mark.parametrize("name", [n for n in RANGES if n != "logit_bias"])
def test_the_server_schema_and_sampling_params_share_one_table(name: str) -> None:
    """Every edge of RANGES: the server's request schema and SamplingParams accept and refuse
    the same values (the CLI builds SamplingParams, so it follows too)."""
    import pydantic

    from mistral7b.server.schemas import ChatCompletionRequest

    limits = RANGES[name]
    edges = []
    for edge, inclusive, step in ((limits.low, limits.low_inclusive, -1),
                                  (limits.high, limits.high_inclusive, 1)):
        if edge is not None:
            edges += [(edge, inclusive), (edge + step * (1 if limits.integer else 0.5), False)]
    for value, allowed in edges:
        value = int(value) if limits.integer else value
        try:
            ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],  # type: ignore
                                  **{name: value})
            server_ok = True
        except pydantic.ValidationError:
            server_ok = False
        try:
            SamplingParams(**{name: value})
            api_ok = True
        except InvalidSamplingParam:
            api_ok = False
        assert server_ok == api_ok == allowed, (name, value)


def test_max_tokens_0_only_scores_a_prompt() -> None:
    """The one exception to RANGES: max_tokens=0 with prompt_logprobs (the API) or with echo
    on /v1/completions (the route refuses it without), which score a prompt alone."""
    from mistral7b.server.schemas import ChatCompletionRequest, CompletionRequest

    assert SamplingParams(max_tokens=0, prompt_logprobs=2).max_tokens == 0
    with pytest.raises(InvalidSamplingParam, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidSamplingParam, match="prompt_logprobs"):
        SamplingParams(max_tokens=0, prompt_logprobs=21)
    assert CompletionRequest(prompt="x", max_tokens=0, echo=True).max_tokens == 0
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],  # type: ignore
                              max_tokens=0)
