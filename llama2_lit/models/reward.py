"""Reward models: a Llama whose LM head is replaced by a scalar regression head (Llama 2 section 3.2.2), or one
that keeps its LM head and scores an answer by its mean token log-probability (``head="likelihood"``).

The model is transformers' own ``LlamaForSequenceClassification`` (``AutoModelForSequenceClassification``
for other architectures) with ``num_labels=1``: it reads the score at the last token that is not the
pad token, so the tokenizer's pad token must differ from EOS (see ``load_tokenizer``). An exported
folder loads back with ``AutoModelForSequenceClassification.from_pretrained`` and scores identically.

    model = load_reward_model({"path": "outputs/runs/sft/hf"}, tokenizer)   # LM head -> scalar head
    rm, tok = load_exported("outputs/runs/rm/hf")
    rewards = score(rm, tok, ["What is 2 + 2?"], ["4"])                      # tensor (1,)

Two reward heads (``reward.head``):

- ``scalar`` (the paper's): a linear head on the last token's hidden state, new at initialisation.
- ``likelihood``: the chat checkpoint's own LM head is kept and ``r(x, y) = (1/|y|) sum_t log p(y_t | x, y_<t)``
  over the answer's tokens (its end-of-turn tokens included), the length-normalised, reference-free implicit
  reward of SimPO (Meng et al. 2024). At initialisation it ranks answers by the chat model's own judgement, and the
  ranking loss then trains the whole LM on the preferences. On the synthetic world a scalar head on the same
  4-layer model ranks a smaller policy's samples at 0.69, this head at 0.79 before training and 0.80 after
  (docs/results.md, "Reward models that can judge"). The export is a causal LM folder whose ``config.json``
  records ``reward_head: likelihood``; :func:`load_exported` and :func:`score` read either kind.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerBase)

from data_modules.pairwise import encode_response, pad_right
from data_modules.records import render
from llama2_lit.core.losses import sequence_logps, token_logprobs
from llama2_lit.errors import UserError
from llama2_lit.models.loading import (build_model, finish_model, load_pretrained, model_dtype, model_folder,
                                       one_line, pickled_only, save_pretrained_as, torch_dtype)
from llama2_lit.models.shard_loading import safetensors_index

log = logging.getLogger(__name__)
HEADS = ("scalar", "likelihood")


def reward_head(model: torch.nn.Module) -> str:
    """``"likelihood"`` for a reward model that scores with its LM head, else ``"scalar"``."""
    return getattr(model.config, "reward_head", None) or "scalar"


def load_reward_model(model_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase,
                      freeze_layers: int | None = None, trainable: bool = True, head: str = "scalar",
                      contrast: float = 0.0) -> torch.nn.Module:
    """A scalar-head sequence classifier (``head="likelihood"``: a causal LM that scores with its LM head) as
    ``model_cfg`` says (``contrast``: the likelihood head's weight on the prompt-free log-prob, see :func:`rewards`).

    ``model_cfg.path`` set: a causal LM checkpoint (its LM head is dropped, a new ``score`` head is
    initialised) or an exported reward model (its head is kept). ``model_cfg.path`` null: random init
    from ``model_cfg.config`` sized to the tokenizer. ``freeze_layers`` (default ``model_cfg.freeze_layers``,
    else 0): see :func:`freeze_lower_layers`. ``model_cfg.lora.enabled``: LoRA adapters on the transformer,
    the scalar head stays fully trainable; ``init_device``/``init``: see ``loading.init_options``.
    ``trainable``: float32 parameters (master weights); False: ``model.dtype`` (see ``loading.MASTER_DTYPE``).
    """
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise UserError("reward model: the tokenizer needs a pad token distinct from EOS "
                        "(the score is read at the last non-pad token)")
    if head not in HEADS:
        raise UserError(f"reward.head: unknown '{head}' (choose {' or '.join(HEADS)})")
    if head == "likelihood":
        model = build_model(model_cfg, tokenizer, AutoModelForCausalLM, LlamaForCausalLM,
                            model_dtype(model_cfg, trainable), model_cfg.get("attn_implementation", "sdpa"),
                            "a likelihood reward model")
        model.config.reward_head = head
        model.config.reward_contrast = float(contrast)
        model.config.reward_prompt_free_ids = prompt_free_ids(tokenizer)
        n = model_cfg.get("freeze_layers", 0) if freeze_layers is None else freeze_layers
        freeze_lower_layers(model, int(n or 0))
        return finish_model(model, model_cfg, trainable=("lm_head",))
    model = build_model(model_cfg, tokenizer, AutoModelForSequenceClassification, LlamaForSequenceClassification,
                        model_dtype(model_cfg, trainable), model_cfg.get("attn_implementation", "sdpa"),
                        "a reward model", num_labels=1)
    model.config.problem_type = "regression"
    model.config.id2label, model.config.label2id = {0: "reward"}, {"reward": 0}
    n = model_cfg.get("freeze_layers", 0) if freeze_layers is None else freeze_layers
    freeze_lower_layers(model, int(n or 0))
    return finish_model(model, model_cfg, trainable=tuple(h for h in ("score", "classifier") if hasattr(model, h)))


def freeze_lower_layers(model: torch.nn.Module, n: int) -> int:
    """Freeze the input embeddings and the lowest ``n`` decoder layers (``n < 0``: all but the top ``-n``).

    ``n = 0`` freezes nothing. The final norm and the score head always train. Autograd then stops at
    the first trainable layer, so frozen layers cost a forward pass only. Returns the number of frozen layers.
    """
    layers = getattr(model.base_model, "layers", None)
    if layers is None:
        raise UserError(f"freeze_layers: {type(model).__name__} has no decoder layer list (base_model.layers)")
    total = len(layers)
    k = n if n >= 0 else total + n
    if not 0 <= k <= total:
        raise UserError(f"freeze_layers={n}: the model has {total} decoder layers")
    if k == 0:
        return 0
    for p in model.get_input_embeddings().parameters():
        p.requires_grad_(False)
    for layer in layers[:k]:
        for p in layer.parameters():
            p.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("froze embeddings and %d of %d decoder layers: %.2fM trainable parameters", k, total, trainable / 1e6)
    return k


def rewards(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
            answer_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Rewards (N,) float32 for right-padded ``input_ids`` (N, T) (a scalar head also reads left-padded rows).

    A likelihood head needs ``answer_mask`` (N, T), 1 on the answer's tokens. Its reward is
    ``mean_t log p(y_t | x, y_<t) - c * mean_t log p(y_t | none, y_<t)``: the answer's mean token log-prob after the
    prompt, less ``c`` (``config.reward_contrast``) times its mean log-prob after an empty user turn
    (``config.reward_prompt_free_ids``, the rendered generation prompt of an empty message). With ``c > 0`` an
    answer that is likely whatever the question (a refusal, a stock phrase) loses the credit it gets for being
    fluent: the domain-conditional PMI of Holtzman et al. 2021 at ``c = 1``, the plain likelihood at ``c = 0``."""
    if reward_head(model) == "scalar":
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, 0].float()
    if answer_mask is None:
        raise ValueError("rewards: a likelihood reward model needs the answer mask")
    r = answer_logps(model, input_ids, attention_mask, answer_mask, average=True)
    c = float(getattr(model.config, "reward_contrast", 0.0) or 0.0)
    if c:
        prefix = list(model.config.reward_prompt_free_ids)
        rows = [prefix + input_ids[i][answer_mask[i].bool()].tolist() for i in range(len(input_ids))]
        width = max(map(len, rows))
        pad = int(model.config.pad_token_id if model.config.pad_token_id is not None else 0)
        ids = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        mask = torch.zeros_like(ids)
        amask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=ids.dtype)
            mask[i, :len(row)] = 1
            amask[i, len(prefix):len(row)] = 1
        r = r - c * answer_logps(model, ids, mask, amask, average=True)
    return r


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids (N, T) of rows padded on either side: 0 at each row's first real token."""
    return (mask.long().cumsum(1) - 1).clamp(min=0)


