"""Image tokens that travel appended to the text conditioning.

Every conditioning row gets the same block appended at its end::

    [ text tokens (whole chunks of 77) | N image-token slots | meta token(s) ]

The meta token carries, per row, the weight of the image term (0 outside that side's step
window), how many of the N slots hold real tokens (sides of different lengths are padded and
masked), which side's tokens the block holds and a fixed check pattern. Because the block
rides inside the conditioning tensors, it follows its rows through every branch of A1111's CFG denoiser (batched or split cond/uncond,
AND prompts, skipped uncond rows, edit models) with no guessing from row positions.

The hijack recognises a context as carrying our block by its length (text contexts are whole
chunks of 77 tokens, possibly after the ControlNet extension's one-token marker, which that
extension strips inside the UNet), then reads the meta tokens on the host once per UNet call
(:func:`read_rows`): that one synchronisation checks the pattern, so that a block another
extension transformed (for example by rescaling the whole conditioning) is reported, not used,
and tells which side and weight each row has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lib_negip.errors import ConditioningError

CHUNK_LENGTH = 77
# Channels of the meta token. The pattern values are small dyadic numbers, exact in
# float16 and bfloat16, so the check needs no tolerance in any dtype.
META_WEIGHT = 0
# The number of real tokens as count // 64 and count % 64: bfloat16 holds integers exactly only
# up to 256 (a full-face image alone has 257 tokens) and float16 up to 2048, both halves up to
# 256 (counts up to 16,447; a side holds at most 16 images of 257 tokens).
META_COUNT = 1
META_PATTERN = slice(2, 6)
# Which side's tokens the block holds (0 positive, 1 negative; -1 unknown), so the attention
# can use keys and values projected once per generation instead of once per layer call.
META_SIDE = 6
META_COUNT_LOW = 7
COUNT_RADIX = 64
PATTERN = (0.75, -1.5, 2.25, -3.0)
MIN_CONTEXT_WIDTH = META_COUNT_LOW + 1

PadMode = Literal["empty_chunks", "repeat_last"]


@dataclass(frozen=True)
class TokenLayout:
    """Shape of the block appended to every row: ``n_tokens`` image slots + ``n_meta`` meta tokens."""

    n_tokens: int
    n_meta: int = 1
    chunk_length: int = CHUNK_LENGTH

    @classmethod
    def for_tokens(cls, n_tokens: int, chunk_length: int = CHUNK_LENGTH) -> TokenLayout:
        # A plain text context is whole chunks, or whole chunks plus the ControlNet extension's
        # one-token marker; a block of certain lengths would make such a context look like
        # ours: more meta tokens avoid those lengths.
        n_meta = 1
        while (n_tokens + n_meta) % chunk_length in (0, 1, chunk_length - 1):
            n_meta += 1
        return cls(n_tokens=n_tokens, n_meta=n_meta, chunk_length=chunk_length)

    @property
    def total(self) -> int:
        return self.n_tokens + self.n_meta

    def carries_block(self, context_length: int) -> bool:
        """Whether a context of this length ends with our block (host-side ints only): its text
        is whole chunks, possibly after the ControlNet extension's one-token marker."""
        text = context_length - self.total
        return text >= self.chunk_length and text % self.chunk_length in (0, 1)


def make_block(
    tokens: torch.Tensor, weight: float, layout: TokenLayout, *, side: int = -1
) -> torch.Tensor:
    """The block one side appends to each of its rows.

    tokens: [n, C] image tokens, n <= layout.n_tokens; returns [1, layout.total, C] in the
    tokens' dtype and device. Slots past n are zeros and masked out by the attention.
    side: the index of these tokens in the ``side_tokens`` the hijack was given (-1: none).
    """
    n, width = tokens.shape
    if n > layout.n_tokens:
        msg = f"{n} image tokens do not fit a layout of {layout.n_tokens} slots."
        raise ValueError(msg)
    if width < MIN_CONTEXT_WIDTH:
        msg = f"Context width {width} is too narrow for the meta token (needs {MIN_CONTEXT_WIDTH})."
        raise ValueError(msg)
    block = tokens.new_zeros(1, layout.total, width)
    block[0, :n] = tokens
    meta = block[0, layout.n_tokens :]
    meta[:, META_WEIGHT] = weight
    meta[:, META_COUNT] = n // COUNT_RADIX
    meta[:, META_COUNT_LOW] = n % COUNT_RADIX
    meta[:, META_PATTERN] = torch.tensor(PATTERN, dtype=tokens.dtype, device=tokens.device)
    meta[:, META_SIDE] = side
    return block


def _crossattn(cond: Any) -> torch.Tensor:
    return cond["crossattn"] if isinstance(cond, Mapping) else cond


