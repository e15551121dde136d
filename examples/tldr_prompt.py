"""A ``data.row_mapper`` for TL;DR comparisons (openai/summarize_from_feedback): the prompt the DPO paper's
summarization experiment writes from a Reddit post, and the preferred summary as ``chosen``.

    data:
      train_file: examples/tldr_comparisons.jsonl
      row_mapper: examples/tldr_prompt.py:to_pair
"""


def to_pair(row: dict) -> dict:
    info, summaries, choice = row["info"], row["summaries"], row["choice"]
    prompt = f"SUBREDDIT: r/{info['subreddit']}\nTITLE: {info['title']}\nPOST: {info['post']}\nTL;DR:"
    return {"prompt": prompt, "chosen": summaries[choice]["text"], "rejected": summaries[1 - choice]["text"]}
