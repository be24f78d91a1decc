"""DeOP's learnable text prompts (Sec. 3.2; released ``LearnablePromptExtractor``).

Imports neither Ray nor the pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class TextPrompt(nn.Module):
    """Learnable prefix text prompts through a frozen open_clip text tower (CoOp-style; DeOP
    "online text prompt learning", released ``LearnablePromptExtractor`` with ``PROMPT_SHAPE (n, 0)``).

    The token sequence of class ``c`` is ``[SOS] p_1 .. p_n <name tokens> . [EOS] [pad]...``
    (``p_i`` learnable ``[n, width]``, initialised N(0, 0.02) as released; the released pipeline
    first trains them offline on ground-truth crops, which is not done here); positional
    embedding, the text transformer with the causal mask, ``ln_final``, the feature at the
    ``[EOS]`` position, ``text_projection``, L2-normalised.

    The text tower stays in ``clip`` (the owner's state dict); this module holds only ``ctx``.

    Raises:
        ValueError: a text tower without open_clip's CLIP BPE vocabulary (49408 tokens) or whose
            pooling is not at the [EOS] token; a name too long for the context.
    """

    def __init__(self, clip_model: nn.Module, n_ctx: int) -> None:
        super().__init__()
        from open_clip.tokenizer import SimpleTokenizer

        for attr in ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection"):
            if not hasattr(clip_model, attr):
                raise ValueError(
                    f"DeOP's learnable text prompts need an open_clip CLIP model with its text tower (no {attr!r})"
                )
        vocab = clip_model.token_embedding.weight.shape[0]
        if vocab != 49408 or getattr(clip_model, "text_pool_type", "argmax") not in ("argmax", "eos"):
            raise ValueError(
                "DeOP's learnable text prompts need a CLIP text tower with the CLIP BPE vocabulary (49408 "
                f"tokens, got {vocab}) pooled at the [EOS] token (got {getattr(clip_model, 'text_pool_type', None)!r})"
            )
        self.tokenizer = SimpleTokenizer()
        self.context_length = int(clip_model.positional_embedding.shape[0])
        self.width = int(clip_model.token_embedding.weight.shape[1])
        self.n_ctx = int(n_ctx)
        self.ctx = nn.Parameter(torch.randn(n_ctx, self.width) * 0.02) if n_ctx > 0 else None
        (self.dot_id,) = self.tokenizer.encode(".")

    def forward(self, clip_model: nn.Module, names: Sequence[str]) -> torch.Tensor:
        """``names`` (C class names) -> ``[C, D]`` L2-normalised text embeddings."""
        if not len(names):
            raise ValueError("encode_text needs at least one class name")
        tok = self.tokenizer
        emb = clip_model.token_embedding
        dev = emb.weight.device
        ids = [tok.encode(str(n)) for n in names]
        fixed = 1 + self.n_ctx + 2  # [SOS] ctx . [EOS]
        too_long = [n for n, i in zip(names, ids) if fixed + len(i) > self.context_length]
        if too_long:
            raise ValueError(
                f"class names too long for the text context ({self.context_length} tokens with {self.n_ctx} "
                f"prompt tokens): {too_long[:5]}"
            )
        seqs = []
        eos_at = []
        for i in ids:
            pre = torch.tensor([tok.sot_token_id], device=dev)
            post = torch.tensor([*i, self.dot_id, tok.eot_token_id], device=dev)
            pad = torch.zeros(self.context_length - fixed - len(i), dtype=torch.long, device=dev)
            seqs.append((pre, post, pad))
            eos_at.append(fixed + len(i) - 1)
        with torch.no_grad():  # the token embedding is frozen
            pieces = [(emb(a), emb(b), emb(c)) for a, b, c in seqs]
        cast = clip_model.transformer.get_cast_dtype() if hasattr(clip_model.transformer, "get_cast_dtype") else None
        dtype = cast or emb.weight.dtype
        rows = []
        for a, b, c in pieces:
            parts = [a] + ([self.ctx.to(a.dtype)] if self.ctx is not None else []) + [b, c]
            rows.append(torch.cat(parts, dim=0))
        x = torch.stack(rows).to(dtype) + clip_model.positional_embedding.to(dtype)
        x = clip_model.transformer(x, attn_mask=getattr(clip_model, "attn_mask", None))
        x = clip_model.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), torch.tensor(eos_at, device=x.device)]
        proj = clip_model.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)


__all__ = ["TextPrompt"]
