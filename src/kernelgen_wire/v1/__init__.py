"""Messages and stubs of ``kernelgen.v1``, generated from proto/ by scripts/gen_proto.py."""
