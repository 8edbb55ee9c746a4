"""A layer's hash: what an importer records and a client recomputes from the live layer."""

from __future__ import annotations

import pytest

from kernelgen_wire.layers import LayerTensor, covered, layer_hash, layer_of


def tensor(
    key: str, data: bytes = b"\x00\x00\x80\x3f", dtype: str = "float32", shape: tuple[int, ...] = (1,)
) -> LayerTensor:
    return LayerTensor(key, dtype, shape, data)


def test_a_source_names_its_layer_and_generator() -> None:
    assert layer_of("network.blocks.0.mixer.global_conv.kernel") == (
        "network.blocks.0.mixer.global_conv",
        "kernel",
    )
    assert layer_of("kernel") is None  # a generator at a checkpoint's root
    assert layer_of("") is None


def test_the_hash_covers_the_generator_and_the_mask() -> None:
    assert covered("kernel.out_linear.weight", "kernel")
    assert covered("mask.std_param", "kernel")
    assert not covered("shortcut", "kernel")
    assert not covered("kernels.0.weight", "kernel")


def test_the_hash_is_independent_of_order_and_sensitive_to_every_field() -> None:
    a, b = tensor("kernel.a"), tensor("mask.b", b"\x01\x02")
    base = layer_hash([a, b])
    assert layer_hash([b, a]) == base
    for changed in (
        [tensor("kernel.c"), b],
        [tensor("kernel.a", b"\x00\x00\x80\x40"), b],
        [tensor("kernel.a", dtype="bfloat16"), b],
        [tensor("kernel.a", shape=(1, 1)), b],
        [a],
        [a, b, tensor("mask.c")],
    ):
        assert layer_hash(changed) != base, changed


@pytest.mark.parametrize("data", [b"", bytearray(b"ab"), memoryview(b"abcd").cast("H")])
def test_any_buffer_is_read_as_its_bytes(data: bytes) -> None:
    assert layer_hash([tensor("kernel.a", bytes(memoryview(data).cast("B")))]) == layer_hash(
        [tensor("kernel.a", data)]
    )


def test_a_compiled_module_s_paths_are_the_plain_module_s() -> None:
    from kernelgen_wire.layers import plain_path

    assert plain_path("_orig_mod.blocks.0.mixer") == "blocks.0.mixer"
    assert plain_path("network._orig_mod.blocks.0._orig_mod.kernel") == "network.blocks.0.kernel"
    assert plain_path("_orig_mod") == ""
    assert plain_path("blocks.my_orig_mod.kernel") == "blocks.my_orig_mod.kernel"  # only the whole name
