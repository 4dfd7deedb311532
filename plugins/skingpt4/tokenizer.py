"""Tokenizers of SkinGPT-4 model folders.

:func:`add_skingpt4_tokens` prepares any released tokenizer (Falcon's, Llama-2's): it adds
``<ImageHere>`` and the image pad token as special tokens and the SkinGPT-4 chat template.
:func:`encode_like_sentencepiece` makes a SentencePiece tokenizer (Llama-2's) give the original's
ids for whole prompts. :func:`build_tiny_tokenizer` makes a small byte-level BPE for generated
test checkpoints that behaves like the family's own: Falcon has no BOS, Llama-2 starts with ``<s>``.
:func:`build_word_tokenizer` makes a word-level one for benchmark checkpoints, whose answers
re-tokenize to the ids that were generated, whatever they are (canonical answers).
"""

from __future__ import annotations

import itertools
import json
import string

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AddedToken, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from plugins.skingpt4.config import IMAGE_PAD, IMAGE_PLACEHOLDER
from plugins.skingpt4.template import CHAT_TEMPLATE, CONSULT_QUESTIONS, DEFAULT_SYSTEM

_CORPUS = [
    DEFAULT_SYSTEM,
    "###Human: <Img></Img> What's wrong with my skin?###Assistant: ",
    *CONSULT_QUESTIONS,
    "The image shows an erythematous plaque with silvery scales on the extensor surface.",
    "The lesion is a well-demarcated, hyperpigmented macule with irregular borders.",
    "Likely conditions include psoriasis, eczema, atopic dermatitis, melanoma, basal cell "
    "carcinoma, acne vulgaris, rosacea, tinea corporis, vitiligo, urticaria and seborrheic "
    "keratosis. Causes may be genetic, autoimmune, infectious, allergic or related to sun exposure.",
    "Treatment options: topical corticosteroids, emollients, antifungal cream, retinoids, "
    "phototherapy, biopsy and excision. Please see a dermatologist for a diagnosis.",
    "Itching, redness, swelling, papules, pustules, vesicles, nodules, ulceration, crusting.",
    "0123456789 . , ; : ! ? ' \" ( ) [ ] { } - _ / \\ # * + = < > @ & % $ ^ ~ ` |",
    '{"observed_features": ["red"], "likely_conditions": [{"name": "eczema", "confidence": 0.5}],'
    ' "urgency": "routine", "see_clinician": true, "advice": "Keep the skin moisturised."}',
]

FAMILY_SPECIALS = {
    "falcon": {"eos": "<|endoftext|>", "bos": None},
    "llama": {"eos": "</s>", "bos": "<s>"},
}


