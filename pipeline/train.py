"""`python -m pipeline train`: train a DDPM or a VAE through the DeepSpeed engine.

One code path from 1 CPU process (gloo) to N nodes x G GPUs (NCCL): the rank layout comes from the usual
environment variables (torchrun, `deepspeed`, or the SLURM launcher in `launch/`). Re-running the same command
resumes from the newest complete checkpoint. On SIGTERM/SIGUSR1/SIGUSR2 the current step finishes, every rank
checkpoints, and the process exits with EXIT_PREEMPTED (75, `EXIT_REQUEUE` of pipeline/conventions.py) so a
launcher can requeue it.

Determinism (what makes resume, rank-count and accumulation equivalence exact): timesteps and label dropout for
a step are drawn for the GLOBAL batch (micro-batch x ranks x accumulation steps) from a generator seeded by
(seed, step), and each micro-batch takes its slice; the diffusion noise is counter-based on (seed, step, global
sample id). Only dropout uses the torch RNG, whose state each rank saves in its checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

from pipeline.cli import input_file, output_folder
from pipeline.config import Config, ConfigError, load_config, save_config, to_dict
from pipeline.conventions import COLLECTIVE_TIMEOUT_ENV, EXIT_REQUEUE
from pipeline.io import atomic_write_text
from pipeline.lazy import lazy_import

torch = lazy_import("torch")  # loaded by the first use, so `--help` and config errors answer at once

EXIT_PREEMPTED = EXIT_REQUEUE  # stopped by a signal after a checkpoint; rerun (requeue) to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
DEFAULT_COLLECTIVE_TIMEOUT_S = 600  # DeepSpeed's own default, now stated and changeable


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=input_file, default="configs/tiny.yaml",
                   help="YAML run config (default: configs/tiny.yaml)")
    p.add_argument("--out", type=output_folder, default=None,
                   help="run folder for logs, checkpoints, exports and sample grids (default: runs/<config name>)")
    p.add_argument("--resume", default="auto",
                   help="auto: continue from the newest complete checkpoint in the run folder if there is one "
                        "(re-running the same command resumes); never: refuse a run folder that has checkpoints; "
                        "or a path to a checkpoint folder to start from")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. train.steps=200 data.shards=data/fashion")


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)  # first: a bad key answers before torch loads
    from pipeline.data.cache import node_folder
    from pipeline.data.shardset import resolve_shards
    from pipeline.latent import resolve_latent_config

    config = resolve_latent_config(config)
    # A missing data set answers now, before DeepSpeed loads (the loader verifies the shards themselves later)
    resolve_shards(config.data.shards, verify="off", timeout_s=config.data.read_timeout_s)
    if config.data.cache_dir is not None:
        node_folder(config.data.cache_dir)  # an unset variable in it, too
    run_dir = Path(args.out or f"runs/{config.name}")
    try:
        return Trainer(config, run_dir, resume=args.resume).fit()
    finally:
        end_distributed()


# ---------------------------------------------------------------- distributed set-up

def end_distributed() -> None:
    """Destroy the process group, if any. Left to interpreter exit, gloo's threads sometimes abort the process
    (SIGABRT, "terminate called without an active exception") after the work is done."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed() -> tuple[int, int, torch.device]:
    """Initialise torch.distributed through DeepSpeed from torchrun-style variables (defaults: 1 process)."""
    import deepspeed

    if "WORLD_SIZE" not in os.environ:  # a plain single-process run
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        torch.backends.cudnn.benchmark = True  # fixed image shapes: let cuDNN pick the fastest convolutions
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    import torch.distributed as dist

    if not dist.is_initialized():
        build_with_this_environments_ninja()
        if device.type == "cpu" and local_rank == 0:
            announce_compile("deepspeed_shm_comm", "DeepSpeed's shared-memory communication op for CPU ranks")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   timeout=collective_timeout())
    return dist.get_rank(), dist.get_world_size(), device


