"""Device and dtypes as A1111 exposes them; the tests run on the CPU in float32."""

import torch

cpu = torch.device("cpu")
device = torch.device("cpu")
dtype = torch.float32
dtype_unet = torch.float32
gc_calls = 0


def torch_gc() -> None:
    global gc_calls
    gc_calls += 1