def build_tiny_tokenizer(family: str, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    specials = FAMILY_SPECIALS[family]
    special_tokens = [t for t in (specials["bos"], specials["eos"], "<unk>") if t]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return _family_tokenizer(tok, family, processors.ByteLevel(trim_offsets=False))


def _family_tokenizer(tok: Tokenizer, family: str, no_bos_post_processor=None,
                      **kwargs) -> PreTrainedTokenizerFast:
    """``tok`` with the family's special tokens: Llama-2 puts ``<s>`` first, Falcon nothing."""
    specials = FAMILY_SPECIALS[family]
    if specials["bos"]:
        bos = specials["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    elif no_bos_post_processor is not None:
        tok.post_processor = no_bos_post_processor
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=specials["bos"],
        eos_token=specials["eos"],
        unk_token="<unk>",
        model_max_length=2048,
        **kwargs,
    )


# Pieces of text a word tokenizer never merges: each is a token of its own.
WORD_PUNCTUATION = tuple(string.punctuation)
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


def word_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split at whitespace (dropped), then every punctuation character on its own."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )


def _filler_words(taken: set[str]) -> itertools.chain:
    """Pronounceable two- and three-syllable words (``baba``, ``babe``, ...) not in ``taken``."""
    words = itertools.chain(
        ("".join(p) for p in itertools.product(_SYLLABLES, repeat=2)),
        ("".join(p) for p in itertools.product(_SYLLABLES, repeat=3)),
    )
    return (w for w in words if w not in taken)


def build_word_tokenizer(family: str, vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose decode and encode are inverse on every sequence of ordinary
    tokens, so a model's answer, sent back as history, tokenizes to the ids it was generated as.

    Random benchmark weights answer with arbitrary token ids. With a byte-level BPE their text
    re-tokenizes differently (adjacent tokens merge, partial UTF-8 bytes become U+FFFD), so the
    next turn's prompt leaves the prefix cache right after the previous prompt. Here a token is
    either one punctuation character or a run of characters that are neither punctuation nor
    whitespace, decoding joins tokens with a space, and encoding splits at whitespace and
    isolates each punctuation character: ``encode(decode(ids)) == ids`` for any ids but the special tokens (which decoding
    skips). An answer cannot contain ``###`` (it decodes as ``# # #``), so the ``###`` stop
    never cuts a token in two. The vocabulary: the special tokens, every piece of
    the SkinGPT-4 prompts and of a small dermatology corpus, the punctuation and digits, then
    pronounceable filler words up to ``vocab_size``; text outside it encodes as ``<unk>``.
    """
    specials = FAMILY_SPECIALS[family]
    special_tokens = [t for t in (specials["bos"], specials["eos"], "<unk>") if t]
    pre = word_pre_tokenizer()
    pieces = [piece for text in _CORPUS for piece, _ in pre.pre_tokenize_str(text)]
    words = list(dict.fromkeys([*special_tokens, *pieces, *WORD_PUNCTUATION, *string.digits]))
    if len(words) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is below the {len(words)} tokens the prompts need")
    words += itertools.islice(_filler_words(set(words)), vocab_size - len(words))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(special_tokens)
    # No decoder: tokenizers joins the tokens with a space.
    return _family_tokenizer(tok, family, clean_up_tokenization_spaces=False)


def encode_like_sentencepiece(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A SentencePiece tokenizer that encodes every piece of text between special tokens as
    ``SentencePieceProcessor.encode`` does: with the dummy prefix "▁". Other tokenizers are
    returned as they are.

    SkinGPT-4 tokenizes the prompt segment by segment, split at ``<ImageHere>``, so each segment
    (``</Img> What's...`` after an image) starts with "▁"; vLLM tokenizes the whole prompt. The
    Llama-2 folder's own tokenizer cannot give the same ids: transformers 5 builds it with a
    ``Metaspace`` pre-tokenizer whatever its ``tokenizer.json`` says, which prefixes the first
    piece only (``legacy: false``) or every piece that lacks one (``legacy: true``, and the flag
    is not saved again), never "▁▁" for a piece that starts with a space as SentencePiece does.
    SentencePiece's own normalization, a ``Prepend`` applied to each piece, does all of it, the
    chat template's ``<s>Give...`` (``▁Give``) included. It is saved as a plain
    ``tokenizers`` tokenizer (``tokenizer.json``, class ``TokenizersBackend``), which vLLM and
    transformers load as written; the token ids stay a pure function of the text.
    """
    backend = tokenizer.backend_tokenizer
    spec = json.loads(backend.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "Metaspace":
        return tokenizer  # byte-level BPE (Falcon, tiny checkpoints) or already per piece
    rebuilt = Tokenizer.from_str(backend.to_str())
    space = pre.get("replacement", "\u2581")
    steps = [normalizers.Replace(" ", space)]
    if pre.get("prepend_scheme", "always") != "never":  # SentencePiece's add_dummy_prefix
        steps.insert(0, normalizers.Prepend(space))
    if rebuilt.normalizer is not None:  # e.g. SentencePiece's NFKC charsmap runs first
        steps.insert(0, rebuilt.normalizer)
    rebuilt.normalizer = normalizers.Sequence(steps)
    rebuilt.pre_tokenizer = None
    return PreTrainedTokenizerFast(
        tokenizer_object=rebuilt,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        unk_token=tokenizer.unk_token,
        pad_token=tokenizer.pad_token,
        model_max_length=tokenizer.model_max_length,
        clean_up_tokenization_spaces=False,
    )


def add_skingpt4_tokens(tokenizer: PreTrainedTokenizerBase, family: str) -> tuple[int, int]:
    """Add the image tokens and the chat template; return (image_token_id, image_pad_token_id).

    SkinGPT-4 adds the tokenizer's special tokens to the first prompt segment only: Llama-2's
    prompt starts with BOS, Falcon's with nothing. Chat prompts are tokenized without special
    tokens, so the template writes the BOS itself.
    """
    tokenizer.add_tokens(
        [AddedToken(IMAGE_PLACEHOLDER, special=True, normalized=False),
         AddedToken(IMAGE_PAD, special=True, normalized=False)],
        special_tokens=True,
    )
    bos = FAMILY_SPECIALS[family]["bos"] and tokenizer.bos_token
    tokenizer.chat_template = ("{{- bos_token -}}" if bos else "") + CHAT_TEMPLATE
    return (
        tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
        tokenizer.convert_tokens_to_ids(IMAGE_PAD),
    )
