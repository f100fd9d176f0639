"""The one trainer: every training method is this loop with a different model transform and config.

The Plan (trainer/plan.py) decided everything and checked it; the trainer wires what it holds (data,
meshes, the model, optimizer, checkpoints, metrics) and runs the loop."""

import contextlib
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.distributed.tensor.parallel import loss_parallel

from parallel.cp import shard_sequence
from parallel.distributed import Runtime
from parallel.library_patches import async_tp_compile, sac_ignores_profiler_ranges
from parallel.mesh import build_meshes, device_type
from trainer.build import build_model
from trainer.checkpoint.manager import CheckpointManager
from trainer.checkpoint.paths import checkpoint_root, complete_steps, step_dir
from trainer.checkpoint.state import (
    CounterState, DataState, ModelState, OptimizerState, RngState, SchedulerState,
)
from trainer.config import load_config, to_yaml
from trainer.config.schema import DataConfig
from trainer.data import PackedLoader, make_loader
from trainer.data.loader import Batch
from trainer.data.mixture import mixture_summary, source_scalars
from trainer.data.prefetch import PrefetchingLoader
from trainer.distill import DistillLoss, build_teacher
from trainer.errors import TrainingDiverged
from trainer.export import export_run
from trainer.fault import FAILED_MARKER, HUNG_MARKER
from trainer.fault.inject import Injector
from trainer.fault.replicas import ReplicaGroups
from trainer.fault.restarts import note_step, restart_line
from trainer.fault.stragglers import StragglerWatch
from trainer.fault.watchdog import HangWatchdog
from trainer.host_memory import retain_freed_memory
from trainer.expert_balance import expert_balance
from trainer.loss import TokenLoss
from trainer.metrics import MetricsLogger, peak_tflops
from trainer.optimizer import Optimizers, clip_grad_norm, schedule_change
from trainer.plan import Plan, load_data
from trainer.precision import Precision
from trainer.preemption import MARKER, Preempted, PreemptionWatch
from trainer.profiling import StepProfiler
from trainer.qat.export import FORMATS, rounded_as
from trainer.qat.layers import qat_layers
from trainer.run_record import RunRecord
from trainer.start_report import fast_flops, start_lines
from trainer.step_phases import StepPhases
from trainer.validation import Validation


def set_determinism(seed: int, deterministic: bool) -> None:
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


