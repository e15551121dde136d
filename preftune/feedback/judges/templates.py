"""What a language-model judge is asked, and how its reply is read.

Templates are ``str.format`` strings (write ``{{`` and ``}}`` for literal braces): a pairwise template
uses ``{prompt}``, ``{first}`` (shown as Response A) and ``{second}`` (Response B); a pointwise template
uses ``{prompt}`` and ``{completion}``. Replies are read strictly, so that a judge that rambles is counted
as unparsable instead of having a letter fished out of its prose.
"""

from __future__ import annotations

import re
import string

from ...config import ConfigError

PAIRWISE_TEMPLATE = """Which of the two responses below answers the user's request better? Judge helpfulness, \
correctness and clarity; do not let the order of the responses or their length decide.

[User request]
{prompt}

[Response A]
{first}

[Response B]
{second}

Reply with a single letter: A or B."""

POINTWISE_TEMPLATE = """Rate how well the response below answers the user's request, from 1 (useless) to 10 \
(excellent), judging helpfulness, correctness and clarity.

[User request]
{prompt}

[Response]
{completion}

Reply with the number only."""

PLACEHOLDERS = {"pairwise": {"prompt", "first", "second"}, "pointwise": {"prompt", "completion"}}

# "[[A]]" (MT-Bench style) anywhere, or a reply that is only the letter: "A", "A.", "(B)", "Response B"
_BRACKETED = re.compile(r"\[\[\s*([AB])\s*\]\]")
_BARE = re.compile(r"^\W*(?:response\s+)?([AB])\W*$", re.IGNORECASE)
# "[[7]]" anywhere, else the first number of the reply: "7", "7/10", "Score: 8.5"
_BRACKETED_NUMBER = re.compile(r"\[\[\s*(-?\d+(?:\.\d+)?)\s*\]\]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def check_template(template: str, mode: str, key: str) -> None:
    """A template must use every placeholder of its mode and no other (a typo would be a KeyError later)."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"config key '{key}': not a valid template ({exc}); write {{{{ and }}}} for braces") from exc
    wanted = PLACEHOLDERS[mode]
    if used != wanted:
        raise ConfigError(
            f"config key '{key}': a {mode} template must use exactly the placeholders "
            f"{', '.join('{' + p + '}' for p in sorted(wanted))}; it uses {', '.join('{' + p + '}' for p in sorted(used)) or 'none'}"
        )


def parse_verdict(reply: str) -> str | None:
    """"A", "B", or None when the reply does not name exactly one of them."""
    found = set(_BRACKETED.findall(reply))
    if len(found) == 1:
        return found.pop()
    match = _BARE.match(reply.strip())
    return match.group(1).upper() if match and not found else None


def parse_score(reply: str) -> float | None:
    match = _BRACKETED_NUMBER.search(reply) or _NUMBER.search(reply)
    return float(match.group(1) if match.re is _BRACKETED_NUMBER else match.group(0)) if match else None
