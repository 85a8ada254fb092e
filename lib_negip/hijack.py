"""Decoupled cross-attention on an ldm/sgm UNet, installed as removable module hooks.

For every ``attn2`` module the hijack adds ``weight * attention(q, to_k_ip(img), to_v_ip(img))``
to the text attention, before the output projection, exactly as IP-Adapter defines it. It does
not replace any ``forward``: A1111 swaps ``CrossAttention.forward`` on the class for the chosen
optimisation (sdp, xformers, InvokeAI, sub-quadratic, ...) and other extensions replace it per
instance; hooks run around whatever forward is current, so

- the text part is computed by the host's own attention, untouched (weight 0 is bit-exact);
- the query is the host's own ``to_q`` output (a forward hook captures it) and the image term
  is added to the input of the host's ``to_out[0]`` (a forward pre-hook), so there is no second
  query or output projection; where an implementation does not call those submodules, the
  post-hook computes the term itself;
- removal is removing our hook handles, which restores the modules exactly whatever other
  extensions did before or after us.

A context without our appended block (see :mod:`lib_negip.conditioning`) passes through
untouched; recognising it needs only its length, a host-side integer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_negip import logger
from lib_negip.conditioning import SplitContext, TokenLayout, split_context, verify_blocks
from lib_negip.errors import ConditioningError, IncompatibleModelError
from lib_negip.unet_layers import CrossAttentionLayer, adapter_key, cross_attention_layers

# attn2(x, context=None, mask=None, **kwargs): the context is keyword or the second argument.


def _context_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if "context" in kwargs:
        return kwargs["context"]
    return args[1] if len(args) > 1 else None


def _with_context(
    args: tuple[Any, ...], kwargs: dict[str, Any], context: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if "context" in kwargs or len(args) <= 1:
        return args, {**kwargs, "context": context}
    return (args[0], context, *args[2:]), kwargs


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
        """image: [B, N, C] -> keys, values [B, N, inner]."""
        key = (image.device, image.dtype)
        weight = self._cast.get(key)
        if weight is None:
            weight = self._cast[key] = self._weight.to(device=image.device, dtype=image.dtype)
        return F.linear(image, weight).split(self.inner_dim, dim=-1)


@dataclass
class _Call:
    """State of one in-flight ``attn2`` call that carries image tokens."""

    split: SplitContext
    x: torch.Tensor
    q: torch.Tensor | None = None
    added: bool = False


class _LayerHooks:
    """The hooks of one ``attn2`` module; they share the call state through ``self.call``."""

    def __init__(
        self, hijack: AttentionHijack, layer: CrossAttentionLayer, kv: KeyValueWeights
    ) -> None:
        self.hijack = hijack
        self.module = layer.module
        self.kv = kv
        self.call: _Call | None = None
        self.handles: list[RemovableHandle] = []
        # Keys and values [S, 2, H, N, d] of the hijack's side tokens, per device and dtypes,
        # and the keys and values [B, H, N, d] of each sequence of row sides seen.
        self._tables: dict[tuple, torch.Tensor] = {}
        self._rows: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def install(self) -> None:
        module = self.module
        self.handles = [
            module.register_forward_pre_hook(self.before_attention, with_kwargs=True),
            module.register_forward_hook(self.after_attention, with_kwargs=True),
            module.to_q.register_forward_hook(self.capture_query),
            module.to_out[0].register_forward_pre_hook(self.add_image_term),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.call = None

    # attn2(x, context=..., mask=None, **kwargs)
    def before_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> Any:
        self.call = None
        context = _context_of(args, kwargs)
        split = self.hijack.split(context)
        if split is None:
            return None
        self.call = _Call(split=split, x=args[0] if args else kwargs["x"])
        return _with_context(args, kwargs, split.text)

    def capture_query(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self.call is not None and self.call.q is None:
            self.call.q = output

    def add_image_term(self, module: nn.Module, args: tuple) -> Any:
        call = self.call
        if call is None or call.added:
            return None
        hidden = args[0]  # [B, Tq, inner], heads already merged
        if call.q is None or call.q.shape[:2] != hidden.shape[:2]:
            return None  # not the query we expect: the post-hook computes the term instead
        call.added = True
        return (self.add_image_attention(hidden, call, call.q), *args[1:])

    def after_attention(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        call, self.call = self.call, None
        if call is None or call.added:
            return None
        # The installed attention did not go through to_q / to_out[0] as modules: add the term
        # after the output projection instead (to_out[0] is linear, its bias already applied).
        q = call.q if call.q is not None else module.to_q(call.x)
        term = self.image_term(call, q)
        return output + F.linear(term, module.to_out[0].weight.to(term.dtype))

    def image_attention(self, call: _Call, q: torch.Tensor) -> torch.Tensor:
        """softmax(q k_ip^T / sqrt(d)) v_ip per head: [B, Tq, H, d] (a transposed view)."""
        split = call.split
        if self.hijack.upcast:
            q = q.float()
        batch, _, inner = q.shape
        heads = self.module.heads
        head_dim = inner // heads

        def by_head(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, heads, head_dim).transpose(1, 2)

        if split.side is None and split.side_rows is None:
            keys, values = map(by_head, self.kv.project(split.image.to(q.dtype)))
        else:
            keys, values = self.side_keys_values(split, q.dtype)  # [B, H, N, d]
        return F.scaled_dot_product_attention(
            by_head(q), keys, values, attn_mask=split.key_mask
        ).transpose(1, 2)  # [B, H, Tq, d] -> [B, Tq, H, d]

    def side_keys_values(
        self, split: SplitContext, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image keys and values [B, H, N, d] in ``dtype`` of rows that name their side.

        They come from keys and values projected once per generation from the hijack's side
        tokens, kept per layer as [S, 2, H, N, d]: one gather per call, instead of reading the
        layer's [2*inner, C] weight and rearranging the heads on every call.
        """
        image = split.image  # [B, N, C] in the context's dtype
        key = (image.device, image.dtype, dtype)
        if split.side_rows is not None:  # known on the host: no work per call after the first
            cached = self._rows.get((*key, split.side_rows))
            if cached is None:
                table = self._table(key)
                if split.side_rows == tuple(range(table.shape[0])):
                    rows = table  # the usual batched [cond, uncond]: views, no copy
                else:
                    rows = torch.stack([table[side] for side in split.side_rows])
                if len(self._rows) >= 32:  # a handful of row layouts per generation
                    self._rows.clear()
                cached = self._rows[(*key, split.side_rows)] = (rows[:, 0], rows[:, 1])
            return cached
        rows = self._table(key).index_select(0, split.side)  # [B, 2, H, N, d]
        return rows[:, 0], rows[:, 1]

    def _table(self, key: tuple[torch.device, torch.dtype, torch.dtype]) -> torch.Tensor:
        table = self._tables.get(key)
        if table is None:
            device, context_dtype, dtype = key
            tokens = self.hijack.side_token_table(device, context_dtype).to(dtype)
            sides, n, _ = tokens.shape
            heads = self.module.heads
            projected = torch.cat(self.kv.project(tokens), dim=-1)  # [S, N, 2*inner]
            table = projected.view(sides, n, 2, heads, -1).permute(0, 2, 3, 1, 4).contiguous()
            self._tables[key] = table
        return table

    def add_image_attention(
        self, hidden: torch.Tensor, call: _Call, q: torch.Tensor
    ) -> torch.Tensor:
        """hidden + weight * image attention, hidden [B, Tq, inner] with heads merged.

        One fused multiply-add reads the attention in its [B, Tq, H, d] view: no separate copy
        to merge the heads, no separate product with the weight (two passes over [B, Tq, inner]
        and two kernel launches less per layer). Where the dtypes differ (an attention that
        returns float32 under autocast, or the upcast option) it computes in the wider one and
        returns ``hidden``'s dtype. With weight 0 the result is exactly ``hidden``.
        """
        attended = self.image_attention(call, q)  # [B, Tq, H, d]
        weight = call.split.weight[..., None]  # [B, 1, 1, 1]
        summed = torch.addcmul(hidden.reshape(attended.shape), attended, weight)
        summed = summed.reshape(hidden.shape)
        return summed if summed.dtype == hidden.dtype else summed.to(hidden.dtype)

    def image_term(self, call: _Call, q: torch.Tensor) -> torch.Tensor:
        """weight * softmax(q k_ip^T / sqrt(d)) v_ip, heads merged: [B, Tq, inner]."""
        attended = self.image_attention(call, q).flatten(2)  # [B, Tq, H, d] -> [B, Tq, inner]
        return (attended * call.split.weight.to(attended.dtype)).to(call.x.dtype)


