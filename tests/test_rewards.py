"""GRPO rewards: the CodeScaler reward against torch ``transformers`` scoring of the same RM,
validity-preserving shaping under adversarial RM scores, the execution reward in the sandbox,
the mix, and the registry."""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from codescaler_jax.data.problems import humaneval_problems
from codescaler_jax.data.tokenizer import qwen3_tokenizer_dir
from codescaler_jax.models.hf_io import save_hf_model
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3RewardModel
from codescaler_jax.models.sharding import make_mesh
from codescaler_jax.rl.config import RewardSection
from codescaler_jax.rl.rewards import (
    REWARDS,
    CodeScalerReward,
    RolloutBatch,
    build_reward,
    close_reward,
)


@functools.cache
def _problems():
    return humaneval_problems()[:2]


def _fence(code, tag="python"):
    return f"```{tag}\n{code}\n```"


def _responses():
    """(problem index, response) pairs: what the training extractor accepts and rejects."""
    p0, p1 = _problems()
    good0 = p0.solution
    wrong0 = p0.stub + "    return None\n"
    return [
        (0, "Here is my solution.\n" + _fence(good0) + "\nDone."),   # valid, passes
        (0, _fence(wrong0)),                                          # valid, fails the tests
        (1, _fence(p1.solution, tag="")),                             # valid (no tag), passes
        (1, "no code at all"),                                        # no block
        (0, _fence("x = 1") + "\n" + _fence(good0)),                  # two blocks
        (1, _fence("def f(:\n    pass")),                             # syntax error
        (0, "```python\ndef g():\n    return 1\n"),                   # unclosed fence
    ]


VALID = np.array([True, True, True, False, False, False, False])
PASSES = np.array([True, False, True, False, False, False, False])


def _batch():
    resp = _responses()
    return RolloutBatch([_problems()[i] for i, _ in resp], [r for _, r in resp],
                        [[1, 2]] * len(resp))


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    # Larger-than-default init so that scores spread over a few units, both signs.
    cfg = Qwen3Config.tiny(vocab_size=151936, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           pad_token_id=151643, eos_token_id=151645)
    model = Qwen3RewardModel(cfg, rngs=nnx.Rngs(1))
    model.score.kernel[...] = model.score.kernel[...] * 100.0
    path = tmp_path_factory.mktemp("rm")
    save_hf_model(model, path, tokenizer_dir=qwen3_tokenizer_dir())
    return path


def _mesh():
    return make_mesh(devices=jax.devices()[:1])


def _torch_scores(path, problems, codes):
    """The reference: transformers' sequence classifier on the RM tokenizer's chat template."""
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, dtype=torch.float32).eval()
    out = []
    for prob, code in zip(problems, codes):
        chat = [{"role": "user", "content": prob.prompt}, {"role": "assistant", "content": code}]
        ids = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)
        ids = tok(ids, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out.append(float(model(input_ids=ids).logits[0, 0]))
    return np.array(out)


def test_codescaler_reward_is_softplus_of_the_rm_score_for_valid_code(rm_dir):
    section = RewardSection(rm_path=str(rm_dir), rm_max_length=512, rm_batch_size=4,
                            pass_rate=True, sandbox_workers=2)
    fn = build_reward(section, _mesh())
    try:
        res = fn(_batch())
    finally:
        close_reward(fn)
    np.testing.assert_array_equal(res.valid, VALID)
    batch = _batch()
    ref = _torch_scores(rm_dir, [batch.problems[i] for i in np.flatnonzero(VALID)],
                        [res.extractions[i].code for i in np.flatnonzero(VALID)])
    assert np.ptp(ref) > 0.5  # the RM really tells the three answers apart
    np.testing.assert_allclose(res.scores[VALID], ref, atol=1e-4)
    np.testing.assert_allclose(res.rewards[VALID], np.log1p(np.exp(ref)), rtol=1e-5)
    assert np.all(res.rewards[~VALID] == 0)
    assert np.all(np.isnan(res.scores[~VALID]))  # invalid answers never reach the RM
    # The extracted code, not the response, is what the RM scored.
    assert res.extractions[0].code == _problems()[0].solution.strip()
    np.testing.assert_array_equal(res.passed, PASSES)
    assert res.metrics["valid_code_fraction"] == pytest.approx(3 / 7)
    assert res.metrics["extract/multiple_blocks"] == pytest.approx(1 / 7)


class _AdversarialRM:
    """Any scores at all: the RM is not trusted to rank invalid answers low."""

    def __init__(self, valid_scores, empty_score):
        self.mesh = _mesh()
        self.valid_scores = valid_scores
        self.empty_score = empty_score

    def score(self, problems, codes):
        it = iter(self.valid_scores)
        return np.array([self.empty_score if not c else next(it) for c in codes], np.float32)


@pytest.mark.parametrize("shaping", ["softplus", "sigmoid"])
@pytest.mark.parametrize(
    "valid_scores",
    [[-1e30, -200.0, float("nan")], [float("-inf"), -1e4, -104.0], [3.0, -0.03, 6.54]],
)
def test_invalid_code_always_gets_less_than_valid_code(shaping, valid_scores):
    fn = CodeScalerReward(_AdversarialRM(valid_scores, empty_score=1e6), shaping=shaping)
    res = fn(_batch())
    assert res.rewards[VALID].min() > res.rewards[~VALID].max()
    assert np.all(np.isfinite(res.rewards))


def test_without_the_guard_an_empty_answer_can_outrank_valid_code():
    """The property above is not automatic: raw scores with no guard break it."""
    fn = CodeScalerReward(_AdversarialRM([-1.0, -2.0, -3.0], empty_score=0.5),
                          shaping="raw_unguarded")
    res = fn(_batch())
    assert res.rewards[~VALID].max() > res.rewards[VALID].max()


def test_execution_and_mix_rewards(rm_dir):
    mesh = _mesh()
    section = RewardSection(name="execution", sandbox_workers=2)
    ex = build_reward(section, mesh)
    cs = build_reward(RewardSection(rm_path=str(rm_dir), rm_max_length=512, rm_batch_size=4,
                                    pass_rate=False), mesh)
    mix = build_reward(RewardSection(name="mix", rm_path=str(rm_dir), rm_max_length=512,
                                     rm_batch_size=4, sandbox_workers=2, pass_rate=False,
                                     kwargs={"weights": {"codescaler": 1.0, "execution": 2.0}}),
                       mesh)
    try:
        r_ex, r_cs, r_mix = ex(_batch()), cs(_batch()), mix(_batch())
    finally:
        for fn in (ex, cs, mix):
            close_reward(fn)
    np.testing.assert_array_equal(r_ex.rewards, PASSES.astype(np.float32))
    np.testing.assert_array_equal(r_ex.passed, PASSES)
    np.testing.assert_allclose(r_mix.rewards, r_cs.rewards + 2.0 * r_ex.rewards, rtol=1e-6)
    assert r_mix.metrics["execution/reward_mean"] == pytest.approx(2 / 7)


def test_registry_names_the_allowed_rewards():
    assert {"codescaler", "execution", "mix", "token_fraction"} <= set(REWARDS.names())
    with pytest.raises(ValueError, match="allowed"):
        RewardSection(name="nope")
    with pytest.raises(ValueError, match="weights"):
        build_reward(RewardSection(name="mix"), _mesh())

