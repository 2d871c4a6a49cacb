"""Training with torch on the graph's parameters: distilling the low-bit layers' scales against the source model.

torch and transformers are optional; each function imports them when called, through ``errors.require``, so
importing this package needs neither. The pure NumPy quantization math it trains stays in ``quant``.
"""
