"""Loading checkpoints (Hugging Face folders, GGUF files, the built-in sample) and exporting them to ONNX."""
