"""Builds the ONNX graph of a Llama-family decoder with a KV cache, in standard ONNX ops only.

Layout of the exported graph (names follow the Hugging Face module paths):

* inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, total_seq], ``position_ids`` [batch, seq],
  ``past_key_values.{i}.key|value`` [batch, kv_heads, past_seq, head_dim];
* outputs ``logits`` [batch, seq, vocab] (always fp32) and ``present.{i}.key|value``;
* every linear layer is ``/model/layers.{i}/<module>/<proj>/MatMul`` whose second input is an initializer
  holding the weight as [in_features, out_features].

Attention is opset 23's standard ``RotaryEmbedding`` and ``Attention`` ops (grouped-query, with the KV cache
as past/present inputs and outputs, and a boolean mask for causality, padding and sliding windows): ONNX
Runtime runs each as one kernel. RMSNorm is written as Pow/ReduceMean/Add/Sqrt/Div/Mul so that ONNX Runtime
fuses it; RMSNorm and softmax run in fp32 even in an fp16 export.
"""

from __future__ import annotations

import sys
from typing import Mapping

import numpy as np
from onnx import TensorProto, helper

from accullm_export.errors import UserError
from accullm_export.models.architectures import DecoderConfig
from accullm_export.models.onnx_writer import OnnxWriter

_ONNX_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


