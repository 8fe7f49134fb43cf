"""Convert MSA checkpoints between our layout and the released MSA-4B reference layout.

The reference layout (spec section 9): `config.json` with `model_type: "msa"`, architecture
`MSAForCausalLM`, the Qwen3 fields at the top level and an `msa_config` object with exactly
`REFERENCE_MSA_KEYS`; weights are Qwen3's names plus, in router layers,
`model.layers.{i}.self_attn.router_q_proj.0.weight` / `router_k_proj.0.weight` and a scalar
`temperature`. Ours differs only in the config (MSA fields at the top level) and in the router
weight names (`router_q_proj.weight`); every tensor is copied bit for bit.

    python -m msa_modeling.convert_reference --to reference OUR_CHECKPOINT REFERENCE_DIR
    python -m msa_modeling.convert_reference --to ours REFERENCE_CHECKPOINT OUR_DIR

The converter makes both engines compute the same function. The released engine scores
routes by cosine only when `aux_loss_method` is exactly "INFONCE"; for "INFONCE_DECOUPLE" (the
released MSA-4B) it scores by dot product x D^-1/2. So reading maps "INFONCE_DECOUPLE" to
`routing_score="scaled_dot"` and "INFONCE" to `"cosine"`, and writing picks the method from
`routing_score` (our `aux_loss_type` then travels in the `msa_train` block). The engine runs on
transformers 4.x, which reads `rope_theta`, `rope_scaling` and `torch_dtype` at the top level
(transformers 5 keeps them in `rope_parameters` and `dtype`); its benchmark reads the top-k from
`msa_config.doc_top_k` (default 16), written beside `top_k_docs`; and its tokenizer config must
name a class transformers 4.x knows.

Round trips are lossless: our settings without a reference counterpart (routing tokens,
router init, backend, ...) travel in a top-level `msa_train` object of the reference
`config.json`, and reference values without a counterpart here (`recloss_weight`,
`ansloss_weight`, `temperature`) travel in our config's `reference_msa_config`.

What cannot be expressed is rejected with `ValueError`: backbones other than Qwen3 (the
reference engine runs Qwen3 only), a query position offset other than top_k (the reference
starts the question at position 3 + k, after its 3-token prefix), global positions
(`document_positions=False`: the engine always restarts positions per document), and reference settings this code does not
implement (`decouple_router: false`, other head/query/chunk reductions or pooling modes,
unknown aux losses, router weights other than one bias-free linear map).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .configuration_msa import MSA_KEYS, MSAConfig

REFERENCE_MSA_KEYS = (
    "router_layer_idx",
    "top_k_docs",
    "pooling_kernel_size",
    "decouple_router",
    "rewrite_position",
    "aux_loss_method",
    "infonce_loss_temp",
    "head_reduce_method",
    "query_reduce_method",
    "chunk_reduce_method",
    "aux_loss",
    "lmloss_weigth",  # sic, as released
    "auxloss_weight",
    "recloss_weight",
    "ansloss_weight",
    "decouple_pooling_mode",
)
# The reduction choices of spec section 3 (mean over heads, max over routing tokens, max over
# chunks, mean pooling); the reference makes them settings, ours hard-codes them.
FIXED_REFERENCE_VALUES = {
    "decouple_router": True,
    "head_reduce_method": "mean",
    "query_reduce_method": "max",
    "chunk_reduce_method": "max",
    "decouple_pooling_mode": "mean",
}
# The engine's inference normalises routing vectors only for "INFONCE" (cosine); for
# "INFONCE_DECOUPLE" it scores <q, k> / sqrt(D). Its training loss follows the name too.
METHOD_OF_ROUTING_SCORE = {"cosine": "INFONCE", "scaled_dot": "INFONCE_DECOUPLE"}
AUX_LOSS_OF_METHOD = {"INFONCE": "infonce", "INFONCE_DECOUPLE": "decoupled_infonce"}
# Read by the released benchmark for the top-k (default 16); optional in a released config.
DOC_TOP_K = "doc_top_k"
ENGINE_DEFAULT_DOC_TOP_K = 16
# What transformers 4.x (the engine pins 4.51) reads at the top level of config.json.
TRANSFORMERS4_KEYS = ("rope_theta", "rope_scaling", "torch_dtype")
# transformers 5 writes this class name; transformers 4.x cannot load it. Qwen3 ships Qwen2's tokenizer.
TRANSFORMERS4_TOKENIZER_CLASS = "Qwen2TokenizerFast"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPERATURE_WEIGHT = "temperature"
TRAINING_BLOCK = "msa_train"
# Our settings with no reference counterpart; they only shape training or the kernel choice.
TRAINING_ONLY_KEYS = (
    "routing_tokens",
    "detach_router_input",
    "router_init",
    "lm_loss_chunk_size",
    "attn_backend",
    "aux_loss_type",
)
INDEX_FILE = "model.safetensors.index.json"

_OUR_ROUTER = re.compile(r"^(model\.layers\.\d+\.self_attn\.router_[qk]_proj)\.weight$")
_REFERENCE_ROUTER = re.compile(r"^(model\.layers\.\d+\.self_attn\.router_[qk]_proj)\.0\.weight$")


# ---------------------------------------------------------------- config


def reference_config(ours: dict[str, Any]) -> dict[str, Any]:
    """The reference `config.json` for our complete config dict (`MSAConfig.to_dict()`)."""
    if ours.get("backbone_model_type") != "qwen3":
        raise ValueError(
            f"the reference layout is Qwen3's (the released engine runs Qwen3 only); this checkpoint's "
            f"backbone is {ours.get('backbone_model_type')!r}"
        )
    if ours["query_position_offset"] != ours["top_k_docs"]:
        raise ValueError(
            f"query_position_offset={ours['query_position_offset']} cannot be expressed in the reference layout, "
            f"which starts the question at prefix + top_k_docs ({ours['top_k_docs']}); set "
            f"query_position_offset={ours['top_k_docs']} and retrain, or keep this model in our engine"
        )
    if not ours["document_positions"]:
        raise ValueError(
            "document_positions=False (global positions) cannot run in the released engine, which always "
            "restarts positions at 0 in every document (rewrite_position); keep this model in our engine"
        )
    num_layers = ours["num_hidden_layers"]
    router_layers = list(ours["router_layers"])
    stored = dict(ours.get("reference_msa_config") or {})
    msa_config = {key: stored[key] for key in (*REFERENCE_MSA_KEYS, DOC_TOP_K) if key in stored}
    msa_config.update(FIXED_REFERENCE_VALUES)
    msa_config.update(
        router_layer_idx="all" if router_layers == list(range(num_layers)) else ",".join(map(str, router_layers)),
        top_k_docs=ours["top_k_docs"],
        pooling_kernel_size=ours["chunk_size"],
        rewrite_position=True,
        aux_loss_method=METHOD_OF_ROUTING_SCORE[ours["routing_score"]],
        infonce_loss_temp=ours["aux_temperature"],
        aux_loss=ours["aux_loss_weight"] > 0,
        lmloss_weigth=ours["lm_loss_weight"],
        auxloss_weight=ours["aux_loss_weight"],
    )
    # Losses this code does not have: off, unless the checkpoint came from the reference.
    msa_config.setdefault("recloss_weight", 0.0)
    msa_config.setdefault("ansloss_weight", 0.0)
    # The benchmark's top-k. A released config without it keeps its key set when the
    # engine's default already equals ours (so that its round trip is exact).
    if DOC_TOP_K in stored or not stored or ours["top_k_docs"] != ENGINE_DEFAULT_DOC_TOP_K:
        msa_config[DOC_TOP_K] = ours["top_k_docs"]
    config = {k: v for k, v in ours.items() if k not in MSA_KEYS}
    config.update(transformers4_fields(config))
    config.update(
        model_type="msa",
        architectures=["MSAForCausalLM"],
        msa_config={key: msa_config[key] for key in (*REFERENCE_MSA_KEYS, DOC_TOP_K) if key in msa_config},
    )
    if not stored:
        # Converted from the released model, it goes back as it came; ours carries what it needs.
        config[TRAINING_BLOCK] = {key: ours[key] for key in TRAINING_ONLY_KEYS}
    return config


def transformers4_fields(config: dict[str, Any]) -> dict[str, Any]:
    """`rope_theta`, `rope_scaling`, `torch_dtype` from transformers 5's `rope_parameters` and `dtype`.

    Removes the transformers 5 keys from `config` (they would be read by no one there).
    """
    rope = dict(config.pop("rope_parameters", None) or {})
    dtype = config.pop("dtype", None)
    if "rope_theta" not in rope:
        raise ValueError("the checkpoint's config has no rope_parameters.rope_theta; the released engine needs it")
    theta = rope.pop("rope_theta")
    scaling = None if rope.get("rope_type", "default") == "default" else rope
    return {"rope_theta": theta, "rope_scaling": scaling, "torch_dtype": dtype}


def transformers5_fields(config: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `transformers4_fields`: `rope_parameters` and `dtype`, popping the 4.x keys."""
    missing = [key for key in ("rope_theta",) if key not in config]
    if missing:
        raise ValueError(f"the reference config.json has no top-level {missing[0]!r}")
    rope = {"rope_theta": config.pop("rope_theta")}
    scaling = config.pop("rope_scaling", None)
    if scaling:
        rope.update(scaling)
    else:
        rope["rope_type"] = "default"
    fields = {"rope_parameters": rope}
    dtype = config.pop("torch_dtype", None)
    if dtype is not None:
        fields["dtype"] = dtype
    return fields


