"""The reference implementation itself: plain transformers when off, the paper's mass, real restriction."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from slkv_sglang.config import SlkvConfig
from slkv_sglang.tools.corpus import prompt_ids
from slkv_sglang.tools.reference import _mass
from slkv_sglang.scoring import head_mass, window_masses

QUESTION = "Which classes and functions are defined in the code above? Answer briefly."


@pytest.fixture(scope="module")
def prompt(tokenizer) -> list[int]:
    return prompt_ids(tokenizer, 1100, seed=0, question=QUESTION)


@pytest.fixture(scope="module")
def plain(model_path):
    """The bundled model in plain transformers (its own attention), for expectations the reference does not make."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()


def test_off_is_plain_transformers(reference, prompt, plain):
    expected = plain.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):].tolist()
    got = reference.generate(prompt, SlkvConfig(enabled=False), max_new_tokens=10, ignore_eos=True)
    assert got.layer_map is None
    assert got.output_ids == expected


@pytest.mark.parametrize("chunk", [4096, 100, 7])
def test_explicit_mass_equals_engine_formula(chunk):
    """The reference's materialised softmax and the engine's chunked log-sum-exp give the same mass, also when
    chunk edges cut the sink, the recent window and the causal diagonal; keys are read through shuffled slots."""
    torch.manual_seed(0)
    seq, n = 1500, 32
    q, k = torch.randn(1, 9, seq, 64), torch.randn(1, 3, seq, 64)
    explicit = _mass(q, k, n, sink=4, recent=256, scaling=0.125)
    slots = torch.randperm(seq + 10)[:seq]
    k_cache = torch.zeros(seq + 10, 3, 64)
    k_cache[slots] = k[0].transpose(0, 1)
    lse = head_mass(q[0, :, -n:].transpose(0, 1), k_cache, slots, 4, 256, 0.125, chunk=chunk)
    assert torch.allclose(explicit, lse, atol=1e-6)


@pytest.mark.parametrize("chunk", [4096, 100])
def test_mass_from_the_attention_kernels_lse(chunk):
    """With the all-keys log-sum-exp the CPU flash-attention kernel returns with its output (what the torch_native
    backend passes), only sink + recent keys are read, and the mass still equals the materialised softmax's."""
    torch.manual_seed(1)
    seq, n = 1500, 32
    q, k, v = torch.randn(1, 9, seq, 64), torch.randn(1, 3, seq, 64), torch.randn(1, 3, seq, 64)
    explicit = _mass(q, k, n, sink=4, recent=256, scaling=0.125)
    _, kernel_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=0.125)
    slots = torch.randperm(seq + 10)[:seq]
    k_cache = torch.zeros(seq + 10, 3, 64)
    k_cache[slots] = k[0].transpose(0, 1)
    got = head_mass(q[0, :, -n:].transpose(0, 1), k_cache, slots, 4, 256, 0.125, chunk=chunk,
                    lse_all=kernel_lse[0, :, -n:])
    assert torch.allclose(explicit, got, atol=1e-5)


def test_batched_window_masses_equal_each_requests_mass():
    """Requests of different lengths and query counts (a prompt shorter than sink + recent among them), scored
    at once from their kernels' log-sum-exps (what a prefill gives every backend), equal the materialised
    softmax's mass of each alone."""
    torch.manual_seed(2)
    cases = [(1500, 32), (300, 5), (200, 32), (2000, 17)]  # (tokens, last queries)
    pool = torch.zeros(4100, 3, 64)
    free = torch.randperm(4100)
    queries, slots, lses, expected, at = [], [], [], [], 0
    for seq, n in cases:
        q, k, v = torch.randn(1, 9, seq, 64), torch.randn(1, 3, seq, 64), torch.randn(1, 3, seq, 64)
        expected.append(_mass(q, k, n, sink=4, recent=256, scaling=0.125))
        _, kernel_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=0.125)
        slots.append(free[at : at + seq])
        pool[slots[-1]] = k[0].transpose(0, 1)
        queries.append(q[0, :, -n:].transpose(0, 1))
        lses.append(kernel_lse[0, :, -n:])
        at += seq
    got = window_masses(queries, pool, slots, lses, sink=4, recent=256, scaling=0.125)
    assert got.shape == (4, 9)
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


@torch.no_grad()
def test_lazy_decode_is_masked_attention(reference, prompt, plain):
    """Every layer lazy: each decode step reads exactly sink + recent keys. Plain transformers decoding with an
    attention mask that hides every other key (the window sliding with each new token) gives the same tokens."""
    sink, recent, steps = 4, 64, 12
    config = SlkvConfig(enabled=True, sink=sink, recent=recent, last=8)
    lazy = reference.generate(prompt, config, max_new_tokens=steps, ignore_eos=True, force_lazy=range(30))
    assert all(lazy.layer_map.lazy)

    def choose(out) -> None:
        logprobs = torch.log_softmax(out.logits[0, -1], dim=-1)
        tokens.append(int(logprobs.argmax()))
        chosen.append(float(logprobs[tokens[-1]]))

    tokens: list[int] = []
    chosen: list[float] = []
    out = plain(input_ids=torch.tensor([prompt]), use_cache=True)  # prefill: full attention
    choose(out)
    while len(tokens) < steps:
        seen = len(prompt) + len(tokens)  # keys once this step's token is cached
        mask = torch.zeros(1, seen, dtype=torch.long)
        mask[0, :sink] = mask[0, seen - recent:] = 1
        out = plain(input_ids=torch.tensor([[tokens[-1]]]), attention_mask=mask, past_key_values=out.past_key_values,
                    use_cache=True)
        choose(out)
    assert lazy.output_ids == tokens
    # log-probabilities too: a window one token off changes them by far more (tokens alone would not show it)
    assert lazy.logprobs == pytest.approx(chosen, abs=1e-4)


def test_small_window_changes_output(reference, prompt):
    full = reference.generate(prompt, SlkvConfig(enabled=False), max_new_tokens=12, ignore_eos=True)
    narrow = SlkvConfig(enabled=True, recent=32, last=8)
    forced = reference.generate(prompt, narrow, max_new_tokens=12, ignore_eos=True, force_lazy=range(30))
    assert all(forced.layer_map.lazy)
    assert forced.output_ids != full.output_ids


def test_short_prompts_are_never_trimmed(reference, tokenizer):
    short = prompt_ids(tokenizer, 200, seed=1, question=QUESTION)
    lm = reference.lazy_scores(short, SlkvConfig(enabled=True, threshold=0.1))
    assert max(lm.scores) > 0.1 and not any(lm.lazy)
    # the same prompt is long enough for a smaller window, and then layers are trimmed
    assert any(reference.lazy_scores(short, replace(SlkvConfig(), threshold=0.1, recent=100, last=8)).lazy)
