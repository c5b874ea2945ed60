"""How CUDA tensors reach CuPy, checked without a GPU: a stand-in CuPy whose ``from_dlpack``
names a consumer stream as CuPy does, and a stand-in tensor that refuses the per-thread default
stream as PyTorch does."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from fastxent import _torch_interop as interop  # noqa: E402

PER_THREAD_DEFAULT_STREAM = 2  # what CuPy names in CUPY_CUDA_PER_THREAD_DEFAULT_STREAM=1 mode


class StandInTensor:
    """Exports as a CUDA tensor of PyTorch does: stream 2 refused, every call recorded."""

    def __init__(self):
        self.streams = []

    def __dlpack_device__(self):
        return (2, 0)  # kDLCUDA, device 0

    def __dlpack__(self, *, stream=-1, **kwargs):
        if stream == PER_THREAD_DEFAULT_STREAM:
            raise BufferError("per-thread default stream is not supported")
        self.streams.append(stream)
        return ("capsule", kwargs)


class StandInCupy:
    def __init__(self, consumer_stream):
        self.consumer_stream = consumer_stream

    def from_dlpack(self, array):
        assert array.__dlpack_device__() == (2, 0)
        return array.__dlpack__(stream=self.consumer_stream, max_version=(1, 0))


@pytest.mark.parametrize("consumer_stream", [PER_THREAD_DEFAULT_STREAM, 1, 0x7F00DEADBEEF])
def test_cuda_tensor_import_works_in_every_cupy_stream_mode(monkeypatch, consumer_stream):
    monkeypatch.setattr(interop, "cupy_module", lambda: StandInCupy(consumer_stream))
    tensor = StandInTensor()
    capsule = interop.cupy_view(tensor)
    # No hand-over: CuPy's launches go on PyTorch's current stream, where the tensor was written.
    assert tensor.streams == [-1]
    assert capsule == ("capsule", {"max_version": (1, 0)})  # the other export arguments pass through


def test_the_stand_in_refuses_what_pytorch_refuses():
    with pytest.raises(BufferError, match="per-thread default stream"):
        StandInCupy(PER_THREAD_DEFAULT_STREAM).from_dlpack(StandInTensor())
