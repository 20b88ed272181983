"""The toy world's tokenizer.

A byte-level BPE (GPT-2 / Qwen2 style) trained offline on the world's fixed text (the protocol's
prompts, Search-R1's and the demonstrations' template, the corrective message, every passage
and question template, the observation format) and on the syllable inventory, not on the names
themselves. Merges that would join two syllables are dropped, so a name is always its syllables
("ĠVas", "fol"), held-out names included, and every token of held-out text occurs in training
text. Most other words of the fixed text are one token. The tags <think>, </think>, <search>,
</search>, <answer>, </answer>, <information> and </information> are single added tokens that
decode as text; <|endoftext|>, <|im_start|> and <|im_end|> are special tokens. eos (and pad)
is <|endoftext|>, as in Qwen2.5 base models, which this plain-text protocol stands in for.
"""

import json
import re
from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tspo_jax.protocol import DEFAULT_TEMPLATE, TAGS
from tspo_jax.toyworld.world import SYLLABLES, fixed_text

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
# ChatML, as Qwen2.5's tokenizers; used only by build_prompt(..., chat=True).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _without_cross_syllable_merges(tok: Tokenizer) -> Tokenizer:
    """`tok` less every merge that joins two syllables (learned from English words such as
    "write" = "w" "ri" "te", it would also join them in a name) and every token that only such a
    merge made reachable; ids stay in their order, renumbered without gaps."""
    state = json.loads(tok.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    pieces = set(SYLLABLES) | {"Ġ" + s.capitalize() for s in SYLLABLES}
    reachable = {t for t in vocab if len(t) == 1} | set(SPECIAL_TOKENS)  # bytes, specials
    kept = []
    for left, right in merges:
        if left in reachable and right in reachable and not (left in pieces and right in pieces):
            reachable.add(left + right)
            kept.append([left, right])
    order = sorted(reachable, key=vocab.__getitem__)
    state["model"]["vocab"] = {t: i for i, t in enumerate(order)}
    state["model"]["merges"] = kept
    state["model"]["ignore_merges"] = False  # a name is always its merges, never a vocab hit
    for added in state["added_tokens"]:
        added["id"] = state["model"]["vocab"][added["content"]]
    return Tokenizer.from_str(json.dumps(state))


def train_tokenizer(templates: Sequence[str] = (DEFAULT_TEMPLATE,)) -> PreTrainedTokenizerFast:
    """The world's byte-level BPE (see the module docstring), with every word of the prompt
    templates whole. Deterministic; no world needed, since names are syllables and syllables
    are fixed."""
    strip = re.compile("|".join(re.escape(t) for t in TAGS + SPECIAL_TOKENS))
    texts = [strip.sub(" ", t) for t in fixed_text(templates)]
    # Syllables as words of their own, word-initial (" Ta") and word-internal ("ta"), far more
    # frequent than any English pair, so that their merges rank first.
    texts += [" " + s.capitalize() for s in SYLLABLES] * 100 + list(SYLLABLES) * 100
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,  # a cap never reached: merging stops when every training word is whole
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok = _without_cross_syllable_merges(tok)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
