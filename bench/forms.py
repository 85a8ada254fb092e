"""The image term's forms on one layer, alone: ``python -m bench.forms [--device cuda]``.

Times (microseconds per call, one thread on the CPU) the term plus its add to the hidden
states, with keys and values prepared as the engine prepares them (keys pre-scaled, values
pre-weighted):

- ``per-head``: ``lib_negip.hijack``'s per-head form (the query's head view by ``as_strided``,
  ``scaled_dot_product_attention``, the heads merged back by views, an add);
- ``block-diagonal``: its block-diagonal form (``bmm`` of the query and the keys [B, inner,
  H*N], the scores seen as [B, H, N, Tq] for a softmax over the slots, the probabilities seen
  as [B, Tq, H*N] for one ``baddbmm`` into the hidden states);
- ``slots-last``: the block-diagonal form of the first engine (softmax over a last dimension
  of N), the record of why the softmax runs over another dimension now.

The formulas are restated here (same calls, same layouts) rather than run through the hijack,
so that one layer's shapes can be swept without a UNet; keep them in step with
``_LayerHooks.image_term`` / ``probabilities``. Shapes: (B rows, Tq queries, inner width,
H heads, N image tokens) of SD1.5's and SDXL's layers, tiny and full size. The last column is
the form ``BLOCK_DIAGONAL = "auto"`` takes on this device.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

SHAPES = [
    (2, 64, 64, 4, 4),  # tiny SDXL, first layer
    (2, 16, 128, 8, 4),  # tiny SDXL, middle block
    (2, 64, 64, 4, 16),  # tiny SDXL, first layer, plus
    (2, 16, 128, 8, 16),  # tiny SDXL, middle block, plus
    (2, 256, 32, 8, 4),  # tiny SD1.5 (bench), first layer
    (2, 1024, 320, 8, 4),  # SD1.5 at a 32x32 latent, first layer, base
    (2, 1024, 320, 8, 16),  # the same, plus
    (2, 4096, 640, 10, 4),  # SDXL level 1 at a 128x128 latent, base
    (2, 1024, 1280, 20, 4),  # SDXL level 2 at a 128x128 latent, base
    (2, 1024, 640, 10, 16),  # SDXL level 1 at a 32x32 latent, plus
    (2, 64, 1280, 20, 16),  # SDXL level 2 at a 32x32 latent, plus
]


def forms(b: int, tq: int, inner: int, h: int, n: int, device: torch.device) -> dict[str, Callable]:
    d = inner // h
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=g, device=device)

    q, hidden = randn(b, tq, inner), randn(b, tq, inner)
    keys, values = randn(b, h, n, d) * d**-0.5, randn(b, h, n, d)
    eye = torch.eye(h, device=device)
    bd_keys = torch.einsum("bhnd,hg->bhdgn", keys, eye).reshape(b, inner, h * n).contiguous()
    bd_values = torch.einsum("bhnd,hg->bhngd", values, eye).reshape(b, h * n, inner).contiguous()
    q_view = ((b, h, tq, d), (tq * inner, d, inner, 1))
    scores_view = ((b, h, n, tq), (tq * h * n, n, 1, h * n))
    probs_view = ((b, tq, h * n), (h * n * tq, 1, tq))

    def per_head() -> torch.Tensor:
        heads = torch.as_strided(q, *q_view)
        out = F.scaled_dot_product_attention(heads, keys, values, scale=1.0)
        return hidden + out.transpose(1, 2).flatten(2)

    def block_diagonal() -> torch.Tensor:
        scores = torch.bmm(q, bd_keys)
        probs = torch.as_strided(scores, *scores_view).softmax(2)
        return torch.baddbmm(hidden, torch.as_strided(probs, *probs_view), bd_values)

    def slots_last() -> torch.Tensor:
        scores = torch.matmul(q, bd_keys)
        probs = scores.unflatten(-1, (h, -1)).softmax(-1).flatten(2)
        return torch.baddbmm(hidden, probs, bd_values)

    reference = per_head()
    for fn in (block_diagonal, slots_last):
        error = (fn() - reference).abs().max().item()
        if error > 1e-4 * max(reference.abs().max().item(), 1.0):
            msg = f"{fn.__name__} differs from per-head by {error}"
            raise AssertionError(msg)
    return {"per-head": per_head, "block-diagonal": block_diagonal, "slots-last": slots_last}


def per_call_us(fn: Callable, device: torch.device, seconds: float = 0.3) -> float:
    for _ in range(5):
        fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    from lib_negip.hijack import use_block_diagonal

    parser = argparse.ArgumentParser(prog="python -m bench.forms", description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = ("per-head", "block-diagonal", "slots-last")
    print("| B, Tq, inner, H, N | H*N | per-head us | block-diagonal us | slots-last us | auto |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for shape in SHAPES:
            timed = {name: per_call_us(fn, device) for name, fn in forms(*shape, device).items()}
            cells = " | ".join(f"{timed[name]:.1f}" for name in names)
            columns = shape[3] * shape[4]
            auto = "block-diagonal" if use_block_diagonal(device, columns) else "per-head"
            print(f"| {', '.join(map(str, shape))} | {columns} | {cells} | {auto} |", flush=True)


if __name__ == "__main__":
    main()
