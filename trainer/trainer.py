"""The one trainer: every training method is this loop with a different model transform and config."""

import contextlib
import math
import os
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch
from torch.distributed.tensor.parallel import loss_parallel

from parallel.distributed import Runtime
from parallel.mesh import build_meshes, device_type
from parallel.parallelize import parallelize
from parallel.pp import build_schedule
from trainer.checkpoint.manager import CheckpointManager
from trainer.checkpoint.paths import checkpoint_root, complete_steps, step_dir
from trainer.checkpoint.state import (
    CounterState, DataState, ModelState, OptimizerState, RngState, SchedulerState,
)
from trainer.config import Config, to_yaml
from trainer.converters import convert, linear_styles
from trainer.data import PackedLoader, check_enough_tokens, load_documents
from trainer.data.prefetch import PrefetchingLoader
from trainer.data.held_out import check_eval_tokens, training_and_eval_documents
from trainer.distill import DistillLoss, build_teacher
from trainer.errors import TrainingDiverged
from trainer.export import export_run
from trainer.host_memory import retain_freed_memory
from trainer.loss import TokenLoss
from trainer.metrics import FastFlops, MetricsLogger, peak_tflops
from trainer.model.build import build_meta_model, flops_per_token
from trainer.model.family import family_of
from trainer.optimizer import Optimizers, clip_grad_norm
from trainer.plan import make_plan
from trainer.precision import Precision
from trainer.preemption import MARKER, Preempted, PreemptionWatch
from trainer.profiling import StepProfiler
from trainer.step_phases import StepPhases
from trainer.validation import Validation
from trainer.weights.load import open_weights
from trainer.weights.materialize import materialize_unit


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    def __init__(self, cfg: Config, runtime: Runtime):
        self.cfg, self.runtime = cfg, runtime
        self.output_dir = Path(cfg.job.output_dir)
        if runtime.device.type == "cpu" and cfg.training.cpu_malloc == "retain":
            retain_freed_memory()  # before the data and the model allocate anything
        # Everything that can be wrong with the config or the data is found before the model is built.
        plan = make_plan(cfg, runtime.world_size)
        self.dims, self.accum_steps, self.pp_microbatches = plan.dims, plan.accum_steps, plan.pp_microbatches
        self.num_stages, self.family = plan.num_stages, family_of(plan.model_args)
        self.converters = plan.converters
        self.tokenizer, model_args = plan.tokenizer, plan.model_args
        docs, held_out = training_and_eval_documents(cfg, load_documents)
        check_enough_tokens(docs, self.tokenizer, cfg.data, cfg.training.seq_len)
        if held_out is not None:
            check_eval_tokens(held_out, self.tokenizer, cfg)

        self.meshes = build_meshes(self.dims, device_type())
        # FSDP casts parameters itself (MixedPrecisionPolicy); without it, autocast does.
        self.uses_fsdp = self.meshes.fsdp.active
        set_determinism(cfg.job.seed, cfg.job.deterministic)
        self.loader = PackedLoader(
            docs, self.tokenizer, cfg.data, cfg.training.seq_len, cfg.training.local_batch_size,
            dp_rank=self.meshes.dp.local_rank, dp_size=self.dims.dp_size, seed=cfg.job.seed,
        )
        if cfg.data.prefetch > 0:
            self.loader = PrefetchingLoader(self.loader, cfg.data.prefetch)

        self.validation = None
        if held_out is not None:
            self.validation = Validation(cfg, held_out, self.tokenizer, dp_rank=self.meshes.dp.local_rank,
                                         dp_size=self.dims.dp_size)

        self.precision = Precision.from_config(
            cfg.training.mixed_precision_param, cfg.training.mixed_precision_reduce, runtime.device
        )
        tp_loss = self.dims.tp > 1 and cfg.parallel.loss_parallel
        # Vocabulary-sharded logits need the loss, and its backward, inside this context.
        self.loss_context = loss_parallel if tp_loss else contextlib.nullcontext
        self.chunked_loss = plan.chunked_loss
        self.loss_fn = self._build_loss(plan.teacher_args)
        self.model_parts, self.schedule = self._build_model(model_args)
        self.params = [p for part in self.model_parts for p in part.parameters() if p.requires_grad]

        self.optimizers = Optimizers(self.model_parts, cfg.optimizer, cfg.lr_scheduler, cfg.training.steps, runtime.device)
        self.counters = CounterState()
        self.checkpointer = self._build_checkpointer(model_args)
        # Measured before the restore, though it draws from a generator of its own: nothing may touch
        # the global RNG between the restore and step 1 (dropout masks would move).
        peak, peak_source = peak_tflops(cfg.metrics, runtime.device, self.precision.param_dtype)
        self.step = 0 if cfg.checkpoint.create_seed else self.checkpointer.resume()
        for converter in self.converters:
            converter.after_optimizer_step(self.model_parts)
        self.bad_steps = 0  # steps in a row whose loss or gradient norm was not finite
        self.loss_parts: dict[str, float] = {}  # named terms of the last step's loss (distillation: ce, kl)
        self.phases = StepPhases(cfg.metrics.step_phases, runtime.device)
        self.profiler = StepProfiler(cfg.metrics.profile_steps, self.output_dir, runtime.rank, runtime.device)
        self.preemption = PreemptionWatch(runtime.device)
        meta = convert(build_meta_model(model_args), self.converters)
        model_flops = flops_per_token(model_args, cfg.training.seq_len)
        fast = next((f for c in self.converters if (f := c.fast_flops(meta)) is not None), None)
        fast_flops = FastFlops(fast[0], min(1.0, fast[1] / model_flops), fast[2]) if fast else None
        self.metrics = MetricsLogger(
            cfg.metrics, self.output_dir, is_main=runtime.is_main, total_steps=cfg.training.steps,
            flops_per_token=model_flops, peak_tflops=peak, peak_source=peak_source,
            device=runtime.device, start_step=self.step, rank=runtime.rank, fast_flops=fast_flops,
        )
        if runtime.is_main and self.step < cfg.training.steps:
            d = self.dims
            trainable = sum(p.numel() for p in meta.parameters() if p.requires_grad)
            base = "".join(c.describe() for c in self.converters)
            print(
                f"training {trainable:,} of {sum(p.numel() for p in meta.parameters()):,} parameters{base} on "
                f"{runtime.world_size} {runtime.device.type} rank(s) (pp {d.pp} x dp_replicate {d.dp_replicate} x "
                f"dp_shard {d.dp_shard} x tp {d.tp}), {self.accum_steps} microbatch(es) per step; "
                f"MFU against {peak:.2f} TFLOP/s ({peak_source})",
                flush=True,
            )
            for line in (line for c in self.converters for line in c.report()):
                print(line, flush=True)
            if plan.teacher_args is not None:
                teacher = sum(p.numel() for p in build_meta_model(plan.teacher_args).parameters())
                print(f"distilling from {cfg.distill.teacher} ({teacher:,} frozen parameters, forward only, sharded like "
                      f"the model): loss = {1 - cfg.distill.kd_ratio:g} x cross-entropy + {cfg.distill.kd_ratio:g} x "
                      f"{cfg.distill.loss} KL at temperature {cfg.distill.temperature:g}; mfu counts the model's "
                      f"FLOPs only", flush=True)
            if fast_flops:
                print(f"{fast[0]} runs {100 * fast_flops.share:.1f}% of the model's FLOPs: mfu stays against the peak above "
                      f"(the FLOPs are the model's); mfu_mixed counts them at the {fast[0]} peak, {fast[2]:g}x ({fast[3]})",
                      flush=True)

    def _build_loss(self, teacher_args) -> TokenLoss:
        """Cross-entropy; with a teacher, the distillation loss (all that a distillation run changes)."""
        if teacher_args is None:
            return TokenLoss(chunk_tokens=self.cfg.training.loss_chunk_tokens)
        teacher = build_teacher(self.cfg, teacher_args, fsdp_mesh=self.meshes.fsdp.mesh,
                                shards=self.dims.dp_shard if self.uses_fsdp else 1, precision=self.precision,
                                device=self.runtime.device)
        return DistillLoss(self.cfg.distill, teacher)

    def _build_checkpointer(self, model_args) -> CheckpointManager:
        """Everything a resume needs, as one DCP state dict (DESIGN rule 7)."""
        # A converter that rebuilds the frozen part at every start (adapters: from model.init_from, or the
        # seeded init) checkpoints only what trains.
        trainable_only = any(c.checkpoints_trainable_only for c in self.converters)
        state = {
            "model": ModelState(self.model_parts, "trainable" if trainable_only else "all"),
            "optimizer": OptimizerState(self.optimizers),
            "lr_scheduler": SchedulerState(self.optimizers), "dataloader": DataState(self.loader, self.meshes.dp.group),
            "train": self.counters, "rng": RngState(), "model_args": {"json": model_args.to_json()},
        }
        for converter in self.converters:
            state.update(converter.checkpoint_entries())
        return CheckpointManager(
            self.cfg.checkpoint, self.output_dir, state, is_main=self.runtime.is_main, total_steps=self.cfg.training.steps
        )

    def _build_model(self, model_args):
        """Meta model -> pipeline stages -> parallelized -> materialized: nothing is ever whole on a rank."""
        # Converted before the split: stages keep the converted modules of their layers.
        model = convert(build_meta_model(model_args), self.converters)
        pp, num_stages = self.meshes.pp, self.num_stages
        if pp.active:
            parts = self.family.split_stages(model, pp_rank=pp.local_rank, pp_size=self.dims.pp, num_stages=num_stages)
        else:
            parts = [(0, model)]
        weights = open_weights(self.cfg.model.init_from, model_args, self.cfg.job.seed)
        for _, part in parts:
            self._parallelize(part, partial(self._materialize_unit, weights=weights))
            part.train()
        for _, part in parts:
            if self.chunked_loss and part.norm is not None:  # the last stage (on the last pipeline rank)
                # It stops at the final norm; the loss projects, chunk by chunk (trainer/loss.py).
                part.project = False
                self.loss_fn.head = part.head_weight
        schedule = None
        if pp.active:
            schedule = build_schedule(
                parts, num_stages=num_stages, pp_mesh=pp.mesh, device=self.runtime.device,
                schedule=self.cfg.parallel.pp_schedule, n_microbatches=self.pp_microbatches, loss_fn=self.loss_fn,
            )
        return [part for _, part in parts], schedule

    def _materialize_unit(self, unit, unit_name: str, *, weights) -> None:
        """Each FSDP unit leaves the meta device just before it is sharded (the only way any run does):
        its base weights from model.init_from or the seeded init, then each converter's part."""
        pieces = materialize_unit(unit, unit_name, device=self.runtime.device, weights=weights)
        for converter in self.converters:
            converter.finish_unit(pieces, shards=self.dims.dp_shard if self.uses_fsdp else 1, seed=self.cfg.job.seed,
                                  frozen_dtype=self.precision.param_dtype)

    def _parallelize(self, part, materialize) -> None:
        cfg, meshes = self.cfg, self.meshes
        tp_mesh = meshes.tp.mesh
        styles = linear_styles(self.converters)
        tp_plan = self.family.tp_plan(part, loss_parallel=cfg.parallel.loss_parallel, styles=styles) if tp_mesh else None
        parallelize(
            part, tp_mesh=tp_mesh, tp_plan=tp_plan, async_tp=cfg.parallel.async_tp,
            ac_mode=cfg.activation_checkpoint.mode, ac_every=cfg.activation_checkpoint.every, compile=cfg.compile.enabled,
            fsdp_mesh=meshes.fsdp.mesh, param_dtype=self.precision.param_dtype,
            reduce_dtype=self.precision.reduce_dtype, reshard_after_forward=cfg.parallel.fsdp_reshard_after_forward,
            cpu_offload=cfg.parallel.cpu_offload, materialize=materialize,
        )

    def create_seed_checkpoint(self) -> None:
        """checkpoints/step-0 with the initial weights only: later runs (any layout) start from it."""
        self.checkpointer.save(0, blocking=True, model_only=True)
        self.checkpointer.wait()

    def _record_start(self) -> None:
        """config.yaml is this start's resolved config; every start also keeps its own copy under
        starts/, so a resume with other settings never hides those the earlier checkpoints came from."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / MARKER).unlink(missing_ok=True)
        text = to_yaml(self.cfg)
        (self.output_dir / "config.yaml").write_text(text)
        starts = self.output_dir / "starts"
        starts.mkdir(exist_ok=True)
        number = len(list(starts.glob("*.yaml"))) + 1
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        header = f"# start {number} at {when}, from step {self.step}, on {self.runtime.world_size} rank(s)\n"
        (starts / f"{number:03d}-from-step-{self.step}.yaml").write_text(header + text)

    def train(self) -> None:
        steps = self.cfg.training.steps
        if self.step >= steps:
            if self.runtime.is_main:
                print(
                    f"nothing to train: {self.output_dir} holds a checkpoint at step {self.step}, and training.steps="
                    f"{steps}. Raise training.steps to train on, or start fresh with checkpoint.resume_from=none "
                    f"(or another job.output_dir)", flush=True,
                )
            return
        if self.runtime.is_main:
            self._record_start()
        self.metrics.start_clock()
        while self.step < steps:
            with self.profiler.around(self.step + 1):
                loss, grad_norm = self._step_and_log()
            if self.validation is not None and self.validation.due(self.step):
                self._validate()
            healthy = self._note_health(loss, grad_norm)
            signum = self.preemption.agreed_signal()
            saved = self.checkpointer.maybe_save(self.step, healthy=healthy, force=signum != 0)
            if self.bad_steps >= self.cfg.training.max_bad_steps:
                raise TrainingDiverged(self._diverged_message())
            if signum:
                why = "checkpoint.enabled=false" if not self.cfg.checkpoint.enabled else "the step's loss was not finite"
                raise Preempted(self.step, signum, saved, why)
        self.checkpointer.wait()
        self.loader.close()
        self.metrics.close()
        if self.cfg.export.hf or self.cfg.export.peft:
            export_run(
                self.cfg, self.model_parts, pipelined=self.schedule is not None, converters=self.converters,
                tokenizer=self.tokenizer, step=self.step, is_main=self.runtime.is_main,
            )

    def _step_and_log(self) -> tuple[float, float]:
        """The next batches, one optimizer step over them, the counters and the step's log line."""
        start = time.perf_counter()
        self.phases.start_step()
        microbatches, window_ids = [], []
        for _ in range(self.accum_steps):
            microbatches.append(self.loader.next_batch())
            window_ids += self.loader.last_ids
        data_time = time.perf_counter() - start
        self.phases.add("data", data_time)
        lr = self.optimizers.lr
        loss, grad_norm = self.train_step(microbatches)
        self.step += 1
        local_tokens = sum(inputs.numel() for inputs, _ in microbatches)
        self.counters.step = self.step
        self.counters.tokens += local_tokens * self.dims.dp_size
        step_time = time.perf_counter() - start
        self.metrics.maybe_log(
            self.step, loss=loss, lr=lr, grad_norm=grad_norm, local_tokens=local_tokens,
            step_time=step_time, tokens_seen=self.counters.tokens, window_ids=window_ids,
            loss_parts=self.loss_parts, data_time=data_time, phases=self.phases.of_step(step_time),
        )
        return loss, grad_norm

    def _note_health(self, loss: float, grad_norm: float) -> bool:
        """Counts non-finite steps in a row (train_step skipped their update); True for a finite step."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        if self.runtime.is_main:
            print(
                f"step {self.step}: loss {loss:.4f} / grad_norm {grad_norm:.4f} is not finite: skipped its optimizer update and "
                f"checkpoint ({self.bad_steps} such step(s) in a row; the run stops at training.max_bad_steps="
                f"{self.cfg.training.max_bad_steps})", flush=True,
            )
        return False

    def _diverged_message(self) -> str:
        n, root = self.bad_steps, checkpoint_root(self.output_dir)
        steps = complete_steps(root)
        last = (f"the last good checkpoint is {step_dir(root, steps[-1])}, and a restart resumes from it"
                if steps else "no checkpoint was written, so a restart begins at step 0")
        return (
            f"training diverged: the loss or gradient norm was not finite for {n} steps in a row (steps "
            f"{self.step - n + 1}-{self.step}, training.max_bad_steps={self.cfg.training.max_bad_steps}); none of them "
            f"was saved, and {last}. Lower optimizer.lr, lengthen lr_scheduler.warmup_steps or keep "
            f"training.max_norm clipping on, then start again"
        )

    def train_step(self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over the microbatches; returns (global mean loss per token, grad norm)."""
        self.optimizers.zero_grad()
        # Normalise by the number of label tokens in the whole global batch, so that a step's gradient
        # is the same however the batch is split into ranks and microbatches (and right under masking).
        local_tokens = sum(int(TokenLoss.count(labels)) for _, labels in microbatches)
        global_tokens = self._sum(torch.tensor(float(local_tokens)), over_pp=False).item()
        # FSDP averages gradients over the data-parallel ranks; scaling by their number undoes that mean.
        self.loss_fn.start(scale=self.dims.dp_size / global_tokens, device=self.runtime.device)
        for inputs, labels in microbatches:
            self.forward_backward(inputs.to(self.runtime.device), labels.to(self.runtime.device))
        with self.phases.phase("optimizer"):
            grad_norm = clip_grad_norm(self.params, self.cfg.training.max_norm, pp_group=self.meshes.pp.group)
        # Only the last pipeline stage computes the loss; the others hold zero, so the sum is right.
        loss = self._sum(self.loss_fn.summed, over_pp=True).item() / global_tokens
        self.loss_parts = {name: self._sum(value, over_pp=True).item() / global_tokens
                           for name, value in self.loss_fn.parts().items()}
        grad_norm = grad_norm.item()
        # Both figures are reduced over every rank (the loss over dp and pp, the norm over the whole mesh),
        # so every rank takes the same decision. A non-finite step leaves the weights, the optimizer's
        # moments and the schedule as they were.
        if math.isfinite(loss) and math.isfinite(grad_norm):
            with self.phases.phase("optimizer"):
                self.optimizers.step()
                for converter in self.converters:
                    converter.after_optimizer_step(self.model_parts)
        return loss, grad_norm

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: TokenLoss | None = None,
                         backward: bool = True) -> None:
        """One microbatch into `loss_fn` (the training loss unless given; a pipeline's is its own)."""
        loss_fn = loss_fn or self.loss_fn
        # autocast covers the pipeline's backward too: the schedule runs both in one call.
        with self.loss_context(), self.precision.autocast(self.runtime.device, fsdp=self.uses_fsdp):
            if self.schedule is not None:
                with self.phases.phase("forward"):
                    self._pipeline_forward_backward(inputs, labels, backward)
                return
            with self.phases.phase("forward"):
                logits = self.model_parts[0](inputs)
                loss = loss_fn(logits, labels, inputs=inputs)
            if backward:
                with self.phases.phase("backward"):
                    loss.backward()
            loss_fn.record(loss)

    def _pipeline_forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor, backward: bool) -> None:
        """The schedule splits the batch into pp microbatches and runs the loss (and its backward) itself."""
        # Stage 0 is on pipeline rank 0 and the last stage on the last rank, for every schedule.
        pp_rank = self.meshes.pp.local_rank
        args = (inputs,) if pp_rank == 0 else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": labels, "losses": losses} if pp_rank == self.dims.pp - 1 else {}
        (self.schedule.step if backward else self.schedule.eval)(*args, **kwargs)
        for loss in losses:
            self.loss_fn.record(loss)

    @torch.no_grad()
    def _validate(self) -> None:
        """The held-out loss per label token over every rank's validation batches, through the same
        forward as training (no gradients, no dropout), then the samples."""
        start = time.perf_counter()
        for part in self.model_parts:
            part.eval()
        loss_fn = self.loss_fn.plain()
        loss_fn.start(scale=1.0, device=self.runtime.device)
        tokens = 0
        for inputs, labels in self.validation.batches:
            tokens += int(TokenLoss.count(labels))
            self.forward_backward(inputs.to(self.runtime.device), labels.to(self.runtime.device), loss_fn, backward=False)
        count = self._sum(torch.tensor(float(tokens)), over_pp=False).item()
        loss = self._sum(loss_fn.summed, over_pp=True).item() / count
        samples = []
        if self.validation.cfg.sample_prompts and self.schedule is None and self.dims.tp == 1 and not self.cfg.compile.enabled:
            samples = self.validation.samples(self.model_parts[0])
        for part in self.model_parts:
            part.train()
        self.metrics.log_eval(self.step, loss=loss, tokens=int(count), seconds=time.perf_counter() - start, samples=samples)

    def _sum(self, value: torch.Tensor, over_pp: bool) -> torch.Tensor:
        value = value.to(self.runtime.device)
        self.meshes.dp.all_reduce(value)
        if over_pp:
            self.meshes.pp.all_reduce(value)
        return value
