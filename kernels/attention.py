"""Self-attention over padded audio batches.

`attention(q, k, v, lengths, dropout_p)` is the one entry point the encoder calls. For now it routes to
torch's scaled_dot_product_attention with a key-padding mask; the Triton kernel plugs in here.
"""
import torch
import torch.nn.functional as F


def attention_reference(q, k, v, lengths=None, dropout_p=0.0):
    """Plain torch. q, k, v: B x H x T x D. lengths: B (valid frames per clip) or None (all valid).
    Keys at or past a clip's length get no weight; query rows past it are zero."""
    B, H, T, D = q.shape
    if lengths is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    valid = torch.arange(T, device=q.device)[None, :] < lengths[:, None]  # B x T
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :], dropout_p=dropout_p)
    return out * valid[:, None, :, None].to(out.dtype)


def attention(q, k, v, lengths=None, dropout_p=0.0):
    return attention_reference(q, k, v, lengths, dropout_p)
