"""The engine: fast inference of one model on one device (FiLM folded into weights, the
conditioning-free prefix shared, recycled output buffers), in tensors, without serving concerns.

Imports the model family and ``errors``; never the repository, the serving core or a transport.
"""
