"""The `jaxserve.v1` wire API: `generation.proto` and its generated stubs.

Regenerate `generation_pb2*.py` with `tools/gen_proto.sh` after editing the proto; never edit the
generated files by hand.
"""
