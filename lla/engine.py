"""The per-module training engine every method subclasses.

One training step (docs/architecture.md#one-training-step-as-data)::

    h = x
    for k in 0..K-1:
        h = forward_module(k, h.detach())          # gradient isolation: the input is cut from module k-1
        loss_k = local_loss(k, h, batch)           # the last module: CE through the real classifier
        backward_local(k, loss_k)                  # frees module k's graph now -> the activation-memory saving
        for j in in_flight: sync.wait(j); step_module(j)   # data-parallel: launched after loss k-1
        after_backward(k)                          # MAN / MLAAN: EMA updates
        for j in ready[k]: sync.launch(j)          # modules no later loss reaches: average their gradients
        (one process: sync is a no-op, so ready[k] steps + frees its gradients right here)

One schedule for one process and for ``trainer=ddp``: only the sync object differs (:class:`NoGradSync` or
:class:`lla.distributed.ModuleGradSync`), looked up once per fit. With ``accumulate_grad_batches`` = N the loop
runs forward and backward on every batch, but steps, EMA updates and syncs happen only on every N-th batch and an
epoch's last.

Methods supply ``build_aux``, ``local_loss`` and, where they need them, ``span``, ``forward_module``,
``backward_local`` and ``after_backward``. They never override ``training_step``.

Lightning counts ``global_step`` once per stepping batch (every batch without accumulation): each module has its own
SGD + scheduler inside :class:`~lla.optim.ModuleOptimizers`, which Lightning sees as one optimizer.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from lla.compat import attached_trainer
from lla.errors import ConfigError
from lla.optim import ModuleOptimizers, OptimConfig, check_clipping
from lla.recompute import checkpoint_mode, set_recompute
from lla.splits import Split, resolve_split


class NoGradSync:
    """The gradient sync of a single process: nothing to average. Same ``launch``/``wait`` interface as
    :class:`lla.distributed.ModuleGradSync`, so one process runs the data-parallel schedule."""

    def launch(self, model, j: int) -> None:
        pass

    def wait(self, model, j: int) -> None:
        pass


NO_SYNC = NoGradSync()


class LocalLearner(L.LightningModule):
    """Base LightningModule: a backbone trained as K local modules, each with its own optimizer.

    Args:
        backbone: an :class:`lla.backbones.Backbone` (layer chain + head + per-layer specs).
        k: the paper's nominal number of local modules; the method's split family maps it to a table entry.
        num_classes: classifier width (aux heads use it too).
        image_size: side of the training image; aux nets size their pooling from it.
        optim: SGD recipe (``OptimConfig`` fields).
        max_epochs: length of the LR schedule.
        split: an explicit :class:`~lla.splits.Split` (otherwise resolved from ``k`` and ``split_family``).
        aux_checkpoint: store fewer aux-net activations and rebuild them in backward (:mod:`lla.recompute`):
            ``selective`` (= ``True``) rebuilds BN/ReLU outputs only, ``full`` recomputes whole segments.
    """

    #: which K-label table this method reads (docs/splits.md#tables); see lla.splits.FAMILIES
    split_family: str = "infopro"

    def __init__(self, backbone: nn.Module, k: int = 1, num_classes: int = 10, image_size: int = 32,
                 optim: Mapping[str, Any] | OptimConfig | None = None, max_epochs: int = 1,
                 split: Split | None = None, denormalize=None, *, aux_checkpoint: bool | str = False):
        super().__init__()
        self.automatic_optimization = False
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.max_epochs = int(max_epochs)
        self.optim_cfg = optim if isinstance(optim, OptimConfig) else OptimConfig(**dict(optim or {}))
        self.optim_cfg.validate()
        self.split = split if split is not None else self.resolve_split(backbone, int(k))
        self._denormalize = denormalize
        self._x01_cache: tuple[Tensor, Tensor] | None = None
        self.save_hyperparameters(ignore=["backbone", "split", "denormalize", "optim"])
        self.hparams["optim"] = dict(vars(self.optim_cfg))
        self.hparams["num_modules"] = self.split.num_modules
        self.hparams["boundaries"] = list(self.split.boundaries)

        K = self.num_modules
        # Aux nets for modules 0..K-2 (the last module uses the backbone's own head).
        self.aux = nn.ModuleList([self.build_aux(k) for k in range(K - 1)])
        self.aux_checkpoint = checkpoint_mode(aux_checkpoint)  # False, "selective" or "full"
        set_recompute(self.aux, self.aux_checkpoint)
        self._ready = self._ready_schedule()
        self._max_span = max(self.span(k) for k in range(K))

        # val/acc is top-1 over all samples (what the papers report); the mean of per-class accuracies (torchmetrics'
        # default average) differs on an imbalanced set such as SVHN's and is logged as val/acc_class_mean
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.val_acc_class_mean = MulticlassAccuracy(num_classes=self.num_classes, average="macro")
        self.val_acc_best = MaxMetric()
        self.val_loss = MeanMetric()
        self.val_top5 = MulticlassAccuracy(num_classes=self.num_classes, top_k=5, average="micro") \
            if self.num_classes >= 100 else None
        self.register_buffer("_loss_sum", torch.zeros(K), persistent=False)
        self._loss_batches = 0
        self.step_inputs: deque[Tensor] = deque(maxlen=self._max_span)
        self.channels_last = False
        self.compiled_modules: list | None = None  # compile=true: one compiled function per module (lla.compile)
        self._sync: tuple[Any, bool] | None = None  # (gradient sync, overlaps?), looked up once per fit
        self._pipe = None  # trainer=pipeline: this process's stage (lla.pipeline.PipelineStage), looked up per fit
        self.configure_module_steps()

    # ------------------------------------------------------------------ structure
    def resolve_split(self, backbone: nn.Module, k: int) -> Split:
        """Map the nominal K to module boundaries; methods with extra K rules (AugLocal) override this."""
        return resolve_split(backbone.name, backbone.num_layers, k, self.split_family)

    @property
    def num_modules(self) -> int:
        return self.split.num_modules

    def module_layers(self, k: int) -> range:
        return self.split.module_layers(k)

    def module_output_spec(self, k: int):
        """LayerSpec of module k's last layer: what its aux net receives."""
        return self.backbone.specs[self.module_layers(k)[-1]]

    def module_output_shape(self, k: int) -> tuple[int, int]:
        """(channels, spatial side) of module k's output at ``image_size``."""
        last = self.module_layers(k)[-1]
        return self.backbone.specs[last].out_channels, self.backbone.spatial_size(last, self.image_size)

    def module_parameters(self, k: int) -> Iterator[nn.Parameter]:
        """Trainable parameters stepped by module k's optimizer: its layers, its aux net, and the head if last."""
        for i in self.module_layers(k):
            yield from self.backbone.layers[i].parameters()
        if k < self.num_modules - 1:
            yield from self.aux[k].parameters()
        else:
            yield from self.backbone.head.parameters()
        yield from self.extra_module_parameters(k)

    def extra_module_parameters(self, k: int) -> Iterator[nn.Parameter]:
        """Hook for methods that keep per-module parameters outside ``self.aux`` (none by default)."""
        return iter(())

    def _ready_schedule(self) -> list[list[int]]:
        """ready[k] = modules whose last incoming loss is loss k (span-aware; j = k for isolated methods)."""
        K = self.num_modules
        last_loss = list(range(K))
        for k in range(K):
            span = self.span(k)
            if not 1 <= span <= k + 1:
                raise ConfigError("method.span", f"loss {k} claims to reach {span} modules", f"1..{k + 1}")
            for j in range(k - span + 1, k + 1):
                last_loss[j] = max(last_loss[j], k)
        return [[j for j in range(K) if last_loss[j] == k] for k in range(K)]

    # ------------------------------------------------------------------ method hooks
    def build_aux(self, k: int) -> nn.Module:
        """The auxiliary net for module k (k < K-1). E2E has none (K = 1)."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_aux for K > 1")

    def local_loss(self, k: int, h: Tensor, batch) -> Tensor:
        """Loss of module k < K-1 computed from its output h."""
        raise NotImplementedError

    def final_loss(self, h: Tensor, batch) -> Tensor:
        """The last module: plain softmax CE through the backbone's classifier."""
        return F.cross_entropy(self.backbone.head(h), batch[1])

    def span(self, k: int) -> int:
        """How many modules loss k reaches (k, k-1, ...). 1 = strict gradient isolation."""
        return 1

    def forward_module(self, k: int, x: Tensor) -> Tensor:
        """Run module k on its (detached) input. A loss that reaches s = ``span(k)`` > 1 modules (MLAAN, HPFF) needs
        their graph: inside a training step ``step_inputs`` holds the inputs of the last s modules, and modules
        k-s+1..k run again from the oldest of them (the same values as before, now with graph)."""
        s, kept = self.span(k), self.step_inputs
        if s > 1 and len(kept) >= s and kept[-1] is x:
            h = kept[-s]
            for j in range(k - s + 1, k + 1):
                h = self.run_module(j, h)
            return h
        return self.run_module(k, x)

    def run_module(self, k: int, x: Tensor) -> Tensor:
        """Module k's layers (one compiled graph with ``compile=true``) on x."""
        if self.compiled_modules is not None:
            return self.compiled_modules[k](x)
        for i in self.module_layers(k):
            x = self.backbone.layers[i](x)
        return x

    def backward_local(self, k: int, loss: Tensor) -> None:
        self.manual_backward(loss)

    # ------------------------------------------------------------------ spanning losses (MLAAN, HPFF)
    def layer_params(self, k: int) -> list[nn.Parameter]:
        """Module k's trainable backbone parameters: its layers only (not its aux net, nor the head)."""
        return [p for i in self.module_layers(k) for p in self.backbone.layers[i].parameters() if p.requires_grad]

    def head_grads(self, cut: Tensor, losses: list[Tensor | None]) -> list[Tensor | None]:
        """Back-propagate each loss alone down to ``cut`` (module k's output, a leaf that requires grad): each one
        fills its own head's parameter gradients, and its gradient on ``cut`` is returned (None for a None loss)."""
        grads: list[Tensor | None] = []
        for loss in losses:
            if loss is None:
                grads.append(None)
                continue
            self.manual_backward(loss)
            grads.append(cut.grad)
            cut.grad = None
        return grads

    def backward_span(self, k: int, h: Tensor, grad: Tensor, cascade: Tensor | None = None) -> None:
        """Back-propagate module k's output gradient through the modules its loss reaches. ``grad`` (all of it)
        reaches module k's weights; ``cascade`` (the share a spanning loss sends on; None: all of ``grad``) goes on
        through module k, input gradients only, into modules k-span+1..k-1. Module k's backward runs twice then,
        once for weights and inputs and once for inputs alone, instead of twice both; every graph is freed."""
        if cascade is None or self.span(k) == 1:
            h.backward(grad)
            return
        torch.autograd.backward(h, grad, inputs=self.layer_params(k), retain_graph=True)
        upstream = [p for j in range(k - self.span(k) + 1, k) for p in self.layer_params(j)]
        torch.autograd.backward(h, cascade, inputs=upstream)

    def after_backward(self, k: int) -> None:
        """Runs right after loss k's backward, before any optimizer step of this batch touches module k+1; only on
        batches where the modules step (with gradient accumulation, once per window)."""

    def use_channels_last(self) -> None:
        """Weights and every batch in torch.channels_last (NHWC): a layout, same model. On the benchmark CPU 10-20%
        faster steps for E2E and every method (bench/interleaved_cl.md); on a GPU it pays off with fp16/bf16."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.channels_last and isinstance(batch, (tuple, list)) and batch[0].dim() == 4:
            batch = type(batch)([batch[0].contiguous(memory_format=torch.channels_last), *batch[1:]])
        return batch

    # ------------------------------------------------------------------ helpers for methods
    def x01(self, batch) -> Tensor:
        """The de-normalised image in [0, 1] (InfoPro's reconstruction target), computed once per batch."""
        x = batch[0]
        if self._x01_cache is not None and self._x01_cache[0] is x:
            return self._x01_cache[1]
        if self._denormalize is None:
            raise ConfigError("dataset", "this method needs the de-normalised image but the data module gave no "
                              "denormalize()", "a dataset from conf/dataset")
        out = self._denormalize(x)
        self._x01_cache = (x, out)
        return out

    # ------------------------------------------------------------------ Lightning
    def forward(self, x: Tensor) -> Tensor:
        """Inference is the plain backbone + head: aux nets are never used."""
        return self.backbone(x)

    def configure_optimizers(self):
        groups = [list(self.module_parameters(k)) for k in range(self.num_modules)]
        seen: dict[int, int] = {}
        for k, params in enumerate(groups):
            for p in params:
                if id(p) in seen:
                    raise RuntimeError(f"parameter shared by modules {seen[id(p)]} and {k}")
                seen[id(p)] = k
        groups = [[p for p in params if p.requires_grad] for params in groups]
        orphans = [n for n, p in self.named_parameters() if p.requires_grad and id(p) not in seen]
        if orphans:
            raise RuntimeError(f"trainable parameters in no module's optimizer: {orphans[:5]}")
        return ModuleOptimizers(groups, self.optim_cfg, self.max_epochs)

    def configure_module_steps(self, accumulate_grad_batches: int = 1, gradient_clip_val: float | None = None,
                               gradient_clip_algorithm: str | None = "norm") -> None:
        """Per-module gradient accumulation and clipping (the Trainer's flags of the same names, which Lightning
        rejects under manual optimization; ``lla.cli`` routes them here).

        Every module back-propagates each batch (its activations are freed as usual) and accumulates its gradients;
        it steps on every ``accumulate_grad_batches``-th batch of an epoch and on the epoch's last batch, with the
        mean of the gradients of the batches in that window. ``gradient_clip_val`` (> 0) clips each module's
        gradients right before its own step: the module's total 2-norm (``"norm"``) or each element (``"value"``).
        """
        n = accumulate_grad_batches
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError("trainer.accumulate_grad_batches", f"must be an integer >= 1, got {n!r}", ">= 1")
        self.accumulate_grad_batches = n
        self._window_batches = 0
        self._clip = check_clipping(gradient_clip_val, gradient_clip_algorithm)  # applied at fit start

    def training_step(self, batch, batch_idx: int):
        opt = self.optimizers()
        modules_opt: ModuleOptimizers = opt.optimizer
        sync, overlap = self._sync_schedule()
        steps = self._window_ends(batch_idx)  # False: accumulate this batch's gradients, step nothing
        x = batch[0]
        losses: list[Tensor] = []
        self.step_inputs.clear()
        h = x
        modules = range(self.num_modules)
        if self._pipe is not None:  # trainer=pipeline: this stage's modules, on the previous stage's output
            batch, h = self._pipe.receive(self, batch, batch_idx, steps)
            modules = self._pipe.modules
        in_flight: list[int] = []  # modules whose gradient sync is launched; they step after the next loss
        for k in modules:
            inp = h.detach()
            if self._max_span > 1:
                self.step_inputs.append(inp)
            h = self.forward_module(k, inp)  # overlaps the gradient sync in flight
            if self._pipe is not None and k == modules[-1]:
                self._pipe.send(h, batch)  # the next stage starts while this one back-propagates
            loss = self.final_loss(h, batch) if k == self.num_modules - 1 else self.local_loss(k, h, batch)
            self.backward_local(k, loss)
            self._step_modules(in_flight, sync, modules_opt)  # ready at loss k-1: loss k never reaches them
            in_flight = []
            if steps:
                self.after_backward(k)
                in_flight = self._ready[k]
                for j in in_flight:
                    self._launch(j, sync, modules_opt)
                if not overlap:  # a synchronous sync (one process): step + free gradients right away
                    self._step_modules(in_flight, sync, modules_opt)
                    in_flight = []
            losses.append(loss.detach())
        self._step_modules(in_flight, sync, modules_opt)
        self.step_inputs.clear()
        self._x01_cache = None
        if steps:
            self._window_batches = 0
            opt.step()  # ticks global_step once per (accumulated) batch; every module has already stepped
        stacked = torch.stack(losses)
        self._loss_sum[modules.start:modules.stop] += stacked.float()
        self._loss_batches += 1
        # not prog_bar: Lightning turns progress-bar metrics into floats after every batch (a host sync per step);
        # the progress bar reads train/loss itself, once per refresh (lla.callbacks.LossProgressBar)
        self.log("train/loss", stacked[-1], on_step=True, on_epoch=False)
        return None

    def _window_ends(self, batch_idx: int) -> bool:
        """Whether the modules step on this batch: every ``accumulate_grad_batches``-th batch of the epoch and the
        epoch's last one (a shorter last window steps on the mean of its own batches, as Lightning steps there)."""
        self._window_batches += 1
        n = self.accumulate_grad_batches
        if n == 1 or (batch_idx + 1) % n == 0:
            return True
        trainer = attached_trainer(self)
        if trainer is None:
            return False
        total = trainer.num_training_batches
        return (isinstance(total, int) and batch_idx + 1 >= total) or \
            bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)

    def _sync_schedule(self) -> tuple[Any, bool]:
        """(gradient sync, whether it overlaps): the strategy's per-module all-reducer (lla.distributed), whose
        modules step after the next loss so the all-reduce runs behind that module's compute, or a synchronous
        no-op in one process, whose modules step at once. Looked up once per fit (``on_fit_start``)."""
        if self._sync is None:
            trainer = attached_trainer(self)
            sync = getattr(trainer.strategy, "grad_sync", None) if trainer is not None else None
            self._sync = (sync, True) if sync is not None else (NO_SYNC, False)
        return self._sync

    def _launch(self, j: int, sync, modules_opt: ModuleOptimizers) -> None:
        if self._window_batches > 1:  # the window's mean gradient (before the sync: ranks average the same thing)
            modules_opt.scale_grads(j, 1.0 / self._window_batches)
        sync.launch(self, j)

    def _step_modules(self, modules: list[int], sync, modules_opt: ModuleOptimizers) -> None:
        for j in modules:
            sync.wait(self, j)  # data-parallel: the averaged gradients are back in p.grad
            modules_opt.step_module(j)  # clips first where configured

    def start_grad_sync(self, j: int) -> None:
        """Data-parallel training: launch module j's async gradient all-reduce (lla.distributed); no-op otherwise."""
        self._sync_schedule()[0].launch(self, j)

    def reduce_module_grads(self, j: int) -> None:
        """Data-parallel training: average module j's gradients across processes before it steps (waits for the
        all-reduce ``start_grad_sync`` launched, or runs it now)."""
        self._sync_schedule()[0].wait(self, j)

    def on_fit_start(self) -> None:
        from torch.nn.parallel import DistributedDataParallel

        self._sync = None
        self._sync_schedule()
        self._pipe = getattr(self.trainer.strategy, "pipeline_stage", None)
        self._window_batches = 0

        if isinstance(self.trainer.strategy.model, DistributedDataParallel):
            raise ConfigError("trainer.strategy", "DistributedDataParallel allows one backward per step, local "
                              "learning runs one per module", "trainer=ddp (lla.distributed.LocalDDPStrategy)")
        # precision=16-mixed: manual_backward scales each loss; the module steps must unscale (ModuleOptimizers).
        modules_opt: ModuleOptimizers = self.optimizers().optimizer
        modules_opt.use_scaler(getattr(self.trainer.precision_plugin, "scaler", None))
        modules_opt.set_clipping(*self._clip)

    def on_train_epoch_start(self) -> None:
        self._window_batches = 0  # a window never spans epochs (the last batch of an epoch steps)
        self._loss_sum.zero_()
        self._loss_batches = 0

    def on_train_epoch_end(self) -> None:
        if self._pipe is not None:  # every stage's loss sums on every rank (rank 0 logs)
            self.trainer.strategy.end_epoch(self)
        if self._loss_batches:
            means = (self._loss_sum / self._loss_batches).tolist()  # one host sync per epoch
            for k, v in enumerate(means):
                if math.isfinite(v):
                    self.log(f"train/loss/m{k}", v, on_epoch=True, sync_dist=False)
            self.log("train/loss_epoch", means[-1], on_epoch=True)
        modules_opt: ModuleOptimizers = self.optimizers().optimizer
        self.log("train/lr", modules_opt.lr, on_epoch=True)
        modules_opt.step_schedulers()

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch[0], batch[1]
        logits = self(x)
        self.val_loss.update(F.cross_entropy(logits, y))
        self.val_acc.update(logits, y)
        self.val_acc_class_mean.update(logits, y)
        if self.val_top5 is not None:
            self.val_top5.update(logits, y)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
        self.log("val/acc", acc, prog_bar=True)
        self.log("val/loss", self.val_loss.compute())
        self.log("val/acc_class_mean", self.val_acc_class_mean.compute())
        self.log("val/acc_best", self.val_acc_best.compute() if self.val_acc_best.update_called else acc,
                 prog_bar=True)
        if self.val_top5 is not None:
            self.log("val/acc_top5", self.val_top5.compute())
            self.val_top5.reset()
        self.val_acc.reset()
        self.val_acc_class_mean.reset()
        self.val_loss.reset()

    def test_step(self, batch, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self.log("test/acc", self.val_acc.compute())
        self.log("test/loss", self.val_loss.compute())
        self.log("test/acc_class_mean", self.val_acc_class_mean.compute())
        if self.val_top5 is not None:
            self.log("test/acc_top5", self.val_top5.compute())
            self.val_top5.reset()
        self.val_acc.reset()
        self.val_acc_class_mean.reset()
        self.val_loss.reset()

    # ------------------------------------------------------------------ reporting
    def describe(self) -> dict:
        """What a run should record about its split: the K label, the real module count, the boundaries."""
        return {"method_class": type(self).__name__, "k": self.split.k_label, "modules": self.num_modules,
                "boundaries": list(self.split.boundaries), "split_source": self.split.source,
                "aux_checkpoint": self.aux_checkpoint}
