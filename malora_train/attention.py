"""Attention for packed rows: several whole examples in one row, each attending only to itself.

A packed batch carries ``document_ids`` (B, L): 0, 1, 2, ... for the examples laid out one after another
in a row, the padding tail one more segment of its own. The mask handed to the model is

- on CUDA, a flex-attention ``BlockMask`` built from block-level document ranges: (B, L/128, L/128)
  tensors, no L x L mask, no host synchronisation; flex then skips every block that crosses documents;
- elsewhere (the CPU, where flex has no backward), a dense (B, 1, L, L) boolean mask for SDPA.

Both are 4-D, which transformers' mask preparation passes through untouched. ``SDPA_FLEX`` is an attention
implementation registered with transformers that sends a BlockMask to flex attention and anything else
(the 4-D masks it builds from padded batches, dense packed masks, None) to SDPA, so one loaded model serves
packed training, padded evaluation and generation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn.attention.flex_attention import BlockMask

SDPA_FLEX = "sdpa_flex"
FLEX_BLOCK = 128  # flex attention's default block size


def register_sdpa_flex() -> str:
    """Register ``SDPA_FLEX`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.integrations.flex_attention import flex_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def sdpa_or_flex(module, query, key, value, attention_mask, **kwargs):
        if isinstance(attention_mask, BlockMask):
            return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(SDPA_FLEX, sdpa_or_flex)
    # without a mask function of its own, transformers would drop 2-D padding masks for this name
    AttentionMaskInterface.register(SDPA_FLEX, sdpa_mask)
    return SDPA_FLEX


def document_causal_dense_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, L, L) bool: query q sees key k iff both lie in the same document and k <= q."""
    same = document_ids[:, :, None] == document_ids[:, None, :]
    length = document_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal)[:, None]


def _ordered_blocks(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, nq, nk) 0/1 blocks -> BlockMask's (number of blocks, block indices first) per query block."""
    dense = dense.to(torch.int32)
    count = dense.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
    return count.contiguous(), order.contiguous()


_MASK_MODS: dict[tuple, tuple[torch.Tensor, Callable]] = {}


def _document_causal_mask_mod(document_ids: torch.Tensor) -> Callable:
    """The token-level mask function, one per batch shape and device, reading the document ids from a
    buffer they are copied into (in stream order): a new function every step would make torch.compile
    re-trace every step."""
    key = (tuple(document_ids.shape), document_ids.device)
    if key not in _MASK_MODS:
        buffer = torch.empty_like(document_ids)

        def document_causal(b, h, q_idx, kv_idx):
            return (buffer[b, q_idx] == buffer[b, kv_idx]) & (q_idx >= kv_idx)

        _MASK_MODS[key] = (buffer, document_causal)
    buffer, mask_mod = _MASK_MODS[key]
    buffer.copy_(document_ids)
    return mask_mod


def document_causal_block_mask(document_ids: torch.Tensor, block: int = FLEX_BLOCK) -> BlockMask:
    """A BlockMask for document-causal attention, from (B, L) document ids that never decrease along a row.

    Block (q, k) is *full* when k < q and both blocks lie inside one document, *partial* (filtered token by
    token with the mask function) on the diagonal or when their document ranges overlap, else skipped.
    """
    batch, length = document_ids.shape
    pad = (-length) % block
    if pad:  # a fresh segment, so positions past the end never match a real token
        tail = (document_ids[:, -1:] + 1).expand(batch, pad)
        document_ids = torch.cat([document_ids, tail], dim=1)
    blocks = document_ids.shape[1] // block
    grouped = document_ids.view(batch, blocks, block)
    low, high = grouped.amin(-1), grouped.amax(-1)
    index = torch.arange(blocks, device=document_ids.device)
    before = (index[None, :] < index[:, None])[None]  # (1, q, k): key block strictly before the query block
    diagonal = (index[None, :] == index[:, None])[None]
    q_low, q_high = low[:, :, None], high[:, :, None]
    k_low, k_high = low[:, None, :], high[:, None, :]
    overlap = (k_high >= q_low) & (k_low <= q_high)
    full = before & (q_low == q_high) & (k_low == k_high) & (k_low == q_low)
    partial = (before & overlap & ~full) | diagonal
    document_causal = _document_causal_mask_mod(document_ids)
    kv_count, kv_index = _ordered_blocks(partial[:, None])
    full_count, full_index = _ordered_blocks(full[:, None])
    return BlockMask.from_kv_blocks(kv_count, kv_index, full_count, full_index, BLOCK_SIZE=block,
                                    mask_mod=document_causal, seq_lengths=(length, length))


def packed_attention_mask(document_ids: torch.Tensor, attn_implementation: str) -> torch.Tensor | BlockMask:
    """The mask a packed batch hands to the model: a BlockMask where flex attention can run (CUDA, the
    ``sdpa_flex`` implementation), else the dense document-causal mask."""
    if document_ids.is_cuda and attn_implementation == SDPA_FLEX:
        return document_causal_block_mask(document_ids)
    return document_causal_dense_mask(document_ids)