def our_config(reference: dict[str, Any]) -> dict[str, Any]:
    """Our config fields (for `MSAConfig(**fields)`) for a reference `config.json` dict."""
    msa_config = reference.get("msa_config")
    if not isinstance(msa_config, dict):
        raise ValueError("not a reference MSA config: it has no 'msa_config' object")
    missing = [k for k in REFERENCE_MSA_KEYS if k not in msa_config]
    extra = sorted(set(msa_config) - {*REFERENCE_MSA_KEYS, DOC_TOP_K})
    if missing or extra:
        raise ValueError(f"msa_config keys differ from the reference layout: missing {missing}, unexpected {extra}")
    for key, expected in FIXED_REFERENCE_VALUES.items():
        if msa_config[key] != expected:
            raise ValueError(
                f"msa_config.{key}={msa_config[key]!r} is not implemented here (only {expected!r}, spec section 3)"
            )
    method = msa_config["aux_loss_method"]
    if method not in AUX_LOSS_OF_METHOD:
        raise ValueError(
            f"msa_config.aux_loss_method={method!r} is not implemented here; known: {sorted(AUX_LOSS_OF_METHOD)}"
        )
    if not msa_config["rewrite_position"]:
        raise ValueError(
            "msa_config.rewrite_position=false: the released engine restarts positions in every document "
            "regardless, so the model was not served as configured; set it to true to convert"
        )
    top_k = msa_config["top_k_docs"]
    if msa_config.get(DOC_TOP_K, top_k) != top_k:
        raise ValueError(
            f"msa_config.doc_top_k={msa_config[DOC_TOP_K]} differs from top_k_docs={top_k}; the engine "
            "routes with doc_top_k and positions the question with it: make them equal"
        )
    fields = {k: v for k, v in reference.items() if k not in ("msa_config", TRAINING_BLOCK, "model_type")}
    fields.update(transformers5_fields(fields))
    num_layers = fields["num_hidden_layers"]
    layers = msa_config["router_layer_idx"]
    if layers == "all":
        router_layers = list(range(num_layers))
    elif isinstance(layers, str):
        router_layers = [int(i) for i in layers.split(",") if i.strip()]
    else:
        router_layers = [int(i) for i in layers]
    fields.update(
        backbone_model_type="qwen3",
        router_layers=router_layers,
        top_k_docs=msa_config["top_k_docs"],
        query_position_offset=msa_config["top_k_docs"],
        chunk_size=msa_config["pooling_kernel_size"],
        document_positions=True,
        routing_score="cosine" if method == "INFONCE" else "scaled_dot",
        aux_loss_type=AUX_LOSS_OF_METHOD[method],
        aux_temperature=msa_config["infonce_loss_temp"],
        lm_loss_weight=msa_config["lmloss_weigth"],
        aux_loss_weight=msa_config["auxloss_weight"] if msa_config["aux_loss"] else 0.0,
    )
    fields.update(reference.get(TRAINING_BLOCK) or {})
    if TRAINING_BLOCK not in reference:
        # Converted from the released model rather than from us: keep what has no counterpart here.
        fields["reference_msa_config"] = dict(msa_config)
    return fields