# The hijack currently installed on each UNet: never two at once.
_INSTALLED: weakref.WeakKeyDictionary[nn.Module, AttentionHijack] = weakref.WeakKeyDictionary()


class AttentionHijack:
    """IP-Adapter's decoupled cross-attention on every ``attn2`` module of one UNet.

    unet: the ldm/sgm ``UNetModel`` (A1111's ``sd_model.model.diffusion_model``).
    layers: the adapter's per-layer weights in adapter order, as :class:`KeyValueWeights` or
    ``(to_k_ip, to_v_ip)`` pairs [inner, C].
    layout: how the image tokens are appended to the conditioning of this generation.
    masked: whether rows may fill fewer than ``layout.n_tokens`` slots (sides of different
    lengths); without it no mask is built.
    upcast: compute the image attention in float32 (A1111's "upcast cross attention" option).
    verify: check the appended meta tokens once per UNet call (one synchronisation), where the
    first ``attn2`` splits the context; the check sees the context after every other
    extension's changes, the ControlNet extension's marker stripping included.
    side_tokens: the image tokens [n_s, C] that blocks made with ``make_block(..., side=s)``
    hold; their keys and values are then projected once per generation, not once per call.
    on_abort: called after the hijack removed itself because an exception went through the UNet
    (A1111 then skips postprocess): the owner ends the generation.
    raise_as: turns the :class:`ConditioningError` of a transformed block into the exception to
    raise (the host's HTTP 422 error); by default it is raised as it is.
    """

    def __init__(
        self,
        unet: nn.Module,
        layers: Sequence[KeyValueWeights | tuple[torch.Tensor, torch.Tensor]],
        layout: TokenLayout,
        *,
        masked: bool = False,
        upcast: bool = False,
        verify: bool = True,
        side_tokens: Sequence[torch.Tensor] = (),
        on_abort: Callable[[], None] | None = None,
        raise_as: Callable[[BaseException], BaseException] | None = None,
    ) -> None:
        self.unet = unet
        self.layout = layout
        self.masked = masked
        self.upcast = upcast
        self.verify = verify
        self.on_abort = on_abort
        self.raise_as = raise_as
        weights = [w if isinstance(w, KeyValueWeights) else KeyValueWeights(*w) for w in layers]
        targets = cross_attention_layers(unet)
        check_layers_fit(targets, weights)
        self.context_dim = targets[0].context_dim
        self._layers = [
            _LayerHooks(self, target, kv) for target, kv in zip(targets, weights, strict=True)
        ]
        self._unet_handle: RemovableHandle | None = None
        self._unet_after: RemovableHandle | None = None
        self._last_context: torch.Tensor | None = None
        self._last_split: SplitContext | None = None
        self._side_tokens = [tokens.detach() for tokens in side_tokens]
        self._side_tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    @property
    def installed(self) -> bool:
        return self._unet_handle is not None

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
            layer.install()
        self._unet_handle = self.unet.register_forward_pre_hook(self._before_unet)
        try:  # also called when the forward raises (torch 2.1+)
            self._unet_after = self.unet.register_forward_hook(self._after_unet, always_call=True)
        except TypeError:  # an older torch: an exception leaves the hooks to the next process
            self._unet_after = None
        logger.debug("hijacked %d cross-attention layers", len(self._layers))

    def remove(self) -> None:
        """Remove every hook; the modules are exactly as before :meth:`install`. Idempotent."""
        for layer in self._layers:
            layer.remove()
        if self._unet_handle is not None:
            self._unet_handle.remove()
            self._unet_handle = None
        if self._unet_after is not None:
            self._unet_after.remove()
            self._unet_after = None
        if _INSTALLED.get(self.unet) is self:
            del _INSTALLED[self.unet]
        self._forget_context()

    def split(self, context: Any) -> SplitContext | None:
        """The parts of a context carrying our block, or None; computed once per UNet call."""
        if context is self._last_context:
            return self._last_split
        split = None
        if (
            isinstance(context, torch.Tensor)
            and context.dim() == 3
            and context.shape[2] == self.context_dim
            and self.layout.carries_block(context.shape[1])
        ):
            sides = len(self._side_tokens)
            side_rows = None
            if self.verify:
                try:
                    rows = verify_blocks(context, self.layout)
                except ConditioningError as error:
                    # The generation fails here and A1111 skips postprocess: leave nothing behind.
                    self._abort()
                    if self.raise_as is None:
                        raise
                    raise self.raise_as(error) from error
                # Rows whose side is out of range project their own tokens (sides=0).
                side_rows = rows if all(0 <= side < sides for side in rows) else None
                sides = 0
            split = split_context(
                context, self.layout, masked=self.masked, sides=sides, side_rows=side_rows
            )
        # Every attn2 of one UNet call receives the same context object.
        self._last_context, self._last_split = context, split
        return split

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

    def _forget_context(self) -> None:
        self._last_context = self._last_split = None

    def _before_unet(self, module: nn.Module, args: tuple) -> None:
        # A new UNet call: never reuse a split of a tensor that may have been changed in place.
        self._forget_context()

    def _after_unet(self, module: nn.Module, args: tuple, output: Any) -> None:
        if output is None:  # the forward raised (torch calls always_call hooks without output)
            self._abort()

    def _abort(self) -> None:
        """An exception is going through the UNet, and A1111 will skip postprocess: remove
        everything now, then tell the owner."""
        self.remove()
        if self.on_abort is not None:
            self.on_abort()


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
    the raise A1111 does not call ``postprocess``.
    """

    def __init__(
        self, unet: nn.Module, error: BaseException, cleanup: Callable[[], None] | None = None
    ) -> None:
        self.unet = unet
        self.error = error
        self._cleanup = cleanup
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
        raise self.error
