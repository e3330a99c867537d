"""Training: AdamW, warm-up + cosine schedule, accumulation, clipping, validation, checkpoints, DDP.

The loop follows nanoGPT's train.py: weight decay on matrices only, linear warm-up then cosine decay to
min_lr, gradient accumulation with DDP's `no_sync` on all but the last micro-step, bf16 autocast on
CUDA. What it adds: exact resume (optimizer, torch and data RNG states in the checkpoint), Ctrl-C or
SIGTERM saves and exits, only rank 0 writes (holding the run directory's lock, `edgegpt.files.run_lock`), and
metrics.jsonl + loss.png beside the checkpoint.

Run layout (`out`):  checkpoint/ (see edgegpt.train.checkpoint), metrics.jsonl, loss.png, .lock (pid of the writer)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from edgegpt.train.checkpoint import load_checkpoint, load_train_state, save_checkpoint
from edgegpt.train.data import get_batch
from edgegpt.errors import ConfigError
from edgegpt.files import atomic_write, run_lock, storage_errors
from edgegpt.train.model import SimpleGPT
from edgegpt.train.config import TrainConfig

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run reached."""

    step: int
    train_loss: float
    val_loss: float | None
    tokens_per_s: float
    interrupted: bool
    weights_sha256: str
    signal: int | None = None  # what interrupted it: signal.SIGINT or signal.SIGTERM (the CLI exits 128 + it)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def configure_optimizer(model: SimpleGPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on the Linear matrices only (not biases, norms or embeddings)."""
    embeddings = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    params = {id(p): p for p in model.parameters()}.values()  # the tied lm_head is listed once
    decay = [p for p in params if p.dim() >= 2 and id(p) not in embeddings]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embeddings]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def weights_sha256(model: torch.nn.Module) -> str:
    """A fingerprint of the weights, to check that DDP ranks and resumed runs agree bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _Interrupt:
    """Turns SIGINT (Ctrl-C) and SIGTERM (kill, a scheduler's pre-emption) into a flag, so the loop finishes its
    step, saves and returns; `signum` says which came first. Outside the main thread signals stay as they are."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested, self.signum, self._previous = False, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal aborts at once
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        again = "Ctrl-C again" if signum == signal.SIGINT else "a second SIGTERM"
        log.warning(
            "%s: finishing this step, saving the checkpoint, then exiting (%s aborts)",
            signal.Signals(signum).name,
            again,
        )

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@torch.no_grad()
def estimate_loss(model, ids: np.ndarray, cfg: TrainConfig, device: torch.device, autocast) -> float:
    """Mean loss over `eval_iters` batches drawn with a fixed seed (independent of the training RNG)."""
    model.eval()
    rng = np.random.default_rng(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = (torch.from_numpy(a).to(device) for a in get_batch(ids, cfg.batch_size, model.config.block_size, rng))
        with autocast:
            logits, _ = model(x)
        losses.append(F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item())
    model.train()
    return float(np.mean(losses))


def _write_metrics(out: Path, record: dict[str, Any]) -> None:
    """Append one line; a failed append is cut back off, so the file stays whole lines."""
    path, line = out / "metrics.jsonl", (json.dumps(record) + "\n").encode()
    with storage_errors(path), open(path, "ab", buffering=0) as f:  # unbuffered: nothing left to flush later
        size = os.fstat(f.fileno()).st_size
        try:
            if (written := f.write(line)) != len(line):
                raise OSError(f"{len(line)} bytes requested and {written} written")
        except OSError:
            f.truncate(size)
            raise


def plot_losses(out: Path) -> None:
    """Draw loss.png from metrics.jsonl (train and validation loss against step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train"), (val, "validation")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "validation" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_write(out / "loss.png", "wb") as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


def _distributed() -> tuple[int, int]:
    """(rank, world_size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def train(
    model: SimpleGPT,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    cfg: TrainConfig,
    out: str | Path,
    tokenizer_json: str,
    *,
    resume: bool = False,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
) -> TrainResult:
    """Train `model` on token ids and keep a checkpoint in `out/checkpoint`.

    Args:
        model: a SimpleGPT (its weights are replaced by the checkpoint's when resuming).
        train_ids, val_ids: 1-D token id arrays (memory-mapped is fine).
        cfg: the optimisation settings; `cfg.steps` is the step to stop at, counted from step 0.
        out: the run directory.
        tokenizer_json: the tokenizer, saved into every checkpoint.
        resume: continue exactly from `out/checkpoint` (model, optimizer, RNG states, step).
        meta: JSON-serialisable facts saved with the training state (e.g. the corpus, for resuming).

    Returns:
        A TrainResult. Ctrl-C (SIGINT) or SIGTERM stops after the current step with a checkpoint saved
        (interrupted=True, signal=the signal's number).

    Raises:
        LockError: another process is training into `out` (rank 0 holds `out/.lock` while it runs).
        ConfigError: resuming a run that is already at or past `cfg.steps`.
        StorageError: a checkpoint or metrics write failed (disk full...); the previous checkpoint is kept.

    >>> # train(SimpleGPT(GPTConfig.preset("tiny")), ids[:9000], ids[9000:], TrainConfig(steps=10), "runs/x", tok.to_str())
    """
    out = Path(out)
    rank, world = _distributed()
    with run_lock(out) if rank == 0 else nullcontext():
        return _train(
            model,
            train_ids,
            val_ids,
            cfg,
            out,
            tokenizer_json,
            resume=resume,
            progress=progress,
            meta=meta,
            rank=rank,
            world=world,
        )


def check_steps_left(step: int, cfg: TrainConfig, out: Path) -> None:
    """Refuse to resume a run at `step` towards `cfg.steps` when no step is left to train."""
    if step >= cfg.steps:
        where = "past" if step > cfg.steps else "at"
        raise ConfigError(
            f"{out}: the run is already at step {step}, {where} the requested --steps {cfg.steps}; "
            f"nothing to train: pass --steps above {step} to train further"
        )


def _train(
    model,
    train_ids,
    val_ids,
    cfg: TrainConfig,
    out: Path,
    tokenizer_json: str,
    *,
    resume: bool,
    progress: bool,
    meta: dict[str, Any] | None,
    rank: int,
    world: int,
) -> TrainResult:
    """The body of `train`, with the run directory locked."""
    device = _resolve_device(cfg.device if world == 1 or cfg.device != "auto" else "auto")
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = configure_optimizer(model, cfg, device)
    data_rng = np.random.default_rng(cfg.seed + 1000 * (rank + 1))
    step = 0
    if resume:
        tensors, state = load_train_state(out)
        model.load_state_dict(load_checkpoint(out).model.state_dict())
        optimizer.load_state_dict(tensors["optimizer"])
        torch.set_rng_state(tensors["torch_rng"])
        data_rng.bit_generator.state = state["data_rng"][rank]
        step = state["step"]
        check_steps_left(step, cfg, out)
        log.info("resumed from %s at step %d", out / "checkpoint", step)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    raw_model = model
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    block = raw_model.config.block_size
    tokens_per_step = cfg.batch_size * block * cfg.grad_accum * world

    def checkpoint():
        """Gather every rank's data RNG state, then rank 0 writes the checkpoint atomically."""
        rng_states = [data_rng.bit_generator.state]
        if world > 1:
            rng_states = [None] * world
            dist.all_gather_object(rng_states, data_rng.bit_generator.state)
        if rank != 0:
            return
        tensors = {"optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state()}
        state = {
            "step": step,
            "data_rng": rng_states,
            "train_config": cfg.to_dict(),
            "world_size": world,
            **(meta or {}),
        }
        save_checkpoint(out / "checkpoint", raw_model, tokenizer_json, optimizer_state=tensors, train_state=state)

    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, desc="train")
    loss_value, val_loss, tok_s, stop = float("nan"), None, 0.0, False
    t_last, steps_since_log = time.perf_counter(), 0
    with _Interrupt() as interrupt:
        while step < cfg.steps and not stop:
            lr = cfg.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = (torch.from_numpy(a).to(device) for a in get_batch(train_ids, cfg.batch_size, block, data_rng))
                sync = world == 1 or micro == cfg.grad_accum - 1
                with autocast, nullcontext() if sync else model.no_sync():
                    logits, _ = model(x)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten()) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.item()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss_value, steps_since_log = loss_sum, steps_since_log + 1
            # Every rank takes the same decision, so collectives stay in step.
            stop = _any_rank(interrupt.requested, world, device)
            if step % cfg.log_interval == 0 or step == cfg.steps or stop:
                now = time.perf_counter()
                tok_s = tokens_per_step * steps_since_log / (now - t_last)
                t_last, steps_since_log = now, 0
                if rank == 0:
                    _write_metrics(out, {"step": step, "loss": loss_value, "lr": lr, "tokens_per_s": tok_s})
            if step % cfg.eval_interval == 0 or step == cfg.steps:
                val_loss = estimate_loss(raw_model, val_ids, cfg, device, autocast)
                if rank == 0:
                    _write_metrics(out, {"step": step, "val_loss": val_loss})
                    plot_losses(out)
            if step % cfg.save_interval == 0 or step == cfg.steps or stop:
                checkpoint()
            if bar is not None:
                postfix = {"loss": f"{loss_value:.3f}", "tok/s": f"{tok_s:,.0f}"}
                if val_loss is not None:
                    postfix["val"] = f"{val_loss:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update(1)
    if bar is not None:
        bar.close()
    if world > 1:
        dist.barrier()
    interrupted = stop and step < cfg.steps
    return TrainResult(
        step,
        loss_value,
        val_loss,
        tok_s,
        interrupted,
        weights_sha256(raw_model),
        signal=interrupt.signum if interrupted else None,
    )


def _any_rank(flag: bool, world: int, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