# ---------------------------------------------------------------- weights


def reference_weight_name(name: str) -> str:
    return _OUR_ROUTER.sub(r"\1.0.weight", name)


def our_weight_name(name: str) -> str:
    renamed = _REFERENCE_ROUTER.sub(r"\1.weight", name)
    if renamed == name and ".router_" in name:
        raise ValueError(
            f"reference weight {name!r} is not supported: our router projections are one bias-free linear map "
            "(router_q_proj.0.weight / router_k_proj.0.weight)"
        )
    return renamed


def _weight_files(src: Path) -> tuple[list[str], dict[str, Any] | None]:
    index_path = src / INDEX_FILE
    if index_path.is_file():
        index = json.loads(index_path.read_text())
        return sorted(set(index["weight_map"].values())), index
    if (src / "model.safetensors").is_file():
        return ["model.safetensors"], None
    raise ValueError(f"{src} holds no safetensors weights (model.safetensors or {INDEX_FILE})")


def _convert_weights(src: Path, dst: Path, rename, temperature: float | None) -> float | None:
    """Rename every tensor of `src` into `dst`; add the scalar `temperature` when given, and
    return the one found in `src` (removed from the output) otherwise."""
    files, index = _weight_files(src)
    found_temperature = None
    weight_map = {}
    for position, file in enumerate(files):
        tensors = load_file(str(src / file))
        if TEMPERATURE_WEIGHT in tensors:
            found_temperature = float(tensors.pop(TEMPERATURE_WEIGHT))
        renamed = {rename(name): tensor for name, tensor in tensors.items()}
        if temperature is not None and position == len(files) - 1:
            renamed[TEMPERATURE_WEIGHT] = torch.tensor(temperature, dtype=torch.float32)
        save_file(renamed, str(dst / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in renamed})
    if index is not None:
        index = dict(index, weight_map=dict(sorted(weight_map.items())))
        (dst / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return found_temperature


def _copy_other_files(src: Path, dst: Path, weight_files: list[str]) -> None:
    """Tokenizer, generation config and the like travel unchanged."""
    skip = {"config.json", INDEX_FILE, *weight_files}
    for path in src.iterdir():
        if path.is_file() and path.name not in skip:
            shutil.copy2(path, dst / path.name)


def transformers4_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer config transformers 4.x loads: a class name it knows, and special tokens
    listed where it reads them (transformers 5 writes a list `extra_special_tokens`; 4.x
    expects a dict there and reads the list from `additional_special_tokens`)."""
    config = dict(config)
    if config.get("tokenizer_class") in (None, "TokenizersBackend", "Qwen2Tokenizer"):
        config["tokenizer_class"] = TRANSFORMERS4_TOKENIZER_CLASS
    extra = config.get("extra_special_tokens")
    if isinstance(extra, list):
        del config["extra_special_tokens"]
        config["additional_special_tokens"] = list(
            dict.fromkeys([*config.get("additional_special_tokens", []), *extra])
        )
    return config


def _rewrite_tokenizer_config(dst: Path) -> None:
    path = dst / TOKENIZER_CONFIG
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        path.write_text(json.dumps(transformers4_tokenizer_config(config), indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- checkpoints


def to_reference(src: str | Path, dst: str | Path) -> None:
    """Write our checkpoint `src` in the reference layout at `dst`."""
    src, dst = Path(src), Path(dst)
    ours = MSAConfig.from_pretrained(src).to_dict()
    config = reference_config(ours)
    dst.mkdir(parents=True, exist_ok=True)
    stored = ours.get("reference_msa_config") or {}
    temperature = stored.get(TEMPERATURE_WEIGHT, ours["aux_temperature"])
    _convert_weights(src, dst, reference_weight_name, temperature)
    config.pop("_name_or_path", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _copy_other_files(src, dst, _weight_files(src)[0])
    _rewrite_tokenizer_config(dst)


def from_reference(src: str | Path, dst: str | Path) -> None:
    """Write the reference-layout checkpoint `src` in our layout at `dst`."""
    src, dst = Path(src), Path(dst)
    reference = json.loads((src / "config.json").read_text())
    fields = our_config(reference)
    dst.mkdir(parents=True, exist_ok=True)
    temperature = _convert_weights(src, dst, our_weight_name, None)
    if "reference_msa_config" in fields and temperature is not None:
        fields["reference_msa_config"][TEMPERATURE_WEIGHT] = temperature
    MSAConfig(**fields).save_pretrained(dst)  # validates every field on the way
    _copy_other_files(src, dst, _weight_files(src)[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m msa_modeling.convert_reference",
        description="Convert an MSA checkpoint between our layout and the released MSA-4B reference layout.",
    )
    parser.add_argument("--to", required=True, choices=("reference", "ours"), help="layout to write")
    parser.add_argument("src", type=Path, help="checkpoint folder to read")
    parser.add_argument("dst", type=Path, help="folder to write (created)")
    args = parser.parse_args(argv)
    if args.src.resolve() == args.dst.resolve():
        parser.error("SRC and DST must differ")
    (to_reference if args.to == "reference" else from_reference)(args.src, args.dst)


if __name__ == "__main__":
    main()
