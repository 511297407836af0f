"""Prompt weighting: A1111's (word:1.2) parse, 75-token chunks, emphasis with the mean kept, and long prompts that
reach the Sampler; with weighting off TextEncode stays the diffusers pipelines' encode_prompt."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from graphflow import Engine, Graph
from graphflow.context import RunContext
from graphflow.errors import NodeInputError
from graphflow.models import ModelManager
from nodes import CheckpointLoader, Sampler, TextEncode, VAEDecode
from nodes.prompt_weighting import match_lengths, parse_weights, token_chunks

PROMPT = "a cosy reading corner, warm light"
LONG = "ab" * 100  # the tiny byte-level tokenizer makes a token per character: 200 tokens
BOS, EOS = 512, 513  # the tiny tokenizer's start and end of text (also its padding)


@pytest.fixture(scope="module")
def engine(tiny_models: Path) -> Engine:
    return Engine(input_dirs=[tiny_models], models=ModelManager())


@pytest.fixture(scope="module")
def clip(engine: Engine, tiny_models: Path) -> Any:
    graph = Graph()
    graph.output("clip", graph.add(CheckpointLoader(model=str(tiny_models / "sd15"))).clip)
    return engine.run(graph).outputs["clip"]


@pytest.mark.parametrize(("text", "fragments"), [
    # the examples in A1111's parse_prompt_attention docstring
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    # nesting multiplies, [x] divides by 1.1
    ("a (b:1.5) [c] ((d))", [("a ", 1.0), ("b", 1.5), (" ", 1.0), ("c", 1 / 1.1), (" ", 1.0), ("d", 1.1 * 1.1)]),
    ("((a:2):3)", [("a", 6.0)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("([a])", [("a", 1 / 1.1 * 1.1)]),
    ("(a:-1)", [("a", -1.0)]),
    ("(a: 1.5 )", [("a", 1.5)]),  # A1111 allows spaces around the number
    ("(a:0)", [("a", 0.0)]),
    # unbalanced and stray brackets, as A1111 leaves them
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("a) b] c", [("a) b] c", 1.0)]),
    ("x:1.2) y", [("x:1.2) y", 1.0)]),  # a weight with no open bracket is text
    ("(a:1.2", [("a:1.2", 1.1)]),  # a weight that closes nothing is text inside the open bracket
    ("(a]", [("a]", 1.1)]),
    ("[a)", [("a)", 1 / 1.1)]),
    # escapes; a lone backslash is dropped, as A1111 drops it
    ("\\\\(a\\\\)", [("\\", 1.0), ("a\\", 1.1)]),
    ("a\\b", [("ab", 1.0)]),
    ("ratio 16:9", [("ratio 16:9", 1.0)]),
    # where A1111 fails (float() of no number) the text stays and the bracket closes plainly, as in ComfyUI
    ("(a:.)", [("a:.", 1.1)]),
    ("(a:1.2.3)", [("a:1.2.3", 1.1)]),
    ("(a:" + "9" * 400 + ")", [("a:" + "9" * 400, 1.1)]),  # a weight past a float's range is no number either
    # BREAK is A1111's chunk separator, not read here: plain text, as in ComfyUI
    ("a BREAK b", [("a BREAK b", 1.0)]),
    ("", [("", 1.0)]),
    ("()[]", [("", 1.0)]),
])
def test_the_parse_gives_a1111s_fragments_and_weights(text: str, fragments: list[tuple[str, float]]) -> None:
    assert parse_weights(text) == fragments


def _is_subsequence(part: str, whole: str) -> bool:
    rest = iter(whole)
    return all(character in rest for character in part)


@given(st.one_of(st.text(), st.text(alphabet="ab ()[]:\\.,+-0123456789", max_size=60)))
def test_the_parse_never_raises_and_only_takes_characters_away(text: str) -> None:
    fragments = parse_weights(text)

    assert fragments and all(isinstance(piece, str) and isinstance(weight, float) for piece, weight in fragments)
    assert all(a[1] != b[1] for a, b in itertools.pairwise(fragments))  # equal neighbours merged
    assert _is_subsequence("".join(piece for piece, _ in fragments), text)


@given(st.text().filter(lambda text: not set(text) & set("()[]:\\")))
def test_text_without_brackets_is_one_fragment_of_weight_one(text: str) -> None:
    assert parse_weights(text) == [(text, 1.0)]


def test_tokens_are_chunked_by_75_between_bos_and_eos_with_their_weights(clip: Any) -> None:
    tokenizer = clip.tokenizers[0]

    chunks = token_chunks(tokenizer, parse_weights("(" + "x" * 74 + ":2)" + "yz"))  # 76 tokens

    assert [len(chunk.ids) for chunk in chunks] == [77, 77] and [chunk.length for chunk in chunks] == [77, 3]
    first, second = chunks
    assert first.ids[0] == BOS and first.ids[76] == EOS and first.weights == (1.0, *[2.0] * 74, 1.0, 1.0)
    assert second.ids[:3] == (BOS, ord("z") + 256, EOS) and second.ids[3:] == (tokenizer.pad_token_id,) * 74
    assert second.weights == (1.0,) * 77
    assert len(token_chunks(tokenizer, parse_weights("x" * 75))) == 1
    assert len(token_chunks(tokenizer, parse_weights(LONG))) == 3
    assert [chunk.length for chunk in token_chunks(tokenizer, parse_weights(""))] == [2]



def encoded(engine: Engine, tiny_models: Path, checkpoint: str, text: str, **inputs: Any) -> Any:
    graph = Graph()
    clip = CheckpointLoader(model=str(tiny_models / checkpoint)).clip
    graph.output("conditioning", graph.add(TextEncode(clip=clip, text=text, **inputs)).conditioning)
    return engine.run(graph).outputs["conditioning"]


def encode_prompt(tiny_models: Path, checkpoint: str, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The diffusers pipeline's (embeds, pooled or None) for `text`."""
    import diffusers

    if checkpoint == "sd15":
        sd = diffusers.StableDiffusionPipeline.from_pretrained(tiny_models / "sd15", safety_checker=None)
        with torch.no_grad():
            return sd.encode_prompt(text, "cpu", 1, False)[0], None
    xl = diffusers.StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl", add_watermarker=False)
    with torch.no_grad():
        positive, _, pooled, _ = xl.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
    return positive, pooled


