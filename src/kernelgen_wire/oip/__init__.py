"""Messages and stubs of the Open Inference Protocol (``inference``), generated from proto/ by
scripts/gen_proto.py; built in a descriptor pool of their own (``pool``).

Only the server and ``kernelgen loadtest --protocol oip`` import them; the client never does.
"""
