"""Activation sparsity: which MLP neurons a token can skip, and the "guesser" that predicts them.

``config`` holds the user's choices, ``predictor`` trains the low-rank guessers, ``plan`` turns a calibration
profile into one plan per MLP (found by :mod:`accullm_export.graph.mlp`) that the ``skip_sparse_neurons`` pass
writes into the graph.
"""
