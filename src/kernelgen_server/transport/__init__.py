"""The transports: kernelgen.v1's and the Open Inference Protocol's servicers over the serving core,
their codecs, shared memory, statuses, health and readiness, security, the metrics endpoint, and
the assembled gRPC server.

Imports the serving core and everything below it; never an operations module.
"""
