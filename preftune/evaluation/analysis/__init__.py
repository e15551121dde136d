"""Evaluation arithmetic, one concept per file: win rates with bootstrap intervals (``winrate``), sequence KL
from samples (``kl``), response lengths (``lengths``), rank correlation (``spearman``) and the SimPO
likelihood–length analysis of held-out pairs (``likelihood_length``). ``preftune winrate`` and
``preftune eval`` call them."""
