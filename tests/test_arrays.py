"""Input validation and interop shared by synthesis, metrics and the loader."""
import numpy as np
import pytest
import torch

from engine import arrays


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), "4-d NHWC"),
    (np.zeros((2, 3, 8, 8), np.uint8), "NCHW given"),
    (np.zeros((2, 8, 8, 4), np.uint8), "3 channels"),
])
def test_check_nhwc_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        arrays.check_nhwc_uint8(bad, "backgrounds")


def test_check_nhwc_accepts_torch_uint8():
    arrays.check_nhwc_uint8(torch.zeros((1, 4, 4, 3), dtype=torch.uint8), "x")


def test_keys_validation():
    np.testing.assert_array_equal(arrays.check_keys([1, 2, 3], 3), [1, 2, 3])
    with pytest.raises(ValueError, match="3 int64 keys"):
        arrays.check_keys([1, 2], 3)
    with pytest.raises(ValueError, match="integers"):
        arrays.check_keys(np.array([0.5, 1.0, 2.0]), 3)


def test_torch_cpu_roundtrip_is_zero_copy():
    t = torch.arange(24, dtype=torch.uint8).reshape(1, 2, 4, 3)
    kind = arrays.kind_of(t)
    a = arrays.to_backend(t, kind)
    assert isinstance(a, np.ndarray) and np.shares_memory(a, t.numpy())
    back = arrays.from_backend(a, kind)
    assert isinstance(back, torch.Tensor) and torch.equal(back, t)


def test_kind_of_rejects_lists():
    with pytest.raises(TypeError, match="numpy array"):
        arrays.kind_of([1, 2, 3])
