"""Raw Anthropic HH transcripts (Anthropic/hh-rlhf): ``chosen`` and ``rejected`` are whole dialogues,
``"\\n\\nHuman: ...\\n\\nAssistant: ..."``, with no prompt column. The turns both share become the prompt.

With a chat template (``data.chat_template`` null or true) the turns become messages (Human -> user,
Assistant -> assistant), so multi-turn history stays a conversation the template renders. With
``data.chat_template: false`` they stay text the way the DPO paper's code feeds HH to a base model: the
prompt is the shared dialogue up to and including ``"\\n\\nAssistant:"`` and each completion is what follows.
"""

from __future__ import annotations

import re

from .fields import check_turns, shared_prefix

ROLES = {"Human": "user", "Assistant": "assistant"}
MARKERS = {role: name for name, role in ROLES.items()}
_TURN = re.compile(r"\n\n(Human|Assistant):")
FORMAT = "'\\n\\nHuman: ...\\n\\nAssistant: ...'"


def looks_like_transcript(text: str) -> bool:
    """A dialogue opened by a Human turn (leading blank lines optional, as some copies strip them)."""
    return text.lstrip().startswith("Human:")


def parse_transcript(text: str, label: str) -> tuple[list[dict] | None, list[str]]:
    """The dialogue as messages, or None and every problem (naming the field and the turn)."""
    parts = _TURN.split("\n\n" + text.lstrip())
    if parts[0].strip():
        return None, [f"field {label}: an Anthropic HH transcript starts with a Human turn ({FORMAT}), but it "
                      f"starts with {parts[0][:30]!r}"]
    messages, problems, previous = [], [], "Assistant"  # the first turn must be a Human one
    for turn, (name, content) in enumerate(zip(parts[1::2], parts[2::2], strict=True), 1):
        if name == previous:
            where = f"follows another {name} turn" if turn > 1 else "opens the transcript"
            problems.append(f"field {label}: turn {turn} ({name}) {where}; turns must alternate Human, "
                            "Assistant, Human, ... starting with Human")
        elif not content.strip():
            problems.append(f"field {label}: turn {turn} ({name}) is empty")
        messages.append({"role": ROLES[name], "content": content.strip()})
        previous = name
    if problems:
        return None, problems
    return messages, check_turns(label, messages)


def render_transcript(messages: list[dict]) -> str:
    return "".join(f"\n\n{MARKERS[m['role']]}: {m['content']}" for m in messages)


def split_transcripts(chosen: list[dict], rejected: list[dict], as_text: bool):
    """(prompt, chosen, rejected) from two parsed dialogues: the turns both share are the prompt. Messages,
    or text in the HH layout when ``as_text``. None when the dialogues share no turn."""
    shared = shared_prefix(chosen, rejected)
    if shared == 0:
        return None
    prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not as_text:
        return prompt, chosen, rejected
    prompt_text = render_transcript(prompt)
    if chosen[0]["role"] == rejected[0]["role"] == "assistant":  # the usual case: both answer the last question
        prompt_text += "\n\nAssistant:"
        return prompt_text, " " + render_transcript(chosen)[len("\n\nAssistant: "):], \
            " " + render_transcript(rejected)[len("\n\nAssistant: "):]
    return prompt_text, render_transcript(chosen), render_transcript(rejected)