def prompt_free_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token ids that precede an answer to an empty user message (the chat template's generation prompt)."""
    return render(tokenizer, [{"role": "user", "content": ""}], add_generation_prompt=True)


def answer_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, answer_mask: torch.Tensor,
                 average: bool = False) -> torch.Tensor:
    """Summed (``average``: mean) log-probs (N,) of the answer tokens of N right-padded rows (N, T) under a causal LM."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=mask_positions(mask), use_cache=False).logits
    lp = token_logprobs(logits[:, :-1], ids[:, 1:])  # (N, T-1): position t predicts token t+1
    return sequence_logps(lp, answer_mask[:, 1:], average=average)


@torch.no_grad()
def score(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str | list[dict]],
          responses: Sequence[str], batch_size: int = 16, max_length: int | None = None) -> torch.Tensor:
    """Rewards (N,) for ``responses[i]`` answering ``prompts[i]`` (a user string or chat messages).

    Each conversation is rendered with the tokenizer's chat template exactly as the reward model was
    trained (``data_modules.pairwise.encode_response``; ``max_length`` left-truncates the prompt), and
    scored in length-sorted, right-padded batches. The model's training mode is restored afterwards.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"score: {len(prompts)} prompts for {len(responses)} responses")
    enc = [encode_response(tokenizer, p, r, max_length) for p, r in zip(prompts, responses)]
    ids = [e.ids for e in enc]
    likelihood = reward_head(model) == "likelihood"
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out = torch.empty(len(ids), dtype=torch.float32)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), batch_size):
            chunk = order[s:s + batch_size]
            x, m = pad_right([ids[i] for i in chunk], tokenizer.pad_token_id)
            a = None
            if likelihood:  # 1 from each row's answer start to its end
                a = m.clone()
                for row, i in enumerate(chunk):
                    a[row, :enc[i].answer_start] = 0
                a = a.to(device)
            out[chunk] = rewards(model, x.to(device), m.to(device), a).cpu()
    finally:
        model.train(was_training)
    return out


