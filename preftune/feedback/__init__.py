"""Building preference data: sampling completions (generate), judges, and labelling them into pairs."""
