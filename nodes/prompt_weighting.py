"""Prompt weighting and long prompts, read as A1111 and ComfyUI read them (TextEncode's `weighting` input).

    (word)        word's weight x 1.1           [word]       / 1.1
    (word:1.5)    x 1.5                         nesting multiplies: ((word)) is x 1.21
    \\( \\) \\[ \\]  literal brackets              \\\\ a literal backslash

Unbalanced brackets are handled as A1111 does: an unclosed `(` or `[` weights everything after it, a
stray `)` or `]` is plain text. Where A1111 fails (`(word:.)`, a weight that is no number), the text
stays plain and the bracket closes at x 1.1, as ComfyUI does; A1111's BREAK keyword is plain text here.

A prompt becomes chunks of 75 tokens, each encoded as BOS + 75 tokens + EOS/padding (77, CLIP's
length) and concatenated along the sequence axis, so prompts past 77 tokens are read whole. Chunks
end at exactly 75 tokens, so a word may straddle two (A1111 by default moves the words after a comma in
a chunk's last 20 tokens to the next chunk, ComfyUI keeps words whole). Each
chunk's hidden states are multiplied by their tokens' weights and rescaled to the chunk's old mean
(A1111's "original" emphasis). Prompts of different lengths are made to match for one CFG batch by
`match_lengths`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from graphflow.errors import NodeInputError

if TYPE_CHECKING:
    import torch

    from graphflow.models.components import TextEncoders

_ROUND, _SQUARE = 1.1, 1 / 1.1
# one match per piece: escapes, brackets, a ":weight)" that closes a round bracket, runs of text, a lone colon
_PIECES = re.compile(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")


def parse_weights(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) fragments in order, neighbours of equal weight merged; never raises.

    >>> parse_weights("a (b:1.5) [c]")
    [('a ', 1.0), ('b', 1.5), (' ', 1.0), ('c', 0.9090909090909091)]
    """
    fragments: list[list[Any]] = []  # [text, weight], weights multiplied in place as brackets close
    round_opened: list[int] = []  # where each open bracket's fragments start
    square_opened: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _PIECES.finditer(text):
        piece, weight = match.group(0), match.group(1)
        if piece.startswith("\\"):
            fragments.append([piece[1:], 1.0])
        elif piece == "(":
            round_opened.append(len(fragments))
        elif piece == "[":
            square_opened.append(len(fragments))
        elif weight is not None and round_opened:
            factor = _number(weight)
            if factor is None:  # not a number: the text stays, the bracket closes as a plain one
                fragments.append([piece[:piece.rindex(")")], 1.0])
                factor = _ROUND
            multiply(round_opened.pop(), factor)
        elif piece == ")" and round_opened:
            multiply(round_opened.pop(), _ROUND)
        elif piece == "]" and square_opened:
            multiply(square_opened.pop(), _SQUARE)
        else:
            fragments.append([piece, 1.0])
    for start in round_opened:
        multiply(start, _ROUND)
    for start in square_opened:
        multiply(start, _SQUARE)

    merged: list[tuple[str, float]] = []
    for piece, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + piece, weight)
        else:
            merged.append((piece, weight))
    return merged or [("", 1.0)]


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class Chunk:
    """One encoder call's tokens: BOS, up to 75 prompt tokens, EOS, then padding to the tokenizer's length."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]  # one per id; 1.0 for BOS, EOS and padding
    length: int  # BOS + prompt tokens + EOS, the part an attention mask keeps


def token_chunks(tokenizer: Any, fragments: list[tuple[str, float]]) -> list[Chunk]:
    """The fragments' tokens in chunks of the tokenizer's length less BOS and EOS (75 for CLIP), each fragment
    tokenized on its own as A1111 does; an empty prompt is one chunk."""
    from nodes.conditioning import _TOKENIZING

    with _TOKENIZING:  # the tokenizer's padding and truncation settings are shared state
        pieces = tokenizer([piece for piece, _ in fragments], add_special_tokens=False, truncation=False,
                           verbose=False).input_ids
    ids = [token for tokens in pieces for token in tokens]
    weights = [weight for tokens, (_, weight) in zip(pieces, fragments, strict=True) for _ in tokens]
    size = tokenizer.model_max_length - 2
    return [chunk_of(tokenizer, ids[start:start + size], weights[start:start + size])
            for start in range(0, max(len(ids), 1), size)]


def chunk_of(tokenizer: Any, ids: Sequence[int] = (), weights: Sequence[float] = ()) -> Chunk:
    """`ids` (at most 75; none: the empty prompt's chunk) between BOS and EOS, padded to the tokenizer's length."""
    padding = tokenizer.model_max_length - 2 - len(ids)
    return Chunk((tokenizer.bos_token_id, *ids, tokenizer.eos_token_id, *[tokenizer.pad_token_id] * padding),
                 (1.0, *weights, *[1.0] * (padding + 1)), len(ids) + 2)


def encode_weighted(clip: TextEncoders, text: str, clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds [1, 77 x chunks, D], pooled) of a weighted prompt of any length; SDXL's pooled projection comes
    from the first chunk, as in A1111 and ComfyUI. Unweighted prompts of up to 75 tokens give `encode_text`'s."""
    import torch

    fragments = parse_weights(text)
    if not all(math.isfinite(weight) for _, weight in fragments):
        raise NodeInputError(f"the prompt's nested weights multiply past what a float holds: {text!r}")
    chunks = [token_chunks(tokenizer, fragments) for tokenizer in clip.tokenizers]
    count = max(len(each) for each in chunks)  # two tokenizers could split one prompt differently
    embeds, pooled = [], None
    for index, (tokenizer, each) in enumerate(zip(clip.tokenizers, chunks, strict=True)):
        hidden = []
        for chunk in each + [chunk_of(tokenizer)] * (count - len(each)):
            z, chunk_pooled = _encode_chunk(clip, index, chunk, clip_skip)
            hidden.append(emphasize(z, chunk.weights))
            pooled = chunk_pooled if pooled is None else pooled
        embeds.append(torch.cat(hidden, dim=1))
    return torch.cat(embeds, dim=-1).to(embeds[-1].dtype), pooled


def _encode_chunk(clip: TextEncoders, index: int, chunk: Chunk,
                  clip_skip: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk through text encoder `index` as `encode_text` runs it: (hidden states, pooled or None)."""
    import torch

    from nodes.conditioning import _layer

    device = clip.encoders[index].key.device
    ids = torch.tensor([chunk.ids], device=device)
    with clip.use(index) as encoder:
        if clip.family != "sd15":  # SDXL: the penultimate (or earlier) layer; the second encoder's text_embeds
            output = encoder(ids, output_hidden_states=True)
            pooled = output[0] if output[0].ndim == 2 else None
            return _layer(output.hidden_states, clip_skip or 0, 2), pooled
        mask = None
        if getattr(encoder.config, "use_attention_mask", False):
            mask = (torch.arange(len(chunk.ids), device=device) < chunk.length).long()[None]
        if clip_skip is None:
            return encoder(ids, attention_mask=mask)[0].to(encoder.dtype), None
        output = encoder(ids, attention_mask=mask, output_hidden_states=True)
        layer = _layer(output.hidden_states, clip_skip, 1)
        hidden = getattr(encoder, "text_model", encoder).final_layer_norm(layer)
        return hidden.to(encoder.dtype), None


def emphasize(z: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """A1111's emphasis: each token's hidden state times its weight, then the chunk rescaled to its old mean."""
    import torch

    if all(weight == 1.0 for weight in weights):  # z * (mean / mean): z itself, also where the mean is 0
        return z
    original = z.float()
    weighted = original * torch.tensor(weights, device=z.device)[None, :, None]
    weighted = weighted * (original.mean() / weighted.mean())
    if not bool(weighted.isfinite().all()):
        raise NodeInputError("the prompt's weights leave its embeddings without a finite mean (weights that "
                             "cancel out, or too large); use smaller or positive weights")
    return weighted.to(z.dtype)


def match_lengths(*embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Prompt embeddings [B, T, D] made one length for one batch, as ComfyUI does: each repeated along the sequence
    to the least common multiple of the lengths (77 and 231 give 231: the short one three times). Cross-attention
    over a prompt repeated k times equals attention over it once, so no prompt's meaning changes; tensors already
    of one length come back as they are."""
    lengths = [tensor.shape[1] for tensor in embeds]
    target = math.lcm(*lengths)
    return tuple(tensor if length == target else tensor.repeat(1, target // length, 1)
                 for tensor, length in zip(embeds, lengths, strict=True))
