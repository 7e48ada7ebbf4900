"""Hot loops of the project, each with a Triton kernel for CUDA and a plain-torch path for everywhere else."""

import functools

import torch

# Plan for this GPU instead of the current device: (compute capability as 80 / 90 / ..., max shared memory per block
# in bytes). triton_ops/compile_check.py sets it (tests too) to check the named targets without owning them.
GPU_TARGET = None


def gpu_limits(device):
    """(compute capability major * 10 + minor, max dynamic shared memory per block) of a CUDA device."""
    if GPU_TARGET is not None:
        return GPU_TARGET
    return _device_limits(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_limits(index):  # asked on every call in `auto`: once per device is enough
    import triton

    major, minor = torch.cuda.get_device_capability(index)
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return major * 10 + minor, props["max_shared_mem"]
