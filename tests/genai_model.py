"""A tiny generative model for ONNX Runtime GenAI, built with onnx.helper (nothing is downloaded).

The decoder's logits are a Gather of a fixed matrix, so greedy decoding emits the byte after the
previous one ("hello a" -> "bcdefg..."); its KV cache is a Concat per layer; its tokenizer is a
byte-level BPE without merges (token id = byte value; 256..259 are <s>, </s>, <pad>, <unk>).
``burn`` adds input-dependent MatMuls of [burn, 1024] x [1024, 1024] per step, whose result is
multiplied by 0: same tokens, slower steps (for tests that act mid-generation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB = 260
_HEADS, _HEAD_SIZE = 2, 4
_BURN_WIDTH = 1024


def _burn_nodes(burn: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes that compute ``burn_zero`` (0.0, [1]) from ``e`` through ``burn`` rows of MatMuls."""
    weight = np.random.default_rng(1).standard_normal((_BURN_WIDTH, _BURN_WIDTH)).astype(np.float32) / 32
    inits = [
        numpy_helper.from_array(weight, "burn_w"),
        numpy_helper.from_array(np.array([burn, _BURN_WIDTH], np.int64), "burn_shape"),
        numpy_helper.from_array(np.array([0.0], np.float32), "burn_zero_k"),
    ]
    nodes = [
        helper.make_node("ReduceSum", ["e"], ["burn_s"], keepdims=0),
        helper.make_node("Expand", ["burn_s", "burn_shape"], ["burn_x0"]),  # depends on the input: not folded
        helper.make_node("MatMul", ["burn_x0", "burn_w"], ["burn_m1"]),
        helper.make_node("Tanh", ["burn_m1"], ["burn_x1"]),
        helper.make_node("MatMul", ["burn_x1", "burn_w"], ["burn_m2"]),
        helper.make_node("Tanh", ["burn_m2"], ["burn_x2"]),
        helper.make_node("ReduceSum", ["burn_x2"], ["burn_t"], keepdims=0),
        helper.make_node("Mul", ["burn_t", "burn_zero_k"], ["burn_zero"]),
    ]
    return nodes, inits


def _decoder(burn: int) -> onnx.ModelProto:
    weights = np.full((VOCAB, VOCAB), -10.0, np.float32)
    for token in range(VOCAB):
        weights[token, (token + 1) % 256 if token < 256 else 104] = 10.0  # next byte = this + 1
    embedding = np.random.default_rng(0).standard_normal((VOCAB, _HEADS * _HEAD_SIZE)).astype(np.float32)
    inits = [
        numpy_helper.from_array(weights, "W"),
        numpy_helper.from_array(embedding, "E"),
        numpy_helper.from_array(np.array([0, 0, _HEADS, _HEAD_SIZE], np.int64), "kvshape"),
    ]
    logits = "raw_logits" if burn else "logits"
    nodes = [
        helper.make_node("Gather", ["W", "input_ids"], [logits]),
        helper.make_node("Gather", ["E", "input_ids"], ["e"]),
        helper.make_node("Reshape", ["e", "kvshape"], ["e4"]),
        helper.make_node("Transpose", ["e4"], ["kv"], perm=[0, 2, 1, 3]),
    ]
    if burn:
        burn_nodes, burn_inits = _burn_nodes(burn)
        nodes += [*burn_nodes, helper.make_node("Add", ["raw_logits", "burn_zero"], ["logits"])]
        inits += burn_inits
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    for kind in ("key", "value"):
        past = f"past_key_values.0.{kind}"
        inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, ["batch", _HEADS, "past", _HEAD_SIZE]))
        nodes.append(helper.make_node("Concat", [past, "kv"], [f"present.0.{kind}"], axis=2))
        outputs.append(
            helper.make_tensor_value_info(
                f"present.0.{kind}", TensorProto.FLOAT, ["batch", _HEADS, "total", _HEAD_SIZE]
            )
        )
    graph = helper.make_graph(nodes, "tiny_decoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _config(context_length: int) -> dict[str, Any]:
    decoder = {
        "session_options": {"provider_options": []},
        "filename": "model.onnx",
        "head_size": _HEAD_SIZE,
        "hidden_size": _HEADS * _HEAD_SIZE,
        "num_attention_heads": _HEADS,
        "num_hidden_layers": 1,
        "num_key_value_heads": _HEADS,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": "attention_mask",
            "position_ids": "position_ids",
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        },
        "outputs": {
            "logits": "logits",
            "present_key_names": "present.%d.key",
            "present_value_names": "present.%d.value",
        },
    }
    search = {
        "do_sample": False, "max_length": context_length, "min_length": 0, "num_beams": 1,
        "num_return_sequences": 1, "past_present_share_buffer": False, "temperature": 1.0, "top_k": 1,
        "top_p": 1.0, "repetition_penalty": 1.0, "early_stopping": True, "length_penalty": 1.0,
        "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
    }  # fmt: skip
    model = {
        "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258, "context_length": context_length,
        "vocab_size": VOCAB, "type": "llama", "decoder": decoder,
    }  # fmt: skip
    return {"model": model, "search": search}


def byte_encoder() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what byte-level BPE vocabularies hold)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars, strict=True)}


def _tokenizer() -> dict[str, Any]:
    encoder = byte_encoder()
    vocab = {encoder[byte]: byte for byte in range(256)}
    special = [("<s>", 256), ("</s>", 257), ("<pad>", 258), ("<unk>", 259)]
    vocab.update(dict(special))
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None, "post_processor": None,
        "added_tokens": [
            {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
             "special": True} for c, i in special
        ],
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "decoder": {"type": "ByteLevel", **byte_level, "add_prefix_space": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "vocab": vocab, "merges": [],
        },
    }  # fmt: skip


def build_genai_model(root: Path, *, burn: int = 0, context_length: int = 256) -> Path:
    """Write the bundle (model.onnx, genai_config.json, tokenizer.json, tokenizer_config.json) into ``root``.

    Args:
        root: The directory (created).
        burn: Rows of the slowing MatMuls per step (0: none; 256 makes a step a few ms).
        context_length: Longest prompt + generated tokens.

    Returns:
        ``root``.
    """
    root.mkdir(parents=True, exist_ok=True)
    onnx.save(_decoder(burn), str(root / "model.onnx"))
    (root / "genai_config.json").write_text(json.dumps(_config(context_length), indent=1))
    (root / "tokenizer.json").write_text(json.dumps(_tokenizer()))
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": False, "add_prefix_space": False, "model_max_length": context_length,
    }  # fmt: skip
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return root
