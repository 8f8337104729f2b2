"""The training core: one loop for LoRA and full fine-tuning, on one device or many.

Needs torch, transformers, peft (and pyarrow + fsspec to read the tokenized store and write
results), never Prefect or pydantic, so it also runs on a bare GPU box. `tasks.core.launcher` runs
it (in this process, or as torchrun's workers); `tasks.core.checkpoints` saves and restores it.

What makes it fast: packed rows (examples concatenated, positions restarting, so attention stays
block-diagonal; one row per micro-batch under flex attention, rows capped at the longest example
under sdpa, whose cost grows with the square of a row), logits only at positions that carry loss
(a pre-hook on the LM head, indices found on the host) with the cross-entropy in fp32 chunks, a fused (CUDA) or
foreach (CPU) AdamW, bf16 autocast on GPUs, gradient checkpointing only when the memory estimate
for the run's largest micro-batch asks for it, regional torch.compile for long CUDA runs.

What makes it exact: the loss of an optimizer step is the sum over every loss-bearing token of the
global batch (all micro-batches, all ranks) divided by their count, so micro 4 x accum 2 equals
micro 8 x accum 1 and two ranks equal one. Every rank can count that denominator itself, because
the data order is a pure function of (seed, epoch) and step s always takes the global batch
positions [s * G, (s + 1) * G) of the epoch-after-epoch stream.

What makes it resumable: every `checkpoint_every` steps a checkpoint holds everything the loop
needs to go on (`tasks.core.checkpoints`); a new run with the same spec starts from the newest.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import importlib.util
import itertools
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tasks.core import storage
from tasks.core.checkpoints import Checkpoints, TrainState, load_checkpoint, load_weights, save_checkpoint, unique_tensors
from tasks.core.collate import IGNORE_INDEX, pack_examples, pack_rows, packed_shape, pad_examples, pad_row
from tasks.core.modeling import logits_only_at, pick_device, unwrap
from tasks.core.train_settings import TrainSettings

logger = logging.getLogger(__name__)

Progress = Callable[[dict], None]

CE_CHUNK_ROWS = 4096  # rows of logits upcast to fp32 at once
COMPILE_MIN_STEPS = 100  # compile='auto' compiles only runs at least this long
MEMORY_HEADROOM = 0.85  # gradient_checkpointing='auto' turns on above this share of free memory
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TrainingDivergedError(ValueError):
    """The training loss stopped being a number; resuming from a checkpoint would diverge again."""


class WorkerError(RuntimeError):
    """A torchrun worker failed; the message is the worker's own exception. `crashed`: no worker
    reported a Python error (a killed or preempted process), so another attempt may succeed.

    Raised by tasks.core.launcher; it lives here, beside the core's other error, because callers
    import both from the training core and the launcher imports this module (not the reverse)."""

    def __init__(self, message: str, crashed: bool = False):
        super().__init__(message)
        self.crashed = crashed


def is_out_of_memory(error: BaseException) -> bool:
    """Out of device memory, in this process or reported by a torchrun worker."""
    return isinstance(error, torch.OutOfMemoryError) or (isinstance(error, WorkerError) and "OutOfMemoryError" in str(error))


@dataclass
class TrainSpec:
    """Everything a training process needs; JSON-able (`asdict`, `from_dict`) so torchrun workers
    read it from a file."""

    model_dir: str  # local folder with config, safetensors weights and tokenizer
    data_dir: str  # local tokenized store (DatasetDict saved with save_to_disk: train/, eval/)
    output_url: str  # where rank 0 publishes adapter/ or model/, loss_curve.json, train_stats.json
    checkpoint_url: str  # step-00000050/ ... folders, each complete when its marker exists
    settings: TrainSettings  # TrainOptions.settings()
    run_id: str = "sft"  # torchrun rendezvous id (the stage passes its content key)
    trust_remote_code: bool = False  # run the model repository's own modeling code (config.trust_remote_code)
    # fsspec options of output_url and checkpoint_url (the cache's: credentials, endpoint). They say
    # where bytes go, not what they are: kept out of the repr, the stats and the checkpoints.
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainSpec":
        return cls(**{**values, "settings": TrainSettings.from_dict(values["settings"])})


# ---------------------------------------------------------------------------------------- data


@dataclass
class TokenChunk:
    """Consecutive examples as flat tensors: example i is [offsets[i], offsets[i + 1])."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor  # int64, one more than the examples


