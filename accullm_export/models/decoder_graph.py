"""Builds the ONNX graph of a decoder with a KV cache (Llama, Mistral, Qwen, Gemma, Phi-3), in standard ONNX ops.

Layout of the exported graph (names follow the Hugging Face module paths):

* inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, total_seq], ``position_ids`` [batch, seq],
  ``past_key_values.{i}.key|value`` [batch, kv_heads, past_seq, head_dim];
* outputs ``logits`` [batch, seq, vocab] (always fp32) and ``present.{i}.key|value``;
* every linear layer is ``/model/layers.{i}/<module>/<proj>/MatMul`` whose second input is an initializer
  holding the weight as [in_features, out_features], with Llama's module names on every architecture (Phi-3's
  fused projections arrive split, see ``checkpoint.SplitProjections``).

Attention is opset 23's standard ``RotaryEmbedding`` and ``Attention`` ops (grouped-query, with the KV cache
as past/present inputs and outputs, and a boolean mask for causality, padding and sliding windows): ONNX
Runtime runs each as one kernel. Layers with another window or rotary base (Gemma's local layers) read their
own mask and rotary tables, each built once per model. RMSNorm is written as Pow/ReduceMean/Add/Sqrt/Div/Mul so
that ONNX Runtime fuses it; RMSNorm and softmax run in fp32 even in an fp16 export.
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
        self._rotary_tables: dict[tuple, tuple[str, ...]] = {}  # rope key -> this attention form's tables
        self._masks: dict[int | None, str] = {}  # window -> boolean mask
        self._mask_parts: tuple[str, str, str, str] | None = None

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
        from tqdm.auto import tqdm

        layers = tqdm(range(self.config.num_layers), desc="export", unit="layer", disable=not sys.stderr.isatty())
        for layer in layers:
            hidden = self._decoder_layer(layer, hidden, self._rotary_for(layer), self._mask_for(layer))
        hidden = self._rms_norm("/model/norm", hidden, self._norm_weight("model.norm.weight"))
        logits = self._linear("/lm_head", hidden, self._lm_head_weight_name())
        if self.config.final_softcap is not None:
            self._softcap("/lm_head/softcap", self._cast(logits, "/lm_head/Cast", to=TensorProto.FLOAT),
                          self.config.final_softcap, output="logits")
        elif self.dtype != np.float32:
            self.w.node("Cast", [logits], "/lm_head/Cast", outputs=["logits"], to=TensorProto.FLOAT)
        else:
            self.w.node("Identity", [logits], "/lm_head/Identity", outputs=["logits"])

    def _rotary_for(self, layer: int) -> tuple[str, ...]:
        """The rotary tables of ``layer``'s rope, built on first use (the first rope under the usual names)."""
        attention = self.config.layer(layer)
        key = attention.rope_key()
        if key not in self._rotary_tables:
            prefix = "/model/rotary_emb" + (f"_{len(self._rotary_tables)}" if self._rotary_tables else "")
            inv_freq = self.config.inv_freq(layer)
            build = self._fused_rotary_caches if self.attention == "fused" else self._decomposed_rotary_tables
            self._rotary_tables[key] = build(prefix, inv_freq)
        return self._rotary_tables[key]

    def _mask_for(self, layer: int) -> str:
        """The boolean attention mask of ``layer``'s window, built on first use."""
        window = self.config.layer(layer).sliding_window
        if window not in self._masks:
            self._masks[window] = self._attention_mask(window)
        return self._masks[window]

    # ------------------------------------------------------------------------------------------ weights
    def _tensor(self, name: str) -> np.ndarray:
        try:
            return self.tensors[name]
        except KeyError:
            raise UserError(f"checkpoint is missing tensor {name!r}") from None

    def _weight(self, name: str, transpose: bool = False) -> str:
        """Add a checkpoint tensor as an initializer of the export dtype (the writer converts it block by block)."""
        array = self._tensor(name)
        if transpose:
            array = array.T
        return self.w.initializer(name.replace(".weight", ".MatMul.weight") if transpose else name, array,
                                  self.dtype)

    def _norm_weight(self, name: str) -> str:
        """An RMSNorm gain as the Mul reads it: Gemma's (1 + weight) is folded into the stored gain, so that every
        architecture's norm ends in the same Mul by a constant (which smoothing and the norm fusions rewrite)."""
        offset = self.config.traits.norm_gain_offset
        if not offset:
            return self._weight(name)
        array = np.asarray(self._tensor(name), dtype=np.float32) + np.float32(offset)
        return self.w.initializer(name, array.astype(self.dtype))

    def _lm_head_weight_name(self) -> str:
        if not hasattr(self, "_lm_head_weight"):
            source = "model.embed_tokens.weight" if self._tied() else "lm_head.weight"
            self._lm_head_weight = self.w.initializer("lm_head.MatMul.weight", self._tensor(source).T, self.dtype)
        return self._lm_head_weight

    def _tied(self) -> bool:
        return self.config.tie_word_embeddings or "lm_head.weight" not in self.tensors

    # ------------------------------------------------------------------------------------------- blocks
    def _embed(self) -> str:
        if self._tied():
            # Tied embeddings: gather columns of the lm_head's [hidden, vocab] weight so it is stored once.
            gathered = self.w.node("Gather", [self._lm_head_weight_name(), "input_ids"],
                                   "/model/embed_tokens/Gather", axis=1)
            embedded = self.w.node("Transpose", [gathered], "/model/embed_tokens/Transpose", perm=[1, 2, 0])
        else:
            table = self._weight("model.embed_tokens.weight")
            embedded = self.w.node("Gather", [table, "input_ids"], "/model/embed_tokens/Gather", axis=0)
        if not self.config.traits.scaled_embeddings:
            return embedded
        # Gemma scales embeddings by sqrt(hidden_size), rounded to the weights' dtype as transformers does
        scale = self.w.constant(np.sqrt(self.config.hidden_size), dtype=self.dtype)
        return self.w.node("Mul", [embedded, scale], "/model/embed_tokens/Mul_scale")

    def _fused_rotary_caches(self, prefix: str, inv_freq: np.ndarray) -> tuple[str, str]:
        """cos and sin caches, [max_positions, head_dim / 2], for the standard ``RotaryEmbedding`` op.

        Angles are computed as transformers does, float32 positions times float32 frequencies, so long
        positions round the same way.
        """
        positions = np.arange(self.config.max_position_embeddings, dtype=np.float32)[:, None]
        angles = positions * inv_freq.astype(np.float32)[None, :]
        return (self.w.initializer(f"{prefix}/cos_cache", np.cos(angles).astype(self.dtype)),
                self.w.initializer(f"{prefix}/sin_cache", np.sin(angles).astype(self.dtype)))

    def _mask_positions(self) -> tuple[str, str, str, str]:
        """(key positions [T], query positions as a column [S, 1], causal [S, T], padding): shared by every mask."""
        if self._mask_parts is None:
            w, p = self.w, "/model/attn_mask"
            seq = w.node("Gather", [w.node("Shape", ["input_ids"], f"{p}/Shape_ids"), w.constant(1)],
                         f"{p}/Gather_seq", axis=0)
            total = w.node("Gather", [w.node("Shape", ["attention_mask"], f"{p}/Shape_mask"), w.constant(1)],
                           f"{p}/Gather_total", axis=0)
            past = w.node("Sub", [total, seq], f"{p}/Sub_past")
            key_pos = w.node("Range", [w.constant(0), total, w.constant(1)], f"{p}/Range_keys")
            query_pos = w.node("Range", [past, total, w.constant(1)], f"{p}/Range_queries")
            query_col = w.node("Unsqueeze", [query_pos, w.constant([1])], f"{p}/Unsqueeze_queries")
            causal = w.node("LessOrEqual", [key_pos, query_col], f"{p}/Causal")  # [S, T]
            padding = w.node("Cast", ["attention_mask"], f"{p}/Cast_padding", to=TensorProto.BOOL)
            # [B, 1, 1, T] for the fused op's [B, H, S, T] scores; [B, 1, 1, 1, T] for the grouped 5-D ones
            axes = [1, 2] if self.attention == "fused" else [1, 2, 3]
            padding = w.node("Unsqueeze", [padding, w.constant(axes)], f"{p}/Unsqueeze_padding")
            self._mask_parts = (key_pos, query_col, causal, padding)
        return self._mask_parts

    def _attention_mask(self, window: int | None) -> str:
        """Boolean mask, [batch, 1, seq, total_seq] (one more 1 for decomposed attention): causal, padding and
        the sliding window, if any (key k is seen from query q when q - window < k <= q)."""
        w = self.w
        key_pos, query_col, allowed, padding = self._mask_positions()
        p = "/model/attn_mask" if not self._masks else f"/model/attn_mask_{window or 'global'}"
        if window:
            lowest = w.node("Sub", [query_col, w.constant(window)], f"{p}/Sub_window")
            inside = w.node("Greater", [key_pos, lowest], f"{p}/Window")
            allowed = w.node("And", [allowed, inside], f"{p}/And_window")
        return w.node("And", [padding, allowed], f"{p}/And")

    def _decoder_layer(self, i: int, hidden: str, rotary: tuple[str, ...], mask: str) -> str:
        """Pre-norm attention and MLP blocks; Gemma's sandwich norms also normalize each block's output, and its
        MLP reads ``pre_feedforward_layernorm`` where Llama's reads ``post_attention_layernorm``."""
        prefix, hf = f"/model/layers.{i}", f"model.layers.{i}"
        sandwich = self.config.traits.sandwich_norms

        def norm(name: str, x: str) -> str:
            return self._rms_norm(f"{prefix}/{name}", x, self._norm_weight(f"{hf}.{name}.weight"))

        attention = self._attention_kinds[self.attention](i, norm("input_layernorm", hidden), rotary, mask)
        if sandwich:
            attention = norm("post_attention_layernorm", attention)
        hidden = self.w.node("Add", [hidden, attention], f"{prefix}/residual_attn/Add")
        mlp = self._mlp(i, norm("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm", hidden))
        if sandwich:
            mlp = norm("post_feedforward_layernorm", mlp)
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
        if c.attention_scale is not None:
            attributes["scale"] = c.attention_scale
        if c.attention_softcap is not None:
            attributes["softcap"] = c.attention_softcap
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
        heads = self._rms_norm(f"{p}/{which}_norm", heads, self._norm_weight(f"{hf}.{which}_norm.weight"))
        return w.node("Reshape", [heads, w.constant([0, 0, num_heads * c.head_dim])], f"{p}/{which}_heads/Reshape_merge")

    def _apply_rotary(self, p: str, x: str, rotary: tuple[str, str], num_heads: int) -> str:
        cos_cache, sin_cache = rotary
        return self.w.node("RotaryEmbedding", [x, cos_cache, sin_cache, "position_ids"], f"{p}/RotaryEmbedding",
                           num_heads=num_heads)

    # ------------------------------------------------------------------ decomposed attention (opset 21)
    def _decomposed_rotary_tables(self, p: str, inv_freq: np.ndarray) -> tuple[str, str, str, str]:
        """cos and signed sin tables for keys, [B, 1, S, D], and for queries, [B, 1, 1, S, D], with the attention
        scale (1/sqrt(D), or Gemma's 1/sqrt(query_pre_attn_scalar)) folded in.

        The sin table is negated on its first half, the sign of rotate_half(x) = concat(-x[D/2:], x[:D/2]).
        """
        w = self.w
        positions = w.node("Cast", ["position_ids"], f"{p}/Cast", to=TensorProto.FLOAT)
        positions = w.node("Unsqueeze", [positions, w.constant([-1])], f"{p}/Unsqueeze")
        inv_freq = w.constant(inv_freq.astype(np.float32), dtype=np.float32)
        freqs = w.node("Mul", [positions, inv_freq], f"{p}/Mul")
        angles = w.node("Concat", [freqs, freqs], f"{p}/Concat", axis=-1)
        scale = w.constant(self.config.query_scale, dtype=np.float32)
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
        if c.attention_softcap is not None:  # before the mask, so masked keys stay masked
            scores = self._softcap(f"{p}/scores/softcap", scores, c.attention_softcap)
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
            heads = self._rms_norm(f"{p}/{which}_norm", heads, self._norm_weight(f"{hf}.{which}_norm.weight"))
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
        activated = self._activation(f"{p}/act_fn", gate)
        product = w.node("Mul", [activated, up], f"{p}/Mul")
        return self._linear(f"{p}/down_proj", product, self._weight(f"{hf}.down_proj.weight", transpose=True),
                            bias=f"{hf}.down_proj.bias")

    def _activation(self, p: str, gate: str) -> str:
        """The MLP gate's activation: SiLU as x * Sigmoid(x) (the form the MLP matchers look for), or GELU."""
        kind = self.config.activation
        if kind == "silu":
            return self.w.node("Mul", [gate, self.w.node("Sigmoid", [gate], f"{p}/Sigmoid")], f"{p}/Mul")
        return self.w.node("Gelu", [gate], f"{p}/Gelu", approximate="tanh" if kind == "gelu_tanh" else "none")

    # ----------------------------------------------------------------------------------------- helpers
    def _softcap(self, p: str, x: str, cap: float, output: str | None = None) -> str:
        """cap * tanh(x / cap) on a float32 tensor."""
        w, cap_constant = self.w, self.w.constant(cap, dtype=np.float32)
        scaled = w.node("Tanh", [w.node("Div", [x, cap_constant], f"{p}/Div")], f"{p}/Tanh")
        return w.node("Mul", [scaled, cap_constant], f"{p}/Mul", outputs=[output] if output else None)

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
