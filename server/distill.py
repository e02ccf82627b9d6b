"""Teacher → student distillation into the student's normalisation affine parameters (torch; CUDA if present).

CEMA-style (Chen et al. 2023, "Cloud-Device Collaborative Adaptation to Continual Changing Environments in
the Real-World", the cloud side): the cloud first adapts a stronger teacher to the uploaded batch with Tent
(Wang et al. 2021, entropy minimisation over BatchNorm affine parameters with batch statistics, Eq. 1), then
distils its softened predictions into the edge student. Only the student's BN ``weight``/``bias`` are
optimised, through the same α-mixed normalisation the device runs
(:func:`exporter.adaptable.functional_forward`); the loss is Hinton et al.'s KL(p_T^teacher ‖ p_T^student)·T².

On CUDA (``device="auto"`` picks it when present) the forward passes run under bf16 autocast, 4-D convolution
models and the samples are in channels-last memory format (:func:`use_channels_last`), the samples, parameters
and every minibatch's indices go to the GPU once per call, and the host waits for the GPU once, to copy the
results (parameters and metrics together) back. The student's steps are small enough that launching their few
hundred kernels, not running them, sets the pace (measured on an H100: 13 ms per eager bf16 step of ResNet-8
at batch 64, 256 and 1024 alike), so after ``GRAPH_WARMUP`` eager steps one step (forward, backward, fused
capturable Adam) is captured as a CUDA graph and replayed for the rest. The CPU path is plain fp32 NCHW and is
bitwise reproducible for a given seed; on CUDA results are reproducible up to cuDNN's kernel choice. The
minibatch order comes from a CPU generator seeded per call, so it is the same on every device.

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
GRAPH_WARMUP = 3
"""Eager student steps before the CUDA graph is captured (lazy initialisation must not happen in a capture)."""


def resolve_device(device: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; otherwise the named device (CUDA must exist)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return resolved


def use_channels_last(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` should run in channels-last format on ``device``: on CUDA, when it has a 4-D weight.

    cuDNN's NHWC kernels (with bf16 tensor cores) are the fast ones on recent GPUs; on CPU the NCHW path is
    kept, which is what the CPU results were measured and tested with.
    """
    return device.type == "cuda" and any(p.dim() == 4 for p in model.parameters())


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
    student; it is deterministic for a given seed on CPU. ``autocast`` (bf16), ``channels_last`` and
    ``cuda_graph`` (the student's steps replayed from a CUDA graph; CUDA only) default to on for CUDA and off
    for CPU (``None``); they are options so that benchmarks can measure what they buy.
    """

    def __init__(
        self, teacher_ckpt: Path, student_ckpt: Path, alpha: float, device: str = "auto", *,
        teacher_steps: int = 3, teacher_lr: float = 1e-3, lr: float = 1e-2, temperature: float = 2.0,
        batch_size: int = 64, seed: int = 0, autocast: bool | None = None, channels_last: bool | None = None,
        cuda_graph: bool | None = None,
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
        cuda = self.device.type == "cuda"
        self._amp = cuda if autocast is None else bool(autocast)
        self.channels_last = (use_channels_last(self.teacher, self.device)
                              or use_channels_last(self.student, self.device)) if channels_last is None \
            else bool(channels_last)
        self._format = torch.channels_last if self.channels_last else torch.contiguous_format
        self.teacher.to(self.device, memory_format=self._format).eval()
        self.student.to(self.device, memory_format=self._format).eval().requires_grad_(False)
        # Tent adapts only the BN affine of a teacher copy made once; each call resets it to the checkpoint's.
        self._tent_teacher = copy.deepcopy(self.teacher)
        self._tent_affine = configure_tent(self._tent_teacher)
        self._tent_start = [p.detach().clone() for p in self._tent_affine]
        self._projected: list[torch.Tensor] = []  # the student parameters a call keeps >= 0 (see distill)
        self._fused = cuda  # one fused Adam kernel per step on CUDA; the CPU keeps the reference implementation
        if cuda_graph and not cuda:
            raise ValueError("cuda_graph needs a CUDA device")
        self.cuda_graph = cuda if cuda_graph is None else bool(cuda_graph)
        logger.info("distiller: teacher %s, student %s on %s (bf16 autocast: %s, channels-last: %s, CUDA graph: %s)",
                    t_info["arch"], s_info["arch"], self.device, self._amp, self.channels_last, self.cuda_graph)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._amp:
            # no cast cache: it only holds casts of trainable leaves, and it must not outlive a graph capture
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()

    def _chunks(self, n: int) -> Iterator[slice]:
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    def _index_plan(self, n: int, count: int, gen: torch.Generator) -> torch.Tensor:
        """``(count, min(batch, n))`` minibatch indices (epochs reshuffled with ``gen``), copied to the device once."""
        size = min(self.batch_size, n)
        perm, pos, rows = torch.randperm(n, generator=gen), 0, []
        for _ in range(count):
            if pos + size > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            rows.append(perm[pos : pos + size])
            pos += size
        plan = torch.stack(rows) if rows else torch.empty((0, size), dtype=torch.int64)
        return plan.to(self.device)

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """The global RNGs of this call's devices seeded with ``seed``, and restored afterwards."""
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(self.seed)
            for device in cuda:
                with torch.cuda.device(device):
                    torch.cuda.manual_seed(self.seed)
            yield

    def _check(self, samples_x: np.ndarray, steps: int) -> None:
        if samples_x.ndim != 4 or tuple(samples_x.shape[1:]) != self.input_shape or samples_x.shape[0] < 1:
            raise InvalidTensorError(f"samples_x has shape {samples_x.shape}, expected (N, {self.input_shape})")
        if samples_x.dtype != np.float32 or not np.all(np.isfinite(samples_x)):
            raise InvalidTensorError(f"samples_x must be finite float32, got {samples_x.dtype}")
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")

    def _to_device(self, current_params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Every entry of ``current_params`` as its own float32 tensor on the device, moved in one copy."""
        names = sorted(current_params)
        arrays = [np.asarray(current_params[k], dtype=np.float32) for k in names]
        flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays])).to(self.device)
        out, offset = {}, 0
        for name, a in zip(names, arrays, strict=True):
            out[name] = flat[offset : offset + a.size].view(a.shape).clone()
            offset += a.size
        return out

    def distill(self, samples_x: np.ndarray, current_params: dict[str, np.ndarray], steps: int,
                nonnegative: frozenset[str] = frozenset()) -> DistillResult:
        """Adapt the teacher on ``samples_x`` (N, C, H, W), distil into the student's BN affine; see the module.

        Parameters named in ``nonnegative`` (the bundle's ``nonnegative_params``) are projected onto >= 0 after
        every optimizer step (projected gradient descent), so the result needs no projection when published."""
        self._check(samples_x, steps)
        with self._seeded():
            return self._distill(samples_x, current_params, steps, frozenset(nonnegative))

    def _distill(self, samples_x: np.ndarray, current_params: dict[str, np.ndarray], steps: int,
                 nonnegative: frozenset[str]) -> DistillResult:
        t0 = time.perf_counter()
        cuda = self.device.type == "cuda"
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.from_numpy(np.ascontiguousarray(samples_x)).to(self.device, memory_format=self._format)
        teacher_logits, t_metrics = self._adapt_teacher(x, gen)
        params = self._to_device(current_params)
        trainable_names = [k for k in sorted(params) if k.endswith(_AFFINE)]
        if not trainable_names:
            raise InvalidTensorError(f"no .weight/.bias entries among {sorted(current_params)}")
        trainable = [params[k].requires_grad_(True) for k in trainable_names]
        self._projected = [params[k] for k in trainable_names if k in nonnegative]
        kl_before, agree_before = self._evaluate(x, params, teacher_logits)
        plan = self._index_plan(x.shape[0], steps, gen)
        # the train loop is timed with CUDA events on the GPU (no wait here), with the host clock on the CPU
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else None
        if events is not None:
            events[0].record()
        t1 = time.perf_counter()
        if self.cuda_graph and steps > GRAPH_WARMUP + 1:
            self._train_graphed(x, teacher_logits, params, trainable, plan)
        else:
            opt = torch.optim.Adam(trainable, lr=self.lr, fused=True if self._fused else None)
            for idx in plan:
                opt.zero_grad(set_to_none=True)
                self._student_step(x, teacher_logits, params, idx, opt)
        train_seconds = time.perf_counter() - t1
        if events is not None:
            events[1].record()
        kl_after, agree_after = self._evaluate(x, params, teacher_logits)
        # one device → host copy (the only wait for the GPU): the trained parameters (float32), then the scalar
        # metrics (float64, each carried as two float32 words)
        scalars = {**t_metrics, "kl_before": kl_before, "kl_after": kl_after, "agreement_before": agree_before,
                   "agreement_after": agree_after}
        words = torch.stack([v.double().reshape(()) for v in scalars.values()]).view(torch.float32)
        host = torch.cat([*(params[k].detach().float().reshape(-1) for k in trainable_names), words]).cpu().numpy()
        if events is not None:
            train_seconds = events[0].elapsed_time(events[1]) / 1000.0
        new, offset = {}, 0
        for k in sorted(current_params):
            ref = np.asarray(current_params[k], dtype=np.float32)
            if k.endswith(_AFFINE):
                new[k] = host[offset : offset + ref.size].reshape(ref.shape).copy()
                offset += ref.size
            else:
                new[k] = ref.copy()  # statistics are never trained
        metrics = {name: float(v) for name, v in zip(scalars, host[offset:].copy().view(np.float64), strict=True)}
        seconds = time.perf_counter() - t0
        metrics.update({"teacher_steps": float(self.teacher_steps), "seconds": seconds, "steps": float(steps),
                        "samples_per_s": steps * min(self.batch_size, x.shape[0]) / max(train_seconds, 1e-9)})
        logger.info("distilled %d samples in %.2fs: KL %.4f -> %.4f", x.shape[0], seconds, metrics["kl_before"],
                    metrics["kl_after"])
        return DistillResult(new, metrics)

    def _student_step(self, x: torch.Tensor, teacher_logits: torch.Tensor, params: dict[str, torch.Tensor],
                      idx: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """Forward the minibatch ``idx`` through the adaptable student, KD loss, backward, optimizer step."""
        with self._autocast():
            student_logits = functional_forward(self.student, x[idx], params, self.alpha)[0]
        loss = distillation_loss(teacher_logits[idx], student_logits, self.temperature)
        loss.backward()
        opt.step()
        if self._projected:
            with torch.no_grad():
                for p in self._projected:  # in place, so a captured CUDA graph replays it too
                    p.clamp_(min=0.0)

    def _train_graphed(self, x: torch.Tensor, teacher_logits: torch.Tensor, params: dict[str, torch.Tensor],
                       trainable: list[torch.Tensor], plan: torch.Tensor) -> None:
        """The student's steps on CUDA: ``GRAPH_WARMUP`` eager ones on a side stream, then one captured CUDA graph
        replayed per remaining step (the minibatch indices copied into the graph's index tensor on the device).

        Same arithmetic as the eager loop (fused Adam, capturable so its step count lives on the GPU). If the
        capture fails, the rest runs eagerly and later calls do not try again.
        """
        opt = torch.optim.Adam(trainable, lr=self.lr, fused=True, capturable=True)
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for idx in plan[:GRAPH_WARMUP]:
                opt.zero_grad(set_to_none=True)
                self._student_step(x, teacher_logits, params, idx, opt)
        current.wait_stream(side)
        rest = plan[GRAPH_WARMUP:]
        static_idx = rest[0].clone()
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)  # the gradients are allocated (and rewritten) inside the graph
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                self._student_step(x, teacher_logits, params, static_idx, opt)
        except RuntimeError:
            logger.warning("CUDA graph capture of the student step failed; eager steps from now on", exc_info=True)
            self.cuda_graph = False
            for idx in rest:
                opt.zero_grad(set_to_none=True)
                self._student_step(x, teacher_logits, params, idx, opt)
            return
        for idx in rest:
            static_idx.copy_(idx)
            graph.replay()

    def _teacher_logits(self, teacher: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return torch.cat([teacher(x[s]).float() for s in self._chunks(x.shape[0])])

    def _adapt_teacher(self, x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Tent on the teacher copy reset to the checkpoint; return its logits on ``x`` (batch statistics) and
        its mean entropy before and after (device scalars)."""
        teacher, affine = self._tent_teacher, self._tent_affine
        with torch.no_grad():
            for p, start in zip(affine, self._tent_start, strict=True):
                p.copy_(start)
        before = self._teacher_logits(teacher, x)
        opt = torch.optim.Adam(affine, lr=self.teacher_lr, fused=True if self._fused else None)
        for idx in self._index_plan(x.shape[0], self.teacher_steps, gen):
            with self._autocast():
                loss = entropy(teacher(x[idx])).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        after = self._teacher_logits(teacher, x)
        for p in affine:
            p.grad = None
        return after, {"teacher_entropy_before": entropy(before).mean(), "teacher_entropy_after": entropy(after).mean()}

    def _evaluate(self, x: torch.Tensor, params: dict[str, torch.Tensor], teacher_logits: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean distillation loss and argmax agreement of the student (with ``params``) against the teacher,
        as device scalars (no wait for the GPU)."""
        kls, agree = [], []
        with torch.no_grad():
            for s in self._chunks(x.shape[0]):
                with self._autocast():
                    logits = functional_forward(self.student, x[s], params, self.alpha)[0].float()
                kls.append(distillation_loss(teacher_logits[s], logits, self.temperature).double() * (s.stop - s.start))
                agree.append((logits.argmax(1) == teacher_logits[s].argmax(1)).sum())
        n = x.shape[0]
        return torch.stack(kls).sum() / n, torch.stack(agree).sum().double() / n
