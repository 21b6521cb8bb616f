"""Test-only fault: verl's weight sync fails inside the vLLM worker process.

Loaded in every verl process through ``VERL_USE_EXTERNAL_MODULES=_fault_vllm_sync`` (with this folder
on ``PYTHONPATH``); it acts only where verl's vLLM worker extension is imported, i.e. in vLLM's
worker, and makes its per-bucket weight load raise, as vLLM's own assertion did before
``keep_vllm_cpu_weights`` ("Attempted to load weight ... into parameter torch.Size([0])").
"""

from __future__ import annotations

import wrapt

MESSAGE = "injected fault: weight sync failed inside the vLLM worker"


def _break_weight_load(module) -> None:
    def _update_weights(self, weights, **kwargs):
        raise AssertionError(MESSAGE)

    module.vLLMColocateWorkerExtension._update_weights = _update_weights


wrapt.register_post_import_hook(_break_weight_load, "verl.workers.rollout.vllm_rollout.utils")
