"""Probe: does rotating the residual stream (QuaRot/SpinQuant) beat FP16 outlier rows for w4a16 on the sample?

A research probe in torch, not a kit feature. Every variant starts from the sample's fp32 weights (transformers),
quantizes every linear layer to symmetric INT4 in blocks of ``--block-size`` with the kit's own GPTQ
(``quant.gptq``: searched block scales, second moments over ``--calib-windows`` x 512 tokens of
``wiki:calibration``, the sink position left out), and scores the result against the fp32 model on held-out
windows of ``wiki:evaluation`` with the kit's ``TokenStatistics`` (the Δppl, KL and top-1 that ``validate``
reports). The LM head gets its own copy of the tied embedding table; the embedding table stays fp32.

Variants (any of them, in order):

* ``outliers``: no rotation; the ``--outlier-rows`` input channels with the largest E[x^2] of each residual
  reader (q/k/v, gate/up, LM head) stay full precision, as the kit's ``--outlier-layers residual`` does.
* ``rotate``: the RMSNorm gains folded into the layers that read them, the residual stream rotated by a random
  orthogonal Q (embedding rows, every reader's input, every writer's output: an exact rewrite, zero runtime
  cost), and each attention head's values by a Hadamard matrix (v_proj output, o_proj input); no FP16 rows.
* ``rotate-r4``: ``rotate`` plus an online block-Hadamard (blocks of 64) on the down projections' input.
* ``rotate-kron``: Q = (random signs) x (H_64 (x) a random orthogonal 9x9).
* ``rotate-blockdiag``: Q = (random signs) x (block-diagonal H_64): mixing only inside each INT4 block.
* ``*-fp``: the same rewrite without quantization (a check that the rotation is exact: Δppl 0).

    .venv/bin/python benchmarks/rotation_probe.py --out bench_out/rotation outliers rotate rotate-r4 rotate-kron \
        rotate-blockdiag

Writes rotation.md under --out. A benchmark: it measures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = ("outliers", "rotate", "rotate-r4", "rotate-kron", "rotate-blockdiag")
HIDDEN_READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="+", help=f"any of {', '.join(VARIANTS)}, each optionally with -fp")
    parser.add_argument("--out", type=Path, required=True, help="folder for rotation.md")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--outlier-rows", type=int, default=8, help="FP16 rows per residual reader (outliers)")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per evaluation window")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v.removesuffix("-fp") not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return args


def hadamard(size: int) -> np.ndarray:
    """Sylvester's orthonormal Hadamard matrix (size a power of 2)."""
    matrix = np.ones((1, 1))
    while matrix.shape[0] < size:
        matrix = np.block([[matrix, matrix], [matrix, -matrix]])
    if matrix.shape[0] != size:
        raise ValueError(f"no Sylvester Hadamard matrix of size {size}")
    return matrix / np.sqrt(size)


def random_orthogonal(size: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, size)))
    return q * np.sign(np.diag(r))


