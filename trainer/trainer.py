"""The one trainer: every training method is this loop with a different model transform and config."""

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel.mesh import ParallelDims, device_type
from parallel.parallelize import parallelize
from trainer.config import Config, to_yaml
from trainer.config.checks import check_batch, check_seq_len, check_streams
from trainer.data import PackedLoader, check_enough_tokens, load_documents
from trainer.distributed import Runtime
from trainer.metrics import MetricsLogger, peak_tflops
from trainer.model.build import build_meta_model, flops_per_token, resolve_model_args
from trainer.model.init import init_weights
from trainer.optimizer import build_lr_scheduler, build_optimizer, clip_grad_norm
from trainer.precision import Precision
from trainer.tokenizer import build_tokenizer
from trainer.weights.hf_export import export_hf
from trainer.weights.load import load_weights

IGNORE_INDEX = -100


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
        # Everything that can be wrong with the config or the data is found before the model is built.
        self.dims = ParallelDims.from_config(cfg.parallel.dp_replicate, cfg.parallel.dp_shard, runtime.world_size)
        self.accum_steps = check_batch(cfg, self.dims.dp_size)
        check_streams(cfg, self.dims.dp_size)
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        model_args = resolve_model_args(cfg.model, self.tokenizer.vocab_size)
        check_seq_len(cfg, model_args.max_seq_len)
        docs = load_documents(cfg.data)
        check_enough_tokens(docs, self.tokenizer, cfg.data, cfg.training.seq_len)

        self.mesh = self.dims.build_mesh(device_type())
        self.dp_group = self.mesh["dp"].get_group() if self.mesh is not None else None
        set_determinism(cfg.job.seed, cfg.job.deterministic)
        self.loader = PackedLoader(
            docs, self.tokenizer, cfg.data, cfg.training.seq_len, cfg.training.local_batch_size,
            dp_rank=self.dims.dp_rank(self.mesh), dp_size=self.dims.dp_size, seed=cfg.job.seed,
        )

        self.precision = Precision.from_config(
            cfg.training.mixed_precision_param, cfg.training.mixed_precision_reduce, runtime.device
        )
        self.model = build_meta_model(model_args)
        parallelize(self.model, dims=self.dims, mesh=self.mesh, cfg=cfg, precision=self.precision)
        self.model.to_empty(device=runtime.device)
        self.model.init_buffers()
        if cfg.model.init_from is not None:
            load_weights(self.model, cfg.model.init_from)
        else:
            init_weights(self.model, cfg.job.seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

        self.optimizer = build_optimizer(self.model, cfg.optimizer, runtime.device)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.training.steps)
        peak, peak_source = peak_tflops(cfg.metrics, runtime.device, self.precision.param_dtype)
        self.metrics = MetricsLogger(
            cfg.metrics, self.output_dir, is_main=runtime.is_main, total_steps=cfg.training.steps,
            flops_per_token=flops_per_token(model_args, cfg.training.seq_len), peak_tflops=peak, device=runtime.device,
        )
        self.step = 0
        if runtime.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(to_yaml(cfg))
            print(
                f"training {sum(p.numel() for p in self.params):,} parameters on {runtime.world_size} "
                f"{runtime.device.type} rank(s) (dp_replicate {self.dims.dp_replicate} x dp_shard {self.dims.dp_shard}), "
                f"{self.accum_steps} microbatch(es) per step; MFU against {peak:.2f} TFLOP/s ({peak_source})",
                flush=True,
            )

    def train(self) -> None:
        steps = self.cfg.training.steps
        while self.step < steps:
            start = time.perf_counter()
            microbatches = [self.loader.next_batch() for _ in range(self.accum_steps)]
            lr = self.lr_scheduler.get_last_lr()[0]
            loss, grad_norm = self.train_step(microbatches)
            self.step += 1
            local_tokens = sum(inputs.numel() for inputs, _ in microbatches)
            self.metrics.maybe_log(
                self.step, loss=loss, lr=lr, grad_norm=grad_norm, local_tokens=local_tokens,
                step_time=time.perf_counter() - start,
            )
        self.metrics.close()
        if self.cfg.export.hf:
            dtype = torch.bfloat16 if self.cfg.export.dtype == "bfloat16" else torch.float32
            export_hf(
                self.model, self.output_dir / "export" / "hf", dtype=dtype,
                bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
            )

    def train_step(self, microbatches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
        """One optimizer step over the microbatches; returns (global mean loss per token, grad norm)."""
        self.optimizer.zero_grad(set_to_none=True)
        # Normalise by the number of label tokens in the whole global batch, so that a step's gradient
        # is the same however the batch is split into ranks and microbatches (and right under masking).
        local_tokens = sum(int((labels != IGNORE_INDEX).sum()) for _, labels in microbatches)
        global_tokens = self._dp_sum(torch.tensor(float(local_tokens))).item()
        loss_sum = torch.zeros((), device=self.runtime.device)
        for inputs, labels in microbatches:
            loss_sum += self.forward_backward(inputs, labels, global_tokens)
        grad_norm = clip_grad_norm(self.params, self.cfg.training.max_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        loss = self._dp_sum(loss_sum).item() / global_tokens
        return loss, grad_norm.item()

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor, global_tokens: float) -> torch.Tensor:
        """Backward of this microbatch's share of the global mean loss; returns its summed loss."""
        device = self.runtime.device
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with self.precision.autocast(device, fsdp=self.dims.fsdp_enabled):
            logits = self.model(inputs)
        loss_sum = F.cross_entropy(
            logits.flatten(0, 1).float(), labels.flatten(), reduction="sum", ignore_index=IGNORE_INDEX
        )
        # FSDP averages gradients over the data-parallel ranks; scaling by their number undoes that mean.
        (loss_sum * (self.dims.dp_size / global_tokens)).backward()
        return loss_sum.detach()

    def _dp_sum(self, value: torch.Tensor) -> torch.Tensor:
        value = value.to(self.runtime.device)
        if self.dp_group is not None:
            dist.all_reduce(value, group=self.dp_group)
        return value
