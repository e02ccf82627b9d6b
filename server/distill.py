"""Teacher → student distillation into the student's normalisation affine parameters (torch; CUDA if present).

CEMA-style (Chen et al. 2023, "Cloud-Device Collaborative Adaptation to Continual Changing Environments in
the Real-World", the cloud side): the cloud first adapts a stronger teacher to the uploaded batch with Tent
(Wang et al. 2021, entropy minimisation over BatchNorm affine parameters with batch statistics, Eq. 1), then
distils its softened predictions into the edge student. Only the student's BN ``weight``/``bias`` are
optimised, through the same α-mixed normalisation the device runs
(:func:`exporter.adaptable.functional_forward`); the loss is Hinton et al.'s KL(p_T^teacher ‖ p_T^student)·T².

Imported only by the round worker when a distillation round first runs; nothing else on the server
imports torch.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from exporter.adaptable import functional_forward
from exporter.checkpoint import load_checkpoint
from server.errors import InvalidTensorError
from server.rounds import DistillResult

logger = logging.getLogger(__name__)
_AFFINE = (".weight", ".bias")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device (CUDA must exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def configure_tent(model: nn.Module) -> list[nn.Parameter]:
    """Put ``model`` in Tent mode; return the BN affine parameters, the only ones left trainable.

    BatchNorm layers normalise with the current batch's statistics and keep no running statistics.
    """
    model.train()
    model.requires_grad_(False)
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.track_running_stats = False
            module.running_mean = None
            module.running_var = None
            if module.affine:
                module.weight.requires_grad_(True)
                module.bias.requires_grad_(True)
                params += [module.weight, module.bias]
    if not params:
        raise ValueError(f"{type(model).__name__} has no affine BatchNorm layer for Tent")
    return params


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy (nats) of ``softmax(logits)``."""
    logp = F.log_softmax(logits.float(), dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def distillation_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """KL(softmax(t/T) ‖ softmax(s/T))·T², averaged over the batch (Hinton et al. 2015)."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=1)
    s = F.log_softmax(student_logits.float() / temperature, dim=1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


class TorchDistiller:
    """The :class:`~server.rounds.Distiller` of the server: Tent on the teacher, then KD into the student's BN affine.

    Each call starts from the checkpoint's teacher (episodic adaptation) and from ``current_params`` for the
    student; it is deterministic for a given seed on CPU.
    """

    def __init__(
        self, teacher_ckpt: Path, student_ckpt: Path, alpha: float, device: str = "auto", *,
        teacher_steps: int = 3, teacher_lr: float = 1e-3, lr: float = 1e-2, temperature: float = 2.0,
        batch_size: int = 64, seed: int = 0,
    ) -> None:
        """Load both checkpoints (same classes and input) onto ``device``; hyperparameters are fixed here."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha {alpha} is outside [0, 1]")
        if teacher_steps < 0 or batch_size < 2 or lr <= 0 or teacher_lr <= 0 or temperature <= 0:
            raise ValueError("teacher_steps >= 0, batch_size >= 2 and positive lr, teacher_lr, temperature needed")
        self.device = resolve_device(device)
        self.alpha, self.teacher_steps, self.teacher_lr = float(alpha), teacher_steps, teacher_lr
        self.lr, self.temperature, self.batch_size, self.seed = lr, temperature, batch_size, seed
        self.teacher, t_info = load_checkpoint(Path(teacher_ckpt))
        self.student, s_info = load_checkpoint(Path(student_ckpt))
        t_spec, s_spec = t_info["spec"], s_info["spec"]
        if (t_spec.num_classes, t_spec.in_channels, t_spec.image_size) != (
                s_spec.num_classes, s_spec.in_channels, s_spec.image_size):
            raise ValueError(f"teacher spec {t_spec} and student spec {s_spec} differ in classes or input")
        self.input_shape = (s_spec.in_channels, s_spec.image_size, s_spec.image_size)
        self.teacher.to(self.device).eval()
        self.student.to(self.device).eval().requires_grad_(False)
        self._amp = self.device.type == "cuda"
        logger.info("distiller: teacher %s, student %s on %s (bf16 autocast: %s)",
                    t_info["arch"], s_info["arch"], self.device, self._amp)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    def _minibatches(self, n: int, count: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
        size = min(self.batch_size, n)
        perm, pos = torch.randperm(n, generator=gen), 0
        for _ in range(count):
            if pos + size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            yield perm[pos : pos + size].to(self.device)
            pos += size

    def _check(self, samples_x: np.ndarray, steps: int) -> None:
        if samples_x.ndim != 4 or tuple(samples_x.shape[1:]) != self.input_shape or samples_x.shape[0] < 1:
            raise InvalidTensorError(f"samples_x has shape {samples_x.shape}, expected (N, {self.input_shape})")
        if samples_x.dtype != np.float32 or not np.all(np.isfinite(samples_x)):
            raise InvalidTensorError(f"samples_x must be finite float32, got {samples_x.dtype}")
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")

    def distill(self, samples_x: np.ndarray, current_params: dict[str, np.ndarray], steps: int) -> DistillResult:
        """Adapt the teacher on ``samples_x`` (N, C, H, W), distil into the student's BN affine; see the module."""
        self._check(samples_x, steps)
        t0 = time.perf_counter()
        torch.manual_seed(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.from_numpy(np.ascontiguousarray(samples_x)).to(self.device)
        teacher_logits, t_metrics = self._adapt_teacher(x, gen)
        params = {k: torch.tensor(np.asarray(v, dtype=np.float32), device=self.device)
                  for k, v in current_params.items()}
        trainable = [params[k].requires_grad_(True) for k in sorted(params) if k.endswith(_AFFINE)]
        if not trainable:
            raise InvalidTensorError(f"no .weight/.bias entries among {sorted(current_params)}")
        kl_before, agree_before = self._evaluate(x, params, teacher_logits)
        t1 = time.perf_counter()
        opt = torch.optim.Adam(trainable, lr=self.lr)
        for idx in self._minibatches(x.shape[0], steps, gen):
            with self._autocast():
                student_logits = functional_forward(self.student, x[idx], params, self.alpha)[0]
            loss = distillation_loss(teacher_logits[idx], student_logits, self.temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_seconds = time.perf_counter() - t1
        kl_after, agree_after = self._evaluate(x, params, teacher_logits)
        new = {k: v.detach().float().cpu().numpy().astype(np.float32) for k, v in params.items()}
        for k in new:
            if not k.endswith(_AFFINE):
                new[k] = np.asarray(current_params[k], dtype=np.float32).copy()  # statistics are never trained
        seconds = time.perf_counter() - t0
        metrics = {**t_metrics, "kl_before": kl_before, "kl_after": kl_after, "agreement_before": agree_before,
                   "agreement_after": agree_after, "seconds": seconds, "steps": float(steps),
                   "samples_per_s": steps * min(self.batch_size, x.shape[0]) / max(train_seconds, 1e-9)}
        logger.info("distilled %d samples in %.2fs: KL %.4f -> %.4f", x.shape[0], seconds, kl_before, kl_after)
        return DistillResult(new, metrics)

    def _teacher_logits(self, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return torch.cat([teacher(x[s]).float() for s in self._chunks(x.shape[0])])

    def _adapt_teacher(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Tent on a fresh copy of the teacher; return its logits on ``x`` (batch statistics) and metrics."""
        teacher = copy.deepcopy(self.teacher)
        affine = configure_tent(teacher)
        before = self._teacher_logits(teacher, x)
        opt = torch.optim.Adam(affine, lr=self.teacher_lr)
        for idx in self._minibatches(x.shape[0], self.teacher_steps, gen):
            with self._autocast():
                loss = entropy(teacher(x[idx])).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        after = self._teacher_logits(teacher, x)
        return after, {"teacher_entropy_before": float(entropy(before).mean()),
                       "teacher_entropy_after": float(entropy(after).mean()),
                       "teacher_steps": float(self.teacher_steps)}

    def _evaluate(self, x: torch.Tensor, params: dict[str, torch.Tensor], teacher_logits: torch.Tensor
                  ) -> tuple[float, float]:
        """Mean distillation loss and argmax agreement of the student (with ``params``) against the teacher."""
        kl, agree = 0.0, 0
        with torch.no_grad():
            for s in self._chunks(x.shape[0]):
                with self._autocast():
                    logits = functional_forward(self.student, x[s], params, self.alpha)[0].float()
                kl += float(distillation_loss(teacher_logits[s], logits, self.temperature)) * (s.stop - s.start)
                agree += int((logits.argmax(1) == teacher_logits[s].argmax(1)).sum())
        n = x.shape[0]
        return kl / n, agree / n
