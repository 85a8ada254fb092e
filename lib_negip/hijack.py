"""Decoupled cross-attention on an ldm/sgm UNet, installed as removable module hooks and calls.

For every ``attn2`` module the hijack adds ``weight * attention(q, to_k_ip(img), to_v_ip(img))``
to the text attention, before the output projection, exactly as IP-Adapter defines it. It does
not replace the attention's ``forward``: A1111 swaps ``CrossAttention.forward`` on the class for
the chosen optimisation (sdp, xformers, InvokeAI, sub-quadratic, ...) and other extensions
replace it per instance; our calls run around the attention's two projections, whatever
forward is current.

Where the work happens:

- **Once per UNet call** (a forward pre-hook on the UNet): a context that carries our block (see
  :mod:`lib_negip.conditioning`) is recognised by its length, its meta tokens are read on the
  host (the one synchronisation per call, which also checks them), and the UNet receives the
  text part only. Every ``attn2`` therefore sees exactly the context it would see without us,
  so the text attention is the host's own, untouched (weight 0 is bit-exact), and other
  extensions that read the context inside the attention see plain text.
- **Per layer, prepared once per generation**: each side's image keys and values, projected
  from the side's tokens; per row layout and weights (cached per distinct row layout), the
  keys pre-scaled by ``1/sqrt(d)`` and the values by the row's weight times the layer's block
  weight; per latent size, each side's mask at the layer's grid.
- **Per ``attn2`` call**: two calls of ours. After ``to_q``, one keeps the host's own query;
  before ``to_out[0]``, the other adds the image term to its input in five torch calls (no
  second query or output projection), in one of two forms chosen per layer and device
  (:func:`use_block_diagonal`). They are set as the instance ``forward`` of the two
  projections, which calls the class's (:class:`InstanceForward`: a module hook costs more
  than its work on a host-bound step), or registered as a forward hook and a forward pre-hook
  on a projection that already has an instance ``forward`` of another extension's.

An attention implementation that does not call ``to_q`` / ``to_out[0]`` as modules is found in
the first UNet call after installation, where every layer also has a forward hook that adds the
term after the output projection if the fast path did not; layers that took the fast path lose
that hook after the call. A UNet call that carried our block and reached no layer at all is an
error (the image prompts would silently not act): see :class:`UnreachedError`.
"""

from __future__ import annotations

import functools
import math
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_negip import logger
from lib_negip.conditioning import BlockRow, TokenLayout, read_rows
from lib_negip.errors import ConditioningError, IncompatibleModelError, UnreachedError
from lib_negip.unet_layers import CrossAttentionLayer, adapter_key, cross_attention_layers

#: Sides of the image prompt: the index a block's meta token names (see ``make_block``).
POSITIVE, NEGATIVE = 0, 1


def strided_query_ok(device: torch.device) -> bool:
    """Whether SDPA may take the query's heads as a strided view of ``to_q``'s output. Not on
    MPS: A1111 copies q, k and v to contiguous tensors before its attentions there, and torch's
    MPS SDPA has had bugs with permuted inputs (fixed in later versions than A1111 ships)."""
    return device.type != "mps"


def _autocast_state_reader() -> Callable[[str], bool]:
    """``torch.is_autocast_enabled(device_type)`` (torch 2.4+), or its older per-device
    functions (torch 2.1-2.3 take no device type), chosen once."""
    try:
        torch.is_autocast_enabled("cpu")
    except TypeError:
        older = {"cuda": torch.is_autocast_enabled, "cpu": torch.is_autocast_cpu_enabled}
        return lambda device_type: older[device_type]()
    return torch.is_autocast_enabled


_autocast_state = _autocast_state_reader()


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (A1111 samples under CUDA autocast in half
    precision; MPS and others use its manual casts, not autocast)."""
    if device_type not in ("cuda", "cpu"):
        return False
    return bool(_autocast_state(device_type))


class KeyValueWeights:
    """One adapter layer's ``to_k_ip``/``to_v_ip`` fused into one weight [2*inner, C].

    The copies cast to a device and dtype are kept, so a cached adapter is moved to the GPU
    once, not per generation, and lowvram/medvram block moves cost nothing here.
    """

    def __init__(self, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor) -> None:
        if to_k_ip.shape != to_v_ip.shape:
            msg = f"to_k_ip {list(to_k_ip.shape)} and to_v_ip {list(to_v_ip.shape)} differ"
            raise ValueError(msg)
        self.shape = tuple(to_k_ip.shape)  # [inner, C]
        self.inner_dim = to_k_ip.shape[0]
        self._weight = torch.cat([to_k_ip.detach(), to_v_ip.detach()])
        self._cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def release_device_copies(self) -> None:
        self._cast.clear()

    def project(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image: [..., N, C] -> keys, values [..., N, inner]."""
        key = (image.device, image.dtype)
        weight = self._cast.get(key)
        if weight is None:
            weight = self._cast[key] = self._weight.to(device=image.device, dtype=image.dtype)
        return F.linear(image, weight).split(self.inner_dim, dim=-1)


