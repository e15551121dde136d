"""The constitution judge (Bai et al. 2022, "Constitutional AI", §4.1): a local chat model is asked which of two
answers better follows a principle drawn from the constitution for that comparison. As the ``chat_model`` judge
does, it asks in both orders and reads P("A") from the logits of the two answer letters, so ``compare`` returns
a probability (a soft label, as the paper's AI feedback is) with compare(a, b) + compare(b, a) = 1 exactly. The
principle is drawn from a hash of (seed, prompt, the two answers in canonical order): both orders and both
argument orders see the same principle.

``judge: {type: constitution, model: {name_or_path: ...}, constitution: my_principles.yaml}``
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import ModelConfig
from ..constitution import draw, load_constitution
from . import Prompt, render_prompt
from .chat_model import ChatModelJudge, ChatModelJudgeConfig

TEMPLATE = """Consider a conversation between a user and an assistant, and two possible answers of the assistant.

[User request]
{prompt}

[Answer A]
{first}

[Answer B]
{second}

{principle} Reply with a single letter: A or B."""


@dataclass
class ConstitutionJudgeConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    constitution: str = ""  # a YAML list of principles; "" = preftune's bundled example constitution
    template: str = TEMPLATE  # {prompt}, {first}, {second} and {principle} (the comparison question)
    seed: int = 0  # which principle each comparison draws
    batch_size: int = 4
    answer_tokens: list[str] = field(default_factory=lambda: ["A", "B"])


class ConstitutionJudge(ChatModelJudge):
    Config = ConstitutionJudgeConfig

    def __init__(self, config: ConstitutionJudgeConfig):
        from ...config import ConfigError
        from .templates import check_template

        try:  # the chat-model template rules, with {principle} as the one extra placeholder
            check_template(config.template.replace("{principle}", "{{principle}}"), "pairwise", "judge.template")
        except ConfigError as exc:
            raise ConfigError(f"{exc} (and {{principle}})") from exc
        self.principles = load_constitution(config.constitution, "judge.constitution")
        self.constitution_config = config
        super().__init__(ChatModelJudgeConfig(model=config.model, template=config.template.replace("{principle}", "{{principle}}"),
                                              batch_size=config.batch_size, answer_tokens=config.answer_tokens))

    def _render(self, prompt: Prompt, first: str, second: str) -> str:
        text = render_prompt(prompt)
        principle = draw(self.principles, self.constitution_config.seed, text, min(first, second), max(first, second))
        body = self.constitution_config.template.format(prompt=text, first=first, second=second,
                                                        principle=principle.comparison)
        return self.tokenizer.apply_chat_template([{"role": "user", "content": body}], add_generation_prompt=True,
                                                  tokenize=False)
