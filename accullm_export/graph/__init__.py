"""ONNX load/save with external data, model summaries; the pass registry and pipeline come with the rewrite."""