def _with_crossattn(cond: Any, tensor: torch.Tensor) -> Any:
    if isinstance(cond, Mapping):
        # SDXL conditioning is A1111's DictWithShape: rebuild the same type, never a plain dict,
        # because A1111 reads `.shape` of what the callback leaves.
        return type(cond)({**cond, "crossattn": tensor})
    return tensor


def pad_text_to_same_length(
    cond: torch.Tensor, uncond: torch.Tensor, mode: PadMode, empty: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the shorter text conditioning the way A1111 would after the callback.

    ``empty_chunks`` (A1111's "Pad prompt/negative prompt"): append whole chunks of the empty
    prompt's encoding ``empty`` [1, 77, C] to the shorter side. ``repeat_last`` (the "v0"
    option): repeat the uncond's last token, or cut the uncond to the cond's length.
    """
    if cond.shape[1] == uncond.shape[1]:
        return cond, uncond
    if mode == "repeat_last":
        missing = cond.shape[1] - uncond.shape[1]
        if missing > 0:
            return cond, torch.cat([uncond, uncond[:, -1:].expand(-1, missing, -1)], dim=1)
        return cond, uncond[:, : cond.shape[1]]
    if empty is None:
        msg = "Padding with empty chunks needs the empty prompt's conditioning."
        raise ValueError(msg)
    empty = empty.to(cond.device, cond.dtype)
    repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]

    def padded(text: torch.Tensor, chunks: int) -> torch.Tensor:
        return torch.cat([text, empty.expand(text.shape[0], -1, -1).repeat(1, chunks, 1)], dim=1)

    if repeats > 0:
        return cond, padded(uncond, repeats)
    if repeats < 0:
        return padded(cond, -repeats), uncond
    return cond, uncond


def append_blocks(
    text_cond: Any,
    text_uncond: Any,
    cond_block: torch.Tensor,
    uncond_block: torch.Tensor,
    *,
    pad: PadMode | None = None,
    empty: torch.Tensor | None = None,
) -> tuple[Any, Any]:
    """Append the image blocks to every cond and uncond row (the one call the A1111 glue makes).

    text_cond / text_uncond: [R, T, C] tensors, or mappings with a ``crossattn`` entry (SDXL).
    cond_block / uncond_block: [1, M, C] from :func:`make_block`, the same M on both sides.
    pad: when A1111 would pad cond and uncond to the same length after the callback, pad here
    first, so that the image tokens stay last.
    """
    if cond_block.shape[1] != uncond_block.shape[1]:
        msg = f"cond block has {cond_block.shape[1]} tokens, uncond block {uncond_block.shape[1]}"
        raise ValueError(msg)
    cond, uncond = _crossattn(text_cond), _crossattn(text_uncond)
    if pad is not None:
        cond, uncond = pad_text_to_same_length(cond, uncond, pad, empty)

    def appended(text: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        block = block.to(device=text.device, dtype=text.dtype)
        return torch.cat([text, block.expand(text.shape[0], -1, -1)], dim=1)

    return (
        _with_crossattn(text_cond, appended(cond, cond_block)),
        _with_crossattn(text_uncond, appended(uncond, uncond_block)),
    )


@dataclass(frozen=True)
class BlockRow:
    """What one row's meta token says: which side's tokens its block holds (see
    :func:`make_block`), the weight of its image term and how many slots hold real tokens."""

    side: int
    weight: float
    count: int


def read_rows(context: torch.Tensor, layout: TokenLayout) -> tuple[BlockRow, ...]:
    """Each row's :class:`BlockRow`, read from the meta tokens of a context that
    :meth:`TokenLayout.carries_block` accepted; raise :class:`ConditioningError` if the meta
    tokens are not ours any more.

    This copies the meta tokens' first channels to the host (one synchronisation): call it once
    per UNet call, not per layer. The rows then select keys and values on the host, so the
    attention needs no device gather and no synchronisation of its own.
    """
    meta = context[:, -layout.n_meta :, :MIN_CONTEXT_WIDTH].tolist()  # [B][n_meta][8], on the host
    pattern = list(PATTERN)
    if not all(token[META_PATTERN] == pattern for row in meta for token in row):
        msg = (
            "The image-prompt tokens appended to the conditioning were changed before they reached "
            "the UNet, most likely by another extension that rescales or edits the conditioning "
            "in its own on_cfg_denoiser callback. Disable that extension's effect for this "
            "generation or disable Negative Image Prompt."
        )
        raise ConditioningError(msg)
    return tuple(
        BlockRow(
            side=int(row[0][META_SIDE]),
            weight=row[0][META_WEIGHT],
            count=int(row[0][META_COUNT]) * COUNT_RADIX + int(row[0][META_COUNT_LOW]),
        )
        for row in meta
    )
