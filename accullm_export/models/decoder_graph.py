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

# fused: opset 23's Attention and RotaryEmbedding ops (one kernel each in ONNX Runtime);
# decomposed: MatMul/Where/Softmax/Gather in opset 21, for runtimes without opset 23 (older TensorRT parsers)
ATTENTION_OPSETS = {"fused": 23, "decomposed": 21}
_ONNX_DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


class DecoderGraphBuilder:
    """Writes one decoder into an :class:`OnnxWriter`, reading weights from a name -> array mapping."""

    def __init__(self, config: DecoderConfig, tensors: Mapping[str, np.ndarray], writer: OnnxWriter,
                 dtype: np.dtype, attention: str = "fused"):
        if attention not in ATTENTION_OPSETS:
            raise UserError(f"unknown attention {attention!r}; choose from {', '.join(ATTENTION_OPSETS)}")
        self.attention = attention
        self._attention_kinds = {"fused": self._attention_fused, "decomposed": self._attention_decomposed}
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
        rotary = self._fused_rotary_caches() if self.attention == "fused" else self._decomposed_rotary_tables()
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
            source = "model.embed_tokens.weight" if self._tied() else "lm_head.weight"
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

    def _fused_rotary_caches(self) -> tuple[str, str]:
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
        """Boolean mask, [batch, 1, seq, total_seq] (one more 1 for decomposed attention): causal, padding and
        (if configured) sliding window."""
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
        # [B, 1, 1, T] for the fused op's [B, H, S, T] scores; [B, 1, 1, 1, T] for the grouped 5-D ones
        axes = [1, 2] if self.attention == "fused" else [1, 2, 3]
        padding = w.node("Unsqueeze", [padding, w.constant(axes)], f"{p}/Unsqueeze_padding")
        return w.node("And", [padding, allowed], f"{p}/And")

    def _decoder_layer(self, i: int, hidden: str, rotary: tuple[str, ...], mask: str) -> str:
        prefix, hf = f"/model/layers.{i}", f"model.layers.{i}"
        normed = self._rms_norm(f"{prefix}/input_layernorm", hidden, self._weight(f"{hf}.input_layernorm.weight"))
        attention = self._attention_kinds[self.attention](i, normed, rotary, mask)
        hidden = self.w.node("Add", [hidden, attention], f"{prefix}/residual_attn/Add")
        normed = self._rms_norm(f"{prefix}/post_attention_layernorm", hidden,
                                self._weight(f"{hf}.post_attention_layernorm.weight"))
        mlp = self._mlp(i, normed)
        return self.w.node("Add", [hidden, mlp], f"{prefix}/residual_mlp/Add")

    def _attention_fused(self, i: int, hidden: str, rotary: tuple[str, ...], mask: str) -> str:
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

    # ------------------------------------------------------------------ decomposed attention (opset 21)
    def _decomposed_rotary_tables(self) -> tuple[str, str, str, str]:
        """cos and signed sin tables for keys, [B, 1, S, D], and for queries, [B, 1, 1, S, D], 1/sqrt(D) folded in.

        The sin table is negated on its first half, the sign of rotate_half(x) = concat(-x[D/2:], x[:D/2]).
        """
        w, p = self.w, "/model/rotary_emb"
        positions = w.node("Cast", ["position_ids"], f"{p}/Cast", to=TensorProto.FLOAT)
        positions = w.node("Unsqueeze", [positions, w.constant([-1])], f"{p}/Unsqueeze")
        inv_freq = w.constant(self.config.inv_freq().astype(np.float32), dtype=np.float32)
        freqs = w.node("Mul", [positions, inv_freq], f"{p}/Mul")
        angles = w.node("Concat", [freqs, freqs], f"{p}/Concat", axis=-1)
        scale = w.constant(1.0 / np.sqrt(self.config.head_dim), dtype=np.float32)
        half = self.config.head_dim // 2
        sign = w.constant(np.concatenate([-np.ones(half), np.ones(half)]), dtype=np.float32)
        keys, queries = [], []
        for op in ("Cos", "Sin"):
            value = w.node(op, [angles], f"{p}/{op}")
            if op == "Sin":
                value = w.node("Mul", [value, sign], f"{p}/Sin/Mul_sign")
            keys.append(self._cast(w.node("Unsqueeze", [value, w.constant([1])], f"{p}/{op}/Unsqueeze"),
                                   f"{p}/{op}/Cast"))
            scaled = w.node("Mul", [value, scale], f"{p}/{op}/Mul_scale")  # the attention scale, once per model
            scaled = w.node("Unsqueeze", [scaled, w.constant([1, 2])], f"{p}/{op}/Unsqueeze_queries")
            queries.append(self._cast(scaled, f"{p}/{op}/Cast_queries"))
        return keys[0], keys[1], queries[0], queries[1]

    def _attention_decomposed(self, i: int, hidden: str, rotary: tuple[str, ...], mask: str) -> str:
        """Opset-21 attention from MatMul/Where/Softmax; queries grouped by KV head, K/V never repeated."""
        c, w = self.config, self.w
        p, hf = f"/model/layers.{i}/self_attn", f"model.layers.{i}.self_attn"
        cos_k, sin_k, cos_q, sin_q = rotary
        q = self._grouped_heads(i, "q", hidden)  # [B, KV, G, S, D], already scaled by 1/sqrt(D) through cos_q/sin_q
        k = self._grouped_heads(i, "k", hidden)  # [B, KV, S, D]
        v = self._grouped_heads(i, "v", hidden)
        q = self._apply_rotary_gather(f"{p}/q_rotary", q, cos_q, sin_q)
        k = self._apply_rotary_gather(f"{p}/k_rotary", k, cos_k, sin_k)
        keys = w.node("Concat", [f"past_key_values.{i}.key", k], f"{p}/key_cache/Concat",
                      outputs=[f"present.{i}.key"], axis=2)
        values = w.node("Concat", [f"past_key_values.{i}.value", v], f"{p}/value_cache/Concat",
                        outputs=[f"present.{i}.value"], axis=2)
        k5 = w.node("Unsqueeze", [keys, w.constant([2])], f"{p}/k_groups/Unsqueeze")
        k5t = w.node("Transpose", [k5], f"{p}/k_groups/Transpose", perm=[0, 1, 2, 4, 3])
        scores = w.node("MatMul", [q, k5t], f"{p}/scores/MatMul")  # [B, KV, G, S, T]
        scores = self._cast(scores, f"{p}/scores/Cast", to=TensorProto.FLOAT)
        fill = w.constant(np.finfo(np.float32).min, dtype=np.float32)
        scores = w.node("Where", [mask, scores, fill], f"{p}/scores/Where")
        probs = w.node("Softmax", [scores], f"{p}/Softmax", axis=-1)
        probs = self._cast(probs, f"{p}/Softmax/Cast")
        v5 = w.node("Unsqueeze", [values, w.constant([2])], f"{p}/v_groups/Unsqueeze")
        context = w.node("MatMul", [probs, v5], f"{p}/context/MatMul")  # [B, KV, G, S, D]
        context = w.node("Transpose", [context], f"{p}/context/Transpose", perm=[0, 3, 1, 2, 4])
        context = w.node("Reshape", [context, w.constant([0, 0, c.num_heads * c.head_dim])],
                         f"{p}/context/Reshape_merge")
        return self._linear(f"{p}/o_proj", context, self._weight(f"{hf}.o_proj.weight", transpose=True),
                            bias=f"{hf}.o_proj.bias")

    def _grouped_heads(self, i: int, which: str, hidden: str) -> str:
        """Project and split into heads, RMS-normalized per head for Qwen3, heads before the sequence axis.

        Queries come out grouped by their KV head, [B, KV, G, S, D]; keys and values as [B, KV, S, D].
        """
        c, w = self.config, self.w
        p, hf = f"/model/layers.{i}/self_attn", f"model.layers.{i}.self_attn"
        projected = self._linear(f"{p}/{which}_proj", hidden,
                                 self._weight(f"{hf}.{which}_proj.weight", transpose=True),
                                 bias=f"{hf}.{which}_proj.bias")
        if which == "q":
            shape, perm = [0, 0, c.num_kv_heads, c.num_heads // c.num_kv_heads, c.head_dim], [0, 2, 3, 1, 4]
        else:
            shape, perm = [0, 0, c.num_kv_heads, c.head_dim], [0, 2, 1, 3]
        heads = w.node("Reshape", [projected, w.constant(shape)], f"{p}/{which}_heads/Reshape")
        if which != "v" and c.traits.qk_norm:
            heads = self._rms_norm(f"{p}/{which}_norm", heads, self._weight(f"{hf}.{which}_norm.weight"))
        return w.node("Transpose", [heads], f"{p}/{which}_heads/Transpose", perm=perm)

    def _apply_rotary_gather(self, p: str, x: str, cos: str, signed_sin: str) -> str:
        """x * cos + rotate_half(x) * sin, with rotate_half = swap the halves (a Gather) and negate the first.

        The negation lives in ``signed_sin`` (computed once per model), so this is four exact element-wise ops.
        """
        w = self.w
        half = self.config.head_dim // 2
        swap = w.constant(np.concatenate([np.arange(half, 2 * half), np.arange(half)]))
        swapped = w.node("Gather", [x, swap], f"{p}/rotate_half/Gather", axis=-1)
        return w.node("Add", [w.node("Mul", [x, cos], f"{p}/Mul_cos"),
                              w.node("Mul", [swapped, signed_sin], f"{p}/Mul_sin")], f"{p}/Add")

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
