"""The objectives table: name -> Objective (function, parameter type, traits), and each objective's typed
parameters. Explicit on purpose: adding a variant means one file and one line here; nothing is discovered or
registered by decorators."""

from __future__ import annotations

import dataclasses

from .aot import AOTParams, aot_loss, aot_unpaired_loss
from .apo import APOParams, apo_down_loss, apo_zero_loss
from .base import Objective
from .bco import BCOParams, bco_loss
from .beta_dpo import BetaDPOParams, beta_dpo_loss
from .cpo import CPOParams, cpo_loss
from .d2o import D2OParams, d2o_loss
from .discopop import DiscoPOPParams, discopop_loss
from .dpo import DPOParams, dpo_loss
from .dpo_norm import DPONormParams, dpo_norm_loss
from .dpop import DPOPParams, dpop_loss
from .dro import DROParams, dro_loss
from .exo import EXOParams, exo_loss
from .gpo import GPOParams, gpo_loss
from .hinge import HingeParams, hinge_loss
from .ipo import IPOParams, ipo_loss
from .kto import KTOParams, kto_loss
from .nca import NCAParams, nca_loss
from .npo import NPOParams, npo_loss
from .orpo import ORPOParams, orpo_loss
from .plackett_luce import PlackettLuceParams, plackett_luce_loss
from .robust import RobustParams, robust_loss
from .sft import SFTParams, sft_loss
from .simpo import SimPOParams, simpo_loss
from .slic import SLiCParams, slic_loss
from .sppo import SPPOParams, sppo_loss
from .sppo_hard import SPPOHardParams, sppo_hard_loss
from .tdpo import TDPOParams, tdpo_loss
from .unlikelihood import UnlikelihoodParams, unlikelihood_loss

OBJECTIVES: dict[str, Objective] = {
    "dpo": Objective(
        "dpo", dpo_loss, DPOParams, needs_reference=True,
        paper="Rafailov et al. 2023, Direct Preference Optimization (Eq. 7); cDPO with label_smoothing; "
        "f-DPO with f_divergence (Wang et al. 2023, Beyond Reverse KL, Theorem 1, Table 1)",
    ),
    "ipo": Objective(
        "ipo", ipo_loss, IPOParams, needs_reference=True,
        paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences (Eq. 17)",
    ),
    "robust": Objective(
        "robust", robust_loss, RobustParams, needs_reference=True,
        paper="Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy Feedback (Eq. 8)",
    ),
    "hinge": Objective(
        "hinge", hinge_loss, HingeParams, needs_reference=True,
        paper="Zhao et al. 2023, SLiC-HF (§2); Liu et al. 2024, Statistical Rejection Sampling Improves "
        "Preference Optimization (Eq. 7, hinge)",
    ),
    "simpo": Objective(
        "simpo", simpo_loss, SimPOParams, needs_reference=False,
        paper="Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward (Eq. 6)",
    ),
    "cpo": Objective(
        "cpo", cpo_loss, CPOParams, needs_reference=False,
        paper="Xu et al. 2024, Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance "
        "in Machine Translation (Eq. 3-4)",
    ),
    "orpo": Objective(
        "orpo", orpo_loss, ORPOParams, needs_reference=False,
        paper="Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model (Eq. 6-7)",
    ),
    "tdpo": Objective(
        "tdpo", tdpo_loss, TDPOParams, needs_reference=True, needs_token_kl=True,
        paper="Zeng et al. 2024, Token-level Direct Preference Optimization (TDPO1 Eq. 17, TDPO2 Eq. 19)",
    ),
    "sft": Objective(
        "sft", sft_loss, SFTParams, needs_reference=False, shapes=("pairs", "completions"), uses_rejected=False,
        paper="Supervised fine-tuning (mean token NLL); the Preferred-FT baseline of Rafailov et al. 2023, "
        "Direct Preference Optimization (§6)",
    ),
    "dpop": Objective(
        "dpop", dpop_loss, DPOPParams, needs_reference=True,
        paper="Pal et al. 2024, Smaug: Fixing Failure Modes of Preference Optimisation with DPO-Positive (Eq. 3)",
    ),
    "gpo": Objective(
        "gpo", gpo_loss, GPOParams, needs_reference=True,
        paper="Tang et al. 2024, Generalized Preference Optimization: A Unified Approach to Offline Alignment "
        "(f(βρ), Table 1)",
    ),
    "nca": Objective(
        "nca", nca_loss, NCAParams, needs_reference=True,
        paper="Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards "
        "(NCA, pairwise K = 2)",
    ),
    "exo": Objective(
        "exo", exo_loss, EXOParams, needs_reference=True,
        paper="Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment (EXO-pref, Eq. 16)",
    ),
    "aot": Objective(
        "aot", aot_loss, AOTParams, needs_reference=True, batch_level=True,
        paper="Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport (AOT paired)",
    ),
    "aot_unpaired": Objective(
        "aot_unpaired", aot_unpaired_loss, AOTParams, needs_reference=True, batch_level=True,
        paper="Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport "
        "(AOT unpaired)",
    ),
    "apo_zero": Objective(
        "apo_zero", apo_zero_loss, APOParams, needs_reference=True,
        paper="D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions (Eq. 7)",
    ),
    "apo_down": Objective(
        "apo_down", apo_down_loss, APOParams, needs_reference=True,
        paper="D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions (Eq. 8)",
    ),
    "discopop": Objective(
        "discopop", discopop_loss, DiscoPOPParams, needs_reference=True,
        paper="Lu et al. 2024, Discovering Preference Optimization Algorithms with and for Large Language Models "
        "(LRML, Eq. 5)",
    ),
    "sppo_hard": Objective(
        "sppo_hard", sppo_hard_loss, SPPOHardParams, needs_reference=True,
        paper="Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment "
        "(Eq. 4.7, hard win probabilities)",
    ),
    "sppo": Objective(
        "sppo", sppo_loss, SPPOParams, needs_reference=True, shapes=("scored",), requires=("scores",),
        paper="Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment "
        "(Algorithm 1, Eq. 4.7, soft win probabilities P̂ of scored samples)",
    ),
    "dpo_norm": Objective(
        "dpo_norm", dpo_norm_loss, DPONormParams, needs_reference=True,
        paper="Rafailov et al. 2023, DPO (Eq. 7) on token-averaged log-ratios; the length-normalisation "
        "ablation of Meng et al. 2024, SimPO",
    ),
    "slic": Objective(
        "slic", slic_loss, SLiCParams, needs_reference=False,
        paper="Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback (Eq. 2)",
    ),
    "kto": Objective(
        "kto", kto_loss, KTOParams, needs_reference=True, shapes=("unpaired",), batch_level=True,
        requires=("labels",), uses=("policy_kl_logps", "reference_kl_logps"),
        paper="Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization (Eq. 8)",
    ),
    "bco": Objective(
        "bco", bco_loss, BCOParams, needs_reference=True, batch_level=True,
        paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment "
        "(paired, running-mean reward shift δ)",
    ),
    "beta_dpo": Objective(
        "beta_dpo", beta_dpo_loss, BetaDPOParams, needs_reference=True, batch_level=True,
        paper="Wu et al. 2024, β-DPO: Direct Preference Optimization with Dynamic β (Eq. 6-7, margin filter "
        "kept deterministically)",
    ),
    "npo": Objective(
        "npo", npo_loss, NPOParams, needs_reference=True, shapes=("negatives",),
        paper="Zhang et al. 2024, Negative Preference Optimization: From Catastrophic Collapse to Effective "
        "Unlearning (Eq. 3)",
    ),
    "d2o": Objective(
        "d2o", d2o_loss, D2OParams, needs_reference=True, shapes=("negatives_with_samples",),
        paper="Duan et al. 2024, Negating Negatives: Alignment with Human Negative Samples via Distributional "
        "Dispreference Optimization (D²O loss)",
    ),
    "dro": Objective(
        "dro", dro_loss, DROParams, needs_reference=True, shapes=("scored",), needs_value=True,
        requires=("scores", "values"),
        paper="Richemond et al. 2024, Offline Regularised Reinforcement Learning for Large Language Models "
        "Alignment (DRO-V, Eq. 9-10)",
    ),
    "plackett_luce": Objective(
        "plackett_luce", plackett_luce_loss, PlackettLuceParams, needs_reference=True, shapes=("ranked",),
        paper="Rafailov et al. 2023, Direct Preference Optimization (Plackett-Luce, Appendix A.3, Eq. 18)",
    ),
    "unlikelihood": Objective(
        "unlikelihood", unlikelihood_loss, UnlikelihoodParams, needs_reference=False,
        paper="Welleck et al. 2019, Neural Text Generation with Unlikelihood Training; the Unlikelihood "
        "baseline of Rafailov et al. 2023, Direct Preference Optimization (§6), on mean token log-probs",
    ),
}

