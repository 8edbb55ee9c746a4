"""The serving core: ``KernelService`` and what it runs on (request plans, the cache, the dynamic
batcher, the device and host threads, the in-flight budget, streaming plans, metrics), in Python
values, without gRPC.

Imports the engine, the repository, the model family, ``errors`` and ``settings``; never a
transport (a servicer, a codec, the server or an endpoint) or an operations module.
"""