class DecoderGraphBuilder:
    """Writes one decoder into an :class:`OnnxWriter`, reading weights from a name -> array mapping."""

    def __init__(self, config: DecoderConfig, tensors: Mapping[str, np.ndarray], writer: OnnxWriter,
                 dtype: np.dtype):
        self.config = config
        self.tensors = tensors
        self.w = writer
        self.dtype = np.dtype(dtype)
        self.onnx_dtype = _ONNX_DTYPES[self.dtype]

    # ----------------------------------------------------------------------------------------- interface
    def input_infos(self):
        c, t = self.config, self.onnx_dtype
        infos = [helper.make_tensor_value_info(name, TensorProto.INT64, shape) for name, shape in (
            ("input_ids", ["batch_size", "sequence_length"]),
            ("attention_mask", ["batch_size", "total_sequence_length"]),
            ("position_ids", ["batch_size", "sequence_length"]))]
        for i in range(c.num_layers):
            for kind in ("key", "value"):
                infos.append(helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", t,
                    ["batch_size", c.num_kv_heads, "past_sequence_length", c.head_dim]))
        return infos

    def output_infos(self):
        c, t = self.config, self.onnx_dtype
        infos = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                               ["batch_size", "sequence_length", c.vocab_size])]
        for i in range(c.num_layers):
            for kind in ("key", "value"):
                infos.append(helper.make_tensor_value_info(
                    f"present.{i}.{kind}", t,
                    ["batch_size", c.num_kv_heads, "total_sequence_length", c.head_dim]))
        return infos

    def build(self) -> None:
        hidden = self._embed()
        rotary = self._rotary()
        mask = self._attention_mask()
        from tqdm.auto import tqdm

        layers = tqdm(range(self.config.num_layers), desc="export", unit="layer", disable=not sys.stderr.isatty())
        for layer in layers:
            hidden = self._decoder_layer(layer, hidden, rotary, mask)
        hidden = self._rms_norm("/model/norm", hidden, self._weight("model.norm.weight"))
        logits = self._linear("/lm_head", hidden, self._lm_head_weight_name())
        if self.dtype != np.float32:
            self.w.node("Cast", [logits], "/lm_head/Cast", outputs=["logits"], to=TensorProto.FLOAT)
        else:
            self.w.node("Identity", [logits], "/lm_head/Identity", outputs=["logits"])

    # ------------------------------------------------------------------------------------------ weights
    def _tensor(self, name: str) -> np.ndarray:
        try:
            return self.tensors[name]
        except KeyError:
            raise UserError(f"checkpoint is missing tensor {name!r}") from None

    def _weight(self, name: str, transpose: bool = False) -> str:
        """Convert a checkpoint tensor to the export dtype and add it as an initializer."""
        array = np.asarray(self._tensor(name), dtype=np.float32)
        if transpose:
            array = array.T
        return self.w.initializer(name.replace(".weight", ".MatMul.weight") if transpose else name,
                                  array.astype(self.dtype))

    def _lm_head_weight_name(self) -> str:
        if not hasattr(self, "_lm_head_weight"):
            source = "lm_head.weight"
            if self.config.tie_word_embeddings or source not in self.tensors:
                source = "model.embed_tokens.weight"
            array = np.asarray(self._tensor(source), dtype=np.float32).T.astype(self.dtype)
            self._lm_head_weight = self.w.initializer("lm_head.MatMul.weight", array)
        return self._lm_head_weight

    def _tied(self) -> bool:
        return self.config.tie_word_embeddings or "lm_head.weight" not in self.tensors

    # ------------------------------------------------------------------------------------------- blocks
    def _embed(self) -> str:
        if self._tied():
            # Tied embeddings: gather columns of the lm_head's [hidden, vocab] weight so it is stored once.
            gathered = self.w.node("Gather", [self._lm_head_weight_name(), "input_ids"],
                                   "/model/embed_tokens/Gather", axis=1)
            return self.w.node("Transpose", [gathered], "/model/embed_tokens/Transpose", perm=[1, 2, 0])
        table = self._weight("model.embed_tokens.weight")
        return self.w.node("Gather", [table, "input_ids"], "/model/embed_tokens/Gather", axis=0)

    def _rotary(self) -> tuple[str, str]:
        """cos and sin caches, [max_positions, head_dim / 2], for the standard ``RotaryEmbedding`` op.

        Angles are computed as transformers does, float32 positions times float32 frequencies, so long
        positions round the same way.
        """
        c = self.config
        positions = np.arange(c.max_position_embeddings, dtype=np.float32)[:, None]
        angles = positions * c.inv_freq().astype(np.float32)[None, :]
        return (self.w.initializer("/model/rotary_emb/cos_cache", np.cos(angles).astype(self.dtype)),
                self.w.initializer("/model/rotary_emb/sin_cache", np.sin(angles).astype(self.dtype)))

    def _attention_mask(self) -> str:
        """Boolean [batch, 1, seq, total_seq]: causal, padding and (if configured) sliding window."""
        w, p = self.w, "/model/attn_mask"
        seq = w.node("Gather", [w.node("Shape", ["input_ids"], f"{p}/Shape_ids"), w.constant(1)],
                     f"{p}/Gather_seq", axis=0)
        total = w.node("Gather", [w.node("Shape", ["attention_mask"], f"{p}/Shape_mask"), w.constant(1)],
                       f"{p}/Gather_total", axis=0)
        past = w.node("Sub", [total, seq], f"{p}/Sub_past")
        key_pos = w.node("Range", [w.constant(0), total, w.constant(1)], f"{p}/Range_keys")
        query_pos = w.node("Range", [past, total, w.constant(1)], f"{p}/Range_queries")
        query_col = w.node("Unsqueeze", [query_pos, w.constant([1])], f"{p}/Unsqueeze_queries")
        allowed = w.node("LessOrEqual", [key_pos, query_col], f"{p}/Causal")  # [S, T]
        if self.config.sliding_window:
            lowest = w.node("Sub", [query_col, w.constant(self.config.sliding_window)], f"{p}/Sub_window")
            inside = w.node("Greater", [key_pos, lowest], f"{p}/Window")
            allowed = w.node("And", [allowed, inside], f"{p}/And_window")
        padding = w.node("Cast", ["attention_mask"], f"{p}/Cast_padding", to=TensorProto.BOOL)
        padding = w.node("Unsqueeze", [padding, w.constant([1, 2])], f"{p}/Unsqueeze_padding")
        return w.node("And", [padding, allowed], f"{p}/And")

    def _decoder_layer(self, i: int, hidden: str, rotary: tuple[str, str], mask: str) -> str:
        prefix, hf = f"/model/layers.{i}", f"model.layers.{i}"
        normed = self._rms_norm(f"{prefix}/input_layernorm", hidden, self._weight(f"{hf}.input_layernorm.weight"))
        attention = self._attention(i, normed, rotary, mask)
        hidden = self.w.node("Add", [hidden, attention], f"{prefix}/residual_attn/Add")
        normed = self._rms_norm(f"{prefix}/post_attention_layernorm", hidden,
                                self._weight(f"{hf}.post_attention_layernorm.weight"))
        mlp = self._mlp(i, normed)
        return self.w.node("Add", [hidden, mlp], f"{prefix}/residual_mlp/Add")

    def _attention(self, i: int, hidden: str, rotary: tuple[str, str], mask: str) -> str:
        """Grouped-query attention with the KV cache: standard ``RotaryEmbedding`` and ``Attention`` (opset 23).

        Queries, keys and values stay [batch, seq, heads * head_dim]; the cache is [batch, kv_heads, seq, dim].
        """
        c, w = self.config, self.w
        p, hf = f"/model/layers.{i}/self_attn", f"model.layers.{i}.self_attn"
        q = self._apply_rotary(f"{p}/q_rotary", self._projection(i, "q", hidden, c.num_heads), rotary, c.num_heads)
        k = self._apply_rotary(f"{p}/k_rotary", self._projection(i, "k", hidden, c.num_kv_heads), rotary,
                               c.num_kv_heads)
        v = self._projection(i, "v", hidden, c.num_kv_heads)
        attributes = {"q_num_heads": c.num_heads, "kv_num_heads": c.num_kv_heads}
        if self.dtype != np.float32:
            attributes["softmax_precision"] = TensorProto.FLOAT
        context = w.node("Attention", [q, k, v, mask, f"past_key_values.{i}.key", f"past_key_values.{i}.value"],
                         f"{p}/Attention", outputs=[f"{p}/Attention/output_0", f"present.{i}.key",
                                                    f"present.{i}.value"], **attributes)[0]
        return self._linear(f"{p}/o_proj", context, self._weight(f"{hf}.o_proj.weight", transpose=True),
                            bias=f"{hf}.o_proj.bias")

    def _projection(self, i: int, which: str, hidden: str, num_heads: int) -> str:
        """q/k/v projection, [batch, seq, heads * head_dim]; Qwen3 RMS-normalizes each head of q and k."""
        c, w = self.config, self.w
        p, hf = f"/model/layers.{i}/self_attn", f"model.layers.{i}.self_attn"
        projected = self._linear(f"{p}/{which}_proj", hidden,
                                 self._weight(f"{hf}.{which}_proj.weight", transpose=True),
                                 bias=f"{hf}.{which}_proj.bias")
        if which == "v" or not c.traits.qk_norm:
            return projected
        heads = w.node("Reshape", [projected, w.constant([0, 0, num_heads, c.head_dim])], f"{p}/{which}_heads/Reshape")
        heads = self._rms_norm(f"{p}/{which}_norm", heads, self._weight(f"{hf}.{which}_norm.weight"))
        return w.node("Reshape", [heads, w.constant([0, 0, num_heads * c.head_dim])], f"{p}/{which}_heads/Reshape_merge")

    def _apply_rotary(self, p: str, x: str, rotary: tuple[str, str], num_heads: int) -> str:
        cos_cache, sin_cache = rotary
        return self.w.node("RotaryEmbedding", [x, cos_cache, sin_cache, "position_ids"], f"{p}/RotaryEmbedding",
                           num_heads=num_heads)

    def _mlp(self, i: int, hidden: str) -> str:
        w = self.w
        p, hf = f"/model/layers.{i}/mlp", f"model.layers.{i}.mlp"
        gate = self._linear(f"{p}/gate_proj", hidden, self._weight(f"{hf}.gate_proj.weight", transpose=True),
                            bias=f"{hf}.gate_proj.bias")
        up = self._linear(f"{p}/up_proj", hidden, self._weight(f"{hf}.up_proj.weight", transpose=True),
                          bias=f"{hf}.up_proj.bias")
        activated = w.node("Mul", [gate, w.node("Sigmoid", [gate], f"{p}/act_fn/Sigmoid")], f"{p}/act_fn/Mul")
        product = w.node("Mul", [activated, up], f"{p}/Mul")
        return self._linear(f"{p}/down_proj", product, self._weight(f"{hf}.down_proj.weight", transpose=True),
                            bias=f"{hf}.down_proj.bias")

    # ----------------------------------------------------------------------------------------- helpers
    def _linear(self, p: str, x: str, weight: str, bias: str | None = None) -> str:
        out = self.w.node("MatMul", [x, weight], f"{p}/MatMul")
        if bias is not None and bias in self.tensors:
            out = self.w.node("Add", [out, self._weight(bias)], f"{p}/Add")
        return out

    def _rms_norm(self, p: str, x: str, weight: str) -> str:
        w = self.w
        x32 = self._cast(x, f"{p}/Cast_in", to=TensorProto.FLOAT)
        squared = w.node("Pow", [x32, w.constant(2.0, dtype=np.float32)], f"{p}/Pow")
        variance = w.node("ReduceMean", [squared, w.constant([-1])], f"{p}/ReduceMean", keepdims=1)
        variance = w.node("Add", [variance, w.constant(self.config.rms_norm_eps, dtype=np.float32)], f"{p}/Add")
        normed = w.node("Div", [x32, w.node("Sqrt", [variance], f"{p}/Sqrt")], f"{p}/Div")
        normed = self._cast(normed, f"{p}/Cast_out")
        return w.node("Mul", [normed, weight], f"{p}/Mul")

    def _cast(self, x: str, name: str, to: int | None = None) -> str:
        """Cast to ``to`` (default: the export dtype); a no-op when the graph is already fp32."""
        to = self.onnx_dtype if to is None else to
        if self.dtype == np.float32:
            return x
        return self.w.node("Cast", [x], name, to=to)
