"""Instruction rows (prompt, response) as token ids whose labels cover the response only.

A row becomes ``prompt tokens + response tokens``; the prompt's labels are -100, so a causal
LM's loss (and ``evaluate``'s loss and perplexity) counts the response tokens alone. Two
templates, named by round.yaml's ``instruction.template``:

* ``plain``: ``prompt_format`` with the row's prompt in place of ``{prompt}``, then the
  response, then the end-of-sequence token (``[SEP]`` for a tokenizer without one);
* ``chat``: the tokenizer's own chat template (``apply_chat_template``): a user turn holding
  ``prompt_format`` with the prompt in it, then the assistant turn holding the response, with
  the template's own end-of-turn tokens; the generation prompt (``<|im_start|>assistant``) is
  part of the prompt.

The template is rendered once, around placeholders, into fixed token pieces; a row then
tokenises only its prompt and response text, and the pieces are joined as ids. So the
boundary between prompt and response is exact (no merge across it), and truncation to
``max_length`` shortens the prompt's text (from its end), never the template: the response
keeps all its tokens unless it alone does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Template = Literal["plain", "chat"]
PROMPT = "{prompt}"
IGNORE = -100  # label of a token the loss skips
_PROMPT_MARK = "\u2063fedkrso-prompt\u2063"  # placeholders no template or text contains
_RESPONSE_MARK = "\u2063fedkrso-response\u2063"


def check_prompt_format(prompt_format: str) -> str:
    """``prompt_format`` holds ``{prompt}`` exactly once (other braces are literal text)."""
    if prompt_format.count(PROMPT) != 1:
        raise ValueError(f"prompt_format must contain {PROMPT} exactly once, got {prompt_format!r}")
    return prompt_format


@dataclass(frozen=True)
class Pieces:
    """A template's fixed token ids around a row's prompt and response."""

    before_prompt: list[int]
    after_prompt: list[int]
    before_response: list[int]
    after_response: list[int]

    @classmethod
    def build(cls, tokenizer: PreTrainedTokenizerBase, template: Template, prompt_format: str) -> Pieces:
        """The token ids of ``prompt_format``'s text before and after the prompt and of ``template``'s
        turn markers, tokenized once."""
        def ids(text: str) -> list[int]:
            return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

        head, tail = check_prompt_format(prompt_format).split(PROMPT)
        if template == "plain":
            end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
            return cls(ids(head), ids(tail), [], [] if end is None else [end])
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("instruction.template is 'chat' but the tokenizer has no chat template; "
                             "use template: plain")
        user = {"role": "user", "content": head + _PROMPT_MARK + tail}
        prompt = tokenizer.apply_chat_template([user], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template([user, {"role": "assistant", "content": _RESPONSE_MARK}],
                                             tokenize=False)
        reply = full[len(prompt):]
        if not full.startswith(prompt) or prompt.count(_PROMPT_MARK) != 1 or reply.count(_RESPONSE_MARK) != 1:
            raise ValueError("the tokenizer's chat template does not render a conversation as its prompt "
                             "followed by the reply; use template: plain")
        before, after = prompt.split(_PROMPT_MARK)
        reply_before, reply_after = reply.split(_RESPONSE_MARK)
        return cls(ids(before), ids(after), ids(reply_before), ids(reply_after))

    def join(self, prompt: list[int], response: list[int], max_length: int) -> tuple[list[int], list[int]]:
        """(input ids, labels) of one row within ``max_length`` tokens: labels -100 on the
        prompt, the ids themselves on the response."""
        fixed = len(self.before_prompt) + len(self.after_prompt)
        room = max_length - fixed
        if room < 1:
            raise ValueError(f"max_length={max_length} leaves no room for a response after the prompt "
                             f"template's {fixed} tokens")
        reply = (self.before_response + response + self.after_response)[:room]
        prompt_ids = self.before_prompt + prompt[: room - len(reply)] + self.after_prompt
        return prompt_ids + reply, [IGNORE] * len(prompt_ids) + reply


def encode_instructions(tokenizer: PreTrainedTokenizerBase, pieces: Pieces, prompts: list[str],
                        responses: list[str], max_length: int) -> dict[str, list[list[int]]]:
    """``input_ids`` and ``labels`` of a batch of instruction rows. A row whose response has
    no token (empty, and a template that adds none) is refused: it would carry no loss."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for p, r in zip(prompt_ids, response_ids):
        ids, labels = pieces.join(list(p), list(r), max_length)
        if all(label == IGNORE for label in labels):
            raise ValueError("an instruction row has an empty response: nothing to train on")
        out["input_ids"].append(ids)
        out["labels"].append(labels)
    return out
