"""The build pipeline: quantize (and later sparsify, engine builds and deployment bundles)."""