def collective_timeout() -> timedelta:
    """How long a collective waits for the other ranks before it fails: a rank whose node died (or hangs) then
    ends the job instead of holding every other rank forever. From PIPELINE_COLLECTIVE_TIMEOUT_S (the launcher's
    --collective-timeout); it must outlast rank 0's longest solo work between collectives (a sample grid)."""
    raw = os.environ.get(COLLECTIVE_TIMEOUT_ENV) or str(DEFAULT_COLLECTIVE_TIMEOUT_S)
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ConfigError(f"{COLLECTIVE_TIMEOUT_ENV}={raw!r}: must be a number of seconds > 0")
    return timedelta(seconds=seconds)


def announce_compile(op: str, what: str) -> None:
    """DeepSpeed JIT-compiles `op` on first use, silently, for minutes: say what and why before it starts."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    cache = Path(root) / op if root else None  # without the variable torch picks a per-version folder
    if cache is not None and (cache / f"{op}.so").is_file():
        return
    print(f"compiling {what} ({op}): once per cache folder, 1-4 minutes; cached in "
          f"{cache or get_default_build_root()} (set TORCH_EXTENSIONS_DIR to share one cache between runs, the "
          "demo and the tests)", file=sys.stderr, flush=True)


def build_with_this_environments_ninja() -> None:
    """DeepSpeed builds its op with the first `ninja` on PATH. A system ninja (1.11 here) and the venv's (1.13)
    hash build commands differently, so runs with and without the venv activated would each rebuild the cached
    op (30-50 s) whenever they alternate. Use this interpreter's own ninja, as an activated venv does."""
    own = Path(sys.executable).parent
    path = os.environ.get("PATH", "")
    if (own / "ninja").is_file() and path.split(os.pathsep)[0] != str(own):
        os.environ["PATH"] = f"{own}{os.pathsep}{path}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_config(config: Config) -> dict:
    t = config.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": 0.0,  # explicit (0.19 silently defaults to 1.0): GuardedAdamW clips instead
        "zero_optimization": {"stage": t.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def compile_model(model: torch.nn.Module) -> None:
    """torch.compile in place (`Module.compile`: parameter names, checkpoints and exports stay unchanged) the
    parts training calls: the model's forward, or those a model names in `compile_units` (a VAE's loss calls its
    encoder and decoder, not its forward)."""
    for unit in getattr(model, "compile_units", lambda: [model])():
        unit.compile()


def channels_last_activations(model: torch.nn.Module) -> None:
    """train.channels_last: every convolution's output in channels_last, so the convolutions, norms and
    activations between them run their channels_last kernels. The weights stay contiguous (DeepSpeed's broadcast
    views them as bytes and ZeRO flattens them into contiguous buffers); a convolution with a channels_last input
    picks the channels_last algorithm anyway. The hook is needed where the input says nothing: a 1-channel image
    is contiguous and channels_last at once, and the first convolution would keep the contiguous format."""
    def to_channels_last(module, inputs, output):
        return output.contiguous(memory_format=torch.channels_last)  # no copy when it already is

    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_hook(to_channels_last)


# ---------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, config: Config, run_dir: Path, resume: str = "auto"):
        import deepspeed

        from pipeline.ema import EMA
        from pipeline.factory import build_loss, build_model
        from pipeline.optim import GuardedAdamW, lr_lambda

        self.config, self.run_dir = config, Path(run_dir)
        self.rank, self.world, self.device = init_distributed()
        if config.train.precision == "fp16" and self.device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA GPU (DeepSpeed's CPU accelerator has no fp16); "
                              "use fp32 or bf16 on CPU")
        resume_from = self.find_resume_point(resume)
        if resume_from is not None:  # the global batch is the run's: fit the micro-batch to this world size
            from pipeline.elastic import fit_global_batch

            config = self.config = fit_global_batch(config, resume_from, self.world)
        t = config.train
        torch.manual_seed(t.seed)  # the same initial weights on every rank (ZeRO-3 partitions local copies)
        model = build_model(config)
        if t.channels_last:
            channels_last_activations(model)
        if t.fused_norm:
            from pipeline.models.unet import use_fused_norms

            use_fused_norms(model)
        if t.compile:
            compile_model(model)
            if self.rank == 0:
                print("train.compile: torch.compile runs during the first step (about a minute on a small CPU; "
                      "inductor caches it for later runs)", file=sys.stderr, flush=True)
        torch.manual_seed(t.seed * 1000 + self.rank + 1)  # dropout only; everything else is counter-based
        self.loss = build_loss(config, self.device)
        optimizer = GuardedAdamW(model.parameters(), grad_clip=t.grad_clip, partitioned=t.zero_stage > 0,
                                 lr=t.lr, betas=tuple(t.adam_betas), weight_decay=t.weight_decay,
                                 fused=t.fused_adam or None)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
        self.engine, _, _, self.lr_scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config),
            dist_init_required=False)
        # one process, ZeRO 0: DeepSpeed's gradient all-reduce would flatten, "average" over 1 rank and copy back
        self.engine.enable_backward_allreduce = self.world > 1 or t.zero_stage > 0
        self.optimizer = optimizer
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[t.precision]
        self.ema = EMA(self.engine.module, t.ema_decay, t.ema_warmup_steps)
        self.loader = self.build_loader()
        self.step, self.nonfinite_in_row, self.nonfinite_total = 0, 0, 0
        self.stop_signal: int | None = None
        self.exported_step, self.last_export = -1, None
        self.saved_step = -1  # the step of the newest complete checkpoint this process wrote or resumed from
        from pipeline.flops import flops_per_image, peak_tflops

        self.flops_per_image, self.peak_tflops = flops_per_image(config), peak_tflops(self.device)  # for MFU
        if resume_from is not None:
            self.restore(resume_from)
        self.logger = self.open_run_folder()  # the first write to the run folder: a failed resume changes nothing
        if resume_from is not None:
            self.logger.info(f"resumed from {resume_from} at step {self.step}")

    # -- set-up helpers
    def find_resume_point(self, resume: str) -> Path | None:
        """Rank 0 chooses the checkpoint (reading only) and tells every rank, so that all ranks resume from the
        same one, or all stop with rank 0's one-line error instead of waiting for it forever."""
        import torch.distributed as dist

        from pipeline.checkpoint import choose_resume_point
        from pipeline.errors import PipelineError

        chosen, error = None, None
        if self.rank == 0:
            try:
                chosen = choose_resume_point(self.run_dir, resume)
                if chosen is not None:
                    self.check_same_config(chosen)
            except Exception as exc:  # re-raised below, after the other ranks have heard of it
                error = exc
        decision = [str(chosen) if chosen else None, None if error is None else (str(error), isinstance(
            error, PipelineError))]
        dist.broadcast_object_list(decision, src=0)
        if error is not None:
            raise error
        if decision[1] is not None:
            message, user_error = decision[1]
            raise (ConfigError if user_error else RuntimeError)(f"rank 0: {message}")
        return Path(decision[0]) if decision[0] else None

    def check_same_config(self, ckpt: Path) -> None:
        """Resuming with a different model/data/diffusion config would silently mix two runs: refuse it (the
        keys that may change are marked on the config fields, see pipeline.config.MAY_CHANGE_ON_RESUME)."""
        from pipeline.checkpoint import saved_config
        from pipeline.config import resume_conflicts

        conflicts = resume_conflicts(saved_config(ckpt), self.config)
        if conflicts:
            raise ConfigError(f"{ckpt} holds a run with a different config; resuming would mix them "
                              f"({'; '.join(conflicts)}). Use a new --out, or the original settings.")

    def open_run_folder(self) -> RunLogger:
        """Rank 0 clears what killed runs left behind, records config and environment, opens the logs."""
        from pipeline.checkpoint import checkpoint_folders, remove_incomplete_checkpoints
        from pipeline.io import remove_stale_temporaries
        from pipeline.provenance import describe_environment

        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_incomplete_checkpoints(self.run_dir)
            for folder in (self.run_dir, self.run_dir / "export", self.run_dir / "samples",
                           *checkpoint_folders(self.run_dir)):
                remove_stale_temporaries(folder)
            save_config(self.config, self.run_dir / "config.yaml")
            record_start(self.run_dir / "run_info.json", {
                **describe_environment(self.device), "world_size": self.world, "start_step": self.step})
        return RunLogger(self.run_dir, enabled=self.rank == 0, start_step=self.step)

    def build_loader(self):
        from pipeline.data.loader import StreamingLoader

        d, t = self.config.data, self.config.train
        return StreamingLoader(d.shards, batch_size=t.micro_batch, resolution=d.image_size,
                               channels=d.channels,
                               seed=t.seed, rank=self.rank, world_size=self.world, num_workers=d.num_workers,
                               shuffle_buffer=d.shuffle_buffer, hflip=d.hflip, resampled=d.resampled,
                               max_bad_fraction=d.max_bad_fraction, fit=d.fit, retries=d.read_retries,
                               timeout_s=d.read_timeout_s, verify=d.verify, grad_accum=t.grad_accum, endless=True,
                               cache_dir=d.cache_dir,
                               cache_bytes=None if d.cache_gb is None else int(d.cache_gb * 1e9))

    def batches(self):
        """Micro-batches forever. The loader is endless (epoch runs into epoch inside its global order), so every
        micro-batch is full and each rank's is its slot of the step's global batch (see Trainer.micro_loss)."""
        return iter(self.loader)

    # -- one optimisation step
    def micro_loss(self, batch, accum_index: int) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch: slice `accum_index` of this rank in the step's global batch (whose samples
        the loss object keys its draws by, so any split over ranks and accumulation steps trains the same model)."""
        from pipeline.loss import BatchSlice

        t = self.config.train
        lo = (accum_index * self.world + self.rank) * t.micro_batch
        part = BatchSlice(self.step, t.micro_batch * self.world * t.grad_accum, lo, lo + t.micro_batch)
        layout = torch.channels_last if t.channels_last else torch.contiguous_format
        images = batch.images.to(self.device, self.dtype, memory_format=layout)
        return self.loss(self.engine, images, batch.labels, part)

    def train_step(self, micro_batches) -> dict:
        """One optimizer step over `grad_accum` micro-batches; returns the step's loss statistics."""
        losses, stats = [], []
        for k, batch in enumerate(micro_batches):
            loss, extra = self.micro_loss(batch, k)
            if self.step + 1 in self.config.train.fault_nonfinite_steps:
                loss = loss * float("nan")  # fault injection: exercises the non-finite guard end to end
            self.engine.backward(loss)
            self.engine.step()
            losses.append(loss.detach().float())
            stats.append(extra)
        self.step += 1
        if self.optimizer.last_skipped:
            self.nonfinite_in_row += 1
            self.nonfinite_total += 1
        else:
            self.nonfinite_in_row = 0
            self.ema.update()
        return {"loss": torch.stack(losses).mean(), "extra": stats}

    # -- the loop
    def fit(self) -> int:
        from tqdm import tqdm

        t = self.config.train
        self.install_signal_handlers()
        batches = self.batches()
        bar = tqdm(total=t.steps, initial=self.step, disable=self.rank != 0, unit="step", dynamic_ncols=True)
        images_per_step = t.micro_batch * t.grad_accum * self.world
        window_start, window_steps = time.perf_counter(), 0
        try:
            while self.step < t.steps:
                result = self.train_step([next(batches) for _ in range(t.grad_accum)])
                window_steps += 1
                bar.update(1)
                if self.nonfinite_in_row >= t.max_nonfinite:
                    self.checkpoint()
                    raise FloatingPointError(
                        f"{self.nonfinite_in_row} consecutive steps had a non-finite loss or gradient (step "
                        f"{self.step}); stopped. The last good state is checkpointed in {self.run_dir}/checkpoints. "
                        "Lower train.lr, use fp32/bf16 instead of fp16, or check the data.")
                if self.step % t.log_every == 0 or self.step == t.steps:
                    rate = window_steps * images_per_step / (time.perf_counter() - window_start)
                    record = self.log(result, rate)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", img_s=f"{rate:.0f}",
                                    tflops=f"{record['tflops']:.3g}",
                                    **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % t.ckpt_every == 0 and self.step < t.steps:
                    self.checkpoint()
                if t.sample_every and self.step % t.sample_every == 0 and self.step < t.steps:
                    self.write_samples()
                if self.stop_requested():
                    self.checkpoint()
                    self.logger.info(f"stopped by signal {self.stop_signal} at step {self.step}; checkpointed, "
                                     f"exit {EXIT_PREEMPTED} (rerun the same command to resume)")
                    return EXIT_PREEMPTED
            self.checkpoint()
            grid = self.write_samples()
            if grid is not None:
                self.logger.info(f"done: {self.step} steps; samples: {grid}; export: {self.run_dir / 'export'}")
            return 0
        finally:
            bar.close()
            self.logger.close()

    def install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self.stop_signal = signum  # acted on at the end of the current step, on every rank together

        for s in STOP_SIGNALS:
            signal.signal(s, handler)

    def stop_requested(self) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([0.0 if self.stop_signal is None else 1.0], device=self.comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.stop_signal is None:
            self.stop_signal = -1  # another rank got the signal
        return flag.item() > 0

    def comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # -- logging, checkpoints, exports, samples
    def log(self, result: dict, images_per_s: float) -> dict:
        import torch.distributed as dist

        loss = result["loss"].to(self.comm_device())
        dist.all_reduce(loss)
        record = {"step": self.step, "loss": loss.item() / self.world, "lr": self.lr_scheduler.get_last_lr()[0],
                  "images_per_s": images_per_s, "nonfinite_skipped": self.nonfinite_total}
        record["grad_norm"] = self.optimizer.last_grad_norm  # before clipping
        record["tflops"] = images_per_s * self.flops_per_image / 1e12  # model FLOPs (pipeline.flops), all ranks
        if self.peak_tflops:  # model FLOPs utilisation of the data-sheet bf16 peak, per device
            record["mfu"] = record["tflops"] / (self.peak_tflops * self.world)
        extras = result["extra"]
        if extras and "bucket_sums" in extras[0]:
            sums = torch.stack([e["bucket_sums"] for e in extras]).sum(0).to(self.comm_device())
            counts = torch.stack([e["bucket_counts"] for e in extras]).sum(0).to(self.comm_device())
            dist.all_reduce(sums)
            dist.all_reduce(counts)
            for q, (s, c) in enumerate(zip(sums.tolist(), counts.tolist())):
                if c > 0:
                    record[f"loss_t_q{q}"] = s / c
        elif extras:
            record.update({k: sum(e[k] for e in extras) / len(extras) for k in extras[0]})
        self.logger.write(record)
        return record

    def run_state(self):
        """The registry of what each rank's checkpoint file holds (see pipeline.checkpoint.RunState)."""
        from pipeline.checkpoint import RunState

        def attribute(name: str):
            return lambda: getattr(self, name), lambda value: setattr(self, name, value)

        cuda = self.device.type == "cuda"
        return RunState(step=attribute("step"), nonfinite_total=attribute("nonfinite_total"),
                        ema=(self.ema.state_dict, self.ema.load_state_dict),
                        loader=(self.loader.state_dict, self.loader.load_state_dict),
                        torch_rng=(torch.get_rng_state, torch.set_rng_state),
                        cuda_rng=(lambda: torch.cuda.get_rng_state() if cuda else None,
                                  lambda s: torch.cuda.set_rng_state(s) if cuda and s is not None else None))

    def checkpoint(self) -> None:
        """Save (collective), unless this very state is already a complete checkpoint (resumed from it, or a
        stop signal on a checkpoint step): writing it again would only open a window for a kill to hit."""
        from pipeline.checkpoint import save_checkpoint

        if self.saved_step != self.step:
            save_checkpoint(self.engine, self.run_dir, self.step, self.run_state().state_dict(),
                            self.config.train.keep_last, to_dict(self.config))
            self.saved_step = self.step
        self.export()

    def restore(self, ckpt: Path) -> None:
        """Load every rank's state from `ckpt`. Reads only: the run folder is untouched if this fails."""
        from pipeline.checkpoint import load_checkpoint

        self.run_state().load_state_dict(load_checkpoint(self.engine, ckpt, self.rank, self.world), ckpt)
        if ckpt.resolve().parent.parent == self.run_dir.resolve():
            self.saved_step = self.step  # this state is a complete checkpoint of this run already

    def export(self) -> Path | None:
        """Write the EMA weights as safetensors (collective under ZeRO-3; rank 0 writes), once per step; older
        ones beyond `train.keep_exports` go."""
        from pipeline.checkpoint import export_weights, prune_exports

        if self.exported_step == self.step:  # a checkpoint and a grid at the same step share one export
            return self.last_export
        self.exported_step = self.step

        weights = self.ema.state_dict_full(self.engine.module)
        if self.rank != 0:
            return None
        self.last_export = export_weights(weights, self.config, self.step, self.run_dir)
        prune_exports(self.run_dir, self.config.train.keep_exports)
        return self.last_export

    def write_samples(self) -> Path | None:
        """A grid from the EMA weights, sampled from the export (so it shows exactly what was exported)."""
        path = self.export()
        if self.rank != 0:
            return None
        from pipeline.checkpoint import load_for_inference
        from pipeline.generation.sampling import sample_images
        from pipeline.generation.settings import default_sampling
        from pipeline.images import save_grid

        inference = load_for_inference(path, device=self.device)
        images = sample_images(inference, range(self.config.train.num_sample_images),
                               default_sampling(self.config, seed=self.config.train.seed))
        grid = save_grid(images, self.run_dir / "samples" / f"step-{self.step:07d}.png")
        save_grid(images, self.run_dir / "samples" / "latest.png")
        self.logger.add_image(images, self.step)
        return grid


def record_start(path: Path, entry: dict) -> None:
    """Append one start of the run (environment, command, step) to the run's JSON record."""
    starts = json.loads(path.read_text())["starts"] if path.is_file() else []
    atomic_write_text(path, json.dumps({"starts": [*starts, entry]}, indent=1) + "\n")


class RunLogger:
    """Rank 0's log sinks: `log.jsonl` (one JSON object per logged step) and TensorBoard under `tb/`.

    Opened at `start_step` (0 for a new run, the checkpoint's step on resume): records of later steps, written by
    a run that was killed before it could checkpoint them, are dropped, since those steps will be logged again.
    """

    def __init__(self, run_dir: Path, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        self.jsonl = self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            keep_records_until(run_dir / "log.jsonl", start_step)
            self.jsonl = open(run_dir / "log.jsonl", "a")
            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for k, v in record.items():
            if k != "step":
                self.tb.add_scalar(f"train/{k}", v, record["step"])

    def add_image(self, images: torch.Tensor, step: int) -> None:
        if self.enabled:
            from pipeline.images import make_grid

            self.tb.add_image("samples", make_grid(images), step, dataformats="HWC")

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def keep_records_until(path: Path, step: int) -> None:
    """Drop the records after `step` from a JSON-lines log, and a line torn by a kill mid-write."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a partial last line
    if kept != lines:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
