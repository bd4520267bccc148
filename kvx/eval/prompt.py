"""How a task sample becomes token ids: one chat turn, split where the question starts.

The user message is `context + "\\n\\n" + question`; the assistant turn opens with the sample's answer
prefix, appended after the generation prompt. The ids are cut in two right after the context:

    context ids   chat-template prefix + context          (what question-agnostic mode compresses)
    question ids  "\\n\\n" + question + end of the user turn + assistant header + answer prefix

Both modes see the same token sequence (context ids + question ids); only what is compressed differs.
This is the layout kvpress's pipeline uses, so both runtimes read identical prompts.

Numbers after the answer prefix: tokenizers that split digits one by one (Llama 3, Qwen, SmolLM) write
" 42900" as a bare " " token followed by the digits. A prompt ending in "The pass key is" then asks the
model to produce that bare space first, which a small model rarely does (it says " the pass key..."
instead): SmolLM2-135M finds 3 of 6 pass keys at 1k tokens that way, 6 of 6 with the space in the
prompt. So when a task's answers are numbers (a property of the task, not of the value: any number
gives the same decision) and the tokenizer would write the space as a token of its own, the prompt
ends with that space, exactly as the text "The pass key is 42900" tokenizes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvx.models.tokenizer import split_chat_turn


# What aware-plain mode appends to a question whose answers are numbers (tests/test_compression.py's
# passkey prompt, the format the default model answers reliably with its full cache).
PLAIN_NUMBER_INSTRUCTION = " Answer with the number only."


@dataclass(frozen=True)
class PromptIds:
    context: list[int]
    question: list[int]

    @property
    def full(self) -> list[int]:
        return self.context + self.question


@dataclass(frozen=True)
class PromptText:
    """The same split as text (what kvpress's pipeline is given)."""

    context: str  # the sample's context, without template
    question: str  # "\n\n" + question
    answer_prefix: str


def prompt_text(sample, tokenizer=None, answer_prefix: bool = True) -> PromptText:
    """The prompt's parts as text; with a tokenizer, the answer prefix as the model will read it.

    answer_prefix=False: the plain question, nothing after the assistant header (what a user typing one
    prompt sends; `kvx eval --mode aware-plain`)."""
    if not answer_prefix:
        # Without RULER's answer prefix the question alone ("What is the pass key?") gets an explanation of
        # what a pass key is, even from the full cache; a user asks for the value.
        ask = PLAIN_NUMBER_INSTRUCTION if sample.answers and all(a.isdigit() for a in sample.answers) else ""
        return PromptText(context=sample.context, question="\n\n" + sample.question + ask, answer_prefix="")
    prefix = sample.answer_prefix
    if tokenizer is not None:
        prefix += answer_lead(tokenizer, sample)
    return PromptText(context=sample.context, question="\n\n" + sample.question, answer_prefix=prefix)


def answer_lead(tokenizer, sample) -> str:
    """" " when the answers are numbers and the tokenizer writes a number's leading space on its own."""
    if not sample.answers or not all(a.isdigit() for a in sample.answers):
        return ""
    prefix = sample.answer_prefix
    with_space = list(tokenizer.encode(prefix + " ", add_special_tokens=False))
    with_number = list(tokenizer.encode(prefix + " 0", add_special_tokens=False))
    return " " if with_number[:len(with_space)] == with_space else ""


def build_prompt(tokenizer, sample, answer_prefix: bool = True) -> PromptIds:
    """Token ids of `sample`'s prompt, split after the context (see the module docstring); without the
    answer prefix when answer_prefix is False."""
    text = prompt_text(sample, tokenizer, answer_prefix)
    templated = bool(getattr(tokenizer, "has_chat_template", False))
    if templated:
        head, tail = split_chat_turn(tokenizer, text.context, text.question)
        tail += text.answer_prefix
    else:
        head, tail = text.context, text.question + "\n" + text.answer_prefix
    # A template writes its own special tokens into the text; a bare prompt gets the tokenizer's (BOS).
    context_ids = tokenizer.encode(head, add_special_tokens=not templated)
    question_ids = tokenizer.encode(tail, add_special_tokens=False)
    return PromptIds(context=list(context_ids), question=list(question_ids))
