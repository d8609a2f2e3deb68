"""detectron2's SimpleTrainer with what DETR training needs: gradient clipping by global norm
and optional mixed precision (float16 with a grad scaler on CUDA, bfloat16 elsewhere)."""
import time

import torch
from detectron2.engine import SimpleTrainer

__all__ = ["DetrTrainer"]


class DetrTrainer(SimpleTrainer):
    def __init__(self, model, data_loader, optimizer, clip_max_norm: float = 0.1, amp: bool = False,
                 amp_dtype: str = "float16", device: str = "cuda", clip_norm_type: float = 2.0):
        super().__init__(model, data_loader, optimizer)
        self.clip_max_norm = clip_max_norm
        self.clip_norm_type = clip_norm_type
        self.amp = amp
        self.device_type = torch.device(device).type
        self.amp_dtype = getattr(torch, amp_dtype)
        if self.device_type != "cuda" and self.amp_dtype == torch.float16:
            self.amp_dtype = torch.bfloat16  # float16 autocast is CUDA-only in practice
        use_scaler = amp and self.amp_dtype == torch.float16
        self.grad_scaler = torch.amp.GradScaler(self.device_type, enabled=use_scaler)

    def run_step(self):
        assert self.model.training, "DetrTrainer: the model was switched to eval mode"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.amp_dtype, enabled=self.amp):
            loss_dict = self.model(data)
            losses = sum(loss_dict.values())
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_scaler.scale(losses).backward()
        if self.clip_max_norm > 0:
            self.grad_scaler.unscale_(self.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_max_norm, self.clip_norm_type)
            self.storage.put_scalar("grad_norm", float(grad_norm), smoothing_hint=True)
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self):
        state = super().state_dict()
        state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "grad_scaler" in state_dict:
            self.grad_scaler.load_state_dict(state_dict["grad_scaler"])