def residual_rotation(variant: str, hidden: int, head_dim: int) -> np.ndarray:
    if variant == "rotate-blockdiag":
        rotation = np.kron(np.eye(hidden // head_dim), hadamard(head_dim))
    elif variant == "rotate-kron":
        rotation = np.kron(random_orthogonal(hidden // head_dim, 1), hadamard(head_dim))
    else:
        rotation = random_orthogonal(hidden, 0)
    signs = np.where(np.random.default_rng(2).random(hidden) < 0.5, -1.0, 1.0)
    return signs[:, None] * rotation


def fold_norms(model) -> None:
    """Each RMSNorm gain into the weights of the layers that read it; the gains become 1."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            for norm, readers in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                for linear in readers:
                    linear.weight.mul_(norm.weight[None])
                norm.weight.fill_(1.0)
        model.lm_head.weight.mul_(model.model.norm.weight[None])
        model.model.norm.weight.fill_(1.0)


def rotate(model, rotation: np.ndarray, head_rotation: np.ndarray) -> None:
    """x -> x Q on the residual stream (readers W Q, writers Q^T W, embedding rows E Q) and the values of every
    head by H (v_proj rows, o_proj columns): the same function, other coordinates."""
    import torch

    q = torch.tensor(rotation, dtype=torch.float64)
    h = torch.tensor(head_rotation, dtype=torch.float64)
    head_dim = h.shape[0]

    def set_(linear, value):
        linear.weight.data = value.float()

    with torch.no_grad():
        embedding = model.model.embed_tokens.weight
        embedding.data = (embedding.double() @ q).float()
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for linear in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj):
                set_(linear, linear.weight.double() @ q)
            for linear in (attention.o_proj, mlp.down_proj):
                set_(linear, q.T @ linear.weight.double())
            values = attention.v_proj.weight.double().view(-1, head_dim, attention.v_proj.weight.shape[1])
            set_(attention.v_proj, torch.einsum("ji,hjk->hik", h, values).reshape(-1, values.shape[-1]))
            output = attention.o_proj.weight.double()
            output = output.view(output.shape[0], -1, head_dim)
            set_(attention.o_proj, torch.einsum("ohj,jk->ohk", output, h).reshape(output.shape[0], -1))
        set_(model.lm_head, model.lm_head.weight.double() @ q)


def online_hadamard_class():
    import torch

    class OnlineHadamard(torch.nn.Module):
        """A linear layer whose input is rotated by a block-Hadamard at run time (its weight rotated to match)."""

        def __init__(self, linear, block: np.ndarray):
            super().__init__()
            self.linear, self.block = linear, torch.tensor(block, dtype=torch.float32)
            size = block.shape[0]
            weight = linear.weight.data.view(linear.weight.shape[0], -1, size)
            linear.weight.data = torch.einsum("obj,jk->obk", weight, self.block).reshape(linear.weight.shape)

        def forward(self, x):
            size = self.block.shape[0]
            return self.linear((x.view(*x.shape[:-1], -1, size) @ self.block).view(x.shape))

    return OnlineHadamard


def linear_layers(model):
    for index, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{index}.{name}", getattr(layer.self_attn, name)
        for name in ("gate_proj", "up_proj", "down_proj"):
            module = getattr(layer.mlp, name)
            yield f"{index}.{name}", getattr(module, "linear", module)
    yield "lm_head", model.lm_head


def second_moments(model, windows: np.ndarray) -> dict[str, np.ndarray]:
    """E[x x^T] of every linear layer's input over ``windows``, the sink position left out (as the kit's GPTQ)."""
    import torch

    sums, hooks = {}, []
    for name, linear in linear_layers(model):
        def hook(module, inputs, output, name=name):
            x = inputs[0][:, 1:].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
        hooks.append(linear.register_forward_hook(hook))
    with torch.no_grad():
        for window in windows:
            model(torch.from_numpy(window[None]))
    for handle in hooks:
        handle.remove()
    count = len(windows) * (windows.shape[1] - 1)
    return {name: (total / count).numpy() for name, total in sums.items()}


def quantize_in_place(model, windows: np.ndarray, block_size: int, outlier_rows: int) -> float:
    """GPTQ every linear layer to INT4 (outlier rows kept); returns the effective bits per weight."""
    import torch

    from accullm_export.quant.gptq import gptq_quantize
    from accullm_export.quant.symmetric import dequantize

    hessians = second_moments(model, windows)
    bits = weights = 0
    for name, linear in linear_layers(model):
        weight = linear.weight.data.numpy().T.astype(np.float32)  # [in, out], the MatMul layout
        keep = []
        if outlier_rows and name.split(".")[-1] in HIDDEN_READERS:
            keep = sorted(np.argsort(-np.diag(hessians[name]))[:outlier_rows].tolist())
        values, scales = gptq_quantize(weight, hessians[name], 4, block_size, exclude=keep, search=True)
        result = dequantize(values, scales, block_size)
        result[keep] = weight[keep]
        linear.weight.data = torch.from_numpy(np.ascontiguousarray(result.T))
        weights += weight.size
        bits += weight.shape[1] * (16 * len(keep) + 4 * (weight.shape[0] - len(keep))) + 16 * scales.size
    return bits / weights


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accullm_export.data.text import load_text_source, token_windows
    from accullm_export.models.sample import sample_checkpoint_folder
    from accullm_export.validate.metrics import TokenStatistics

    torch.set_num_threads(2)
    folder = sample_checkpoint_folder("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def windows(split: str, count: int, seq_len: int) -> np.ndarray:
        return token_windows(load_text_source(f"wiki:{split}").documents,
                             lambda text: tokenizer.encode(text, add_special_tokens=False), num_windows=count,
                             seq_len=seq_len, seed=0, separator_ids=[tokenizer.eos_token_id])

    evaluation = windows("evaluation", args.eval_windows, args.seq_len)
    calibration = windows("calibration", args.calib_windows, 512)

    def load():
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.data.clone())  # untie: the head is quantized
        return model

    def logits(model) -> list[np.ndarray]:
        with torch.no_grad():
            return [model(torch.from_numpy(window[None])).logits.numpy() for window in evaluation]

    reference = logits(load())
    lines = ["| variant | bits/weight | Δppl % | KL mean | top-1 | seconds |", "|---|--:|--:|--:|--:|--:|"]
    for variant in args.variants:
        started = time.perf_counter()
        base, exact = variant.removesuffix("-fp"), variant.endswith("-fp")
        model = load()
        config = model.config
        head_dim = config.hidden_size // config.num_attention_heads
        if base.startswith("rotate"):
            fold_norms(model)
            rotate(model, residual_rotation(base, config.hidden_size, head_dim), hadamard(head_dim))
            if base == "rotate-r4":
                online = online_hadamard_class()
                for layer in model.model.layers:
                    layer.mlp.down_proj = online(layer.mlp.down_proj, hadamard(64))
        outlier_rows = args.outlier_rows if base == "outliers" else 0
        bits = 32.0 if exact else quantize_in_place(model, calibration, args.block_size, outlier_rows)
        stats = TokenStatistics()
        for window, ref, cand in zip(evaluation, reference, logits(model)):
            stats.add(ref, cand, window[None])
        summary = stats.summary()
        line = (f"| {variant} | {bits:.3f} | {summary['ppl_delta_pct']:+.2f} | {summary['kl_mean']:.4f} | "
                f"{summary['top1_agreement']:.3f} | {time.perf_counter() - started:.0f} |")
        print(line, flush=True)
        lines.append(line)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rotation.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'rotation.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