class Trainer:
    def __init__(self, plan: Plan, runtime: Runtime):
        cfg = self.cfg = plan.cfg
        self.plan, self.runtime, self.dims, self.converters = plan, runtime, plan.dims, plan.converters
        self.output_dir = Path(cfg.job.output_dir)
        if runtime.device.type == "cpu" and cfg.training.cpu_malloc == "retain":
            retain_freed_memory()  # before the data and the model allocate anything
        docs, held_out = load_data(plan)
        self.meshes = build_meshes(self.dims, device_type(), moe=hasattr(plan.model_args, "num_experts"))
        self.uses_fsdp = self.meshes.fsdp.active  # FSDP casts parameters itself; without it, autocast does
        # Library state the run needs while it is built and trains, undone by close().
        self.patches = contextlib.ExitStack()
        for patch in plan.info.run_patches:
            self.patches.enter_context(patch())
        if cfg.parallel.async_tp:
            self.patches.enter_context(async_tp_compile(self.meshes.tp.group))
        # Blocks that hold FSDP units of their own (experts under ep, MoE layers under tp).
        nested_units = self.meshes.expert_fsdp.active or self.meshes.moe_fsdp.active
        if nested_units and cfg.activation_checkpoint.mode == "selective_op":
            self.patches.enter_context(sac_ignores_profiler_ranges())
        set_determinism(cfg.job.seed, cfg.job.deterministic)
        self.loader = self._loader(docs)
        if cfg.data.prefetch > 0:
            self.loader = PrefetchingLoader(self.loader, cfg.data.prefetch)
        # Held-out sets by label: "" for eval.source (or the split), a mixture source's name for its eval_source.
        held_out_sets = {**({"": self._loader(held_out)} if held_out is not None else {}),
                         **{c.name: self._loader(docs.held_out[c.name], c.cfg) for c in getattr(docs, "components", [])
                            if c.name in docs.held_out}}
        self.validation = Validation(cfg.eval, held_out_sets, plan.tokenizer, total_steps=cfg.training.steps) if held_out_sets else None
        self.precision = Precision.from_config(cfg.training.mixed_precision_param, cfg.training.mixed_precision_reduce, runtime.device)
        # Vocabulary-sharded logits need the loss, and its backward, inside this context.
        self.loss_context = loss_parallel if self.dims.tp > 1 and cfg.parallel.loss_parallel else contextlib.nullcontext
        self.loss_fn = self._build_loss()
        self.model_parts, self.schedule = build_model(plan, meshes=self.meshes, precision=self.precision,
                                                      device=runtime.device, loss_fn=self.loss_fn)
        self.params = [p for part in self.model_parts for p in part.parameters() if p.requires_grad]
        # Mixtures of experts: the load-balancing loss and bias, and the expert-load metrics (None: dense).
        self.balance = expert_balance(plan, self.model_parts, runtime.device)
        self.optimizers = Optimizers(self.model_parts, cfg.optimizer, cfg.lr_scheduler, cfg.training.steps, runtime.device)
        self.counters = CounterState()
        record = self.record = RunRecord(self.output_dir / "metrics.jsonl" if runtime.is_main else None)
        self.checkpointer = CheckpointManager(
            cfg.checkpoint, self.output_dir, self._checkpoint_state(), is_main=runtime.is_main,
            total_steps=cfg.training.steps, fixed=plan.info.checkpoint_entries, record=record,
        )
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
        self.preemption = PreemptionWatch(runtime.device, runtime.is_main)
        fault = cfg.fault
        self.injector = Injector(fault.inject, runtime.rank, cfg.training.steps, fault.replica_id)
        self.watchdog = HangWatchdog(fault.hang_timeout_s, self.output_dir, runtime.rank, runtime.world_size, runtime.device.type)
        # Replica groups (torchft): built after the resume, so that a group starts from its checkpoint's step.
        self.replicas = None
        if fault.replica_groups > 1:
            self.replicas = ReplicaGroups(fault, self.checkpointer.state, runtime.rank, runtime.world_size,
                                          runtime.device, self.step)
        self.stragglers = StragglerWatch(fault.straggler_factor, fault.straggler_steps, runtime.rank, runtime.world_size,
                                         runtime.device, runtime.is_main, stage=self.meshes.pp.local_rank)
        model_flops = plan.family.flops_per_token(plan.model_args, cfg.training.seq_len)
        self.metrics = MetricsLogger(
            cfg.metrics, self.output_dir, is_main=runtime.is_main, total_steps=cfg.training.steps,
            flops_per_token=model_flops, peak_tflops=peak, peak_source=peak_source, device=runtime.device,
            start_step=self.step, rank=runtime.rank, fast_flops=fast_flops(plan, model_flops), record=record,
        )
        if runtime.is_main and self.step < cfg.training.steps:
            for line in start_lines(plan, device=runtime.device, peak=peak, peak_source=peak_source,
                                    cpu_threads=runtime.cpu_threads):
                print(line, flush=True)

    def close(self) -> None:
        """Undoes the library state and the signal handlers the run changed (every run ends here)."""
        self.watchdog.stop()
        if self.replicas is not None:
            self.replicas.close()
        self.preemption.restore()
        self.patches.close()

    def _loader(self, docs, data: DataConfig | None = None) -> PackedLoader:
        cfg = self.cfg
        # Replica groups split the data as one more data-parallel dimension: group I reads shares I*dp .. I*dp+dp-1.
        groups, group = cfg.fault.replica_groups, cfg.fault.replica_id
        return make_loader(docs, self.plan.tokenizer, data or cfg.data, cfg.training.seq_len, cfg.training.local_batch_size,
                           dp_rank=group * self.dims.dp_size + self.meshes.dp.local_rank,
                           dp_size=groups * self.dims.dp_size, seed=cfg.job.seed)

    def _build_loss(self) -> TokenLoss:
        """Cross-entropy; with a teacher, the distillation loss (all that a distillation run changes)."""
        cfg = self.cfg
        if self.plan.teacher_args is None:
            return TokenLoss(chunk_tokens=cfg.training.loss_chunk_tokens)
        teacher = build_teacher(cfg.distill, self.plan.teacher_args, hqq_group_size=cfg.adapters.hqq_group_size,
                                fsdp_mesh=self.meshes.fsdp.mesh, shards=self.dims.fsdp_shards if self.uses_fsdp else 1,
                                precision=self.precision, device=self.runtime.device, compile=cfg.compile.enabled,
                                cpu_offload=cfg.parallel.cpu_offload)
        return DistillLoss(cfg.distill, teacher)

    def _checkpoint_state(self) -> dict:
        """Everything a resume needs, as one DCP state dict (DESIGN rule 7)."""
        return {
            "model": ModelState(self.model_parts, "trainable" if self.plan.trainable_only else "all"),
            "optimizer": OptimizerState(self.optimizers), "lr_scheduler": SchedulerState(self.optimizers),
            "dataloader": DataState(self.loader, self.meshes.dp.group), "train": self.counters, "rng": RngState(),
            "model_args": {"json": self.plan.model_args.to_json()},
        }

    def create_seed_checkpoint(self) -> None:
        """checkpoints/step-0 with the initial weights only: later runs (any layout) start from it."""
        self.checkpointer.save(0, blocking=True, model_only=True)
        self.checkpointer.wait()

    def _record_start(self) -> None:
        """config.yaml is this start's resolved config; every start also keeps its own copy under
        starts/, so a resume with other settings never hides those the earlier checkpoints came from."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for marker in (MARKER, HUNG_MARKER, FAILED_MARKER):  # a new start: an earlier stop's markers no longer hold
            (self.output_dir / marker).unlink(missing_ok=True)
        text = to_yaml(self.cfg)
        (self.output_dir / "config.yaml").write_text(text)
        starts = self.output_dir / "starts"
        starts.mkdir(exist_ok=True)
        number = len(list(starts.glob("*.yaml"))) + 1
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        header = f"# start {number} at {when}, from step {self.step}, on {self.runtime.world_size} rank(s)\n"
        (starts / f"{number:03d}-from-step-{self.step}.yaml").write_text(header + text)

    def _note_schedule_change(self) -> None:
        """A resume under another training.steps or schedule moves the learning rate at once: said, not hidden."""
        starts = sorted((self.output_dir / "starts").glob("*.yaml"))
        if self.step > 0 and starts:
            note = schedule_change(load_config(starts[-1]), self.cfg, self.step)
            if note:
                print(note, flush=True)

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
            self._note_schedule_change()
            restart = restart_line(self.output_dir, self.step)
            if restart is not None:
                print(restart[0], flush=True)
                self.record.write("restart", self.step, **restart[1])
            self._record_start()
        self.metrics.start_clock()
        # From here until the last step, a rank on which no step (with its validation and checkpoint)
        # completes in fault.hang_timeout_s ends the run (trainer/fault/watchdog.py).
        self.watchdog.start(self.step)
        while self.step < steps:
            self.injector.before_step(self.step + 1)
            for converter in self.converters:
                converter.before_step(self.model_parts, self.step + 1)
            with self.profiler.around(self.step + 1):
                loss, grad_norm = self._step_and_log()
            if self.validation is not None and self.validation.due(self.step):
                self._validate()
                self.watchdog.progress(self.step)
            healthy = self._note_health(loss, grad_norm)
            signum = self.preemption.agreed_signal()
            saved = self.checkpointer.maybe_save(self.step, healthy=healthy, force=signum != 0)
            self.watchdog.progress(self.step)
            if self.runtime.is_main:
                note_step(self.output_dir, self.step)
            if self.bad_steps >= self.cfg.training.max_bad_steps:
                raise TrainingDiverged(self._diverged_message())
            if signum:
                why = "checkpoint.enabled=false" if not self.cfg.checkpoint.enabled else "the step's loss was not finite"
                raise Preempted(self.step, signum, saved, why)
        self.checkpointer.wait()
        self.watchdog.stop()
        if self.cfg.data.sources and self.runtime.is_main:
            print(mixture_summary(self.loader.state_dict(), self.cfg.training.seq_len), flush=True)
        self.loader.close()
        self.metrics.close()
        if self.cfg.export.hf or self.cfg.export.peft or self.cfg.export.quantized:
            export_run(self.plan, self.model_parts, pipelined=self.schedule is not None, step=self.step,
                       is_main=self.runtime.is_main, compute_dtype=self.precision.param_dtype)

    def _step_and_log(self) -> tuple[float, float]:
        """The next batches, one optimizer step over them, the counters and the step's log line."""
        start = time.perf_counter()
        self.phases.start_step()
        self.stragglers.start_step()
        microbatches, window_ids = [], []
        for _ in range(self.plan.accum_steps):
            microbatches.append(self.loader.next_batch())
            window_ids += self.loader.last_ids
        data_time = time.perf_counter() - start
        self.phases.add("data", data_time)
        lr = self.optimizers.lr
        loss, grad_norm = self.train_step(microbatches)
        # With replica groups the step is the committed one, which a recovering group takes from its peer.
        self.step = self.replicas.step if self.replicas is not None else self.step + 1
        note = self.replicas.recovery_note(self.cfg.fault.replica_id, self.step) if self.replicas is not None else None
        if note and self.runtime.is_main:
            print(note, flush=True)
        local_tokens = sum(batch.inputs.numel() for batch in microbatches)
        self.counters.step = self.step
        self.counters.tokens += local_tokens * self.dims.dp_size
        step_time = time.perf_counter() - start
        ranks = self.stragglers.end_step(self.step, step_time)  # every rank's step and compute time
        extra = {**(self.balance.scalars if self.balance is not None else {}), **ranks}
        if self.replicas is not None:
            extra["fault/replica_groups_stepping"] = float(self.replicas.participants)
        if self.cfg.data.sources:
            extra.update(source_scalars(self.loader.state_dict(), self.cfg.training.seq_len))
        self.metrics.maybe_log(  # a device computes its cp slice of the rank's tokens
            self.step, loss=loss, lr=lr, grad_norm=grad_norm, local_tokens=local_tokens // self.dims.cp,
            step_time=step_time, tokens_seen=self.counters.tokens, window_ids=window_ids,
            loss_parts=self.loss_parts, data_time=data_time, phases=self.phases.of_step(step_time),
            extra=extra,
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

    def train_step(self, microbatches: list[Batch]) -> tuple[float, float]:
        """One optimizer step over the microbatches; returns (global mean loss per token, grad norm)."""
        self.optimizers.zero_grad()
        if self.replicas is not None:
            self.replicas.start_step()  # this step's quorum of replica groups
        # Normalise by the number of label tokens in the whole global batch, so that a step's gradient
        # is the same however the batch is split into ranks and microbatches (and right under masking).
        local_tokens = sum(int(TokenLoss.count(batch.labels)) for batch in microbatches)
        global_tokens = self._sum(torch.tensor(float(local_tokens)), over_pp=False).item()
        # FSDP averages gradients over the data-parallel and context-parallel ranks (each cp rank's gradient
        # is that of its slice of the tokens); scaling by their number undoes that mean.
        self.loss_fn.start(scale=self.dims.dp_size * self.dims.cp / global_tokens, device=self.runtime.device)
        if self.balance is not None:
            per_round = self.plan.pp_microbatches if self.schedule is not None else 1
            self.balance.start_step(accum=len(microbatches), forwards=len(microbatches) * per_round)
        for batch in microbatches:
            self.forward_backward(batch)
        self.injector.after_compute()  # fault.inject's slow rank computes longer here
        if self.replicas is not None:
            self.replicas.average_gradients(self.params)
        with self.phases.phase("optimizer"):
            grad_norm = clip_grad_norm(self.params, self.cfg.training.max_norm, pp_group=self.meshes.pp.group)
        # Only the last pipeline stage computes the loss; the others hold zero, so the sum is right.
        loss = self._sum(self.loss_fn.summed, over_pp=True, over_cp=True).item() / global_tokens
        self.loss_parts = {name: self._sum(value, over_pp=True, over_cp=True).item() / global_tokens
                           for name, value in self.loss_fn.parts().items()}
        grad_norm = grad_norm.item()
        # Both figures are reduced over every rank (the loss over dp and pp, the norm over the whole mesh),
        # so every rank takes the same decision. A non-finite step leaves the weights, the optimizer's
        # moments and the schedule as they were.
        applied = math.isfinite(loss) and math.isfinite(grad_norm)
        if self.replicas is not None:  # asked every step, on every rank (a recovering group loads its peer's state)
            applied = self.replicas.should_commit() and applied
        if applied:
            with self.phases.phase("optimizer"):
                self.optimizers.step()
                for converter in self.converters:
                    converter.after_optimizer_step(self.model_parts)
        if self.balance is not None:
            self.balance.after_step(applied)
        return loss, grad_norm

    def forward_backward(self, batch: Batch, loss_fn: TokenLoss | None = None, backward: bool = True) -> None:
        """One microbatch into `loss_fn` (the training loss unless given; a pipeline's is its own)."""
        loss_fn = loss_fn or self.loss_fn
        device = self.runtime.device
        inputs, labels = batch.inputs.to(device), batch.labels.to(device)
        # Document ids reach the model only when documents are kept apart: the causal path stays SDPA's own.
        # Whole windows even under cp: a rank's queries attend to keys of the whole window.
        documents = batch.documents.to(device) if self.plan.attention == "document" else None
        if self.meshes.cp.active:  # this rank's slice of every sequence (parallel/cp.py)
            inputs, labels = (shard_sequence(t, self.meshes.cp.local_rank, self.dims.cp) for t in (inputs, labels))
        # autocast covers the pipeline's backward too: the schedule runs both in one call.
        with self.loss_context(), self.precision.autocast(device, fsdp=self.uses_fsdp):
            if self.schedule is not None:
                with self.phases.phase("forward"):
                    self._pipeline_forward_backward(inputs, labels, documents, backward)
                return
            with self.phases.phase("forward"):
                logits = self.model_parts[0](inputs, documents=documents)
                loss = loss_fn(logits, labels, inputs=inputs, documents=documents)
            if backward:
                with self.phases.phase("backward"):
                    loss.backward()
            loss_fn.record(loss)

    def _pipeline_forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor, documents: torch.Tensor | None,
                                   backward: bool) -> None:
        """The schedule splits the batch into pp microbatches and runs the loss (and its backward) itself."""
        # Stage 0 is on pipeline rank 0 and the last stage on the last rank, for every schedule.
        pp_rank = self.meshes.pp.local_rank
        args = (inputs,) if pp_rank == 0 else ()
        losses: list[torch.Tensor] = []
        kwargs = {"target": labels, "losses": losses} if pp_rank == self.dims.pp - 1 else {}
        if documents is not None:  # every stage's attention reads them, split into microbatches alike
            kwargs["documents"] = documents
        (self.schedule.step if backward else self.schedule.eval)(*args, **kwargs)
        for loss in losses:
            self.loss_fn.record(loss)

    @torch.no_grad()
    def _validate(self) -> None:
        """The held-out loss per label token over every rank's validation batches, through the same
        forward as training (no gradients, no dropout); the same of the model rounded as each of
        eval.quantized's exports would serve it, and of a QAT run's model with its rounding off; then the
        samples."""
        start = time.perf_counter()
        for part in self.model_parts:
            part.eval()
        sets = {label: self._held_out_loss(batches) for label, batches in self.validation.sets.items()}
        # eval/loss is eval.source's (or the split's); without one, that of a mixture's held-out sets together.
        main = [sets.pop("")] if "" in sets else list(sets.values())
        count = sum(c for _, c in main)
        loss = sum(l * c for l, c in main) / count
        variants = {label: l for label, (l, _) in sets.items()}  # each mixture source's, as eval/loss_NAME
        qat = any(qat_layers(part) for part in self.model_parts)
        for label, fmt in ([("high_precision", None)] if qat else []) + [(n, FORMATS[n]) for n in self.cfg.eval.quantized]:
            with rounded_as(self.model_parts, fmt, self.cfg.qat):
                variants[label] = self._held_out_loss(self.validation.main_batches)[0]
        samples = []
        if (self.validation.cfg.sample_prompts and self.schedule is None and self.dims.tp == 1 and self.dims.cp == 1
                and not self.cfg.compile.enabled):
            samples = self.validation.samples(self.model_parts[0])
        for part in self.model_parts:
            part.train()
        self.metrics.log_eval(self.step, loss=loss, tokens=int(count), seconds=time.perf_counter() - start, samples=samples,
                              variants=variants)

    def _held_out_loss(self, batches) -> tuple[float, float]:
        """(loss per label token, label tokens) of validation batches, over every rank."""
        loss_fn = self.loss_fn.plain()
        loss_fn.start(scale=1.0, device=self.runtime.device)
        tokens = 0
        for batch in batches:
            tokens += int(TokenLoss.count(batch.labels))
            self.forward_backward(batch, loss_fn, backward=False)
        count = self._sum(torch.tensor(float(tokens)), over_pp=False).item()
        return self._sum(loss_fn.summed, over_pp=True, over_cp=True).item() / count, count

    def _sum(self, value: torch.Tensor, over_pp: bool, over_cp: bool = False) -> torch.Tensor:
        """Sums over the data-parallel ranks, and over the pipeline or context-parallel ranks where each
        holds a part of the value (the loss) rather than a copy (label counts of whole batches)."""
        value = value.to(self.runtime.device)
        self.meshes.dp.all_reduce(value)
        if over_pp:
            self.meshes.pp.all_reduce(value)
        if over_cp:
            self.meshes.cp.all_reduce(value)
        return value
