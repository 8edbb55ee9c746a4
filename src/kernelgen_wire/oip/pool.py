"""The Open Inference Protocol's descriptor pool (written by scripts/gen_proto.py).

Not protobuf's default pool: Triton's client registers the same ``inference.*``
names there, and one pool refuses a second registration of a name.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