class TokenRows:
    """A split's examples, in chunks that may be memory-mapped views of the tokenized store (the
    record batches of its Arrow files): the tokens stay on disk and in the page cache, and only the
    per-example figures (lengths, loss tokens) are in memory, 16 bytes an example."""

    def __init__(self, chunks: Sequence[TokenChunk]):
        self.chunks = list(chunks)
        sizes = [len(chunk.offsets) - 1 for chunk in self.chunks]
        self.starts = list(itertools.accumulate(sizes, initial=0))  # example(i) looks its chunk up once per example
        self.lengths = torch.cat([chunk.offsets[1:] - chunk.offsets[:-1] for chunk in self.chunks] or [torch.zeros(0, dtype=torch.long)])
        self.loss_tokens = torch.cat([_loss_tokens(chunk) for chunk in self.chunks] or [torch.zeros(0, dtype=torch.long)])

    @classmethod
    def from_examples(cls, examples: Sequence[dict]) -> "TokenRows":
        lengths = torch.tensor([len(e["input_ids"]) for e in examples], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        flat = lambda key: torch.tensor([t for e in examples for t in e[key]], dtype=torch.long)  # noqa: E731
        return cls([TokenChunk(flat("input_ids"), flat("labels"), offsets)])

    def __len__(self) -> int:
        return self.starts[-1]

    def example(self, i: int) -> dict:
        index = bisect.bisect_right(self.starts, i) - 1
        chunk, local = self.chunks[index], i - self.starts[index]
        start, end = int(chunk.offsets[local]), int(chunk.offsets[local + 1])
        return {"input_ids": chunk.input_ids[start:end].tolist(), "labels": chunk.labels[start:end].tolist()}


def _loss_tokens(chunk: TokenChunk) -> torch.Tensor:
    """Labels that count after the one-token shift, per example of the chunk."""
    lengths = chunk.offsets[1:] - chunk.offsets[:-1]
    has_loss = (chunk.labels != IGNORE_INDEX).long()
    has_loss[chunk.offsets[:-1][lengths > 0]] = 0  # label 0 is never a target: labels shift by one
    return _segment_sums(has_loss, chunk.offsets)


def _segment_sums(values: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    totals = torch.cat([torch.zeros(1, dtype=values.dtype), values.cumsum(0)])
    return totals[offsets[1:]] - totals[offsets[:-1]]


def load_eval_rows(data_dir: str | Path) -> TokenRows | None:
    """The eval split, or None when the store has none (evaluation during training is then off)."""
    try:
        return load_rows(data_dir, "eval")
    except (FileNotFoundError, ValueError):
        logger.warning("eval_every is set but the tokenized store has no eval rows: no evaluation during training")
        return None


def load_rows(data_dir: str | Path, split: str = "train") -> TokenRows:
    """Read a split of the tokenized store with pyarrow alone (no `datasets` needed on GPU boxes):
    save_to_disk writes Arrow IPC streams listed in the split's state.json. The token columns are
    memory-mapped, not read: memory does not grow with the store."""
    import pyarrow as pa

    folder = Path(data_dir) / split
    state = json.loads((folder / "state.json").read_text())
    chunks = [
        _mapped_chunk(batch, folder)
        for f in state["_data_files"]
        for batch in pa.ipc.open_stream(pa.memory_map(str(folder / f["filename"])))
        if batch.num_rows
    ]
    if not chunks:
        raise ValueError(f"{folder}: the split is empty")
    return TokenRows(chunks)


def _mapped_chunk(batch, folder: Path) -> TokenChunk:
    import numpy as np

    ids, labels = batch.column("input_ids"), batch.column("labels")
    offsets = ids.offsets.to_numpy()
    if not np.array_equal(offsets - offsets[0], labels.offsets.to_numpy() - labels.offsets.to_numpy()[0]):
        raise ValueError(f"{folder}: input_ids and labels differ in length")
    with warnings.catch_warnings():  # the mapped buffers are read-only; nothing ever writes to them
        warnings.simplefilter("ignore", UserWarning)
        view = lambda column: torch.from_numpy(column.flatten().to_numpy(zero_copy_only=True))  # noqa: E731
        return TokenChunk(view(ids), view(labels), torch.from_numpy((offsets - offsets[0]).astype(np.int64)))


class DataOrder:
    """Example order as a pure function of (seed, epoch). Step s takes positions [s*G, (s+1)*G) of
    the stream epoch 0, epoch 1, ... so resuming needs nothing but the step number."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self._cache = size, seed, {}

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._cache = {epoch: torch.randperm(self.size, generator=generator).tolist()}
        return self._cache[epoch]

    def global_batch(self, step: int, batch_size: int) -> list[int]:
        positions = range(step * batch_size, (step + 1) * batch_size)
        return [self.permutation(q // self.size)[q % self.size] for q in positions]


def rank_share(batch: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's disjoint share of a global batch."""
    return list(batch[rank * len(batch) // world : (rank + 1) * len(batch) // world])


@dataclass(frozen=True)
class Batching:
    """How a rank's share of a step becomes micro-batches, and a micro-batch model inputs.

    A micro-batch takes at most `micro_examples` examples and, with a budget, at most
    `micro_tokens` token slots (an example longer than the budget goes alone), so memory stays
    bounded whatever the example lengths. How a step is cut never changes what it computes: the
    loss is summed over the whole step and divided once."""

    packing: bool
    pad_token_id: int
    micro_examples: int
    micro_tokens: int | None = None
    row_tokens: int | None = None  # packed rows capped for dense attention; None: one packed row
    pad_multiple: int = 1  # the one packed row padded to a multiple (flex: its block), so shapes repeat

    def slots(self, lengths: Sequence[int]) -> int:
        """Token slots (padding included) of the input tensor make_batch builds for these lengths."""
        if not self.packing:
            return len(lengths) * max(lengths)
        if self.row_tokens:
            count, width = packed_shape(lengths, self.row_tokens)
            return count * width
        return -(-sum(lengths) // self.pad_multiple) * self.pad_multiple

    def cut(self, share: Sequence[int], lengths: Sequence[int] | torch.Tensor) -> list[list[int]]:
        """Consecutive examples of `share` in micro-batches within both limits."""
        micro_batches: list[list[int]] = []
        current: list[int] = []
        current_lengths: list[int] = []
        for index in share:
            length = int(lengths[index])
            full = len(current) == self.micro_examples or (
                self.micro_tokens and current and self.slots([*current_lengths, length]) > self.micro_tokens
            )
            if full:
                micro_batches.append(current)
                current, current_lengths = [], []
            current.append(index)
            current_lengths.append(length)
        return micro_batches + ([current] if current else [])

    def rank_micro_batches(self, batch: Sequence[int], lengths: Sequence[int] | torch.Tensor, rank: int, world: int, aligned: bool = False) -> list[list[int]]:
        """This rank's micro-batches of a global batch. `aligned`: padded with empty ones to the most
        any rank has, because every FSDP forward and backward is a collective all ranks must join."""
        mine = self.cut(rank_share(batch, rank, world), lengths)
        if not aligned or world == 1:
            return mine
        most = max(len(self.cut(rank_share(batch, other, world), lengths)) for other in range(world))
        return mine + [[] for _ in range(most - len(mine))]

    def build(self, rows: "TokenRows", indices: Sequence[int], device: torch.device) -> "Batch":
        return make_batch(rows, indices, self.packing, self.pad_token_id, device, self.row_tokens, self.pad_multiple)


@dataclass
class Batch:
    """One micro-batch on its device: the model inputs, the positions whose next token carries loss
    (`positions`, flat indices into rows x width, found on the host) and those next tokens
    (`targets`, one per position)."""

    inputs: dict[str, torch.Tensor]
    positions: torch.Tensor
    targets: torch.Tensor


def make_batch(
    rows: TokenRows,
    indices: Sequence[int],
    packing: bool,
    pad_token_id: int,
    device: torch.device,
    row_tokens: int | None = None,
    pad_multiple: int = 1,
) -> Batch:
    """Packed examples fill rows of at most `row_tokens` tokens (None: one row, padded to a
    multiple of `pad_multiple`). The LM head runs on the `keep` positions only
    (`modeling.logits_only_at`). On CUDA the tensors go through pinned memory, so the copies are
    asynchronous and the host can prepare the next batch while the device works."""
    examples = [rows.example(i) for i in indices]
    if packing and row_tokens:
        batch = pack_rows(examples, row_tokens, pad_token_id)
    elif packing:
        batch = pad_row(pack_examples(examples), pad_multiple, pad_token_id)
    else:
        batch = pad_examples(examples, pad_token_id)
    labels = batch.pop("labels")
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    targets = labels[:, 1:][keep[:, :-1]]
    pin = device.type == "cuda"
    move = lambda tensor: (tensor.pin_memory() if pin else tensor).to(device, non_blocking=True)  # noqa: E731
    return Batch({name: move(tensor) for name, tensor in batch.items()}, move(keep.flatten().nonzero().squeeze(1)), move(targets))


def loss_sum(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Summed cross-entropy over the loss positions, in fp32, chunk by chunk. Half-precision chunks
    are recomputed in backward instead of keeping their fp32 copies."""
    with logits_only_at(model, batch.positions):
        logits = model(**batch.inputs, use_cache=False).logits  # (loss positions, vocab)
    targets = batch.targets
    if logits.shape[:-1] != targets.shape:  # e.g. a model calling its LM head twice in one forward
        raise RuntimeError(f"{type(unwrap(model)).__name__} returned logits of shape {tuple(logits.shape)} for "
                           f"{targets.numel()} loss positions: its LM head is not called once on the final hidden states")
    if targets.numel() == 0:
        return logits.sum() * 0.0  # keeps every parameter in the graph (DDP expects that)
    recompute = logits.dtype != torch.float32
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), CE_CHUNK_ROWS):
        chunk, chunk_targets = logits[start : start + CE_CHUNK_ROWS], targets[start : start + CE_CHUNK_ROWS]
        if recompute:
            total = total + torch.utils.checkpoint.checkpoint(_ce_sum, chunk, chunk_targets, use_reentrant=False)
        else:
            total = total + _ce_sum(chunk, chunk_targets)
    return total


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


# ------------------------------------------------------------------------------------ hardware


@dataclass
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    precision: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        dtype = AMP_DTYPES.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def resolve_precision(option: str, device: torch.device) -> str:
    """'auto': bf16 on GPUs that have it (fp16 on older ones), fp32 on CPU and MPS."""
    if option != "auto":
        return option
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def start_runtime(settings: TrainSettings) -> Runtime:
    """Read torchrun's environment and join its process group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(settings.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # under torchrun each process takes cuda:LOCAL_RANK
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(rank, world, local_rank, device, resolve_precision(settings.precision, device))


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: process peak RSS


# --------------------------------------------------------------------------------------- model


def resolve_attention(option: str, device: torch.device, packing: bool) -> str:
    """'auto': flex attention for packed rows on CUDA (it skips the blocks between examples), sdpa
    elsewhere (its block-diagonal mask comes from the restarting position_ids)."""
    if option != "auto":
        return option
    if device.type == "cuda" and packing and importlib.util.find_spec("torch.nn.attention.flex_attention"):
        return "flex_attention"
    return "sdpa"


DENSE_ATTENTION = ("sdpa", "eager")


FLEX_BLOCK = 128  # flex attention's block size: one packed row is padded to a multiple of it


def batching_for(model: torch.nn.Module, rows: TokenRows, settings: TrainSettings) -> Batching:
    """How this model's micro-batches are shaped. Dense kernels (sdpa, eager) compute the masked
    blocks between examples too, so their packed rows are capped at the longest example. Every
    other kernel gets one row per micro-batch: flex skips those blocks, and flash kernels keep
    examples apart only in a batch of one row. Flex's row is padded to whole blocks, so a compiled
    model sees a few lengths, not a new one at every step."""
    attention = unwrap(model).config._attn_implementation
    row_tokens = int(rows.lengths.max()) if attention in DENSE_ATTENTION else None
    pad_multiple = FLEX_BLOCK if attention == "flex_attention" else 1
    return Batching(
        packing=settings.packing,
        pad_token_id=unwrap(model).config.pad_token_id or 0,
        micro_examples=settings.micro_batch_size,
        micro_tokens=settings.micro_batch_tokens,
        row_tokens=row_tokens,
        pad_multiple=pad_multiple,
    )


def load_model(spec: TrainSpec, rt: Runtime) -> torch.nn.Module:
    """The base model, with LoRA adapters for method 'lora' (the only difference between methods:
    which parameters require grad). Full fine-tuning keeps fp32 master weights under autocast;
    LoRA keeps the frozen base in the autocast dtype and the adapters in fp32."""
    from transformers import AutoModelForCausalLM

    o = spec.settings
    lora = o.method == "lora"
    half_base = lora and o.strategy != "fsdp"  # FSDP wants one dtype to shard; it casts itself
    dtype = AMP_DTYPES.get(rt.precision, torch.float32) if half_base else torch.float32
    torch.manual_seed(o.seed)
    model = AutoModelForCausalLM.from_pretrained(
        spec.model_dir,
        dtype=dtype,
        use_safetensors=True,
        attn_implementation=resolve_attention(o.attention, rt.device, o.packing),
        trust_remote_code=spec.trust_remote_code,
    )
    model.config.use_cache = False  # packed rows stay independent only without the cache
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=o.lora.r,
            lora_alpha=o.lora.alpha,
            lora_dropout=o.lora.dropout,
            target_modules=list(o.lora.target_modules),
        )
        model = get_peft_model(model, config)
    if rt.world > 1 and o.strategy == "fsdp":
        # Stays on the CPU: fully_shard moves each layer to the device as it shards it, so a rank
        # never holds the whole model there (the point of FSDP: models that do not fit one GPU).
        return model
    return model.to(rt.device)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    return [module for module in model.modules() if type(module).__name__ in names]


def needs_checkpointing(model: torch.nn.Module, rt: Runtime, tokens_per_micro: int, strategy: str) -> bool:
    """Whether optimizer state + activations would not fit the free CUDA memory (what
    gradient_checkpointing='auto' asks).

    Activations are estimated per token and layer as ~10 hidden + 4 intermediate values (norms,
    q/k/v, attention output, MLP gate/up/product) plus the loss rows' logits."""
    config = unwrap(model).config
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    width = 2 if rt.precision in AMP_DTYPES else 4
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    sharded = strategy == "fsdp" and rt.world > 1
    states = trainable * 12 / (rt.world if sharded else 1)  # fp32 grad + two Adam moments
    if sharded:  # the model is still on the CPU (load_model): its shard and one gathered layer are yet to arrive
        states += sum(p.numel() * p.element_size() for p in model.parameters()) / rt.world
        states += max((sum(p.numel() for p in layer.parameters()) for layer in decoder_layers(model)), default=0) * width
    activations = tokens_per_micro * (layers * (10 * hidden + 4 * intermediate) * width + config.vocab_size * (width + 4))
    free, _ = torch.cuda.mem_get_info(rt.device)
    return states + activations > MEMORY_HEADROOM * free


def prepare_model(model: torch.nn.Module, spec: TrainSpec, rt: Runtime, checkpointing: bool, compile_: bool) -> torch.nn.Module:
    """Gradient checkpointing, data parallelism (DDP, or FSDP2 per decoder layer), compilation."""
    o = spec.settings
    if checkpointing:
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if rt.world > 1 and o.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        amp = AMP_DTYPES.get(rt.precision)
        policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    elif rt.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if compile_:
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)  # regional: one compiled block reused by every layer
    return model


def build_optimizer(model: torch.nn.Module, spec: TrainSpec, device: torch.device) -> torch.optim.Optimizer:
    """AdamW, fused on CUDA and foreach elsewhere; no weight decay on biases and norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": spec.settings.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    speed = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=spec.settings.peak_learning_rate, **speed)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Linear warmup to the peak, then cosine or linear decay to zero at `total`, or constant."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


class _Schedule:
    """Picklable-free LambdaLR function (its __dict__ is what LambdaLR checkpoints)."""

    def __init__(self, total: int, warmup: int, kind: str):
        self.total, self.warmup, self.kind = total, warmup, kind

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.kind)


# -------------------------------------------------------------------------------------- loop


@dataclass
class Plan:
    global_batch: int
    total_steps: int
    warmup_steps: int


def plan_steps(rows: TokenRows, settings: TrainSettings, world: int) -> Plan:
    global_batch = settings.micro_batch_size * settings.grad_accum * world
    if settings.max_steps:
        total = settings.max_steps
    else:
        total = max(1, math.ceil(settings.epochs * len(rows) / global_batch))
    warmup = math.ceil(settings.warmup_ratio * total)
    return Plan(global_batch, total, warmup)


def largest_micro_batch(rows: TokenRows, plan: Plan, settings: TrainSettings, batching: Batching, world: int = 1) -> int:
    """The most token slots (padding included) any micro-batch of the whole run will take on any
    rank, read off the data order, so the memory estimate sees the real worst step rather than
    micro_batch_size x the longest example."""
    order = DataOrder(len(rows), settings.seed)
    lengths = rows.lengths.tolist()
    largest = 0
    for step in range(plan.total_steps):
        batch = order.global_batch(step, plan.global_batch)
        for rank in range(world):
            for micro in batching.cut(rank_share(batch, rank, world), lengths):
                largest = max(largest, batching.slots([lengths[i] for i in micro]))
    return largest


class Session:
    """One training process: model, optimizer and data, and the step function."""

    def __init__(self, spec: TrainSpec, rt: Runtime, rows: TokenRows):
        self.spec, self.rt, self.rows, o = spec, rt, rows, spec.settings
        self.plan = plan_steps(rows, o, rt.world)
        self.order = DataOrder(len(rows), o.seed)
        self.sharded = rt.world > 1 and o.strategy == "fsdp"
        model = load_model(spec, rt)
        self.batching = batching_for(model, rows, o)
        self.checkpointing = o.gradient_checkpointing == "on" or (
            o.gradient_checkpointing == "auto"
            and rt.device.type == "cuda"
            and needs_checkpointing(model, rt, largest_micro_batch(rows, self.plan, o, self.batching, rt.world), o.strategy)
        )
        self.compiled = o.compile == "on" or (
            o.compile == "auto" and rt.device.type == "cuda" and self.plan.total_steps >= COMPILE_MIN_STEPS
        )
        self.model = prepare_model(model, spec, rt, self.checkpointing, self.compiled)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, spec, rt.device)
        schedule = _Schedule(self.plan.total_steps, self.plan.warmup_steps, o.lr_scheduler)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(rt.device.type) if rt.precision == "fp16" else None
        torch.manual_seed(o.seed + rt.rank)  # dropout differs per rank; a checkpoint restores it
        self.eval_rows = load_eval_rows(spec.data_dir) if o.eval_every else None
        self._prefetched: tuple[tuple[int, int], Batch] | None = None

    def evaluates(self, step: int) -> bool:
        """Held-out loss after this step: every eval_every steps and at the last one."""
        every = self.spec.settings.eval_every
        return bool(every and self.eval_rows is not None and (step % every == 0 or step == self.plan.total_steps))

    @torch.no_grad()
    def held_out_loss(self) -> float:
        """Token-weighted response loss on the eval split, packed as in training (positions restart
        per example: no attention across examples), in micro-batches within the same limits. Each
        rank takes its share of the split; every rank runs the same number of forward passes (FSDP
        needs all of them) and the sums are reduced."""
        rows, rt = self.eval_rows, self.rt
        row_tokens = self.batching.row_tokens and max(self.batching.row_tokens, int(rows.lengths.max()))
        batching = dataclasses.replace(self.batching, row_tokens=row_tokens)
        mine = batching.rank_micro_batches(range(len(rows)), rows.lengths, rt.rank, rt.world, aligned=True)
        totals = torch.zeros(2, device=rt.device, dtype=torch.float64)
        self.model.eval()
        try:
            for chunk in mine:
                batch = self._build(rows, chunk, batching)
                with rt.autocast():
                    loss = loss_sum(self.model, batch)
                if chunk:  # a rank with nothing left still runs the pass, and adds nothing
                    count = torch.tensor(float(batch.targets.numel()), device=rt.device, dtype=torch.float64)
                    totals += torch.stack([loss.double(), count])
        finally:
            self.model.train()
        if rt.world > 1:
            dist.all_reduce(totals)
        return float(totals[0] / totals[1].clamp(min=1))

    def _sync(self, last: bool):
        """Reduce gradients only on the last micro-batch of a step."""
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if hasattr(self.model, "no_sync") and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def micro_batches(self, step: int) -> tuple[list[int], list[list[int]]]:
        """Global batch `step` and this rank's micro-batches of it."""
        batch = self.order.global_batch(step, self.plan.global_batch)
        return batch, self.batching.rank_micro_batches(batch, self.rows.lengths, self.rt.rank, self.rt.world, aligned=self.sharded)

    def _build(self, rows: TokenRows, indices: list[int], batching: Batching | None = None) -> Batch:
        """The micro-batch of these examples. An empty one (a rank with nothing left while FSDP's
        collectives need every rank) runs the split's shortest example, and its loss is not counted."""
        return (batching or self.batching).build(rows, indices or [int(rows.lengths.argmin())], self.rt.device)

    def _micro_batch(self, step: int, index: int, indices: list[int]) -> Batch:
        """Micro-batch `index` of `step`: the one prepared ahead when it is that one."""
        if self._prefetched is not None and self._prefetched[0] == (step, index):
            return self._prefetched[1]
        return self._build(self.rows, indices)

    def _prefetch_after(self, step: int, index: int, micro_batches: list[list[int]]) -> None:
        """Build the micro-batch after (step, index) while the device still works on this one: the
        next of this step, or the first of the next step (before the step's host syncs)."""
        if index + 1 < len(micro_batches):
            target, indices = (step, index + 1), micro_batches[index + 1]
        elif step + 1 < self.plan.total_steps:
            target, indices = (step + 1, 0), self.micro_batches(step + 1)[1][0]
        else:
            self._prefetched = None
            return
        self._prefetched = (target, self._build(self.rows, indices))

    def step(self, step: int) -> dict:
        """One optimizer step over global batch `step`; returns its curve record (without times)."""
        rt = self.rt
        batch, micro_batches = self.micro_batches(step)
        loss_tokens = int(self.rows.loss_tokens[batch].sum())
        scale = rt.world / max(1, loss_tokens)  # DDP averages over ranks; undo that, divide by all tokens
        total = torch.zeros((), device=rt.device)
        for i, indices in enumerate(micro_batches):
            micro = self._micro_batch(step, i, indices)
            with self._sync(last=i == len(micro_batches) - 1):
                with rt.autocast():
                    loss = loss_sum(self.model, micro)
                if not indices:  # joins the FSDP collectives, adds nothing
                    loss = loss.nan_to_num() * 0.0
                scaled = loss * scale
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if indices:
                total += loss.detach()
            self._prefetch_after(step, i, micro_batches)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self._optimizer_step()
        if rt.world > 1:
            dist.all_reduce(total)
        return {
            "step": step + 1,
            "loss": total.item() / max(1, loss_tokens),  # the host waits for the device only here
            "lr": lr,
            "grad_norm": float(grad_norm),
            "step_tokens": int(self.rows.lengths[batch].sum()),
            "step_loss_tokens": loss_tokens,
        }

    def _optimizer_step(self) -> torch.Tensor:
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        limit = self.spec.settings.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class ProgressBar:
    """tqdm with loss and tokens/s (ETA is tqdm's own); quiet when `enabled` is False."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        self.last_eval = ""  # shown until the next evaluation (train.eval_every)
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)

    def update(self, event: dict) -> None:
        if self.bar is not None:
            shown = {"loss": f"{event['loss']:.4f}", "tok_s": f"{event['tokens_per_s']:.0f}"}
            if "eval_loss" in event:
                self.last_eval = f"{event['eval_loss']:.4f}"
            if self.last_eval:
                shown["eval"] = self.last_eval
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(event["step"] - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_worker(
    spec: TrainSpec, progress: Progress | None = None, rows: TokenRows | None = None, show_bar: bool = True, publish: bool = True
) -> dict:
    """Train in this process (one of torchrun's workers, or the only one); returns train_stats.
    `publish=False` (the benchmark) trains and measures, and writes no weights."""
    meter = Meter(started=time.perf_counter())
    rt = start_runtime(spec.settings)
    try:
        session = Session(spec, rt, rows if rows is not None else load_rows(spec.data_dir))
        ckpts = Checkpoints(spec.checkpoint_url, spec.settings.keep_checkpoints, spec.storage_options)
        state = load_checkpoint(ckpts, session.model, session.optimizer, session.scheduler, session.scaler, rt)
        _train_loop(session, state, ckpts, meter, progress if rt.main else None, show_bar and rt.main)
        stats = _stats(session, state, meter)
        if publish:
            stats["exported_step"] = restore_best(session, state, ckpts)
            publish_outputs(session, state, stats)
        if rt.world > 1:
            dist.barrier()  # every launcher returns only once the outputs are published
        if rt.main:
            ckpts.remove_all()
        return stats
    finally:
        if rt.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Meter:
    """Throughput of this process's session (a resumed run counts only what it computed)."""

    started: float
    seconds: float = 0.0
    steps: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    first_step_s: float | None = None

    def add(self, seconds: float, tokens: int, loss_tokens: int) -> None:
        self.seconds, self.steps = self.seconds + seconds, self.steps + 1
        self.tokens, self.loss_tokens = self.tokens + tokens, self.loss_tokens + loss_tokens
        if self.first_step_s is None:
            self.first_step_s = time.perf_counter() - self.started

    def rates(self) -> dict:
        seconds = max(self.seconds, 1e-9)
        return {"tokens_per_s": self.tokens / seconds, "loss_tokens_per_s": self.loss_tokens / seconds}


def _require_finite_loss(record: dict) -> None:
    if not math.isfinite(record["loss"]):
        raise TrainingDivergedError(
            f"the training loss became {record['loss']} at step {record['step']} (learning rate {record['lr']:.3g}): "
            "training diverged. Lower --train.learning_rate, keep --train.max_grad_norm on, or use bf16/fp32 instead of fp16."
        )


def _train_loop(session: Session, state: TrainState, ckpts: Checkpoints, meter: Meter, progress: Progress | None, show_bar: bool) -> None:
    total = session.plan.total_steps
    session.model.train()
    bar = ProgressBar(total, state.step, show_bar)
    try:
        while state.step < total and state.stopped is None:
            tick = time.perf_counter()
            record = session.step(state.step)
            elapsed = time.perf_counter() - tick
            _require_finite_loss(record)
            step_tokens, step_loss_tokens = record.pop("step_tokens"), record.pop("step_loss_tokens")
            meter.add(elapsed, step_tokens, step_loss_tokens)
            state.step, state.train_s = record["step"], state.train_s + elapsed
            state.tokens, state.loss_tokens = state.tokens + step_tokens, state.loss_tokens + step_loss_tokens
            record.update(tokens=state.tokens, loss_tokens=state.loss_tokens, elapsed_s=round(state.train_s, 4))
            if session.evaluates(state.step):
                record["eval_loss"] = session.held_out_loss()
                track_best(state, record["eval_loss"], session.spec.settings)
            state.curve.append(record)
            eta = meter.seconds / meter.steps * (total - state.step)
            event = {"event": "step", **record, "total_steps": total, "eta_s": eta, **meter.rates(), "stopped": state.stopped is not None}
            bar.update(event)
            if progress is not None:
                progress(event)
            # A new best is saved at once only when it may be exported: with export_checkpoint 'last' nothing reads it.
            new_best = session.spec.settings.exports_best and "eval_loss" in record and state.best_step == state.step
            if (state.step % session.spec.settings.checkpoint_every == 0 or new_best) and state.step < total and state.stopped is None:
                ckpts.protected = {state.best_step}  # the best checkpoint outlives keep_checkpoints
                save_checkpoint(ckpts, state, session.model, session.optimizer, session.scheduler, session.scaler, session.rt)
    finally:
        bar.close()


def track_best(state: TrainState, eval_loss: float, settings: TrainSettings) -> None:
    """Keep the best held-out loss and its step; stop after `early_stopping_patience` evaluations
    without an improvement of at least min_delta."""
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss - settings.min_delta:
        state.best_eval_loss, state.best_step, state.bad_evals = eval_loss, state.step, 0
        return
    state.bad_evals += 1
    patience = settings.early_stopping_patience
    if patience and state.bad_evals >= patience:
        state.stopped = {
            "step": state.step,
            "reason": f"early stopping: {patience} evaluation(s) without a held-out loss below {state.best_eval_loss:.6g} - "
                      f"{settings.min_delta:g} (best at step {state.best_step})",
        }
        logger.info("%s", state.stopped["reason"])


def restore_best(session: Session, state: TrainState, ckpts: Checkpoints) -> int:
    """With export_checkpoint best: put the best checkpoint's weights back when training went past
    it. Returns the step whose weights are published."""
    if not (session.spec.settings.exports_best and state.best_step) or state.best_step == state.step:
        return state.step
    load_weights(ckpts, state.best_step, session.model)
    return state.best_step


def _stats(session: Session, state: TrainState, meter: Meter) -> dict:
    rt = session.rt
    return {
        "method": session.spec.settings.method,
        "steps": state.step,
        "final_loss": state.curve[-1]["loss"] if state.curve else None,
        "tokens": state.tokens,
        "loss_tokens": state.loss_tokens,
        **meter.rates(),
        "train_s": state.train_s,
        "wall_s": time.perf_counter() - meter.started,
        "first_step_s": meter.first_step_s,
        "resumed_from_step": state.resumed_from_step,
        "device": str(rt.device.type),
        "precision": rt.precision,
        "world_size": rt.world,
        "strategy": session.spec.settings.strategy if rt.world > 1 else "single",
        "global_batch_size": session.plan.global_batch,
        "attention": unwrap(session.model).config._attn_implementation,
        "gradient_checkpointing": session.checkpointing,
        "compiled": session.compiled,
        "trainable_params": sum(p.numel() for p in session.params),
        "total_params": sum(p.numel() for p in session.model.parameters()),
        "peak_memory_gib": round(peak_memory_gib(rt.device), 3),
        "best_step": state.best_step or None,
        "best_eval_loss": state.best_eval_loss,
        "stopped_early": state.stopped,
    }


def publish_outputs(session: Session, state: TrainState, stats: dict) -> None:
    """Collective gather of the trained weights; rank 0 publishes adapter/ or model/, the loss
    curve and the stats as one atomic folder."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    lora = session.spec.settings.method == "lora"
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=lora)
    weights = get_model_state_dict(session.model, options=options)
    if not session.rt.main:
        return
    from transformers import AutoTokenizer

    unwrapped = getattr(session.model, "module", session.model)
    tokenizer = AutoTokenizer.from_pretrained(session.spec.model_dir, trust_remote_code=session.spec.trust_remote_code)
    with storage.atomic_directory(session.spec.output_url, session.spec.storage_options) as scratch:
        target = scratch / ("adapter" if lora else "model")
        if not lora:  # fp32 master weights, saved as trained; export decides the release dtype
            weights = unique_tensors(weights, unwrapped)
            unwrapped.config.use_cache = True  # training turned it off for packing; inference wants it
        unwrapped.save_pretrained(str(target), state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(str(target))
        (scratch / "loss_curve.json").write_text(json.dumps(state.curve, indent=1) + "\n")
        (scratch / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
