"""The model repository: checkpoints read and written, generators found in training checkpoints,
a folder of models and groups loaded once, and the reference model for correctness checks.

Imports the model family and ``errors``; never the engine, the serving core or a transport.
"""