@pytest.mark.parametrize("checkpoint", ["sd15", "sdxl"])
def test_weighting_off_is_the_pipelines_encode_prompt_bit_for_bit(checkpoint: str, engine: Engine,
                                                                  tiny_models: Path) -> None:
    conditioning = encoded(engine, tiny_models, checkpoint, "a (cosy:1.5) [reading] corner", weighting=False)
    embeds, pooled = encode_prompt(tiny_models, checkpoint, "a (cosy:1.5) [reading] corner")  # brackets as text

    assert torch.equal(conditioning.embeds, embeds)
    assert pooled is None or torch.equal(conditioning.pooled, pooled)


@pytest.mark.parametrize(("checkpoint", "clip_skip"), [("sd15", 0), ("sd15", 1), ("sdxl", 0), ("sdxl", 1)])
@pytest.mark.parametrize("text", [PROMPT, "(a cosy reading corner:1), warm light", "x" * 75, ""])
def test_weights_of_one_on_a_short_prompt_give_the_unweighted_embedding_bit_for_bit(
        checkpoint: str, clip_skip: int, text: str, engine: Engine, tiny_models: Path) -> None:
    # the same ids go through the same encoder call, and weights of one leave A1111's z * w * (mean / new mean) z
    plain = "".join(piece for piece, _ in parse_weights(text))
    weighted = encoded(engine, tiny_models, checkpoint, text, clip_skip=clip_skip, weighting=True)
    unweighted = encoded(engine, tiny_models, checkpoint, plain, clip_skip=clip_skip)

    assert weighted.embeds.shape[1] == 77 and torch.equal(weighted.embeds, unweighted.embeds)
    assert torch.equal(weighted.default_negative.embeds, unweighted.default_negative.embeds)
    if checkpoint == "sdxl":
        assert torch.equal(weighted.pooled, unweighted.pooled)


@pytest.mark.parametrize("checkpoint", ["sd15", "sdxl"])
def test_a_weighted_word_changes_the_embedding_only_at_its_tokens_before_the_mean_is_restored(
        checkpoint: str, engine: Engine, tiny_models: Path) -> None:
    weighted = encoded(engine, tiny_models, checkpoint, "a cosy (reading:1.5) corner", weighting=True).embeds
    plain = encoded(engine, tiny_models, checkpoint, "a cosy reading corner", weighting=True).embeds
    at_word = torch.zeros(77, dtype=torch.bool)
    at_word[6:13] = True  # BOS, "a", "cosy" (4 tokens), then the 7 of "reading"

    # SDXL: each encoder's hidden states are weighted and rescaled on their own, then put side by side. (The tiny
    # SD1.5 encoder's final layer norm has no bias, so its chunk means are ~1e-8 and the scale is rounding noise;
    # the relation holds all the same.)
    halves = [(weighted[..., :32], plain[..., :32]), (weighted[..., 32:], plain[..., 32:])] \
        if checkpoint == "sdxl" else [(weighted, plain)]
    for half, part in halves:
        scale = (part.mean() / (part * torch.where(at_word, 1.5, 1.0)[None, :, None]).mean()).item()
        assert scale != 1.0 and torch.allclose(half.mean(), part.mean(), atol=1e-6)
        assert torch.allclose(half[:, ~at_word] / scale, part[:, ~at_word], rtol=1e-5, atol=1e-6)
        assert torch.allclose(half[:, at_word] / scale, part[:, at_word] * 1.5, rtol=1e-5, atol=1e-6)
    assert weighted.shape == plain.shape and not torch.equal(weighted, plain)