def layer_grid(latent: tuple[int, int], tokens: int) -> tuple[int, int]:
    """(h, w) of a layer's query grid with ``tokens`` positions, for a latent of size ``latent``.

    The UNet halves the grid per level with stride-2 convolutions (padding 1), so odd sizes
    round up: 75 -> 38 -> 19. A grid that is no halving of the latent (Deep Shrink scales the
    hidden states by a factor of its own; an unknown UNet) is the pair of factors of ``tokens``
    nearest the latent's aspect ratio (diffusers' mask downsampling also goes by the aspect).
    """
    h, w = latent
    while h * w > tokens and (h > 1 or w > 1):
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w == tokens:
        return h, w
    aspect = latent[1] / latent[0]
    pairs = []
    for d in range(1, math.isqrt(tokens) + 1):
        if tokens % d == 0:
            pairs += [(d, tokens // d), (tokens // d, d)]
    return min(pairs, key=lambda hw: abs(math.log(hw[1] / hw[0] / aspect)))


def mask_at_latent(mask: torch.Tensor, latent: tuple[int, int]) -> torch.Tensor:
    """A side's mask [h, w] stretched over the latent [H, W]: an antialiased (area-weighted)
    resize, so a large mask keeps thin regions that plain interpolation would skip."""
    if tuple(mask.shape) == latent:
        return mask
    antialias = mask.shape[0] > latent[0] or mask.shape[1] > latent[1]
    resized = F.interpolate(
        mask[None, None], size=latent, mode="bilinear", align_corners=False, antialias=antialias
    )
    return resized[0, 0]


def mask_at_grid(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A mask at the latent's resolution [H, W] (values 0..1) at a layer's grid, flattened:
    [h_l * w_l].

    Bicubic without antialiasing, as diffusers' ``IPAdapterMaskProcessor.downsample`` does,
    then clamped to 0..1 (bicubic overshoots at sharp edges).
    """
    if tuple(mask.shape) != grid:
        mask = F.interpolate(mask[None, None], size=grid, mode="bicubic", align_corners=False)[0, 0]
    return mask.clamp(0.0, 1.0).flatten()


@dataclass
class _Entry:
    """What one layer adds for one row layout, in one of two forms.

    Per head (``block_diagonal`` False), through ``F.scaled_dot_product_attention``: keys
    [B, H, N, d] pre-scaled by 1/sqrt(d), values [B, H, N, d] pre-scaled by each row's weight, an
    optional additive key bias [B, 1, 1, N] (slots a row does not fill), the query's
    [B, H, Tq, d] view of its [B, Tq, inner] storage (``q_view``: sizes and strides, one call
    instead of a split and a transpose). Fused attention kernels on every device, and the
    fewest multiply-adds: the choice on GPUs, and on the CPU where H*N is large.

    Block-diagonal (``block_diagonal`` True): the heads laid side by side, keys [B, inner, H*N]
    (head h's keys in head h's channels, zeros elsewhere) and values [B, H*N, inner], so that
    one ``bmm`` gives every head's scores [B, Tq, H*N] and one ``baddbmm`` adds every head's
    term to the hidden states, at H times the multiply-adds and memory of the per-head form.
    The softmax runs over the scores seen as [B, H, N, Tq] (``scores_view``): a softmax over a
    last dimension of N = 4 or 16 pays a fixed cost per row of 4 values on the CPU, about ten
    times what the same softmax costs with the Tq queries innermost. The softmax's output is
    that [B, H, N, Tq] tensor, contiguous; ``probs_view`` sees it as [B, Tq, H*N] for the
    ``baddbmm``. Bias [B, 1, H*N], given to the first ``baddbmm``.

    ``mask``: [B, Tq, 1], multiplies each row's term per query. ``cast_q`` / ``cast_out``: the
    dtype the query is cast to (upcast) and the one the term is returned in, where they differ
    from the query's and the hidden states'.
    """

    keys: torch.Tensor
    values: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor | None
    tokens: int  # the query count Tq the views and the mask were made for
    block_diagonal: bool = False
    q_view: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    contiguous_heads: bool = False  # the query's heads copied out first (MPS)
    scores_view: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    probs_view: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    cast_q: torch.dtype | None = None
    cast_out: torch.dtype | None = None


#: The form of the image term: "auto" chooses per layer (:func:`use_block_diagonal`), "never"
#: is always per head, "always" always block-diagonal (tests and the benchmark compare them).
BLOCK_DIAGONAL = "auto"

#: "auto" takes the block-diagonal form on the CPU where a layer has at most this many image
#: key columns (heads x image tokens): the base adapters everywhere, the plus adapters only on
#: small layers. Measured with ``python -m bench.forms`` (one thread): at H*N <= 64 the
#: block-diagonal form takes 0.3-0.9 of the per-head form's time (tiny layers: 15 us against
#: 41; SD1.5 base at a 32x32 latent: 0.85 ms against 2.5); at H*N = 80-320 (SDXL's 1280-wide
#: layers, the plus adapters) the per-head form is as fast or up to 4 times faster.
CPU_BLOCK_DIAGONAL_COLUMNS = 64


def use_block_diagonal(device: torch.device, columns: int) -> bool:
    """Whether a layer with ``columns`` = heads x image tokens takes the block-diagonal form.

    On a GPU the step is bound by the host's calls, the same count in both forms (five per
    layer), and the per-head form keeps H times less memory per row (SDXL plus at batch 8 in
    fp16: about 65 MB against 1.3 GB), so "auto" is per head there. On the CPU the kernels
    count, and where a layer has few key columns the block-diagonal form is faster (see
    :data:`CPU_BLOCK_DIAGONAL_COLUMNS`).
    """
    if BLOCK_DIAGONAL == "always":
        return True
    if BLOCK_DIAGONAL == "never":
        return False
    return device.type == "cpu" and columns <= CPU_BLOCK_DIAGONAL_COLUMNS


_SKIP = object()  # every row of this layer has weight 0 in this layout: nothing to add


class _Plan:
    """Everything the layers need for one row layout (and latent size), built lazily per layer
    at its first call and reused by every later UNet call with the same layout."""

    def __init__(
        self,
        rows: tuple[BlockRow, ...],
        latent: tuple[int, int],
        image: torch.Tensor | None,
        n_layers: int,
    ) -> None:
        self.rows = rows
        self.latent = latent
        self.image = image  # [B, N, C] the context's image slots, only for rows of no known side
        self.entries: list[Any] = [None] * n_layers
        self.masks: dict[int, torch.Tensor] = {}  # side -> its mask at the latent's size


class _LayerHooks:
    """The hooks of one ``attn2`` module."""

    def __init__(
        self,
        hijack: AttentionHijack,
        index: int,
        layer: CrossAttentionLayer,
        kv: KeyValueWeights,
        scales: tuple[float, float],
    ) -> None:
        self.hijack = hijack
        self.index = index
        self.module = layer.module
        self.name = layer.name
        self.heads = int(layer.module.heads)
        self.kv = kv
        self.scales = scales  # block weight of the positive and the negative side
        self.q: torch.Tensor | None = None
        self.added_serial = 0  # the hijack's serial of the last UNet call this layer added in
        self.handles: list[RemovableHandle | InstanceForward] = []
        self.fallback: RemovableHandle | None = None
        self.needs_fallback = False
        # Keys and values [S, 2, H, N, d] of the hijack's side tokens per (device, dtype).
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def install(self, probe: bool) -> None:
        to_q, to_out = self.module.to_q, self.module.to_out[0]
        self.handles = [
            _call_after(to_q, self.capture_query) or to_q.register_forward_hook(self.capture_query),
            _call_before(to_out, self.add_image_term)
            or to_out.register_forward_pre_hook(self.add_image_term),
        ]
        if probe or self.needs_fallback:
            self.fallback = self.module.register_forward_hook(
                self.after_attention, with_kwargs=True
            )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.drop_fallback()
        self.q = None

    def drop_fallback(self) -> None:
        if self.fallback is not None:
            self.fallback.remove()
            self.fallback = None

    # -- per call -------------------------------------------------------------------------
    def capture_query(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.hijack.plan is not None:
            self.q = output

    def add_image_term(self, module: nn.Module, args: tuple) -> Any:
        q = self.q
        if q is None:
            return None
        self.q = None
        if self.hijack.upcast and _autocast_on(q.device.type):
            # "Upcast cross attention" asks for float32, which the autocast A1111 samples
            # under would turn back into half precision in the projections and SDPA.
            with torch.autocast(q.device.type, enabled=False):
                return self._add_image_term(q, args)
        return self._add_image_term(q, args)

    def _add_image_term(self, q: torch.Tensor, args: tuple) -> Any:
        plan = self.hijack.plan
        hidden = args[0]  # [B, Tq, inner], heads merged
        entry = self._entry_for(plan, q, hidden)
        self.added_serial = self.hijack.serial
        self.hijack.added += 1
        if entry is _SKIP:
            return None
        if entry.block_diagonal and entry.cast_q is None and entry.cast_out is None:
            added = torch.baddbmm(hidden, self.probabilities(entry, q), entry.values)
        else:
            added = hidden + self.image_term(entry, q)
        return (added, *args[1:])

    def _entry_for(self, plan: Any, q: torch.Tensor, hidden: torch.Tensor | None) -> Any:
        """The layer's entry for ``plan``: built at the layer's first call, and again where its
        number of queries changed. An extension that resizes the hidden states inside the UNet
        for some steps (Kohya's Deep Shrink, Forge's "Kohya HRFix Integrated") gives a layer
        fewer queries in those steps, and the views and the mask are made per query count."""
        entry = plan.entries[self.index]
        if entry is None or (entry is not _SKIP and entry.tokens != q.shape[1]):
            entry = plan.entries[self.index] = self.hijack.entry(self, plan, q, hidden)
        return entry

    def probabilities(self, entry: _Entry, q: torch.Tensor) -> torch.Tensor:
        """Block-diagonal form: every head's attention probabilities [B, Tq, H*N] (masked).

        The scores [B, Tq, H*N] are seen as [B, H, N, Tq] for the softmax (over N), whose
        contiguous output is seen as [B, Tq, H*N] again: four calls, five with a mask.
        """
        if entry.bias is None:
            scores = torch.bmm(q, entry.keys)
        else:
            scores = torch.baddbmm(entry.bias, q, entry.keys)
        probs = torch.as_strided(scores, *entry.scores_view).softmax(2)
        probs = torch.as_strided(probs, *entry.probs_view)
        return probs if entry.mask is None else probs * entry.mask

    def image_term(self, entry: _Entry, q: torch.Tensor) -> torch.Tensor:
        """sum over slots of softmax(q k / sqrt(d)) (weight * v), per head: [B, Tq, inner].

        Per-head form: four torch calls (the query's head view, the fused attention, the
        heads merged back by a transpose and a flatten that are views of its output), one more
        for a mask; the caller's add makes five.
        """
        if entry.cast_q is not None:
            q = q.to(entry.cast_q)
        if entry.block_diagonal:
            term = torch.bmm(self.probabilities(entry, q), entry.values)  # masked in there
            return term if entry.cast_out is None else term.to(entry.cast_out)
        if entry.q_view is not None:
            heads = torch.as_strided(q, *entry.q_view)  # [B, H, Tq, d]
        else:
            heads = q.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            if entry.contiguous_heads:
                heads = heads.contiguous()
        out = F.scaled_dot_product_attention(
            heads, entry.keys, entry.values, attn_mask=entry.bias, scale=1.0
        )
        term = out.transpose(1, 2).flatten(2)  # [B, Tq, inner]
        if entry.mask is not None:
            term = term * entry.mask
        return term if entry.cast_out is None else term.to(entry.cast_out)

    def after_attention(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """The safety net of the first call after installation (and of layers that need it):
        the installed attention did not go through ``to_q`` / ``to_out[0]`` as modules, so the
        term is added after the output projection (``to_out[0]`` is linear, its bias already
        applied)."""
        plan = self.hijack.plan
        if plan is None or self.added_serial == self.hijack.serial:
            self.q = None
            return None
        self.needs_fallback = True
        q = self.q if self.q is not None else module.to_q(args[0] if args else kwargs["x"])
        self.q = None
        if self.hijack.upcast and _autocast_on(q.device.type):  # see add_image_term
            with torch.autocast(q.device.type, enabled=False):
                term = self._term_after_attention(plan, q)
        else:
            term = self._term_after_attention(plan, q)
        if term is None:
            return None
        projected = F.linear(term, module.to_out[0].weight.to(term.dtype))
        return output + projected.to(output.dtype)

    def _term_after_attention(self, plan: Any, q: torch.Tensor) -> torch.Tensor | None:
        entry = self._entry_for(plan, q, None)
        self.added_serial = self.hijack.serial
        self.hijack.added += 1
        if entry is _SKIP:
            return None
        return self.image_term(entry, q)

    # -- prepared once --------------------------------------------------------------------
    def side_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Keys and values [S, 2, H, N, d] of the hijack's side tokens, in ``dtype``."""
        table = self._tables.get((device, dtype))
        if table is None:
            tokens = self.hijack.side_token_table(device, dtype)  # [S, N, C]
            table = self._split_heads(tokens)
            self._tables[(device, dtype)] = table
        return table

    def _split_heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """[R, N, C] tokens -> their keys and values [R, 2, H, N, d]."""
        rows, n, _ = tokens.shape
        projected = torch.cat(self.kv.project(tokens), dim=-1)  # [R, N, 2*inner]
        return projected.view(rows, n, 2, self.heads, -1).permute(0, 2, 3, 1, 4)


class InstanceForward:
    """Our call around one submodule's own ``forward``, set on the instance; removable like a
    hook's handle.

    A module with any hook goes through the slow half of ``nn.Module.__call__`` (its hook loops,
    its backward-hook checks), which costs more than the work of the hook itself on a host-bound
    step: measured over whole tiny SDXL steps (70 ``attn2``, CPU, one thread), two empty hooks
    per layer added 12.5-22.4 us per layer, the same two calls as instance ``forward``s 1.4-8.1.
    So the per-layer calls are set as the ``forward`` of ``to_q`` and ``to_out[0]``, which call
    the class's ``forward`` looked up at every call (A1111's LoRA and manual-cast patches of
    ``nn.Linear.forward`` still apply) and run the module's own hooks, if another extension has
    any, around it as before.

    Only where the module has no ``forward`` of its own (:func:`_call_after`,
    :func:`_call_before`): another extension's instance ``forward`` below ours could not be
    taken off before ours without leaving its effect in place, so such a module gets a hook.
    :meth:`remove` takes ours off when it is still the module's ``forward``; when another one
    was set over it meanwhile, ours stays in its chain as a plain pass-through (taking it out
    would drop theirs), and the next installation on that module clears it once theirs is gone.
    """

    def __init__(self, module: nn.Module, body: Callable[..., Any]) -> None:
        self.active = True
        self.forward = types.MethodType(body, module)
        self._module = weakref.ref(module)
        body.negip_forward = self  # type: ignore[attr-defined]  # see _free_for_instance_forward
        module.forward = self.forward

    def remove(self) -> None:
        module = self._module()
        self.active = False
        if module is not None and vars(module).get("forward") is self.forward:
            del module.forward


#: False: the per-layer calls are module hooks everywhere (the benchmark compares the two).
INSTANCE_FORWARDS = True


def _free_for_instance_forward(module: nn.Module) -> bool:
    """Whether ``module`` has no instance ``forward`` (clearing an inactive one of ours)."""
    if not INSTANCE_FORWARDS:
        return False
    current = vars(module).get("forward")
    if current is None:
        return True
    ours = getattr(getattr(current, "__func__", None), "negip_forward", None)
    if ours is not None and not ours.active and ours.forward is current:
        del module.forward
        return True
    return False


def _call_after(
    module: nn.Module, after: Callable[[nn.Module, tuple, Any], None]
) -> InstanceForward | None:
    """``after(module, args, output)`` after each call of ``module``, as a forward hook would be
    called; None where the module already has an instance ``forward`` (use a hook there)."""
    if not _free_for_instance_forward(module):
        return None
    handle: InstanceForward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = type(self).forward(self, *args, **kwargs)
        if handle.active:
            after(self, args, output)
        return output

    handle = InstanceForward(module, forward)
    return handle


def _call_before(
    module: nn.Module, before: Callable[[nn.Module, tuple], tuple | None]
) -> InstanceForward | None:
    """``before(module, args)`` before each call of ``module``, its result (if not None) the
    call's arguments, as a forward pre-hook; None where the module already has an instance
    ``forward`` (use a hook there)."""
    if not _free_for_instance_forward(module):
        return None
    handle: InstanceForward

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if handle.active:
            changed = before(self, args)
            if changed is not None:
                args = changed
        return type(self).forward(self, *args, **kwargs)

    handle = InstanceForward(module, forward)
    return handle


# The hijack currently installed on each UNet: never two at once.
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, AttentionHijack] = weakref.WeakKeyDictionary()


class AttentionHijack:
    """IP-Adapter's decoupled cross-attention on every ``attn2`` module of one UNet.

    unet: the ldm/sgm ``UNetModel`` (A1111's ``sd_model.model.diffusion_model``).
    layers: the adapter's per-layer weights in adapter order, as :class:`KeyValueWeights` or
    ``(to_k_ip, to_v_ip)`` pairs [inner, C].
    layout: how the image tokens are appended to the conditioning of this generation.
    side_tokens: the image tokens [n_s, C] that blocks made with ``make_block(..., side=s)``
    hold; their keys and values are projected once per generation. Blocks of another side
    (-1) have their own tokens projected in every call.
    layer_scales: per adapter layer, the block weight of the positive and of the negative side
    (multiplying the row weights); layers where both are 0 get no hooks at all.
    masks: per side, an optional mask [h, w] with values 0..1 that multiplies the side's image
    attention, stretched over the latent (see :func:`mask_at_latent`, :func:`mask_at_grid`).
    upcast: compute the image attention in float32 (A1111's "upcast cross attention" option).
    on_abort: called after the hijack removed itself because an exception went through the UNet
    (A1111 then skips postprocess): the owner ends the generation.
    raise_as: turns the errors this hijack raises from the UNet (a transformed block, image
    prompts that reached no layer) into the exception to raise (the host's HTTP 422 error).
    """

    def __init__(
        self,
        unet: nn.Module,
        layers: Sequence[KeyValueWeights | tuple[torch.Tensor, torch.Tensor]],
        layout: TokenLayout,
        *,
        side_tokens: Sequence[torch.Tensor] = (),
        layer_scales: Sequence[tuple[float, float]] | None = None,
        masks: Sequence[torch.Tensor | None] = (),
        upcast: bool = False,
        on_abort: Callable[[], None] | None = None,
        raise_as: Callable[[BaseException], BaseException] | None = None,
    ) -> None:
        self.unet = unet
        self.layout = layout
        self.upcast = upcast
        self.on_abort = on_abort
        self.raise_as = raise_as
        weights = [w if isinstance(w, KeyValueWeights) else KeyValueWeights(*w) for w in layers]
        targets = cross_attention_layers(unet)
        check_layers_fit(targets, weights)
        if layer_scales is None:
            layer_scales = [(1.0, 1.0)] * len(targets)
        if len(layer_scales) != len(targets):
            msg = f"{len(layer_scales)} layer scales for {len(targets)} cross-attention layers"
            raise ValueError(msg)
        self.context_dim = targets[0].context_dim
        self._all_layers = [
            _LayerHooks(self, index, target, kv, (float(scales[0]), float(scales[1])))
            for index, (target, kv, scales) in enumerate(
                zip(targets, weights, layer_scales, strict=True)
            )
        ]
        # A layer at block weight 0 on both sides does no work at all: no hooks.
        self._layers = [layer for layer in self._all_layers if layer.scales != (0.0, 0.0)]
        self._side_tokens = [tokens.detach() for tokens in side_tokens]
        self._side_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._plans: dict[tuple, _Plan] = {}
        self._masks: tuple[torch.Tensor | None, ...] = ()
        self.set_masks(masks)
        self._unet_before: RemovableHandle | None = None
        self._unet_after: RemovableHandle | None = None
        self._probing = True
        self.plan: _Plan | None = None  # the current UNet call's, while it runs
        self.serial = 0  # counts the UNet calls that carried the block
        self.added = 0  # layers that added (or skipped at weight 0) the term in this call
        self._expecting = False
        self._latent: tuple[int, int] | None = None  # the sampler's latent size (expect_block)
        self._misses = 0
        self.carried = 0  # UNet calls whose context carried our block
        self._warned_partial = False

    @property
    def installed(self) -> bool:
        return self._unet_before is not None

    def set_masks(self, masks: Sequence[torch.Tensor | None]) -> None:
        """Per side, a mask [h, w] (values 0..1) or None. An all-white mask is no mask."""
        checked = []
        for mask in masks:
            if mask is not None:
                mask = mask.detach().float()
                if mask.dim() != 2:
                    msg = f"a mask must be [h, w], got {list(mask.shape)}"
                    raise ValueError(msg)
                if bool((mask >= 1.0).all()):
                    mask = None
            checked.append(mask)
        self._masks = tuple(checked)
        self._masked = any(mask is not None for mask in checked)
        self._plans.clear()

    def install(self) -> None:
        """Add the hooks; a second call is a no-op. Replaces another hijack of the same UNet
        (one left over by a generation that failed before removing it)."""
        if self.installed:
            return
        previous = _INSTALLED.get(self.unet)
        if previous is not None and previous is not self:
            logger.warning("removing a leftover image-prompt hijack from the UNet")
            previous.remove()
        _INSTALLED[self.unet] = self
        for layer in self._layers:
            layer.install(self._probing)
        self._unet_before = self.unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)
        try:  # also called when the forward raises (torch 2.1+)
            self._unet_after = self.unet.register_forward_hook(self._after_unet, always_call=True)
        except TypeError:  # an older torch: an exception leaves the hooks to the next process
            self._unet_after = self.unet.register_forward_hook(self._after_unet)
        logger.debug(
            "hijacked %d of %d cross-attention layers", len(self._layers), len(self._all_layers)
        )

    def remove(self) -> None:
        """Remove every hook; the modules are exactly as before :meth:`install`. Idempotent."""
        for layer in self._layers:
            layer.remove()
        for handle in (self._unet_before, self._unet_after):
            if handle is not None:
                handle.remove()
        self._unet_before = self._unet_after = None
        self._expecting = False
        if _INSTALLED.get(self.unet) is self:
            del _INSTALLED[self.unet]
        self.plan = None

    def expect_block(self, latent: tuple[int, int] | None = None) -> None:
        """The conditioning of the coming UNet calls carries our block (the owner appended it),
        until :meth:`remove`.

        A UNet call without it then raises :class:`UnreachedError`: after a call that carried
        it, another extension runs the UNet with a conditioning of its own; before, the host
        feeds the UNet another conditioning than the one the callback changed (one such call
        is tolerated: another extension's own pass before the sampler's).

        latent: the size of the latent the sampler denoises, where known. With a mask, a UNet
        call on a latent of another size samples a piece of the picture (Tiled Diffusion's
        tiles), where the mask cannot be placed: that call raises too.
        """
        self._expecting = True
        self._latent = latent

    # -- per UNet call ------------------------------------------------------------------------
    def _before_unet(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        self.plan = None
        positional = "context" not in kwargs
        context = args[2] if positional and len(args) > 2 else kwargs.get("context")
        if not isinstance(context, torch.Tensor):
            return None
        shape = context.shape
        if len(shape) != 3 or shape[2] != self.context_dim:
            return None
        length = shape[1]
        if not self.layout.carries_block(length):
            return None
        try:
            rows = read_rows(context, self.layout)
        except ConditioningError as error:
            # The generation fails here and A1111 skips postprocess: leave nothing behind.
            self._abort()
            raise self._raised(error) from error
        x = args[0] if args else kwargs["x"]
        latent = tuple(x.shape[-2:])
        if self._masked and self._latent is not None and latent != self._latent:
            height, width = self._latent
            raise self._refused(
                f"A mask is set, but the UNet samples a {latent[1] * 8}x{latent[0] * 8} piece of "
                f"the {width * 8}x{height * 8} picture at a time (an extension that samples in "
                "tiles, such as Tiled Diffusion), and the mask cannot be placed on a piece: it "
                "would act in the wrong places. Remove the mask, or switch the tiling off."
            )
        self.plan = self._plan_for(rows, latent, context)
        self.serial += 1
        self.added = 0
        text = context[:, : length - self.layout.total].contiguous()
        if positional:
            return (*args[:2], text, *args[3:]), kwargs
        return args, {**kwargs, "context": text}

    def _plan_for(
        self, rows: tuple[BlockRow, ...], latent: tuple[int, int], context: torch.Tensor
    ) -> _Plan:
        known = all(0 <= row.side < len(self._side_tokens) for row in rows)
        if not known:  # rows that carry their own tokens: projected in this call
            start = context.shape[1] - self.layout.total
            image = context[:, start : start + self.layout.n_tokens]
            return _Plan(rows, latent, image, len(self._all_layers))
        key = (rows, latent, context.device, context.dtype)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= 16:  # a handful of row layouts and sizes per generation
                self._plans.clear()
            plan = self._plans[key] = _Plan(rows, latent, None, len(self._all_layers))
        return plan

    def _after_unet(self, module: nn.Module, args: tuple, output: Any) -> None:
        plan, self.plan = self.plan, None
        if output is None:  # the forward raised (torch calls always_call hooks without output)
            self._abort()
            return
        if plan is None:
            # The hooks are on the UNet only in steps whose conditioning carries the block, and
            # every UNet call of such a step carries it (the host's cond and uncond, in one call
            # or several). Before the sampler's first call one call without it is tolerated
            # (another extension's own pass); after it, a call without it is another
            # extension's own conditioning (Tiled Diffusion's region prompts), and the part of
            # the image it makes would come without the image prompts.
            if not self._expecting:  # the owner did not say the conditioning carries it
                return
            if self.carried:
                raise self._refused(
                    "The image prompts act in the sampler's UNet calls, but another extension "
                    "also calls the UNet with a conditioning of its own, without them (as "
                    "Tiled Diffusion's region prompts do), so that part of the image would be "
                    "made without the image prompts. Switch the other extension's own prompts "
                    "off, or Negative Image Prompt for this generation."
                )
            self._misses += 1
            if self._misses >= 2:
                raise self._refused(
                    "The image prompts were added to the conditioning, but the UNet was called "
                    "with a conditioning without them: this web UI (or another extension, such "
                    "as Tiled Diffusion with region prompts) feeds the UNet in a way this "
                    "extension cannot follow, so the image would be made without the image "
                    "prompts. Switch Negative Image Prompt off for this generation, or use a "
                    "supported web UI."
                )
            return
        added = self.added
        self.carried += 1
        if self._probing:
            self._probing = False
            for layer in self._layers:
                if not layer.needs_fallback:
                    layer.drop_fallback()
            slow = [layer.name for layer in self._layers if layer.needs_fallback]
            if slow:
                logger.info(
                    "%d cross-attention layers do not call to_q/to_out as modules; the image "
                    "term is added after their output projection (%s, ...)",
                    len(slow),
                    slow[0],
                )
        if self._layers and added == 0:
            raise self._refused(
                "The image prompts reached none of the UNet's cross-attention layers: the "
                "attention in use (another extension's, or a UNet this extension does not know) "
                "bypasses the modules the image prompts attach to, so the image would be made "
                "without them. Disable the other extension's attention patch, or this extension."
            )
        if added < len(self._layers) and not self._warned_partial:
            self._warned_partial = True
            logger.warning(
                "the image prompts reached %d of %d cross-attention layers in a UNet call "
                "(another extension skips or replaces the others)",
                added,
                len(self._layers),
            )

    def _raised(self, error: BaseException) -> BaseException:
        return error if self.raise_as is None else self.raise_as(error)

    def _refused(self, message: str) -> BaseException:
        """Remove everything and return the :class:`UnreachedError` to raise from the UNet."""
        self._abort()
        return self._raised(UnreachedError(message))

    def _abort(self) -> None:
        """An exception is going through the UNet, and A1111 will skip postprocess: remove
        everything now, then tell the owner."""
        self.remove()
        if self.on_abort is not None:
            self.on_abort()

    # -- preparing a layer's entry ------------------------------------------------------------
    def side_token_table(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The side tokens as :func:`make_block` lays them out: [S, N, C], zeros past n_s,
        cast the same way (so the projections equal those of the appended tokens)."""
        table = self._side_tables.get((device, dtype))
        if table is None:
            n = self.layout.n_tokens
            table = torch.zeros(
                len(self._side_tokens), n, self.context_dim, dtype=dtype, device=device
            )
            for index, tokens in enumerate(self._side_tokens):
                table[index, : tokens.shape[0]] = tokens.to(device=device, dtype=dtype)
            self._side_tables[(device, dtype)] = table
        return table

    def entry(
        self, layer: _LayerHooks, plan: _Plan, q: torch.Tensor, hidden: torch.Tensor | None
    ) -> Any:
        """What ``layer`` adds for ``plan``'s rows: built at the layer's first call."""
        weights = []
        for row in plan.rows:
            scale = layer.scales[row.side] if row.side in (POSITIVE, NEGATIVE) else 1.0
            if 0 <= row.side < len(self._masks) and self._is_black(row.side):
                scale = 0.0
            weights.append(row.weight * scale)
        if not any(weights):
            return _SKIP
        if q.shape[0] != len(plan.rows):
            # Checked once per layer and row layout: an extension that splits the batch does it
            # in every call (the term's tensors are per row of the whole batch).
            raise self._refused(_split_batch_message(layer.module, q.shape[0], len(plan.rows)))
        dtype = torch.float32 if self.upcast else q.dtype
        out_dtype = q.dtype if hidden is None else hidden.dtype
        dtype = torch.promote_types(dtype, torch.promote_types(q.dtype, out_dtype))
        device = q.device
        if plan.image is not None:
            keys_values = layer._split_heads(plan.image.to(dtype))  # [B, 2, H, N, d]
        else:
            table = layer.side_table(device, dtype)
            index = torch.tensor([row.side for row in plan.rows], device=device)
            keys_values = table.index_select(0, index)
        batch, _, heads, n, head_dim = keys_values.shape
        keys = keys_values[:, 0] * head_dim**-0.5  # [B, H, N, d]
        row_weights = torch.tensor(weights, dtype=dtype, device=device)
        values = keys_values[:, 1] * row_weights[:, None, None, None]
        tokens, inner = q.shape[1], heads * head_dim
        bias = None
        if any(row.count < n for row in plan.rows):
            slots = torch.arange(n, device=device)
            counts = torch.tensor([row.count for row in plan.rows], device=device)
            unused = slots[None] >= counts[:, None]  # [B, N]
            bias = torch.zeros(batch, 1, 1, n, dtype=dtype, device=device)
            bias.masked_fill_(unused[:, None, None, :], -math.inf)
        mask = self._layer_mask(plan, tokens, device, dtype)  # [B, Tq, 1]
        columns = heads * n
        scores_view = ((batch, heads, n, tokens), (tokens * columns, n, 1, columns))
        block_diagonal = use_block_diagonal(device, columns) and _softmax_output_is_contiguous(
            scores_view, device, dtype
        )
        q_view = probs_view = None
        contiguous_heads = False
        if block_diagonal:
            probs_view = ((batch, tokens, columns), (columns * tokens, 1, tokens))
            keys, values = _block_diagonal(keys, values)
            if bias is not None:
                bias = bias.expand(batch, 1, heads, n).reshape(batch, 1, columns)
        else:
            scores_view = None
            keys, values = keys.contiguous(), values.contiguous()
            contiguous_heads = not strided_query_ok(device)
            if q.is_contiguous() and dtype == q.dtype and not contiguous_heads:
                q_view = ((batch, heads, tokens, head_dim), (tokens * inner, head_dim, inner, 1))
        return _Entry(
            keys=keys,
            values=values,
            bias=bias,
            mask=mask,
            tokens=tokens,
            block_diagonal=block_diagonal,
            q_view=q_view,
            contiguous_heads=contiguous_heads,
            scores_view=scores_view,
            probs_view=probs_view,
            cast_q=None if dtype == q.dtype else dtype,
            cast_out=None if dtype == out_dtype else out_dtype,
        )

    def _is_black(self, side: int) -> bool:
        mask = self._masks[side]
        return mask is not None and not bool(mask.any())

    def _layer_mask(
        self, plan: _Plan, tokens: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """[B, Tq, 1]: each row's side mask at this layer's grid, or None without masks."""
        sides = [row.side for row in plan.rows]
        if not any(0 <= s < len(self._masks) and self._masks[s] is not None for s in sides):
            return None
        grid = layer_grid(plan.latent, tokens)
        by_side: dict[int, torch.Tensor] = {}
        rows = []
        for side in sides:
            if side not in by_side:
                mask = self._masks[side] if 0 <= side < len(self._masks) else None
                if mask is None:
                    by_side[side] = torch.ones(tokens)
                else:
                    if side not in plan.masks:  # once per side and latent size
                        plan.masks[side] = mask_at_latent(mask, plan.latent)
                    by_side[side] = mask_at_grid(plan.masks[side], grid)
            rows.append(by_side[side])
        return torch.stack(rows).to(device=device, dtype=dtype)[:, :, None]


@functools.lru_cache(maxsize=64)
def _softmax_output_is_contiguous(
    view: tuple[tuple[int, ...], tuple[int, ...]], device: torch.device, dtype: torch.dtype
) -> bool:
    """Whether the softmax over dim 2 of scores seen through ``view`` returns a contiguous
    tensor, as the block-diagonal form's ``probs_view`` assumes (torch makes the strided input
    contiguous before the softmax; checked once per view, device and dtype, not assumed)."""
    sizes, _ = view
    batch, heads, n, tokens = sizes
    scores = torch.zeros(batch, tokens, heads * n, dtype=dtype, device=device)
    return torch.as_strided(scores, *view).softmax(2).is_contiguous()


def _block_diagonal(keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head keys and values [B, H, N, d] laid out block-diagonally: keys [B, H*d, H*N]
    (query channels of head h against its N slots) and values [B, H*N, H*d]."""
    batch, heads, n, head_dim = keys.shape
    eye = torch.eye(heads, dtype=keys.dtype, device=keys.device)
    # [B, H, d, H, N]: head h's keys at (h, :, h, :), zeros elsewhere
    k = torch.einsum("bhnd,hg->bhdgn", keys, eye).reshape(batch, heads * head_dim, heads * n)
    v = torch.einsum("bhnd,hg->bhngd", values, eye).reshape(batch, heads * n, heads * head_dim)
    return k.contiguous(), v.contiguous()


def check_layers_fit(targets: list[CrossAttentionLayer], layers: Sequence[KeyValueWeights]) -> None:
    """Raise :class:`IncompatibleModelError` unless each adapter layer fits its ``attn2``."""
    if len(targets) != len(layers):
        msg = (
            f"The IP-Adapter has {len(layers)} cross-attention layers but the loaded checkpoint's "
            f"UNet has {len(targets)}: the adapter is for another model family (SD1.x UNets have "
            "16, SDXL UNets 70). Choose an IP-Adapter made for the loaded checkpoint."
        )
        raise IncompatibleModelError(msg)
    for index, (target, kv) in enumerate(zip(targets, layers, strict=True)):
        expected = tuple(target.module.to_k.weight.shape)  # [inner, C]
        if kv.shape != expected:
            msg = (
                f"IP-Adapter layer {adapter_key(index)}.to_k_ip has shape {list(kv.shape)} but "
                f"the checkpoint's {target.name} needs {list(expected)} ([inner dim, context "
                "width]): the adapter is for another model family. Choose an IP-Adapter made "
                "for the loaded checkpoint."
            )
            raise IncompatibleModelError(msg)


class FailureTrap:
    """Raises a stored error from the UNet's first call, then removes itself.

    A1111 catches and only logs exceptions from Script hooks and callbacks, so an error found
    in ``process`` would still give an image without the requested image prompts. Exceptions
    raised inside the UNet forward do reach the user (the UI shows them, the API answers with
    them), so the error is kept and raised from there. ``cleanup`` runs first, because after
    the raise A1111 does not call ``postprocess``. ``due``, where given, says whether a call
    still belongs to the failed generation: a call of another job (the web UI failed before
    sampling, and the Train tab runs the UNet next) only removes the trap.
    """

    def __init__(
        self,
        unet: nn.Module,
        error: BaseException,
        cleanup: Callable[[], None] | None = None,
        due: Callable[[], bool] | None = None,
    ) -> None:
        self.unet = unet
        self.error = error
        self._cleanup = cleanup
        self._due = due
        self._handle: RemovableHandle | None = unet.register_forward_pre_hook(self._raise)

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _raise(self, module: nn.Module, args: tuple) -> None:
        self.disarm()
        if self._cleanup is not None:
            self._cleanup()
        if self._due is not None and not self._due():
            logger.debug("a UNet call of another job: the pending refusal is dropped")
            return
        raise self.error


def _split_batch_message(module: nn.Module, rows_seen: int, rows: int) -> str:
    """The refusal for another extension that runs ``module`` on part of the batch at a time,
    naming the extension where its forward's source file tells which it is."""
    said = (
        f"runs the UNet's cross-attention on {rows_seen} of the {rows} rows of the batch (each "
        "image's prompt and negative prompt) at a time, so the image prompts cannot tell which "
        "rows it holds."
    )
    one_call = (
        "sampled in one UNet call (the same number of 75-token chunks, or the setting 'Pad "
        "prompt/negative prompt' on)"
    )
    source = forward_source(module)
    if "negpip" in source:
        return (
            f"NegPiP {said} It does so while the prompt and the negative prompt are "
            f"{one_call}. Make one of them longer than the other by a 75-token chunk (with "
            "'Pad prompt/negative prompt' off; in the Hires. fix pass, its own prompts count), "
            "switch NegPiP off, or switch Negative Image "
            "Prompt off for this generation. NegPiP's hooks, which it removes only when a "
            "generation finishes, were taken off with this refusal."
        )
    rp = (
        "Regional Prompter's Attention mode does this when the prompt and the negative prompt "
        f"have different numbers of regions and are {one_call}. Use Regional Prompter's Latent "
        "mode, or switch Negative Image Prompt off for this generation."
    )
    if "regional" in source:
        return f"Regional Prompter {said} {rp}"
    return (
        f"Another extension {said} {rp} NegPiP does it whenever the prompt and the negative "
        "prompt share a UNet call."
    )


def release_negpip_hooks(unet: nn.Module) -> int:
    """Take NegPiP's attention hooks off ``unet``, as its ``postprocess`` would; how many.

    NegPiP removes them nowhere else, and A1111 skips every ``postprocess`` of a generation
    that fails, as each one the extension refuses while sampling does (NegPiP has hooked the
    UNet by then). Left on, they split the batch of every later generation, in both tabs, and
    add the refused prompt's conditioning to the other tab's pictures.
    """
    released = 0
    for name, module in unet.named_modules():
        if name.rsplit(".", 1)[-1] == "attn2" and "negpip" in forward_source(module):
            del module.forward  # the class's forward again, as NegPiP's unload leaves it
            released += 1
    if released:
        logger.info(
            "took NegPiP's hooks off %d cross-attention layers (NegPiP removes them only when a "
            "generation finishes)",
            released,
        )
    return released


def forward_source(module: nn.Module) -> str:
    """The source file of the ``forward`` another extension set on ``module`` (lower case; ""
    when there is none or it cannot be told)."""
    forward = vars(module).get("forward")
    function = getattr(forward, "__func__", forward)
    while isinstance(function, functools.partial):
        function = function.func
    code = getattr(function, "__code__", None)
    return str(getattr(code, "co_filename", "")).replace("\\", "/").lower()
