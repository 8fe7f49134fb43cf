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
            tensors.update({name: handle.get_tensor(name) for name in handle.keys()})
    return tensors


def comparable(config: MSAConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}


@pytest.fixture
def our_checkpoint(tmp_path):
    model = tiny_msa(0, top_k_docs=2, query_position_offset=2, routing_tokens="query", router_init="qk")
    # Small shards, so that the index file is converted too.
    model.save_pretrained(tmp_path / "ours", max_shard_size="40KB")
    (tmp_path / "ours" / "tokenizer_config.json").write_text("{}")
    return model, tmp_path / "ours"


def test_reference_layout_matches_the_spec(our_checkpoint, tmp_path):
    model, ours = our_checkpoint
    main(["--to", "reference", str(ours), str(tmp_path / "ref")])
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert config["model_type"] == LAYOUT["model_type"] and config["architectures"] == LAYOUT["architectures"]
    assert list(config["msa_config"]) == list(LAYOUT["msa_config"])
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
    assert tensors["model.layers.2.self_attn.router_q_proj.0.weight"].shape == (c.num_attention_heads * c.head_dim, c.hidden_size)
    assert tensors["model.layers.2.self_attn.router_k_proj.0.weight"].shape == (c.num_key_value_heads * c.head_dim, c.hidden_size)
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


def released_like_checkpoint(our_checkpoint, tmp_path) -> Path:
    """A reference checkpoint as released: no `msa_train` block, its own loss weights and temperature."""
    _, ours = our_checkpoint
    to_reference(ours, tmp_path / "released")
    config_path = tmp_path / "released" / "config.json"
    config = json.loads(config_path.read_text())
    del config["msa_train"]
    config["msa_config"].update(router_layer_idx="all", recloss_weight=0.5, ansloss_weight=1.0, aux_loss=True)
    config_path.write_text(json.dumps(config))
    return tmp_path / "released"


def test_released_layout_reads_into_ours_and_converts_back_unchanged(our_checkpoint, tmp_path):
    released = released_like_checkpoint(our_checkpoint, tmp_path)
    from_reference(released, tmp_path / "ours2")
    config = MSAConfig.from_pretrained(tmp_path / "ours2")
    assert config.router_layers == [0, 1, 2, 3] and config.query_position_offset == config.top_k_docs == 2
    assert config.routing_tokens == "prompt" and config.aux_loss_type == "decoupled_infonce"
    to_reference(tmp_path / "ours2", tmp_path / "released2")
    first = json.loads((released / "config.json").read_text())
    second = json.loads((tmp_path / "released2" / "config.json").read_text())
    assert second["msa_config"] == first["msa_config"]
    a, b = read_tensors(released), read_tensors(tmp_path / "released2")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"decouple_router": False}, "decouple_router"),
        ({"head_reduce_method": "max"}, "head_reduce_method"),
        ({"aux_loss_method": "BCE"}, "aux_loss_method"),
        ({"extra_key": 1}, "unexpected"),
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