def export_reward_model(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: str | Path,
                        metadata: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Save ``model`` and ``tokenizer`` to ``path`` (``AutoModelForSequenceClassification``-ready; a likelihood
    head: ``AutoModelForCausalLM``-ready, its ``reward_head`` / ``reward_contrast`` / ``reward_prompt_free_ids`` in
    ``config.json``).

    ``metadata`` (e.g. ``{"reward": "safety", "margin": "small"}``) is stored in ``config.json`` under
    ``llama2_lit``. Frozen parameters are saved like any other. ``dtype``: the stored weights' dtype
    (``model.dtype``; default: the parameters' own).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    if reward_head(model) == "scalar":
        model.config.num_labels = 1
    if metadata:
        model.config.llama2_lit = dict(metadata)
    save_pretrained_as(model, path, dtype or next(model.parameters()).dtype)
    tokenizer.save_pretrained(path)
    return path


def load_exported(path: str | Path, dtype: str = "float32", device: str | torch.device = "cpu",
                  on_meta: bool = False):
    """``(model, tokenizer)`` of an exported reward model folder, in eval mode: a sequence classifier, or a causal LM
    when ``config.json`` says ``reward_head: likelihood``.

    ``on_meta``: no weight is read; the model is built from the folder's config on the meta device (``device`` is
    ignored) and records the folder (``checkpoint_source``), so that a sharded run (``trainer=fsdp``) fills each
    rank's shard from its rows of the ``*.safetensors`` files (``models.sharding.load_safetensors_``). Only the
    files' headers are read here, to check that they hold every parameter (the scalar head above all).
    """
    what = "reward model path"
    src = model_folder(str(path), what)
    try:
        tok = AutoTokenizer.from_pretrained(src)
        config = AutoConfig.from_pretrained(src, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{what}: could not load a reward model from '{path}': {one_line(e)}"
                        f"{pickled_only(src)}") from None
    head = getattr(config, "reward_head", None) or "scalar"
    if head not in HEADS:
        raise UserError(f"{path}: config.json's reward_head '{head}' is none of {', '.join(HEADS)}")
    auto_cls = AutoModelForCausalLM if head == "likelihood" else AutoModelForSequenceClassification
    if on_meta:
        with torch.device("meta"):
            model = auto_cls.from_config(config, trust_remote_code=False)
        model = model.to(torch_dtype(dtype))
    else:
        model = load_pretrained(auto_cls, str(path), "a reward model", what, dtype=torch_dtype(dtype))
    model.config.reward_head = head
    if head == "scalar" and model.config.num_labels != 1:
        raise UserError(f"{path}: not a scalar reward model (num_labels={model.config.num_labels})")
    if model.config.pad_token_id is None or model.config.pad_token_id != tok.pad_token_id:
        raise UserError(f"{path}: config pad_token_id {model.config.pad_token_id} != tokenizer's {tok.pad_token_id}")
    if on_meta:
        _check_tensors(model, src, path)
        model.checkpoint_source = src
        return model.eval(), tok
    return model.to(device).eval(), tok


def _check_tensors(model: torch.nn.Module, src: str, path) -> None:
    """Every parameter of ``model`` is a tensor of the folder's ``*.safetensors`` files (headers only are read):
    the shard-by-shard reader would otherwise give a missing scalar head a fresh init."""
    keys = safetensors_index(src)
    missing = [n for n, _ in model.named_parameters() if n not in keys]
    if missing:
        raise UserError(f"{path}: the reward model's safetensors files lack {len(missing)} parameters "
                        f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")
