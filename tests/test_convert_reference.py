"""The converter between our checkpoints and the released MSA-4B reference layout (spec section 9)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from batches import random_packed_batch, tiny_msa
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from msa_modeling import MSAConfig
from msa_modeling.convert_reference import from_reference, main, to_reference

LAYOUT = json.loads((Path(__file__).parent / "fixtures" / "msa4b_reference_layout.json").read_text())


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})  # noqa: SIM118 (not a dict)
    return tensors


def comparable(config: MSAConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}


@pytest.fixture
def our_checkpoint(tmp_path):
    model = tiny_msa(
        0, top_k_docs=2, query_position_offset=2, routing_tokens="query", router_init="qk", routing_score="scaled_dot"
    )
    # Small shards, so that the index file is converted too.
    model.save_pretrained(tmp_path / "ours", max_shard_size="40KB")
    (tmp_path / "ours" / "tokenizer_config.json").write_text("{}")
    return model, tmp_path / "ours"


def test_reference_layout_matches_the_spec(our_checkpoint, tmp_path):
    model, ours = our_checkpoint
    main(["--to", "reference", str(ours), str(tmp_path / "ref")])
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["model_type"] == LAYOUT["model_type"] and config["architectures"] == LAYOUT["architectures"]
    # The released benchmark reads its top-k from doc_top_k, written beside top_k_docs.
    assert list(config["msa_config"]) == [*LAYOUT["msa_config"], "doc_top_k"]
    assert config["msa_config"]["doc_top_k"] == 2
    # transformers 4.x (the engine's) reads these at the top level, not transformers 5's rope_parameters/dtype.
    assert config["rope_theta"] == model.config.rope_parameters["rope_theta"] and config["rope_scaling"] is None
    assert config["torch_dtype"] == "float32" and "rope_parameters" not in config and "dtype" not in config
    for key, value in LAYOUT["msa_config"].items():
        if key not in ("router_layer_idx", "top_k_docs", "pooling_kernel_size") and value is not None:
            assert config["msa_config"][key] == value, key
    assert config["msa_config"]["router_layer_idx"] == "2,3" and config["msa_config"]["top_k_docs"] == 2
    assert config["msa_config"]["pooling_kernel_size"] == model.config.chunk_size
    assert not set(config) & {"router_layers", "top_k_docs", "chunk_size", "backbone_model_type"}
    assert config["hidden_size"] == model.config.hidden_size and config["num_hidden_layers"] == 4

    tensors = read_tensors(tmp_path / "ref")
    router_names = sorted(n for n in tensors if ".router_" in n)
    expected = sorted(t.format(i=i) for i in model.config.router_layers for t in LAYOUT["router_layer_weights"])
    assert router_names == expected
    c = model.config
    assert tensors["model.layers.2.self_attn.router_q_proj.0.weight"].shape == (
        c.num_attention_heads * c.head_dim,
        c.hidden_size,
    )
    assert tensors["model.layers.2.self_attn.router_k_proj.0.weight"].shape == (
        c.num_key_value_heads * c.head_dim,
        c.hidden_size,
    )
    for name in LAYOUT["scalar_weights"]:
        assert tensors[name].shape == () and tensors[name].item() == pytest.approx(c.aux_temperature)
    index = json.loads((tmp_path / "ref" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert (tmp_path / "ref" / "tokenizer_config.json").is_file()


def test_ours_to_reference_to_ours_is_lossless(our_checkpoint, tmp_path):
    model, ours = our_checkpoint
    main(["--to", "reference", str(ours), str(tmp_path / "ref")])
    main(["--to", "ours", str(tmp_path / "ref"), str(tmp_path / "back")])
    original, back = read_tensors(ours), read_tensors(tmp_path / "back")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[n], back[n]) and original[n].dtype == back[n].dtype for n in original)
    assert comparable(MSAConfig.from_pretrained(tmp_path / "back")) == comparable(model.config)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    batch = random_packed_batch(0)
    with torch.no_grad():
        assert torch.equal(loaded(**batch, return_logits=True).logits, model(**batch, return_logits=True).logits)


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def released_like_checkpoint(our_checkpoint, tmp_path) -> Path:
    """A reference checkpoint as released: no `msa_train` block nor `doc_top_k`, its own loss
    weights and temperature, RoPE settings and dtype at the top level as transformers 4.x writes them."""
    _, ours = our_checkpoint
    to_reference(ours, tmp_path / "released")
    config_path = tmp_path / "released" / "config.json"
    config = json.loads(config_path.read_text())
    del config["msa_train"]
    del config["msa_config"]["doc_top_k"]
    # top_k_docs as released: 16, the engine's default for the doc_top_k it does not carry.
    config["msa_config"].update(
        router_layer_idx="all", top_k_docs=16, recloss_weight=0.5, ansloss_weight=1.0, aux_loss=True
    )
    config.update(rope_theta=5000000.0, rope_scaling=YARN, torch_dtype="bfloat16")
    config_path.write_text(json.dumps(config))
    return tmp_path / "released"


def test_released_layout_reads_into_ours_and_converts_back_unchanged(our_checkpoint, tmp_path):
    released = released_like_checkpoint(our_checkpoint, tmp_path)
    from_reference(released, tmp_path / "ours2")
    config = MSAConfig.from_pretrained(tmp_path / "ours2")
    assert config.router_layers == [0, 1, 2, 3] and config.query_position_offset == config.top_k_docs == 16
    assert config.routing_tokens == "prompt" and config.aux_loss_type == "decoupled_infonce"
    # INFONCE_DECOUPLE: the engine serves it with dot product x D^-1/2, and so do we.
    assert config.routing_score == "scaled_dot"
    assert config.rope_parameters == {"rope_theta": 5000000.0, **YARN} and config.dtype == torch.bfloat16
    to_reference(tmp_path / "ours2", tmp_path / "released2")
    first = json.loads((released / "config.json").read_text())
    second = json.loads((tmp_path / "released2" / "config.json").read_text())
    assert second["msa_config"] == first["msa_config"]
    for key in ("rope_theta", "rope_scaling", "torch_dtype", "model_type", "architectures", "hidden_size"):
        assert second[key] == first[key], key
    assert "msa_train" not in second
    a, b = read_tensors(released), read_tensors(tmp_path / "released2")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)
    for file in sorted(released.glob("*.safetensors")):
        assert file.read_bytes() == (tmp_path / "released2" / file.name).read_bytes(), file.name


def test_a_released_top_k_other_than_the_engine_default_gets_doc_top_k(our_checkpoint, tmp_path):
    released = released_like_checkpoint(our_checkpoint, tmp_path)
    from_reference(released, tmp_path / "ours2")
    config = json.loads((tmp_path / "ours2" / "config.json").read_text())
    config.update(top_k_docs=8, query_position_offset=8)
    (tmp_path / "ours2" / "config.json").write_text(json.dumps(config))
    to_reference(tmp_path / "ours2", tmp_path / "released2")
    written = json.loads((tmp_path / "released2" / "config.json").read_text())["msa_config"]
    assert written["top_k_docs"] == written["doc_top_k"] == 8


def test_a_cosine_model_is_written_with_the_method_the_engine_normalises_for(tmp_path):
    """The engine scores by cosine only for aux_loss_method "INFONCE"; our aux loss type travels apart."""
    model = tiny_msa(0, top_k_docs=2, query_position_offset=2)
    assert model.config.routing_score == "cosine" and model.config.aux_loss_type == "decoupled_infonce"
    model.save_pretrained(tmp_path / "ours")
    to_reference(tmp_path / "ours", tmp_path / "ref")
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["msa_config"]["aux_loss_method"] == "INFONCE"
    from_reference(tmp_path / "ref", tmp_path / "back")
    back = MSAConfig.from_pretrained(tmp_path / "back")
    assert back.routing_score == "cosine" and back.aux_loss_type == "decoupled_infonce"


def test_the_tokenizer_config_is_one_transformers_4_loads(our_checkpoint, tmp_path):
    _, ours = our_checkpoint
    (ours / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "TokenizersBackend",
                "extra_special_tokens": ["<End-of-Retrieve>"],
                "additional_special_tokens": ["<|object_ref_end|>"],
                "model_max_length": 128,
            }
        )
    )
    to_reference(ours, tmp_path / "ref")
    written = json.loads((tmp_path / "ref" / "tokenizer_config.json").read_text())
    assert written == {
        "tokenizer_class": "Qwen2TokenizerFast",
        "model_max_length": 128,
        "additional_special_tokens": ["<|object_ref_end|>", "<End-of-Retrieve>"],
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"decouple_router": False}, "decouple_router"),
        ({"head_reduce_method": "max"}, "head_reduce_method"),
        ({"aux_loss_method": "BCE"}, "aux_loss_method"),
        ({"extra_key": 1}, "unexpected"),
        ({"rewrite_position": False}, "rewrite_position"),
        ({"doc_top_k": 3}, "doc_top_k"),
    ],
)
def test_reference_settings_we_cannot_honour_are_rejected(our_checkpoint, tmp_path, change, message):
    released = released_like_checkpoint(our_checkpoint, tmp_path)
    config = json.loads((released / "config.json").read_text())
    config["msa_config"].update(change)
    (released / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        from_reference(released, tmp_path / "out")


def test_checkpoints_the_reference_cannot_express_are_rejected(tmp_path):
    tiny_msa(0, query_position_offset=0).save_pretrained(tmp_path / "offset")
    with pytest.raises(ValueError, match="query_position_offset"):
        to_reference(tmp_path / "offset", tmp_path / "out")
    tiny_msa(0, family="llama", query_position_offset=2).save_pretrained(tmp_path / "llama")
    with pytest.raises(ValueError, match="Qwen3 only"):
        to_reference(tmp_path / "llama", tmp_path / "out")
    tiny_msa(0, query_position_offset=2, document_positions=False).save_pretrained(tmp_path / "global")
    with pytest.raises(ValueError, match="document_positions=False"):
        to_reference(tmp_path / "global", tmp_path / "out")
    assert not (tmp_path / "out").exists()