@pytest.mark.parametrize(("checkpoint", "width"), [("sd15", 32), ("sdxl", 64)])
def test_a_200_token_prompt_is_three_chunks_the_first_the_pipelines_cut_off_one(
        checkpoint: str, width: int, engine: Engine, tiny_models: Path) -> None:
    conditioning = encoded(engine, tiny_models, checkpoint, LONG, weighting=True)
    cut_embeds, cut_pooled = encode_prompt(tiny_models, checkpoint, LONG)  # BOS + the first 75 + EOS
    last = encoded(engine, tiny_models, checkpoint, LONG[150:])  # tokens 150..199 on their own

    assert conditioning.embeds.shape == (1, 231, width)
    assert torch.equal(conditioning.embeds[:, :77], cut_embeds)
    assert torch.equal(conditioning.embeds[:, 154:], last.embeds)
    assert cut_pooled is None or torch.equal(conditioning.pooled, cut_pooled)  # SDXL: the first chunk's


def test_the_default_negative_of_a_long_prompt_has_its_length(engine: Engine, tiny_models: Path) -> None:
    sd15 = encoded(engine, tiny_models, "sd15", LONG, weighting=True).default_negative
    empty = encoded(engine, tiny_models, "sd15", "").embeds
    sdxl = encoded(engine, tiny_models, "sdxl", LONG, weighting=True).default_negative  # force_zeros in the tiny one

    assert torch.equal(sd15.embeds, empty.repeat(1, 3, 1))  # the "" chunk three times, as A1111 pads
    assert sdxl.embeds.shape == (1, 231, 64) and bool(sdxl.embeds.eq(0).all())


def test_match_lengths_repeats_each_prompt_to_the_least_common_multiple() -> None:
    short, long, middle = torch.rand(2, 77, 8), torch.rand(2, 231, 8), torch.rand(2, 154, 8)

    same = match_lengths(short, short.clone())
    repeated, kept = match_lengths(short, long)
    both = match_lengths(middle, long)

    assert same[0] is short
    assert kept is long and torch.equal(repeated, torch.cat([short] * 3, dim=1))
    assert [tensor.shape[1] for tensor in both] == [462, 462]


def test_a_repeated_prompt_gives_the_same_cross_attention() -> None:
    # why match_lengths repeats: softmax over k copies of each key gives each copy 1/k of the weight
    generator = torch.Generator().manual_seed(0)
    query, keys = torch.randn(1, 4, 64, 8, generator=generator), torch.randn(1, 4, 77, 8, generator=generator)
    values = torch.randn(1, 4, 77, 8, generator=generator)
    attend = torch.nn.functional.scaled_dot_product_attention

    assert torch.allclose(attend(query, keys.repeat(1, 1, 3, 1), values.repeat(1, 1, 3, 1)),
                          attend(query, keys, values), atol=1e-6)


@pytest.mark.parametrize(("text", "message"), [
    ("((a:" + "9" * 300 + "):" + "9" * 300 + ")", "multiply past what a float holds"),
    ("(a:" + "9" * 200 + ")", "without a finite mean"),
])
def test_weights_that_break_the_arithmetic_are_refused(text: str, message: str, ctx: RunContext, clip: Any) -> None:
    with pytest.raises(NodeInputError, match=message):
        TextEncode().run(ctx, clip=clip, text=text, clip_skip=0, weighting=True)


def render(engine: Engine, tiny_models: Path, checkpoint: str, positive: str, negative: str | None) -> torch.Tensor:
    graph = Graph()
    sd = graph.add(CheckpointLoader(model=str(tiny_models / checkpoint)))
    inputs: dict[str, Any] = {"positive": TextEncode(clip=sd.clip, text=positive, weighting=True).conditioning}
    if negative is not None:
        inputs["negative"] = TextEncode(clip=sd.clip, text=negative).conditioning
    sampled = Sampler(model=sd.model, seed=3, steps=2, width=64, height=64, **inputs)
    graph.output("image", graph.add(VAEDecode(vae=sd.vae, latent=sampled.latent)).image)
    return engine.run(graph).outputs["image"]


LONG_WEIGHTED = "(a cosy reading corner:1.3), " * 8 + "[warm light], soft shadows, ((oak shelves))"  # 190 tokens


@pytest.mark.parametrize("checkpoint", ["sd15", "sdxl"])
def test_a_long_weighted_prompt_renders_whole_with_the_default_negative(checkpoint: str, engine: Engine,
                                                                        tiny_models: Path) -> None:
    image = render(engine, tiny_models, checkpoint, LONG_WEIGHTED, None)
    other_end = render(engine, tiny_models, checkpoint, LONG_WEIGHTED.replace("oak", "elm"), None)  # in chunk 3

    assert image.shape == (1, 64, 64, 3) and bool(image.isfinite().all())
    assert not torch.equal(image, other_end)  # the words past the 77th token reach the image


@pytest.mark.parametrize("checkpoint", ["sd15", "sdxl"])
def test_a_long_weighted_prompt_renders_with_a_short_unweighted_negative(checkpoint: str, engine: Engine,
                                                                         tiny_models: Path) -> None:
    image = render(engine, tiny_models, checkpoint, LONG_WEIGHTED, "blurry")

    assert image.shape == (1, 64, 64, 3) and bool(image.isfinite().all())
    assert not torch.equal(image, render(engine, tiny_models, checkpoint, LONG_WEIGHTED, None))
