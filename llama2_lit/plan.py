"""Memory planner: per-GPU memory of a configured run, from exact parameter counts on the meta device.

``python -m llama2_lit stage=ppo model=llama2_70b trainer=fsdp plan=true`` prints the plan and exits.
The arithmetic is in pure functions over a :class:`Shape`; every figure is bytes per GPU:

- trainable model (FSDP full shard over N GPUs): parameters, gradients and AdamW's two moments, each
  sharded 1/N, always float32 (the master weights: ``llama2_lit.models.loading.MASTER_DTYPE``): 16 bytes per
  parameter whatever the compute precision;
- frozen models (PPO's reference and reward models, RS's policy and RMs): weights in the dtype they are held in
  (``model.dtype`` / ``ppo.frozen_dtype``), sharded 1/N;
- gathered units: FSDP all-gathers one decoder layer at a time in the compute dtype, plus one prefetched;
- activations for one micro-batch (sdpa/flash attention: no s² term). Per decoder layer a Llama layer
  keeps about ``7h + 3h_kv + 4f`` values per token for backward (norm inputs/outputs, q/k/v and rotated
  q/k, attention output, o-proj input, gate/up/act/product of the MLP). With activation checkpointing
  only each layer's input (``h`` per token) is kept, plus one layer's full set during its recompute.
  The logits add ``V`` per token in the compute dtype plus fp32 log-softmax and gradient (10 bytes);
- generation (RS/PPO rollouts): the policy consolidated once per node in the compute dtype (the paper's
  fix for FSDP's 20x slower generation: each node holds a whole copy, split over its GPUs, so no
  inter-node traffic per token) plus the KV cache ``2·L·b·(prompt+new)·h_kv`` in the compute dtype;
- a fixed allowance for the CUDA context and allocator fragmentation.
The peak is the larger of the training phase and the generation phase.

Entry layer (``llama2_lit.run`` refuses a sharded GPU run that does not fit): imports ``core.batching``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from llama2_lit.core.batching import BatchSplit, plan_sizes

GIB = 1024 ** 3

# bytes per parameter of a trainable model: (weights, gradients, optimizer moments): float32 master weights
TRAIN_BYTES = (4, 4, 8)
COMPUTE_BYTES = {"bf16-mixed": 2, "16-mixed": 2, "32-true": 4, "32": 4}
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass(frozen=True)
class Shape:
    """The dimensions of one Llama model that memory depends on."""
    params: int
    layers: int
    hidden: int
    kv_hidden: int          # num_key_value_heads * head_dim
    ffn: int
    vocab: int
    layer_params: int       # parameters of one decoder layer

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Shape":
        """Exact counts: the model is built on the meta device (no memory is allocated)."""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(**dict(config))
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(params=sum(p.numel() for p in model.parameters()), layers=cfg.num_hidden_layers,
                   hidden=cfg.hidden_size, kv_hidden=cfg.num_key_value_heads * head_dim,
                   ffn=cfg.intermediate_size, vocab=cfg.vocab_size,
                   layer_params=sum(p.numel() for p in model.model.layers[0].parameters()))


@dataclass
class Plan:
    gpus: int
    gpu_memory_gib: float
    components: dict[str, float] = field(default_factory=dict)  # bytes per GPU, training phase
    generation: dict[str, float] = field(default_factory=dict)  # bytes per GPU, rollout phase

    @property
    def train_peak(self) -> float:
        return sum(self.components.values())

    @property
    def generation_peak(self) -> float:
        return sum(self.generation.values())

    @property
    def peak(self) -> float:
        return max(self.train_peak, self.generation_peak)

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory_gib * GIB


def activation_bytes(s: Shape, tokens: int, checkpointing: bool, dtype_bytes: int) -> float:
    """Activation memory of one micro-batch of ``tokens`` (= micro-batch x sequence length) tokens."""
    per_layer = (7 * s.hidden + 3 * s.kv_hidden + 4 * s.ffn) * tokens * dtype_bytes
    if checkpointing:
        stored = s.layers * s.hidden * tokens * dtype_bytes + per_layer
    else:
        stored = s.layers * per_layer
    logits = s.vocab * tokens * (dtype_bytes + 8)
    return stored + logits


def plan_memory(trainable: Mapping[str, Shape], frozen: Mapping[str, Shape], gpus: int, gpu_memory_gib: float,
                precision: str = "bf16-mixed", micro_batch: int = 1, seq_len: int = 4096,
                checkpointing: bool = True, generation: Mapping[str, int] | None = None,
                offload: bool = False, overhead_gib: float = 2.0, gpus_per_node: int = 8,
                frozen_bytes: int | None = None) -> Plan:
    """Per-GPU bytes by component for FSDP full sharding over ``gpus`` GPUs.

    frozen_bytes: bytes per parameter of the frozen models (their dtype); default: the compute dtype's.
    trainable / frozen: name -> Shape. generation: ``{"policy": name, "batch": b, "length": prompt + new}``
    for stages that sample (the named model is consolidated once per node of ``gpus_per_node`` GPUs).
    offload: parameters, gradients and optimizer states live in CPU memory (only gathered units on GPU).
    """
    if precision not in COMPUTE_BYTES:
        raise ValueError(f"precision '{precision}' not planned (choose {sorted(COMPUTE_BYTES)})")
    w, g, o = TRAIN_BYTES
    cb = COMPUTE_BYTES[precision]
    fb = int(frozen_bytes or cb)
    plan = Plan(gpus=gpus, gpu_memory_gib=gpu_memory_gib)
    c = plan.components
    all_models = {**trainable, **frozen}
    for name, s in trainable.items():
        if not offload:
            c[f"{name}: weights"] = s.params * w / gpus
            c[f"{name}: gradients"] = s.params * g / gpus
            c[f"{name}: optimizer"] = s.params * o / gpus
    for name, s in frozen.items():
        c[f"{name}: frozen weights"] = 0.0 if offload else s.params * fb / gpus
    biggest = max(all_models.values(), key=lambda s: s.layer_params)
    c["gathered layers (current + prefetch)"] = 2 * biggest.layer_params * cb
    if trainable:
        c["activations"] = max(activation_bytes(s, micro_batch * seq_len, checkpointing, cb)
                               for s in trainable.values())
    c["cuda context + fragmentation"] = overhead_gib * GIB
    if generation:
        pol = all_models[generation["policy"]]
        gen = plan.generation
        for key, val in c.items():
            if key not in ("activations", "gathered layers (current + prefetch)"):
                gen[key] = val
        gen[f"{generation['policy']}: consolidated per node"] = pol.params * cb / min(gpus, gpus_per_node)
        gen["kv cache"] = 2 * pol.layers * generation["batch"] * generation["length"] * pol.kv_hidden * cb
        gen["logits (last token)"] = generation["batch"] * pol.vocab * 4
    return plan


def smallest_fit(fn, start: int = 1, limit: int = 4096) -> int | None:
    """The smallest GPU count (1, 2, 4, 8, then multiples of 8) for which ``fn(gpus).fits``."""
    n = start
    while n <= limit:
        if fn(n).fits:
            return n
        n = n * 2 if n < 8 else n + 8
    return None


def format_plan(plan: Plan, title: str) -> str:
    rows = [title, f"{'component':44s} {'GiB/GPU':>10s}"]
    for k, v in plan.components.items():
        rows.append(f"{k:44s} {v / GIB:10.2f}")
    rows.append(f"{'training peak':44s} {plan.train_peak / GIB:10.2f}")
    if plan.generation:
        rows.append("generation phase:")
        for k, v in plan.generation.items():
            rows.append(f"  {k:42s} {v / GIB:10.2f}")
        rows.append(f"{'generation peak':44s} {plan.generation_peak / GIB:10.2f}")
    verdict = "fits" if plan.fits else "does NOT fit"
    rows.append(f"peak {plan.peak / GIB:.2f} GiB of {plan.gpu_memory_gib:.0f} GiB on each of {plan.gpus} GPUs: {verdict}")
    return "\n".join(rows)


# -- from a composed config -------------------------------------------------------------------------
def _shape(model_cfg: Mapping[str, Any]) -> Shape:
    if not model_cfg.get("config"):
        raise ValueError(f"model '{model_cfg.get('name')}' has no `config` dimensions to plan with")
    dims = dict(model_cfg["config"])
    dims.setdefault("vocab_size", 32000)
    return Shape.from_config(dims)


def _rm_shape(s: Shape) -> Shape:
    """A reward model: the LM head (vocab x hidden) replaced by a scalar head (1 x hidden)."""
    return Shape(params=s.params - s.vocab * s.hidden + s.hidden, layers=s.layers, hidden=s.hidden,
                 kv_hidden=s.kv_hidden, ffn=s.ffn, vocab=1, layer_params=s.layer_params)


def plan_from_cfg(cfg) -> tuple[Plan, int | None, str]:
    """The plan of a composed config: ``(plan, smallest fitting GPU count, printable text)``.

    The stage decides which models exist: sft/pretrain/rs_distill train the policy; rm trains a
    reward model; rs samples from a frozen policy scored by two frozen RMs; ppo trains policy and
    value model beside a frozen reference and two frozen RMs (paper §3.2.3), all of the model's size.
    """
    from omegaconf import OmegaConf

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    pc = OmegaConf.to_container(cfg.planner, resolve=True) if cfg.get("planner") else {}
    s = _shape(model_cfg)
    stage = cfg.stage.name
    seq_len = int(cfg.stage.get("seq_len", 4096))
    devices = cfg.trainer.get("devices", 1)
    per_node = int(pc.get("gpus_per_node") or (devices if isinstance(devices, int) and devices > 0 else 8))
    gpus = int(pc.get("gpus") or per_node * int(cfg.trainer.get("num_nodes", 1) or 1))
    sizes = None
    micro = int(cfg.stage.get("batch_size", 1))
    if cfg.stage.get("module") is not None and stage not in ("rs", "collect", "pipeline"):
        stage_d = OmegaConf.to_container(cfg.stage, resolve=True)
        ppo_d = OmegaConf.to_container(cfg.ppo, resolve=True) if cfg.get("ppo") is not None else None
        acc = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
        sizes = plan_sizes(stage_d, ppo_d, gpus, micro=cfg.trainer.get("micro_batch_size"),
                           accumulate=None if acc == 1 else acc)
        if isinstance(sizes, BatchSplit):
            micro = sizes.micro  # rows (sft) or pairs (rm) per forward on one GPU
    frozen_dtype = str(model_cfg.get("dtype", "float32"))
    if stage == "ppo" and str((cfg.get("ppo") or {}).get("frozen_dtype", "auto")) != "auto":
        frozen_dtype = str(cfg.ppo.frozen_dtype)
    gen = None
    if stage == "rm":
        trainable, frozen = {"reward model": _rm_shape(s)}, {}
        micro *= 2  # chosen and rejected in one forward
    elif stage == "ppo":
        trainable = {"policy": s, "value": _rm_shape(s)}
        frozen = {"reference": s, "helpfulness RM": _rm_shape(s), "safety RM": _rm_shape(s)}
        ppo = cfg.get("ppo") or {}
        micro = int(ppo.get("micro_batch_size") or ppo.get("mini_batch_size") or micro)  # rows per forward/backward
        gen = {"policy": "policy", "batch": int(pc.get("generation_batch") or micro), "length": seq_len}
    elif stage == "rs":
        trainable, frozen = {}, {"policy": s, "helpfulness RM": _rm_shape(s), "safety RM": _rm_shape(s)}
        gen = {"policy": "policy", "batch": int(pc.get("generation_batch") or micro), "length": seq_len}
    else:
        trainable, frozen = {"policy": s}, {}
    precision = str(cfg.trainer.get("precision", "bf16-mixed"))
    strategy = cfg.trainer.get("strategy")
    mixed = strategy.get("mixed_precision") if hasattr(strategy, "get") else None
    if precision in ("32-true", "32") and (mixed == "bf16" or (mixed == "auto" and cfg.trainer.get("accelerator") == "gpu")):
        precision = "bf16-mixed"  # trainer=fsdp: FSDP2's bf16 policy (fp32 shards, gradients, moments; bf16 compute)
    kwargs = dict(gpu_memory_gib=float(pc.get("gpu_memory_gib", 80)), precision=precision, micro_batch=micro,
                  seq_len=seq_len, checkpointing=bool(model_cfg.get("gradient_checkpointing", False)),
                  generation=gen, offload=bool(pc.get("offload", False)), gpus_per_node=per_node,
                  frozen_bytes=DTYPE_BYTES.get(frozen_dtype))
    def at(n: int) -> Plan:
        return plan_memory(trainable, frozen, gpus=n, **kwargs)

    plan = at(gpus)
    need = smallest_fit(at)
    counts = ", ".join(f"{k} {v.params:,}" for k, v in {**trainable, **frozen}.items())
    title = (f"memory plan: stage={stage} model={model_cfg.get('name')} ({counts} parameters), "
             f"precision={precision} (float32 master weights, frozen models in {frozen_dtype}), micro-batch {micro} x "
             f"{seq_len} tokens, activation checkpointing {'on' if kwargs['checkpointing'] else 'off'}, {gpus} GPUs "
             f"of {kwargs['gpu_memory_gib']:.0f} GiB")
    if sizes is not None:
        title += "\nbatch: " + (sizes.describe() if not hasattr(sizes, "accumulate") else
                                 sizes.describe("pairs" if stage == "rm" else "sequences"))
    text = format_plan(plan, title) + f"\nsmallest GPU count that fits: {need if need else 'none up to 4096'}"
    return plan, need, text
