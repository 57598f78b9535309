"""How PBB examples look: the text of declarative and execution rows, and their tokens with loss masks.

A row is tokenizer-free text: a user ``prompt`` (the pointer rendered by a paraphrase template, plus the
input for execution rows) and the assistant ``completion`` (the instruction text; or the optional CoT trace
followed by ``Answer: <output>``). ``tokenize_row`` renders the prompt through the tokenizer's chat template
with the generation prompt, and appends the completion and the end-of-turn token: the loss mask covers
exactly the completion and that end-of-turn token, never the chat scaffolding or the pointer. The prompt is
tokenized on its own, exactly as it will be at generation time.
"""

from __future__ import annotations

import dataclasses
import json
import random

from pbbjax.data.tasks.base import ANSWER_MARKER, Domain, Example, Instruction

IN_CONTEXT_PREFIX = "Here is {name}:\n\n{text}\n\n"


@dataclasses.dataclass(frozen=True)
class Row:
    stage: str
    kind: str  # "declarative" | "execution"
    instruction_id: str
    split: str  # "train" | "eval": which instruction group the row's instruction belongs to
    prompt: str  # the user message
    completion: str  # the assistant message the loss is on
    input: str | None = None  # execution rows: JSON list of positional arguments (or null)
    output: str | None = None  # execution rows: the JSON-encoded result, or the sentence
    meta: str | None = None  # execution rows: JSON of Example.meta (e.g. the cipher shift)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def pick_template(templates: tuple[str, ...], rng: random.Random, augment: bool) -> str:
    """Prompt augmentation: a random paraphrase per row, or always the canonical (first) one."""
    return rng.choice(templates) if augment else templates[0]


def declarative_row(
    domain: Domain, ins: Instruction, split: str, stage: str, rng: random.Random, *, augment: bool, nl: bool
) -> Row:
    text = ins.text_nl if nl else ins.text
    if text is None:
        raise ValueError(f"domain {domain.name!r} has no natural-language form for {ins.id}")
    prompt = pick_template(domain.declarative_templates, rng, augment).format(name=ins.name)
    return Row(stage, "declarative", ins.id, split, prompt, text)


def execution_prompt(
    domain: Domain,
    ins: Instruction,
    example: Example,
    template: str,
    *,
    in_context: bool = False,
    nl: bool = False,
) -> str:
    prompt = template.format(name=ins.name, input=domain.render_input(example))
    if in_context:
        text = ins.text_nl if nl else ins.text
        prompt = IN_CONTEXT_PREFIX.format(name=ins.name, text=text) + prompt
    return prompt


def execution_completion(example: Example, *, cot: bool, nl: bool = False) -> str:
    """The answer line, after the trace with ``cot`` (in the words of the natural-language form with
    ``nl``, where the domain has such a trace)."""
    answer = f"{ANSWER_MARKER} {example.output}"
    trace = (example.cot_nl if nl else None) or example.cot
    return f"{trace}\n{answer}" if cot and trace else answer


def execution_row(
    domain: Domain,
    ins: Instruction,
    example: Example,
    split: str,
    stage: str,
    rng: random.Random,
    *,
    augment: bool,
    cot: bool,
    in_context: bool = False,
    nl: bool = False,
) -> Row:
    template = pick_template(domain.execution_templates, rng, augment)
    return Row(
        stage,
        "execution",
        ins.id,
        split,
        execution_prompt(domain, ins, example, template, in_context=in_context, nl=nl),
        execution_completion(example, cot=cot, nl=nl),
        input=json.dumps(example.input),
        output=example.output,
        meta=json.dumps(example.meta, sort_keys=True),
    )


def chat_prompt(tokenizer, prompt: str) -> str:
    """The user message as the model sees it before answering (chat template + generation prompt)."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{prompt}\n"


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: the first special token after the content in the chat
    template (``<|im_end|>``, ``<|eot_id|>``), else the tokenizer's EOS."""
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00PBB\x00"
        messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": marker}]
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        tail = full[full.index(marker) + len(marker) :]
        ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        if ids and ids[0] in tokenizer.all_special_ids:
            return ids[0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a chat template end-of-turn token nor an eos_token_id")
    return tokenizer.eos_token_id


def tokenize_row(tokenizer, prompt: str, completion: str, eot_id: int) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): prompt tokens masked out, completion + end-of-turn tokens in."""
    # Without a chat template the tokenizer adds its own BOS; chat templates write theirs into the text.
    has_template = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=not has_template)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eot_id]
    return prompt_ids + completion_ids, [0] * len(prompt_ids) + [1] * len(completion_ids)
