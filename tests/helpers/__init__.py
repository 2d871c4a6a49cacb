"""Helpers shared by the test modules: independent NumPy emulations, tiny graph builders and ONNX Runtime runners,
tiny checkpoints, CLI helpers. Test modules import from here, never from one another (tests/unit/test_test_layout.py
checks that); nothing here is collected as a test."""