# Terms and modifiers any paired objective can take beside its own parameters (see plan.py and modifiers.py).
SHARED_PARAMS = ("rpo_alpha", "ld_alpha", "wpo", "weight", "mixture")


def edit_distance(a: str, b: str) -> int:
    """Insertions, deletions, substitutions and swaps of two neighbours (optimal string alignment)."""
    rows = [list(range(len(b) + 1))] + [[i] + [0] * len(b) for i in range(1, len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[-1][-1]


def closest_names(name: str, names, n: int = 3) -> list[str]:
    """Up to ``n`` names nearest to ``name`` (edit distance, then length difference), within half its length."""
    limit = max(1, len(name) // 2)
    ranked = sorted((edit_distance(name, other), abs(len(other) - len(name)), other) for other in names)
    return [other for distance, _, other in ranked if distance <= limit][:n]


def get_objective(name: str) -> Objective:
    """The table row for ``name``; an unknown name is an error that names the closest and lists the valid ones."""
    if name not in OBJECTIVES:
        close = closest_names(name, OBJECTIVES)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown objective {name!r}{hint}; valid objectives: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name]


def param_names(objective: Objective) -> list[str]:
    return [f.name for f in dataclasses.fields(objective.params)]


def make_params(name: str, values: dict) -> object:
    """Build ``name``'s typed parameters; a parameter it does not take is an error listing the ones it does."""
    objective = get_objective(name)
    allowed = param_names(objective)
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(
            f"objective {name!r} does not take parameter(s) {', '.join(unknown)}; "
            f"its parameters are: {', '.join(allowed) or '(none)'}"
            + (f" (and {', '.join(SHARED_PARAMS)} for paired objectives)" if "pairs" in objective.shapes else "")
        )
    defaults = {f.name: f.default for f in dataclasses.fields(objective.params)}
    return objective.params(**{key: _coerce_param(name, key, v, defaults[key]) for key, v in values.items()})


def _coerce_param(objective: str, key: str, value: object, default: object) -> object:
    """``value`` as the type of ``default``; ints and numeric strings become floats where a float is expected
    (YAML 1.1 reads ``1e-1`` as a string); anything else of the wrong type (a bool included) is an error."""
    if default is dataclasses.MISSING:
        return value
    expected = type(default)
    if expected is float and not isinstance(value, bool):
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if isinstance(value, expected) and isinstance(value, bool) == (expected is bool):
        return value
    raise TypeError(
        f"objective {objective!r}: parameter {key} expects {expected.__name__}, got {value!r} ({type(value).__name__})"
    )
